//! Making committed batches durable, off the writer thread.
//!
//! The writer commits each batch with `synchronous=NORMAL`: SQLite has written the batch's
//! WAL frames when the commit returns, but has not waited for the disk. This thread then
//! calls `fdatasync` on the WAL file, and only after that returns does it publish the
//! batch: it raises the [`DurableMark`], answers the batch's requests and hands the new
//! envelopes to the sockets. Meanwhile the writer already applies the next batch, so
//! the CPU work of one batch overlaps the disk flush of the one before, and one flush
//! covers every batch committed while the previous flush was under way.
//!
//! Why this is as durable as `synchronous=FULL`:
//! - A batch is published only after an `fdatasync` of the WAL that *began* after its
//!   commit returned; `fdatasync` flushes every write made to the file before it began,
//!   through any descriptor. SQLite itself syncs the WAL before every checkpoint, so a
//!   frame never leaves the WAL unsynced.
//! - Batches are published in commit order. A crash loses a suffix of the WAL, and a
//!   batch's frames follow those of every batch before it, so a published batch can only
//!   be lost together with everything after it — none of which was published.
//! - Readers see mailbox entries only up to the [`DurableMark`] (`SqliteStore` adds it to
//!   every mailbox read), so an envelope that a crash could still take back is never
//!   sent to anyone, and no answer depends on one.
//!
//! A batch of quiet acknowledgements alone (nobody waits for it, see `Job::Ack`) is not
//! flushed by itself: its frames are in the WAL before those of every later batch, so the
//! next flush covers them. A crash before then takes the acknowledgements back and those
//! envelopes are delivered again, which is what a quiet acknowledgement allows. At low
//! load a message often cost two flushes (one for it, one for its acknowledgement); this
//! saves the second whenever the acknowledgement comes back alone.
//!
//! If `fdatasync` fails, the batch's requests get an error and nothing is delivered; what
//! the batch committed reaches clients later only if a later flush succeeds (the mark then
//! covers it), and a sender that retries gets the first answer (idempotency).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use super::{Answer, BatchStats, DeliveryHook};
use crate::store::StoreError;

/// The highest mailbox position known to be on disk. Mailbox reads stop there.
#[derive(Debug, Default)]
pub struct DurableMark(AtomicU64);

impl DurableMark {
    pub fn new(position: u64) -> Self {
        Self(AtomicU64::new(position))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn raise(&self, position: u64) {
        self.0.fetch_max(position, Ordering::AcqRel);
    }
}

/// What the writer hands over after each commit.
pub(super) enum Committed {
    /// A batch: the answers, in job order, and the highest mailbox position it wrote.
    Batch {
        answers: Vec<Answer>,
        last_position: Option<u64>,
        /// False when the transaction failed: nothing to flush, only errors to send.
        wrote: bool,
    },
    /// Everything before this is published; tell the writer.
    Close(SyncSender<()>),
}

/// Makes the WAL durable; [`sync_wal`] except in tests that hold or fail flushes.
pub type FlushFn = Arc<dyn Fn(&std::path::Path) -> std::io::Result<()> + Send + Sync>;

/// Flushes the WAL at `wal`.
pub fn sync_wal(wal: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(wal)?.sync_data()
}

pub(super) fn run(
    wal: PathBuf,
    flush: FlushFn,
    committed: Receiver<Committed>,
    mark: Arc<DurableMark>,
    hook: Arc<DeliveryHook>,
    stats: Arc<BatchStats>,
) {
    let mut pending = Vec::new();
    while let Ok(first) = committed.recv() {
        pending.push(first);
        pending.extend(committed.try_iter());
        // Only a batch someone waits for (a send, a confirmed acknowledgement) must be
        // flushed before it is published.
        let needs_flush = pending.iter().any(|c| match c {
            Committed::Batch {
                wrote: true,
                answers,
                ..
            } => answers.iter().any(Answer::awaited),
            _ => false,
        });
        // Opened for each flush: the file is SQLite's, and a descriptor kept open across
        // a WAL reset would still name the same file, but reopening costs a few
        // microseconds per flush and depends on nothing.
        let synced = if needs_flush {
            stats.flushes.fetch_add(1, Ordering::Relaxed);
            flush(&wal).map_err(|err| {
                tracing::error!(error = %err, "fdatasync of the WAL failed");
                StoreError::CommitFailed(format!("flushing the WAL failed: {err}"))
            })
        } else {
            Ok(())
        };
        for item in pending.drain(..) {
            match item {
                Committed::Batch {
                    answers,
                    last_position,
                    wrote,
                } => publish(answers, last_position, wrote, &synced, &mark, &hook),
                Committed::Close(done) => {
                    let _ = done.send(());
                    return;
                }
            }
        }
    }
}

fn publish(
    answers: Vec<Answer>,
    last_position: Option<u64>,
    wrote: bool,
    synced: &Result<(), StoreError>,
    mark: &DurableMark,
    hook: &DeliveryHook,
) {
    if let (true, Err(err)) = (wrote, synced) {
        for answer in answers {
            answer.fail(err);
        }
        return;
    }
    if let Some(position) = last_position {
        mark.raise(position);
    }
    let deliveries = hook.collect(&answers);
    for answer in answers {
        answer.send();
    }
    hook.deliver(&deliveries);
}
