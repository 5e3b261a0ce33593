//! The statements every message and acknowledgement runs, prepared once per batch.
//!
//! `Connection::prepare_cached` finds a compiled statement by hashing its SQL text and
//! puts it back into an LRU cache when the handle drops: about 1,400 instructions a call
//! (callgrind, docs/BENCHMARKS-LOG.md section 1), three to four calls per message. A batch
//! takes each statement from the cache once, on first use, and keeps it until the batch
//! commits, so a batch of 500 messages pays for a handful of lookups instead of ~2,000.
//!
//! None of these statements has a `RETURNING` clause: SQLite collects a `RETURNING`
//! statement's rows in an ephemeral table, and opening, starting and closing that table
//! (a page zeroed and freed each time) cost more than the delete it reported on.

use rusqlite::{CachedStatement, Connection};

use super::message_keys::FIND_KEY;
use super::sweep::FORGET_IF_DELIVERED;
use crate::store::StoreError;

const INSERT_MESSAGE: &str = "INSERT INTO messages (id, group_id, message_id, kind, group_seq, \
     epoch_after, payload_hash, first_seq, last_seq, server_time, expires_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
const INSERT_PAYLOAD: &str = "INSERT INTO payloads (id, payload) VALUES (?, ?)";
const INSERT_ENVELOPE: &str = "INSERT INTO mailbox (seq, device_id, message) VALUES (?, ?, ?)";
const FIND_ENVELOPE: &str = "SELECT message FROM mailbox WHERE seq = ? AND device_id = ?";
const DELETE_ENVELOPE: &str = "DELETE FROM mailbox WHERE seq = ?";

/// A batch's statements, each prepared on first use (a batch of acknowledgements never
/// prepares the inserts).
pub(super) struct Statements<'conn> {
    conn: &'conn Connection,
    insert_message: Option<CachedStatement<'conn>>,
    find_key: Option<CachedStatement<'conn>>,
    insert_payload: Option<CachedStatement<'conn>>,
    insert_envelope: Option<CachedStatement<'conn>>,
    find_envelope: Option<CachedStatement<'conn>>,
    delete_envelope: Option<CachedStatement<'conn>>,
    forget_if_delivered: Option<CachedStatement<'conn>>,
}

/// The statement in `slot`, preparing it (from the connection's cache) the first time.
fn take<'a, 'conn>(
    conn: &'conn Connection,
    slot: &'a mut Option<CachedStatement<'conn>>,
    sql: &str,
) -> Result<&'a mut CachedStatement<'conn>, StoreError> {
    match slot {
        Some(statement) => Ok(statement),
        None => Ok(slot.insert(conn.prepare_cached(sql)?)),
    }
}

impl<'conn> Statements<'conn> {
    /// Statements on `conn`: the writer's transaction, which must outlive them (they go
    /// back to the connection's cache when this is dropped, before the commit).
    pub fn new(conn: &'conn Connection) -> Self {
        Self {
            conn,
            insert_message: None,
            find_key: None,
            insert_payload: None,
            insert_envelope: None,
            find_envelope: None,
            delete_envelope: None,
            forget_if_delivered: None,
        }
    }

    /// The connection the statements run on, for the rarer statements prepared per call.
    pub fn conn(&self) -> &'conn Connection {
        self.conn
    }

    /// Inserts a message row under the row id given (the idempotency key is checked
    /// before, see [`super::message_keys`]).
    pub fn insert_message(&mut self) -> Result<&mut CachedStatement<'conn>, StoreError> {
        take(self.conn, &mut self.insert_message, INSERT_MESSAGE)
    }

    /// The message of an idempotency key in `message_keys` ([`FIND_KEY`]).
    pub fn find_key(&mut self) -> Result<&mut CachedStatement<'conn>, StoreError> {
        take(self.conn, &mut self.find_key, FIND_KEY)
    }

    /// Inserts a message's ciphertext under its row id.
    pub fn insert_payload(&mut self) -> Result<&mut CachedStatement<'conn>, StoreError> {
        take(self.conn, &mut self.insert_payload, INSERT_PAYLOAD)
    }

    /// Inserts an envelope: (position, device, message row id).
    pub fn insert_envelope(&mut self) -> Result<&mut CachedStatement<'conn>, StoreError> {
        take(self.conn, &mut self.insert_envelope, INSERT_ENVELOPE)
    }

    /// The message row id of the envelope at a position, if it is the device's.
    pub fn find_envelope(&mut self) -> Result<&mut CachedStatement<'conn>, StoreError> {
        take(self.conn, &mut self.find_envelope, FIND_ENVELOPE)
    }

    /// Deletes the envelope at a position.
    pub fn delete_envelope(&mut self) -> Result<&mut CachedStatement<'conn>, StoreError> {
        take(self.conn, &mut self.delete_envelope, DELETE_ENVELOPE)
    }

    /// Drops a message's ciphertext if none of its envelopes is left
    /// ([`FORGET_IF_DELIVERED`]).
    pub fn forget_if_delivered(&mut self) -> Result<&mut CachedStatement<'conn>, StoreError> {
        take(
            self.conn,
            &mut self.forget_if_delivered,
            FORGET_IF_DELIVERED,
        )
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::*;

    fn database() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, group_id TEXT, message_id BLOB, \
                 kind INTEGER, group_seq INTEGER, epoch_after INTEGER, payload_hash BLOB, \
                 first_seq INTEGER, last_seq INTEGER, server_time INTEGER, expires_at INTEGER);
             CREATE TABLE payloads (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);
             CREATE TABLE mailbox (seq INTEGER PRIMARY KEY, device_id BLOB NOT NULL, \
                 message INTEGER NOT NULL);",
        )
        .unwrap();
        conn
    }

    #[test]
    fn envelopes_are_inserted_found_and_deleted_by_position() {
        let conn = database();
        let mut statements = Statements::new(&conn);
        for seq in 1..=3 {
            statements
                .insert_envelope()
                .unwrap()
                .execute(params![seq, [1u8].as_slice(), 7])
                .unwrap();
        }
        let found: i64 = statements
            .find_envelope()
            .unwrap()
            .query_row(params![2, [1u8].as_slice()], |row| row.get(0))
            .unwrap();
        assert_eq!(found, 7);
        assert_eq!(
            statements.delete_envelope().unwrap().execute([2]).unwrap(),
            1
        );
        drop(statements);
        let left: i64 = conn
            .query_row("SELECT COUNT(*) FROM mailbox", [], |row| row.get(0))
            .unwrap();
        assert_eq!(left, 2);
    }

    #[test]
    fn an_envelope_of_another_device_is_not_found() {
        let conn = database();
        let mut statements = Statements::new(&conn);
        statements
            .insert_envelope()
            .unwrap()
            .execute(params![1, [1u8].as_slice(), 7])
            .unwrap();
        let found = statements
            .find_envelope()
            .unwrap()
            .query_row(params![1, [2u8].as_slice()], |row| row.get::<_, i64>(0));
        assert!(matches!(found, Err(rusqlite::Error::QueryReturnedNoRows)));
    }
}
