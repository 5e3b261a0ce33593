//! The writer's work a few seconds behind the messages: dropping the ciphertexts of
//! delivered messages in ranges rather than one by one, and indexing the envelopes that
//! still wait.
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
//!
//! The same pass indexes envelopes by device. Nearly every envelope is acknowledged within
//! milliseconds, so it is stored unindexed (`mailbox.indexed` 0) and only the ones still
//! there [`INDEX_LAG`] later get `indexed` set, which puts them into the partial index
//! `mailbox_by_device`; the positions up to `mailbox_indexed` in `counters` have been
//! through this. An index entry per envelope, written and deleted again at once, cost the
//! writer about a tenth of its time and of the bytes it writes (a page of the index per
//! device in every batch; docs/BENCHMARKS.md). Readers of a device's envelopes ([`DEVICE_ENVELOPES`]) take the
//! indexed ones from the index and scan the positions after `mailbox_indexed`, so that
//! scan is kept short: at most [`MAX_UNINDEXED`] positions behind the newest, whatever
//! their age. A device back after a short absence reads its envelopes by position and
//! acknowledges them without their ever having been indexed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use crate::store::StoreError;

/// How long after a message is stored its range is swept: long enough that nearly every
/// online recipient has acknowledged it, so that nearly every row of a range goes at once.
pub const LAG: Duration = Duration::from_secs(2);

/// How long after an envelope is stored it is indexed by device if it is still there.
/// Longer than [`LAG`]: a device that reconnects within this reads and acknowledges its
/// envelopes without their being indexed.
pub const INDEX_LAG: Duration = Duration::from_secs(10);

/// Mailbox positions that may stay unindexed behind the newest one, whatever their age:
/// a read of a device's envelopes scans at most the ones of these still there.
pub const MAX_UNINDEXED: i64 = 20_000;

/// How often the newest message id and mailbox position are noted as future bounds.
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

/// Positions of a device's envelopes (`?1`: the device id), as a compound `SELECT` of
/// `seq` and `message`: the indexed ones from `mailbox_by_device`, then the newer ones,
/// unindexed, by position from `mailbox_indexed` on. The two parts never overlap: the
/// sweep sets `indexed` on every envelope up to that position in the transaction that
/// moves it.
pub(crate) const DEVICE_ENVELOPES: &str = "SELECT seq, message FROM mailbox \
     WHERE device_id = ?1 AND indexed = 1 \
     UNION ALL SELECT seq, message FROM mailbox \
     WHERE seq > COALESCE((SELECT value FROM counters WHERE name = 'mailbox_indexed'), 0) \
       AND device_id = ?1";

/// Envelopes a sweep indexes at most (it indexes a range of positions; those already
/// acknowledged are gone and cost nothing). A busy writer sweeps after every batch, so this
/// bounds the stall of one sweep after a burst to offline devices, not the rate.
pub const INDEX_STEP: i64 = 1024;

/// Drops the ciphertexts of the messages in an id range whose envelopes are all gone.
const SWEEP_RANGE: &str = "DELETE FROM payloads WHERE id > ?1 AND id <= ?2 AND NOT EXISTS \
     (SELECT 1 FROM messages m JOIN mailbox b ON b.seq BETWEEN m.first_seq AND m.last_seq \
      WHERE m.id = payloads.id)";

/// The writer's sweep state.
#[derive(Debug)]
pub(super) struct Sweeper {
    /// Messages up to this id have been swept.
    cursor: i64,
    /// Envelopes up to this mailbox position have been indexed (if still there).
    indexed: i64,
    /// `indexed`, published for readers once committed ([`Sweeper::indexed_mark`]).
    published: Arc<AtomicI64>,
    /// Message ids, due for the sweep [`LAG`] after they were noted.
    messages: Lagging,
    /// Mailbox positions, due for indexing [`INDEX_LAG`] after they were noted.
    positions: Lagging,
}

/// A value noted every [`MARK_EVERY`], and the newest noted at least `lag` ago.
#[derive(Debug)]
struct Lagging {
    lag: Duration,
    /// (when, the value then), oldest first.
    marks: VecDeque<(Instant, i64)>,
    /// The newest value noted at least `lag` ago (or made due otherwise).
    due: i64,
}

impl Lagging {
    fn new(lag: Duration, due: i64) -> Self {
        Self {
            lag,
            marks: VecDeque::new(),
            due,
        }
    }

