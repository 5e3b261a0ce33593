//! Outgoing operations on conversations: create, add, remove, leave, send.
//!
//! Each operation changes MLS state and writes an outbox row in the same transaction, and
//! returns the request to send. The client sends it and reports the server's answer back
//! (`*_accepted`, `*_rejected`): only then is a commit merged or a message marked sent. A
//! client killed in between finds the outbox row on restart and resends it with the same
//! message id; the server recognises the id, so nothing is applied twice.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    Extension, Extensions, GroupId, KeyPackage, LeafNodeIndex, MlsGroup, MlsGroupCreateConfig,
    MlsMessageBodyIn, MlsMessageIn, ProtocolVersion, UnknownExtension,
};
use openmls_traits::OpenMlsProvider as _;
use rand::RngCore as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use sealpost_proto::api::{
    ClaimKeyPackagesResponse, PostCommitRequest, PostMessageRequest, PostProposalRequest,
};
use sealpost_proto::names::validate_group_name;
use sealpost_proto::{Bytes64, limits};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::contacts::{blocked_members, key_change_error};
use super::transparency::{current_gossip, is_proven_device};
use super::{
    CIPHERSUITE, Engine, Identity, MAX_FORWARD_DISTANCE, MAX_PAST_EPOCHS, OUT_OF_ORDER_TOLERANCE,
    capabilities, tls_bytes, to_json,
};
use crate::error::CoreError;
use crate::identity::{certificate_of, verify_member};
use crate::payload::{AppMessage, CONVERSATION_INFO_EXTENSION, ConversationInfo};
use crate::store::Provider;

/// A commit waiting for the server's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutgoingCommit {
    pub group_id: String,
    /// The group must first be registered on the server (a new conversation).
    pub create_group: bool,
    pub request: PostCommitRequest,
    /// What to show in history once the commit is accepted.
    pub notice: Option<String>,
    /// Show the notice in `sync` output: the user did not ask for this commit (for
    /// example it completes someone else's leave).
    #[serde(default)]
    pub announce: bool,
}

/// An application message waiting for the server's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutgoingMessage {
    pub group_id: String,
    pub request: PostMessageRequest,
}

/// A leave proposal waiting for the server's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutgoingProposal {
    pub group_id: String,
    pub request: PostProposalRequest,
}

/// Anything in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outgoing {
    Commit(OutgoingCommit),
    Message(OutgoingMessage),
    Proposal(OutgoingProposal),
}

impl Outgoing {
    pub fn message_id(&self) -> Uuid {
        match self {
            Self::Commit(c) => c.request.message_id,
            Self::Message(m) => m.request.message_id,
            Self::Proposal(p) => p.request.message_id,
        }
    }
}

/// Devices to add to and remove from a group to match the directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcilePlan {
    pub missing: Vec<Uuid>,
    pub stale: Vec<Uuid>,
}

impl ReconcilePlan {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.stale.is_empty()
    }
}

/// A summary of a group's MLS state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupSnapshot {
    pub epoch: u64,
    /// `username/device-id`, sorted.
    pub members: Vec<String>,
    pub epoch_authenticator: String,
}

/// A member device of a group, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDevice {
    pub username: String,
    pub device_id: Uuid,
    pub leaf: LeafNodeIndex,
}

pub(crate) fn mls_group_id(group_id: &str) -> Result<GroupId, CoreError> {
    let raw = hex::decode(group_id)
        .map_err(|_| CoreError::InvalidInput(format!("bad group id {group_id}")))?;
    Ok(GroupId::from_slice(&raw))
}

/// Loads a group (from memory if the engine has it there, see [`crate::store::GroupCache`]).
/// A caller that leaves the group as storage has it (every change made through
/// `provider`) may hand it back with `provider.keep_group` to spare the next reader.
pub(crate) fn load_group(
    provider: &Provider<'_>,
    group_id: &str,
) -> Result<Option<MlsGroup>, CoreError> {
    provider.take_group(&mls_group_id(group_id)?)
}

pub(crate) fn require_group(
    provider: &Provider<'_>,
    group_id: &str,
) -> Result<MlsGroup, CoreError> {
    load_group(provider, group_id)?
        .ok_or_else(|| CoreError::UnknownConversation(group_id.to_owned()))
}

