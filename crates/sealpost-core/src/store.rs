//! The client's on-disk store: one SQLite file holding both OpenMLS state and Sealpost's
//! own tables (identity, conversations, history, outbox, processed envelopes, contacts).
//!
//! Keeping both in one database is what makes an MLS state change and the message it
//! produced commit together: the engine opens one transaction, lets OpenMLS write its
//! state through [`Provider`] on that same connection, writes its own rows, and commits
//! once. A client killed at any point finds either both or neither.

use std::path::Path;
use std::time::Duration;

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

/// The OpenMLS provider for one transaction: RustCrypto for crypto and randomness, the
/// SQLite storage provider writing through the transaction's connection.
pub struct Provider<'a> {
    crypto: &'a RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
}

impl<'a> Provider<'a> {
    pub fn new(crypto: &'a RustCrypto, connection: &'a Connection) -> Self {
        Self {
            crypto,
            storage: SqliteStorageProvider::new(connection),
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

/// Opens (creating if needed) the client database and prepares both schemas.
pub fn open(path: &Path) -> Result<Connection, CoreError> {
    let mut connection = Connection::open(path)?;
    connection.busy_timeout(Duration::from_secs(30))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    migrate(&mut connection)?;
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut connection)
        .run_migrations()
        .map_err(|e| CoreError::Codec(format!("OpenMLS storage migration failed: {e}")))?;
    Ok(connection)
}

/// An in-memory store (scratch work that must not touch the user's database).
pub fn open_in_memory() -> Result<Connection, CoreError> {
    let mut connection = Connection::open_in_memory()?;
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
