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
use sealpost_proto::api::{
    CompleteLinkRequest, CreateLinkRequest, JoinLinkRequest, LinkResultRequest, LoginRequest,
    RenameDeviceRequest,
};
use sealpost_proto::{Bytes64, ErrorCode, limits};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::engine::contacts::{ContactKey, SafetyNumber};
use crate::engine::conversations::{MemberDevice, Outgoing, OutgoingCommit, OutgoingMessage};
use crate::engine::{ConversationKind, ConversationSummary, Engine, HistoryEntry};
use crate::error::CoreError;
use crate::kt::KtKeys;
use crate::link::LinkCode;
use crate::payload::ConversationInfo;
use crate::transport::Transport;

/// How long a contact's directory entry (account key, devices) is trusted before it is
/// fetched again during `sync`. Sending to a 1:1 always fetches the peer's entry first.
const DIRECTORY_TTL_SECS: i64 = 60;
/// How long to wait for the key directory to publish a new account or device.
const KT_PUBLISH_WAIT: Duration = Duration::from_secs(15);
/// How long `device link` waits for the new device.
const LINK_WAIT: Duration = Duration::from_secs(600);
/// How long the existing device waits for a linked device's KeyPackages.
const NEW_DEVICE_WAIT: Duration = Duration::from_secs(60);

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

/// A device as `devices` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceEntry {
    pub device_id: String,
    pub name: String,
    pub created: String,
    /// This is the device the command runs on.
    pub current: bool,
}

/// What `audit` verified.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditSummary {
    pub from: u64,
    pub to: u64,
    pub epochs: u64,
}

/// Epochs per append-only proof request.
const AUDIT_CHUNK: u64 = 50;

/// The outcome of linking, seen from the existing device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkedDevice {
    pub device_id: String,
    pub name: String,
    /// Active conversations the new device was added to.
    pub conversations: usize,
}

