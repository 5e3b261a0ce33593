//! The client's on-disk store: one SQLite file holding both OpenMLS state and Sealpost's
//! own tables (identity, conversations, history, outbox, processed envelopes, contacts).
//!
//! Keeping both in one database is what makes an MLS state change and the message it
//! produced commit together: the engine opens one transaction, lets OpenMLS write its
//! state through [`Provider`] on that same connection, writes its own rows, and commits
//! once. A client killed at any point finds either both or neither.
//!
//! Submodules: [`mls`] (the OpenMLS storage provider and its tables), [`codec`] (the
//! binary encoding of OpenMLS's values).

pub mod codec;
pub mod mls;

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use openmls::prelude::{GroupId, MlsGroup};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OptionalExtension as _, Transaction, params};

pub use self::mls::MlsStorage;
use crate::error::CoreError;

/// How many groups [`GroupCache`] keeps in memory (the least recently used go first). A
/// group of 1,000 members takes several MB, so this stays small.
const GROUP_CACHE_CAPACITY: usize = 8;

/// MLS groups kept in memory between transactions, so that the next message of a group
/// does not parse the group's whole state (ratchet tree, secrets) from the database again.
///
/// OpenMLS writes every change of a group through to storage as it makes it, so an
/// `MlsGroup` in memory equals what `MlsGroup::load` would read, as long as
/// - it was put back only after the transaction that last changed it committed
///   ([`Provider::keep_group`], [`GroupCache::commit`]); a rolled-back transaction drops
///   what it kept and what it took;
/// - taking a group out ([`Provider::take_group`]) removes it: there is never a second
///   copy in memory that could fall behind the database, and whoever changes a group
///   without putting it back leaves the next reader to load it from the database;
/// - nobody else changed the database: `PRAGMA data_version` is checked at the start of
///   every transaction and the cache is emptied when another connection (another
///   process) committed anything.
///
/// Code that creates or replaces a group in storage without taking it first (joining
/// from a Welcome) calls [`Provider::forget_group`].
#[derive(Default)]
pub struct GroupCache {
    /// `PRAGMA data_version` when the entries were last known to match the database.
    data_version: Option<i64>,
    /// Groups as of the last commit, least recently kept first.
    committed: Vec<MlsGroup>,
    /// Groups kept by the transaction under way, to enter `committed` when it commits.
    pending: Vec<MlsGroup>,
}

impl GroupCache {
    /// Starts a transaction: drops everything if another connection changed the database.
    pub fn begin(&mut self, connection: &Connection) -> Result<(), CoreError> {
        let version: i64 = connection
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |row| row.get(0))?;
        if self.data_version != Some(version) {
            self.committed.clear();
            self.data_version = Some(version);
        }
        self.pending.clear();
        Ok(())
    }

    /// The transaction committed: what it kept is now the database's state.
    pub fn commit(&mut self) {
        for group in std::mem::take(&mut self.pending) {
            self.committed.retain(|g| g.group_id() != group.group_id());
            self.committed.push(group);
        }
        let excess = self.committed.len().saturating_sub(GROUP_CACHE_CAPACITY);
        self.committed.drain(..excess);
    }

    /// The transaction (or part of it) rolled back: groups in memory may be ahead of the
    /// database, so forget them all.
    pub fn rollback(&mut self) {
        self.pending.clear();
        self.committed.clear();
    }

    fn take(&mut self, group_id: &GroupId) -> Option<MlsGroup> {
        for list in [&mut self.pending, &mut self.committed] {
            if let Some(index) = list.iter().position(|g| g.group_id() == group_id) {
                return Some(list.remove(index));
            }
        }
        None
    }
}

/// The OpenMLS provider for one transaction: RustCrypto for crypto and randomness, the
/// storage provider ([`MlsStorage`]) writing through the transaction's connection, and
/// (inside the engine's transactions) the engine's [`GroupCache`].
pub struct Provider<'a> {
    crypto: &'a RustCrypto,
    storage: MlsStorage<'a>,
    groups: Option<&'a RefCell<GroupCache>>,
}

