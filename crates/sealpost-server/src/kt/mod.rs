//! Key transparency: the server's `akd` directory of account keys and devices.
//!
//! Label = username; value = the canonical [`DirectoryEntry`] (account key and every
//! device certificate). Account and device changes mark the username pending in the same
//! transaction as the change; a publisher task turns pending usernames into a new epoch at
//! most every `kt_interval`, and stores the epoch's root hash. Roots are signed with the
//! server's KT key (Ed25519) over [`root_signed_bytes`], which also binds the VRF public
//! key. Lookups, key histories and append-only proofs are served from the same directory.

mod keys;

use std::path::Path;
use std::sync::Arc;

use akd::directory::Directory;
use akd::storage::StorageManager;
use akd::{AkdLabel, AkdValue, AzksParallelismConfig, HistoryParams};
use ed25519_dalek::{Signer as _, SigningKey};
use sealpost_proto::Bytes64;
use sealpost_proto::kt::{
    AuditResponse, DirectoryEntry, HistoryResponse, KtKeysResponse, LookupEnvelope, SignedRoot,
    root_signed_bytes,
};
use thiserror::Error;

use crate::store::akd_sqlite::AkdSqliteStorage;
use crate::store::{Store, StoreError};

pub use keys::FileVrf;

/// The domain separator of Sealpost's directory hashes.
#[derive(Clone)]
pub struct SealpostDomain;

impl akd::DomainLabel for SealpostDomain {
    fn domain_label() -> &'static [u8] {
        sealpost_proto::kt::DOMAIN_LABEL
    }
}

/// The akd configuration (hash and commitment scheme) shared by server and clients.
pub type KtConfiguration = akd::ExperimentalConfiguration<SealpostDomain>;

#[derive(Debug, Error)]
pub enum KtError {
    #[error("the account is not in the key directory yet")]
    NotPublished,
    #[error("no such epoch")]
    UnknownEpoch,
    #[error("key directory error: {0}")]
    Akd(#[from] akd::errors::AkdError),
    #[error("storage error: {0}")]
    Store(#[from] StoreError),
    #[error("key file error: {0}")]
    Keys(String),
    #[error("encoding error: {0}")]
    Encoding(String),
}

/// Encodes an akd proof for the wire.
fn cbor<T: serde::Serialize>(value: &T) -> Result<Bytes64, KtError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| KtError::Encoding(e.to_string()))?;
    Ok(Bytes64(out))
}

pub struct KeyTransparency {
    directory: Directory<KtConfiguration, AkdSqliteStorage, FileVrf>,
    signing: SigningKey,
    vrf_public: Vec<u8>,
    store: Arc<dyn Store>,
    publish_lock: tokio::sync::Mutex<()>,
}

impl KeyTransparency {
    /// Opens the directory (creating it and the KT keys on first start).
    pub async fn open(
        data_dir: &Path,
        store: Arc<dyn Store>,
        storage: AkdSqliteStorage,
    ) -> Result<Self, KtError> {
        let signing = keys::load_or_create_signing_key(&data_dir.join("kt_signing.key"))?;
        let vrf = FileVrf::load_or_create(&data_dir.join("kt_vrf.key"))?;
        let vrf_public = akd::ecvrf::VRFKeyStorage::get_vrf_public_key(&vrf)
            .await
            .map_err(|e| KtError::Keys(e.to_string()))?
            .to_bytes()
            .to_vec();
        let directory = Directory::new(
            StorageManager::new_no_cache(storage),
            vrf,
            AzksParallelismConfig::disabled(),
        )
        .await?;
        let kt = Self {
            directory,
            signing,
            vrf_public,
            store,
            publish_lock: tokio::sync::Mutex::new(()),
        };
        // Record the starting epoch's root so that it can be served and audited.
        let current = kt.directory.get_epoch_hash().await?;
        if kt.store.kt_root_hash(current.0).await?.is_none() {
            kt.store
                .kt_save_root(current.0, &current.1, crate::clock::now_unix())
                .await?;
        }
        Ok(kt)
    }