/// The member devices of a group, from their certificates.
pub(crate) fn member_devices(group: &MlsGroup) -> Vec<MemberDevice> {
    group
        .members()
        .filter_map(|member| {
            certificate_of(&member.credential).map(|cert| MemberDevice {
                username: cert.username,
                device_id: cert.device_id,
                leaf: member.index,
            })
        })
        .collect()
}

/// Validates claimed KeyPackages: each must parse and verify, use our ciphersuite, and
/// carry exactly the certificate the key directory proves for that device. The claim's
/// own account-key field is not trusted: the proven certificate names the key.
fn verify_claimed(
    provider: &Provider<'_>,
    tx: &Connection,
    identity: &Identity,
    claimed: &ClaimKeyPackagesResponse,
    _now: i64,
) -> Result<Vec<(Uuid, KeyPackage)>, CoreError> {
    if claimed.username != identity.username {
        let blocked = blocked_members(tx, [claimed.username.clone()])?;
        if !blocked.is_empty() {
            return Err(key_change_error(&blocked));
        }
    }
    let mut out = Vec::with_capacity(claimed.key_packages.len());
    for entry in &claimed.key_packages {
        let invalid = |why: &str| {
            CoreError::InvalidCertificate(format!(
                "KeyPackage of {} device {}: {why}",
                claimed.username, entry.device_id
            ))
        };
        let message = MlsMessageIn::tls_deserialize_exact(entry.key_package.as_ref())
            .map_err(|_| invalid("does not parse"))?;
        let MlsMessageBodyIn::KeyPackage(package) = message.extract() else {
            return Err(invalid("is not a KeyPackage"));
        };
        let package = package
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|_| invalid("does not verify"))?;
        if package.ciphersuite() != CIPHERSUITE {
            return Err(invalid("uses another ciphersuite"));
        }
        let leaf = package.leaf_node();
        let cert = verify_member(leaf.credential(), leaf.signature_key().as_slice())?;
        // Only devices the key directory proves for this account are ever added.
        if !is_proven_device(tx, &claimed.username, cert.device_id, &cert.encode())? {
            return Err(CoreError::Transparency(format!(
                "device {} of {} is not in the key directory; refusing to encrypt to it",
                cert.device_id, claimed.username
            )));
        }
        if cert.username != claimed.username
            || cert.device_id != entry.device_id
            || cert.encode() != entry.certificate.as_ref()
        {
            return Err(invalid("its certificate does not match the account"));
        }
        out.push((cert.device_id, package));
    }
    if out.is_empty() {
        return Err(CoreError::InvalidInput(format!(
            "{} has no devices",
            claimed.username
        )));
    }
    Ok(out)
}

/// Writes an outbox row. An application message is stored as its MLS bytes (its text is
/// in history under the same id); commits and proposals as JSON.
pub(crate) fn insert_outbox(
    tx: &Connection,
    outgoing: &Outgoing,
    group_id: &str,
    now: i64,
) -> Result<(), CoreError> {
    let (kind, request, message) = match outgoing {
        Outgoing::Message(m) => ("message", String::new(), Some(m.request.message.as_ref())),
        Outgoing::Commit(_) => ("commit", to_json(outgoing)?, None),
        Outgoing::Proposal(_) => ("proposal", to_json(outgoing)?, None),
    };
    tx.prepare_cached(
        "INSERT INTO outbox (message_id, group_id, kind, request, created_at, message) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        outgoing.message_id().to_string(),
        group_id,
        kind,
        request,
        now,
        message
    ])?;
    Ok(())
}

pub(crate) fn delete_outbox(tx: &Connection, message_id: Uuid) -> Result<(), CoreError> {
    tx.prepare_cached("DELETE FROM outbox WHERE message_id = ?")?
        .execute([message_id.to_string()])?;
    Ok(())
}

/// Adds a notice (membership change etc.) to a conversation's history; returns its id.
/// `shown` is true for notices of the user's own actions, which `sync` need not repeat.
pub(crate) fn insert_notice(
    tx: &Connection,
    group_id: &str,
    text: &str,
    now: i64,
    shown: bool,
) -> Result<String, CoreError> {
    let id = Uuid::new_v4().to_string();
    tx.prepare_cached(
        "INSERT INTO history (id, group_id, sender, kind, text, sent_at_ms, received_at, outgoing, shown) \
         VALUES (?, ?, '', 'notice', ?, ?, ?, 0, ?)",
    )?
    .execute(params![id, group_id, text, now * 1000, now, shown as i64])?;
    Ok(id)
}

