//! Accounts and conversations for a scenario, made with the real client engine.
//!
//! Every scenario measures the server with real MLS traffic: senders and receivers are
//! `sealpost_core::Client`s registered on the server under test, conversations are real
//! MLS groups created by the engine (KeyPackage claims, key-directory proofs, commits and
//! Welcomes), and the messages are MLS PrivateMessages the senders' engines encrypted.
//! Only the *idle* scenario uses bare devices (registered and logged in, no MLS state),
//! because holding 19,000 connections needs nothing more.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use sealpost_core::Client;
use sealpost_core::engine::conversations::OutgoingMessage;

/// Setup work running at once (registrations, conversation creation).
const SETUP_CONCURRENCY: usize = 16;

/// Where the scenario's clients keep their state.
pub struct Population {
    root: tempfile::TempDir,
    pub server_url: String,
}

/// A sender and a receiver in a 1:1 conversation.
pub struct Pair {
    pub sender: Client,
    pub receiver: Client,
    /// The conversation's name on the sender's side (the receiver's username).
    pub conversation: String,
}

/// Messages a sender's engine encrypted before the timed part.
pub struct Prepared {
    pub messages: Vec<OutgoingMessage>,
}

impl Population {
    pub fn new(server_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            root: tempfile::Builder::new()
                .prefix("sealpost-bench-clients")
                .tempdir()?,
            server_url: server_url.to_owned(),
        })
    }

    fn home(&self, username: &str) -> PathBuf {
        self.root.path().join(username)
    }

    /// Registers one account with a device and a few KeyPackages.
    pub async fn register(&self, username: &str) -> anyhow::Result<Client> {
        Client::register(&self.home(username), username, &self.server_url, 4)
            .await
            .with_context(|| format!("registering {username}"))
    }

    /// Registers many accounts, `SETUP_CONCURRENCY` at a time, in order of `names`.
    pub async fn register_all(&self, names: &[String]) -> anyhow::Result<Vec<Client>> {
        let results: Vec<anyhow::Result<Client>> = futures_util::stream::iter(names)
            .map(|name| self.register(name))
            .buffered(SETUP_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// `count` sender/receiver pairs, each in its own 1:1 conversation that both sides
    /// have joined.
    pub async fn pairs(&self, count: usize, tag: &str) -> anyhow::Result<Vec<Pair>> {
        let senders: Vec<String> = (0..count).map(|i| format!("{tag}s{i:05}")).collect();
        let receivers: Vec<String> = (0..count).map(|i| format!("{tag}r{i:05}")).collect();
        progress(&format!("registering {} accounts", 2 * count));
        let senders = self.register_all(&senders).await?;
        let receivers = self.register_all(&receivers).await?;
        progress(&format!("creating {count} conversations"));
        let pairs: Vec<anyhow::Result<Pair>> =
            futures_util::stream::iter(senders.into_iter().zip(receivers))
                .map(|(sender, receiver)| async move {
                    let conversation = receiver.whoami()?.username;
                    start_direct(&sender, &conversation).await?;
                    receiver.sync().await.context("receiver joining")?;
                    Ok(Pair {
                        sender,
                        receiver,
                        conversation,
                    })
                })
                .buffered(SETUP_CONCURRENCY)
                .collect()
                .await;
        pairs.into_iter().collect()
    }
}

/// Starts a 1:1 with `peer` (sending a first message), waiting for the key directory to
/// publish the peer if it is brand new.
pub async fn start_direct(sender: &Client, peer: &str) -> anyhow::Result<()> {
    let mut attempts = 0;
    loop {
        match sender.send_direct(peer, "hello").await {
            Ok(_) => return Ok(()),
            Err(err)
                if attempts < 200
                    && err.server_code() == Some(sealpost_proto::ErrorCode::KtPending) =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => {
                if attempts >= 200 {
                    bail!("{peer} never appeared in the key directory: {err}");
                }
                return Err(err).with_context(|| format!("starting a conversation with {peer}"));
            }
        }
    }
}

/// Encrypts `count` texts of `size` bytes for the sender's conversation, in chunks (one
/// transaction each).
/// Encrypts `count` texts of `size` bytes from each pair's sender, `chunk` per pair in
/// turn: message ids are UUIDv7 (time-ordered) and made when a message is encrypted, so
/// taking the pairs in turn gives ids in the order the senders will send them, as clients
/// that encrypt at send time do. (Encrypting one sender's share after the other would give
/// the server ids from a hundred far-apart ranges at once.)
pub fn prepare_interleaved(
    pairs: &[Pair],
    count: usize,
    size: usize,
    chunk: usize,
) -> anyhow::Result<Vec<Prepared>> {
    let text: String = "x".repeat(size);
    let mut prepared: Vec<Prepared> = pairs
        .iter()
        .map(|_| Prepared {
            messages: Vec::with_capacity(count),
        })
        .collect();
    let mut done = 0;
    while done < count {
        let n = chunk.max(1).min(count - done);
        let texts = vec![text.clone(); n];
        for (pair, into) in pairs.iter().zip(&mut prepared) {
            into.messages
                .extend(pair.sender.prepare_texts(&pair.conversation, &texts)?);
        }
        done += n;
    }
    Ok(prepared)
}

pub fn prepare(pair: &Pair, count: usize, size: usize) -> anyhow::Result<Prepared> {
    let text: String = "x".repeat(size);
    let mut messages = Vec::with_capacity(count);
    let chunk = 500;
    let mut done = 0;
    while done < count {
        let n = chunk.min(count - done);
        let texts = vec![text.clone(); n];
        messages.extend(pair.sender.prepare_texts(&pair.conversation, &texts)?);
        done += n;
    }
    Ok(Prepared { messages })
}

/// One line of setup progress on stderr.
pub fn progress(what: &str) {
    eprintln!("  .. {what}");
}