    /// Whether the value should be noted now.
    fn wants_mark(&self, now: Instant) -> bool {
        self.marks
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= MARK_EVERY)
    }

    /// Notes `value` (if any) at `now`, and makes due what was noted `lag` ago.
    fn advance(&mut self, now: Instant, value: Option<i64>) {
        if let Some(value) = value {
            self.marks.push_back((now, value));
        }
        while let Some(&(at, value)) = self.marks.front() {
            if now.duration_since(at) < self.lag {
                break;
            }
            self.due = self.due.max(value);
            self.marks.pop_front();
        }
    }

    /// Makes everything up to `value` due now and forgets the marks.
    fn make_all_due(&mut self, value: i64) {
        self.due = self.due.max(value);
        self.marks.clear();
    }

    /// Makes everything up to `value` due now (the marks stay).
    fn make_due(&mut self, value: i64) {
        self.due = self.due.max(value);
    }
}

/// The newest message id and the last mailbox position handed out, at one moment.
#[derive(Debug, Clone, Copy)]
struct Newest {
    message: i64,
    position: i64,
}

impl Newest {
    fn read(conn: &Connection) -> Result<Self, StoreError> {
        Ok(conn.query_row(
            "SELECT (SELECT COALESCE(MAX(id), 0) FROM messages), \
                 COALESCE((SELECT value FROM counters WHERE name = 'mailbox_seq'), 0)",
            [],
            |row| {
                Ok(Self {
                    message: row.get(0)?,
                    position: row.get(1)?,
                })
            },
        )?)
    }
}

