//! The group-commit writer: the hot write path of the SQLite backend.
//!
//! Sequencing messages and acknowledging envelopes are most of what a busy server writes.
//! Both run on one dedicated OS thread that owns a plain `rusqlite` connection with cached
//! prepared statements: every job waiting when the thread becomes free (up to
//! [`MAX_BATCH`]) is applied in one transaction and the transaction is committed once.
//! Group state and mailbox sizes stay in memory between batches ([`cache`]), so a message
//! costs a message row and its mailbox rows. The commit does not wait for the disk: the
//! [`durability`] thread flushes the WAL and only then answers the batch's jobs and hands
//! its envelopes to the sockets, while this thread applies the next batch. No sender is
//! told "accepted", and no envelope is sent or forgotten, before the disk has it.
//!
//! Why a thread and rusqlite rather than the async `sqlx` pool used for everything else:
//! the hot path runs several small statements per message, and `sqlx`'s SQLite driver
//! hands every statement to a worker thread and back, which costs more than the statement
//! itself. Other writes (accounts, KeyPackages, the key directory) are rare and stay on
//! `sqlx`; the two writers take turns at SQLite's write lock ([`super::write_turn`]): this
//! thread holds a turn for each of its transactions. Against other processes it waits for
//! the lock as [`lock_wait`] says.

mod cache;
mod checkpoint;
pub mod durability;
mod lock_wait;
mod message_keys;
mod sequence;
mod statements;
mod sweep;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior};
use sealpost_proto::api::EnvelopeKind;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

#[cfg(test)]
pub(crate) use self::sweep::LAG as SWEEP_LAG;
pub(crate) use self::sweep::SWEEP_STEP;
pub(crate) use self::sweep::{DEVICE_ENVELOPES, FORGET_IF_DELIVERED};

use self::cache::Cache;
use self::durability::{Committed, DurableMark};
use self::message_keys::MessageKeys;
use self::statements::Statements;
use self::sweep::{Reach, Sweeper};
use super::write_turn::WriteTurn;
use super::{Delivery, SequenceOutcome, SequenceRequest, StoreError};

/// Most jobs one transaction carries.
pub const MAX_BATCH: usize = 512;

/// WAL pages at which the writer checkpoints by itself: only when the checkpoint thread
/// ([`checkpoint`]) has fallen this far behind (about 240 MiB of 8 KiB pages; at full load
/// the WAL grows by about 80 MiB a second, and that thread restarts it four times a second).
const BACKSTOP_PAGES: i64 = 30_000;

/// Counters of the group-commit writer.
#[derive(Default)]
pub struct BatchStats {
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Requests they carried.
    pub requests: AtomicU64,
    /// WAL flushes (`fdatasync`); one may cover several batches.
    pub flushes: AtomicU64,
    /// Times this thread found the `sqlx` connection's turn under way and waited for it
    /// (`store::write_turn`), and how long in all (µs).
    pub turn_waits: AtomicU64,
    pub turn_wait_micros: AtomicU64,
    /// Called with the size of every committed batch (metrics).
    observer: std::sync::OnceLock<Box<dyn Fn(usize) + Send + Sync>>,
}

impl std::fmt::Debug for BatchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStats")
            .field("batches", &self.batches)
            .field("requests", &self.requests)
            .field("flushes", &self.flushes)
            .field("turn_waits", &self.turn_waits)
            .field("turn_wait_micros", &self.turn_wait_micros)
            .finish_non_exhaustive()
    }
}

impl BatchStats {
    /// Registers the function told the size of every committed batch (once).
    pub fn observe(&self, observer: impl Fn(usize) + Send + Sync + 'static) {
        let _ = self.observer.set(Box::new(observer));
    }
}

