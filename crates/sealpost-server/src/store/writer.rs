//! The group-commit writer: the hot write path of the SQLite backend.
//!
//! Sequencing messages and acknowledging envelopes are most of what a busy server writes.
//! Both run on one dedicated OS thread that owns a plain `rusqlite` connection with cached
//! prepared statements: every job waiting when the thread becomes free (up to
//! [`MAX_BATCH`]) is applied in one transaction, each under its own savepoint so that a
//! refused request rolls back alone, and the transaction is committed once — one WAL fsync
//! for the whole batch. Only then is each job answered, so no sender is told "accepted"
//! and no envelope is forgotten before the disk has it.
//!
//! Why a thread and rusqlite rather than the async `sqlx` pool used for everything else:
//! the hot path runs about ten small statements per message, and `sqlx`'s SQLite driver
//! hands every statement to a worker thread and back, which costs more than the statement
//! itself. Other writes (accounts, KeyPackages, the key directory) are rare and stay on
//! `sqlx`; the two writers take SQLite's write lock in turn (`busy_timeout`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, Transaction, TransactionBehavior, params};
use sealpost_proto::api::{EnvelopeKind, SequencedResponse};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{Delivery, SequenceOutcome, SequenceRequest, StoreError, StoredMessage};

/// Most jobs one transaction (one fsync) carries.
pub const MAX_BATCH: usize = 512;

/// Counters of the group-commit writer.
#[derive(Default)]
pub struct BatchStats {
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Requests they carried.
    pub requests: AtomicU64,
    /// Called with the size of every committed batch (metrics).
    observer: std::sync::OnceLock<Box<dyn Fn(usize) + Send + Sync>>,
}

impl std::fmt::Debug for BatchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStats")
            .field("batches", &self.batches)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl BatchStats {
    /// Registers the function told the size of every committed batch (once).
    pub fn observe(&self, observer: impl Fn(usize) + Send + Sync + 'static) {
        let _ = self.observer.set(Box::new(observer));
    }
}

/// Told every committed delivery, in mailbox order, before any job of the batch is
/// answered. Called on the writer thread, so it must not block; the server hands the
/// deliveries to the devices' sockets (`Notifier::deliver`). Delivering from here, rather
/// than from each sender's task, is what keeps every device's push queue in mailbox order
/// when many senders' messages share a batch.
#[derive(Default)]
pub struct DeliveryHook(std::sync::OnceLock<DeliverFn>);

type DeliverFn = Box<dyn Fn(&[Delivery]) + Send + Sync>;

impl std::fmt::Debug for DeliveryHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryHook")
            .field("set", &self.0.get().is_some())
            .finish()
    }
}

impl DeliveryHook {
    /// Sets the hook (once; later calls are ignored).
    pub fn set(&self, hook: impl Fn(&[Delivery]) + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(hook));
    }
}

/// Work for the writer thread.
pub(crate) enum Job {
    Sequence(
        Box<SequenceRequest>,
        oneshot::Sender<Result<SequenceOutcome, StoreError>>,
    ),
    Ack {
        device: Uuid,
        ids: Vec<u64>,
        answer: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Finish the jobs before this one, close the connection and stop.
    Close(oneshot::Sender<()>),
}

/// What one job produced inside the transaction.
enum Done {
    Sequence(Result<SequenceOutcome, StoreError>),
    Ack(Result<u64, StoreError>),
}

/// Opens the writer's connection on an existing, migrated database and starts its thread.
pub(crate) fn spawn(
    path: &Path,
    stats: Arc<BatchStats>,
    hook: Arc<DeliveryHook>,
) -> Result<mpsc::Sender<Job>, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // Same durability as the sqlx connections (see the module doc of `sqlite`).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoint less often than SQLite's default of 1,000 pages: hot pages (indexes'
    // right edges, mailbox counters) are then copied back to the database once per
    // checkpoint instead of many times. The WAL stays bounded (about 40 MiB).
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    // Savepoints' statement journals in memory, not in temporary files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(64);
    let (jobs, receiver) = mpsc::channel(4 * MAX_BATCH);
    std::thread::Builder::new()
        .name("sealpost-writer".into())
        .spawn(move || run(conn, receiver, &stats, &hook))
        .map_err(|_| StoreError::Invalid("cannot start the writer thread"))?;
    Ok(jobs)
}

