//! Server storage: the [`Store`] trait and its backends.
//!
//! Everything the server keeps goes through [`Store`]: accounts and devices, login
//! challenges and hashed tokens, KeyPackages, groups (epoch, member devices) and the
//! per-device mailboxes. The one operation that sequences group traffic,
//! [`Store::sequence`], is a single transaction: it checks the epoch, assigns the group
//! sequence number, stores the payload and a mailbox entry for every recipient device,
//! and updates the member list — so an acknowledged send is durable for every recipient.
//!
//! Backends: [`sqlite::SqliteStore`] (embedded, the default). The trait keeps the API layer
//! independent of the database so that a PostgreSQL backend can follow and be checked by
//! the same conformance tests.

pub mod akd_sqlite;
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod sqlite;
mod write_turn;
mod writer;

use async_trait::async_trait;
use sealpost_proto::api::{Envelope, EnvelopeKind, SequencedResponse};
use thiserror::Error;
use uuid::Uuid;

/// Errors of a storage backend. Conflicts that a client caused are distinct variants so
/// the API layer can answer them with the right code; everything else is `Backend`.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("username already taken")]
    UsernameTaken,
    #[error("device id already registered")]
    DeviceExists,
    #[error("group already exists")]
    GroupExists,
    #[error("group not found")]
    GroupNotFound,
    #[error("device is not a member of the group")]
    NotAMember,
    #[error("stale epoch; the group is at epoch {current}")]
    EpochConflict { current: u64 },
    #[error("message id reused for different content")]
    DuplicateMessageId,
    #[error("device {0} is unknown")]
    UnknownDevice(Uuid),
    #[error("the link is unknown, expired or already used")]
    LinkInvalid,
    #[error("a recipient's mailbox is full")]
    MailboxFull,
    #[error("device {0} has no KeyPackage left")]
    NoKeyPackages(Uuid),
    #[error("limit reached: {0}")]
    LimitExceeded(&'static str),
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("the write transaction failed: {0}")]
    CommitFailed(String),
    #[error("database error: {0}")]
    Backend(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration error: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub username: String,
    pub account_key: Vec<u8>,
    pub created_day: i64,
    pub last_seen_day: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: Uuid,
    pub username: String,
    pub signature_key: Vec<u8>,
    pub certificate: Vec<u8>,
    pub created_day: i64,
    /// The device's name, sealed by the account's devices (opaque to the server).
    pub name_sealed: Option<Vec<u8>>,
}

/// Where a device-link session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Created by an existing device, waiting for the new device.
    Open,
    /// The new device sent its sealed request.
    Joined,
    /// The existing device registered the new device and left its sealed response.
    Completed,
}

impl LinkState {
    fn as_i64(self) -> i64 {
        match self {
            Self::Open => 0,
            Self::Joined => 1,
            Self::Completed => 2,
        }
    }

    fn from_i64(value: i64) -> Option<Self> {
        match value {
            0 => Some(Self::Open),
            1 => Some(Self::Joined),
            2 => Some(Self::Completed),
            _ => None,
        }
    }
}

/// A device-link session (see `api::links`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRecord {
    pub link_id: Vec<u8>,
    pub owner_device: Uuid,
    pub verifier: Vec<u8>,
    pub expires_at: i64,
    pub failed_attempts: i64,
    pub state: LinkState,
    pub sealed_request: Option<Vec<u8>>,
    pub sealed_response: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub group_id: String,
    pub epoch: u64,
    pub members: Vec<Uuid>,
}

/// A message to put into a group's total order.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    pub group_id: String,
    pub sender_device: Uuid,
    pub message_id: Uuid,
    pub kind: EnvelopeKind,
    /// The epoch the MLS message was made for (from its framing).
    pub epoch: u64,
    /// Application messages are refused when a recipient's mailbox holds this many
    /// envelopes (handshake messages are never refused: a group must be able to change).
    pub mailbox_quota: u64,
    pub payload: Vec<u8>,
    /// Commits only: the Welcome for `added_devices`.
    pub welcome: Option<Vec<u8>>,
    pub added_devices: Vec<Uuid>,
    pub removed_devices: Vec<Uuid>,
    /// Proposals only: devices of the sender's account that leave now.
    pub leaving_devices: Vec<Uuid>,
    pub now: i64,
    pub expires_at: i64,
}

