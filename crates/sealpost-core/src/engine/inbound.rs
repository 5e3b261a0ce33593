//! Processing what the server delivers: Welcomes, commits, proposals, application messages.
//!
//! Each envelope's effects are committed together with the record of its message id as
//! processed, so a redelivered envelope (delivery is at-least-once) is skipped and a user
//! sees every message exactly once. An envelope that cannot be processed (it does not
//! decrypt, or a new member's certificate does not verify) is recorded too, with a notice,
//! and never retried forever; a local storage failure is returned and the envelope stays
//! unacknowledged.
//!
//! [`Engine::process_batch`] (the sync path) applies a whole mailbox page in one
//! transaction: one commit and one fsync for the page, and each group's MLS state loaded
//! once instead of once per message. If an envelope is rejected, the page is applied again
//! with one savepoint per envelope, so that the rejected one is undone alone and recorded
//! as failed; a local failure rolls the whole page back, and since acknowledgements are
//! sent only after the commit, the server delivers the page again.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, Proposal, Sender, StagedWelcome,
};
use openmls_traits::OpenMlsProvider as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use sealpost_proto::api::{Envelope, EnvelopeKind};

use super::contacts::observe_account_key;
use super::conversations::{insert_notice, load_group, member_devices};
use super::queries::{HistoryEntry, history_entry};
use super::transparency::observe_gossip;
use super::{Engine, Identity, join_config};
use crate::error::CoreError;
use crate::identity::{certificate_of, verify_member};
use crate::kt::Gossip;
use crate::payload::{AppMessage, Body, CONVERSATION_INFO_EXTENSION, ConversationInfo};
use crate::store::Provider;

/// What applying an envelope produced.
enum Outcome {
    /// New history messages.
    Messages(Vec<HistoryEntry>),
    /// Notices to add to history.
    Notices(Vec<String>),
    /// Nothing to show: the envelope is for a group we are no longer in.
    Skipped,
}

fn kind_name(kind: EnvelopeKind) -> &'static str {
    match kind {
        EnvelopeKind::Commit => "commit",
        EnvelopeKind::Welcome => "welcome",
        EnvelopeKind::Proposal => "proposal",
        EnvelopeKind::Application => "application",
    }
}

/// Records an envelope as processed; `false` if it already was (a redelivery).
fn mark_processed(tx: &Connection, envelope: &Envelope, now: i64) -> Result<bool, CoreError> {
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO processed (group_id, message_id, kind, processed_at) \
             VALUES (?, ?, ?, ?)",
        )?
        .execute(params![
            envelope.group_id,
            envelope.message_id.to_string(),
            kind_name(envelope.kind),
            now
        ])?;
    Ok(inserted == 1)
}

/// Checks a member a Welcome or commit brings: a valid certificate naming the key it signs
/// with, a device of our own account only under our own account key, and the account key
/// recorded for its user (key-change rules in `contacts`).
fn accept_member(
    provider: &Provider<'_>,
    tx: &Connection,
    identity: &Identity,
    credential: &openmls::prelude::Credential,
    signature_key: &[u8],
    now: i64,
) -> Result<sealpost_proto::certificate::DeviceCertificate, CoreError> {
    let cert = verify_member(credential, signature_key)?;
    if cert.username == identity.username && cert.account_key != identity.account_key() {
        return Err(CoreError::InvalidCertificate(
            "a device of your account appears under another account key".into(),
        ));
    }
    observe_account_key(
        provider,
        tx,
        &identity.username,
        &cert.username,
        &cert.account_key,
        now,
    )?;
    Ok(cert)
}

fn parse(payload: &[u8]) -> Result<MlsMessageIn, CoreError> {
    MlsMessageIn::tls_deserialize_exact(payload)
        .map_err(|_| CoreError::Mls("malformed MLS message".into()))
}

fn unique_group_name(tx: &Connection, name: &str) -> Result<String, CoreError> {
    let mut candidate = name.to_owned();
    for n in 2.. {
        let taken: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM conversations WHERE kind = 'group' AND name = ? AND status = 'active'",
                [&candidate],
                |row| row.get(0),
            )
            .optional()?;
        if taken.is_none() {
            break;
        }
        candidate = format!("{name} ({n})");
    }
    Ok(candidate)
}