fn run(
    mut conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    stats: &BatchStats,
    hook: &DeliveryHook,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let closing = batch
            .iter()
            .position(|job| matches!(job, Job::Close(_)))
            .map(|at| batch.drain(at..).collect::<Vec<_>>());
        if !batch.is_empty() {
            let results = commit_batch(&mut conn, &batch);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .requests
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            if let Some(observe) = stats.observer.get() {
                observe(batch.len());
            }
            if let Some(deliver) = hook.0.get() {
                for result in &results {
                    if let Done::Sequence(Ok(outcome)) = result {
                        deliver(&outcome.deliveries);
                    }
                }
            }
            for (job, result) in batch.drain(..).zip(results) {
                match (job, result) {
                    (Job::Sequence(_, answer), Done::Sequence(result)) => {
                        let _ = answer.send(result);
                    }
                    (Job::Ack { answer, .. }, Done::Ack(result)) => {
                        let _ = answer.send(result);
                    }
                    _ => {}
                }
            }
        }
        if let Some(rest) = closing {
            // Jobs after a Close are dropped: their callers see "the store is closed".
            drop(conn);
            for job in rest {
                if let Job::Close(answer) = job {
                    let _ = answer.send(());
                }
            }
            return;
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: &[Job]) -> Vec<Done> {
    let failed = |why: &str| -> Vec<Done> {
        batch
            .iter()
            .map(|job| match job {
                Job::Ack { .. } => Done::Ack(Err(StoreError::CommitFailed(why.to_owned()))),
                _ => Done::Sequence(Err(StoreError::CommitFailed(why.to_owned()))),
            })
            .collect()
    };
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(err) => return failed(&err.to_string()),
    };
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let done = match job {
            // Application messages and acknowledgements check everything before their
            // first write, so they refuse cleanly without a savepoint (a savepoint copies
            // every page it touches into a statement journal: a page per index per
            // message). An error after a write can only be the database failing; then
            // the whole batch is rolled back and nobody is told "accepted".
            Job::Sequence(request, _) if request.kind == EnvelopeKind::Application => {
                match sequence(&tx, request) {
                    Err(err @ StoreError::Sqlite(_)) => return failed(&err.to_string()),
                    result => Done::Sequence(result),
                }
            }
            Job::Ack { device, ids, .. } => match ack(&tx, *device, ids) {
                Err(err) => return failed(&err.to_string()),
                result => Done::Ack(result),
            },
            // Handshake messages may be refused half-way (an unknown or duplicate added
            // device): they run under a savepoint that a refusal rolls back.
            Job::Sequence(request, _) => {
                Done::Sequence(in_savepoint(&mut tx, |tx| sequence(tx, request)))
            }
            Job::Close(_) => continue,
        };
        results.push(done);
    }
    match tx.commit() {
        Ok(()) => results,
        Err(err) => failed(&err.to_string()),
    }
}

/// Runs `work` under a savepoint: kept when it succeeds, rolled back when it fails.
fn in_savepoint<T>(
    tx: &mut Transaction<'_>,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let savepoint = tx.savepoint()?;
    let result = work(&savepoint);
    match result {
        Ok(value) => {
            savepoint.commit()?;
            Ok(value)
        }
        // Dropping the savepoint rolls it back.
        Err(err) => Err(err),
    }
}

fn uuid_from(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|_| StoreError::Invalid("stored id is not 16 bytes"))
}

