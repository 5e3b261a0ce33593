//! Sequencing and acknowledgements, inside the writer's transaction.
//!
//! Group state, mailbox sizes and the mailbox position counter come from the writer's
//! [`Cache`]; what is written here per message is only what must be: the message row
//! (with the consecutive mailbox positions its envelopes took), its ciphertext, and one
//! mailbox row per recipient. Its idempotency key is checked and kept by [`MessageKeys`]. An acknowledgement deletes mailbox
//! rows; ciphertexts go in the writer's sweeps ([`super::sweep`]). The statements come
//! from the batch's [`Statements`], prepared once per batch.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension as _, params};
use sealpost_proto::api::{EnvelopeKind, SequencedResponse};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use super::cache::Cache;
use super::message_keys::{MessageKeys, Previous};
use super::statements::Statements;
use crate::store::{Delivery, SequenceOutcome, SequenceRequest, StoreError, StoredMessage};

/// Sequences one request (see `Store::sequence`). Application messages check everything
/// before their first write, so a refusal leaves nothing behind; handshake messages may
/// be refused half-way and run under a savepoint (see the caller).
pub(super) fn sequence(
    statements: &mut Statements<'_>,
    cache: &mut Cache,
    keys: &mut MessageKeys,
    request: &mut SequenceRequest,
) -> Result<SequenceOutcome, StoreError> {
    let tx = statements.conn();
    let hash = Sha256::digest(&request.payload);
    let Some(group) = cache.group(tx, &request.group_id)? else {
        return Err(StoreError::GroupNotFound);
    };
    // A resend of a message accepted earlier (say, before the epoch moved on) gets the
    // answer the first attempt got; the same id with other content is refused. An id
    // above every one the group has seen is new: no lookup.
    let fresh = group
        .highest_message_id
        .is_none_or(|highest| request.message_id > highest);
    if !fresh
        && let Some(previous) = keys.find(
            statements,
            request.message_id,
            &request.group_id,
            request.kind.as_i64(),
        )?
    {
        return resend(previous, &hash);
    }
    let (epoch, group_seq) = (group.epoch, group.next_seq);
    let refusal = if !group.is_member(&request.sender_device) {
        Some(StoreError::NotAMember)
    } else if request.epoch != epoch as u64 {
        Some(StoreError::EpochConflict {
            current: epoch as u64,
        })
    } else {
        None
    };
    let recipients: Vec<Uuid> = group
        .members
        .iter()
        .copied()
        .filter(|device| *device != request.sender_device)
        .collect();
    let refusal = match refusal {
        None if request.kind == EnvelopeKind::Application => {
            quota_refusal(tx, cache, &recipients, request.mailbox_quota)?
        }
        other => other,
    };
    if let Some(refusal) = refusal {
        return Err(refusal);
    }

    let epoch_after = match request.kind {
        EnvelopeKind::Commit => epoch + 1,
        _ => epoch,
    };
    let first_position = cache.take_mailbox_positions(tx, recipients.len())?;
    let row = insert_message(
        statements,
        keys,
        request,
        request.kind,
        group_seq,
        epoch_after,
        &request.payload,
        &hash,
        recipients.len(),
        first_position,
    )?;
    let message = Arc::new(StoredMessage {
        message_id: request.message_id,
        group_id: request.group_id.clone(),
        group_seq: group_seq as u64,
        kind: request.kind,
        server_time: request.now,
        payload: std::mem::take(&mut request.payload),
    });
    let mut deliveries = Vec::with_capacity(recipients.len());
    deliver(
        statements,
        cache,
        row,
        &message,
        &recipients,
        first_position,
        &mut deliveries,
    )?;

    let mut removed: Vec<Uuid> = Vec::new();
    let mut added: Vec<Uuid> = Vec::new();
    match request.kind {
        EnvelopeKind::Commit => {
            // A device that already left (proposal) is no longer on the delivery list;
            // removing it again is a no-op.
            remove_members(tx, &request.group_id, &request.removed_devices)?;
            removed.extend_from_slice(&request.removed_devices);
            if !request.added_devices.is_empty() {
                let Some(welcome) = request.welcome.take() else {
                    return Err(StoreError::Invalid("devices are added without a Welcome"));
                };
                add_members(tx, &request.group_id, &request.added_devices)?;
                added.extend_from_slice(&request.added_devices);
                if !fresh
                    && keys
                        .find(
                            statements,
                            request.message_id,
                            &request.group_id,
                            EnvelopeKind::Welcome.as_i64(),
                        )?
                        .is_some()
                {
                    return Err(StoreError::DuplicateMessageId);
                }
                let welcome_hash = Sha256::digest(&welcome);
                let welcome_position =
                    cache.take_mailbox_positions(tx, request.added_devices.len())?;
                let welcome_row = insert_message(
                    statements,
                    keys,
                    request,
                    EnvelopeKind::Welcome,
                    group_seq,
                    epoch_after,
                    &welcome,
                    &welcome_hash,
                    request.added_devices.len(),
                    welcome_position,
                )?;
                let welcome_message = Arc::new(StoredMessage {
                    kind: EnvelopeKind::Welcome,
                    payload: welcome,
                    ..(*message).clone()
                });
                deliver(
                    statements,
                    cache,
                    welcome_row,
                    &welcome_message,
                    &request.added_devices,
                    welcome_position,
                    &mut deliveries,
                )?;
            }
        }
        EnvelopeKind::Proposal => {
            remove_members(tx, &request.group_id, &request.leaving_devices)?;
            removed.extend_from_slice(&request.leaving_devices);
        }
        EnvelopeKind::Application | EnvelopeKind::Welcome => {}
    }

    let message_id = request.message_id;
    cache.update_group(&request.group_id, |group| {
        group.epoch = epoch_after;
        group.next_seq = group_seq + 1;
        if group
            .highest_message_id
            .is_none_or(|highest| message_id > highest)
        {
            group.highest_message_id = Some(message_id);
        }
        if !removed.is_empty() {
            group.members.retain(|device| !removed.contains(device));
        }
        if !added.is_empty() {
            group.members.extend_from_slice(&added);
            group.members.sort_unstable();
            group.members.dedup();
        }
    });
    Ok(SequenceOutcome {
        response: SequencedResponse {
            group_seq: group_seq as u64,
            epoch: epoch_after as u64,
        },
        deliveries,
    })
}