fn process_welcome(
    provider: &Provider<'_>,
    tx: &Connection,
    identity: &Identity,
    envelope: &Envelope,
    now: i64,
) -> Result<Outcome, CoreError> {
    let MlsMessageBodyIn::Welcome(welcome) = parse(envelope.payload.as_ref())?.extract() else {
        return Err(CoreError::Mls("expected a Welcome".into()));
    };
    let staged = StagedWelcome::build_from_welcome(provider, &join_config(), welcome)
        .map_err(CoreError::mls)?
        .replace_old_group()
        .build()
        .map_err(CoreError::mls)?;
    // Every member must present a valid certificate; pin their account keys.
    for member in staged.members() {
        accept_member(
            provider,
            tx,
            identity,
            &member.credential,
            &member.signature_key,
            now,
        )?;
    }
    let sender = staged
        .welcome_sender()
        .ok()
        .and_then(|leaf| certificate_of(leaf.credential()))
        .map(|cert| cert.username)
        .unwrap_or_else(|| "someone".into());
    // The other account of a 1:1 is whoever is in it besides us (the Welcome may come
    // from one of our own devices adding this one).
    let others: Vec<String> = {
        let mut others: Vec<String> = staged
            .members()
            .filter_map(|member| certificate_of(&member.credential))
            .map(|cert| cert.username)
            .filter(|name| *name != identity.username)
            .collect();
        others.sort();
        others.dedup();
        others
    };
    let by_own_device = sender == identity.username;
    let info = staged
        .group_context()
        .extensions()
        .unknown(CONVERSATION_INFO_EXTENSION)
        .map(|ext| ConversationInfo::decode(&ext.0))
        .transpose()?
        .ok_or_else(|| CoreError::Mls("the group carries no conversation info".into()))?;
    // Joining may replace the stored state of a group we were in before: no copy of
    // that group may stay in memory.
    provider.forget_group(staged.group_context().group_id());
    let group = staged.into_group(provider).map_err(CoreError::mls)?;
    let group_id = hex::encode(group.group_id().as_slice());
    if group_id != envelope.group_id {
        return Err(CoreError::Mls("the Welcome is for another group".into()));
    }
    provider.keep_group(group);
    let (kind, name, peer, notice) = match info {
        ConversationInfo::Direct => {
            let [peer] = others.as_slice() else {
                return Err(CoreError::Mls(
                    "a 1:1 conversation must have exactly one other account".into(),
                ));
            };
            let notice = if by_own_device {
                format!("this device joined your conversation with {peer}")
            } else {
                format!("{sender} started a conversation with you")
            };
            ("direct", None, Some(peer.clone()), notice)
        }
        ConversationInfo::Group { name } => {
            let local = unique_group_name(tx, &name)?;
            let notice = if by_own_device {
                format!("this device joined {local:?}")
            } else {
                format!("{sender} added you to {local:?}")
            };
            ("group", Some(local), None, notice)
        }
    };
    tx.execute(
        "INSERT INTO conversations (group_id, kind, name, peer, status, created_at) \
         VALUES (?1, ?2, ?3, ?4, 'active', ?5) ON CONFLICT(group_id) DO UPDATE SET \
         status = 'active', kind = ?2, name = ?3, peer = ?4",
        params![group_id, kind, name, peer, now],
    )?;
    Ok(Outcome::Notices(vec![notice]))
}