fn insert_message(
    tx: &Connection,
    request: &SequenceRequest,
    kind: EnvelopeKind,
    group_seq: i64,
    epoch_after: i64,
    payload: &[u8],
) -> Result<i64, StoreError> {
    let hash = Sha256::digest(payload);
    let mut insert = tx.prepare_cached(
        "INSERT INTO messages (group_id, message_id, kind, group_seq, epoch_after, payload_hash, \
         payload, server_time, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    insert.execute(params![
        request.group_id,
        request.message_id.as_bytes().as_slice(),
        kind.as_i64(),
        group_seq,
        epoch_after,
        hash.as_slice(),
        payload,
        request.now,
        request.expires_at,
    ])?;
    Ok(tx.last_insert_rowid())
}

/// Puts a message into each device's mailbox and records the deliveries.
fn deliver(
    tx: &Connection,
    row: i64,
    message: &Arc<StoredMessage>,
    devices: &[Uuid],
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let mut insert = tx.prepare_cached("INSERT INTO mailbox (device_id, message) VALUES (?, ?)")?;
    for device in devices {
        insert.execute(params![device.as_bytes().as_slice(), row])?;
        deliveries.push(Delivery {
            device: *device,
            mailbox_id: tx.last_insert_rowid() as u64,
            message: message.clone(),
        });
    }
    Ok(())
}

/// The answer a message id already got, if it was sequenced before. The same id with a
/// different payload is refused.
fn previous_answer(
    tx: &Connection,
    request: &SequenceRequest,
) -> Result<Option<SequencedResponse>, StoreError> {
    let mut select = tx.prepare_cached(
        "SELECT group_seq, epoch_after, payload_hash FROM messages \
         WHERE group_id = ? AND message_id = ? AND kind = ?",
    )?;
    let previous = select
        .query_row(
            params![
                request.group_id,
                request.message_id.as_bytes().as_slice(),
                request.kind.as_i64()
            ],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                ))
            },
        )
        .optional()?;
    let Some((group_seq, epoch, hash)) = previous else {
        return Ok(None);
    };
    if hash != Sha256::digest(&request.payload).as_slice() {
        return Err(StoreError::DuplicateMessageId);
    }
    Ok(Some(SequencedResponse {
        group_seq: group_seq as u64,
        epoch: epoch as u64,
    }))
}