/// Explains link failures in the words of the linking flow.
fn link_error(err: CoreError) -> CoreError {
    match err.server_code() {
        Some(ErrorCode::LinkInvalid) => CoreError::InvalidInput(
            "the link code is unknown, expired or already used; make a new one with              `sealpost device link` on your other device"
                .into(),
        ),
        Some(ErrorCode::LinkProofInvalid) => CoreError::InvalidInput(
            "the link code does not match; check it for typos".into(),
        ),
        _ => err,
    }
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
        Self::register_pinned(home, username, server_url, key_packages, None).await
    }

    /// Like [`Self::register`], pinning the given key-directory signing key (hex) instead
    /// of trusting the one the server presents now.
    pub async fn register_pinned(
        home: &Path,
        username: &str,
        server_url: &str,
        key_packages: usize,
        kt_key: Option<&str>,
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
        client.pin_kt_keys(kt_key).await?;
        client.engine()?.confirm_registration()?;
        client.login().await?;
        client.upload_key_packages(key_packages, true).await?;
        Ok(client)
    }

    /// Pins the server's key-directory keys, checking them against `expected` (hex of the
    /// signing key) when the user gave one.
    async fn pin_kt_keys(&self, expected: Option<&str>) -> Result<(), CoreError> {
        let keys = self.transport.kt_keys().await?;
        let signing_key: [u8; 32] = keys
            .signing_key
            .as_ref()
            .try_into()
            .map_err(|_| CoreError::BadResponse("the directory key is not 32 bytes".into()))?;
        if let Some(expected) = expected
            && !expected
                .trim()
                .eq_ignore_ascii_case(&hex::encode(signing_key))
        {
            return Err(CoreError::Transparency(format!(
                "the server's key-directory key is {}, not the {} you gave with --kt-key",
                hex::encode(signing_key),
                expected.trim()
            )));
        }
        self.engine()?.pin_kt_keys(&KtKeys {
            signing_key,
            vrf_public_key: keys.vrf_public_key.into_inner(),
        })
    }

    /// A user's devices with their key-directory proof, waiting (briefly) for a change
    /// that the directory has not published yet.
    async fn fetch_user(
        &self,
        username: &str,
    ) -> Result<sealpost_proto::api::UserDevicesResponse, CoreError> {
        let mut wait = Duration::from_millis(20);
        let deadline = tokio::time::Instant::now() + KT_PUBLISH_WAIT;
        loop {
            match self.authed(|| self.transport.user_devices(username)).await {
                Err(err)
                    if err.server_code() == Some(ErrorCode::KtPending)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
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

    /// The device's current bearer token, for tools that call the HTTP API directly (the
    /// API fuzzing in `scripts/schemathesis.sh`). It grants everything the device can do.
    pub fn bearer_token(&self) -> Option<String> {
        self.transport.token()
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
        let challenge =
            self.transport
                .challenge(device_id)
                .await
                .map_err(|err| match err.server_code() {
                    Some(ErrorCode::DeviceNotFound) => CoreError::DeviceRevoked,
                    _ => err,
                })?;
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
        self.reconcile(&[]).await?;
        self.top_up_key_packages().await?;
        Ok(())
    }

    /// Fetches directory entries (account key, devices) of the accounts in our
    /// conversations — those in `force` always, the others when older than the TTL — and
    /// commits whatever adds and removals make every group hold exactly the listed devices.
    async fn reconcile(&self, force: &[String]) -> Result<(), CoreError> {
        let groups: Vec<String> = self
            .engine()?
            .conversations()?
            .into_iter()
            .filter(|c| c.status == "active")
            .map(|c| c.group_id)
            .collect();
        let mut accounts = std::collections::BTreeSet::new();
        for group in &groups {
            let members = self.engine()?.members(group)?;
            accounts.extend(members.into_iter().map(|member| member.username));
        }
        accounts.extend(force.iter().cloned());
        let now = now_secs();
        let mut directory = std::collections::HashMap::new();
        for user in accounts {
            let checked = self.engine()?.directory_checked_at(&user)?;
            if !force.contains(&user) && now - checked < DIRECTORY_TTL_SECS {
                continue;
            }
            match self.fetch_user(&user).await {
                Ok(response) => {
                    let devices = self.engine()?.observe_directory(&response, now)?;
                    directory.insert(user, devices.into_iter().map(|d| d.device_id).collect());
                }
                // The account is gone: only with the directory's proof of deletion do its
                // devices leave our groups.
                Err(err) if err.server_code() == Some(ErrorCode::UserNotFound) => {
                    let proof = self.transport.kt_lookup(&user).await?;
                    self.engine()?.observe_deleted(&user, &proof, now)?;
                    directory.insert(user, Vec::new());
                }
                Err(err) => return Err(err),
            }
        }
        if directory.is_empty() {
            return Ok(());
        }
        for group in groups {
            let plan = self.engine()?.plan_reconcile(&group, &directory)?;
            if plan.is_empty() {
                continue;
            }
            let mut claims = Vec::new();
            for device in &plan.missing {
                match self
                    .authed(|| self.transport.claim_device_key_package(*device))
                    .await
                {
                    Ok(claim) => claims.push(claim),
                    // Not ready yet (a device still uploading KeyPackages) or gone: the
                    // next reconcile picks it up.
                    Err(err)
                        if matches!(
                            err.server_code(),
                            Some(ErrorCode::NoKeyPackages | ErrorCode::DeviceNotFound)
                        ) => {}
                    Err(err) => return Err(err),
                }
            }
            if claims.is_empty() && plan.stale.is_empty() {
                continue;
            }
            self.commit_with_retries(|engine| {
                engine.begin_reconcile(&group, &claims, &plan.stale, now_secs())
            })
            .await?;
        }
        Ok(())
    }

    /// Whether `device` is not yet published in our directory entry, or some active group
    /// still lacks a device the directory lists for us.
    async fn own_devices_pending(&self, device: Uuid) -> Result<bool, CoreError> {
        let me = self.whoami()?.username;
        let response = self.fetch_user(&me).await?;
        let devices: Vec<Uuid> = self
            .engine()?
            .observe_directory(&response, now_secs())?
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        if !devices.contains(&device) {
            return Ok(true);
        }
        let directory = std::collections::HashMap::from([(me, devices)]);
        let conversations = self.engine()?.conversations()?;
        for conversation in conversations {
            if conversation.status == "active"
                && !self
                    .engine()?
                    .plan_reconcile(&conversation.group_id, &directory)?
                    .missing
                    .is_empty()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Fetches and processes new messages, checks the key directory (the current root,
    /// roots other members gossiped, and our own account's history); returns what has not
    /// been shown yet.
    pub async fn sync(&self) -> Result<Vec<HistoryEntry>, CoreError> {
        self.catch_up().await?;
        self.check_directory().await?;
        self.engine()?.take_unshown()
    }

    /// The key-transparency part of `sync`.
    async fn check_directory(&self) -> Result<(), CoreError> {
        let now = now_secs();
        let root = self.transport.kt_root().await?;
        self.engine()?.observe_signed_root(&root, now)?;
        let epochs = self.engine()?.pending_gossip_epochs()?;
        for epoch in epochs {
            let roots = self.transport.kt_roots(epoch, epoch).await?.roots;
            if roots.is_empty() {
                continue;
            }
            self.engine()?.resolve_gossip(&roots, now)?;
        }
        let me = self.whoami()?.username;
        match self.transport.kt_history(&me).await {
            Ok(history) => {
                self.engine()?.check_own_history(&history, now)?;
            }
            // Not published yet (a brand-new account): nothing to monitor.
            Err(err) if err.server_code() == Some(ErrorCode::KtPending) => {}
            Err(err) => return Err(err),
        }
        Ok(())
    }

    /// Verifies that the key directory only grew from epoch `from` to `to` (default: the
    /// current epoch), in chunks; `progress(done, total)` reports epochs verified.
    pub async fn audit(
        &self,
        from: u64,
        to: Option<u64>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<AuditSummary, CoreError> {
        let keys = self.engine()?.kt_keys()?;
        let current = self.transport.kt_root().await?;
        crate::kt::verify_root(&keys, &current)?;
        self.engine()?.observe_signed_root(&current, now_secs())?;
        let to = to.unwrap_or(current.epoch);
        if to > current.epoch {
            return Err(CoreError::InvalidInput(format!(
                "the directory is at epoch {}; cannot audit up to {to}",
                current.epoch
            )));
        }
        if from >= to {
            return Err(CoreError::InvalidInput(format!(
                "nothing to audit: --from {from} must be below --to {to}"
            )));
        }
        let total = to - from;
        let mut start = from;
        while start < to {
            let end = (start + AUDIT_CHUNK).min(to);
            let response = self.transport.kt_audit(start, end).await?;
            if response.roots.first().map(|r| r.epoch) != Some(start)
                || response.roots.last().map(|r| r.epoch) != Some(end)
            {
                return Err(CoreError::Transparency(format!(
                    "the server answered an audit of epochs {start}..{end} with other epochs"
                )));
            }
            crate::kt::verify_audit(&keys, &response).await?;
            let mut engine = self.engine()?;
            for root in &response.roots {
                engine.observe_signed_root_history(root, now_secs())?;
            }
            drop(engine);
            progress(end - from, total);
            start = end;
        }
        Ok(AuditSummary {
            from,
            to,
            epochs: total,
        })
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
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            hourly.tick().await;
            loop {
                let frame = tokio::select! {
                    () = &mut stop => return Ok(()),
                    frame = socket.next() => frame,
                    // Self-monitoring and root checks at least hourly, even when quiet.
                    _ = hourly.tick() => Some(Ok(Message::Text(String::new().into()))),
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
            // Learn the user's proven devices first: only those are accepted below.
            self.refresh_contact(user).await?;
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
        // A 1:1 always checks the peer's key and devices before encrypting to them.
        let force: Vec<String> = match conversation.kind {
            ConversationKind::Direct => vec![conversation.name.clone()],
            ConversationKind::Group => Vec::new(),
        };
        self.reconcile(&force).await?;
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

    /// Security alerts raised on this device (oldest first).
    pub fn alerts(&self) -> Result<Vec<HistoryEntry>, CoreError> {
        self.engine()?.alerts()
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

    /// Existing device: opens a link session and returns its code (valid 10 minutes).
    pub async fn create_link(&self) -> Result<LinkCode, CoreError> {
        let code = LinkCode::generate();
        let request = CreateLinkRequest {
            link_id: code.link_id(),
            verifier: Bytes64(code.verifier().to_vec()),
        };
        self.authed(|| self.transport.create_link(&request)).await?;
        Ok(code)
    }

    /// Existing device: waits for the new device, certifies it, hands it the account key
    /// (sealed with the code) and adds it to every conversation. `on_joined` is called once
    /// the new device has answered.
    pub async fn complete_link(
        &self,
        code: &LinkCode,
        on_joined: impl FnOnce(&str),
    ) -> Result<LinkedDevice, CoreError> {
        let link_id = code.link_id();
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        let sealed = loop {
            let status = self.authed(|| self.transport.link_status(&link_id)).await?;
            if let Some(sealed) = status.sealed_request {
                break sealed;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CoreError::InvalidInput(
                    "no device used the link code within 10 minutes".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let request = code.open_request(sealed.as_ref())?;
        on_joined(&request.name);
        let (certificate, response) = self.engine()?.certify_device(&request)?;
        let complete = CompleteLinkRequest {
            device_certificate: Bytes64(certificate),
            sealed_response: Bytes64(code.seal_response(&response)?),
        };
        self.authed(|| self.transport.complete_link(&link_id, &complete))
            .await?;
        // Add the new device everywhere as soon as its KeyPackages are on the server.
        let me = self.whoami()?.username;
        let deadline = tokio::time::Instant::now() + NEW_DEVICE_WAIT;
        loop {
            self.drain_mailbox().await?;
            self.reconcile(std::slice::from_ref(&me)).await?;
            if !self.own_devices_pending(request.device_id).await? {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CoreError::InvalidInput(
                    "the new device is linked, but it did not come online to be added to                      your conversations; they will be updated at your next sync"
                        .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(LinkedDevice {
            device_id: request.device_id.to_string(),
            name: request.name.clone(),
            conversations: self
                .conversations()?
                .iter()
                .filter(|c| c.status == "active")
                .count(),
        })
    }

    /// New device: joins an account with a link code shown by one of its devices.
    pub async fn link(
        home: &Path,
        code: &str,
        server_url: &str,
        name: &str,
        key_packages: usize,
    ) -> Result<Self, CoreError> {
        let code = LinkCode::parse(code)?;
        std::fs::create_dir_all(home)?;
        let mut engine = Engine::open(&database_path(home))?;
        let transport = Transport::new(server_url)?;
        let request = engine.prepare_link_device(name, server_url)?;
        let join = JoinLinkRequest {
            proof: Bytes64(code.proof().to_vec()),
            sealed_request: Bytes64(code.seal_request(&request)?),
        };
        transport
            .join_link(&code.link_id(), &join)
            .await
            .map_err(link_error)?;
        let ask = LinkResultRequest {
            proof: Bytes64(code.proof().to_vec()),
        };
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        let sealed = loop {
            match transport.link_result(&code.link_id(), &ask).await {
                Ok(result) => break result.sealed_response,
                Err(err) if err.server_code() == Some(ErrorCode::LinkPending) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CoreError::InvalidInput(
                            "the other device did not answer within 10 minutes".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(err) => return Err(link_error(err)),
            }
        };
        let response = code.open_response(sealed.as_ref())?;
        engine.finish_link(&response)?;
        let client = Self {
            conflicts: Default::default(),
            engine: Mutex::new(engine),
            transport,
            home: home.to_owned(),
        };
        client.login().await?;
        client.upload_key_packages(key_packages, true).await?;
        client.rename_device(request.device_id, name).await?;
        Ok(client)
    }

    /// The account's devices.
    pub async fn devices(&self) -> Result<Vec<DeviceEntry>, CoreError> {
        let me = self.whoami()?;
        let response = self.fetch_user(&me.username).await?;
        let devices = self.engine()?.observe_directory(&response, now_secs())?;
        Ok(devices
            .into_iter()
            .map(|device| DeviceEntry {
                current: device.device_id.to_string() == me.device_id,
                device_id: device.device_id.to_string(),
                name: device.name.unwrap_or_else(|| "(unnamed)".into()),
                created: device.created,
            })
            .collect())
    }

    /// Names a device of the account (the name is sealed: the server cannot read it).
    pub async fn rename_device(&self, device_id: Uuid, name: &str) -> Result<(), CoreError> {
        let sealed = self.engine()?.seal_device_name(device_id, name)?;
        let request = RenameDeviceRequest {
            name_sealed: Bytes64(sealed),
        };
        self.authed(|| self.transport.rename_device(device_id, &request))
            .await
    }

    /// Revokes another device of the account: the server forgets it and refuses its
    /// token, and it is removed from every conversation.
    pub async fn remove_device(&self, device_id: Uuid) -> Result<(), CoreError> {
        self.authed(|| self.transport.remove_device(device_id))
            .await?;
        // Groups follow the key directory: wait until it no longer lists the device.
        let me = self.whoami()?.username;
        let deadline = tokio::time::Instant::now() + KT_PUBLISH_WAIT;
        loop {
            let response = self.fetch_user(&me).await?;
            let listed = self.engine()?.observe_directory(&response, now_secs())?;
            if !listed.iter().any(|d| d.device_id == device_id) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CoreError::Transparency(
                    "the server revoked the device but the key directory still lists it; it \
                     will be removed from conversations once the directory publishes"
                        .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.drain_mailbox().await?;
        self.reconcile(&[me]).await
    }

    /// The safety number with `username`, after fetching their current key.
    pub async fn safety_number(&self, username: &str) -> Result<SafetyNumber, CoreError> {
        self.refresh_contact(username).await?;
        self.engine()?.safety_number(username)
    }

    async fn refresh_contact(&self, username: &str) -> Result<(), CoreError> {
        let response = self
            .fetch_user(username)
            .await
            .map_err(|err| match err.server_code() {
                Some(ErrorCode::UserNotFound) => {
                    CoreError::InvalidInput(format!("there is no user named {username:?}"))
                }
                _ => err,
            })?;
        self.engine()?.observe_directory(&response, now_secs())?;
        Ok(())
    }

    /// Marks `username` verified when `number` is their current safety number.
    pub async fn verify(&self, username: &str, number: &str) -> Result<(), CoreError> {
        self.refresh_contact(username).await?;
        self.engine()?.verify_contact(username, number)
    }

    /// Accepts a verified contact's new key (they become unverified).
    pub async fn accept_new_key(&self, username: &str) -> Result<(), CoreError> {
        self.refresh_contact(username).await?;
        self.engine()?.accept_new_key(username, now_secs())
    }

    /// What is known about a contact's key.
    pub fn contact(&self, username: &str) -> Result<Option<ContactKey>, CoreError> {
        self.engine()?.contact(username)
    }

    /// Deletes the account on the server (all devices). The local store is left as it is.
    pub async fn delete_account(&self) -> Result<(), CoreError> {
        self.authed(|| self.transport.delete_account()).await
    }

    /// Opens a push-mode WebSocket for this device (logging in first if needed).
    pub async fn connect_push(&self) -> Result<crate::transport::PushConnection, CoreError> {
        self.authed(|| self.transport.connect_push()).await
    }

    /// Encrypts texts for a conversation without sending them, in one transaction. They
    /// wait in the outbox (and are sent by the next sync) until [`Client::mark_sent`]; a
    /// caller with its own socket, such as a load generator, sends them itself.
    pub fn prepare_texts(
        &self,
        name: &str,
        texts: &[String],
    ) -> Result<Vec<crate::engine::conversations::OutgoingMessage>, CoreError> {
        let conversation = self.engine()?.find_conversation(name)?;
        if conversation.status != "active" {
            return Err(CoreError::NotActive(conversation.name));
        }
        let texts: Vec<(&str, Option<Uuid>)> = texts.iter().map(|t| (t.as_str(), None)).collect();
        self.engine()?
            .encrypt_texts(&conversation.group_id, &texts, now_ms())
    }

    /// The server accepted these prepared messages: take them out of the outbox.
    pub fn mark_sent(&self, message_ids: &[Uuid]) -> Result<(), CoreError> {
        self.engine()?.messages_accepted(message_ids)
    }

    /// Processes one envelope as if the server had delivered it (tests, diagnostics).
    pub fn process_raw(
        &self,
        envelope: &sealpost_proto::api::Envelope,
    ) -> Result<Vec<HistoryEntry>, CoreError> {
        self.engine()?.process_envelope(envelope, now_secs())
    }
}