fn process_in_group(
    provider: &Provider<'_>,
    tx: &Connection,
    identity: &Identity,
    envelope: &Envelope,
    now: i64,
) -> Result<Outcome, CoreError> {
    // The status, and the conversation's name as history shows it.
    let conversation: Option<(String, Option<String>)> = tx
        .prepare_cached(
            "SELECT status, CASE WHEN kind = 'direct' THEN peer ELSE name END \
             FROM conversations WHERE group_id = ?",
        )?
        .query_row([&envelope.group_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((status, label)) = conversation else {
        return Ok(Outcome::Skipped);
    };
    if status != "active" {
        return Ok(Outcome::Skipped);
    }
    let Some(mut group) = load_group(provider, &envelope.group_id)? else {
        return Ok(Outcome::Skipped);
    };
    let protocol = parse(envelope.payload.as_ref())?
        .try_into_protocol_message()
        .map_err(CoreError::mls)?;
    let processed = group
        .process_message(provider, protocol)
        .map_err(CoreError::mls)?;
    let aad = processed.aad().to_vec();
    let sender_cert = certificate_of(processed.credential());
    let sender_name = sender_cert
        .as_ref()
        .map(|cert| cert.username.clone())
        .unwrap_or_else(|| "someone".into());
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(message) => {
            if let Some(gossip) = Gossip::decode(&aad) {
                observe_gossip(tx, &sender_name, &gossip, now)?;
            }
            let message = AppMessage::decode(&message.into_bytes())?;
            let text = match message.body {
                Body::Text { text } => text,
                Body::Unsupported => "(a message this version of Sealpost cannot show)".to_owned(),
            };
            let id = message.id.to_string();
            let sender_device = sender_cert.as_ref().map(|c| c.device_id.to_string());
            let outgoing = sender_name == identity.username;
            let inserted = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO history (id, group_id, sender, sender_device, kind, \
                     text, sent_at_ms, received_at, outgoing) VALUES (?, ?, ?, ?, 'text', ?, ?, ?, ?)",
                )?
                .execute(params![
                    id,
                    envelope.group_id,
                    sender_name,
                    sender_device,
                    text,
                    message.sent_at_ms,
                    now,
                    outgoing as i64,
                ])?;
            provider.keep_group(group);
            Ok(Outcome::Messages(if inserted == 1 {
                // What `history_entry` would read back.
                vec![HistoryEntry {
                    id,
                    conversation: label.unwrap_or_else(|| envelope.group_id.clone()),
                    group_id: envelope.group_id.clone(),
                    sender: sender_name,
                    sender_device,
                    kind: "text".into(),
                    text,
                    sent_at: message.sent_at_ms,
                    outgoing,
                }]
            } else {
                Vec::new()
            }))
        }
        ProcessedMessageContent::ProposalMessage(queued) => {
            // Only "I leave" proposals are accepted: a Remove of the proposer's own leaf.
            let own_leave = match (queued.proposal(), queued.sender()) {
                (Proposal::Remove(remove), Sender::Member(sender)) => remove.removed() == *sender,
                _ => false,
            };
            if !own_leave {
                return Ok(Outcome::Notices(vec![format!(
                    "ignored a proposal from {sender_name} that Sealpost does not allow"
                )]));
            }
            group
                .store_pending_proposal(provider.storage(), *queued)
                .map_err(CoreError::Store)?;
            provider.keep_group(group);
            Ok(Outcome::Skipped)
        }
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            // Every device the commit brings in must carry a valid certificate; a device of
            // our own account must be under our own account key.
            let members = member_devices(&group);
            let mut added_devices: Vec<String> = Vec::new();
            for add in staged.add_proposals() {
                let leaf = add.add_proposal().key_package().leaf_node();
                let cert = accept_member(
                    provider,
                    tx,
                    identity,
                    leaf.credential(),
                    leaf.signature_key().as_slice(),
                    now,
                )?;
                added_devices.push(cert.username);
            }
            if let Some(leaf) = staged.update_path_leaf_node() {
                verify_member(leaf.credential(), leaf.signature_key().as_slice())?;
            }
            let mut left = Vec::new();
            let mut removed_devices: Vec<String> = Vec::new();
            for remove in staged.remove_proposals() {
                let leaf = remove.remove_proposal().removed();
                let Some(member) = members.iter().find(|m| m.leaf == leaf) else {
                    continue;
                };
                if matches!(remove.sender(), Sender::Member(s) if *s == leaf) {
                    if !left.contains(&member.username) {
                        left.push(member.username.clone());
                    }
                } else {
                    removed_devices.push(member.username.clone());
                }
            }
            // Describe the change per account: a new account, a gone account, or an
            // account whose set of devices changed.
            let had = |user: &str| members.iter().any(|m| m.username == user);
            let keeps = |user: &str| {
                members.iter().filter(|m| m.username == user).count()
                    > removed_devices.iter().filter(|u| *u == user).count()
            };
            let mut added = Vec::new();
            let mut removed = Vec::new();
            let mut devices_changed = Vec::new();
            for user in &added_devices {
                let list = if had(user) {
                    &mut devices_changed
                } else {
                    &mut added
                };
                if !list.contains(user) {
                    list.push(user.clone());
                }
            }
            for user in &removed_devices {
                let list = if keeps(user) || added_devices.contains(user) {
                    &mut devices_changed
                } else {
                    &mut removed
                };
                if !list.contains(user) {
                    list.push(user.clone());
                }
            }
            let self_removed = staged.self_removed();
            group
                .merge_staged_commit(provider, *staged)
                .map_err(CoreError::mls)?;
            let mut notices = Vec::new();
            if !added.is_empty() {
                notices.push(format!("{sender_name} added {}", added.join(", ")));
            }
            for user in devices_changed {
                let whose = if user == identity.username {
                    "your".to_owned()
                } else {
                    format!("{user}'s")
                };
                notices.push(format!("{whose} devices changed"));
            }
            for user in left {
                notices.push(format!("{user} left"));
            }
            if self_removed {
                notices.push(if sender_name == identity.username {
                    "this device was removed from the conversation by another of your devices"
                        .to_owned()
                } else {
                    format!("{sender_name} removed you")
                });
                tx.execute(
                    "UPDATE conversations SET status = 'removed' WHERE group_id = ?",
                    [&envelope.group_id],
                )?;
                group.delete(provider.storage())?;
            } else {
                if !removed.is_empty() && !removed.contains(&identity.username) {
                    notices.push(format!("{sender_name} removed {}", removed.join(", ")));
                }
                provider.keep_group(group);
            }
            Ok(Outcome::Notices(notices))
        }
        // External joins are not used; our own messages are never delivered back to us.
        ProcessedMessageContent::ExternalJoinProposalMessage(_)
        | ProcessedMessageContent::OwnPendingCommit
        | ProcessedMessageContent::OwnPrivateMessage => Ok(Outcome::Skipped),
    }
}