    pub fn keys(&self) -> KtKeysResponse {
        KtKeysResponse {
            signing_key: Bytes64(self.signing.verifying_key().to_bytes().to_vec()),
            vrf_public_key: Bytes64(self.vrf_public.clone()),
        }
    }

    fn sign(&self, epoch: u64, root_hash: &[u8]) -> SignedRoot {
        let signature = self
            .signing
            .sign(&root_signed_bytes(epoch, root_hash, &self.vrf_public));
        SignedRoot {
            epoch,
            root_hash: Bytes64(root_hash.to_vec()),
            signature: Bytes64(signature.to_bytes().to_vec()),
        }
    }

    /// Publishes every pending username as one new epoch. Returns the new root, or `None`
    /// when nothing was pending.
    pub async fn publish_pending(&self) -> Result<Option<SignedRoot>, KtError> {
        let _guard = self.publish_lock.lock().await;
        let pending = self.store.kt_pending().await?;
        if pending.is_empty() {
            return Ok(None);
        }
        let mut updates = Vec::with_capacity(pending.len());
        for (username, _) in &pending {
            let entry = self.store.kt_entry(username).await?;
            updates.push((AkdLabel::from(username.as_str()), AkdValue(entry.encode())));
        }
        let published = self.directory.publish(updates).await?;
        let names: Vec<String> = pending.iter().map(|(name, _)| name.clone()).collect();
        self.store
            .kt_mark_published(
                &pending,
                published.0,
                &published.1,
                crate::clock::now_unix(),
            )
            .await?;
        tracing::info!(
            epoch = published.0,
            updates = names.len(),
            "key directory published"
        );
        Ok(Some(self.sign(published.0, &published.1)))
    }

    /// The current signed root.
    pub async fn root(&self) -> Result<SignedRoot, KtError> {
        let current = self.directory.get_epoch_hash().await?;
        Ok(self.sign(current.0, &current.1))
    }

    /// Signed roots of the stored epochs in `from..=to`.
    pub async fn roots(&self, from: u64, to: u64) -> Result<Vec<SignedRoot>, KtError> {
        let hashes = self.store.kt_root_hashes(from, to).await?;
        Ok(hashes
            .into_iter()
            .map(|(epoch, hash)| self.sign(epoch, &hash))
            .collect())
    }

    /// A lookup proof for a published username, and the entry it proves.
    pub async fn lookup(
        &self,
        username: &str,
    ) -> Result<(LookupEnvelope, DirectoryEntry), KtError> {
        if !self.store.kt_is_published(username).await? {
            return Err(KtError::NotPublished);
        }
        let (proof, root) = self.directory.lookup(AkdLabel::from(username)).await?;
        let entry =
            DirectoryEntry::decode(&proof.value.0).map_err(|e| KtError::Encoding(e.to_string()))?;
        Ok((
            LookupEnvelope {
                root: self.sign(root.0, &root.1),
                proof: cbor(&proof)?,
            },
            entry,
        ))
    }

    /// The lookup proof to serve for `username`, whose account key in the store is
    /// `account_key`: the published entry, or [`KtError::NotPublished`] while a change
    /// of the name's account (deleted and registered again) waits for its epoch.
    pub async fn lookup_current(
        &self,
        username: &str,
        account_key: &[u8],
    ) -> Result<(LookupEnvelope, DirectoryEntry), KtError> {
        let first = self.lookup(username).await?;
        self.settle(username, account_key, first).await
    }

    /// Settles a lookup taken earlier (`first`) whose entry may hold another account key:
    /// either the change is still pending ([`KtError::NotPublished`]: the client waits), or
    /// an epoch was published after `first` was taken — publishing makes the epoch
    /// visible before it clears the pending mark, so a second lookup sees it — or the
    /// directory does hold another key, which is served as it is: clients check the entry
    /// against the account, and that is how they catch a forged one.
    async fn settle(
        &self,
        username: &str,
        account_key: &[u8],
        first: (LookupEnvelope, DirectoryEntry),
    ) -> Result<(LookupEnvelope, DirectoryEntry), KtError> {
        if first.1.account_key.as_slice() == account_key {
            return Ok(first);
        }
        if self.store.kt_is_pending(username).await? {
            return Err(KtError::NotPublished);
        }
        self.lookup(username).await
    }

