//! Turns at SQLite's write lock between the SQLite backend's two writers.
//!
//! The backend writes through two connections: the group-commit writer thread (messages,
//! acknowledgements, sweeps; [`super::writer`]) and the `sqlx` connection (accounts,
//! devices, KeyPackages, links, the key directory). SQLite lets one connection at a time
//! hold the write lock, and one that finds it taken sleeps and tries again: the writer
//! thread polls every 250 µs, but the `sqlx` connection can only use SQLite's own
//! back-off (1, 2, 5, 10, 15, 20 ms ... between tries). Against a writer thread that
//! holds the lock most of the time on a busy server, the `sqlx` side lost try after try: a
//! write that asked every 50 ms during a full-load relay waited p99 432 ms and up to
//! 1.1 s (docs/BENCHMARKS-LOG.md, section 2).
//!
//! So the two take turns inside the process before they touch the lock: a first-come,
//! first-served mutex ([`WriteTurn`]) that the writer thread holds for each of its
//! transactions and a `sqlx` caller for as long as it has the `sqlx` connection
//! ([`SqlxWriter`] hands the connection out only with a turn). Neither ever finds the lock
//! held by the other, so neither sleeps through a back-off step: a `sqlx` write waits for
//! the turns asked for before its own (at most one of them the writer's), and the writer
//! likewise. While a `sqlx` turn lasts the writer waits; that costs most where a `sqlx`
//! commit must sync a WAL full of the writer's unflushed frames (counted in
//! [`super::writer::BatchStats`], measured in docs/BENCHMARKS-LOG.md).
//! SQLite's lock and the busy handlers still settle contention with other processes and
//! with the checkpoint connection.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// How every write transaction on the `sqlx` connection begins. `IMMEDIATE` takes the
/// write lock at once; a deferred transaction that read first would fail with "database is
/// locked" instead of waiting whenever someone else committed in between.
pub(crate) const WRITE_TRANSACTION: &str = "BEGIN IMMEDIATE";

/// The right to use SQLite's write lock next, shared by the two writers of one database.
/// Waiters are served in the order they asked.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteTurn(Arc<Mutex<()>>);

/// Held for as long as one writer's turn lasts.
pub(crate) type Turn = OwnedMutexGuard<()>;

impl WriteTurn {
    /// Waits for the turn (async callers).
    pub(crate) async fn take(&self) -> Turn {
        self.0.clone().lock_owned().await
    }

    /// Waits for the turn on a thread of its own (the group-commit writer), and says how
    /// long it waited (`None`: the turn was free). Must not be called from async code: it
    /// blocks the thread.
    pub(crate) fn take_blocking(&self) -> (Turn, Option<Duration>) {
        match self.0.clone().try_lock_owned() {
            Ok(turn) => (turn, None),
            Err(_) => {
                let asked = Instant::now();
                let turn = self.0.clone().blocking_lock_owned();
                (turn, Some(asked.elapsed()))
            }
        }
    }
}

/// The `sqlx` write connection (a one-connection pool), handed out only with a turn.
#[derive(Clone, Debug)]
pub struct SqlxWriter {
    pool: SqlitePool,
    turn: WriteTurn,
}

impl SqlxWriter {
    /// `pool` must have a single connection; `turn` is shared with the database's
    /// group-commit writer.
    pub(crate) fn new(pool: SqlitePool, turn: WriteTurn) -> Self {
        Self { pool, turn }
    }

    /// Begins a write transaction ([`WRITE_TRANSACTION`]) in a turn of its own.
    pub async fn begin(&self) -> Result<InTurn<Transaction<'static, Sqlite>>, sqlx::Error> {
        let turn = self.turn.take().await;
        let transaction = self.pool.begin_with(WRITE_TRANSACTION).await?;
        Ok(InTurn {
            connection: transaction,
            _turn: turn,
        })
    }

    /// The connection, for single statements, in a turn of its own.
    pub async fn acquire(&self) -> Result<InTurn<PoolConnection<Sqlite>>, sqlx::Error> {
        let turn = self.turn.take().await;
        let connection = self.pool.acquire().await?;
        Ok(InTurn {
            connection,
            _turn: turn,
        })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The `sqlx` connection (or a transaction on it) during a turn; the turn ends when this
/// is dropped (after the connection goes back, so a transaction dropped without commit
/// has its rollback queued before the other writer may go).
pub struct InTurn<C> {
    connection: C,
    _turn: Turn,
}

impl<C: DerefMut<Target = SqliteConnection>> Deref for InTurn<C> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.connection
    }
}

impl<C: DerefMut<Target = SqliteConnection>> DerefMut for InTurn<C> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.connection
    }
}

impl InTurn<Transaction<'static, Sqlite>> {
    /// Commits, then ends the turn.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.connection.commit().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_blocking_taker_waits_for_an_async_holder_and_then_goes() {
        let turn = WriteTurn::default();
        let held = turn.take().await;
        let went = Arc::new(AtomicBool::new(false));
        let thread = {
            let (turn, went) = (turn.clone(), went.clone());
            std::thread::spawn(move || {
                let (_turn, waited) = turn.take_blocking();
                went.store(true, Ordering::SeqCst);
                waited
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!went.load(Ordering::SeqCst), "went while the turn was held");
        drop(held);
        let waited = thread.join().unwrap().expect("the wait is reported");
        assert!(
            waited >= Duration::from_millis(50),
            "waited only {waited:?}"
        );
        assert!(went.load(Ordering::SeqCst));
        // And the turn is free again, at once.
        drop(turn.take().await);
        assert!(turn.take_blocking().1.is_none());
    }
}