/// Errors caused by what a peer or the server sent (as opposed to local failures).
fn is_remote_fault(err: &CoreError) -> bool {
    !matches!(
        err,
        CoreError::Store(_) | CoreError::Io(_) | CoreError::NotRegistered
    )
}

/// How [`apply_envelopes`] keeps one envelope's effects apart from the others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// None: any error, including a rejected envelope, is returned and the whole
    /// transaction must roll back. The fast path when every envelope is good.
    None,
    /// A savepoint per envelope: a rejected envelope is undone alone and recorded.
    Savepoint,
}

/// A history entry an envelope added: the entry itself when it was built in memory, or
/// its id (notices, read back by whoever needs them).
enum Added {
    Entry(HistoryEntry),
    Id(String),
}

/// Applies envelopes in order inside the caller's transaction; returns the ids of the
/// history entries they added. With [`Isolation::Savepoint`], an envelope the peer or
/// server got wrong is undone (back to its savepoint) and recorded as processed with a
/// notice. Any error returned means the caller's transaction must roll back.
fn apply_envelopes(
    provider: &Provider<'_>,
    tx: &Connection,
    identity: &Identity,
    envelopes: &[Envelope],
    now: i64,
    isolation: Isolation,
) -> Result<Vec<Added>, CoreError> {
    let mut ids = Vec::new();
    for envelope in envelopes {
        ids.extend(apply_envelope(
            provider, tx, identity, envelope, now, isolation,
        )?);
    }
    Ok(ids)
}

