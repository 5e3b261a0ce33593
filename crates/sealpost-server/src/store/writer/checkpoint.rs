//! WAL checkpoints, off the writer thread.
//!
//! A checkpoint copies the pages the WAL holds back into the database file and syncs it,
//! after which SQLite starts the WAL over. Left to SQLite, the connection whose commit
//! pushes the WAL past `wal_autocheckpoint` pages runs it inside that commit: on the
//! writer thread, where it stalls every send and acknowledgement behind it for as long as
//! copying a few thousand pages and an `fsync` of the database take (tens of
//! milliseconds on a virtual disk) — the worst latencies of the relay benchmarks.
//!
//! This thread has its own connection and runs a `PASSIVE` checkpoint every [`INTERVAL`]
//! (and, four times a second, tells the writer to sweep, see [`spawn`]): a passive
//! checkpoint copies what was committed when it began and takes no lock that a writer
//! waits for, so commits go on while it runs. A checkpoint with nothing new to copy returns
//! at once, so an idle server does almost no work here (0.2% of a core, measured). The writer's
//! own `wal_autocheckpoint` stays as a backstop ([`super::BACKSTOP_PAGES`]), reached only
//! when this thread falls far behind (a saturated core, a stalled disk).
//!
//! A passive checkpoint alone never lets the WAL start over while commits keep coming:
//! SQLite restarts the WAL only at a commit that finds every frame copied back, and the
//! writer always adds frames while this thread copies. Measured at full load, the WAL then
//! grew by ~80 MB a second until the backstop checkpointed a whole second of frames on the
//! writer thread every ~3 s (p99 latency at half load 24-30 ms). So when a pass leaves a
//! long WAL ([`RESTART_FRAMES`]), this thread copies what came in meanwhile with more,
//! shorter passes, syncs the database file, and raises a flag
//! ([`Checkpointer::take_restart`]); the writer, between two batches, copies back the few
//! frames committed since the last pass, and its next commit starts the WAL over. That
//! costs the writer a short copy and three small syncs per interval under load (1–3 ms
//! measured at 15,000 messages a second), instead of a long stall every few seconds, and
//! keeps the WAL (and the page cache it occupies) small.
//!
//! Durability is unchanged: SQLite syncs the WAL before it copies anything back, and
//! what this connection reads is only committed data.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::mpsc::WeakSender;

use super::Job;
use crate::store::StoreError;

/// Time between checkpoints.
/// Twenty a second. Each pass copies back what was committed since the one before and
/// SQLite syncs the database file after a pass that copies everything, so the shorter the
/// interval, the shorter the burst of copying and of database writes on the shared core and
/// disk, at the cost of copying a page that changes often more than once. At 250 ms those
/// bursts were most of the p99 latency at partial load: the durability thread's WAL
/// flushes, about one a millisecond otherwise, stopped for 4–9 ms around each pass (those
/// during its database sync took 5 ms instead of 0.9). Against 250 ms, p99 at 21,400 msg/s
/// (ten pairs) fell from a median of 10.8 ms to 6.7 ms over nine runs each; at full load
/// the checkpoint thread takes ~2% more of the core (docs/BENCHMARKS-LOG.md, section 2).
/// Against one a second, 250 ms had taken p99 at half load from 17–29 ms to 12 ms.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// How often the checkpoint thread nudges the writer to sweep delivered ciphertexts
/// (see [`spawn`]): four times a second, as when that was the checkpoint interval.
const SWEEP_NUDGE_EVERY: Duration = Duration::from_millis(250);

/// WAL frames after a pass beyond which the writer is asked to finish the checkpoint (8
/// MiB of 8 KiB pages; a busy server writes that in about a tenth of a second).
pub const RESTART_FRAMES: i64 = 1_024;

/// New frames a pass may find without another pass following (see [`copy_back`]).
pub const TAIL_FRAMES: i64 = 32;

/// Most passes in a row before the writer is asked to finish anyway.
pub const MAX_PASSES: usize = 6;

/// The running checkpoint thread; [`Checkpointer::stop`] ends it (dropping it does too,
/// without waiting).
pub(super) struct Checkpointer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
    restart: Arc<AtomicBool>,
}

impl Checkpointer {
    /// True once after a pass that left the WAL longer than [`RESTART_FRAMES`]: the
    /// writer should then run [`checkpoint`] itself, between batches, so that its next
    /// commit starts the WAL over.
    pub(super) fn take_restart(&self) -> bool {
        self.restart.load(Ordering::Relaxed) && self.restart.swap(false, Ordering::AcqRel)
    }

