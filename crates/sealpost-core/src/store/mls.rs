//! Sealpost's OpenMLS storage provider: OpenMLS state in the client store's own `mls_*`
//! tables, written through the engine's connection (so inside its transaction), encoded
//! with [`super::codec`], with cached prepared statements.
//!
//! Compared with `openmls_sqlite_storage` (JSON, used until schema version 4), values are
//! about a third of the size and several times cheaper to encode and decode (the
//! message-secrets value OpenMLS rewrites on every message fits in one page instead of
//! spilling to overflow pages), a rewritten value is updated in place instead of deleted
//! and reinserted (one B-tree page instead of the table and its index), and no statement
//! is compiled twice. [`convert_legacy`] converts a store written by the old provider.

use openmls_traits::storage::{CURRENT_VERSION, Entity, Key, StorageProvider, traits};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::codec;

/// The tables (created by migration 4 of the client store).
pub(crate) const SCHEMA: &str = "
CREATE TABLE mls_group_data (
    group_id BLOB NOT NULL,
    kind     INTEGER NOT NULL,
    value    BLOB NOT NULL,
    PRIMARY KEY (group_id, kind)
);
CREATE TABLE mls_keys (
    kind  INTEGER NOT NULL,
    key   BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE mls_epoch_key_pairs (
    group_id   BLOB NOT NULL,
    epoch_id   BLOB NOT NULL,
    leaf_index INTEGER NOT NULL,
    key_pairs  BLOB NOT NULL,
    PRIMARY KEY (group_id, epoch_id, leaf_index)
);
CREATE TABLE mls_own_leaf_nodes (
    id        INTEGER PRIMARY KEY,
    group_id  BLOB NOT NULL,
    leaf_node BLOB NOT NULL
);
CREATE INDEX mls_own_leaf_nodes_by_group ON mls_own_leaf_nodes (group_id);
CREATE TABLE mls_proposals (
    id           INTEGER PRIMARY KEY,
    group_id     BLOB NOT NULL,
    proposal_ref BLOB NOT NULL,
    proposal     BLOB NOT NULL,
    UNIQUE (group_id, proposal_ref)
);
";

/// What a row of `mls_group_data` holds, with the name `openmls_sqlite_storage` used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum GroupData {
    JoinConfig = 1,
    Tree = 2,
    InterimTranscriptHash = 3,
    Context = 4,
    ConfirmationTag = 5,
    GroupState = 6,
    MessageSecrets = 7,
    ResumptionPskStore = 8,
    OwnLeafIndex = 9,
    UseRatchetTreeExtension = 10,
    GroupEpochSecrets = 11,
    ApplicationExportTree = 12,
}

impl GroupData {
    const ALL: [Self; 12] = [
        Self::JoinConfig,
        Self::Tree,
        Self::InterimTranscriptHash,
        Self::Context,
        Self::ConfirmationTag,
        Self::GroupState,
        Self::MessageSecrets,
        Self::ResumptionPskStore,
        Self::OwnLeafIndex,
        Self::UseRatchetTreeExtension,
        Self::GroupEpochSecrets,
        Self::ApplicationExportTree,
    ];

    fn legacy_name(self) -> &'static str {
        match self {
            Self::JoinConfig => "join_group_config",
            Self::Tree => "tree",
            Self::InterimTranscriptHash => "interim_transcript_hash",
            Self::Context => "context",
            Self::ConfirmationTag => "confirmation_tag",
            Self::GroupState => "group_state",
            Self::MessageSecrets => "message_secrets",
            Self::ResumptionPskStore => "resumption_psk_store",
            Self::OwnLeafIndex => "own_leaf_index",
            Self::UseRatchetTreeExtension => "use_ratchet_tree_extension",
            Self::GroupEpochSecrets => "group_epoch_secrets",
            Self::ApplicationExportTree => "application_export_tree",
        }
    }
}

/// What a row of `mls_keys` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum KeyKind {
    Signature = 1,
    Encryption = 2,
    KeyPackage = 3,
    Psk = 4,
}

fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, rusqlite::Error> {
    codec::to_vec(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn decode<T: DeserializeOwned>(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<T> {
    let bytes = row.get_ref(column)?.as_blob()?;
    codec::from_slice(bytes)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Blob, Box::new(e)))
}

/// The OpenMLS storage provider on a connection (the caller's transaction, if any).
pub struct MlsStorage<'a> {
    conn: &'a Connection,
}