/// Sequences one request inside the batch's transaction (see `Store::sequence`).
fn sequence(tx: &Connection, request: &SequenceRequest) -> Result<SequenceOutcome, StoreError> {
    let group = tx
        .prepare_cached("SELECT epoch, next_seq FROM groups WHERE group_id = ?")?
        .query_row([&request.group_id], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((epoch, group_seq)) = group else {
        return Err(StoreError::GroupNotFound);
    };

    // A resend of an accepted message answers what the first attempt got.
    if let Some(response) = previous_answer(tx, request)? {
        return Ok(SequenceOutcome {
            response,
            deliveries: Vec::new(),
        });
    }

    let members = {
        let mut select = tx.prepare_cached(
            "SELECT device_id FROM group_members WHERE group_id = ? ORDER BY device_id",
        )?;
        let rows = select.query_map([&request.group_id], |row| row.get::<_, Vec<u8>>(0))?;
        let mut members = Vec::new();
        for row in rows {
            members.push(uuid_from(&row?)?);
        }
        members
    };
    if !members.contains(&request.sender_device) {
        return Err(StoreError::NotAMember);
    }
    if request.epoch != epoch as u64 {
        return Err(StoreError::EpochConflict {
            current: epoch as u64,
        });
    }

    let recipients: Vec<Uuid> = members
        .iter()
        .copied()
        .filter(|device| *device != request.sender_device)
        .collect();
    if request.kind == EnvelopeKind::Application {
        let full: i64 = tx
            .prepare_cached(
                "SELECT COUNT(*) FROM group_members g JOIN mailbox_counts c \
                 ON c.device_id = g.device_id WHERE g.group_id = ? AND c.n >= ?",
            )?
            .query_row(
                params![
                    request.group_id,
                    i64::try_from(request.mailbox_quota).unwrap_or(i64::MAX)
                ],
                |row| row.get(0),
            )?;
        if full > 0 {
            return Err(StoreError::MailboxFull);
        }
    }
    let epoch_after = match request.kind {
        EnvelopeKind::Commit => epoch + 1,
        _ => epoch,
    };
    let row = insert_message(
        tx,
        request,
        request.kind,
        group_seq,
        epoch_after,
        &request.payload,
    )?;
    let mut deliveries = Vec::with_capacity(recipients.len());
    let message = Arc::new(StoredMessage {
        message_id: request.message_id,
        group_id: request.group_id.clone(),
        group_seq: group_seq as u64,
        kind: request.kind,
        server_time: request.now,
        payload: request.payload.clone(),
    });
    deliver(tx, row, &message, &recipients, &mut deliveries)?;

    let mut remove_member =
        tx.prepare_cached("DELETE FROM group_members WHERE group_id = ? AND device_id = ?")?;
    if request.kind == EnvelopeKind::Commit {
        // A device that already left (proposal) is no longer on the delivery list;
        // removing it again is a no-op.
        for device in &request.removed_devices {
            remove_member.execute(params![request.group_id, device.as_bytes().as_slice()])?;
        }
        if !request.added_devices.is_empty() {
            let Some(welcome) = &request.welcome else {
                return Err(StoreError::Invalid("devices are added without a Welcome"));
            };
            let mut known = tx.prepare_cached("SELECT 1 FROM devices WHERE device_id = ?")?;
            let mut add =
                tx.prepare_cached("INSERT INTO group_members (group_id, device_id) VALUES (?, ?)")?;
            for device in &request.added_devices {
                if !known.exists([device.as_bytes().as_slice()])? {
                    return Err(StoreError::UnknownDevice(*device));
                }
                match add.execute(params![request.group_id, device.as_bytes().as_slice()]) {
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                            || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
                    {
                        return Err(StoreError::Invalid("an added device is already a member"));
                    }
                    other => other?,
                };
            }
            let welcome_row = insert_message(
                tx,
                request,
                EnvelopeKind::Welcome,
                group_seq,
                epoch_after,
                welcome,
            )?;
            let welcome_message = Arc::new(StoredMessage {
                kind: EnvelopeKind::Welcome,
                payload: welcome.clone(),
                ..(*message).clone()
            });
            deliver(
                tx,
                welcome_row,
                &welcome_message,
                &request.added_devices,
                &mut deliveries,
            )?;
        }
    }
    if request.kind == EnvelopeKind::Proposal {
        for device in &request.leaving_devices {
            remove_member.execute(params![request.group_id, device.as_bytes().as_slice()])?;
        }
    }

    tx.prepare_cached("UPDATE groups SET epoch = ?, next_seq = ? WHERE group_id = ?")?
        .execute(params![epoch_after, group_seq + 1, request.group_id])?;
    Ok(SequenceOutcome {
        response: SequencedResponse {
            group_seq: group_seq as u64,
            epoch: epoch_after as u64,
        },
        deliveries,
    })
}

/// Deletes acknowledged envelopes of `device`; a message whose every recipient has it
/// loses its ciphertext (the row stays until it expires, for idempotency).
fn ack(tx: &Connection, device: Uuid, ids: &[u64]) -> Result<u64, StoreError> {
    let mut delete =
        tx.prepare_cached("DELETE FROM mailbox WHERE seq = ? AND device_id = ? RETURNING message")?;
    let mut forget = tx.prepare_cached(
        "UPDATE messages SET payload = NULL WHERE id = ?1 \
         AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message = ?1)",
    )?;
    let mut removed = 0;
    for id in ids {
        let Ok(seq) = i64::try_from(*id) else {
            continue;
        };
        let message: Option<i64> = delete
            .query_row(params![seq, device.as_bytes().as_slice()], |row| row.get(0))
            .optional()?;
        let Some(message) = message else { continue };
        removed += 1;
        forget.execute([message])?;
    }
    Ok(removed)
}
