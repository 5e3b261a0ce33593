//! Dropping the ciphertexts of delivered messages, in ranges rather than one by one.
//!
//! A message's ciphertext (a row of `payloads`) is kept while any of its envelopes is in a
//! mailbox, and not after: the server should hold no more than it must. Dropping it the
//! moment the last envelope is acknowledged cost a page write per acknowledgement, because
//! acknowledgements come in no order that matches where the rows lie. So an
//! acknowledgement only deletes its mailbox row, and this sweep, [`LAG`] behind, deletes
//! the ciphertexts of a whole range of message ids at once: every message of the range
//! whose envelopes are all gone. The rows of a range lie together, so each page of
//! ciphertexts is rewritten once per sweep (or emptied), not once per acknowledgement.
//!
//! Messages up to the sweep's cursor (kept in `counters` as `payloads_swept`) were swept
//! already; one that still had an envelope then (a device was offline) loses its
//! ciphertext when that envelope goes ([`forget_if_delivered`], called for every
//! acknowledgement behind the cursor and for every removed device's envelope).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use crate::store::StoreError;

/// How long after a message is stored its range is swept: long enough that nearly every
/// online recipient has acknowledged it, so that nearly every row of a range goes at once.
pub const LAG: Duration = Duration::from_secs(2);

/// How often the newest message id is noted as a future sweep bound.
const MARK_EVERY: Duration = Duration::from_millis(100);

/// Message ids one sweep covers at least (the writer adds the size of the batch before,
/// so that it keeps pace with any load). The writer sweeps after every batch, so a busy
/// writer takes what is due in steps about this size instead of a whole [`MARK_EVERY`] of
/// messages at once: at 25,000 messages a second that was ~2,500 rows in one transaction,
/// a stall of several milliseconds for every send ten times a second, which was most of
/// the p99 latency at half load (docs/BENCHMARKS-LOG.md, section 2).
pub const SWEEP_STEP: i64 = 256;

/// How far one call of [`Sweeper::run`] sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// What is due, at most this many message ids past the cursor.
    AtMost(i64),
    /// Every message there is, due or not, in one go (tests and forced sweeps).
    All,
}

/// Drops a message's ciphertext if none of its envelopes is left.
pub(crate) const FORGET_IF_DELIVERED: &str = "DELETE FROM payloads WHERE id = ?1 AND NOT EXISTS \
     (SELECT 1 FROM messages m JOIN mailbox b ON b.seq BETWEEN m.first_seq AND m.last_seq \
      WHERE m.id = ?1)";

/// Drops the ciphertexts of the messages in an id range whose envelopes are all gone.
const SWEEP_RANGE: &str = "DELETE FROM payloads WHERE id > ?1 AND id <= ?2 AND NOT EXISTS \
     (SELECT 1 FROM messages m JOIN mailbox b ON b.seq BETWEEN m.first_seq AND m.last_seq \
      WHERE m.id = payloads.id)";

/// The writer's sweep state.
#[derive(Debug)]
pub(super) struct Sweeper {
    /// Messages up to this id have been swept.
    cursor: i64,
    /// (when, the newest message id then), oldest first.
    marks: VecDeque<(Instant, i64)>,
    /// Messages up to this id are due (their mark is [`LAG`] old).
    due: i64,
}

impl Sweeper {
    /// Reads the cursor (the writer's connection, before its first batch).
    pub fn load(conn: &Connection) -> Result<Self, StoreError> {
        let cursor: Option<i64> = conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'payloads_swept'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        let cursor = cursor.unwrap_or(0);
        Ok(Self {
            cursor,
            marks: VecDeque::new(),
            due: cursor,
        })
    }

    /// Messages up to this id were swept: an acknowledgement of one of them must drop its
    /// ciphertext itself if it was the last envelope.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// True while messages are due that have not been swept.
    pub fn behind(&self) -> bool {
        self.due > self.cursor
    }

    /// Called after every commit and on every tick: notes the newest message id now and
    /// then, and sweeps towards the newest one noted at least [`LAG`] ago, as far as
    /// `reach` allows. Returns the ciphertexts dropped.
    pub fn run(&mut self, conn: &mut Connection, reach: Reach) -> Result<u64, StoreError> {
        let now = Instant::now();
        let newest = || -> Result<i64, StoreError> {
            Ok(
                conn.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |row| {
                    row.get(0)
                })?,
            )
        };
        if reach == Reach::All {
            self.due = self.due.max(newest()?);
            self.marks.clear();
        } else {
            if self
                .marks
                .back()
                .is_none_or(|(at, _)| now.duration_since(*at) >= MARK_EVERY)
            {
                let id = newest()?;
                self.marks.push_back((now, id));
            }
            while let Some(&(at, id)) = self.marks.front() {
                if now.duration_since(at) < LAG {
                    break;
                }
                self.due = self.due.max(id);
                self.marks.pop_front();
            }
        }
        let upto = match reach {
            Reach::All => self.due,
            Reach::AtMost(ids) => self.due.min(self.cursor.saturating_add(ids.max(1))),
        };
        if upto <= self.cursor {
            return Ok(0);
        }
        // Its own transaction, committed without waiting for the disk: if a crash takes it
        // back, the cursor goes back with it and the range is swept again.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let dropped = tx
            .prepare_cached(SWEEP_RANGE)?
            .execute(params![self.cursor, upto])?;
        tx.prepare_cached(
            "INSERT INTO counters (name, value) VALUES ('payloads_swept', ?) \
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        )?
        .execute([upto])?;
        tx.commit()?;
        self.cursor = upto;
        Ok(dropped as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables the sweep reads and writes, as the migrations leave them (the columns
    /// it uses).
    fn database() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, \
                 last_seq INTEGER NOT NULL);
             CREATE TABLE mailbox (seq INTEGER PRIMARY KEY, device_id BLOB NOT NULL, \
                 message INTEGER NOT NULL);
             CREATE TABLE payloads (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);
             CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
             INSERT INTO messages VALUES (1, 1, 1), (2, 2, 3);
             INSERT INTO payloads VALUES (1, x'aa'), (2, x'bb');
             INSERT INTO mailbox VALUES (3, x'01', 2);",
        )
        .unwrap();
        conn
    }