/// The answer to a resend of `previous`: what the first attempt got, and no deliveries.
/// The same id with other content (another `hash`) is refused.
fn resend(previous: Previous, hash: &[u8]) -> Result<SequenceOutcome, StoreError> {
    if previous.payload_hash != hash {
        return Err(StoreError::DuplicateMessageId);
    }
    Ok(SequenceOutcome {
        response: SequencedResponse {
            group_seq: previous.group_seq as u64,
            epoch: previous.epoch_after as u64,
        },
        deliveries: Vec::new(),
    })
}

/// `MailboxFull` when a recipient's mailbox holds `quota` envelopes or more.
fn quota_refusal(
    tx: &Connection,
    cache: &mut Cache,
    recipients: &[Uuid],
    quota: u64,
) -> Result<Option<StoreError>, StoreError> {
    let quota = i64::try_from(quota).unwrap_or(i64::MAX);
    for device in recipients {
        if cache.mailbox_count(tx, *device)? >= quota {
            return Ok(Some(StoreError::MailboxFull));
        }
    }
    Ok(None)
}

/// Inserts a message row for `recipients` envelopes at the mailbox positions from
/// `first_position` and records its idempotency key (checked before); returns its row id.
#[allow(clippy::too_many_arguments)]
fn insert_message(
    statements: &mut Statements<'_>,
    keys: &mut MessageKeys,
    request: &SequenceRequest,
    kind: EnvelopeKind,
    group_seq: i64,
    epoch_after: i64,
    payload: &[u8],
    hash: &[u8],
    recipients: usize,
    first_position: i64,
) -> Result<i64, StoreError> {
    let row = keys.next_row();
    statements.insert_message()?.execute(params![
        row,
        request.group_id,
        request.message_id.as_bytes().as_slice(),
        kind.as_i64(),
        group_seq,
        epoch_after,
        hash,
        first_position,
        first_position + recipients as i64 - 1,
        request.now,
        request.expires_at,
    ])?;
    keys.add(request.message_id, &request.group_id, kind.as_i64(), row);
    // A message nobody else receives keeps no ciphertext.
    if recipients > 0 {
        statements
            .insert_payload()?
            .execute(params![row, payload])?;
    }
    Ok(row)
}