    /// Stops the thread and waits until its connection is closed.
    pub(super) fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Opens the checkpoint connection on the database at `path` and starts its thread. After
/// each checkpoint it also nudges the writer to sweep delivered ciphertexts
/// ([`super::sweep`]), which an idle writer would not otherwise get round to; it holds the
/// writer's queue only weakly, so a store nobody holds still shuts down.
pub(super) fn spawn(path: &Path, writer: WeakSender<Job>) -> Result<Checkpointer, StoreError> {
    let conn = Connection::open(path)?;
    // The checkpoint syncs the WAL before copying and the database after; it never waits
    // for the writer (passive), but SQLite's own locks may be held a moment by another
    // connection's checkpoint.
    conn.busy_timeout(Duration::from_secs(1))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // This connection writes nothing, so it never checkpoints on its own.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    let db = File::open(path)
        .map_err(|err| StoreError::CommitFailed(format!("opening the database failed: {err}")))?;
    let (stop, stopped) = std::sync::mpsc::channel();
    let restart = Arc::new(AtomicBool::new(false));
    let flag = restart.clone();
    let thread = std::thread::Builder::new()
        .name("sealpost-checkpoint".into())
        .spawn(move || run(&conn, &db, &stopped, &writer, &flag))
        .map_err(|_| StoreError::Invalid("cannot start the checkpoint thread"))?;
    Ok(Checkpointer {
        stop,
        thread,
        restart,
    })
}

fn run(
    conn: &Connection,
    db: &File,
    stop: &Receiver<()>,
    writer: &WeakSender<Job>,
    restart: &AtomicBool,
) {
    let mut nudged = Instant::now();
    loop {
        match stop.recv_timeout(INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        match copy_back(conn, db) {
            Ok((frames, _)) if frames >= RESTART_FRAMES => restart.store(true, Ordering::Release),
            Ok(_) => {}
            // The next attempt (or the writer's backstop) catches up; nothing is lost.
            Err(err) => tracing::warn!(error = %err, "WAL checkpoint failed"),
        }
        let Some(writer) = writer.upgrade() else {
            return;
        };
        if nudged.elapsed() >= SWEEP_NUDGE_EVERY {
            nudged = Instant::now();
            // A full queue means the writer is busy, and it sweeps after every batch anyway.
            let _ = writer.try_send(Job::Sweep(None));
        }
    }
}

/// Runs a passive checkpoint and, when the WAL is long enough for the writer to be asked
/// to finish it, prepares that finish so it is short: the writer does it between two
/// batches, while every send waits. Measured at half load (docs/BENCHMARKS-LOG.md, section 2)
/// a pass took tens of milliseconds on the busy core, so what was committed meanwhile
/// was hundreds of pages, and SQLite syncs the database file only at the end of a
/// checkpoint that copies everything: the writer copied those pages and synced every
/// page of the interval, a 10–20 ms stall four times a second. So:
///
/// - more passes follow while the last one found more than [`TAIL_FRAMES`] new frames
///   (each copies what was committed during the one before, so they shrink quickly; at
///   most [`MAX_PASSES`], so a writer faster than the disk is not chased forever);
/// - then this thread syncs the database file (`db`), so the writer's sync flushes only
///   the pages of its own short copy. An extra sync is always safe.
///
/// Returns what the last pass returned.
fn copy_back(conn: &Connection, db: &File) -> Result<(i64, i64), StoreError> {
    passes_then_sync(
        || Ok(checkpoint(conn)?),
        || {
            db.sync_data().map_err(|err| {
                StoreError::CommitFailed(format!("syncing the database failed: {err}"))
            })
        },
    )
}

/// [`copy_back`]'s policy over any pass (which returns the WAL's frames and how many are
/// copied back) and any sync of the database file.
fn passes_then_sync(
    mut pass: impl FnMut() -> Result<(i64, i64), StoreError>,
    sync: impl FnOnce() -> Result<(), StoreError>,
) -> Result<(i64, i64), StoreError> {
    let (mut frames, mut copied) = pass()?;
    if frames < RESTART_FRAMES {
        return Ok((frames, copied));
    }
    let mut passes = 1;
    while passes < MAX_PASSES {
        let before = frames;
        (frames, copied) = pass()?;
        passes += 1;
        // Fewer frames than before: the WAL started over in between.
        if frames < before || frames - before <= TAIL_FRAMES {
            break;
        }
    }
    sync()?;
    Ok((frames, copied))
}

/// Runs one passive checkpoint; returns the WAL's frames and how many are now copied back.
pub(super) fn checkpoint(conn: &Connection) -> Result<(i64, i64), rusqlite::Error> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get(1)?, row.get(2)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A passive checkpoint from the second connection copies the writer's commits back
    /// while the writer's connection stays open, and SQLite then restarts the WAL.
    #[test]
    fn copies_committed_pages_back_without_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute_batch("CREATE TABLE t (x BLOB); INSERT INTO t VALUES (zeroblob(100000));")
            .unwrap();
        let checkpointer = Connection::open(&path).unwrap();
        let (frames, copied) = checkpoint(&checkpointer).unwrap();
        assert!(frames > 10, "the insert filled the WAL: {frames}");
        assert_eq!(frames, copied);
        // The next commit starts the WAL over: the log is short again.
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let (frames, copied) = checkpoint(&checkpointer).unwrap();
        assert!(frames <= 3, "the WAL was not restarted: {frames} frames");
        assert_eq!(frames, copied);
        // Nothing new: nothing to do.
        assert_eq!(checkpoint(&checkpointer).unwrap(), (frames, frames));
    }

