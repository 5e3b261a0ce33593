//! The client's on-disk store: one SQLite file holding both OpenMLS state and Sealpost's
//! own tables (identity, conversations, history, outbox, processed envelopes, contacts).
//!
//! Keeping both in one database is what makes an MLS state change and the message it
//! produced commit together: the engine opens one transaction, lets OpenMLS write its
//! state through [`Provider`] on that same connection, writes its own rows, and commits
//! once. A client killed at any point finds either both or neither.

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use openmls::prelude::{GroupId, MlsGroup};
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CoreError;

/// JSON codec for OpenMLS's stored values.
#[derive(Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

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
/// SQLite storage provider writing through the transaction's connection, and (inside the
/// engine's transactions) the engine's [`GroupCache`].
pub struct Provider<'a> {
    crypto: &'a RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
    groups: Option<&'a RefCell<GroupCache>>,
}

impl<'a> Provider<'a> {
    pub fn new(crypto: &'a RustCrypto, connection: &'a Connection) -> Self {
        Self {
            crypto,
            storage: SqliteStorageProvider::new(connection),
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
    type StorageProvider = SqliteStorageProvider<JsonCodec, &'a Connection>;

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

/// Numbered migrations of Sealpost's own tables; `PRAGMA user_version` records how many
/// have run. A shipped migration is never edited: add a new one.
const MIGRATIONS: &[&str] = &[
    SCHEMA,
    // 2: contact verification and key changes.
    "ALTER TABLE contacts ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE contacts ADD COLUMN pending_key BLOB;
     ALTER TABLE contacts ADD COLUMN checked_at INTEGER NOT NULL DEFAULT 0;",
    // 3: key transparency.
    "CREATE TABLE kt_roots (epoch INTEGER PRIMARY KEY NOT NULL, root_hash BLOB NOT NULL);
     CREATE TABLE kt_gossip_pending (
         epoch INTEGER NOT NULL, root_hash BLOB NOT NULL, sender TEXT NOT NULL,
         PRIMARY KEY (epoch, root_hash));
     CREATE TABLE kt_alerts (key TEXT PRIMARY KEY NOT NULL, raised_at INTEGER NOT NULL);
     CREATE TABLE contact_devices (
         username TEXT NOT NULL, device_id TEXT NOT NULL, certificate BLOB NOT NULL,
         PRIMARY KEY (username, device_id));",
];

fn migrate(connection: &mut Connection) -> Result<(), CoreError> {
    let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

/// Prepared statements kept per connection (the engine's hot paths use `prepare_cached`).
const STATEMENT_CACHE_CAPACITY: usize = 64;

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
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut connection)
        .run_migrations()
        .map_err(|e| CoreError::Codec(format!("OpenMLS storage migration failed: {e}")))?;
    Ok(connection)
}

/// An in-memory store (scratch work that must not touch the user's database).
pub fn open_in_memory() -> Result<Connection, CoreError> {
    let mut connection = Connection::open_in_memory()?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    migrate(&mut connection)?;
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut connection)
        .run_migrations()
        .map_err(|e| CoreError::Codec(format!("OpenMLS storage migration failed: {e}")))?;
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
