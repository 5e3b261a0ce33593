//! Idempotency keys: which (message id, group, kind) the writer has sequenced, so that a
//! resent message gets the answer its first attempt got instead of being stored twice.
//!
//! Clients make message ids (UUIDv7, from their own clocks), and a batch carries the
//! sends of many clients, whose ids lie far apart in any order of the keys. A unique
//! index on the keys, updated as each message is stored, therefore rewrote a page of the
//! index for nearly every sender in every batch: a third of the bytes the server wrote
//! (docs/BENCHMARKS.md). Instead:
//!
//! - The keys of the newest messages are kept in memory ([`MessageKeys`]), by row id of
//!   their `messages` row; a send looks there first, then in the table.
//! - The table `message_keys`, ordered by key, receives them in runs: every message above
//!   `counters.messages_keyed` once [`RUN_SIZE`] of them are waiting or the oldest has
//!   waited [`KEY_LAG`]. A run is sorted before it is written, so consecutive inserts
//!   land on the same pages, and it is written in steps of [`KEY_STEP`] keys after the
//!   writer's batches, in transactions of its own; the last step moves the counter and
//!   only then are the run's keys dropped from memory.
//! - A group keeps the highest message id it has sequenced (`groups.highest_message_id`,
//!   in the writer's cache): a send with a higher id cannot be a resend and is not looked
//!   up at all. A sender's UUIDv7 ids rise, so most sends are not.
//! - After a crash, the keys above the counter are read back from `messages` when the
//!   writer starts; a run cut short is written again (keys already there are skipped).
//! - Expiry deletes a message's row and its key; a key whose row is gone answers nothing,
//!   and a key whose row went while it waited in memory (another connection committed:
//!   `PRAGMA data_version` changed) is not written.
//!
//! Message row ids are handed out here, one above the highest ever used, so that the
//! rows above the counter are exactly the messages stored since the last run, even after
//! expiry emptied the table.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use uuid::Uuid;

use super::cache::data_version;
use super::statements::Statements;
use super::sweep::{SET_COUNTER, counter};
use crate::store::StoreError;

/// Keys waiting in memory at which a run starts.
pub const RUN_SIZE: i64 = 16_384;

/// How long the oldest key waits in memory at most before a run starts (a quiet server
/// writes them anyway).
pub const KEY_LAG: Duration = Duration::from_secs(10);

/// Keys one step writes at least (the writer adds the size of the batch before, so that
/// runs keep pace with any load while no step stalls the next batch for long).
pub const KEY_STEP: usize = 1_024;

/// Keys one insert statement carries: a statement per key cost more in starting and
/// finishing the statement than in the B-tree.
const KEYS_PER_INSERT: usize = 64;

/// A message's key as the lookup map holds it: the group is checked on the row.
type RecentKey = (Uuid, i64);

/// The row ids of the recent messages with one (message id, kind): nearly always one.
#[derive(Debug)]
enum Rows {
    One(i64),
    Many(Vec<i64>),
}

impl Rows {
    fn push(&mut self, row: i64) {
        let mut all: Vec<i64> = self.iter().collect();
        all.push(row);
        *self = Self::Many(all);
    }

    /// Keeps the row ids `keep` accepts; false if none is left.
    fn retain(&mut self, keep: impl Fn(i64) -> bool) -> bool {
        let left: Vec<i64> = self.iter().filter(|row| keep(*row)).collect();
        match left.as_slice() {
            [] => return false,
            [one] => *self = Self::One(*one),
            _ => *self = Self::Many(left),
        }
        true
    }

    fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        let (one, many) = match self {
            Self::One(row) => (Some(*row), &[][..]),
            Self::Many(rows) => (None, rows.as_slice()),
        };
        one.into_iter().chain(many.iter().copied())
    }
}

/// What a message sequenced before answers a resend with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Previous {
    pub group_seq: i64,
    pub epoch_after: i64,
    pub payload_hash: Vec<u8>,
}

/// A key as the table holds it, with its message's row id; ordered as the table is
/// (`Uuid` orders by its bytes, as SQLite orders the blob).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct StoredKey {
    message_id: Uuid,
    group_id: String,
    kind: i64,
    row: i64,
}