/// The outcome of a queued [`Store::queue_sequence`] request, once it is durable.
pub type SequenceTicket =
    std::pin::Pin<Box<dyn Future<Output = Result<SequenceOutcome, StoreError>> + Send>>;

/// What [`Store::sequence`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceOutcome {
    pub response: SequencedResponse,
    /// The new mailbox entries, in mailbox order (empty when the request was a resend).
    pub deliveries: Vec<Delivery>,
}

impl SequenceOutcome {
    /// Devices that got new mail.
    pub fn recipients(&self) -> Vec<Uuid> {
        self.deliveries.iter().map(|d| d.device).collect()
    }
}

/// One new mailbox entry: what a push-mode socket of `device` sends at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub device: Uuid,
    pub mailbox_id: u64,
    /// Shared by every recipient of the same message.
    pub message: std::sync::Arc<StoredMessage>,
}

/// A sequenced message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub message_id: Uuid,
    pub group_id: String,
    pub group_seq: u64,
    pub kind: EnvelopeKind,
    pub server_time: i64,
    pub payload: Vec<u8>,
}

impl StoredMessage {
    /// The envelope at mailbox position `mailbox_id`, as a mailbox fetch returns it.
    pub fn envelope(&self, mailbox_id: u64) -> Envelope {
        Envelope {
            id: mailbox_id,
            message_id: self.message_id,
            group_id: self.group_id.clone(),
            group_seq: self.group_seq,
            kind: self.kind,
            server_time: self.server_time,
            payload: sealpost_proto::Bytes64(self.payload.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPackageCount {
    pub one_time: u64,
    pub last_resort: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an account with its first device.
    async fn create_account(
        &self,
        account: &AccountRecord,
        device: &DeviceRecord,
    ) -> Result<(), StoreError>;
    async fn account(&self, username: &str) -> Result<Option<AccountRecord>, StoreError>;
    async fn devices_of(&self, username: &str) -> Result<Vec<DeviceRecord>, StoreError>;
    async fn device(&self, device_id: Uuid) -> Result<Option<DeviceRecord>, StoreError>;
    async fn touch_last_seen(&self, username: &str, day: i64) -> Result<(), StoreError>;
    /// Adds a device to an existing account, up to `max_devices` per account.
    async fn add_device(&self, device: &DeviceRecord, max_devices: usize)
    -> Result<(), StoreError>;
    /// Removes a device and everything tied to it: tokens, KeyPackages, group memberships
    /// (delivery stops at once) and its mailbox.
    async fn remove_device(&self, device_id: Uuid) -> Result<(), StoreError>;
    async fn set_device_name(&self, device_id: Uuid, name_sealed: &[u8]) -> Result<(), StoreError>;
    /// Deletes an account and all its devices.
    async fn delete_account(&self, username: &str) -> Result<(), StoreError>;

    async fn create_link(&self, link: &LinkRecord) -> Result<(), StoreError>;
    /// An unexpired link session.
    async fn link(&self, link_id: &[u8], now: i64) -> Result<Option<LinkRecord>, StoreError>;
    /// Counts a wrong proof; the session is deleted once `max` attempts failed. Returns
    /// whether the session is gone.
    async fn link_failed_attempt(&self, link_id: &[u8], max: i64) -> Result<bool, StoreError>;
    /// Stores the new device's sealed request (once).
    async fn link_join(&self, link_id: &[u8], sealed_request: &[u8]) -> Result<(), StoreError>;
    /// Registers the new device and stores the sealed response, in one transaction.
    async fn link_complete(
        &self,
        link_id: &[u8],
        device: &DeviceRecord,
        sealed_response: &[u8],
        max_devices: usize,
    ) -> Result<(), StoreError>;
    /// Takes the sealed response of a completed session, deleting the session.
    async fn link_take_result(&self, link_id: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    async fn create_challenge(
        &self,
        challenge_id: Uuid,
        device_id: Uuid,
        nonce: &[u8],
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// Removes and returns a challenge that has not expired: a challenge works once.
    async fn take_challenge(
        &self,
        challenge_id: Uuid,
        now: i64,
    ) -> Result<Option<(Uuid, Vec<u8>)>, StoreError>;
    async fn insert_token(
        &self,
        token_hash: &[u8],
        device_id: Uuid,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// The device a token belongs to, if the token is known and unexpired.
    async fn device_for_token(
        &self,
        token_hash: &[u8],
        now: i64,
    ) -> Result<Option<DeviceRecord>, StoreError>;

    async fn add_key_packages(
        &self,
        device_id: Uuid,
        one_time: &[Vec<u8>],
        last_resort: Option<&[u8]>,
        max_per_device: usize,
    ) -> Result<KeyPackageCount, StoreError>;
    async fn key_package_count(&self, device_id: Uuid) -> Result<KeyPackageCount, StoreError>;
    /// Takes one KeyPackage for every device of `username`: a one-time one (deleted) when
    /// there is one, else the last-resort one (kept).
    async fn claim_key_packages(
        &self,
        username: &str,
    ) -> Result<Vec<(DeviceRecord, Vec<u8>)>, StoreError>;

    /// Usernames whose directory entry changed since the last epoch, with a sequence
    /// number (a later change gets a higher one).
    async fn kt_pending(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// The directory entry of a username as the database holds it now (the deleted entry
    /// when there is no such account).
    async fn kt_entry(
        &self,
        username: &str,
    ) -> Result<sealpost_proto::kt::DirectoryEntry, StoreError>;
    /// Records a published epoch: clears the published pending marks (unless changed
    /// again since), marks the usernames published and stores the root hash.
    async fn kt_mark_published(
        &self,
        published: &[(String, i64)],
        epoch: u64,
        root_hash: &[u8],
        now: i64,
    ) -> Result<(), StoreError>;
    async fn kt_is_published(&self, username: &str) -> Result<bool, StoreError>;
    /// Whether the username's entry changed since the last epoch.
    async fn kt_is_pending(&self, username: &str) -> Result<bool, StoreError>;
    async fn kt_save_root(&self, epoch: u64, root_hash: &[u8], now: i64) -> Result<(), StoreError>;
    async fn kt_root_hash(&self, epoch: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stored root hashes of epochs in `from..=to`, in order.
    async fn kt_root_hashes(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// Takes one KeyPackage of one device (one-time first, else last resort).
    async fn claim_device_key_package(
        &self,
        device_id: Uuid,
    ) -> Result<(DeviceRecord, Vec<u8>), StoreError>;

    async fn create_group(&self, group_id: &str, creator: Uuid) -> Result<GroupState, StoreError>;
    async fn group(&self, group_id: &str) -> Result<Option<GroupState>, StoreError>;
    /// Sequences one commit, proposal or application message (see the module doc).
    async fn sequence(&self, request: SequenceRequest) -> Result<SequenceOutcome, StoreError> {
        self.queue_sequence(request).await?.await
    }
    /// Queues a request for [`Store::sequence`] and returns the future of its outcome.
    /// Requests that one caller queues one after the other are sequenced in that order,
    /// whenever their futures are polled — what the sends of one socket need.
    async fn queue_sequence(&self, request: SequenceRequest) -> Result<SequenceTicket, StoreError>;

    /// The oldest envelopes in a device's mailbox, and whether more are waiting.
    async fn fetch_mailbox(
        &self,
        device_id: Uuid,
        limit: usize,
    ) -> Result<(Vec<Envelope>, bool), StoreError>;
    /// Like [`Store::fetch_mailbox`], but only envelopes after mailbox position `after`.
    async fn fetch_mailbox_after(
        &self,
        device_id: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Envelope>, bool), StoreError>;
    /// Deletes acknowledged envelopes of this device; returns how many were removed.
    async fn ack(&self, device_id: Uuid, ids: &[u64]) -> Result<u64, StoreError>;
    /// Queues an acknowledgement whose outcome nobody waits for (a quiet acknowledgement,
    /// push frame `0x03`) and returns `Ok(true)` once it is queued; `Ok(false)` when this
    /// store has no queue for it, and the caller runs [`Store::ack`] instead (the default).
    /// If recording a queued acknowledgement fails, the store logs it and the envelopes
    /// stay in the mailbox to be delivered again, as if the acknowledgement had been lost
    /// on the way.
    async fn queue_quiet_ack(&self, device_id: Uuid, ids: &[u64]) -> Result<bool, StoreError> {
        let _ = (device_id, ids);
        Ok(false)
    }
    /// Envelopes waiting in all mailboxes.
    async fn mailbox_depth(&self) -> Result<u64, StoreError>;
    /// Deletes expired challenges, tokens and undelivered messages.
    async fn expire(&self, now: i64) -> Result<u64, StoreError>;
}