/// Told every durable delivery of a batch at once, in mailbox order, right after the
/// batch's jobs were answered. Called on the durability thread, so it must not block; the
/// server hands the deliveries to the devices' sockets (`Notifier::deliver`). Delivering
/// from here, rather than from each sender's task, is what keeps every device's push queue
/// in mailbox order when many senders' messages share a batch. Answering first means a
/// sender's task is woken before the recipients' sockets: its "sent" does not wait behind
/// a thousand socket writes when the group is large.
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

    /// The deliveries of a batch's answers, in order (empty when no hook is set).
    fn collect(&self, answers: &[Answer]) -> Vec<Delivery> {
        if self.0.get().is_none() {
            return Vec::new();
        }
        answers
            .iter()
            .filter_map(|answer| match answer {
                Answer::Sequence(_, Ok(outcome)) => Some(outcome.deliveries.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn deliver(&self, deliveries: &[Delivery]) {
        if let Some(deliver) = self.0.get()
            && !deliveries.is_empty()
        {
            deliver(deliveries);
        }
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
        /// `None` for a quiet acknowledgement: nobody waits for it.
        answer: Option<oneshot::Sender<Result<u64, StoreError>>>,
    },
    /// Finish the jobs before this one, close the connection and stop.
    Close(oneshot::Sender<()>),
    /// Drop the ciphertexts of delivered messages ([`sweep`]): `None` is the periodic
    /// tick, which sweeps what is due; `Some` sweeps everything now and answers.
    Sweep(Option<oneshot::Sender<Result<u64, StoreError>>>),
}

/// What one job produced inside the transaction.
enum Done {
    Sequence(Result<SequenceOutcome, StoreError>),
    Ack(Result<u64, StoreError>),
}

/// A job's result with the channel it goes back on, once its batch is durable.
pub(super) enum Answer {
    Sequence(
        oneshot::Sender<Result<SequenceOutcome, StoreError>>,
        Result<SequenceOutcome, StoreError>,
    ),
    Ack(
        Option<oneshot::Sender<Result<u64, StoreError>>>,
        Result<u64, StoreError>,
    ),
}

impl Answer {
    /// Whether someone waits for this answer (all but a quiet acknowledgement).
    pub(super) fn awaited(&self) -> bool {
        !matches!(self, Self::Ack(None, _))
    }

    fn send(self) {
        match self {
            Self::Sequence(channel, result) => {
                let _ = channel.send(result);
            }
            Self::Ack(Some(channel), result) => {
                let _ = channel.send(result);
            }
            Self::Ack(None, result) => {
                if let Err(err) = result {
                    quiet_ack_lost(&err);
                }
            }
        }
    }

    /// Answers with `err` instead of the result (the batch did not become durable).
    fn fail(self, err: &StoreError) {
        let failed = || StoreError::CommitFailed(err.to_string());
        match self {
            Self::Sequence(channel, _) => {
                let _ = channel.send(Err(failed()));
            }
            Self::Ack(Some(channel), _) => {
                let _ = channel.send(Err(failed()));
            }
            Self::Ack(None, _) => quiet_ack_lost(&failed()),
        }
    }
}

/// A quiet acknowledgement was not recorded: its envelopes stay and are delivered again.
fn quiet_ack_lost(err: &StoreError) {
    tracing::warn!(error = %err, "a quiet acknowledgement was not recorded; its envelopes will be delivered again");
}

/// The WAL file of the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// What [`spawn`] hands the store.
pub(crate) struct Spawned {
    /// The writer's job queue.
    pub jobs: mpsc::Sender<Job>,
    /// The highest mailbox position known to be on disk.
    pub durable: Arc<DurableMark>,
    /// The mailbox position up to which envelopes are in the device index
    /// ([`sweep::Sweeper::indexed_mark`]).
    pub indexed: Arc<AtomicI64>,
}

/// Opens the writer's connection on an existing, migrated database and starts its thread
/// and the durability thread. `turn` is shared with the database's `sqlx` write
/// connection.
pub(crate) fn spawn(
    path: &Path,
    stats: Arc<BatchStats>,
    hook: Arc<DeliveryHook>,
    flush: durability::FlushFn,
    turn: WriteTurn,
) -> Result<Spawned, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_handler(Some(lock_wait::wait_for_lock))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Commits write the WAL without waiting for the disk; the durability thread flushes
    // it before anything is answered (see `durability`).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoints run on their own thread (`checkpoint`), not inside this thread's
    // commits; this is the backstop if that thread falls far behind.
    conn.pragma_update(None, "wal_autocheckpoint", BACKSTOP_PAGES)?;
    // Savepoints' statement journals in memory, not in temporary files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // The pages a batch touches (index right edges, mailbox and group pages) stay cached
    // instead of being read back from the WAL: 32 MiB instead of SQLite's 2 MiB.
    conn.pragma_update(None, "cache_size", -32 * 1024)?;
    conn.set_prepared_statement_cache_capacity(64);

    // What a crash left in the WAL was replayed by whoever opened the database first, but
    // may still be only in the page cache: flush it before any of it is sent.
    let wal = wal_path(path);
    if wal.exists() {
        flush(&wal)
            .map_err(|err| StoreError::CommitFailed(format!("flushing the WAL failed: {err}")))?;
    }
    let last: Option<i64> = conn
        .query_row("SELECT MAX(seq) FROM mailbox", [], |row| row.get(0))
        .optional()?
        .flatten();
    let mark = Arc::new(DurableMark::new(last.unwrap_or(0).max(0) as u64));

    let (committed, to_publish) = std::sync::mpsc::sync_channel(64);
    let (jobs, receiver) = mpsc::channel(4 * MAX_BATCH);
    {
        let mark = mark.clone();
        let stats = stats.clone();
        std::thread::Builder::new()
            .name("sealpost-durable".into())
            .spawn(move || durability::run(wal, flush, to_publish, mark, hook, stats))
            .map_err(|_| StoreError::Invalid("cannot start the durability thread"))?;
    }
    let sweeper = Sweeper::load(&conn)?;
    let indexed = sweeper.indexed_mark();
    let keys = MessageKeys::load(&conn)?;
    let checkpointer = checkpoint::spawn(path, jobs.downgrade())?;
    let writer = Writer {
        conn,
        turn,
        stats,
        committed,
        checkpointer,
        sweeper,
        keys,
    };
    std::thread::Builder::new()
        .name("sealpost-writer".into())
        .spawn(move || writer.run(receiver))
        .map_err(|_| StoreError::Invalid("cannot start the writer thread"))?;
    Ok(Spawned {
        jobs,
        durable: mark,
        indexed,
    })
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    /// Held for each transaction on `conn`.
    turn: WriteTurn,
    stats: Arc<BatchStats>,
    committed: std::sync::mpsc::SyncSender<Committed>,
    checkpointer: checkpoint::Checkpointer,
    sweeper: Sweeper,
    /// Idempotency keys of the newest messages, and their runs into the table.
    keys: MessageKeys,
}

impl Writer {
    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut cache = Cache::default();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = jobs.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // Usually none: the batch is not copied and nothing is allocated for them.
            let sweeps: Vec<Job> = batch
                .extract_if(.., |job| matches!(job, Job::Sweep(_)))
                .collect();
            let closing = batch
                .iter()
                .position(|job| matches!(job, Job::Close(_)))
                .map(|at| batch.drain(at..).collect::<Vec<_>>());
            let size = batch.len();
            if size > 0 {
                let swept = self.sweeper.cursor();
                let turn = self.take_turn();
                let published = commit_batch(
                    &mut self.conn,
                    &mut cache,
                    &mut self.keys,
                    std::mem::take(&mut batch),
                    swept,
                );
                drop(turn);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .requests
                    .fetch_add(size as u64, Ordering::Relaxed);
                if let Some(observe) = self.stats.observer.get() {
                    observe(size);
                }
                if self.committed.send(published).is_err() {
                    // The durability thread is gone; callers see "the store is closed".
                    return;
                }
                // Hand the core over before taking the next batch. When the server shares
                // a core, the socket tasks have usually been waiting while this thread
                // applied the batch; without this they wait for the scheduler's tick
                // (4 ms on a HZ=250 kernel), which was the tail of the latency at half
                // load (docs/BENCHMARKS-LOG.md, section 2). With a core to itself this is a
                // system call that returns at once, once per batch.
                std::thread::yield_now();
            }
            // A busy writer sweeps a step after each batch, at least as many ids as the
            // batch could have added; an idle one catches up until jobs come.
            let mut swept = self.sweep(sweeps, Reach::AtMost(SWEEP_STEP + size as i64));
            while swept
                && (self.sweeper.behind() || self.keys.behind(std::time::Instant::now()))
                && jobs.is_empty()
            {
                swept = self.sweep(Vec::new(), Reach::AtMost(SWEEP_STEP));
            }
            if self.checkpointer.take_restart() {
                self.finish_checkpoint();
            }
            if let Some(rest) = closing {
                self.close(rest);
                return;
            }
        }
    }

    /// Takes the turn at the write lock for one transaction, counting the waits.
    fn take_turn(&self) -> super::write_turn::Turn {
        let (turn, waited) = self.turn.take_blocking();
        if let Some(waited) = waited {
            self.stats.turn_waits.fetch_add(1, Ordering::Relaxed);
            let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
            self.stats
                .turn_wait_micros
                .fetch_add(micros, Ordering::Relaxed);
        }
        turn
    }

    /// Runs the sweep after a batch or on a tick, and answers the jobs that forced one
    /// (those sweep everything due at once). Returns false if it failed.
    fn sweep(&mut self, jobs: Vec<Job>, reach: Reach) -> bool {
        let answers: Vec<_> = jobs
            .into_iter()
            .filter_map(|job| match job {
                Job::Sweep(answer) => answer,
                _ => None,
            })
            .collect();
        let reach = if answers.is_empty() {
            reach
        } else {
            Reach::All
        };
        let turn = self.take_turn();
        let result = self.sweeper.run(&mut self.conn, reach);
        let keyed = match reach {
            Reach::All => self.keys.step(&mut self.conn, 0, true),
            Reach::AtMost(ids) => {
                let at_least = usize::try_from(ids).unwrap_or(0);
                self.keys.step(&mut self.conn, at_least, false)
            }
        };
        drop(turn);
        if let Err(err) = &result {
            // The next sweep covers the range again; nothing is lost.
            tracing::warn!(error = %err, "sweeping delivered ciphertexts failed");
        }
        if let Err(err) = &keyed {
            // The keys stay in memory and the next step writes them; nothing is lost.
            tracing::warn!(error = %err, "writing idempotency keys failed");
        }
        let result = match (result, keyed) {
            (Ok(dropped), Ok(_)) => Ok(dropped),
            (Err(err), _) | (_, Err(err)) => Err(err),
        };
        for answer in answers {
            let _ = answer.send(match &result {
                Ok(dropped) => Ok(*dropped),
                Err(err) => Err(StoreError::CommitFailed(err.to_string())),
            });
        }
        result.is_ok()
    }

    /// Copies back what the checkpoint thread's last pass left (see [`checkpoint`]), so
    /// that the next commit starts the WAL over instead of making it longer.
    fn finish_checkpoint(&self) {
        let _turn = self.take_turn();
        if let Err(err) = checkpoint::checkpoint(&self.conn) {
            // The checkpoint thread's next pass asks again; nothing is lost.
            tracing::warn!(error = %err, "finishing a WAL checkpoint failed");
        }
    }

    /// Waits until everything before is published, then closes the connection.
    fn close(self, rest: Vec<Job>) {
        let (done, published) = std::sync::mpsc::sync_channel(1);
        if self.committed.send(Committed::Close(done)).is_ok() {
            let _ = published.recv();
        }
        self.checkpointer.stop();
        drop(self.conn);
        // Jobs after a Close are dropped: their callers see "the store is closed".
        for job in rest {
            if let Job::Close(answer) = job {
                let _ = answer.send(());
            }
        }
    }
}