pub(crate) fn commit_request(
    group: &MlsGroup,
    commit: &openmls::prelude::MlsMessageOut,
    welcome: Option<&openmls::prelude::MlsMessageOut>,
    added: Vec<Uuid>,
) -> Result<PostCommitRequest, CoreError> {
    // Devices removed by the staged commit, read from the current tree.
    let removed = match group.pending_commit() {
        Some(staged) => staged
            .remove_proposals()
            .filter_map(|remove| group.member_at(remove.remove_proposal().removed()))
            .filter_map(|member| certificate_of(&member.credential))
            .map(|cert| cert.device_id)
            .collect(),
        None => Vec::new(),
    };
    Ok(PostCommitRequest {
        message_id: Uuid::now_v7(),
        commit: Bytes64(tls_bytes(commit)?),
        welcome: welcome.map(tls_bytes).transpose()?.map(Bytes64),
        added_devices: added,
        removed_devices: removed,
    })
}

/// A conversation's status (`active`, `left`, `removed`), `None` if there is none.
pub(crate) fn status_of(tx: &Connection, group_id: &str) -> Result<Option<String>, CoreError> {
    Ok(tx
        .prepare_cached("SELECT status FROM conversations WHERE group_id = ?")?
        .query_row([group_id], |row| row.get(0))
        .optional()?)
}

/// The MLS group of an active conversation; `None` when the conversation is not active
/// or its group is gone.
fn active_group(
    provider: &Provider<'_>,
    tx: &Connection,
    group_id: &str,
) -> Result<Option<MlsGroup>, CoreError> {
    if status_of(tx, group_id)?.as_deref() != Some("active") {
        return Ok(None);
    }
    load_group(provider, group_id)
}

fn require_active(tx: &Connection, group_id: &str) -> Result<(), CoreError> {
    match status_of(tx, group_id)?.as_deref() {
        Some("active") => Ok(()),
        Some(_) => Err(CoreError::NotActive(group_id.to_owned())),
        None => Err(CoreError::UnknownConversation(group_id.to_owned())),
    }
}

fn add_commit(
    provider: &Provider<'_>,
    tx: &Connection,
    identity: &Identity,
    group: &mut MlsGroup,
    claimed: &[ClaimKeyPackagesResponse],
    now: i64,
) -> Result<PostCommitRequest, CoreError> {
    let existing = member_devices(group);
    let mut packages = Vec::new();
    let mut added = Vec::new();
    for claim in claimed {
        for (device, package) in verify_claimed(provider, tx, identity, claim, now)? {
            if device == identity.device_id || existing.iter().any(|m| m.device_id == device) {
                continue;
            }
            added.push(device);
            packages.push(package);
        }
    }
    if packages.is_empty() {
        return Err(CoreError::InvalidInput(
            "everyone named is already in the conversation".into(),
        ));
    }
    let (commit, welcome, _) = group
        .add_members(provider, &identity.signer, &packages)
        .map_err(CoreError::mls)?;
    commit_request(group, &commit, Some(&welcome), added)
}