impl<'a> MlsStorage<'a> {
    pub fn new(conn: &'a Connection) -> Self {
        Self { conn }
    }

    fn write_group<K: Key<CURRENT_VERSION>, V: Entity<CURRENT_VERSION>>(
        &self,
        group_id: &K,
        kind: GroupData,
        value: &V,
    ) -> Result<(), rusqlite::Error> {
        // An upsert rewrites the row in place: one B-tree page (and the value's own
        // overflow pages, if any), where INSERT OR REPLACE deletes and reinserts.
        self.conn
            .prepare_cached(
                "INSERT INTO mls_group_data (group_id, kind, value) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (group_id, kind) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![encode(group_id)?, kind as u8, encode(value)?])?;
        Ok(())
    }

    fn read_group<K: Key<CURRENT_VERSION>, V: Entity<CURRENT_VERSION>>(
        &self,
        group_id: &K,
        kind: GroupData,
    ) -> Result<Option<V>, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT value FROM mls_group_data WHERE group_id = ?1 AND kind = ?2")?
            .query_row(params![encode(group_id)?, kind as u8], |row| decode(row, 0))
            .optional()
    }

    fn delete_group<K: Key<CURRENT_VERSION>>(
        &self,
        group_id: &K,
        kind: GroupData,
    ) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("DELETE FROM mls_group_data WHERE group_id = ?1 AND kind = ?2")?
            .execute(params![encode(group_id)?, kind as u8])?;
        Ok(())
    }

    fn write_key<K: Key<CURRENT_VERSION>, V: Entity<CURRENT_VERSION>>(
        &self,
        kind: KeyKind,
        key: &K,
        value: &V,
    ) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached(
                "INSERT INTO mls_keys (kind, key, value) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![kind as u8, encode(key)?, encode(value)?])?;
        Ok(())
    }

    fn read_key<K: Key<CURRENT_VERSION>, V: Entity<CURRENT_VERSION>>(
        &self,
        kind: KeyKind,
        key: &K,
    ) -> Result<Option<V>, rusqlite::Error> {
        self.conn
            .prepare_cached("SELECT value FROM mls_keys WHERE kind = ?1 AND key = ?2")?
            .query_row(params![kind as u8, encode(key)?], |row| decode(row, 0))
            .optional()
    }

    fn delete_key<K: Key<CURRENT_VERSION>>(
        &self,
        kind: KeyKind,
        key: &K,
    ) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("DELETE FROM mls_keys WHERE kind = ?1 AND key = ?2")?
            .execute(params![kind as u8, encode(key)?])?;
        Ok(())
    }
}

