//! The client: drives the [`Engine`] over the [`Transport`].
//!
//! This is where the protocol meets the network: logging in (and again when a token
//! expires), sending what the engine produced and reporting the answer back, retrying a
//! commit or message that lost a race for the group's epoch after processing what was
//! missed, draining the mailbox, topping up KeyPackages and following the WebSocket with
//! reconnects. Front ends call only this type.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use rand::Rng as _;
use sealpost_proto::api::LoginRequest;
use sealpost_proto::{Bytes64, ErrorCode, limits};
use tokio_tungstenite::tungstenite::Message;

use crate::engine::conversations::{MemberDevice, Outgoing, OutgoingCommit, OutgoingMessage};
use crate::engine::{ConversationKind, ConversationSummary, Engine, HistoryEntry};
use crate::error::CoreError;
use crate::payload::ConversationInfo;
use crate::transport::Transport;

/// How often an operation is retried after losing an epoch race.
const MAX_ATTEMPTS: usize = 8;
/// Top up one-time KeyPackages when fewer than this many are left on the server.
const KEY_PACKAGE_LOW_WATER: u64 = 50;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_secs() -> i64 {
    now_ms() / 1000
}

/// What `whoami` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WhoAmI {
    pub username: String,
    pub device_id: String,
    pub server: String,
    /// The account's public key, hex.
    pub account_key: String,
}

/// Result of sending a commit.
enum Submitted {
    Accepted,
    /// Another commit won the epoch; process it and try again.
    Conflict,
}

/// A Sealpost client bound to one home directory.
pub struct Client {
    /// Epoch conflicts met (commits or messages that lost a race); for diagnostics.
    conflicts: std::sync::atomic::AtomicUsize,
    engine: Mutex<Engine>,
    transport: Transport,
    home: PathBuf,
}

/// The database file inside a home directory.
pub fn database_path(home: &Path) -> PathBuf {
    home.join("sealpost.db")
}

impl Client {
    /// Opens the client in `home`; it must hold a registered account.
    pub fn open(home: &Path) -> Result<Self, CoreError> {
        if !database_path(home).exists() {
            return Err(CoreError::NotRegistered);
        }
        let engine = Engine::open(&database_path(home))?;
        let identity = engine.identity()?;
        let transport = Transport::new(&identity.server_url)?;
        transport.set_token(engine.token()?);
        Ok(Self {
            conflicts: Default::default(),
            engine: Mutex::new(engine),
            transport,
            home: home.to_owned(),
        })
    }

    /// Creates an account with this device as its first device, registers it on the
    /// server, logs in and uploads KeyPackages.
    pub async fn register(
        home: &Path,
        username: &str,
        server_url: &str,
        key_packages: usize,
    ) -> Result<Self, CoreError> {
        std::fs::create_dir_all(home)?;
        let mut engine = Engine::open(&database_path(home))?;
        if let Some(identity) = engine.identity.as_ref() {
            return Err(CoreError::AlreadyRegistered(identity.username.clone()));
        }
        let transport = Transport::new(server_url)?;
        // Resume an interrupted registration of the same name, so a retry after a crash
        // neither loses the key nor is refused as "username taken".
        let resumed = engine.pending_registration()?.filter(|pending| {
            pending.username == username
                && engine.server_url().ok().flatten().as_deref() == Some(server_url)
        });
        let request = match resumed {
            Some(request) => request,
            None => engine.create_identity(username, server_url)?,
        };
        let client = Self {
            conflicts: Default::default(),
            engine: Mutex::new(engine),
            transport,
            home: home.to_owned(),
        };
        match client.transport.register(&request).await {
            Ok(_) => {}
            Err(CoreError::Server {
                code: ErrorCode::UsernameTaken,
                ..
            }) if client.login().await.is_ok() => {
                // Our own earlier attempt had registered: the device key logs in.
            }
            Err(err) => return Err(err),
        }
        client.engine()?.confirm_registration()?;
        client.login().await?;
        client.upload_key_packages(key_packages, true).await?;
        Ok(client)
    }