fn apply_envelope(
    provider: &Provider<'_>,
    tx: &Connection,
    identity: &Identity,
    envelope: &Envelope,
    now: i64,
    isolation: Isolation,
) -> Result<Vec<Added>, CoreError> {
    let savepoint = isolation == Isolation::Savepoint;
    if savepoint {
        tx.prepare_cached("SAVEPOINT envelope")?.execute([])?;
    }
    // Recording the envelope first is also how a redelivered one is found.
    if !mark_processed(tx, envelope, now)? {
        if savepoint {
            tx.prepare_cached("RELEASE envelope")?.execute([])?;
        }
        return Ok(Vec::new());
    }
    let attempt = (|| {
        let outcome = match envelope.kind {
            EnvelopeKind::Welcome => process_welcome(provider, tx, identity, envelope, now)?,
            _ => process_in_group(provider, tx, identity, envelope, now)?,
        };
        let mut ids = Vec::new();
        match outcome {
            Outcome::Messages(messages) => ids.extend(messages.into_iter().map(Added::Entry)),
            Outcome::Notices(notices) => {
                for text in notices {
                    ids.push(Added::Id(insert_notice(
                        tx,
                        &envelope.group_id,
                        &text,
                        now,
                        false,
                    )?));
                }
            }
            Outcome::Skipped => {}
        }
        Ok(ids)
    })();
    match attempt {
        Ok(ids) => {
            if savepoint {
                tx.prepare_cached("RELEASE envelope")?.execute([])?;
            }
            Ok(ids)
        }
        // Undo the envelope's MLS work (groups in memory may be ahead of the rolled-back
        // storage, so they go too), then record it as processed, with a notice, so it is
        // acknowledged and never retried forever.
        Err(err) if savepoint && is_remote_fault(&err) => {
            tx.execute_batch("ROLLBACK TO envelope; RELEASE envelope")?;
            provider.forget_all_groups();
            tracing::warn!(kind = kind_name(envelope.kind), "envelope rejected: {err}");
            let text = match envelope.kind {
                EnvelopeKind::Application => format!("a message could not be decrypted: {err}"),
                _ => format!(
                    "ALERT: a group change was rejected (it may be forged; the conversation \
                     may not work until it is repaired): {err}"
                ),
            };
            mark_processed(tx, envelope, now)?;
            Ok(vec![Added::Id(insert_notice(
                tx,
                &envelope.group_id,
                &text,
                now,
                false,
            )?)])
        }
        Err(err) => Err(err),
    }
}

impl Engine {
    /// Applies envelopes in one transaction. Each envelope would need a savepoint in case
    /// it is rejected, which costs a tenth of the time of a page of messages, and envelopes
    /// are almost never rejected: so first try without, and only if one is rejected, roll
    /// back and run the envelopes again with savepoints. Every envelope is processed at
    /// most twice, whatever a malicious sender puts in the page.
    fn apply_in_one_transaction(
        &mut self,
        envelopes: &[Envelope],
        now: i64,
        mark_batch: bool,
    ) -> Result<Vec<Added>, CoreError> {
        let run = |engine: &mut Self, isolation| {
            engine.transact(|provider, tx, identity| {
                let identity = identity.ok_or(CoreError::NotRegistered)?;
                let ids = apply_envelopes(provider, tx, identity, envelopes, now, isolation)?;
                if mark_batch {
                    crate::store::meta_set(tx, "last_processed", &now.to_le_bytes())?;
                }
                Ok(ids)
            })
        };
        match run(self, Isolation::None) {
            Err(err) if is_remote_fault(&err) => run(self, Isolation::Savepoint),
            result => result,
        }
    }

    /// Applies one envelope and returns what the user should see (new messages and
    /// notices). Returns an error only for local failures; the envelope is then not
    /// marked processed and must not be acknowledged.
    pub fn process_envelope(
        &mut self,
        envelope: &Envelope,
        now: i64,
    ) -> Result<Vec<HistoryEntry>, CoreError> {
        let added = self.apply_in_one_transaction(std::slice::from_ref(envelope), now, false)?;
        let mut entries = Vec::with_capacity(added.len());
        for added in added {
            match added {
                Added::Entry(entry) => entries.push(entry),
                Added::Id(id) => entries.extend(history_entry(&self.conn, &id)?),
            }
        }
        Ok(entries)
    }

    /// Applies a batch of envelopes (a mailbox page) in order, all in one transaction
    /// committed with `synchronous = FULL`, and returns the ids to acknowledge: when this
    /// returns, the whole batch is durable. On a local failure nothing of the batch is
    /// applied and an error is returned (acknowledge nothing; the server delivers the
    /// batch again). What the batch added to history is read with
    /// [`Engine::take_unshown`].
    pub fn process_batch(
        &mut self,
        envelopes: &[Envelope],
        now: i64,
    ) -> Result<Vec<u64>, CoreError> {
        self.apply_in_one_transaction(envelopes, now, true)?;
        Ok(envelopes.iter().map(|envelope| envelope.id).collect())
    }
}