impl StorageProvider<CURRENT_VERSION> for MlsStorage<'_> {
    type Error = rusqlite::Error;

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::JoinConfig, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.conn
            .prepare_cached("INSERT INTO mls_own_leaf_nodes (group_id, leaf_node) VALUES (?1, ?2)")?
            .execute(params![encode(group_id)?, encode(leaf_node)?])?;
        Ok(())
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        // The reference is a hash of the proposal: an existing row holds the same one.
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO mls_proposals (group_id, proposal_ref, proposal) \
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                encode(group_id)?,
                encode(proposal_ref)?,
                encode(proposal)?
            ])?;
        Ok(())
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::Tree, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.write_group(
            group_id,
            GroupData::InterimTranscriptHash,
            interim_transcript_hash,
        )
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::Context, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::ConfirmationTag, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::GroupState, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::MessageSecrets, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.write_group(
            group_id,
            GroupData::ResumptionPskStore,
            resumption_psk_store,
        )
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::OwnLeafIndex, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.write_group(group_id, GroupData::GroupEpochSecrets, group_epoch_secrets)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.write_key(KeyKind::Signature, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.write_key(KeyKind::Encryption, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.conn
            .prepare_cached(
                "INSERT INTO mls_epoch_key_pairs (group_id, epoch_id, leaf_index, key_pairs) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (group_id, epoch_id, leaf_index) \
                 DO UPDATE SET key_pairs = excluded.key_pairs",
            )?
            .execute(params![
                encode(group_id)?,
                encode(epoch)?,
                leaf_index,
                encode(key_pairs)?
            ])?;
        Ok(())
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.write_key(KeyKind::KeyPackage, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.write_key(KeyKind::Psk, psk_id, psk)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.read_group(group_id, GroupData::JoinConfig)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.conn
            .prepare_cached(
                "SELECT leaf_node FROM mls_own_leaf_nodes WHERE group_id = ?1 ORDER BY id",
            )?
            .query_map([encode(group_id)?], |row| decode(row, 0))?
            .collect()
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.conn
            .prepare_cached(
                "SELECT proposal_ref FROM mls_proposals WHERE group_id = ?1 ORDER BY id",
            )?
            .query_map([encode(group_id)?], |row| decode(row, 0))?
            .collect()
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        self.conn
            .prepare_cached(
                "SELECT proposal_ref, proposal FROM mls_proposals WHERE group_id = ?1 \
                 ORDER BY id",
            )?
            .query_map([encode(group_id)?], |row| {
                Ok((decode(row, 0)?, decode(row, 1)?))
            })?
            .collect()
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.read_group(group_id, GroupData::Tree)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.read_group(group_id, GroupData::Context)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.read_group(group_id, GroupData::InterimTranscriptHash)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.read_group(group_id, GroupData::ConfirmationTag)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.read_group(group_id, GroupData::GroupState)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.read_group(group_id, GroupData::MessageSecrets)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.read_group(group_id, GroupData::ResumptionPskStore)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.read_group(group_id, GroupData::OwnLeafIndex)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.read_group(group_id, GroupData::GroupEpochSecrets)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.read_key(KeyKind::Signature, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.read_key(KeyKind::Encryption, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT key_pairs FROM mls_epoch_key_pairs \
                 WHERE group_id = ?1 AND epoch_id = ?2 AND leaf_index = ?3",
            )?
            .query_row(
                params![encode(group_id)?, encode(epoch)?, leaf_index],
                |row| decode(row, 0),
            )
            .optional()?
            .unwrap_or_default())
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.read_key(KeyKind::KeyPackage, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.read_key(KeyKind::Psk, psk_id)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.conn
            .prepare_cached("DELETE FROM mls_proposals WHERE group_id = ?1 AND proposal_ref = ?2")?
            .execute(params![encode(group_id)?, encode(proposal_ref)?])?;
        Ok(())
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.conn
            .prepare_cached("DELETE FROM mls_own_leaf_nodes WHERE group_id = ?1")?
            .execute([encode(group_id)?])?;
        Ok(())
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::JoinConfig)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::Tree)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::ConfirmationTag)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::GroupState)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::Context)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::InterimTranscriptHash)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::MessageSecrets)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::ResumptionPskStore)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::OwnLeafIndex)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_group(group_id, GroupData::GroupEpochSecrets)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.conn
            .prepare_cached("DELETE FROM mls_proposals WHERE group_id = ?1")?
            .execute([encode(group_id)?])?;
        Ok(())
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.delete_key(KeyKind::Signature, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.delete_key(KeyKind::Encryption, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.conn
            .prepare_cached(
                "DELETE FROM mls_epoch_key_pairs \
                 WHERE group_id = ?1 AND epoch_id = ?2 AND leaf_index = ?3",
            )?
            .execute(params![encode(group_id)?, encode(epoch)?, leaf_index])?;
        Ok(())
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete_key(KeyKind::KeyPackage, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.delete_key(KeyKind::Psk, psk_id)
    }
}

/// The tables `openmls_sqlite_storage` created (its own migration table last).
const LEGACY_TABLES: [&str; 14] = [
    "openmls_group_data",
    "openmls_signature_keys",
    "openmls_encryption_keys",
    "openmls_key_packages",
    "openmls_psks",
    "openmls_epoch_keys_pairs",
    "openmls_own_leaf_nodes",
    "openmls_proposals",
    "vc_emulation_group_secrets",
    "vc_emulation_bindings",
    "vc_operation_trees",
    "vc_retained_key_package_material",
    "registered_vc_emulation_epochs",
    "openmls_sqlite_storage_migrations",
];

/// Error of a store conversion: a value that does not convert stops the migration (and
/// its transaction) rather than be dropped.
fn convert_error(what: &str, err: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(format!("converting {what}: {err}").into())
}

fn to_binary(what: &str, json: &[u8]) -> Result<Vec<u8>, rusqlite::Error> {
    codec::json_to_binary(json).map_err(|e| convert_error(what, e))
}

fn table_exists(conn: &Connection, table: &str) -> Result<bool, rusqlite::Error> {
    conn.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
}

/// Copies every row of `query` (JSON columns first, then plain ones as `plain` says) into
/// `insert`, converting the JSON columns.
fn convert_rows(
    conn: &Connection,
    what: &str,
    query: &str,
    insert: &str,
    json: &[bool],
) -> Result<(), rusqlite::Error> {
    let mut select = conn.prepare(query)?;
    let mut insert = conn.prepare(insert)?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let mut values: Vec<rusqlite::types::Value> = Vec::with_capacity(json.len());
        for (column, &is_json) in json.iter().enumerate() {
            let value = row.get_ref(column)?;
            values.push(if is_json {
                rusqlite::types::Value::Blob(to_binary(what, value.as_blob()?)?)
            } else {
                value.into()
            });
        }
        insert.execute(rusqlite::params_from_iter(values))?;
    }
    Ok(())
}

