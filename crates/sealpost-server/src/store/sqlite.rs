//! The embedded SQLite backend.
//!
//! Durability settings: WAL journal. The `sqlx` write connection runs with `synchronous =
//! FULL`, so its transactions' WAL frames are fsynced before the commit returns; the
//! group-commit writer (messages and acknowledgements, `store::writer`) commits without
//! waiting and answers nothing before its flush thread has fsynced the WAL. A process kill
//! never loses a committed transaction (the WAL is replayed on open), and a power loss
//! loses none that was answered, as long as the disk honours fsync. Writes go through those
//! two connections only, which take turns at SQLite's write lock (`store::write_turn`)
//! instead of failing with `SQLITE_BUSY` or sleeping through SQLite's back-off; reads use
//! a separate pool and see committed snapshots (WAL readers do not block the writers).

use std::path::Path;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use sealpost_proto::Bytes64;
use sealpost_proto::api::{Envelope, EnvelopeKind};
use sealpost_proto::kt::DirectoryEntry;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row as _, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::write_turn::{SqlxWriter, WriteTurn};
use super::writer::Job;
use super::{
    AccountRecord, DeviceRecord, GroupState, KeyPackageCount, LinkRecord, LinkState,
    SequenceRequest, Store, StoreError,
};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The `sqlx` write connection, used in turns with the group-commit writer.
    writer: SqlxWriter,
    reader: SqlitePool,
    /// The group-commit writer thread (sequencing and acknowledgements).
    batcher: mpsc::Sender<Job>,
    stats: Arc<BatchStats>,
    deliveries: Arc<super::writer::DeliveryHook>,
    /// Mailbox reads stop at the highest position known to be on disk (see
    /// `writer::durability`).
    durable: Arc<super::writer::durability::DurableMark>,
    /// Envelopes up to this mailbox position are in the device index (see
    /// `fetch_mailbox_after`).
    indexed: Arc<AtomicI64>,
}

pub use super::writer::BatchStats;

// A device's envelopes are partly indexed and partly not yet (`writer::DEVICE_ENVELOPES`);
// these statements read or delete both parts. A page is read with plain ordered queries
// (`fetch_mailbox_after`): a compound `SELECT` of both parts cost three to four times as
// much per page (docs/BENCHMARKS-LOG.md, 2026-12-08).

/// A page of envelopes: their rows, messages and ciphertexts, with the page's conditions.
macro_rules! envelope_page {
    ($conditions:literal) => {
        concat!(
            "SELECT b.seq, m.message_id, m.group_id, m.group_seq, m.kind, m.server_time, \
                 p.payload \
             FROM mailbox b JOIN messages m ON m.id = b.message \
             LEFT JOIN payloads p ON p.id = m.id WHERE ",
            $conditions,
            " ORDER BY b.seq LIMIT ?4"
        )
    };
}

/// A page of device `?1`'s indexed envelopes above position `?2` and up to `?3`, at most
/// `?4`, in position order (from the index, no sort).
const FETCH_INDEXED_ENVELOPES: &str =
    envelope_page!("b.device_id = ?1 AND b.indexed = 1 AND b.seq > ?2 AND b.seq <= ?3");

/// A page of device `?1`'s envelopes above position `?2` and up to `?3`, at most `?4`,
/// found by position whether indexed or not: for the positions after the device index's
/// mark, where only a few seconds of envelopes are left.
const FETCH_ENVELOPES_BY_POSITION: &str =
    envelope_page!("b.seq > ?2 AND b.seq <= ?3 AND b.device_id = ?1");

/// Deletes device `?1`'s envelopes, returning their messages' row ids.
static DELETE_DEVICE_ENVELOPES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "DELETE FROM mailbox WHERE seq IN (SELECT seq FROM ({})) RETURNING message",
        super::writer::DEVICE_ENVELOPES
    )
});

/// Sets device `?1`'s envelope count to what its mailbox holds.
static RECOUNT_DEVICE_ENVELOPES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE mailbox_counts SET n = (SELECT COUNT(*) FROM ({})) WHERE device_id = ?1",
        super::writer::DEVICE_ENVELOPES
    )
});

/// Page size of a newly created database file.
const DATABASE_PAGE_SIZE: u32 = 8192;

impl SqliteStore {
    /// Waits until everything the group-commit writer committed before this call is on
    /// disk. It queues an acknowledgement of nothing: that changes no row, but like every
    /// job that is waited for it is answered only after a flush of the WAL that began after
    /// its batch was committed, and so after every commit before it (see
    /// `writer::durability`).
    async fn writer_durable(&self) -> Result<(), StoreError> {
        self.ack(Uuid::nil(), &[]).await.map(drop)
    }

    /// Whether `query` (one `?`, bound to `name`) finds a row, on the reader pool.
    async fn has_row(&self, query: &'static str, name: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(query)
            .bind(name)
            .fetch_optional(&self.reader)
            .await?;
        Ok(found.is_some())
    }

    /// Opens (creating if needed) the database file and runs migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_flush(path, Arc::new(super::writer::durability::sync_wal)).await
    }

    /// [`SqliteStore::open`] with another way of flushing the WAL (tests hold or fail
    /// flushes with it to see what waits for them).
    pub(crate) async fn open_with_flush(
        path: &Path,
        flush: super::writer::durability::FlushFn,
    ) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // 8 KiB pages for new databases (an existing one keeps its size): a batch of
            // envelopes touches fewer pages, so fewer WAL frames and checkpoint writes; about
            // 10% less server CPU per relayed message than 4 KiB here (docs/BENCHMARKS-LOG.md).
            .page_size(DATABASE_PAGE_SIZE)
            .busy_timeout(Duration::from_secs(10));
        // No ping before each use: the connection is in this process and cannot go stale,
        // and on a busy core each round trip to sqlx's connection thread costs the time it
        // takes the runtime to poll the caller again (which, for the writer, is time in a
        // turn, see `write_turn`).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        MIGRATIONS.run(&writer).await?;
        let turn = WriteTurn::default();
        let writer = SqlxWriter::new(writer, turn.clone());
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        let stats = Arc::new(BatchStats::default());
        let deliveries = Arc::new(super::writer::DeliveryHook::default());
        let super::writer::Spawned {
            jobs: batcher,
            durable,
            indexed,
        } = super::writer::spawn(path, stats.clone(), deliveries.clone(), flush, turn)?;
        Ok(Self {
            writer,
            reader,
            batcher,
            stats,
            deliveries,
            durable,
            indexed,
        })
    }

    /// Counters of the group-commit writer (for metrics and tests).
    pub fn batch_stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Sets the function told every committed delivery, in mailbox order (once).
    pub fn on_deliveries(&self, hook: impl Fn(&[super::Delivery]) + Send + Sync + 'static) {
        self.deliveries.set(hook);
    }

    /// The akd storage on the same database.
    pub fn akd_storage(&self) -> super::akd_sqlite::AkdSqliteStorage {
        super::akd_sqlite::AkdSqliteStorage::new(self.writer.clone(), self.reader.clone())
    }

    /// Drops the ciphertext of every message whose envelopes are all gone, now rather
    /// than in the writer's next sweep (which runs a few seconds behind), and writes the
    /// idempotency keys waiting in the writer's memory to `message_keys`; returns how many
    /// ciphertexts it dropped.
    pub async fn sweep_delivered(&self) -> Result<u64, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.batcher
            .send(Job::Sweep(Some(answer)))
            .await
            .map_err(|_| StoreError::Invalid("the store is closed"))?;
        answered
            .await
            .map_err(|_| StoreError::Invalid("the store is closed"))?
    }

    /// Stops the writer thread after the jobs it has, and closes both pools, checkpointing
    /// the WAL.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.batcher.send(Job::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// Messages one expiry run looks at (and deletes at most), so that it holds the write
/// lock briefly; the next run, a minute later, goes on.
const EXPIRE_MAX_MESSAGES: i64 = 100_000;

const DEVICES_OF_USER: &str = "SELECT device_id, username, signature_key, certificate, \
     created_day, name_sealed FROM devices WHERE username = ? ORDER BY created_day, device_id";
const DEVICE_BY_ID: &str = "SELECT device_id, username, signature_key, certificate, \
     created_day, name_sealed FROM devices WHERE device_id = ?";

fn uuid_from(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|_| StoreError::Invalid("stored device id is not 16 bytes"))
}

fn device_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        device_id: uuid_from(&row.try_get::<Vec<u8>, _>("device_id")?)?,
        username: row.try_get("username")?,
        signature_key: row.try_get("signature_key")?,
        certificate: row.try_get("certificate")?,
        created_day: row.try_get("created_day")?,
        name_sealed: row.try_get("name_sealed")?,
    })
}

fn link_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<LinkRecord, StoreError> {
    Ok(LinkRecord {
        link_id: row.try_get("link_id")?,
        owner_device: uuid_from(&row.try_get::<Vec<u8>, _>("owner_device")?)?,
        verifier: row.try_get("verifier")?,
        expires_at: row.try_get("expires_at")?,
        failed_attempts: row.try_get("failed_attempts")?,
        state: LinkState::from_i64(row.try_get("state")?)
            .ok_or(StoreError::Invalid("stored link has an unknown state"))?,
        sealed_request: row.try_get("sealed_request")?,
        sealed_response: row.try_get("sealed_response")?,
    })
}

