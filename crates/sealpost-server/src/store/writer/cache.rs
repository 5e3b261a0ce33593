//! What the writer thread keeps in memory between statements: each group's epoch, next
//! sequence number and member devices, each device's mailbox size, and the last mailbox
//! position handed out.
//!
//! Reading these from the database cost four statements per message (group row, members,
//! quota join, and the mailbox counter a trigger kept), and writing the group row and the
//! counter two more. With this cache a batch reads each group and each device's counter at
//! most once and writes each changed one once, just before it commits ([`Cache::flush`]).
//!
//! Invariants:
//! - An entry equals the database as of the writer's last commit, plus what the
//!   transaction under way changed (then it is dirty and [`Cache::flush`] writes it).
//! - Nobody else changed these rows since they were read: any other connection's commit
//!   changes `PRAGMA data_version`, which [`Cache::begin`] reads inside the writer's
//!   `IMMEDIATE` transaction (holding the write lock, so nothing commits in between) and
//!   then forgets everything. Other writes (accounts, KeyPackages, the key directory,
//!   expiry, device removal) therefore cost a reload, never a stale answer.
//! - A job that runs under a savepoint records the entries it is about to change
//!   ([`Cache::start_undo`]); when its savepoint is rolled back, [`Cache::undo`] puts them
//!   back. A transaction that fails as a whole forgets everything ([`Cache::clear`]).

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension as _};
use uuid::Uuid;

use crate::store::StoreError;

/// Entries kept before the cache starts afresh (checked when a batch begins, when no entry
/// is dirty). A member id is 16 bytes, so this bounds the memory to a few tens of MB.
const MAX_CACHED_MEMBERS: usize = 1_000_000;
const MAX_CACHED_DEVICES: usize = 1_000_000;

/// A group as the sequencer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Group {
    pub epoch: i64,
    pub next_seq: i64,
    /// The highest message id (byte order) sequenced in the group, of any kind: a send
    /// with a higher id cannot be a resend, so its idempotency key needs no lookup.
    pub highest_message_id: Option<Uuid>,
    /// Sorted, so membership is a binary search and recipients come out in a fixed order.
    pub members: Vec<Uuid>,
}

impl Group {
    pub fn is_member(&self, device: &Uuid) -> bool {
        self.members.binary_search(device).is_ok()
    }
}

#[derive(Debug, Clone)]
struct Slot<T> {
    value: T,
    dirty: bool,
}

/// Entries as they were before a savepointed job changed them (`None`: not cached).
enum Undo {
    Group(String, Option<Slot<Group>>),
    Count(Uuid, Option<Slot<i64>>),
    MailboxSeq(Option<Slot<i64>>),
}

/// `PRAGMA data_version` of the connection: it changes when another connection commits.
pub(super) fn data_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |row| row.get(0))?)
}

#[derive(Default)]
pub(super) struct Cache {
    data_version: Option<i64>,
    groups: HashMap<String, Slot<Group>>,
    counts: HashMap<Uuid, Slot<i64>>,
    /// The last mailbox position handed out (`counters.mailbox_seq`).
    mailbox_seq: Option<Slot<i64>>,
    cached_members: usize,
    dirty_groups: Vec<String>,
    dirty_counts: Vec<Uuid>,
    /// Set while a savepointed job runs.
    undo: Option<Vec<Undo>>,
}

impl Cache {
    /// Called first in every batch's transaction: forgets everything if another
    /// connection committed since the last batch, or if the cache grew too large.
    pub fn begin(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let version = data_version(conn)?;
        if self.data_version != Some(version)
            || self.cached_members > MAX_CACHED_MEMBERS
            || self.counts.len() > MAX_CACHED_DEVICES
        {
            self.clear();
            self.data_version = Some(version);
        }
        Ok(())
    }

    /// Forgets every entry (after a failed transaction, or when another connection wrote).
    pub fn clear(&mut self) {
        self.data_version = None;
        self.groups.clear();
        self.counts.clear();
        self.mailbox_seq = None;
        self.cached_members = 0;
        self.dirty_groups.clear();
        self.dirty_counts.clear();
        self.undo = None;
    }