/// Applies a batch in one transaction and commits it (without waiting for the disk).
fn commit_batch(
    conn: &mut Connection,
    cache: &mut Cache,
    keys: &mut MessageKeys,
    mut batch: Vec<Job>,
    swept: i64,
) -> Committed {
    let outcome = apply(conn, cache, keys, &mut batch, swept);
    let (results, wrote) = match outcome {
        Ok(results) => {
            keys.committed();
            (Ok(results), true)
        }
        Err(err) => {
            cache.clear();
            keys.rolled_back();
            (Err(err), false)
        }
    };
    let mut answers = Vec::with_capacity(batch.len());
    let mut last_position = None;
    match results {
        Ok(results) => {
            for (job, done) in batch.into_iter().zip(results) {
                match (job, done) {
                    (Job::Sequence(_, channel), Done::Sequence(result)) => {
                        if let Ok(outcome) = &result
                            && let Some(last) =
                                outcome.deliveries.iter().map(|d| d.mailbox_id).max()
                        {
                            last_position = Some(last_position.unwrap_or(0).max(last));
                        }
                        answers.push(Answer::Sequence(channel, result));
                    }
                    (Job::Ack { answer, .. }, Done::Ack(result)) => {
                        answers.push(Answer::Ack(answer, result));
                    }
                    _ => {}
                }
            }
        }
        Err(err) => {
            let failed = || StoreError::CommitFailed(err.to_string());
            for job in batch {
                match job {
                    Job::Sequence(_, channel) => {
                        answers.push(Answer::Sequence(channel, Err(failed())));
                    }
                    Job::Ack { answer, .. } => answers.push(Answer::Ack(answer, Err(failed()))),
                    Job::Close(_) | Job::Sweep(_) => {}
                }
            }
        }
    }
    Committed::Batch {
        answers,
        last_position,
        wrote,
    }
}