    fn engine(&self) -> Result<MutexGuard<'_, Engine>, CoreError> {
        self.engine
            .lock()
            .map_err(|_| CoreError::Codec("the engine lock is poisoned".into()))
    }

    /// How many times this client lost an epoch race and retried.
    pub fn conflicts_seen(&self) -> usize {
        self.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn whoami(&self) -> Result<WhoAmI, CoreError> {
        let engine = self.engine()?;
        let identity = engine.identity()?;
        Ok(WhoAmI {
            username: identity.username.clone(),
            device_id: identity.device_id.to_string(),
            server: identity.server_url.clone(),
            account_key: hex::encode(identity.account_key()),
        })
    }

    /// Logs in with the device key (challenge-response) and keeps the token.
    async fn login(&self) -> Result<(), CoreError> {
        let device_id = self
            .engine()?
            .device_id()?
            .ok_or(CoreError::NotRegistered)?;
        let challenge = self.transport.challenge(device_id).await?;
        let signature = self.engine()?.sign_login(challenge.nonce.as_ref())?;
        let response = self
            .transport
            .login(&LoginRequest {
                challenge_id: challenge.challenge_id,
                signature: Bytes64(signature),
            })
            .await?;
        self.engine()?.set_token(&response.token)?;
        self.transport.set_token(Some(response.token));
        Ok(())
    }

    /// Runs an authenticated call, logging in first if needed and once more if the token
    /// was refused.
    async fn authed<T, F, Fut>(&self, call: F) -> Result<T, CoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, CoreError>>,
    {
        if self.transport.token().is_none() {
            self.login().await?;
        }
        match call().await {
            Err(err) if err.server_code() == Some(ErrorCode::Unauthorized) => {
                self.login().await?;
                call().await
            }
            other => other,
        }
    }

    async fn upload_key_packages(&self, count: usize, last_resort: bool) -> Result<(), CoreError> {
        let request = self.engine()?.generate_key_packages(count, last_resort)?;
        self.authed(|| self.transport.upload_key_packages(&request))
            .await?;
        Ok(())
    }

    /// Uploads fresh one-time KeyPackages when the server is running low.
    async fn top_up_key_packages(&self) -> Result<(), CoreError> {
        let count = self.authed(|| self.transport.key_package_count()).await?;
        if count.one_time < KEY_PACKAGE_LOW_WATER || !count.last_resort {
            let missing = (crate::engine::KEY_PACKAGE_TARGET as u64).saturating_sub(count.one_time);
            self.upload_key_packages(missing as usize, !count.last_resort)
                .await?;
        }
        Ok(())
    }

    /// Sends a commit and reports the server's answer to the engine.
    async fn submit_commit(&self, outgoing: &OutgoingCommit) -> Result<Submitted, CoreError> {
        if outgoing.create_group {
            match self
                .authed(|| self.transport.create_group(&outgoing.group_id))
                .await
            {
                Ok(_) => {}
                Err(err) if err.server_code() == Some(ErrorCode::GroupExists) => {}
                Err(err) => {
                    if matches!(err, CoreError::Server { .. }) {
                        self.engine()?.commit_rejected(outgoing)?;
                    }
                    return Err(err);
                }
            }
        }
        let answer = self
            .authed(|| {
                self.transport
                    .post_commit(&outgoing.group_id, &outgoing.request)
            })
            .await;
        match answer {
            Ok(_) => {
                self.engine()?.commit_accepted(outgoing, now_secs())?;
                Ok(Submitted::Accepted)
            }
            Err(err) if err.server_code() == Some(ErrorCode::EpochConflict) => {
                self.conflicts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.engine()?.commit_rejected(outgoing)?;
                Ok(Submitted::Conflict)
            }
            Err(err @ CoreError::Server { .. }) => {
                self.engine()?.commit_rejected(outgoing)?;
                Err(err)
            }
            // Network trouble: the commit stays in the outbox and is resent later.
            Err(err) => Err(err),
        }
    }

    /// Sends an application message; on an epoch conflict re-encrypts it (same id) after
    /// processing what was missed.
    async fn submit_message(&self, mut outgoing: OutgoingMessage) -> Result<(), CoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let answer = self
                .authed(|| {
                    self.transport
                        .post_message(&outgoing.group_id, &outgoing.request)
                })
                .await;
            match answer {
                Ok(_) => return self.engine()?.message_accepted(outgoing.request.message_id),
                Err(err) if err.server_code() == Some(ErrorCode::EpochConflict) => {
                    self.conflicts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let id = outgoing.request.message_id;
                    let Some(text) = self.engine()?.message_stale(id)? else {
                        return Ok(());
                    };
                    self.drain_mailbox().await?;
                    outgoing = self.engine()?.encrypt_text(
                        &outgoing.group_id,
                        &text,
                        Some(id),
                        now_ms(),
                    )?;
                }
                Err(err @ CoreError::Server { .. }) => {
                    self.engine()?.message_failed(outgoing.request.message_id)?;
                    return Err(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(CoreError::TooManyConflicts(MAX_ATTEMPTS))
    }

    /// Resends everything a previous run left in the outbox.
    async fn flush_outbox(&self) -> Result<(), CoreError> {
        let pending = self.engine()?.outbox()?;
        for outgoing in pending {
            match outgoing {
                Outgoing::Commit(commit) => {
                    self.submit_commit(&commit).await?;
                }
                Outgoing::Message(message) => self.submit_message(message).await?,
                Outgoing::Proposal(proposal) => {
                    let answer = self
                        .authed(|| {
                            self.transport
                                .post_proposal(&proposal.group_id, &proposal.request)
                        })
                        .await;
                    match answer {
                        Ok(_) => self.engine()?.leave_accepted(&proposal, now_secs())?,
                        Err(err @ CoreError::Server { .. }) => {
                            self.engine()?.leave_rejected(&proposal)?;
                            if err.server_code() != Some(ErrorCode::EpochConflict) {
                                return Err(err);
                            }
                        }
                        Err(err) => return Err(err),
                    }
                }
            }
        }
        Ok(())
    }

    /// Fetches, processes and acknowledges everything in the mailbox.
    async fn drain_mailbox(&self) -> Result<(), CoreError> {
        loop {
            let mailbox = self
                .authed(|| self.transport.fetch_mailbox(limits::MAILBOX_FETCH_MAX))
                .await?;
            if mailbox.envelopes.is_empty() {
                return Ok(());
            }
            let acks = self
                .engine()?
                .process_batch(&mailbox.envelopes, now_secs())?;
            for chunk in acks.chunks(limits::ACK_MAX_IDS) {
                let ids = chunk.to_vec();
                self.authed(|| self.transport.ack(ids.clone())).await?;
            }
            if !mailbox.more {
                return Ok(());
            }
        }
    }

    /// Runs a commit-producing operation until it wins an epoch, processing what it
    /// missed between attempts.
    async fn commit_with_retries<F>(&self, mut build: F) -> Result<bool, CoreError>
    where
        F: FnMut(&mut Engine) -> Result<Option<OutgoingCommit>, CoreError>,
    {
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                self.drain_mailbox().await?;
                // Back off a little so racing committers do not collide forever.
                let jitter = rand::thread_rng().gen_range(0..(20 << attempt.min(5)));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let Some(outgoing) = build(&mut *self.engine()?)? else {
                return Ok(false);
            };
            match self.submit_commit(&outgoing).await? {
                Submitted::Accepted => return Ok(true),
                Submitted::Conflict => continue,
            }
        }
        Err(CoreError::TooManyConflicts(MAX_ATTEMPTS))
    }

    /// Commits proposals that members sent to leave.
    async fn commit_pending_proposals(&self) -> Result<(), CoreError> {
        let groups = self.engine()?.groups_with_pending_proposals()?;
        for group_id in groups {
            self.commit_with_retries(|engine| engine.begin_commit_proposals(&group_id, now_secs()))
                .await?;
        }
        Ok(())
    }

    /// Brings local state up to date: resends the outbox, drains the mailbox, commits
    /// pending leaves and tops up KeyPackages.
    async fn catch_up(&self) -> Result<(), CoreError> {
        self.flush_outbox().await?;
        self.drain_mailbox().await?;
        self.commit_pending_proposals().await?;
        self.top_up_key_packages().await?;
        Ok(())
    }

    /// Fetches and processes new messages; returns what has not been shown yet.
    pub async fn sync(&self) -> Result<Vec<HistoryEntry>, CoreError> {
        self.catch_up().await?;
        self.engine()?.take_unshown()
    }

    /// Stays connected over the WebSocket and calls `on_entries` with new messages as
    /// they arrive, until `stop` resolves. Reconnects with exponential backoff and jitter
    /// when the connection drops (for example while the server restarts).
    pub async fn follow<F>(
        &self,
        mut on_entries: F,
        stop: impl Future<Output = ()>,
    ) -> Result<(), CoreError>
    where
        F: FnMut(Vec<HistoryEntry>),
    {
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(250);
        loop {
            let connected = tokio::select! {
                () = &mut stop => return Ok(()),
                socket = self.authed(|| self.transport.connect_socket()) => socket,
            };
            let mut socket = match connected {
                Ok(socket) => {
                    backoff = Duration::from_millis(250);
                    socket
                }
                Err(err @ CoreError::Server { .. }) => return Err(err),
                Err(err) => {
                    tracing::info!("reconnecting: {err}");
                    let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
                    tokio::select! {
                        () = &mut stop => return Ok(()),
                        () = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            // Anything that arrived while disconnected.
            match self.sync().await {
                Ok(entries) if !entries.is_empty() => on_entries(entries),
                Ok(_) => {}
                Err(err @ CoreError::Unreachable { .. }) => {
                    tracing::info!("sync failed, reconnecting: {err}");
                    continue;
                }
                Err(err) => return Err(err),
            }
            loop {
                let frame = tokio::select! {
                    () = &mut stop => return Ok(()),
                    frame = socket.next() => frame,
                };
                match frame {
                    Some(Ok(Message::Text(_))) => match self.sync().await {
                        Ok(entries) if !entries.is_empty() => on_entries(entries),
                        Ok(_) => {}
                        Err(err @ CoreError::Unreachable { .. }) => {
                            tracing::info!("sync failed, reconnecting: {err}");
                            break;
                        }
                        Err(err) => return Err(err),
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
        }
    }

    /// Claims a KeyPackage for every device of each user (validating the names).
    async fn claim_all(
        &self,
        users: &[String],
    ) -> Result<Vec<sealpost_proto::api::ClaimKeyPackagesResponse>, CoreError> {
        let mut claimed = Vec::with_capacity(users.len());
        for user in users {
            sealpost_proto::names::validate_username(user)
                .map_err(|e| CoreError::InvalidInput(format!("{user:?}: {e}")))?;
            let claim = self
                .authed(|| self.transport.claim_key_packages(user))
                .await
                .map_err(|err| match err.server_code() {
                    Some(ErrorCode::UserNotFound) => {
                        CoreError::InvalidInput(format!("there is no user named {user:?}"))
                    }
                    _ => err,
                })?;
            claimed.push(claim);
        }
        Ok(claimed)
    }

    /// Sends a text message to a user, starting a 1:1 conversation on first use.
    pub async fn send_direct(&self, username: &str, text: &str) -> Result<HistoryEntry, CoreError> {
        let me = self.whoami()?.username;
        if username == me {
            return Err(CoreError::InvalidInput(
                "you cannot start a conversation with yourself".into(),
            ));
        }
        self.catch_up().await?;
        let existing = self
            .engine()?
            .find_conversation(username)
            .ok()
            .filter(|c| c.kind == ConversationKind::Direct && c.status == "active");
        let conversation = match existing {
            Some(conversation) => conversation,
            None => {
                let claimed = self.claim_all(&[username.to_owned()]).await?;
                let outgoing = self.engine()?.create_conversation(
                    ConversationInfo::Direct,
                    &claimed,
                    now_secs(),
                )?;
                // A brand-new group cannot lose an epoch race: nobody else knows it yet.
                self.submit_commit(&outgoing).await?;
                self.engine()?.find_conversation(username)?
            }
        };
        self.send_to(&conversation, text).await
    }

    /// Sends a text message to a group by name.
    pub async fn send_group(&self, name: &str, text: &str) -> Result<HistoryEntry, CoreError> {
        self.catch_up().await?;
        let conversation = self.group(name)?;
        self.send_to(&conversation, text).await
    }

    async fn send_to(
        &self,
        conversation: &ConversationSummary,
        text: &str,
    ) -> Result<HistoryEntry, CoreError> {
        if conversation.status != "active" {
            return Err(CoreError::NotActive(conversation.name.clone()));
        }
        let outgoing = self
            .engine()?
            .encrypt_text(&conversation.group_id, text, None, now_ms())?;
        let id = outgoing.request.message_id;
        self.submit_message(outgoing).await?;
        let engine = self.engine()?;
        crate::engine::queries::history_entry(&engine.conn, &id.to_string())?
            .ok_or_else(|| CoreError::Codec("sent message missing from history".into()))
    }

    fn group(&self, name: &str) -> Result<ConversationSummary, CoreError> {
        let conversation = self.engine()?.find_conversation(name)?;
        if conversation.kind != ConversationKind::Group {
            return Err(CoreError::UnknownConversation(name.to_owned()));
        }
        Ok(conversation)
    }

    /// Creates a group with the given members.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[String],
    ) -> Result<ConversationSummary, CoreError> {
        let me = self.whoami()?.username;
        let mut users: Vec<String> = Vec::new();
        for user in members {
            let user = user.trim().to_owned();
            if user.is_empty() || user == me || users.contains(&user) {
                continue;
            }
            users.push(user);
        }
        if users.is_empty() {
            return Err(CoreError::InvalidInput(
                "name at least one other member with --members".into(),
            ));
        }
        self.catch_up().await?;
        if self
            .engine()?
            .conversations()?
            .iter()
            .any(|c| c.kind == ConversationKind::Group && c.name == name && c.status == "active")
        {
            return Err(CoreError::NameTaken(name.to_owned()));
        }
        let claimed = self.claim_all(&users).await?;
        let outgoing = self.engine()?.create_conversation(
            ConversationInfo::Group {
                name: name.to_owned(),
            },
            &claimed,
            now_secs(),
        )?;
        self.submit_commit(&outgoing).await?;
        self.group(name)
    }

    /// Adds a user (all their devices) to a group.
    pub async fn add_member(&self, name: &str, user: &str) -> Result<(), CoreError> {
        self.catch_up().await?;
        let conversation = self.group(name)?;
        // Validate membership before claiming, so no KeyPackage is wasted.
        if self
            .engine()?
            .members(&conversation.group_id)?
            .iter()
            .any(|m| m.username == user)
        {
            return Err(CoreError::AlreadyAMember {
                user: user.to_owned(),
                conversation: name.to_owned(),
            });
        }
        let claimed = self.claim_all(&[user.to_owned()]).await?;
        self.commit_with_retries(|engine| {
            engine
                .begin_add(&conversation.group_id, &claimed, now_secs())
                .map(Some)
        })
        .await?;
        Ok(())
    }

    /// Removes a user (all their devices) from a group.
    pub async fn remove_member(&self, name: &str, user: &str) -> Result<(), CoreError> {
        self.catch_up().await?;
        let conversation = self.group(name)?;
        self.commit_with_retries(|engine| {
            engine
                .begin_remove(&conversation.group_id, user, now_secs())
                .map(Some)
        })
        .await?;
        Ok(())
    }

    /// Leaves a group.
    pub async fn leave(&self, name: &str) -> Result<(), CoreError> {
        self.catch_up().await?;
        let conversation = self.group(name)?;
        for _ in 0..MAX_ATTEMPTS {
            let outgoing = self
                .engine()?
                .begin_leave(&conversation.group_id, now_secs())?;
            let answer = self
                .authed(|| {
                    self.transport
                        .post_proposal(&outgoing.group_id, &outgoing.request)
                })
                .await;
            match answer {
                Ok(_) => return self.engine()?.leave_accepted(&outgoing, now_secs()),
                Err(err) if err.server_code() == Some(ErrorCode::EpochConflict) => {
                    self.engine()?.leave_rejected(&outgoing)?;
                    self.drain_mailbox().await?;
                }
                Err(err @ CoreError::Server { .. }) => {
                    self.engine()?.leave_rejected(&outgoing)?;
                    return Err(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(CoreError::TooManyConflicts(MAX_ATTEMPTS))
    }

    /// The member devices of a group, as the MLS group (not the server) says.
    pub async fn members(&self, name: &str) -> Result<Vec<MemberDevice>, CoreError> {
        self.catch_up().await?;
        let conversation = self.engine()?.find_conversation(name)?;
        if conversation.status != "active" {
            return Err(CoreError::NotActive(name.to_owned()));
        }
        self.engine()?.members(&conversation.group_id)
    }

    /// The local MLS state of a conversation (no network).
    pub fn group_snapshot(
        &self,
        name: &str,
    ) -> Result<crate::engine::conversations::GroupSnapshot, CoreError> {
        let mut engine = self.engine()?;
        let conversation = engine.find_conversation(name)?;
        engine.group_snapshot(&conversation.group_id)
    }

    pub fn conversations(&self) -> Result<Vec<ConversationSummary>, CoreError> {
        self.engine()?.conversations()
    }

    pub fn history(&self, name: &str, limit: usize) -> Result<Vec<HistoryEntry>, CoreError> {
        let engine = self.engine()?;
        let conversation = engine.find_conversation(name)?;
        engine.history(&conversation, limit)
    }

    /// Fetches raw envelopes without processing or acknowledging them (diagnostics and
    /// tests).
    pub async fn peek_mailbox(&self) -> Result<Vec<sealpost_proto::api::Envelope>, CoreError> {
        Ok(self
            .authed(|| self.transport.fetch_mailbox(limits::MAILBOX_FETCH_MAX))
            .await?
            .envelopes)
    }

    /// Processes one envelope as if the server had delivered it (tests, diagnostics).
    pub fn process_raw(
        &self,
        envelope: &sealpost_proto::api::Envelope,
    ) -> Result<Vec<HistoryEntry>, CoreError> {
        self.engine()?.process_envelope(envelope, now_secs())
    }
}