    /// The group, read from the database on first use; `None` if it does not exist.
    pub fn group(
        &mut self,
        conn: &Connection,
        group_id: &str,
    ) -> Result<Option<&Group>, StoreError> {
        self.load_group(conn, group_id)?;
        Ok(self.groups.get(group_id).map(|slot| &slot.value))
    }

    fn load_group(&mut self, conn: &Connection, group_id: &str) -> Result<(), StoreError> {
        if self.groups.contains_key(group_id) {
            return Ok(());
        }
        let row = conn
            .prepare_cached(
                "SELECT epoch, next_seq, highest_message_id FROM groups WHERE group_id = ?",
            )?
            .query_row([group_id], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, Option<Vec<u8>>>(2)?,
                ))
            })
            .optional()?;
        let Some((epoch, next_seq, highest)) = row else {
            return Ok(());
        };
        let highest_message_id = highest
            .map(|id| Uuid::from_slice(&id))
            .transpose()
            .map_err(|_| StoreError::Invalid("stored message id is not 16 bytes"))?;
        let mut select = conn.prepare_cached(
            "SELECT device_id FROM group_members WHERE group_id = ? ORDER BY device_id",
        )?;
        let mut members = Vec::new();
        for id in select.query_map([group_id], |row| row.get::<_, Vec<u8>>(0))? {
            members.push(
                Uuid::from_slice(&id?)
                    .map_err(|_| StoreError::Invalid("stored device id is not 16 bytes"))?,
            );
        }
        // Byte order of the stored ids is the order of `Uuid`, but sort anyway: the
        // binary searches must not depend on the database's collation.
        members.sort_unstable();
        self.cached_members += members.len();
        self.groups.insert(
            group_id.to_owned(),
            Slot {
                value: Group {
                    epoch,
                    next_seq,
                    highest_message_id,
                    members,
                },
                dirty: false,
            },
        );
        Ok(())
    }

    /// Changes a cached group (loaded by [`Cache::group`] before) and marks it dirty.
    pub fn update_group(&mut self, group_id: &str, change: impl FnOnce(&mut Group)) {
        if let Some(undo) = &mut self.undo
            && !undo
                .iter()
                .any(|u| matches!(u, Undo::Group(id, _) if id == group_id))
        {
            undo.push(Undo::Group(
                group_id.to_owned(),
                self.groups.get(group_id).cloned(),
            ));
        }
        let Some(slot) = self.groups.get_mut(group_id) else {
            return;
        };
        let before = slot.value.members.len();
        change(&mut slot.value);
        self.cached_members =
            (self.cached_members + slot.value.members.len()).saturating_sub(before);
        if !slot.dirty {
            slot.dirty = true;
            self.dirty_groups.push(group_id.to_owned());
        }
    }

    /// The number of envelopes in `device`'s mailbox.
    pub fn mailbox_count(&mut self, conn: &Connection, device: Uuid) -> Result<i64, StoreError> {
        if let Some(slot) = self.counts.get(&device) {
            return Ok(slot.value);
        }
        let n: i64 = conn
            .prepare_cached("SELECT n FROM mailbox_counts WHERE device_id = ?")?
            .query_row([device.as_bytes().as_slice()], |row| row.get(0))
            .optional()?
            .unwrap_or(0);
        self.counts.insert(
            device,
            Slot {
                value: n,
                dirty: false,
            },
        );
        Ok(n)
    }

    /// Adds `delta` to `device`'s mailbox count.
    pub fn add_to_count(
        &mut self,
        conn: &Connection,
        device: Uuid,
        delta: i64,
    ) -> Result<(), StoreError> {
        self.mailbox_count(conn, device)?;
        if let Some(undo) = &mut self.undo
            && !undo
                .iter()
                .any(|u| matches!(u, Undo::Count(id, _) if *id == device))
        {
            undo.push(Undo::Count(device, self.counts.get(&device).cloned()));
        }
        if let Some(slot) = self.counts.get_mut(&device) {
            slot.value = (slot.value + delta).max(0);
            if !slot.dirty {
                slot.dirty = true;
                self.dirty_counts.push(device);
            }
        }
        Ok(())
    }

    /// Hands out the next `n` mailbox positions; returns the first. Positions are never
    /// reused: clients acknowledge by them.
    pub fn take_mailbox_positions(
        &mut self,
        conn: &Connection,
        n: usize,
    ) -> Result<i64, StoreError> {
        if self.mailbox_seq.is_none() {
            let stored: i64 = conn
                .prepare_cached("SELECT value FROM counters WHERE name = 'mailbox_seq'")?
                .query_row([], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            let highest: i64 = conn
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM mailbox")?
                .query_row([], |row| row.get(0))?;
            self.mailbox_seq = Some(Slot {
                value: stored.max(highest),
                dirty: false,
            });
        }
        if let Some(undo) = &mut self.undo
            && !undo.iter().any(|u| matches!(u, Undo::MailboxSeq(_)))
        {
            undo.push(Undo::MailboxSeq(self.mailbox_seq.clone()));
        }
        let slot = self.mailbox_seq.get_or_insert(Slot {
            value: 0,
            dirty: false,
        });
        let first = slot.value + 1;
        slot.value += n as i64;
        slot.dirty |= n > 0;
        Ok(first)
    }

    /// Starts recording what the next job changes (it runs under a savepoint).
    pub fn start_undo(&mut self) {
        self.undo = Some(Vec::new());
    }

    /// The savepointed job succeeded: keep its changes.
    pub fn keep(&mut self) {
        self.undo = None;
    }

    /// The savepointed job was rolled back: restore what it changed.
    pub fn undo(&mut self) {
        let Some(undo) = self.undo.take() else { return };
        for entry in undo.into_iter().rev() {
            match entry {
                Undo::Group(id, Some(slot)) => {
                    if let Some(current) = self.groups.get(&id) {
                        self.cached_members = self
                            .cached_members
                            .saturating_sub(current.value.members.len());
                    }
                    self.cached_members += slot.value.members.len();
                    self.groups.insert(id, slot);
                }
                Undo::Group(id, None) => {
                    if let Some(current) = self.groups.remove(&id) {
                        self.cached_members = self
                            .cached_members
                            .saturating_sub(current.value.members.len());
                    }
                }
                Undo::Count(device, Some(slot)) => {
                    self.counts.insert(device, slot);
                }
                Undo::Count(device, None) => {
                    self.counts.remove(&device);
                }
                Undo::MailboxSeq(slot) => self.mailbox_seq = slot,
            }
        }
    }

    /// Writes every dirty entry (before the transaction commits).
    pub fn flush(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if !self.dirty_groups.is_empty() {
            let mut update = conn.prepare_cached(
                "UPDATE groups SET epoch = ?, next_seq = ?, highest_message_id = ? \
                 WHERE group_id = ?",
            )?;
            for id in self.dirty_groups.drain(..) {
                if let Some(slot) = self.groups.get_mut(&id)
                    && slot.dirty
                {
                    let highest = slot.value.highest_message_id.map(|id| *id.as_bytes());
                    update.execute(rusqlite::params![
                        slot.value.epoch,
                        slot.value.next_seq,
                        highest.as_ref().map(|id| id.as_slice()),
                        id
                    ])?;
                    slot.dirty = false;
                }
            }
        }
        if let Some(slot) = &mut self.mailbox_seq
            && slot.dirty
        {
            conn.prepare_cached(
                "INSERT INTO counters (name, value) VALUES ('mailbox_seq', ?) \
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            )?
            .execute([slot.value])?;
            slot.dirty = false;
        }
        if !self.dirty_counts.is_empty() {
            let mut upsert = conn.prepare_cached(
                "INSERT INTO mailbox_counts (device_id, n) VALUES (?, ?) \
                 ON CONFLICT(device_id) DO UPDATE SET n = excluded.n",
            )?;
            for device in self.dirty_counts.drain(..) {
                if let Some(slot) = self.counts.get_mut(&device)
                    && slot.dirty
                {
                    upsert.execute(rusqlite::params![device.as_bytes().as_slice(), slot.value])?;
                    slot.dirty = false;
                }
            }
        }
        Ok(())
    }
}