impl<'a> Provider<'a> {
    pub fn new(crypto: &'a RustCrypto, connection: &'a Connection) -> Self {
        Self {
            crypto,
            storage: MlsStorage::new(connection),
            groups: None,
        }
    }

    /// A provider whose transaction began with [`GroupCache::begin`].
    pub fn with_cache(
        crypto: &'a RustCrypto,
        connection: &'a Connection,
        groups: &'a RefCell<GroupCache>,
    ) -> Self {
        Self {
            groups: Some(groups),
            ..Self::new(crypto, connection)
        }
    }

    /// Loads a group: from the cache if it is there (taking it out), else from storage.
    pub fn take_group(&self, group_id: &GroupId) -> Result<Option<MlsGroup>, CoreError> {
        if let Some(group) = self.groups.and_then(|g| g.borrow_mut().take(group_id)) {
            return Ok(Some(group));
        }
        MlsGroup::load(&self.storage, group_id).map_err(CoreError::Store)
    }

    /// Puts back a group whose every change went through this transaction's storage; it
    /// is cached if the transaction commits.
    pub fn keep_group(&self, group: MlsGroup) {
        if let Some(groups) = self.groups {
            let mut groups = groups.borrow_mut();
            groups.pending.retain(|g| g.group_id() != group.group_id());
            groups.pending.push(group);
        }
    }

    /// Drops any copy of a group from memory (its storage is about to be replaced).
    pub fn forget_group(&self, group_id: &GroupId) {
        if let Some(groups) = self.groups {
            drop(groups.borrow_mut().take(group_id));
        }
    }