/// Converts the OpenMLS state `openmls_sqlite_storage` (JSON codec) wrote into the `mls_*`
/// tables and drops its tables, inside the caller's transaction. Keys convert to exactly
/// the bytes the typed keys encode to (see [`super::codec`]). A store without the old
/// tables (created by this version) is left alone. Fails, changing nothing once the
/// caller rolls back, if any row does not convert or a table of features Sealpost never
/// used holds rows.
pub(crate) fn convert_legacy(conn: &Connection) -> Result<(), rusqlite::Error> {
    if table_exists(conn, "openmls_group_data")? {
        let mut kinds = String::from("CASE data_type");
        for kind in GroupData::ALL {
            kinds.push_str(&format!(
                " WHEN '{}' THEN {}",
                kind.legacy_name(),
                kind as u8
            ));
        }
        kinds.push_str(" END");
        let unknown: Option<String> = conn
            .query_row(
                &format!("SELECT data_type FROM openmls_group_data WHERE ({kinds}) IS NULL"),
                [],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(unknown) = unknown {
            return Err(convert_error(
                "group data",
                format!("unknown kind {unknown}"),
            ));
        }
        convert_rows(
            conn,
            "group data",
            &format!("SELECT group_id, group_data, {kinds} FROM openmls_group_data"),
            "INSERT INTO mls_group_data (group_id, value, kind) VALUES (?1, ?2, ?3)",
            &[true, true, false],
        )?;
    }
    for (table, key, value, kind) in [
        (
            "openmls_signature_keys",
            "public_key",
            "signature_key",
            KeyKind::Signature,
        ),
        (
            "openmls_encryption_keys",
            "public_key",
            "key_pair",
            KeyKind::Encryption,
        ),
        (
            "openmls_key_packages",
            "key_package_ref",
            "key_package",
            KeyKind::KeyPackage,
        ),
        ("openmls_psks", "psk_id", "psk_bundle", KeyKind::Psk),
    ] {
        if table_exists(conn, table)? {
            convert_rows(
                conn,
                table,
                &format!("SELECT {key}, {value}, {} FROM {table}", kind as u8),
                "INSERT INTO mls_keys (key, value, kind) VALUES (?1, ?2, ?3)",
                &[true, true, false],
            )?;
        }
    }
    if table_exists(conn, "openmls_epoch_keys_pairs")? {
        convert_rows(
            conn,
            "epoch key pairs",
            "SELECT group_id, epoch_id, key_pairs, leaf_index FROM openmls_epoch_keys_pairs",
            "INSERT INTO mls_epoch_key_pairs (group_id, epoch_id, key_pairs, leaf_index) \
             VALUES (?1, ?2, ?3, ?4)",
            &[true, true, true, false],
        )?;
    }
    if table_exists(conn, "openmls_own_leaf_nodes")? {
        convert_rows(
            conn,
            "own leaf nodes",
            "SELECT group_id, leaf_node FROM openmls_own_leaf_nodes ORDER BY id",
            "INSERT INTO mls_own_leaf_nodes (group_id, leaf_node) VALUES (?1, ?2)",
            &[true, true],
        )?;
    }
    if table_exists(conn, "openmls_proposals")? {
        convert_rows(
            conn,
            "proposals",
            "SELECT group_id, proposal_ref, proposal FROM openmls_proposals ORDER BY rowid",
            "INSERT INTO mls_proposals (group_id, proposal_ref, proposal) VALUES (?1, ?2, ?3)",
            &[true, true, true],
        )?;
    }
    for table in LEGACY_TABLES {
        if !table_exists(conn, table)? {
            continue;
        }
        let converted = table.starts_with("openmls_");
        if !converted {
            let rows: i64 =
                conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                    row.get(0)
                })?;
            if rows > 0 {
                return Err(convert_error(
                    table,
                    "it holds state Sealpost cannot convert",
                ));
            }
        }
        conn.execute_batch(&format!("DROP TABLE {table}"))?;
    }
    Ok(())
}