/// Takes one KeyPackage of a device: the oldest one-time one (deleted), else the
/// last-resort one (kept).
async fn take_key_package(
    conn: &mut SqliteConnection,
    device_id: Uuid,
) -> Result<Vec<u8>, StoreError> {
    let package = sqlx::query(
        "SELECT id, last_resort, data FROM key_packages WHERE device_id = ? \
         ORDER BY last_resort, id LIMIT 1",
    )
    .bind(device_id.as_bytes().as_slice())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(package) = package else {
        return Err(StoreError::NoKeyPackages(device_id));
    };
    if package.try_get::<i64, _>("last_resort")? == 0 {
        sqlx::query("DELETE FROM key_packages WHERE id = ?")
            .bind(package.try_get::<i64, _>("id")?)
            .execute(&mut *conn)
            .await?;
    }
    Ok(package.try_get("data")?)
}

/// Inserts a device row, enforcing the per-account limit.
async fn insert_device(
    conn: &mut SqliteConnection,
    device: &DeviceRecord,
    max_devices: usize,
) -> Result<(), StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE username = ?")
        .bind(&device.username)
        .fetch_one(&mut *conn)
        .await?;
    if count as usize >= max_devices {
        return Err(StoreError::LimitExceeded(
            "the account has the most devices allowed",
        ));
    }
    let inserted = sqlx::query(
        "INSERT INTO devices (device_id, username, signature_key, certificate, created_day, name_sealed) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(device.device_id.as_bytes().as_slice())
    .bind(&device.username)
    .bind(&device.signature_key)
    .bind(&device.certificate)
    .bind(device.created_day)
    .bind(&device.name_sealed)
    .execute(&mut *conn)
    .await;
    match inserted {
        Err(err) if is_unique_violation(&err) => return Err(StoreError::DeviceExists),
        other => other?,
    };
    mark_kt_pending(conn, &device.username).await
}

/// Marks a username's directory entry as changed, for the next key-transparency epoch.
async fn mark_kt_pending(conn: &mut SqliteConnection, username: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO kt_pending (username, seq) \
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM kt_pending)) \
         ON CONFLICT(username) DO UPDATE SET seq = excluded.seq",
    )
    .bind(username)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes a device and what hangs off it.