    fn payloads(conn: &Connection) -> Vec<i64> {
        let mut select = conn.prepare("SELECT id FROM payloads ORDER BY id").unwrap();
        select
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// A range is swept only once it is `LAG` old; then every message of it with no
    /// envelope left loses its ciphertext, and the cursor is kept across a restart.
    #[test]
    fn sweeps_a_range_once_it_is_old_enough() {
        let mut conn = database();
        let mut sweeper = Sweeper::load(&conn).unwrap();
        assert_eq!(sweeper.cursor(), 0);
        // Notes the newest id (2), but that is not yet `LAG` old.
        assert_eq!(
            sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap(),
            0
        );
        assert_eq!(payloads(&conn), vec![1, 2]);
        assert_eq!(sweeper.marks.len(), 1);

        // The note ages past `LAG`.
        let aged = Instant::now()
            .checked_sub(LAG + Duration::from_secs(1))
            .unwrap();
        sweeper.marks[0].0 = aged;
        assert_eq!(
            sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap(),
            1
        );
        // Message 2 still has an envelope at position 3.
        assert_eq!(payloads(&conn), vec![2]);
        assert_eq!(sweeper.cursor(), 2);
        assert_eq!(Sweeper::load(&conn).unwrap().cursor(), 2);

        // Behind the cursor, the last envelope's removal is what drops it.
        conn.execute("DELETE FROM mailbox WHERE seq = 3", [])
            .unwrap();
        assert_eq!(sweeper.run(&mut conn, Reach::All).unwrap(), 0);
        assert_eq!(payloads(&conn), vec![2]);
        conn.execute(FORGET_IF_DELIVERED, [2]).unwrap();
        assert!(payloads(&conn).is_empty());
    }

    /// A long due range is swept in steps of `SWEEP_STEP` ids, one per call, and
    /// `Reach::All` takes the rest at once.
    #[test]
    fn sweeps_a_long_range_in_steps() {
        let mut conn = database();
        conn.execute_batch(
            "WITH RECURSIVE n(id) AS (SELECT 3 UNION ALL SELECT id + 1 FROM n WHERE id < 1000)
             INSERT INTO messages SELECT id, 10 + id, 10 + id FROM n;
             INSERT INTO payloads SELECT id, x'cc' FROM messages WHERE id >= 3;",
        )
        .unwrap();
        let mut sweeper = Sweeper::load(&conn).unwrap();
        assert_eq!(
            sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap(),
            0,
            "not due yet"
        );
        sweeper.marks[0].0 = Instant::now()
            .checked_sub(LAG + Duration::from_secs(1))
            .unwrap();
        // Ids 1..=256: message 2 keeps its ciphertext (an envelope is left).
        assert_eq!(
            sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap(),
            255
        );
        assert_eq!(sweeper.cursor(), SWEEP_STEP);
        assert_eq!(
            sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap(),
            256
        );
        assert_eq!(sweeper.cursor(), 2 * SWEEP_STEP);
        assert!(sweeper.behind());
        assert_eq!(Sweeper::load(&conn).unwrap().cursor(), 2 * SWEEP_STEP);
        assert_eq!(sweeper.run(&mut conn, Reach::All).unwrap(), 1000 - 512);
        assert_eq!(sweeper.cursor(), 1000);
        assert_eq!(payloads(&conn), vec![2]);
        assert!(!sweeper.behind());
        assert_eq!(
            sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap(),
            0,
            "nothing left"
        );
    }

    /// While an envelope is left, the late path keeps the ciphertext.
    #[test]
    fn forget_if_delivered_keeps_what_is_still_waiting() {
        let conn = database();
        assert_eq!(conn.execute(FORGET_IF_DELIVERED, [2]).unwrap(), 0);
        assert_eq!(conn.execute(FORGET_IF_DELIVERED, [1]).unwrap(), 1);
        assert_eq!(payloads(&conn), vec![2]);
    }
}