    /// The complete key history of a published username.
    pub async fn history(&self, username: &str) -> Result<HistoryResponse, KtError> {
        if !self.store.kt_is_published(username).await? {
            return Err(KtError::NotPublished);
        }
        let (proof, root) = self
            .directory
            .key_history(&AkdLabel::from(username), HistoryParams::Complete)
            .await?;
        Ok(HistoryResponse {
            root: self.sign(root.0, &root.1),
            proof: cbor(&proof)?,
        })
    }

    /// An append-only proof from epoch `from` to `to`, with the roots in between.
    pub async fn audit(&self, from: u64, to: u64) -> Result<AuditResponse, KtError> {
        let roots = self.roots(from, to).await?;
        if from >= to || roots.len() as u64 != to - from + 1 {
            return Err(KtError::UnknownEpoch);
        }
        let proof = self.directory.audit(from, to).await?;
        Ok(AuditResponse {
            roots,
            proof: cbor(&proof)?,
        })
    }

    /// Replaces a username's published entry directly (tests of a malicious server).
    #[cfg(feature = "adversarial")]
    pub async fn publish_forged(
        &self,
        username: &str,
        entry: &DirectoryEntry,
    ) -> Result<SignedRoot, KtError> {
        let _guard = self.publish_lock.lock().await;
        let published = self
            .directory
            .publish(vec![(AkdLabel::from(username), AkdValue(entry.encode()))])
            .await?;
        // The honest publisher must not overwrite the lie at the next epoch.
        let pending: Vec<(String, i64)> = self
            .store
            .kt_pending()
            .await?
            .into_iter()
            .filter(|(name, _)| name == username)
            .collect();
        self.store
            .kt_mark_published(
                &pending,
                published.0,
                &published.1,
                crate::clock::now_unix(),
            )
            .await?;
        Ok(self.sign(published.0, &published.1))
    }

    /// Signs an arbitrary root (tests of a malicious server showing a split view).
    #[cfg(feature = "adversarial")]
    pub fn sign_forged_root(&self, epoch: u64, root_hash: &[u8]) -> SignedRoot {
        self.sign(epoch, root_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestServer, put_account};

    /// A lookup answered across a publication: the handler looked the name up (the old
    /// account's entry), then an epoch with the new account was published and cleared
    /// the pending mark. Served as it was, that first entry reached the client as a
    /// directory mismatch ("refusing to use them"); it must be looked up again.
    #[tokio::test]
    async fn a_lookup_overtaken_by_a_publication_is_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        // The state without a running server: no publisher task, so epochs come only
        // when the test publishes them.
        let state = crate::open_state(TestServer::config(dir.path()))
            .await
            .unwrap();
        let (kt, store) = (&state.kt, state.store.as_ref());
        let (old, new) = ([1; 32], [2; 32]);
        put_account(store, "bob", old).await;
        kt.publish_pending().await.unwrap().unwrap();
        store.delete_account("bob").await.unwrap();
        put_account(store, "bob", new).await;

        // Still pending: the client is told to wait.
        let first = kt.lookup("bob").await.unwrap();
        assert_eq!(first.1.account_key, old);
        let waiting = kt.settle("bob", &new, first).await;
        assert!(matches!(waiting, Err(KtError::NotPublished)), "{waiting:?}");

        // Published between the lookup and the check: the new entry is served.
        let first = kt.lookup("bob").await.unwrap();
        kt.publish_pending().await.unwrap().unwrap();
        let (_, entry) = kt.settle("bob", &new, first).await.unwrap();
        assert_eq!(entry.account_key, new);
        let (_, entry) = kt.lookup_current("bob", &new).await.unwrap();
        assert_eq!(entry.account_key, new);

        // Another key with nothing pending: what the directory holds, for the client to
        // check (and refuse).
        let (_, entry) = kt.lookup_current("bob", &[9; 32]).await.unwrap();
        assert_eq!(entry.account_key, new);
    }
}