/// Puts a message into each device's mailbox, at the positions from `first_position`,
/// and records the deliveries.
fn deliver(
    statements: &mut Statements<'_>,
    cache: &mut Cache,
    row: i64,
    message: &Arc<StoredMessage>,
    devices: &[Uuid],
    first_position: i64,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let tx = statements.conn();
    let insert = statements.insert_envelope()?;
    for (position, device) in (first_position..).zip(devices) {
        insert.execute(params![position, device.as_bytes().as_slice(), row])?;
        deliveries.push(Delivery {
            device: *device,
            mailbox_id: position as u64,
            message: message.clone(),
        });
        cache.add_to_count(tx, *device, 1)?;
    }
    Ok(())
}

fn remove_members(tx: &Connection, group_id: &str, devices: &[Uuid]) -> Result<(), StoreError> {
    if devices.is_empty() {
        return Ok(());
    }
    let mut remove =
        tx.prepare_cached("DELETE FROM group_members WHERE group_id = ? AND device_id = ?")?;
    for device in devices {
        remove.execute(params![group_id, device.as_bytes().as_slice()])?;
    }
    Ok(())
}

fn add_members(tx: &Connection, group_id: &str, devices: &[Uuid]) -> Result<(), StoreError> {
    let mut known = tx.prepare_cached("SELECT 1 FROM devices WHERE device_id = ?")?;
    let mut add =
        tx.prepare_cached("INSERT INTO group_members (group_id, device_id) VALUES (?, ?)")?;
    for device in devices {
        if !known.exists([device.as_bytes().as_slice()])? {
            return Err(StoreError::UnknownDevice(*device));
        }
        match add.execute(params![group_id, device.as_bytes().as_slice()]) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                return Err(StoreError::Invalid("an added device is already a member"));
            }
            other => other?,
        };
    }
    Ok(())
}

/// Deletes acknowledged envelopes of `device`. A message whose every recipient has it
/// loses its ciphertext: in the next sweep ([`super::sweep`]), or here if its id is at or
/// below `swept`, the sweep's cursor (the row stays until it expires, for idempotency).
pub(super) fn ack(
    statements: &mut Statements<'_>,
    cache: &mut Cache,
    device: Uuid,
    ids: &[u64],
    swept: i64,
) -> Result<u64, StoreError> {
    let mut removed = 0;
    for id in ids {
        let Ok(seq) = i64::try_from(*id) else {
            continue;
        };
        // Found, then deleted by position: one statement with `RETURNING message` costs
        // more than the two (see `super::statements`).
        let message: Option<i64> = statements
            .find_envelope()?
            .query_row(params![seq, device.as_bytes().as_slice()], |row| row.get(0))
            .optional()?;
        let Some(message) = message else { continue };
        statements.delete_envelope()?.execute([seq])?;
        removed += 1;
        if message <= swept {
            statements.forget_if_delivered()?.execute([message])?;
        }
    }
    if removed > 0 {
        cache.add_to_count(statements.conn(), device, -removed)?;
    }
    Ok(removed as u64)
}