async fn delete_device(conn: &mut SqliteConnection, device_id: Uuid) -> Result<(), StoreError> {
    let id = device_id.as_bytes().as_slice();
    let owner: Option<String> =
        sqlx::query_scalar("SELECT username FROM devices WHERE device_id = ?")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(owner) = owner {
        mark_kt_pending(conn, &owner).await?;
    }
    // The device's envelopes go, and a message with none left loses its ciphertext.
    let messages: Vec<i64> = sqlx::query_scalar(DELETE_DEVICE_ENVELOPES.as_str())
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    for message in messages {
        sqlx::query(super::writer::FORGET_IF_DELIVERED)
            .bind(message)
            .execute(&mut *conn)
            .await?;
    }
    for statement in [
        "DELETE FROM tokens WHERE device_id = ?",
        "DELETE FROM login_challenges WHERE device_id = ?",
        "DELETE FROM key_packages WHERE device_id = ?",
        "DELETE FROM group_members WHERE device_id = ?",
        "DELETE FROM mailbox_counts WHERE device_id = ?",
        "DELETE FROM links WHERE owner_device = ?",
        "DELETE FROM devices WHERE device_id = ?",
    ] {
        sqlx::query(statement).bind(id).execute(&mut *conn).await?;
    }
    Ok(())
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

async fn members_of(conn: &mut SqliteConnection, group_id: &str) -> Result<Vec<Uuid>, StoreError> {
    let rows =
        sqlx::query("SELECT device_id FROM group_members WHERE group_id = ? ORDER BY device_id")
            .bind(group_id)
            .fetch_all(&mut *conn)
            .await?;
    rows.iter()
        .map(|row| uuid_from(&row.try_get::<Vec<u8>, _>(0)?))
        .collect()
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_account(
        &self,
        account: &AccountRecord,
        device: &DeviceRecord,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO accounts (username, account_key, created_day, last_seen_day) VALUES (?, ?, ?, ?)",
        )
        .bind(&account.username)
        .bind(&account.account_key)
        .bind(account.created_day)
        .bind(account.last_seen_day)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => return Err(StoreError::UsernameTaken),
            other => other?,
        };
        insert_device(&mut tx, device, usize::MAX).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn account(&self, username: &str) -> Result<Option<AccountRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT username, account_key, created_day, last_seen_day FROM accounts WHERE username = ?",
        )
        .bind(username)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| {
            Ok(AccountRecord {
                username: row.try_get("username")?,
                account_key: row.try_get("account_key")?,
                created_day: row.try_get("created_day")?,
                last_seen_day: row.try_get("last_seen_day")?,
            })
        })
        .transpose()
    }

    async fn devices_of(&self, username: &str) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows = sqlx::query(DEVICES_OF_USER)
            .bind(username)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(device_from_row).collect()
    }

    async fn device(&self, device_id: Uuid) -> Result<Option<DeviceRecord>, StoreError> {
        let row = sqlx::query(DEVICE_BY_ID)
            .bind(device_id.as_bytes().as_slice())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    async fn touch_last_seen(&self, username: &str, day: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE accounts SET last_seen_day = ? WHERE username = ? AND last_seen_day < ?",
        )
        .bind(day)
        .bind(username)
        .bind(day)
        .execute(&mut *self.writer.acquire().await?)
        .await?;
        Ok(())
    }

    async fn add_device(
        &self,
        device: &DeviceRecord,
        max_devices: usize,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        insert_device(&mut tx, device, max_devices).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn remove_device(&self, device_id: Uuid) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        delete_device(&mut tx, device_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_device_name(&self, device_id: Uuid, name_sealed: &[u8]) -> Result<(), StoreError> {
        sqlx::query("UPDATE devices SET name_sealed = ? WHERE device_id = ?")
            .bind(name_sealed)
            .bind(device_id.as_bytes().as_slice())
            .execute(&mut *self.writer.acquire().await?)
            .await?;
        Ok(())
    }

    async fn delete_account(&self, username: &str) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let devices: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT device_id FROM devices WHERE username = ?")
                .bind(username)
                .fetch_all(&mut *tx)
                .await?;
        for device in devices {
            delete_device(&mut tx, uuid_from(&device)?).await?;
        }
        sqlx::query("DELETE FROM accounts WHERE username = ?")
            .bind(username)
            .execute(&mut *tx)
            .await?;
        mark_kt_pending(&mut tx, username).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_link(&self, link: &LinkRecord) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO links (link_id, owner_device, verifier, expires_at, failed_attempts, state) \
             VALUES (?, ?, ?, ?, 0, ?)",
        )
        .bind(&link.link_id)
        .bind(link.owner_device.as_bytes().as_slice())
        .bind(&link.verifier)
        .bind(link.expires_at)
        .bind(link.state.as_i64())
        .execute(&mut *self.writer.acquire().await?)
        .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => {
                Err(StoreError::Invalid("link id already in use"))
            }
            other => other.map(|_| ()).map_err(StoreError::from),
        }
    }

    async fn link(&self, link_id: &[u8], now: i64) -> Result<Option<LinkRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM links WHERE link_id = ? AND expires_at > ?")
            .bind(link_id)
            .bind(now)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(link_from_row).transpose()
    }

    async fn link_failed_attempt(&self, link_id: &[u8], max: i64) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let attempts: Option<i64> = sqlx::query_scalar(
            "UPDATE links SET failed_attempts = failed_attempts + 1 WHERE link_id = ? RETURNING failed_attempts",
        )
        .bind(link_id)
        .fetch_optional(&mut *tx)
        .await?;
        let burned = attempts.is_none_or(|n| n >= max);
        if burned {
            sqlx::query("DELETE FROM links WHERE link_id = ?")
                .bind(link_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(burned)
    }

    async fn link_join(&self, link_id: &[u8], sealed_request: &[u8]) -> Result<(), StoreError> {
        let updated = sqlx::query(
            "UPDATE links SET state = ?, sealed_request = ? WHERE link_id = ? AND state = ?",
        )
        .bind(LinkState::Joined.as_i64())
        .bind(sealed_request)
        .bind(link_id)
        .bind(LinkState::Open.as_i64())
        .execute(&mut *self.writer.acquire().await?)
        .await?;
        if updated.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LinkInvalid)
        }
    }

    async fn link_complete(
        &self,
        link_id: &[u8],
        device: &DeviceRecord,
        sealed_response: &[u8],
        max_devices: usize,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let updated = sqlx::query(
            "UPDATE links SET state = ?, sealed_response = ? WHERE link_id = ? AND state = ?",
        )
        .bind(LinkState::Completed.as_i64())
        .bind(sealed_response)
        .bind(link_id)
        .bind(LinkState::Joined.as_i64())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::LinkInvalid);
        }
        insert_device(&mut tx, device, max_devices).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn link_take_result(&self, link_id: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let response: Option<Option<Vec<u8>>> = sqlx::query_scalar(
            "DELETE FROM links WHERE link_id = ? AND state = ? RETURNING sealed_response",
        )
        .bind(link_id)
        .bind(LinkState::Completed.as_i64())
        .fetch_optional(&mut *self.writer.acquire().await?)
        .await?;
        Ok(response.flatten())
    }

    async fn kt_pending(&self) -> Result<Vec<(String, i64)>, StoreError> {
        // A read connection: the publisher asks every `kt_interval`, nearly always to
        // learn that nothing changed, and on the write connection each question took a
        // write turn, in which the group-commit writer waited while the question waited
        // for the CPU. `kt_pending` is written only through the write connection, whose
        // commits are durable before any reader sees them.
        let rows = sqlx::query("SELECT username, seq FROM kt_pending ORDER BY seq")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("username")?, row.try_get("seq")?)))
            .collect()
    }

    async fn kt_entry(&self, username: &str) -> Result<DirectoryEntry, StoreError> {
        // On a read connection, as `kt_pending`: a publish reads one entry per changed
        // account, and none of these reads needs a write turn. One read transaction, so
        // that the key and the devices come from the same snapshot.
        let mut conn = self.reader.begin().await?;
        let key: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT account_key FROM accounts WHERE username = ?")
                .bind(username)
                .fetch_optional(&mut *conn)
                .await?;
        let Some(key) = key else {
            return Ok(DirectoryEntry::deleted());
        };
        let account_key: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Invalid("stored account key is not 32 bytes"))?;
        let rows = sqlx::query(DEVICES_OF_USER)
            .bind(username)
            .fetch_all(&mut *conn)
            .await?;
        let mut devices = Vec::with_capacity(rows.len());
        for row in &rows {
            let device = device_from_row(row)?;
            devices.push((device.device_id, device.certificate));
        }
        Ok(DirectoryEntry::new(account_key, devices))
    }

    async fn kt_mark_published(
        &self,
        published: &[(String, i64)],
        epoch: u64,
        root_hash: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        for (username, seq) in published {
            sqlx::query("DELETE FROM kt_pending WHERE username = ? AND seq <= ?")
                .bind(username)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO kt_published (username, epoch) VALUES (?, ?) \
                 ON CONFLICT(username) DO UPDATE SET epoch = excluded.epoch",
            )
            .bind(username)
            .bind(epoch as i64)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT OR REPLACE INTO kt_roots (epoch, root_hash, published_at) VALUES (?, ?, ?)",
        )
        .bind(epoch as i64)
        .bind(root_hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn kt_is_published(&self, username: &str) -> Result<bool, StoreError> {
        self.has_row("SELECT 1 FROM kt_published WHERE username = ?", username)
            .await
    }

    async fn kt_is_pending(&self, username: &str) -> Result<bool, StoreError> {
        self.has_row("SELECT 1 FROM kt_pending WHERE username = ?", username)
            .await
    }

    async fn kt_save_root(&self, epoch: u64, root_hash: &[u8], now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR IGNORE INTO kt_roots (epoch, root_hash, published_at) VALUES (?, ?, ?)",
        )
        .bind(epoch as i64)
        .bind(root_hash)
        .bind(now)
        .execute(&mut *self.writer.acquire().await?)
        .await?;
        Ok(())
    }

    async fn kt_root_hash(&self, epoch: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT root_hash FROM kt_roots WHERE epoch = ?")
                .bind(epoch as i64)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    async fn kt_root_hashes(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT epoch, root_hash FROM kt_roots WHERE epoch >= ? AND epoch <= ? ORDER BY epoch",
        )
        .bind(from.min(i64::MAX as u64) as i64)
        .bind(to.min(i64::MAX as u64) as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("epoch")? as u64,
                    row.try_get("root_hash")?,
                ))
            })
            .collect()
    }

    async fn claim_device_key_package(
        &self,
        device_id: Uuid,
    ) -> Result<(DeviceRecord, Vec<u8>), StoreError> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(DEVICE_BY_ID)
            .bind(device_id.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?;
        let device = row
            .as_ref()
            .map(device_from_row)
            .transpose()?
            .ok_or(StoreError::UnknownDevice(device_id))?;
        let package = take_key_package(&mut tx, device_id).await?;
        tx.commit().await?;
        Ok((device, package))
    }

    async fn create_challenge(
        &self,
        challenge_id: Uuid,
        device_id: Uuid,
        nonce: &[u8],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO login_challenges (challenge_id, device_id, nonce, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(challenge_id.as_bytes().as_slice())
        .bind(device_id.as_bytes().as_slice())
        .bind(nonce)
        .bind(expires_at)
        .execute(&mut *self.writer.acquire().await?)
        .await?;
        Ok(())
    }

    async fn take_challenge(
        &self,
        challenge_id: Uuid,
        now: i64,
    ) -> Result<Option<(Uuid, Vec<u8>)>, StoreError> {
        let row = sqlx::query(
            "DELETE FROM login_challenges WHERE challenge_id = ? RETURNING device_id, nonce, expires_at",
        )
        .bind(challenge_id.as_bytes().as_slice())
        .fetch_optional(&mut *self.writer.acquire().await?)
        .await?;
        let Some(row) = row else { return Ok(None) };
        if row.try_get::<i64, _>("expires_at")? < now {
            return Ok(None);
        }
        Ok(Some((
            uuid_from(&row.try_get::<Vec<u8>, _>("device_id")?)?,
            row.try_get("nonce")?,
        )))
    }

    async fn insert_token(
        &self,
        token_hash: &[u8],
        device_id: Uuid,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tokens (token_hash, device_id, expires_at) VALUES (?, ?, ?)")
            .bind(token_hash)
            .bind(device_id.as_bytes().as_slice())
            .bind(expires_at)
            .execute(&mut *self.writer.acquire().await?)
            .await?;
        Ok(())
    }

    async fn device_for_token(
        &self,
        token_hash: &[u8],
        now: i64,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT d.device_id, d.username, d.signature_key, d.certificate, d.created_day, d.name_sealed \
             FROM tokens t JOIN devices d ON d.device_id = t.device_id \
             WHERE t.token_hash = ? AND t.expires_at >= ?",
        )
        .bind(token_hash)
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    async fn add_key_packages(
        &self,
        device_id: Uuid,
        one_time: &[Vec<u8>],
        last_resort: Option<&[u8]>,
        max_per_device: usize,
    ) -> Result<KeyPackageCount, StoreError> {
        let device = device_id.as_bytes().as_slice();
        let mut tx = self.writer.begin().await?;
        let existing: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM key_packages WHERE device_id = ? AND last_resort = 0",
        )
        .bind(device)
        .fetch_one(&mut *tx)
        .await?;
        if existing as usize + one_time.len() > max_per_device {
            return Err(StoreError::LimitExceeded(
                "too many one-time KeyPackages stored for this device",
            ));
        }
        for data in one_time {
            sqlx::query("INSERT INTO key_packages (device_id, last_resort, data) VALUES (?, 0, ?)")
                .bind(device)
                .bind(data)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(data) = last_resort {
            sqlx::query("DELETE FROM key_packages WHERE device_id = ? AND last_resort = 1")
                .bind(device)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO key_packages (device_id, last_resort, data) VALUES (?, 1, ?)")
                .bind(device)
                .bind(data)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.key_package_count(device_id).await
    }

    async fn key_package_count(&self, device_id: Uuid) -> Result<KeyPackageCount, StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(last_resort = 0), 0) AS one_time, COALESCE(SUM(last_resort = 1), 0) AS lr \
             FROM key_packages WHERE device_id = ?",
        )
        .bind(device_id.as_bytes().as_slice())
        .fetch_one(&self.reader)
        .await?;
        Ok(KeyPackageCount {
            one_time: row.try_get::<i64, _>("one_time")?.max(0) as u64,
            last_resort: row.try_get::<i64, _>("lr")? > 0,
        })
    }

    async fn claim_key_packages(
        &self,
        username: &str,
    ) -> Result<Vec<(DeviceRecord, Vec<u8>)>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(DEVICES_OF_USER)
            .bind(username)
            .fetch_all(&mut *tx)
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let device = device_from_row(row)?;
            let package = take_key_package(&mut tx, device.device_id).await?;
            claimed.push((device, package));
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn create_group(&self, group_id: &str, creator: Uuid) -> Result<GroupState, StoreError> {
        let mut tx = self.writer.begin().await?;
        let inserted =
            sqlx::query("INSERT INTO groups (group_id, epoch, next_seq) VALUES (?, 0, 1)")
                .bind(group_id)
                .execute(&mut *tx)
                .await;
        match inserted {
            Err(err) if is_unique_violation(&err) => return Err(StoreError::GroupExists),
            other => other?,
        };
        sqlx::query("INSERT INTO group_members (group_id, device_id) VALUES (?, ?)")
            .bind(group_id)
            .bind(creator.as_bytes().as_slice())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(GroupState {
            group_id: group_id.to_owned(),
            epoch: 0,
            members: vec![creator],
        })
    }

    /// Read in one snapshot, then answered only once everything that snapshot could show
    /// is on disk ([`Self::writer_durable`]): the writer commits a group's changes before
    /// they are flushed, and a reader sees them at once.
    async fn group(&self, group_id: &str) -> Result<Option<GroupState>, StoreError> {
        let mut snapshot = self.reader.begin().await?;
        let epoch: Option<i64> = sqlx::query_scalar("SELECT epoch FROM groups WHERE group_id = ?")
            .bind(group_id)
            .fetch_optional(&mut *snapshot)
            .await?;
        let state = match epoch {
            None => None,
            Some(epoch) => Some(GroupState {
                group_id: group_id.to_owned(),
                epoch: epoch as u64,
                members: members_of(&mut snapshot, group_id).await?,
            }),
        };
        snapshot.commit().await?;
        self.writer_durable().await?;
        Ok(state)
    }

    async fn queue_sequence(
        &self,
        request: SequenceRequest,
    ) -> Result<super::SequenceTicket, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.batcher
            .send(Job::Sequence(Box::new(request), answer))
            .await
            .map_err(|_| StoreError::Invalid("the store is closed"))?;
        Ok(Box::pin(async move {
            answered
                .await
                .map_err(|_| StoreError::Invalid("the store is closed"))?
        }))
    }

    async fn fetch_mailbox(
        &self,
        device_id: Uuid,
        limit: usize,
    ) -> Result<(Vec<Envelope>, bool), StoreError> {
        self.fetch_mailbox_after(device_id, 0, limit).await
    }

    async fn fetch_mailbox_after(
        &self,
        device_id: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Envelope>, bool), StoreError> {
        let device = device_id.as_bytes().as_slice();
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let durable = i64::try_from(self.durable.get()).unwrap_or(i64::MAX);
        let wanted = limit + 1;
        // Loaded before any query, so every snapshot below has the envelopes up to here in
        // the device index. Above it, envelopes are found by position, indexed or not.
        let indexed = self.indexed.load(Ordering::Acquire);
        let mut rows = Vec::new();
        let mut from = after;
        if after < indexed {
            rows = sqlx::query(FETCH_INDEXED_ENVELOPES)
                .bind(device)
                .bind(after)
                .bind(durable)
                .bind(wanted as i64)
                .fetch_all(&self.reader)
                .await?;
            // Fewer than asked for: the snapshot had no more indexed envelopes, so
            // whatever else there is lies above both `indexed` and the last one read.
            let last = match rows.last() {
                Some(row) => row.try_get::<i64, _>("seq")?,
                None => after,
            };
            from = last.max(indexed);
        }
        if rows.len() < wanted {
            rows.extend(
                sqlx::query(FETCH_ENVELOPES_BY_POSITION)
                    .bind(device)
                    .bind(from)
                    .bind(durable)
                    .bind((wanted - rows.len()) as i64)
                    .fetch_all(&self.reader)
                    .await?,
            );
        }
        let more = rows.len() > limit;
        let mut envelopes = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            let kind = EnvelopeKind::from_i64(row.try_get("kind")?)
                .ok_or(StoreError::Invalid("stored message has an unknown kind"))?;
            envelopes.push(Envelope {
                id: row.try_get::<i64, _>("seq")? as u64,
                message_id: uuid_from(&row.try_get::<Vec<u8>, _>("message_id")?)?,
                group_id: row.try_get("group_id")?,
                group_seq: row.try_get::<i64, _>("group_seq")? as u64,
                kind,
                server_time: row.try_get("server_time")?,
                payload: Bytes64(
                    row.try_get::<Option<Vec<u8>>, _>("payload")?
                        .unwrap_or_default(),
                ),
            });
        }
        Ok((envelopes, more))
    }

    async fn ack(&self, device_id: Uuid, ids: &[u64]) -> Result<u64, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.batcher
            .send(Job::Ack {
                device: device_id,
                ids: ids.to_vec(),
                answer: Some(answer),
            })
            .await
            .map_err(|_| StoreError::Invalid("the store is closed"))?;
        answered
            .await
            .map_err(|_| StoreError::Invalid("the store is closed"))?
    }

    /// The writer applies it with the next batch and answers nobody: the socket's task is
    /// not woken again for it, which at partial load is a task turn per message.
    async fn queue_quiet_ack(&self, device_id: Uuid, ids: &[u64]) -> Result<bool, StoreError> {
        self.batcher
            .send(Job::Ack {
                device: device_id,
                ids: ids.to_vec(),
                answer: None,
            })
            .await
            .map_err(|_| StoreError::Invalid("the store is closed"))?;
        Ok(true)
    }

    async fn mailbox_depth(&self) -> Result<u64, StoreError> {
        let depth: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(n), 0) FROM mailbox_counts")
            .fetch_one(&self.reader)
            .await?;
        Ok(depth.max(0) as u64)
    }

    async fn expire(&self, now: i64) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
        // A message's envelopes are the mailbox rows at its consecutive positions.
        let expired = sqlx::query_as::<_, (i64, i64, i64, Vec<u8>, String, i64)>(
            "SELECT id, first_seq, last_seq, message_id, group_id, kind FROM messages \
             WHERE expires_at < ? LIMIT ?",
        )
        .bind(now)
        .bind(EXPIRE_MAX_MESSAGES)
        .fetch_all(&mut *tx)
        .await?;
        let mut emptied: Vec<Vec<u8>> = Vec::new();
        for (id, first_seq, last_seq, message_id, group_id, kind) in expired {
            if first_seq <= last_seq {
                emptied.extend(
                    sqlx::query_scalar::<_, Vec<u8>>(
                        "DELETE FROM mailbox WHERE seq BETWEEN ? AND ? RETURNING device_id",
                    )
                    .bind(first_seq)
                    .bind(last_seq)
                    .fetch_all(&mut *tx)
                    .await?,
                );
            }
            sqlx::query("DELETE FROM messages WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            // Its idempotency key, if the writer wrote it to the table already (see
            // store/writer/message_keys.rs); one still in the writer's memory answers
            // nothing once the row is gone.
            sqlx::query(
                "DELETE FROM message_keys WHERE message_id = ? AND group_id = ? AND kind = ? \
                 AND message = ?",
            )
            .bind(message_id)
            .bind(group_id)
            .bind(kind)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM payloads WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let mailbox = emptied.len() as u64;
        let mut devices = emptied;
        devices.sort_unstable();
        devices.dedup();
        for device in devices {
            sqlx::query(RECOUNT_DEVICE_ENVELOPES.as_str())
                .bind(device)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM login_challenges WHERE expires_at < ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM links WHERE expires_at < ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM tokens WHERE expires_at < ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(mailbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn sqlite_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("test.db"))
            .await
            .unwrap();
        super::super::conformance::run_all(&store).await;
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut *store.writer.acquire().await.unwrap())
            .await
            .unwrap();
        assert_eq!(page_size, i64::from(DATABASE_PAGE_SIZE));
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_share_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("test.db"))
                .await
                .unwrap(),
        );
        let group = "ab".repeat(16);
        let sender = Uuid::new_v4();
        store.create_group(&group, sender).await.unwrap();
        let sends = (0..200u32).map(|i| {
            let store = store.clone();
            let group = group.clone();
            tokio::spawn(async move {
                store
                    .sequence(SequenceRequest {
                        group_id: group,
                        sender_device: sender,
                        message_id: Uuid::new_v4(),
                        kind: EnvelopeKind::Application,
                        epoch: if i == 7 { 9 } else { 0 },
                        mailbox_quota: u64::MAX,
                        payload: i.to_be_bytes().to_vec(),
                        welcome: None,
                        added_devices: Vec::new(),
                        removed_devices: Vec::new(),
                        leaving_devices: Vec::new(),
                        now: 0,
                        expires_at: i64::MAX,
                    })
                    .await
            })
        });
        let mut seqs = Vec::new();
        for (i, send) in futures_util::future::join_all(sends)
            .await
            .into_iter()
            .enumerate()
        {
            match send.unwrap() {
                Ok(outcome) => seqs.push(outcome.response.group_seq),
                // The one stale request is refused without harming its batch.
                Err(StoreError::EpochConflict { current: 0 }) => assert_eq!(i, 7),
                Err(err) => panic!("{err}"),
            }
        }
        seqs.sort();
        assert_eq!(seqs, (1..=199).collect::<Vec<_>>());
        let stats = store.batch_stats();
        let batches = stats.batches.load(Ordering::Relaxed);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 200);
        assert!(batches < 200, "every send took its own transaction");
    }

    #[tokio::test]
    async fn committed_data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store
            .create_group(&"dd".repeat(16), Uuid::nil())
            .await
            .unwrap();
        store.close().await;
        let reopened = SqliteStore::open(&path).await.unwrap();
        assert_eq!(
            reopened
                .group(&"dd".repeat(16))
                .await
                .unwrap()
                .unwrap()
                .epoch,
            0
        );
    }

    const NOW: i64 = 1_800_000_000;

    fn request(group: &str, sender: Uuid, kind: EnvelopeKind, epoch: u64) -> SequenceRequest {
        SequenceRequest {
            group_id: group.into(),
            sender_device: sender,
            message_id: Uuid::now_v7(),
            kind,
            epoch,
            mailbox_quota: u64::MAX,
            payload: Uuid::new_v4().as_bytes().to_vec(),
            welcome: None,
            added_devices: Vec::new(),
            removed_devices: Vec::new(),
            leaving_devices: Vec::new(),
            now: NOW,
            expires_at: NOW + 100,
        }
    }

    async fn device(store: &SqliteStore, username: &str) -> Uuid {
        let device = DeviceRecord {
            device_id: Uuid::new_v4(),
            username: username.into(),
            signature_key: vec![1; 32],
            certificate: vec![2; 150],
            created_day: NOW / 86_400,
            name_sealed: None,
        };
        store
            .create_account(
                &AccountRecord {
                    username: username.into(),
                    account_key: vec![3; 32],
                    created_day: NOW / 86_400,
                    last_seen_day: NOW / 86_400,
                },
                &device,
            )
            .await
            .unwrap();
        device.device_id
    }

    /// A group of `a` and `b` at epoch 1; `b` has the Welcome in its mailbox.
    async fn pair(store: &SqliteStore, group: &str) -> (Uuid, Uuid) {
        let a = device(store, &format!("a{}", &group[..6])).await;
        let b = device(store, &format!("b{}", &group[..6])).await;
        store.create_group(group, a).await.unwrap();
        let mut add = request(group, a, EnvelopeKind::Commit, 0);
        add.added_devices = vec![b];
        add.welcome = Some(b"welcome".to_vec());
        store.sequence(add).await.unwrap();
        (a, b)
    }

    /// WAL flushes that wait while the test holds them, or fail.
    #[derive(Clone, Default)]
    struct Flushes {
        held: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        failing: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Flushes {
        fn flush_fn(&self) -> super::super::writer::durability::FlushFn {
            let this = self.clone();
            Arc::new(move |wal| {
                let (held, changed) = &*this.held;
                let mut guard = held.lock().unwrap();
                while *guard {
                    guard = changed.wait(guard).unwrap();
                }
                if this.failing.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("the disk is gone"));
                }
                super::super::writer::durability::sync_wal(wal)
            })
        }

        fn hold(&self, hold: bool) {
            *self.held.0.lock().unwrap() = hold;
            self.held.1.notify_all();
        }

        /// A store whose flushes go through these, with a group of `a` and `b` at epoch 1
        /// (see [`pair`]); the group id is `tag` repeated.
        async fn store(&self, tag: &str) -> (tempfile::TempDir, SqliteStore, String, Uuid, Uuid) {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open_with_flush(&dir.path().join("t.db"), self.flush_fn())
                .await
                .unwrap();
            let group = tag.repeat(16);
            let (a, b) = pair(&store, &group).await;
            (dir, store, group, a, b)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_answered_or_readable_before_the_wal_is_flushed() {
        let flushes = Flushes::default();
        let (_dir, store, group, a, b) = flushes.store("a1").await;
        assert_eq!(store.fetch_mailbox(b, 10).await.unwrap().0.len(), 1);

        flushes.hold(true);
        let mut ticket = store
            .queue_sequence(request(&group, a, EnvelopeKind::Application, 1))
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), &mut ticket).await;
        assert!(early.is_err(), "answered before the flush");
        // Committed, but not durable: no reader may see it.
        assert_eq!(store.fetch_mailbox(b, 10).await.unwrap().0.len(), 1);
        flushes.hold(false);
        let outcome = ticket.await.unwrap();
        assert_eq!(outcome.deliveries.len(), 1);
        assert_eq!(store.fetch_mailbox(b, 10).await.unwrap().0.len(), 2);
        store.close().await;
    }

    /// A group's state is answered only once what it shows is on disk: a commit that the
    /// writer has committed but not yet flushed (a crash could still take it back) holds the
    /// answer until the flush, and the answer then shows it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_state_is_answered_only_once_it_is_on_disk() {
        let flushes = Flushes::default();
        let (_dir, store, group, a, b) = flushes.store("b3").await;
        assert_eq!(store.group(&group).await.unwrap().unwrap().epoch, 1);

        flushes.hold(true);
        let commit = store
            .queue_sequence(request(&group, a, EnvelopeKind::Commit, 1))
            .await
            .unwrap();
        // Committed: a plain reader sees the new epoch, though it is not durable.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM groups WHERE group_id = ?")
                .bind(&group)
                .fetch_one(&store.reader)
                .await
                .unwrap();
            if epoch == 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the commit was not applied"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let reading = tokio::spawn({
            let (store, group) = (store.clone(), group.clone());
            async move { store.group(&group).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !reading.is_finished(),
            "a group state a crash could take back was answered"
        );

        flushes.hold(false);
        commit.await.unwrap();
        let state = reading.await.unwrap().unwrap().unwrap();
        assert_eq!(
            (state.epoch, state.members),
            (2, {
                let mut members = vec![a, b];
                members.sort();
                members
            })
        );
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_is_an_error_and_a_retry_gets_the_first_answer() {
        let flushes = Flushes::default();
        let (_dir, store, group, a, b) = flushes.store("a2").await;
        let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = delivered.clone();
        store.on_deliveries(move |d| seen.lock().unwrap().extend(d.iter().map(|d| d.mailbox_id)));

        flushes.failing.store(true, Ordering::SeqCst);
        let first = request(&group, a, EnvelopeKind::Application, 1);
        assert!(matches!(
            store.sequence(first.clone()).await,
            Err(StoreError::CommitFailed(_))
        ));
        assert!(
            delivered.lock().unwrap().is_empty(),
            "pushed without a flush"
        );
        assert_eq!(store.fetch_mailbox(b, 10).await.unwrap().0.len(), 1);

        flushes.failing.store(false, Ordering::SeqCst);
        // The sender retries: the message was committed, so it gets its sequence number.
        let retried = store.sequence(first).await.unwrap();
        assert_eq!(retried.response.group_seq, 2);
        assert!(retried.deliveries.is_empty());
        // Once a later flush succeeded, the envelope is readable (pulled, not pushed).
        store
            .sequence(request(&group, a, EnvelopeKind::Application, 1))
            .await
            .unwrap();
        let (mail, _) = store.fetch_mailbox(b, 10).await.unwrap();
        assert_eq!(
            mail.iter().map(|e| e.group_seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn the_writer_sees_what_other_connections_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let group = "a3".repeat(16);
        let (a, b) = pair(&store, &group).await;
        let before = store
            .sequence(request(&group, a, EnvelopeKind::Application, 1))
            .await
            .unwrap();
        assert_eq!(before.recipients(), vec![b]);
        // Removed over the sqlx connection, while the writer has the group cached.
        store.remove_device(b).await.unwrap();
        let after = store
            .sequence(request(&group, a, EnvelopeKind::Application, 1))
            .await
            .unwrap();
        assert!(after.deliveries.is_empty(), "delivered to a removed device");
        store.close().await;
    }

    /// A store on `t.db` in a new directory, with a group (id: `tag` repeated) of two
    /// devices.
    async fn open_with_pair(tag: &str) -> (tempfile::TempDir, SqliteStore, String, Uuid, Uuid) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let group = tag.repeat(16);
        let (a, b) = pair(&store, &group).await;
        (dir, store, group, a, b)
    }

    /// While another connection holds SQLite's write lock, a message waits for it (the
    /// writer's busy handler, `writer::lock_wait`) instead of failing with "database is
    /// locked", and is committed only after the lock was released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_waits_while_another_connection_holds_the_write_lock() {
        let (dir, store, group, a, b) = open_with_pair("a5").await;
        let path = dir.path().join("t.db");
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(60));
            let released = std::time::Instant::now();
            other.execute_batch("COMMIT").unwrap();
            released
        });
        let sent = store
            .sequence(request(&group, a, EnvelopeKind::Application, 1))
            .await;
        let answered = std::time::Instant::now();
        let released = holder.join().unwrap();
        assert_eq!(sent.unwrap().recipients(), vec![b]);
        assert!(
            answered > released,
            "answered before the other connection let go of the write lock"
        );
        store.close().await;
    }

    /// The group-commit writer takes turns with the `sqlx` connection (`write_turn`): while
    /// a `sqlx` caller has the connection, a message waits for its turn even though SQLite's
    /// lock is free, and goes as soon as the turn ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_waits_for_the_turn_of_the_sqlx_connection() {
        let (_dir, store, group, a, b) = open_with_pair("a6").await;
        let turn = store.writer.acquire().await.unwrap();
        let sending = tokio::spawn({
            let store = store.clone();
            let group = group.clone();
            async move {
                let sent = store
                    .sequence(request(&group, a, EnvelopeKind::Application, 1))
                    .await;
                (sent, std::time::Instant::now())
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        assert!(
            !sending.is_finished(),
            "the writer went during another turn"
        );
        let released = std::time::Instant::now();
        drop(turn);
        let (sent, answered) = sending.await.unwrap();
        assert_eq!(sent.unwrap().recipients(), vec![b]);
        assert!(answered > released);
        // The wait is counted (metrics).
        let stats = store.batch_stats();
        assert!(stats.turn_waits.load(Ordering::Relaxed) >= 1);
        assert!(stats.turn_wait_micros.load(Ordering::Relaxed) >= 50_000);
        store.close().await;
    }

    /// The key directory's publisher asks for pending changes every `kt_interval` (50 ms
    /// in the bench): a read that must not take a write turn. It did, and at full load the
    /// writer waited for it while it waited for the CPU (164 waits, 1.5 s, in an 11 s
    /// relay run with 1,000 pairs). It sees a registration's change all the same. So do
    /// the reads clients cause, of signed roots, of KeyPackage counts and of device-link
    /// sessions, and a publish's reads of the changed accounts' entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_of_the_directory_and_key_package_counts_take_no_write_turn() {
        let (_dir, store, _, a, _) = open_with_pair("a8").await;
        store
            .add_key_packages(a, &[vec![1], vec![2]], Some(&[3]), 100)
            .await
            .unwrap();
        let session = LinkRecord {
            link_id: b"link-a8".to_vec(),
            owner_device: a,
            verifier: vec![9; 32],
            expires_at: NOW + 600,
            failed_attempts: 0,
            state: LinkState::Open,
            sealed_request: None,
            sealed_response: None,
        };
        store.create_link(&session).await.unwrap();
        let turn = store.writer.acquire().await.unwrap();
        let within = std::time::Duration::from_secs(5);
        let pending = tokio::time::timeout(within, store.kt_pending())
            .await
            .expect("asking for pending changes waited for the write turn")
            .unwrap();
        tokio::time::timeout(within, store.kt_root_hashes(0, 10))
            .await
            .expect("reading signed roots waited for the write turn")
            .unwrap();
        tokio::time::timeout(within, store.kt_root_hash(0))
            .await
            .expect("reading a signed root waited for the write turn")
            .unwrap();
        let count = tokio::time::timeout(within, store.key_package_count(a))
            .await
            .expect("counting KeyPackages waited for the write turn")
            .unwrap();
        let owner = store.device(a).await.unwrap().unwrap().username;
        let entry = tokio::time::timeout(within, store.kt_entry(&owner))
            .await
            .expect("reading a directory entry waited for the write turn")
            .unwrap();
        let link = tokio::time::timeout(within, store.link(b"link-a8", NOW))
            .await
            .expect("reading a link session waited for the write turn")
            .unwrap();
        drop(turn);
        assert_eq!(
            link,
            Some(session),
            "the link session reads back as created"
        );
        assert_ne!(entry, DirectoryEntry::deleted(), "the account has an entry");
        assert_eq!((count.one_time, count.last_resort), (2, true));
        assert!(
            pending.iter().any(|(name, _)| *name == owner),
            "the registration's change is not pending: {pending:?}"
        );
        store.close().await;
    }

    /// A `sqlx` write asked for while the writer works through a long queue goes between
    /// two of its batches. (Before the turns it slept through SQLite's back-off while the
    /// writer took the lock from one batch to the next, and got in only when it happened to
    /// try between two batches or the queue ran dry.)
    ///
    /// A feeder keeps the writer's queue full until the writes are done, so the writer is
    /// busy throughout however fast the machine is (a fixed flood once ran dry on a fast
    /// one before the five writes were done, and then showed nothing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlx_writes_go_between_two_batches_of_a_busy_writer() {
        let (_dir, store, group, a, _) = open_with_pair("a7").await;
        let batches = || store.batch_stats().batches.load(Ordering::Relaxed);
        let started = batches();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let feeder = {
            let (store, group, done) = (store.clone(), group.clone(), done.clone());
            tokio::spawn(async move {
                let mut sends = tokio::task::JoinSet::new();
                loop {
                    while sends.len() < 4 * super::super::writer::MAX_BATCH {
                        let store = store.clone();
                        let message = request(&group, a, EnvelopeKind::Application, 1);
                        sends.spawn(async move { store.sequence(message).await });
                    }
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(sent) = sends.join_next().await {
                        sent.unwrap().unwrap();
                    }
                }
                while let Some(sent) = sends.join_next().await {
                    sent.unwrap().unwrap();
                }
            })
        };
        while batches() == started {
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        let mut batches_during_the_writes = 0;
        for write in 0..5u8 {
            let before = batches();
            store.set_device_name(a, &[write + 1]).await.unwrap();
            let during = batches() - before;
            assert!(
                during <= 2,
                "write {write} waited for {during} batches of the writer"
            );
            batches_during_the_writes += during;
        }
        done.store(true, Ordering::Relaxed);
        feeder.await.unwrap();
        assert!(
            batches_during_the_writes > 0,
            "the writer committed no batch while the writes waited: nothing was shown"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn mailbox_counts_follow_expiry_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let group = "a4".repeat(16);
        let (a, b) = pair(&store, &group).await;
        let mut quota = request(&group, a, EnvelopeKind::Application, 1);
        quota.mailbox_quota = 2;
        store.sequence(quota.clone()).await.unwrap();
        // b holds the Welcome and one message: full.
        quota.message_id = Uuid::now_v7();
        assert!(matches!(
            store.sequence(quota.clone()).await,
            Err(StoreError::MailboxFull)
        ));
        store.close().await;
        let store = SqliteStore::open(&path).await.unwrap();
        assert!(matches!(
            store.sequence(quota.clone()).await,
            Err(StoreError::MailboxFull)
        ));
        // Expiry empties the mailbox over the sqlx connection; the count follows.
        assert_eq!(store.expire(NOW + 101).await.unwrap(), 2);
        store.sequence(quota).await.unwrap();
        let ids = mailbox_ids(&store, b).await;
        assert_eq!(ids.len(), 1);
        assert_eq!(store.ack(b, &ids).await.unwrap(), 1);
        let count: i64 = sqlx::query_scalar("SELECT n FROM mailbox_counts WHERE device_id = ?")
            .bind(b.as_bytes().as_slice())
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(count, 0);
        store.close().await;
    }

    /// Rows of `message_keys` and the counter up to which messages have theirs there.
    async fn message_keys(store: &SqliteStore) -> (i64, i64) {
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM message_keys")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        let keyed: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'messages_keyed'")
                .fetch_one(&store.reader)
                .await
                .unwrap();
        (rows, keyed)
    }

    /// A resend gets the first answer while its key waits in the writer's memory, once it
    /// is in `message_keys`, and after a restart either way; the same id with other content
    /// is refused; once the message expired, the id is free again.
    #[tokio::test]
    async fn a_resend_is_recognised_wherever_its_key_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let group = "a5".repeat(16);
        let (a, _b) = pair(&store, &group).await;
        let first = request(&group, a, EnvelopeKind::Application, 1);
        let answer = store.sequence(first.clone()).await.unwrap().response;
        // A later id: `first` is no longer the group's highest, so a resend of it is
        // looked up; an id below the highest that was never used is a new message.
        store
            .sequence(request(&group, a, EnvelopeKind::Application, 1))
            .await
            .unwrap();
        let mut low = request(&group, a, EnvelopeKind::Application, 1);
        low.message_id = Uuid::from_u128(1);
        assert_eq!(store.sequence(low).await.unwrap().deliveries.len(), 1);
        let mut tampered = first.clone();
        tampered.payload = b"other".to_vec();
        let check = |store: SqliteStore| {
            let (first, tampered) = (first.clone(), tampered.clone());
            async move {
                let again = store.sequence(first).await.unwrap();
                assert_eq!(again.response, answer);
                assert!(again.deliveries.is_empty(), "a resend delivers nothing");
                assert!(matches!(
                    store.sequence(tampered).await,
                    Err(StoreError::DuplicateMessageId)
                ));
                store
            }
        };
        let store = check(store).await;
        assert_eq!(
            message_keys(&store).await,
            (0, 0),
            "the keys wait in memory"
        );
        store.close().await;
        let store = check(SqliteStore::open(&path).await.unwrap()).await;

        // Forced into the table (the Commit, its Welcome and the three messages).
        store.sweep_delivered().await.unwrap();
        assert_eq!(message_keys(&store).await, (5, 5));
        let store = check(store).await;
        store.close().await;
        let store = check(SqliteStore::open(&path).await.unwrap()).await;

        // Expiry takes the keys with the messages (and b's four envelopes); the id is then
        // a new message.
        assert_eq!(store.expire(NOW + 101).await.unwrap(), 4);
        assert_eq!(message_keys(&store).await, (0, 5));
        let fresh = store.sequence(first.clone()).await.unwrap();
        assert_eq!(fresh.deliveries.len(), 1);
        assert!(fresh.response.group_seq > answer.group_seq);
        store.close().await;
    }

    /// Positions of `device`'s envelopes that the sweep has indexed.
    async fn indexed_ids(store: &SqliteStore, device: Uuid) -> Vec<u64> {
        sqlx::query_scalar(
            "SELECT seq FROM mailbox WHERE device_id = ? AND indexed = 1 ORDER BY seq",
        )
        .bind(device.as_bytes().as_slice())
        .fetch_all(&store.reader)
        .await
        .unwrap()
    }

    /// Every position in `device`'s mailbox, read in pages of `page`.
    async fn all_mailbox_ids(store: &SqliteStore, device: Uuid, page: usize) -> Vec<u64> {
        let mut ids: Vec<u64> = Vec::new();
        loop {
            let after = ids.last().copied().unwrap_or(0);
            let (envelopes, more) = store
                .fetch_mailbox_after(device, after, page)
                .await
                .unwrap();
            assert!(envelopes.len() <= page);
            ids.extend(envelopes.iter().map(|e| e.id));
            if !more {
                return ids;
            }
        }
    }

    /// An envelope is indexed by device only once the sweep finds it still waiting; until
    /// then it is read by position. Reads page across the boundary with nothing lost or
    /// repeated, expiry recounts both parts, and removing the device removes both.
    #[tokio::test]
    async fn envelopes_are_read_counted_and_removed_whether_indexed_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let group = "a7".repeat(16);
        let (a, b) = pair(&store, &group).await;
        let send = |expires_at: i64| {
            let mut message = request(&group, a, EnvelopeKind::Application, 1);
            message.expires_at = expires_at;
            store.sequence(message)
        };
        for at in [NOW + 50, NOW + 100, NOW + 100, NOW + 50] {
            send(at).await.unwrap();
        }
        let first = all_mailbox_ids(&store, b, 10).await;
        assert_eq!(first.len(), 5, "the Welcome and four messages");
        assert!(
            indexed_ids(&store, b).await.is_empty(),
            "nothing is due yet"
        );

        // A forced sweep indexes every envelope there is; later ones are not.
        store.sweep_delivered().await.unwrap();
        assert_eq!(indexed_ids(&store, b).await, first);
        for at in [NOW + 100, NOW + 50, NOW + 100] {
            send(at).await.unwrap();
        }
        let all = all_mailbox_ids(&store, b, 10).await;
        assert_eq!(all.len(), 8);
        assert!(all.windows(2).all(|w| w[0] < w[1]), "in order: {all:?}");
        assert_eq!(&all[..5], &first[..]);
        for page in [1, 2, 3, 5, 7] {
            assert_eq!(
                all_mailbox_ids(&store, b, page).await,
                all,
                "pages of {page}"
            );
        }
        assert!(all_mailbox_ids(&store, a, 3).await.is_empty());

        // Acknowledged envelopes go from either part.
        assert_eq!(store.ack(b, &[all[2], all[7]]).await.unwrap(), 2);
        let left: Vec<u64> = all
            .iter()
            .copied()
            .filter(|id| *id != all[2] && *id != all[7])
            .collect();
        assert_eq!(all_mailbox_ids(&store, b, 2).await, left);

        // Expiry takes the early messages from both parts and recounts what is left.
        assert_eq!(store.expire(NOW + 60).await.unwrap(), 3);
        let left = all_mailbox_ids(&store, b, 4).await;
        assert_eq!(left.len(), 3, "the Welcome and two messages: {left:?}");
        let count: i64 = sqlx::query_scalar("SELECT n FROM mailbox_counts WHERE device_id = ?")
            .bind(b.as_bytes().as_slice())
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(count, 3);

        // One more unindexed envelope, then the device goes with all of them.
        send(NOW + 100).await.unwrap();
        assert_eq!(all_mailbox_ids(&store, b, 10).await.len(), 4);
        store.remove_device(b).await.unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mailbox")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(rows, 0);
        store.close().await;
    }

    /// Reading a page of a device's envelopes uses the device index for the indexed part
    /// and positions for the rest, never a scan of the whole mailbox or a sort.
    #[tokio::test]
    async fn a_page_of_envelopes_is_read_by_index_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        for (query, access) in [
            (FETCH_INDEXED_ENVELOPES, "USING INDEX mailbox_by_device"),
            (
                FETCH_ENVELOPES_BY_POSITION,
                "USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)",
            ),
        ] {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {query}")))
                .bind(vec![0u8; 16])
                .bind(0i64)
                .bind(10i64)
                .bind(10i64)
                .fetch_all(&store.reader)
                .await
                .unwrap();
            let plan = rows
                .iter()
                .map(|row| row.try_get::<String, _>("detail").unwrap())
                .collect::<Vec<_>>()
                .join("\n");
            assert!(plan.contains(&format!("SEARCH b {access}")), "{plan}");
            assert!(!plan.contains("SCAN"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
        store.close().await;
    }

    /// A quiet acknowledgement is queued, not waited for, and deletes like any other; the
    /// writer takes jobs in order, so a confirmed acknowledgement after it sees it done.
    #[tokio::test]
    async fn quiet_acknowledgements_are_applied_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let group = "a5".repeat(16);
        let (a, b) = pair(&store, &group).await;
        let ids = welcome_and_message(&store, &group, a, b).await;
        assert!(store.queue_quiet_ack(b, &ids[..1]).await.unwrap());
        assert_eq!(store.ack(b, &ids[..1]).await.unwrap(), 0, "already gone");
        assert_eq!(mailbox_ids(&store, b).await, ids[1..]);
        store.close().await;
    }

    /// A batch of quiet acknowledgements alone is applied without a flush of its own
    /// (nobody waits for it); a confirmed acknowledgement is flushed before its answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quiet_acknowledgements_alone_wait_for_no_flush() {
        let flushes = Flushes::default();
        let (_dir, store, group, a, b) = flushes.store("a7").await;
        let ids = welcome_and_message(&store, &group, a, b).await;
        let flushed = || store.batch_stats().flushes.load(Ordering::SeqCst);
        let before = flushed();

        // A flush would now block the durability thread; none may be started.
        flushes.hold(true);
        assert!(store.queue_quiet_ack(b, &ids[..1]).await.unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while mailbox_ids(&store, b).await != ids[1..] {
            assert!(
                std::time::Instant::now() < deadline,
                "the quiet ack was not applied"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The writer hands the batch over after committing it; give the durability thread
        // the time to (wrongly) start a flush before counting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(flushed(), before, "a batch of quiet acks alone was flushed");

        flushes.hold(false);
        assert_eq!(store.ack(b, &ids[1..]).await.unwrap(), 1);
        assert!(
            flushed() > before,
            "a confirmed ack is answered after a flush"
        );
        assert!(mailbox_ids(&store, b).await.is_empty());
        store.close().await;
    }

    /// Sends one application message from `a` in the group of [`pair`] and returns the
    /// positions in `b`'s mailbox: the Welcome's and the message's.
    async fn welcome_and_message(store: &SqliteStore, group: &str, a: Uuid, b: Uuid) -> Vec<u64> {
        store
            .sequence(request(group, a, EnvelopeKind::Application, 1))
            .await
            .unwrap();
        let ids = mailbox_ids(store, b).await;
        assert_eq!(ids.len(), 2, "the Welcome and the message");
        ids
    }

    /// The positions in `device`'s mailbox (the first ten).
    async fn mailbox_ids(store: &SqliteStore, device: Uuid) -> Vec<u64> {
        let (envelopes, _) = store.fetch_mailbox(device, 10).await.unwrap();
        envelopes.iter().map(|e| e.id).collect()
    }

    /// The ciphertexts the store holds, by message row.
    async fn payload_rows(store: &SqliteStore) -> Vec<i64> {
        sqlx::query_scalar("SELECT id FROM payloads ORDER BY id")
            .fetch_all(&store.reader)
            .await
            .unwrap()
    }

    /// The writer sweeps at most a step of ids per batch or tick, but an idle writer keeps
    /// stepping: a long range of delivered messages loses its ciphertexts within a moment
    /// of falling due, not one step per nudge (32 steps of the checkpoint thread's nudges,
    /// four a second, would take 8 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_writer_sweeps_a_long_due_range_at_once() {
        use super::super::writer::{SWEEP_LAG, SWEEP_STEP};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let group = "c9".repeat(16);
        let (a, b) = pair(&store, &group).await;
        let ids = mailbox_ids(&store, b).await;
        store.ack(b, &ids).await.unwrap();
        let messages = 32 * SWEEP_STEP as usize;
        let sent = futures_util::future::join_all(
            (0..messages).map(|_| store.sequence(request(&group, a, EnvelopeKind::Application, 1))),
        )
        .await;
        let positions: Vec<u64> = sent
            .into_iter()
            .map(|outcome| {
                let outcome = outcome.unwrap();
                outcome
                    .deliveries
                    .iter()
                    .find(|d| d.device == b)
                    .unwrap()
                    .mailbox_id
            })
            .collect();
        for chunk in positions.chunks(256) {
            store.ack(b, chunk).await.unwrap();
        }
        assert!(payload_rows(&store).await.len() >= messages);
        let within = SWEEP_LAG + Duration::from_secs(2);
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = payload_rows(&store).await.len();
            if left == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{left} ciphertexts left {} s after the last acknowledgement",
                within.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A ciphertext stays while any envelope of its message is in a mailbox and goes in
    /// the sweep after the last is acknowledged; once its range was swept, the last
    /// acknowledgement (or the removal of the last recipient's device) drops it at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivered_ciphertexts_are_swept_and_late_ones_dropped_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let group = "a7".repeat(16);
        let (a, b) = pair(&store, &group).await;
        let c = device(&store, "carol").await;
        let mut add = request(&group, a, EnvelopeKind::Commit, 1);
        add.added_devices = vec![c];
        add.welcome = Some(b"welcome".to_vec());
        store.sequence(add).await.unwrap();
        // Every handshake so far is delivered and swept.
        for device in [b, c] {
            let ids = mailbox_ids(&store, device).await;
            store.ack(device, &ids).await.unwrap();
        }
        store.sweep_delivered().await.unwrap();
        assert!(payload_rows(&store).await.is_empty());

        // To b and c; b acknowledges.
        let first = store
            .sequence(request(&group, a, EnvelopeKind::Application, 2))
            .await
            .unwrap();
        let position = |device: Uuid| {
            first
                .deliveries
                .iter()
                .find(|d| d.device == device)
                .unwrap()
                .mailbox_id
        };
        let held = payload_rows(&store).await;
        assert_eq!(held.len(), 1);
        assert_eq!(store.ack(b, &[position(b)]).await.unwrap(), 1);
        assert_eq!(
            store.sweep_delivered().await.unwrap(),
            0,
            "c has not acknowledged"
        );
        assert_eq!(payload_rows(&store).await, held);
        let (mail, _) = store.fetch_mailbox(c, 10).await.unwrap();
        assert!(
            !mail[0].payload.as_ref().is_empty(),
            "c still gets the ciphertext"
        );
        // Swept while c held it: c's acknowledgement drops it without waiting for a sweep.
        assert_eq!(store.ack(c, &[position(c)]).await.unwrap(), 1);
        assert!(payload_rows(&store).await.is_empty());

        // Acknowledged by both before any sweep: it stays until the sweep.
        let second = store
            .sequence(request(&group, a, EnvelopeKind::Application, 2))
            .await
            .unwrap();
        for delivery in &second.deliveries {
            store
                .ack(delivery.device, &[delivery.mailbox_id])
                .await
                .unwrap();
        }
        assert_eq!(payload_rows(&store).await.len(), 1);
        assert_eq!(store.sweep_delivered().await.unwrap(), 1);
        assert!(payload_rows(&store).await.is_empty());

        // Swept while both held it; then b acknowledges and c's device is removed.
        let third = store
            .sequence(request(&group, a, EnvelopeKind::Application, 2))
            .await
            .unwrap();
        store.sweep_delivered().await.unwrap();
        let to_b = third
            .deliveries
            .iter()
            .find(|d| d.device == b)
            .unwrap()
            .mailbox_id;
        store.ack(b, &[to_b]).await.unwrap();
        assert_eq!(payload_rows(&store).await.len(), 1);
        store.remove_device(c).await.unwrap();
        assert!(payload_rows(&store).await.is_empty());
        store.close().await;
    }

    #[tokio::test]
    async fn a_refused_commit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let group = "a5".repeat(16);
        let (a, b) = pair(&store, &group).await;
        // Removes b, then fails on an unknown device: the savepoint and the cache both
        // go back.
        let mut bad = request(&group, a, EnvelopeKind::Commit, 1);
        bad.removed_devices = vec![b];
        bad.added_devices = vec![Uuid::new_v4()];
        bad.welcome = Some(b"w".to_vec());
        assert!(matches!(
            store.sequence(bad).await,
            Err(StoreError::UnknownDevice(_))
        ));
        // b's mailbox holds the Welcome only: the refused commit is not counted.
        let mut next = request(&group, a, EnvelopeKind::Application, 1);
        next.mailbox_quota = 2;
        let message = store.sequence(next).await.unwrap();
        assert_eq!(message.response.group_seq, 2);
        assert_eq!(message.recipients(), vec![b]);
        let state = store.group(&group).await.unwrap().unwrap();
        assert_eq!((state.epoch, state.members.len()), (1, 2));
        store.close().await;
    }

    /// A database written by the schema of migration 5 (mailbox with AUTOINCREMENT,
    /// payloads dropped by a NOT EXISTS probe) opens on today's schema with nothing lost.
    #[tokio::test]
    async fn a_version_5_database_upgrades_without_losing_mail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let options = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        MIGRATIONS.run_to(5, &pool).await.unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let group = "0f".repeat(16);
        let (a_id, b_id) = (a.as_bytes().as_slice(), b.as_bytes().as_slice());
        sqlx::query("INSERT INTO accounts VALUES ('alice', x'01', 1, 1), ('bobby', x'02', 1, 1)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO devices (device_id, username, signature_key, certificate, created_day) \
             VALUES (?, 'alice', x'01', x'01', 1), (?, 'bobby', x'02', x'02', 1)",
        )
        .bind(a_id)
        .bind(b_id)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO groups VALUES (?, 1, 4)")
            .bind(&group)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO group_members VALUES (?1, ?2), (?1, ?3)")
            .bind(&group)
            .bind(a_id)
            .bind(b_id)
            .execute(&pool)
            .await
            .unwrap();
        // A Welcome, then two messages; b acknowledged the third (the old way).
        for (kind, seq, payload) in [(2, 1, Some(0xaa)), (4, 2, Some(0xbb)), (4, 3, None)] {
            sqlx::query(
                "INSERT INTO messages (group_id, message_id, kind, group_seq, epoch_after, \
                 payload_hash, payload, server_time, expires_at) \
                 VALUES (?, ?, ?, ?, 1, x'00', ?, 10, 1000)",
            )
            .bind(&group)
            .bind(Uuid::new_v4().as_bytes().as_slice())
            .bind(kind)
            .bind(seq)
            .bind(payload.map(|p: u8| vec![p]))
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("INSERT INTO mailbox (device_id, message) VALUES (?, ?)")
                .bind(b_id)
                .bind(seq)
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::query("DELETE FROM mailbox WHERE seq = 3")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&path).await.unwrap();
        // Every message from before the upgrade has its idempotency key in the table, and
        // the group knows its highest message id.
        assert_eq!(message_keys(&store).await, (3, 3));
        let (highest, max): (Option<Vec<u8>>, Option<Vec<u8>>) = sqlx::query_as(
            "SELECT highest_message_id, (SELECT MAX(message_id) FROM message_keys) \
             FROM groups WHERE group_id = ?",
        )
        .bind(&group)
        .fetch_one(&store.reader)
        .await
        .unwrap();
        assert!(highest.is_some());
        assert_eq!(highest, max);
        // Every envelope from before the upgrade is in the device index.
        assert_eq!(indexed_ids(&store, b).await, vec![1, 2]);
        let indexed: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'mailbox_indexed'")
                .fetch_one(&store.reader)
                .await
                .unwrap();
        assert_eq!(indexed, 3);
        let (mail, _) = store.fetch_mailbox(b, 10).await.unwrap();
        assert_eq!(
            mail.iter()
                .map(|e| (e.id, e.payload.as_ref().to_vec()))
                .collect::<Vec<_>>(),
            vec![(1, vec![0xaa]), (2, vec![0xbb])]
        );
        assert_eq!(store.ack(b, &[1]).await.unwrap(), 1);
        // The upgrade counts every older message as swept: the acknowledgement of the
        // Welcome's last envelope drops its ciphertext itself.
        let payloads: Vec<i64> = sqlx::query_scalar("SELECT id FROM payloads ORDER BY id")
            .fetch_all(&store.reader)
            .await
            .unwrap();
        assert_eq!(
            payloads,
            vec![2],
            "the last recipient acknowledged the Welcome"
        );
        // Position 3 was handed out before the upgrade: it is never used again.
        let mut next = request(&group, a, EnvelopeKind::Application, 1);
        next.mailbox_quota = 2;
        let outcome = store.sequence(next).await.unwrap();
        assert_eq!(outcome.deliveries[0].mailbox_id, 4);
        assert_eq!(outcome.response.group_seq, 4);
        // b holds 2 and 4: the quota of 2 is reached.
        let mut full = request(&group, a, EnvelopeKind::Application, 1);
        full.mailbox_quota = 2;
        assert!(matches!(
            store.sequence(full).await,
            Err(StoreError::MailboxFull)
        ));
        assert_eq!(store.expire(NOW + 101).await.unwrap(), 2);
        assert!(store.fetch_mailbox(b, 10).await.unwrap().0.is_empty());
        store.close().await;
    }
}