    /// A pass that leaves a long WAL raises the flag once; after the writer's own
    /// checkpoint its next commit starts the WAL over. (That the writer's checkpoint is what
    /// lets a busy writer's WAL start over is shown by the relay bench: see the WAL sizes in
    /// docs/BENCHMARKS-LOG.md.)
    #[test]
    fn asks_the_writer_to_finish_a_long_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        let page: i64 = writer
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap();
        writer
            .execute(
                "INSERT INTO t VALUES (zeroblob(?1))",
                [(RESTART_FRAMES + 100) * page],
            )
            .unwrap();
        let (jobs, _queue) = tokio::sync::mpsc::channel(1);
        let checkpointer = spawn(&path, jobs.downgrade()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !checkpointer.take_restart() {
            assert!(
                std::time::Instant::now() < deadline,
                "no restart was asked for"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!checkpointer.take_restart(), "the flag is taken once");
        let (frames, copied) = checkpoint(&writer).unwrap();
        assert_eq!(frames, copied);
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let (frames, _) = checkpoint(&writer).unwrap();
        assert!(frames <= 3, "the WAL did not start over: {frames} frames");
        checkpointer.stop();
    }

    /// Runs [`passes_then_sync`] over passes that report `wal` frames in turn (each
    /// copying everything it saw); returns its result, the passes run and the syncs.
    fn policy(wal: &[i64]) -> ((i64, i64), usize, usize) {
        let mut reports = wal.iter().copied();
        let mut passes = 0;
        let mut syncs = 0;
        let result = passes_then_sync(
            || {
                passes += 1;
                let frames = reports.next().expect("more passes than the test planned");
                Ok((frames, frames))
            },
            || {
                syncs += 1;
                Ok(())
            },
        )
        .unwrap();
        (result, passes, syncs)
    }

    /// A short WAL: one pass, and the database is not synced (the writer's own finish is
    /// not asked for, and SQLite syncs after a pass that copies everything anyway).
    #[test]
    fn a_short_wal_gets_one_pass_and_no_sync() {
        assert_eq!(
            policy(&[RESTART_FRAMES - 1]),
            ((RESTART_FRAMES - 1, RESTART_FRAMES - 1), 1, 0)
        );
    }

    /// A long WAL: passes follow while each finds more than `TAIL_FRAMES` new frames, then
    /// one sync.
    #[test]
    fn a_long_wal_gets_passes_until_the_tail_is_short_then_a_sync() {
        let long = RESTART_FRAMES + 500;
        let wal = [
            long,
            long + 200,
            long + 200 + TAIL_FRAMES + 1,
            long + 200 + 2 * TAIL_FRAMES + 1,
        ];
        assert_eq!(policy(&wal), ((wal[3], wal[3]), 4, 1));
    }

    /// A writer faster than the passes: at most `MAX_PASSES`, then the sync regardless.
    #[test]
    fn a_writer_faster_than_the_passes_is_not_chased_forever() {
        let wal: Vec<i64> = (0..MAX_PASSES as i64 + 5)
            .map(|i| RESTART_FRAMES + i * 10 * TAIL_FRAMES)
            .collect();
        let last = wal[MAX_PASSES - 1];
        assert_eq!(policy(&wal), ((last, last), MAX_PASSES, 1));
    }

    /// The WAL started over between two passes (fewer frames than before): no more passes.
    #[test]
    fn a_wal_that_started_over_ends_the_passes() {
        let wal = [RESTART_FRAMES + 900, 40, 1_000_000];
        assert_eq!(policy(&wal), ((40, 40), 2, 1));
    }

    #[test]
    fn stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "journal_mode", "WAL")
            .unwrap();
        let (writer, _jobs) = tokio::sync::mpsc::channel(1);
        // Returns (rather than hanging for a checkpoint interval or forever).
        spawn(&path, writer.downgrade()).unwrap().stop();
    }
}