/// A counter's value, 0 if it was never written.
pub(super) fn counter(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM counters WHERE name = ?", [name], |row| {
            row.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

pub(super) const SET_COUNTER: &str = "INSERT INTO counters (name, value) VALUES (?, ?) \
     ON CONFLICT(name) DO UPDATE SET value = excluded.value";

impl Sweeper {
    /// Reads the cursors (the writer's connection, before its first batch).
    pub fn load(conn: &Connection) -> Result<Self, StoreError> {
        let cursor = counter(conn, "payloads_swept")?;
        let indexed = counter(conn, "mailbox_indexed")?;
        Ok(Self {
            cursor,
            indexed,
            published: Arc::new(AtomicI64::new(indexed)),
            messages: Lagging::new(LAG, cursor),
            positions: Lagging::new(INDEX_LAG, indexed),
        })
    }

    /// Messages up to this id were swept: an acknowledgement of one of them must drop its
    /// ciphertext itself if it was the last envelope.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// The mailbox position up to which every envelope is indexed, as last committed: a
    /// reader that loads it before its query knows that its snapshot has every envelope up
    /// to there in the device index (it may have more).
    pub fn indexed_mark(&self) -> Arc<AtomicI64> {
        self.published.clone()
    }

    /// True while messages or envelopes are due that have not been swept or indexed.
    pub fn behind(&self) -> bool {
        self.messages.due > self.cursor || self.positions.due > self.indexed
    }

    /// Called after every commit and on every tick: notes the newest message id and
    /// mailbox position now and then, sweeps towards the newest id noted at least [`LAG`]
    /// ago and indexes towards the newest position noted at least [`INDEX_LAG`] ago (or
    /// [`MAX_UNINDEXED`] behind the newest), as far as `reach` allows. Returns the
    /// ciphertexts dropped.
    pub fn run(&mut self, conn: &mut Connection, reach: Reach) -> Result<u64, StoreError> {
        let now = Instant::now();
        if reach == Reach::All {
            let newest = Newest::read(conn)?;
            self.messages.make_all_due(newest.message);
            self.positions.make_all_due(newest.position);
        } else {
            let newest = if self.messages.wants_mark(now) {
                Some(Newest::read(conn)?)
            } else {
                None
            };
            self.messages.advance(now, newest.map(|n| n.message));
            self.positions.advance(now, newest.map(|n| n.position));
            if let Some(newest) = newest {
                self.positions.make_due(newest.position - MAX_UNINDEXED);
            }
        }
        let upto = match reach {
            Reach::All => self.messages.due,
            Reach::AtMost(ids) => self
                .messages
                .due
                .min(self.cursor.saturating_add(ids.max(1))),
        };
        let due_position = self.positions.due;
        if upto <= self.cursor && due_position <= self.indexed {
            return Ok(0);
        }
        // Its own transaction, committed without waiting for the disk: if a crash takes it
        // back, the cursors go back with it and the ranges are swept and indexed again.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut dropped = 0;
        if upto > self.cursor {
            dropped = tx
                .prepare_cached(SWEEP_RANGE)?
                .execute(params![self.cursor, upto])?;
            tx.prepare_cached(SET_COUNTER)?
                .execute(params!["payloads_swept", upto])?;
        }
        let indexed = if due_position > self.indexed {
            let indexed = index_waiting(&tx, self.indexed, due_position, reach)?;
            tx.prepare_cached(SET_COUNTER)?
                .execute(params!["mailbox_indexed", indexed])?;
            indexed
        } else {
            self.indexed
        };
        tx.commit()?;
        self.cursor = self.cursor.max(upto);
        self.indexed = indexed;
        self.published.store(indexed, Ordering::Release);
        Ok(dropped as u64)
    }
}

/// Indexes the envelopes at positions above `from` and up to `due`, at most
/// [`INDEX_STEP`] of them unless `reach` is [`Reach::All`]; returns the position up to
/// which every envelope is now indexed.
fn index_waiting(tx: &Connection, from: i64, due: i64, reach: Reach) -> Result<i64, StoreError> {
    let upto = match reach {
        Reach::All => due,
        // The position of the last envelope one step covers, if the range holds more.
        Reach::AtMost(_) => tx
            .prepare_cached(
                "SELECT seq FROM mailbox WHERE seq > ?1 AND seq <= ?2 \
                 ORDER BY seq LIMIT 1 OFFSET ?3",
            )?
            .query_row(params![from, due, INDEX_STEP - 1], |row| row.get(0))
            .optional()?
            .unwrap_or(due),
    };
    tx.prepare_cached("UPDATE mailbox SET indexed = 1 WHERE seq > ?1 AND seq <= ?2")?
        .execute(params![from, upto])?;
    Ok(upto)
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
                 message INTEGER NOT NULL, indexed INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX mailbox_by_device ON mailbox(device_id, seq) WHERE indexed = 1;
             CREATE TABLE payloads (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);
             CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
             INSERT INTO messages VALUES (1, 1, 1), (2, 2, 3);
             INSERT INTO payloads VALUES (1, x'aa'), (2, x'bb');
             INSERT INTO mailbox (seq, device_id, message) VALUES (3, x'01', 2);
             INSERT INTO counters VALUES ('mailbox_seq', 3);",
        )
        .unwrap();
        conn
    }

    /// Every row `sql` selects with `params`, as `row` reads it.
    fn rows<T>(
        conn: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Vec<T> {
        let mut select = conn.prepare(sql).unwrap();
        select
            .query_map(params, row)
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn payloads(conn: &Connection) -> Vec<i64> {
        rows(conn, "SELECT id FROM payloads ORDER BY id", [], |row| {
            row.get(0)
        })
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
        assert_eq!(sweeper.messages.marks.len(), 1);

        // The note ages past `LAG`.
        let aged = Instant::now()
            .checked_sub(LAG + Duration::from_secs(1))
            .unwrap();
        sweeper.messages.marks[0].0 = aged;
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
        sweeper.messages.marks[0].0 = Instant::now()
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

    /// (position, indexed) of every envelope, in position order.
    fn envelopes(conn: &Connection) -> Vec<(i64, bool)> {
        rows(
            conn,
            "SELECT seq, indexed FROM mailbox ORDER BY seq",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
    }

    /// Positions of device `device`'s envelopes as [`DEVICE_ENVELOPES`] reads them.
    fn device_envelopes(conn: &Connection, device: u8) -> Vec<i64> {
        rows(
            conn,
            &format!("SELECT seq FROM ({DEVICE_ENVELOPES}) ORDER BY seq"),
            [[device].as_slice()],
            |row| row.get(0),
        )
    }

    /// Envelopes still there `INDEX_LAG` after they were stored are indexed, at most
    /// `INDEX_STEP` per call; acknowledged ones cost nothing, later ones stay unindexed,
    /// the position is kept across a restart, and a device's envelopes read the same
    /// before, during and after.
    #[test]
    fn indexes_the_envelopes_still_waiting_once_due_in_steps() {
        let mut conn = database();
        // Positions 4..=3003 for device 2 (message 2, as far as the test cares), of which
        // all but every hundredth were acknowledged; 3004..=3053 for device 1.
        conn.execute_batch(
            "WITH RECURSIVE n(seq) AS (SELECT 4 UNION ALL SELECT seq + 1 FROM n WHERE seq < 3003)
             INSERT INTO mailbox (seq, device_id, message) SELECT seq, x'02', 2 FROM n
                 WHERE seq % 100 = 0;
             WITH RECURSIVE n(seq) AS (SELECT 3004 UNION ALL SELECT seq + 1 FROM n WHERE seq < 3053)
             INSERT INTO mailbox (seq, device_id, message) SELECT seq, x'01', 2 FROM n;
             UPDATE counters SET value = 3053 WHERE name = 'mailbox_seq';",
        )
        .unwrap();
        let device_1: Vec<i64> = std::iter::once(3).chain(3004..=3053).collect();
        let device_2: Vec<i64> = (100..=3000).step_by(100).collect();
        let mut sweeper = Sweeper::load(&conn).unwrap();
        sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap();
        assert!(
            envelopes(&conn).iter().all(|(_, indexed)| !indexed),
            "not due yet"
        );
        assert_eq!(device_envelopes(&conn, 1), device_1);

        // Noted at 3,053, then more envelopes come.
        conn.execute_batch(
            "WITH RECURSIVE n(seq) AS (SELECT 3054 UNION ALL SELECT seq + 1 FROM n WHERE seq < 4200)
             INSERT INTO mailbox (seq, device_id, message) SELECT seq, x'01', 2 FROM n;
             UPDATE counters SET value = 4200 WHERE name = 'mailbox_seq';",
        )
        .unwrap();
        let device_1: Vec<i64> = std::iter::once(3).chain(3004..=4200).collect();
        sweeper.positions.marks[0].0 = Instant::now()
            .checked_sub(INDEX_LAG + Duration::from_secs(1))
            .unwrap();
        sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap();
        // 1 + 30 + 50 envelopes up to 3,053: fewer than a step, so all of them.
        let indexed: Vec<i64> = envelopes(&conn)
            .into_iter()
            .filter(|(_, indexed)| *indexed)
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(indexed.len(), 81);
        assert_eq!(indexed.last(), Some(&3053));
        assert_eq!(Sweeper::load(&conn).unwrap().indexed, 3053);
        assert_eq!(device_envelopes(&conn, 1), device_1);
        assert_eq!(device_envelopes(&conn, 2), device_2);
        assert!(!sweeper.behind());

        // The rest, 1,147 envelopes, is due at once: a step of `INDEX_STEP`, then the rest.
        sweeper.positions.marks.clear();
        sweeper
            .positions
            .marks
            .push_back((Instant::now().checked_sub(INDEX_LAG * 2).unwrap(), 4200));
        sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap();
        assert_eq!(sweeper.indexed, 3053 + INDEX_STEP);
        assert!(sweeper.behind());
        assert_eq!(device_envelopes(&conn, 1), device_1);
        sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap();
        assert_eq!(sweeper.indexed, 4200);
        assert!(envelopes(&conn).iter().all(|(_, indexed)| *indexed));
        assert_eq!(device_envelopes(&conn, 1), device_1);
        assert_eq!(device_envelopes(&conn, 2), device_2);
        assert_eq!(Sweeper::load(&conn).unwrap().indexed, 4200);
    }

    /// However young, envelopes more than `MAX_UNINDEXED` positions behind the newest are
    /// indexed, so that a read's scan of the unindexed ones stays short.
    #[test]
    fn indexes_envelopes_far_behind_the_newest_at_once() {
        let mut conn = database();
        let newest = MAX_UNINDEXED + 500;
        conn.execute_batch(&format!(
            "WITH RECURSIVE n(seq) AS (SELECT 4 UNION ALL SELECT seq + 1 FROM n WHERE seq < 600)
             INSERT INTO mailbox (seq, device_id, message) SELECT seq, x'01', 2 FROM n;
             INSERT INTO mailbox (seq, device_id, message) VALUES ({newest}, x'01', 2);
             UPDATE counters SET value = {newest} WHERE name = 'mailbox_seq';"
        ))
        .unwrap();
        let mut sweeper = Sweeper::load(&conn).unwrap();
        sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap();
        assert_eq!(sweeper.indexed, 500);
        let indexed: Vec<i64> = envelopes(&conn)
            .into_iter()
            .filter(|(_, indexed)| *indexed)
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(indexed, (3..=500).collect::<Vec<_>>());
        // The rest waits for its age, as before.
        sweeper.run(&mut conn, Reach::AtMost(SWEEP_STEP)).unwrap();
        assert_eq!(sweeper.indexed, 500);
        assert_eq!(
            device_envelopes(&conn, 1),
            (3..=600).chain([newest]).collect::<Vec<_>>()
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