impl Engine {
    /// Creates a conversation with the given members (their claimed KeyPackages), as a new
    /// MLS group with a pending commit adding them.
    pub fn create_conversation(
        &mut self,
        info: ConversationInfo,
        claimed: &[ClaimKeyPackagesResponse],
        now: i64,
    ) -> Result<OutgoingCommit, CoreError> {
        let (kind, name, peer) = match &info {
            ConversationInfo::Direct => {
                let [peer] = claimed else {
                    return Err(CoreError::InvalidInput(
                        "a direct conversation has exactly one other user".into(),
                    ));
                };
                ("direct", None, Some(peer.username.clone()))
            }
            ConversationInfo::Group { name } => {
                validate_group_name(name).map_err(|e| CoreError::InvalidInput(e.to_string()))?;
                ("group", Some(name.clone()), None)
            }
        };
        let info_bytes = info.encode()?;
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            if let Some(name) = &name {
                let taken: Option<i64> = tx
                    .query_row(
                        "SELECT 1 FROM conversations WHERE kind = 'group' AND name = ? AND status = 'active'",
                        [name],
                        |row| row.get(0),
                    )
                    .optional()?;
                if taken.is_some() {
                    return Err(CoreError::NameTaken(name.clone()));
                }
            }
            let mut raw_id = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut raw_id);
            let group_id = hex::encode(raw_id);
            let extensions = Extensions::single(Extension::Unknown(
                CONVERSATION_INFO_EXTENSION,
                UnknownExtension(info_bytes),
            ))
            .map_err(CoreError::mls)?;
            let config = MlsGroupCreateConfig::builder()
                .ciphersuite(CIPHERSUITE)
                .wire_format_policy(openmls::prelude::PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
                .use_ratchet_tree_extension(true)
                .max_past_epochs(MAX_PAST_EPOCHS)
                .sender_ratchet_configuration(openmls::prelude::SenderRatchetConfiguration::new(
                    OUT_OF_ORDER_TOLERANCE,
                    MAX_FORWARD_DISTANCE,
                ))
                .capabilities(capabilities())
                .with_group_context_extensions(extensions)
                .build();
            let mut group = MlsGroup::new_with_group_id(
                provider,
                &identity.signer,
                &config,
                GroupId::from_slice(&raw_id),
                identity.credential.clone(),
            )
            .map_err(CoreError::mls)?;
            tx.execute(
                "INSERT INTO conversations (group_id, kind, name, peer, status, created_at) \
                 VALUES (?, ?, ?, ?, 'active', ?)",
                params![group_id, kind, name, peer, now],
            )?;
            let request = add_commit(provider, tx, identity, &mut group, claimed, now)?;
            provider.keep_group(group);
            let names: Vec<&str> = claimed.iter().map(|c| c.username.as_str()).collect();
            let outgoing = OutgoingCommit {
                group_id: group_id.clone(),
                create_group: true,
                request,
                announce: false,
                notice: Some(match &name {
                    Some(name) => format!("you created {name:?} with {}", names.join(", ")),
                    None => format!("you started a conversation with {}", names.join(", ")),
                }),
            };
            insert_outbox(tx, &Outgoing::Commit(outgoing.clone()), &group_id, now)?;
            Ok(outgoing)
        })
    }

    /// Adds every device of the claimed users to a conversation (pending commit).
    pub fn begin_add(
        &mut self,
        group_id: &str,
        claimed: &[ClaimKeyPackagesResponse],
        now: i64,
    ) -> Result<OutgoingCommit, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            require_active(tx, group_id)?;
            let mut group = require_group(provider, group_id)?;
            let members = member_devices(&group);
            for claim in claimed {
                if members.iter().any(|m| m.username == claim.username) {
                    return Err(CoreError::AlreadyAMember {
                        user: claim.username.clone(),
                        conversation: group_id.to_owned(),
                    });
                }
            }
            let request = add_commit(provider, tx, identity, &mut group, claimed, now)?;
            provider.keep_group(group);
            let names: Vec<&str> = claimed.iter().map(|c| c.username.as_str()).collect();
            let outgoing = OutgoingCommit {
                group_id: group_id.to_owned(),
                create_group: false,
                request,
                notice: Some(format!("you added {}", names.join(", "))),
                announce: false,
            };
            insert_outbox(tx, &Outgoing::Commit(outgoing.clone()), group_id, now)?;
            Ok(outgoing)
        })
    }

    /// Removes every device of `username` from a conversation (pending commit).
    pub fn begin_remove(
        &mut self,
        group_id: &str,
        username: &str,
        now: i64,
    ) -> Result<OutgoingCommit, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            require_active(tx, group_id)?;
            if username == identity.username {
                return Err(CoreError::InvalidInput(
                    "to remove yourself, use `group leave`".into(),
                ));
            }
            let mut group = require_group(provider, group_id)?;
            let leaves: Vec<LeafNodeIndex> = member_devices(&group)
                .into_iter()
                .filter(|m| m.username == username)
                .map(|m| m.leaf)
                .collect();
            if leaves.is_empty() {
                return Err(CoreError::NotAMember {
                    user: username.to_owned(),
                    conversation: group_id.to_owned(),
                });
            }
            let (commit, welcome, _) = group
                .remove_members(provider, &identity.signer, &leaves)
                .map_err(CoreError::mls)?;
            let request = commit_request(&group, &commit, welcome.as_ref(), Vec::new())?;
            let outgoing = OutgoingCommit {
                group_id: group_id.to_owned(),
                create_group: false,
                request,
                notice: Some(format!("you removed {username}")),
                announce: false,
            };
            insert_outbox(tx, &Outgoing::Commit(outgoing.clone()), group_id, now)?;
            Ok(outgoing)
        })
    }

    /// Commits pending proposals (members who asked to leave), if there are any.
    pub fn begin_commit_proposals(
        &mut self,
        group_id: &str,
        now: i64,
    ) -> Result<Option<OutgoingCommit>, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            let Some(mut group) = active_group(provider, tx, group_id)? else {
                return Ok(None);
            };
            if group.pending_proposals().next().is_none() || group.pending_commit().is_some() {
                return Ok(None);
            }
            let members = member_devices(&group);
            let (commit, welcome, _) = group
                .commit_to_pending_proposals(provider, &identity.signer)
                .map_err(CoreError::mls)?;
            let request = commit_request(&group, &commit, welcome.as_ref(), Vec::new())?;
            let mut leaving: Vec<&str> = members
                .iter()
                .filter(|m| request.removed_devices.contains(&m.device_id))
                .map(|m| m.username.as_str())
                .collect();
            leaving.dedup();
            let outgoing = OutgoingCommit {
                group_id: group_id.to_owned(),
                create_group: false,
                request,
                notice: (!leaving.is_empty()).then(|| format!("{} left", leaving.join(", "))),
                announce: true,
            };
            insert_outbox(tx, &Outgoing::Commit(outgoing.clone()), group_id, now)?;
            Ok(Some(outgoing))
        })
    }

    /// The server accepted a commit: merge it.
    pub fn commit_accepted(
        &mut self,
        outgoing: &OutgoingCommit,
        now: i64,
    ) -> Result<(), CoreError> {
        self.transact(|provider, tx, _| {
            delete_outbox(tx, outgoing.request.message_id)?;
            let Some(mut group) = load_group(provider, &outgoing.group_id)? else {
                return Ok(());
            };
            if group.pending_commit().is_some() {
                group
                    .merge_pending_commit(provider)
                    .map_err(CoreError::mls)?;
            }
            provider.keep_group(group);
            if let Some(notice) = &outgoing.notice {
                insert_notice(tx, &outgoing.group_id, notice, now, !outgoing.announce)?;
            }
            Ok(())
        })
    }

    /// The server refused a commit: drop it. For a brand-new conversation the local group
    /// is dropped too.
    pub fn commit_rejected(&mut self, outgoing: &OutgoingCommit) -> Result<(), CoreError> {
        self.transact(|provider, tx, _| {
            delete_outbox(tx, outgoing.request.message_id)?;
            let Some(mut group) = load_group(provider, &outgoing.group_id)? else {
                return Ok(());
            };
            if outgoing.create_group {
                group.delete(provider.storage())?;
                tx.execute(
                    "DELETE FROM conversations WHERE group_id = ?",
                    [&outgoing.group_id],
                )?;
            } else {
                group
                    .clear_pending_commit(provider.storage())
                    .map_err(CoreError::mls)?;
            }
            Ok(())
        })
    }

    /// Proposes to leave a conversation.
    pub fn begin_leave(&mut self, group_id: &str, now: i64) -> Result<OutgoingProposal, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            require_active(tx, group_id)?;
            let mut group = require_group(provider, group_id)?;
            let proposal = group
                .leave_group(provider, &identity.signer)
                .map_err(CoreError::mls)?;
            let outgoing = OutgoingProposal {
                group_id: group_id.to_owned(),
                request: PostProposalRequest {
                    message_id: Uuid::now_v7(),
                    proposals: vec![Bytes64(tls_bytes(&proposal)?)],
                    leaving_devices: vec![identity.device_id],
                },
            };
            insert_outbox(tx, &Outgoing::Proposal(outgoing.clone()), group_id, now)?;
            Ok(outgoing)
        })
    }

    /// The server accepted the leave: forget the group's keys.
    pub fn leave_accepted(
        &mut self,
        outgoing: &OutgoingProposal,
        now: i64,
    ) -> Result<(), CoreError> {
        self.transact(|provider, tx, _| {
            delete_outbox(tx, outgoing.request.message_id)?;
            if let Some(mut group) = load_group(provider, &outgoing.group_id)? {
                group.delete(provider.storage())?;
            }
            tx.execute(
                "UPDATE conversations SET status = 'left' WHERE group_id = ?",
                [&outgoing.group_id],
            )?;
            insert_notice(tx, &outgoing.group_id, "you left", now, true)?;
            Ok(())
        })
    }

    /// The server refused the leave proposal: drop it.
    pub fn leave_rejected(&mut self, outgoing: &OutgoingProposal) -> Result<(), CoreError> {
        self.transact(|provider, tx, _| {
            delete_outbox(tx, outgoing.request.message_id)?;
            if let Some(mut group) = load_group(provider, &outgoing.group_id)? {
                group
                    .clear_pending_proposals(provider.storage())
                    .map_err(CoreError::mls)?;
            }
            Ok(())
        })
    }

    /// Encrypts a text message for a conversation; it is in history (as sent by us) and in
    /// the outbox when this returns. `message_id` is reused when re-encrypting after the
    /// group moved to a new epoch.
    pub fn encrypt_text(
        &mut self,
        group_id: &str,
        text: &str,
        message_id: Option<Uuid>,
        now_ms: i64,
    ) -> Result<OutgoingMessage, CoreError> {
        let mut sent = self.encrypt_texts(group_id, &[(text, message_id)], now_ms)?;
        sent.pop()
            .ok_or_else(|| CoreError::Codec("no message was encrypted".into()))
    }

    /// Encrypts several texts for a conversation in one transaction (one disk flush), in
    /// order; each is in history and in the outbox when this returns. Each text may reuse
    /// a message id as in [`Engine::encrypt_text`].
    pub fn encrypt_texts(
        &mut self,
        group_id: &str,
        texts: &[(&str, Option<Uuid>)],
        now_ms: i64,
    ) -> Result<Vec<OutgoingMessage>, CoreError> {
        for (text, _) in texts {
            if text.trim().is_empty() {
                return Err(CoreError::InvalidInput("the message is empty".into()));
            }
            if text.len() > limits::TEXT_MAX_BYTES {
                return Err(CoreError::InvalidInput(format!(
                    "the message is longer than {} bytes",
                    limits::TEXT_MAX_BYTES
                )));
            }
        }
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            // The peer of a 1:1 counts even if none of their devices is in the group now.
            let (status, peer): (String, Option<String>) = tx
                .prepare_cached(
                    "SELECT status, CASE kind WHEN 'direct' THEN peer END \
                     FROM conversations WHERE group_id = ?",
                )?
                .query_row([group_id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?
                .ok_or_else(|| CoreError::UnknownConversation(group_id.to_owned()))?;
            if status != "active" {
                return Err(CoreError::NotActive(group_id.to_owned()));
            }
            let mut group = require_group(provider, group_id)?;
            let blocked = blocked_members(
                tx,
                member_devices(&group)
                    .into_iter()
                    .map(|m| m.username)
                    .chain(peer),
            )?;
            if !blocked.is_empty() {
                return Err(key_change_error(&blocked));
            }
            // Gossip our newest directory root to the other members.
            let gossip = current_gossip(tx)?.map(|g| g.encode()).transpose()?;
            let now = now_ms / 1000;
            let mut sent = Vec::with_capacity(texts.len());
            for (text, message_id) in texts {
                // Time-ordered ids keep the server's idempotency index append-only.
                let id = message_id.unwrap_or_else(Uuid::now_v7);
                let payload = AppMessage::text(id, now_ms, (*text).to_owned()).encode()?;
                if let Some(gossip) = &gossip {
                    group.set_aad(gossip.clone());
                }
                let ciphertext = group
                    .create_message(provider, &identity.signer, &payload)
                    .map_err(CoreError::mls)?;
                let outgoing = OutgoingMessage {
                    group_id: group_id.to_owned(),
                    request: PostMessageRequest {
                        message_id: id,
                        message: Bytes64(tls_bytes(&ciphertext)?),
                    },
                };
                insert_outbox(tx, &Outgoing::Message(outgoing.clone()), group_id, now)?;
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO history (id, group_id, sender, sender_device, kind, \
                     text, sent_at_ms, received_at, outgoing, shown) \
                     VALUES (?, ?, ?, ?, 'text', ?, ?, ?, 1, 1)",
                )?
                .execute(params![
                    id.to_string(),
                    group_id,
                    identity.username,
                    identity.device_id.to_string(),
                    text,
                    now_ms,
                    now
                ])?;
                sent.push(outgoing);
            }
            // The group goes back to the engine's cache once this transaction commits.
            provider.keep_group(group);
            Ok(sent)
        })
    }

    /// The server stored the message for every recipient.
    pub fn message_accepted(&mut self, message_id: Uuid) -> Result<(), CoreError> {
        self.messages_accepted(&[message_id])
    }

    /// The server stored these messages for every recipient (one transaction).
    pub fn messages_accepted(&mut self, message_ids: &[Uuid]) -> Result<(), CoreError> {
        self.transact(|_, tx, _| {
            for id in message_ids {
                delete_outbox(tx, *id)?;
            }
            Ok(())
        })
    }

    /// The message was for a stale epoch: drop its ciphertext and return its text, to be
    /// encrypted again (same id) once the new epoch is processed.
    pub fn message_stale(&mut self, message_id: Uuid) -> Result<Option<String>, CoreError> {
        self.transact(|_, tx, _| {
            // Rows written before migration 7 carry their text; newer ones find it in
            // history under the same id.
            let text: Option<Option<String>> = tx
                .query_row(
                    "SELECT COALESCE(o.text, h.text) FROM outbox o \
                     LEFT JOIN history h ON h.id = o.message_id WHERE o.message_id = ?",
                    [message_id.to_string()],
                    |row| row.get(0),
                )
                .optional()?;
            delete_outbox(tx, message_id)?;
            Ok(text.flatten())
        })
    }

    /// The server refused the message for good: remove it from history and outbox.
    pub fn message_failed(&mut self, message_id: Uuid) -> Result<(), CoreError> {
        self.transact(|_, tx, _| {
            delete_outbox(tx, message_id)?;
            tx.execute("DELETE FROM history WHERE id = ?", [message_id.to_string()])?;
            Ok(())
        })
    }

    /// Everything waiting in the outbox, oldest first (by second, then by message id: ids
    /// are time-ordered UUIDv7).
    pub fn outbox(&self) -> Result<Vec<Outgoing>, CoreError> {
        let mut statement = self.conn.prepare(
            "SELECT message_id, group_id, request, message FROM outbox \
             ORDER BY created_at, message_id",
        )?;
        let mut rows = statement.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let message: Option<Vec<u8>> = row.get(3)?;
            out.push(match message {
                Some(message) => {
                    let id: String = row.get(0)?;
                    Outgoing::Message(OutgoingMessage {
                        group_id: row.get(1)?,
                        request: PostMessageRequest {
                            message_id: Uuid::parse_str(&id)
                                .map_err(|e| CoreError::Codec(e.to_string()))?,
                            message: Bytes64(message),
                        },
                    })
                }
                None => serde_json::from_str(&row.get::<_, String>(2)?)
                    .map_err(|e| CoreError::Codec(e.to_string()))?,
            });
        }
        Ok(out)
    }

    /// Epoch, members and epoch authenticator of a conversation's MLS group: two members
    /// with equal snapshots agree on the group state.
    pub fn group_snapshot(&mut self, group_id: &str) -> Result<GroupSnapshot, CoreError> {
        self.transact(|provider, _, _| {
            let group = require_group(provider, group_id)?;
            let mut members: Vec<String> = member_devices(&group)
                .into_iter()
                .map(|m| format!("{}/{}", m.username, m.device_id))
                .collect();
            members.sort();
            Ok(GroupSnapshot {
                epoch: group.epoch().as_u64(),
                members,
                epoch_authenticator: hex::encode(group.epoch_authenticator().as_slice()),
            })
        })
    }

    /// The member devices of a conversation's MLS group.
    pub fn members(&mut self, group_id: &str) -> Result<Vec<MemberDevice>, CoreError> {
        self.transact(|provider, _, _| Ok(member_devices(&require_group(provider, group_id)?)))
    }

    /// Which devices a group lacks and which it holds in excess, compared with the
    /// directory's device list of each account in it (`directory` maps a username to its
    /// devices; accounts not in the map are left alone). Accounts whose key change awaits
    /// acceptance are left alone too.
    pub fn plan_reconcile(
        &mut self,
        group_id: &str,
        directory: &std::collections::HashMap<String, Vec<Uuid>>,
    ) -> Result<ReconcilePlan, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            let mut plan = ReconcilePlan::default();
            let Some(group) = active_group(provider, tx, group_id)? else {
                return Ok(plan);
            };
            let members = member_devices(&group);
            let mut accounts: Vec<String> = members.iter().map(|m| m.username.clone()).collect();
            accounts.sort();
            accounts.dedup();
            // While a verified contact's key change awaits acceptance, their part of the
            // group is left exactly as it is: nothing added, nothing removed.
            let blocked = blocked_members(tx, accounts.iter().cloned())?;
            for member in &members {
                if member.device_id == identity.device_id || blocked.contains(&member.username) {
                    continue;
                }
                if let Some(listed) = directory.get(&member.username)
                    && !listed.contains(&member.device_id)
                {
                    plan.stale.push(member.device_id);
                }
            }
            for account in &accounts {
                if blocked.contains(account) {
                    continue;
                }
                for device in directory.get(account).into_iter().flatten() {
                    if !members.iter().any(|m| m.device_id == *device) {
                        plan.missing.push(*device);
                    }
                }
            }
            Ok(plan)
        })
    }

    /// Stages one commit that adds the claimed devices and removes the stale ones (those
    /// still in the group), or returns `None` when there is nothing left to do.
    pub fn begin_reconcile(
        &mut self,
        group_id: &str,
        claimed: &[ClaimKeyPackagesResponse],
        stale: &[Uuid],
        now: i64,
    ) -> Result<Option<OutgoingCommit>, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            let Some(mut group) = active_group(provider, tx, group_id)? else {
                return Ok(None);
            };
            let members = member_devices(&group);
            let leaves: Vec<LeafNodeIndex> = members
                .iter()
                .filter(|m| stale.contains(&m.device_id) && m.device_id != identity.device_id)
                .map(|m| m.leaf)
                .collect();
            let mut packages = Vec::new();
            let mut added = Vec::new();
            for claim in claimed {
                for (device, package) in verify_claimed(provider, tx, identity, claim, now)? {
                    if members.iter().any(|m| m.device_id == device) || added.contains(&device) {
                        continue;
                    }
                    added.push(device);
                    packages.push(package);
                }
            }
            if leaves.is_empty() && packages.is_empty() {
                return Ok(None);
            }
            let bundle = group
                .commit_builder()
                .propose_removals(leaves)
                .propose_adds(packages)
                .load_psks(provider.storage())
                .map_err(CoreError::mls)?
                .build(provider.rand(), provider.crypto(), &identity.signer, |_| {
                    true
                })
                .map_err(CoreError::mls)?
                .stage_commit(provider)
                .map_err(CoreError::mls)?;
            let welcome = bundle.to_welcome_msg();
            let (commit, _, _) = bundle.into_contents();
            let request = commit_request(&group, &commit, welcome.as_ref(), added)?;
            let outgoing = OutgoingCommit {
                group_id: group_id.to_owned(),
                create_group: false,
                request,
                notice: None,
                announce: false,
            };
            insert_outbox(tx, &Outgoing::Commit(outgoing.clone()), group_id, now)?;
            Ok(Some(outgoing))
        })
    }

    /// Groups that have proposals waiting to be committed.
    pub fn groups_with_pending_proposals(&mut self) -> Result<Vec<String>, CoreError> {
        let ids: Vec<String> = {
            let mut statement = self
                .conn
                .prepare("SELECT group_id FROM conversations WHERE status = 'active'")?;
            let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        self.transact(|provider, _, _| {
            let mut out = Vec::new();
            for id in ids {
                if let Some(group) = load_group(provider, &id)?
                    && group.pending_proposals().next().is_some()
                {
                    out.push(id);
                }
            }
            Ok(out)
        })
    }
}