    /// Part of the transaction rolled back (a savepoint): forget every group in memory.
    pub fn forget_all_groups(&self) {
        if let Some(groups) = self.groups {
            groups.borrow_mut().rollback();
        }
    }
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MlsStorage<'a>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        self.crypto
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    group_id   TEXT PRIMARY KEY NOT NULL,
    kind       TEXT NOT NULL,
    name       TEXT,
    peer       TEXT,
    status     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    group_id      TEXT NOT NULL,
    sender        TEXT NOT NULL,
    sender_device TEXT,
    kind          TEXT NOT NULL,
    text          TEXT NOT NULL,
    sent_at_ms    INTEGER NOT NULL,
    received_at   INTEGER NOT NULL,
    outgoing      INTEGER NOT NULL,
    shown         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS history_by_group ON history(group_id, seq);
CREATE INDEX IF NOT EXISTS history_unshown ON history(shown, seq);
CREATE TABLE IF NOT EXISTS processed (
    group_id     TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, message_id, kind)
);
CREATE TABLE IF NOT EXISTS outbox (
    message_id TEXT PRIMARY KEY NOT NULL,
    group_id   TEXT NOT NULL,
    kind       TEXT NOT NULL,
    request    TEXT NOT NULL,
    text       TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS contacts (
    username    TEXT PRIMARY KEY NOT NULL,
    account_key BLOB NOT NULL,
    first_seen  INTEGER NOT NULL
);
"#;

/// One step of the store's schema.
enum Migration {
    Sql(&'static str),
    /// Steps that convert data run Rust code inside the migration's transaction.
    Code(fn(&Transaction<'_>) -> Result<(), CoreError>),
}

/// Numbered migrations of the client store; `PRAGMA user_version` records how many have
/// run. A shipped migration is never edited: add a new one.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(SCHEMA),
    // 2: contact verification and key changes.
    Migration::Sql(
        "ALTER TABLE contacts ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE contacts ADD COLUMN pending_key BLOB;
     ALTER TABLE contacts ADD COLUMN checked_at INTEGER NOT NULL DEFAULT 0;",
    ),
    // 3: key transparency.
    Migration::Sql(
        "CREATE TABLE kt_roots (epoch INTEGER PRIMARY KEY NOT NULL, root_hash BLOB NOT NULL);
     CREATE TABLE kt_gossip_pending (
         epoch INTEGER NOT NULL, root_hash BLOB NOT NULL, sender TEXT NOT NULL,
         PRIMARY KEY (epoch, root_hash));
     CREATE TABLE kt_alerts (key TEXT PRIMARY KEY NOT NULL, raised_at INTEGER NOT NULL);
     CREATE TABLE contact_devices (
         username TEXT NOT NULL, device_id TEXT NOT NULL, certificate BLOB NOT NULL,
         PRIMARY KEY (username, device_id));",
    ),
    // 4: OpenMLS state in Sealpost's own tables and binary encoding (`mls`), converted
    // from `openmls_sqlite_storage`'s tables (JSON), which go.
    Migration::Code(|tx| {
        tx.execute_batch(mls::SCHEMA)?;
        mls::convert_legacy(tx)?;
        Ok(())
    }),
    // 5: fewer B-trees written per message. `history` loses AUTOINCREMENT (a write to
    // `sqlite_sequence` per row; a reused `seq` can only be that of a deleted last row,
    // which `take_unshown` never stopped at) and its `(shown, seq)` index: what `sync`
    // has shown is the `shown_through` watermark in `meta`, everything unshown is after
    // it. `processed` becomes WITHOUT ROWID (its key was a second B-tree).
    Migration::Sql(
        "CREATE TABLE history_new (
             seq           INTEGER PRIMARY KEY,
             id            TEXT NOT NULL UNIQUE,
             group_id      TEXT NOT NULL,
             sender        TEXT NOT NULL,
             sender_device TEXT,
             kind          TEXT NOT NULL,
             text          TEXT NOT NULL,
             sent_at_ms    INTEGER NOT NULL,
             received_at   INTEGER NOT NULL,
             outgoing      INTEGER NOT NULL,
             shown         INTEGER NOT NULL DEFAULT 0
         );
         INSERT INTO history_new (seq, id, group_id, sender, sender_device, kind, text,
                                  sent_at_ms, received_at, outgoing, shown)
             SELECT seq, id, group_id, sender, sender_device, kind, text, sent_at_ms,
                    received_at, outgoing, shown FROM history;
         INSERT INTO meta (key, value) VALUES ('shown_through', CAST(COALESCE(
             (SELECT MIN(seq) - 1 FROM history WHERE shown = 0),
             (SELECT MAX(seq) FROM history WHERE outgoing = 0),
             0) AS BLOB));
         DROP TABLE history;
         ALTER TABLE history_new RENAME TO history;
         CREATE INDEX history_by_group ON history(group_id, seq);
         CREATE TABLE processed_new (
             group_id     TEXT NOT NULL,
             message_id   TEXT NOT NULL,
             kind         TEXT NOT NULL,
             processed_at INTEGER NOT NULL,
             PRIMARY KEY (group_id, message_id, kind)
         ) WITHOUT ROWID;
         INSERT INTO processed_new SELECT group_id, message_id, kind, processed_at FROM processed;
         DROP TABLE processed;
         ALTER TABLE processed_new RENAME TO processed;",
    ),
    // 6: `outbox` is WITHOUT ROWID (its key was a second B-tree written by every send and
    // every acknowledgement); it is read oldest first by `created_at`, then by message id
    // (time-ordered UUIDv7) instead of by insertion.
    Migration::Sql(
        "CREATE TABLE outbox_new (
             message_id TEXT PRIMARY KEY NOT NULL,
             group_id   TEXT NOT NULL,
             kind       TEXT NOT NULL,
             request    TEXT NOT NULL,
             text       TEXT,
             created_at INTEGER NOT NULL
         ) WITHOUT ROWID;
         INSERT INTO outbox_new (message_id, group_id, kind, request, text, created_at)
             SELECT message_id, group_id, kind, request, text, created_at FROM outbox;
         DROP TABLE outbox;
         ALTER TABLE outbox_new RENAME TO outbox;",
    ),
    // 7: an application message waits in the outbox as its MLS bytes (`message`), not as
    // JSON with the ciphertext in base64 and its text a second time (history has it):
    // a third of the row, no JSON per send.
    Migration::Sql("ALTER TABLE outbox ADD COLUMN message BLOB;"),
    // 8: the contacts whose key change awaits acceptance, indexed on their own. Every
    // send and every KeyPackage claim of an add asks for them (`blocked_members`); the
    // list is almost always empty, but without the index each ask read every contact,
    // a thousand rows per claimed user when a group of a thousand is made.
    Migration::Sql(
        "CREATE INDEX contacts_pending ON contacts(username) WHERE pending_key IS NOT NULL;",
    ),
];

fn migrate(connection: &mut Connection) -> Result<(), CoreError> {
    migrate_to(connection, MIGRATIONS.len())
}

/// Runs the migrations up to number `target`, all in one transaction.
fn migrate_to(connection: &mut Connection, target: usize) -> Result<(), CoreError> {
    let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (index, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(version.max(0) as usize)
    {
        match migration {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Code(run) => run(&tx)?,
        }
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

/// Prepared statements kept per connection (the engine's hot paths use `prepare_cached`).
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// Opens (creating if needed) the client database and prepares both schemas.
pub fn open(path: &Path) -> Result<Connection, CoreError> {
    let mut connection = Connection::open(path)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    connection.busy_timeout(Duration::from_secs(30))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "cache_size", -16384)?;
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    migrate(&mut connection)?;
    Ok(connection)
}

/// An in-memory store (scratch work that must not touch the user's database).
pub fn open_in_memory() -> Result<Connection, CoreError> {
    let mut connection = Connection::open_in_memory()?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    migrate(&mut connection)?;
    Ok(connection)
}

pub fn meta_get(connection: &Connection, key: &str) -> Result<Option<Vec<u8>>, CoreError> {
    Ok(connection
        .query_row("SELECT value FROM meta WHERE key = ?", [key], |row| {
            row.get(0)
        })
        .optional()?)
}

pub fn meta_set(connection: &Connection, key: &str, value: &[u8]) -> Result<(), CoreError> {
    connection.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub fn meta_text(connection: &Connection, key: &str) -> Result<Option<String>, CoreError> {
    meta_get(connection, key)?
        .map(|bytes| {
            String::from_utf8(bytes)
                .map_err(|_| CoreError::Codec(format!("meta {key} is not UTF-8")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
    use openmls::prelude::{
        BasicCredential, CredentialWithKey, KeyPackage, MlsGroup, MlsGroupCreateConfig,
        MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessedMessageContent,
        ProtocolMessage, StagedWelcome,
    };
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
    use openmls_traits::storage::StorageProvider as _;

    use super::*;
    use crate::engine::CIPHERSUITE;

    /// The codec the store used before migration 4.
    #[derive(Default)]
    struct JsonCodec;

    impl Codec for JsonCodec {
        type Error = serde_json::Error;

        fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
            serde_json::to_vec(value)
        }

        fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
            serde_json::from_slice(slice)
        }
    }

    /// OpenMLS as the store used it before migration 4.
    struct LegacyProvider<'a> {
        crypto: RustCrypto,
        storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
    }

    impl<'a> OpenMlsProvider for LegacyProvider<'a> {
        type CryptoProvider = RustCrypto;
        type RandProvider = RustCrypto;
        type StorageProvider = SqliteStorageProvider<JsonCodec, &'a Connection>;

        fn storage(&self) -> &Self::StorageProvider {
            &self.storage
        }

        fn crypto(&self) -> &Self::CryptoProvider {
            &self.crypto
        }

        fn rand(&self) -> &Self::RandProvider {
            &self.crypto
        }
    }

    fn credential(name: &str, signer: &SignatureKeyPair) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        }
    }

    fn key_package(provider: &impl OpenMlsProvider, signer: &SignatureKeyPair) -> KeyPackage {
        KeyPackage::builder()
            .build(CIPHERSUITE, provider, signer, credential("alice", signer))
            .unwrap()
            .key_package()
            .clone()
    }

    fn join_config() -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .build()
    }

    /// Bob (in memory) creates a group with the holder of `package`; returns the group and
    /// the Welcome.
    fn invite(
        bob: &OpenMlsRustCrypto,
        bob_signer: &SignatureKeyPair,
        package: KeyPackage,
    ) -> (MlsGroup, Vec<u8>) {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .build();
        let mut group =
            MlsGroup::new(bob, bob_signer, &config, credential("bob", bob_signer)).unwrap();
        let (_, welcome, _) = group.add_members(bob, bob_signer, &[package]).unwrap();
        group.merge_pending_commit(bob).unwrap();
        (group, welcome.tls_serialize_detached().unwrap())
    }

    fn join(provider: &impl OpenMlsProvider, welcome: &[u8]) -> MlsGroup {
        let MlsMessageBodyIn::Welcome(welcome) = MlsMessageIn::tls_deserialize_exact(welcome)
            .unwrap()
            .extract()
        else {
            panic!("not a Welcome")
        };
        StagedWelcome::new_from_welcome(provider, &join_config(), welcome, None)
            .unwrap()
            .into_group(provider)
            .unwrap()
    }

    fn protocol(message: &MlsMessageOut) -> ProtocolMessage {
        MlsMessageIn::tls_deserialize_exact(message.tls_serialize_detached().unwrap())
            .unwrap()
            .try_into_protocol_message()
            .unwrap()
    }

    fn read(
        group: &mut MlsGroup,
        provider: &impl OpenMlsProvider,
        message: &MlsMessageOut,
    ) -> Vec<u8> {
        match group
            .process_message(provider, protocol(message))
            .unwrap()
            .into_content()
        {
            ProcessedMessageContent::ApplicationMessage(message) => message.into_bytes(),
            _ => panic!("not an application message"),
        }
    }

    fn legacy_tables(conn: &Connection) -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'openmls%'",
            [],
            |row| row.get(0),
        )
        .unwrap()
    }

    /// A store as the previous version left it: Sealpost's tables at version 3 and
    /// Alice's OpenMLS state in `openmls_sqlite_storage`'s tables (JSON): her signature
    /// key, a group with Bob in which Bob's leave proposal is queued, and an unused
    /// KeyPackage. Returns Bob's side and what Alice's group looked like.
    struct Legacy {
        dir: tempfile::TempDir,
        bob: OpenMlsRustCrypto,
        bob_signer: SignatureKeyPair,
        bob_group: MlsGroup,
        alice_public: Vec<u8>,
        spare_package: KeyPackage,
        group_id: GroupId,
        epoch_authenticator: Vec<u8>,
    }

    fn legacy_store() -> Legacy {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        migrate_to(&mut conn, 3).unwrap();
        SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn)
            .run_migrations()
            .unwrap();
        let alice = LegacyProvider {
            crypto: RustCrypto::default(),
            storage: SqliteStorageProvider::new(&conn),
        };
        let alice_signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
        alice_signer.store(alice.storage()).unwrap();
        let bob = OpenMlsRustCrypto::default();
        let bob_signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();

        let package = key_package(&alice, &alice_signer);
        let spare_package = key_package(&alice, &alice_signer);
        let (mut bob_group, welcome) = invite(&bob, &bob_signer, package);
        let mut alice_group = join(&alice, &welcome);
        let hello = bob_group
            .create_message(&bob, &bob_signer, b"hello")
            .unwrap();
        assert_eq!(read(&mut alice_group, &alice, &hello), b"hello");
        let reply = alice_group
            .create_message(&alice, &alice_signer, b"hi")
            .unwrap();
        assert_eq!(read(&mut bob_group, &bob, &reply), b"hi");
        let leave = bob_group.leave_group(&bob, &bob_signer).unwrap();
        let ProcessedMessageContent::ProposalMessage(proposal) = alice_group
            .process_message(&alice, protocol(&leave))
            .unwrap()
            .into_content()
        else {
            panic!("not a proposal")
        };
        alice_group
            .store_pending_proposal(alice.storage(), *proposal)
            .unwrap();
        assert!(legacy_tables(&conn) > 0);
        Legacy {
            bob,
            bob_signer,
            bob_group,
            alice_public: alice_signer.public().to_vec(),
            spare_package,
            group_id: alice_group.group_id().clone(),
            epoch_authenticator: alice_group.epoch_authenticator().as_slice().to_vec(),
            dir,
        }
    }

    #[test]
    fn a_store_written_by_openmls_sqlite_storage_converts_and_keeps_working() {
        let mut legacy = legacy_store();
        let conn = open(&legacy.dir.path().join("db")).unwrap();
        assert_eq!(legacy_tables(&conn), 0, "the old tables are gone");
        let crypto = RustCrypto::default();
        let alice = Provider::new(&crypto, &conn);

        // The signature key, the group with its queued proposal, as they were.
        let alice_signer = SignatureKeyPair::read(
            alice.storage(),
            &legacy.alice_public,
            CIPHERSUITE.signature_algorithm(),
        )
        .expect("the signature key converted");
        let mut group = alice.take_group(&legacy.group_id).unwrap().unwrap();
        assert_eq!(
            group.epoch_authenticator().as_slice(),
            legacy.epoch_authenticator
        );
        assert_eq!(group.pending_proposals().count(), 1);

        // Both sides drop the proposal and keep talking, with ratchets that moved on.
        group.clear_pending_proposals(alice.storage()).unwrap();
        legacy
            .bob_group
            .clear_pending_proposals(legacy.bob.storage())
            .unwrap();
        let message = group
            .create_message(&alice, &alice_signer, b"after")
            .unwrap();
        assert_eq!(read(&mut legacy.bob_group, &legacy.bob, &message), b"after");
        let message = legacy
            .bob_group
            .create_message(&legacy.bob, &legacy.bob_signer, b"again")
            .unwrap();
        assert_eq!(read(&mut group, &alice, &message), b"again");

        // The KeyPackage made before the conversion still opens a Welcome (its private
        // keys converted too).
        let (mut bob_group, welcome) = invite(
            &legacy.bob,
            &legacy.bob_signer,
            legacy.spare_package.clone(),
        );
        let mut second = join(&alice, &welcome);
        let message = bob_group
            .create_message(&legacy.bob, &legacy.bob_signer, b"second group")
            .unwrap();
        assert_eq!(read(&mut second, &alice, &message), b"second group");

        // And everything is still there after reopening.
        drop(conn);
        let conn = open(&legacy.dir.path().join("db")).unwrap();
        let alice = Provider::new(&crypto, &conn);
        let mut group = alice.take_group(&legacy.group_id).unwrap().unwrap();
        let message = legacy
            .bob_group
            .create_message(&legacy.bob, &legacy.bob_signer, b"reopened")
            .unwrap();
        assert_eq!(read(&mut group, &alice, &message), b"reopened");
    }

    #[test]
    fn a_conversion_that_fails_changes_nothing() {
        let legacy = legacy_store();
        let path = legacy.dir.path().join("db");
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE openmls_group_data SET group_data = CAST('{not json' AS BLOB) \
             WHERE data_type = 'tree'",
            [],
        )
        .unwrap();
        drop(conn);
        assert!(open(&path).is_err());
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, 3);
        assert!(legacy_tables(&conn) > 0, "the old state is still there");
        let converted: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'mls_group_data'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(converted, 0);
    }

    #[test]
    fn mls_state_commits_with_its_transaction_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let group_id = GroupId::from_slice(b"group");
        let mut conn = open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        MlsStorage::new(&tx)
            .write_own_leaf_index(&group_id, &openmls::prelude::LeafNodeIndex::new(7))
            .unwrap();
        tx.rollback().unwrap();
        let read = |conn: &Connection| {
            MlsStorage::new(conn)
                .own_leaf_index::<_, openmls::prelude::LeafNodeIndex>(&group_id)
                .unwrap()
        };
        assert_eq!(read(&conn), None, "a rolled-back write leaves nothing");
        let tx = conn.transaction().unwrap();
        MlsStorage::new(&tx)
            .write_own_leaf_index(&group_id, &openmls::prelude::LeafNodeIndex::new(7))
            .unwrap();
        tx.commit().unwrap();
        drop(conn);
        let conn = open(&path).unwrap();
        assert_eq!(read(&conn).map(|i| i.u32()), Some(7));
    }

    fn add_history(conn: &Connection, id: &str, outgoing: bool, shown: bool) {
        conn.execute(
            "INSERT INTO history (id, group_id, sender, kind, text, sent_at_ms, received_at, \
             outgoing, shown) VALUES (?1, 'g', 's', 'text', ?1, 0, 0, ?2, ?3)",
            params![id, outgoing as i64, shown as i64],
        )
        .unwrap();
    }

    fn unshown(engine: &mut crate::engine::Engine) -> Vec<String> {
        engine
            .take_unshown()
            .unwrap()
            .into_iter()
            .map(|entry| entry.text)
            .collect()
    }

    #[test]
    fn history_and_processed_keep_their_rows_and_meaning_through_migration_5() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).unwrap();
        migrate_to(&mut conn, 4).unwrap();
        add_history(&conn, "in-seen", false, true);
        add_history(&conn, "own-1", true, true);
        add_history(&conn, "in-new", false, false);
        add_history(&conn, "notice-new", false, false);
        add_history(&conn, "own-2", true, true);
        conn.execute(
            "INSERT INTO processed (group_id, message_id, kind, processed_at) \
             VALUES ('g', 'm', 'application', 0)",
            [],
        )
        .unwrap();
        drop(conn);

        let mut engine = crate::engine::Engine::open(&path).unwrap();
        assert_eq!(unshown(&mut engine), ["in-new", "notice-new"]);
        assert!(unshown(&mut engine).is_empty());
        // The last row is an own message that failed: its `seq` goes to the next row,
        // which must still be shown.
        engine
            .conn
            .execute("DELETE FROM history WHERE id = 'own-2'", [])
            .unwrap();
        add_history(&engine.conn, "in-after", false, false);
        add_history(&engine.conn, "own-3", true, true);
        assert_eq!(unshown(&mut engine), ["in-after"]);
        // A redelivered envelope is still recognised.
        let inserted = engine
            .conn
            .execute(
                "INSERT OR IGNORE INTO processed (group_id, message_id, kind, processed_at) \
                 VALUES ('g', 'm', 'application', 1)",
                [],
            )
            .unwrap();
        assert_eq!(inserted, 0);
        let autoincrement: i64 = engine
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE sql LIKE '%AUTOINCREMENT%'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(autoincrement, 0);
    }

    #[test]
    fn a_store_whose_history_was_all_shown_starts_after_its_last_incoming_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).unwrap();
        migrate_to(&mut conn, 4).unwrap();
        add_history(&conn, "in-seen", false, true);
        add_history(&conn, "own-1", true, true);
        drop(conn);
        let mut engine = crate::engine::Engine::open(&path).unwrap();
        assert!(unshown(&mut engine).is_empty());
        engine
            .conn
            .execute("DELETE FROM history WHERE id = 'own-1'", [])
            .unwrap();
        add_history(&engine.conn, "in-new", false, false);
        assert_eq!(unshown(&mut engine), ["in-new"]);
    }

    #[test]
    fn outbox_rows_survive_migration_6_oldest_first() {
        use crate::engine::conversations::{Outgoing, OutgoingMessage};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).unwrap();
        migrate_to(&mut conn, 5).unwrap();
        let message = |created_at: i64| {
            let outgoing = Outgoing::Message(OutgoingMessage {
                group_id: "g".into(),
                request: sealpost_proto::api::PostMessageRequest {
                    message_id: uuid::Uuid::now_v7(),
                    message: sealpost_proto::Bytes64(vec![created_at as u8]),
                },
            });
            conn.execute(
                "INSERT INTO outbox (message_id, group_id, kind, request, text, created_at) \
                 VALUES (?1, 'g', 'message', ?2, 'hi', ?3)",
                params![
                    outgoing.message_id().to_string(),
                    serde_json::to_string(&outgoing).unwrap(),
                    created_at
                ],
            )
            .unwrap();
            outgoing.message_id()
        };
        let later = message(20);
        let earlier = message(10);
        let same_second = message(20);
        drop(conn);
        let mut engine = crate::engine::Engine::open(&path).unwrap();
        let ids: Vec<uuid::Uuid> = engine
            .outbox()
            .unwrap()
            .iter()
            .map(Outgoing::message_id)
            .collect();
        assert_eq!(ids, [earlier, later, same_second]);
        // A row written before migration 7 keeps its own text.
        assert_eq!(engine.message_stale(later).unwrap().as_deref(), Some("hi"));
    }
}