/// Keys being written to the table: every message above the counter up to `upto`, sorted.
#[derive(Debug)]
struct Run {
    upto: i64,
    keys: Vec<StoredKey>,
    written: usize,
}

/// The writer's idempotency keys (see the module documentation).
#[derive(Debug)]
pub(super) struct MessageKeys {
    /// Every key in memory, for lookups.
    recent: HashMap<RecentKey, Rows>,
    /// The keys above the counter that no run has taken yet, in row order.
    waiting: Vec<StoredKey>,
    /// How many of `waiting` were there when the transaction under way began, and when
    /// its savepoint under way began: a failed transaction or a rolled back savepoint
    /// takes the keys after that out again.
    before_transaction: usize,
    before_savepoint: Option<usize>,
    /// Every message up to this row id has its key in the table (`messages_keyed`).
    keyed: i64,
    /// The highest message row id handed out.
    last_row: i64,
    /// When the oldest key in `waiting` was added.
    waiting_since: Option<Instant>,
    run: Option<Run>,
    /// `PRAGMA data_version` when every key in memory was last known to have its row: a
    /// commit by another connection (expiry) may have deleted some since.
    data_version: i64,
    /// Keys a step writes at least ([`KEY_STEP`]; tests take smaller steps).
    step_keys: usize,
}

const FIND_BY_ROW: &str = "SELECT group_id, group_seq, epoch_after, payload_hash FROM messages \
     WHERE id = ?";

/// The key's message, if it is in the table and its row is still there.
pub(super) const FIND_KEY: &str = "SELECT m.group_seq, m.epoch_after, m.payload_hash \
     FROM message_keys k JOIN messages m ON m.id = k.message \
     WHERE k.message_id = ?1 AND k.group_id = ?2 AND k.kind = ?3";

/// Whether a message row is still there.
const MESSAGE_EXISTS: &str = "SELECT 1 FROM messages WHERE id = ?";

/// [`insert_keys`] for a whole chunk, made once (the last chunk of a step is shorter).
static INSERT_FULL_CHUNK: LazyLock<String> = LazyLock::new(|| insert_keys(KEYS_PER_INSERT));

/// Inserts `n` keys; one that is there already was written by a run that a crash cut
/// short. (`INSERT ... SELECT` or `OR REPLACE` would make SQLite keep a statement
/// journal, a copy of every page the insert touches: that tripled the cost of a key.)
fn insert_keys(n: usize) -> String {
    let rows = vec!["(?, ?, ?, ?)"; n].join(", ");
    format!(
        "INSERT INTO message_keys (message_id, group_id, kind, message) VALUES {rows} \
         ON CONFLICT DO NOTHING"
    )
}