/// Runs every job of the batch in one transaction. `Err` means the transaction failed as
/// a whole: nothing of it was kept and every job gets the error.
/// `swept` is the sweep's cursor (see [`sweep`]).
fn apply(
    conn: &mut Connection,
    cache: &mut Cache,
    keys: &mut MessageKeys,
    batch: &mut [Job],
    swept: i64,
) -> Result<Vec<Done>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    cache.begin(&tx)?;
    let mut statements = Statements::new(&tx);
    let mut results = Vec::with_capacity(batch.len());
    for job in batch.iter_mut() {
        let done = match job {
            // Application messages and acknowledgements check everything before their
            // first write, so they refuse cleanly without a savepoint (a savepoint copies
            // every page it touches into a statement journal: a page per index per
            // message). An error after a write can only be the database failing; then
            // the whole batch is rolled back and nobody is told "accepted".
            Job::Sequence(request, _) if request.kind == EnvelopeKind::Application => {
                match sequence::sequence(&mut statements, cache, keys, request) {
                    Err(err @ StoreError::Sqlite(_)) => return Err(err),
                    result => Done::Sequence(result),
                }
            }
            Job::Ack { device, ids, .. } => Done::Ack(Ok(sequence::ack(
                &mut statements,
                cache,
                *device,
                ids,
                swept,
            )?)),
            // Handshake messages may be refused half-way (an unknown or duplicate added
            // device): they run under a savepoint that a refusal rolls back, and the
            // cache forgets what they changed. (The savepoint is SQL rather than
            // `Transaction::savepoint`, which would need the transaction exclusively while
            // the batch's statements hold it.)
            Job::Sequence(request, _) => {
                cache.start_undo();
                keys.start_savepoint();
                tx.execute_batch("SAVEPOINT handshake")?;
                match sequence::sequence(&mut statements, cache, keys, request) {
                    Ok(outcome) => {
                        tx.execute_batch("RELEASE handshake")?;
                        cache.keep();
                        keys.release_savepoint();
                        Done::Sequence(Ok(outcome))
                    }
                    Err(err) => {
                        tx.execute_batch("ROLLBACK TO handshake; RELEASE handshake")?;
                        cache.undo();
                        keys.roll_back_savepoint();
                        Done::Sequence(Err(err))
                    }
                }
            }
            Job::Close(_) | Job::Sweep(_) => continue,
        };
        results.push(done);
    }
    drop(statements);
    cache.flush(&tx)?;
    tx.commit()?;
    Ok(results)
}