impl MessageKeys {
    /// Reads the counter and the keys above it (the writer's connection, before its
    /// first batch).
    pub fn load(conn: &Connection) -> Result<Self, StoreError> {
        let keyed = counter(conn, "messages_keyed")?;
        let highest: i64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |row| {
                row.get(0)
            })?;
        let mut keys = Self {
            recent: HashMap::new(),
            waiting: Vec::new(),
            before_transaction: 0,
            before_savepoint: None,
            keyed,
            last_row: highest.max(keyed),
            waiting_since: None,
            run: None,
            data_version: data_version(conn)?,
            step_keys: KEY_STEP,
        };
        let mut select = conn.prepare(
            "SELECT id, message_id, group_id, kind FROM messages WHERE id > ? ORDER BY id",
        )?;
        let mut rows = select.query([keyed])?;
        while let Some(row) = rows.next()? {
            let message_id = Uuid::from_slice(&row.get::<_, Vec<u8>>(1)?)
                .map_err(|_| StoreError::Invalid("stored message id is not 16 bytes"))?;
            keys.remember(StoredKey {
                message_id,
                group_id: row.get(2)?,
                kind: row.get(3)?,
                row: row.get(0)?,
            });
        }
        keys.before_transaction = keys.waiting.len();
        Ok(keys)
    }

    /// The row id for the next message row.
    pub fn next_row(&mut self) -> i64 {
        self.last_row += 1;
        self.last_row
    }

    /// Keys in memory.
    #[cfg(test)]
    pub fn in_memory(&self) -> usize {
        self.recent.values().map(|rows| rows.iter().count()).sum()
    }

    /// The message that took this key, if any.
    pub fn find(
        &self,
        statements: &mut Statements<'_>,
        message_id: Uuid,
        group_id: &str,
        kind: i64,
    ) -> Result<Option<Previous>, StoreError> {
        if let Some(rows) = self.recent.get(&(message_id, kind)) {
            let mut by_row = statements.conn().prepare_cached(FIND_BY_ROW)?;
            for row in rows.iter() {
                let found = by_row
                    .query_row([row], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            Previous {
                                group_seq: row.get(1)?,
                                epoch_after: row.get(2)?,
                                payload_hash: row.get(3)?,
                            },
                        ))
                    })
                    .optional()?;
                if let Some((group, previous)) = found
                    && group == group_id
                {
                    return Ok(Some(previous));
                }
            }
        }
        Ok(statements
            .find_key()?
            .query_row(
                params![message_id.as_bytes().as_slice(), group_id, kind],
                |row| {
                    Ok(Previous {
                        group_seq: row.get(0)?,
                        epoch_after: row.get(1)?,
                        payload_hash: row.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Records the key of a message row just inserted by the transaction under way.
    pub fn add(&mut self, message_id: Uuid, group_id: &str, kind: i64, row: i64) {
        self.remember(StoredKey {
            message_id,
            group_id: group_id.to_owned(),
            kind,
            row,
        });
    }

    fn remember(&mut self, key: StoredKey) {
        match self.recent.get_mut(&(key.message_id, key.kind)) {
            None => {
                self.recent
                    .insert((key.message_id, key.kind), Rows::One(key.row));
            }
            Some(rows) => rows.push(key.row),
        }
        self.waiting.push(key);
        self.waiting_since.get_or_insert_with(Instant::now);
    }

    /// Takes the waiting keys from `from` on out of memory.
    fn forget_waiting(&mut self, from: usize) {
        let gone: Vec<StoredKey> = self.waiting.drain(from.min(self.waiting.len())..).collect();
        for key in gone {
            let id = (key.message_id, key.kind);
            if let Some(rows) = self.recent.get_mut(&id)
                && !rows.retain(|row| row != key.row)
            {
                self.recent.remove(&id);
            }
        }
        if self.waiting.is_empty() {
            self.waiting_since = None;
        }
    }

    /// A job runs under a savepoint from here.
    pub fn start_savepoint(&mut self) {
        self.before_savepoint = Some(self.waiting.len());
    }

    /// The savepointed job succeeded.
    pub fn release_savepoint(&mut self) {
        self.before_savepoint = None;
    }

    /// The savepointed job was rolled back: its keys go.
    pub fn roll_back_savepoint(&mut self) {
        let from = self.before_savepoint.take().unwrap_or(self.waiting.len());
        self.forget_waiting(from);
    }

    /// The transaction committed: its keys stay.
    pub fn committed(&mut self) {
        self.before_transaction = self.waiting.len();
        self.before_savepoint = None;
    }

    /// The transaction failed as a whole: none of its keys stays.
    pub fn rolled_back(&mut self) {
        self.forget_waiting(self.before_transaction);
        self.before_savepoint = None;
    }

    /// True while a run is under way or due.
    pub fn behind(&self, now: Instant) -> bool {
        self.run.is_some() || self.due(now)
    }

    fn due(&self, now: Instant) -> bool {
        self.last_row > self.keyed
            && (self.last_row - self.keyed >= RUN_SIZE
                || self
                    .waiting_since
                    .is_some_and(|since| now.duration_since(since) >= KEY_LAG))
    }

    /// Writes the next step of the run under way, starting one if it is due, in a
    /// transaction of its own after the writer's batch; `all` writes every key there is,
    /// due or not. Returns the keys written.
    pub fn step(
        &mut self,
        conn: &mut Connection,
        at_least: usize,
        all: bool,
    ) -> Result<usize, StoreError> {
        if !all {
            return self.write_step(conn, at_least, false);
        }
        let mut written = 0;
        while self.run.is_some() || self.last_row > self.keyed {
            written += self.write_step(conn, 0, true)?;
        }
        Ok(written)
    }

    fn write_step(
        &mut self,
        conn: &mut Connection,
        at_least: usize,
        all: bool,
    ) -> Result<usize, StoreError> {
        if self.run.is_none() {
            if !(self.due(Instant::now()) || (all && self.last_row > self.keyed)) {
                return Ok(0);
            }
            // Every waiting key is committed (steps run between the writer's batches).
            let mut keys = std::mem::take(&mut self.waiting);
            keys.sort_unstable();
            self.run = Some(Run {
                upto: self.last_row,
                keys,
                written: 0,
            });
            self.before_transaction = 0;
            self.waiting_since = None;
        }
        let Some(run) = &mut self.run else {
            return Ok(0);
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = data_version(&tx)?;
        let checked = version != self.data_version;
        if checked {
            // Another connection committed: keys whose message expired meanwhile are not
            // written (expiry deletes only the keys it finds in the table). The waiting
            // ones are checked too, so that the version seen holds for every key.
            let mut exists = tx.prepare_cached(MESSAGE_EXISTS)?;
            let unwritten: Vec<StoredKey> = run.keys.drain(run.written..).collect();
            for key in unwritten {
                if exists.exists([key.row])? {
                    run.keys.push(key);
                }
            }
            let waiting = std::mem::take(&mut self.waiting);
            for key in waiting {
                if exists.exists([key.row])? {
                    self.waiting.push(key);
                }
            }
            self.before_transaction = self.waiting.len();
        }
        let end = if all {
            run.keys.len()
        } else {
            (run.written + at_least.max(self.step_keys)).min(run.keys.len())
        };
        for chunk in run.keys[run.written..end].chunks(KEYS_PER_INSERT) {
            let mut insert = if chunk.len() == KEYS_PER_INSERT {
                tx.prepare_cached(&INSERT_FULL_CHUNK)?
            } else {
                tx.prepare_cached(&insert_keys(chunk.len()))?
            };
            let mut at = 1;
            for key in chunk {
                insert.raw_bind_parameter(at, key.message_id.as_bytes().as_slice())?;
                insert.raw_bind_parameter(at + 1, key.group_id.as_str())?;
                insert.raw_bind_parameter(at + 2, key.kind)?;
                insert.raw_bind_parameter(at + 3, key.row)?;
                at += 4;
            }
            insert.raw_execute()?;
        }
        let finished = end == run.keys.len();
        if finished {
            tx.prepare_cached(SET_COUNTER)?
                .execute(params!["messages_keyed", run.upto])?;
        }
        tx.commit()?;
        // Only what committed counts: a failed step is written again next time.
        if checked {
            self.data_version = version;
        }
        let written = end - run.written;
        run.written = end;
        if finished {
            let upto = run.upto;
            // Every key up to the run's end leaves memory, also those whose message
            // expired before the run was written.
            self.recent.retain(|_, rows| rows.retain(|row| row > upto));
            self.keyed = upto;
            self.run = None;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The tables the keys live in, as the migrations leave them, in a file that
    /// [`expiry`] opens too.
    fn database() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, group_id TEXT NOT NULL, \
                 message_id BLOB NOT NULL, kind INTEGER NOT NULL, group_seq INTEGER NOT NULL, \
                 epoch_after INTEGER NOT NULL, payload_hash BLOB NOT NULL, \
                 first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, \
                 server_time INTEGER NOT NULL, expires_at INTEGER NOT NULL) STRICT;
             CREATE TABLE message_keys (message_id BLOB NOT NULL, group_id TEXT NOT NULL, \
                 kind INTEGER NOT NULL, message INTEGER NOT NULL, \
                 PRIMARY KEY (message_id, group_id, kind)) STRICT, WITHOUT ROWID;
             CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);",
        )
        .unwrap();
        (dir, conn)
    }

    /// Another connection to the database, as expiry has (its commits change the
    /// writer's `PRAGMA data_version`).
    fn expiry(dir: &tempfile::TempDir) -> Connection {
        Connection::open(dir.path().join("t.db")).unwrap()
    }

    /// Stores a message row as the sequencer does (in the transaction under way, if any)
    /// and records its key; `group_seq` tells the messages apart.
    fn store(
        conn: &Connection,
        keys: &mut MessageKeys,
        id: Uuid,
        group: &str,
        kind: i64,
        group_seq: i64,
    ) {
        let row = keys.next_row();
        conn.execute(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, 1, x'aa', 1, 0, 0, 0)",
            params![row, group, id.as_bytes().as_slice(), kind, group_seq],
        )
        .unwrap();
        keys.add(id, group, kind, row);
    }

    /// Stores `n` messages with new ids in group "g" (their `group_seq` is their index)
    /// and commits; returns the ids.
    fn store_committed(conn: &Connection, keys: &mut MessageKeys, n: usize) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        for (seq, id) in ids.iter().enumerate() {
            store(conn, keys, *id, "g", 4, seq as i64);
        }
        keys.committed();
        ids
    }

    fn find(
        conn: &Connection,
        keys: &MessageKeys,
        id: Uuid,
        group: &str,
        kind: i64,
    ) -> Option<i64> {
        let mut statements = Statements::new(conn);
        keys.find(&mut statements, id, group, kind)
            .unwrap()
            .map(|previous| previous.group_seq)
    }

    fn table(conn: &Connection) -> Vec<(Vec<u8>, String, i64, i64)> {
        let mut select = conn
            .prepare("SELECT message_id, group_id, kind, message FROM message_keys")
            .unwrap();
        select
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn keyed(conn: &Connection) -> i64 {
        counter(conn, "messages_keyed").unwrap()
    }

    /// A key is found while it waits in memory, while its run is written and after;
    /// keys are written only once a run is due, in steps, and leave memory with the last.
    #[test]
    fn keys_wait_in_memory_then_go_to_the_table_in_steps() {
        let (_dir, mut conn) = database();
        let mut keys = MessageKeys::load(&conn).unwrap();
        keys.step_keys = 2;
        let ids = store_committed(&conn, &mut keys, 5);
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 0, "not due yet");
        assert!(!keys.behind(Instant::now()));
        assert_eq!(keys.in_memory(), 5);
        assert_eq!(find(&conn, &keys, ids[3], "g", 4), Some(3));
        assert_eq!(find(&conn, &keys, ids[3], "other", 4), None);
        assert_eq!(find(&conn, &keys, ids[3], "g", 2), None);

        // The oldest key has waited `KEY_LAG`: a run of all five, two keys a step.
        keys.waiting_since = Instant::now().checked_sub(KEY_LAG);
        assert!(keys.behind(Instant::now()));
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 2);
        // A key stored during the run is not part of it.
        let later = Uuid::new_v4();
        store(&conn, &mut keys, later, "g", 4, 5);
        keys.committed();
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 2);
        assert_eq!(
            (table(&conn).len(), keyed(&conn), keys.in_memory()),
            (4, 0, 6)
        );
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 1);
        assert_eq!(
            (table(&conn).len(), keyed(&conn), keys.in_memory()),
            (5, 5, 1)
        );
        assert!(
            !keys.behind(Instant::now()),
            "the later key has not waited long"
        );
        for (seq, id) in ids.iter().enumerate() {
            assert_eq!(find(&conn, &keys, *id, "g", 4), Some(seq as i64));
        }
        assert_eq!(find(&conn, &keys, later, "g", 4), Some(5));
        // A forced step writes everything at once.
        assert_eq!(keys.step(&mut conn, 0, true).unwrap(), 1);
        assert_eq!(
            (table(&conn).len(), keyed(&conn), keys.in_memory()),
            (6, 6, 0)
        );
        assert_eq!(find(&conn, &keys, later, "g", 4), Some(5));
    }

    /// `RUN_SIZE` waiting keys start a run whatever their age; a step writes at least the
    /// keys asked for.
    #[test]
    fn a_run_starts_when_enough_keys_wait() {
        let (_dir, mut conn) = database();
        let mut keys = MessageKeys::load(&conn).unwrap();
        let tx = conn.transaction().unwrap();
        for seq in 0..RUN_SIZE - 1 {
            store(&tx, &mut keys, Uuid::now_v7(), "g", 4, seq);
        }
        tx.commit().unwrap();
        keys.committed();
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 0);
        store(&conn, &mut keys, Uuid::now_v7(), "g", 4, RUN_SIZE);
        keys.committed();
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), KEY_STEP);
        assert_eq!(keys.step(&mut conn, 5_000, false).unwrap(), 5_000);
        assert_eq!(keyed(&conn), 0);
        assert_eq!(keys.in_memory(), RUN_SIZE as usize);
    }

    /// A run is sorted as the table is, whatever order the messages came in, and a run
    /// written in several insert statements and steps puts every key in the table.
    #[test]
    fn a_run_is_sorted_by_key() {
        let (_dir, mut conn) = database();
        let mut keys = MessageKeys::load(&conn).unwrap();
        let ids: Vec<Uuid> = (0..150).map(|_| Uuid::new_v4()).collect();
        for (seq, id) in ids.iter().enumerate() {
            let group = if seq % 2 == 0 { "b" } else { "a" };
            store(&conn, &mut keys, *id, group, 4, seq as i64);
            store(&conn, &mut keys, *id, "a", 2, seq as i64);
        }
        keys.committed();
        let mut run = keys.waiting.clone();
        run.sort_unstable();
        let order: Vec<(Vec<u8>, String, i64)> = run
            .iter()
            .map(|k| (k.message_id.as_bytes().to_vec(), k.group_id.clone(), k.kind))
            .collect();
        let by_sqlite = |conn: &Connection, sql: &str| -> Vec<(Vec<u8>, String, i64)> {
            let mut select = conn.prepare(sql).unwrap();
            select
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(
            order,
            by_sqlite(
                &conn,
                "SELECT message_id, group_id, kind FROM messages \
                 ORDER BY message_id, group_id, kind"
            ),
            "the order SQLite's index keeps"
        );
        keys.step_keys = 100;
        keys.waiting_since = Instant::now().checked_sub(KEY_LAG);
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 100);
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 100);
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 100);
        assert_eq!(keyed(&conn), 300);
        assert_eq!(
            by_sqlite(&conn, "SELECT message_id, group_id, kind FROM message_keys"),
            order
        );
    }

    /// A rolled back savepoint or transaction takes its keys back; the same (id, kind) in
    /// two groups are two keys.
    #[test]
    fn rolled_back_keys_are_forgotten() {
        let (_dir, mut conn) = database();
        let mut keys = MessageKeys::load(&conn).unwrap();
        let id = Uuid::new_v4();
        let tx = conn.transaction().unwrap();
        store(&tx, &mut keys, id, "g", 1, 1);
        keys.start_savepoint();
        tx.execute_batch("SAVEPOINT s").unwrap();
        store(&tx, &mut keys, id, "h", 1, 2);
        assert_eq!(find(&tx, &keys, id, "h", 1), Some(2));
        tx.execute_batch("ROLLBACK TO s; RELEASE s").unwrap();
        keys.roll_back_savepoint();
        assert_eq!(find(&tx, &keys, id, "h", 1), None);
        keys.start_savepoint();
        store(&tx, &mut keys, id, "i", 1, 3);
        keys.release_savepoint();
        tx.commit().unwrap();
        keys.committed();
        assert_eq!(find(&conn, &keys, id, "g", 1), Some(1));
        assert_eq!(find(&conn, &keys, id, "i", 1), Some(3));
        assert_eq!(keys.in_memory(), 2);

        let tx = conn.transaction().unwrap();
        store(&tx, &mut keys, id, "j", 1, 4);
        tx.rollback().unwrap();
        keys.rolled_back();
        assert_eq!(find(&conn, &keys, id, "j", 1), None);
        assert_eq!(keys.in_memory(), 2);
        // Row ids are not reused, and a run covers the gap.
        assert_eq!(keys.next_row(), 5);
        assert_eq!(keys.step(&mut conn, 0, true).unwrap(), 2);
        assert_eq!(keyed(&conn), 5);
    }

    /// After a restart the keys above the counter are read back, a run cut short is
    /// written again, and row ids go on above every one used, even once expiry emptied
    /// `messages`.
    #[test]
    fn keys_survive_a_restart() {
        let (_dir, mut conn) = database();
        let mut keys = MessageKeys::load(&conn).unwrap();
        keys.step_keys = 1;
        let ids = store_committed(&conn, &mut keys, 3);
        assert_eq!(keys.step(&mut conn, 0, true).unwrap(), 3);
        for (seq, id) in ids.iter().enumerate() {
            store(&conn, &mut keys, *id, "g", 2, seq as i64);
        }
        keys.committed();
        keys.waiting_since = Instant::now().checked_sub(KEY_LAG);
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 1);

        let mut keys = MessageKeys::load(&conn).unwrap();
        assert_eq!((keys.keyed, keys.in_memory()), (3, 3));
        for (seq, id) in ids.iter().enumerate() {
            assert_eq!(find(&conn, &keys, *id, "g", 4), Some(seq as i64));
            assert_eq!(find(&conn, &keys, *id, "g", 2), Some(seq as i64));
        }
        assert_eq!(keys.step(&mut conn, 0, true).unwrap(), 3);
        assert_eq!((table(&conn).len(), keyed(&conn)), (6, 6));

        conn.execute_batch("DELETE FROM messages; DELETE FROM message_keys")
            .unwrap();
        let mut keys = MessageKeys::load(&conn).unwrap();
        assert_eq!(keys.next_row(), 7);
    }

    /// A message that expired answers nothing, whether its key waits in memory or is in
    /// the table, and a key whose message expired is not written.
    #[test]
    fn expired_messages_answer_nothing() {
        let (dir, mut conn) = database();
        let mut keys = MessageKeys::load(&conn).unwrap();
        let (waiting, written) = (Uuid::new_v4(), Uuid::new_v4());
        store(&conn, &mut keys, written, "g", 4, 1);
        keys.committed();
        keys.step(&mut conn, 0, true).unwrap();
        store(&conn, &mut keys, waiting, "g", 4, 2);
        keys.committed();
        // Expiry deletes the rows, and the keys it finds in the table (here after the
        // check that a key whose row is gone answers nothing).
        let expiry = expiry(&dir);
        expiry.execute_batch("DELETE FROM messages").unwrap();
        assert_eq!(find(&conn, &keys, waiting, "g", 4), None);
        assert_eq!(find(&conn, &keys, written, "g", 4), None);
        expiry
            .execute("DELETE FROM message_keys WHERE message = 1", [])
            .unwrap();
        keys.step(&mut conn, 0, true).unwrap();
        assert!(
            table(&conn).is_empty(),
            "the expired waiting key was not written"
        );
        // The same ids may be used again, and then answer as the new messages.
        store(&conn, &mut keys, waiting, "g", 4, 3);
        store(&conn, &mut keys, written, "g", 4, 4);
        keys.committed();
        keys.step(&mut conn, 0, true).unwrap();
        assert_eq!(find(&conn, &keys, waiting, "g", 4), Some(3));
        assert_eq!(find(&conn, &keys, written, "g", 4), Some(4));
        assert_eq!(table(&conn).len(), 2);

        // A message that expires while its run is written: its key is not written.
        keys.step_keys = 1;
        let (first, second) = (Uuid::from_u128(1), Uuid::from_u128(2));
        store(&conn, &mut keys, second, "g", 4, 5);
        store(&conn, &mut keys, first, "g", 4, 6);
        keys.committed();
        keys.waiting_since = Instant::now().checked_sub(KEY_LAG);
        assert_eq!(keys.step(&mut conn, 0, false).unwrap(), 1);
        assert_eq!(find(&conn, &keys, first, "g", 4), Some(6), "written first");
        expiry
            .execute(
                "DELETE FROM messages WHERE message_id = ?",
                [second.as_bytes().as_slice()],
            )
            .unwrap();
        keys.step(&mut conn, 0, false).unwrap();
        assert_eq!(keys.keyed, keys.last_row, "the run is finished");
        assert_eq!(
            table(&conn).len(),
            3,
            "the expired message's key was not written"
        );
        assert_eq!(find(&conn, &keys, second, "g", 4), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Sends (message id, group, kind), each a small number so that they repeat.
        Send(u8, u8, u8),
        /// Sends in a transaction that is rolled back.
        SendRolledBack(u8, u8, u8),
        Step(usize),
        AgeWaiting,
        Force,
        Restart,
        Expire(u8, u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..12u8, 0..2u8, 0..2u8).prop_map(|(i, g, k)| Op::Send(i, g, k)),
            1 => (0..12u8, 0..2u8, 0..2u8).prop_map(|(i, g, k)| Op::SendRolledBack(i, g, k)),
            2 => (0..4usize).prop_map(Op::Step),
            1 => Just(Op::AgeWaiting),
            1 => Just(Op::Force),
            1 => Just(Op::Restart),
            1 => (0..12u8, 0..2u8, 0..2u8).prop_map(|(i, g, k)| Op::Expire(i, g, k)),
        ]
    }

    proptest! {
        /// Whatever the order of sends, runs, restarts, rollbacks and expiry, a key is
        /// found exactly while its message is stored, with that message's answer.
        #[test]
        fn a_key_is_found_exactly_while_its_message_is_stored(ops in proptest::collection::vec(op(), 1..80)) {
            let (dir, mut conn) = database();
            let mut keys = MessageKeys::load(&conn).unwrap();
            keys.step_keys = 2;
            let mut model: HashMap<(u8, u8, u8), i64> = HashMap::new();
            let uuid = |i: u8| Uuid::from_u128((u128::from(i) << 64) | 7);
            let group = |g: u8| format!("group-{g}");
            let mut next_seq = 0;
            for op in ops {
                match op {
                    Op::Send(i, g, k) => {
                        let found = find(&conn, &keys, uuid(i), &group(g), i64::from(k));
                        prop_assert_eq!(found, model.get(&(i, g, k)).copied());
                        if found.is_none() {
                            next_seq += 1;
                            store(&conn, &mut keys, uuid(i), &group(g), i64::from(k), next_seq);
                            keys.committed();
                            model.insert((i, g, k), next_seq);
                        }
                    }
                    Op::SendRolledBack(i, g, k) => {
                        if !model.contains_key(&(i, g, k)) {
                            let tx = conn.transaction().unwrap();
                            store(&tx, &mut keys, uuid(i), &group(g), i64::from(k), -1);
                            tx.rollback().unwrap();
                            keys.rolled_back();
                        }
                    }
                    Op::Step(n) => {
                        keys.step(&mut conn, n, false).unwrap();
                    }
                    Op::AgeWaiting => keys.waiting_since = Instant::now().checked_sub(KEY_LAG),
                    Op::Force => {
                        keys.step(&mut conn, 0, true).unwrap();
                    }
                    Op::Restart => {
                        keys = MessageKeys::load(&conn).unwrap();
                        keys.step_keys = 2;
                    }
                    Op::Expire(i, g, k) => {
                        // As `SqliteStore::expire` does.
                        if model.remove(&(i, g, k)).is_some() {
                            let id = uuid(i);
                            let row: i64 = conn
                                .query_row(
                                    "SELECT id FROM messages WHERE message_id = ? AND group_id = ? AND kind = ?",
                                    params![id.as_bytes().as_slice(), group(g), i64::from(k)],
                                    |row| row.get(0),
                                )
                                .unwrap();
                            let expiry = expiry(&dir);
                            expiry.execute("DELETE FROM messages WHERE id = ?", [row]).unwrap();
                            expiry.execute(
                                "DELETE FROM message_keys WHERE message_id = ? AND group_id = ? \
                                 AND kind = ? AND message = ?",
                                params![id.as_bytes().as_slice(), group(g), i64::from(k), row],
                            )
                            .unwrap();
                        }
                    }
                }
            }
            for ((i, g, k), seq) in &model {
                prop_assert_eq!(find(&conn, &keys, uuid(*i), &group(*g), i64::from(*k)), Some(*seq));
            }
            // Forced to the end, every stored message's key is in the table, and only
            // those.
            keys.step(&mut conn, 0, true).unwrap();
            prop_assert_eq!(keys.in_memory(), 0);
            prop_assert_eq!(table(&conn).len(), model.len());
        }
    }
}
