//! Scenario 5: group fan-out. One sender and a real MLS group of `members` other devices,
//! every member joined (it processed the Welcome) and online on a push-mode socket. Each
//! round the sender sends one message; the figures are the time from writing it to the
//! moment the last member has it, and from the server's acceptance (the `sent` answer) to
//! that moment. Members acknowledge every 50 ms, as clients that decrypt before they
//! acknowledge do.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use sealpost_core::Client;
use sealpost_proto::api::EnvelopeKind;
use sealpost_proto::ws::{ClientFrame, ServerFrame};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::population::{Population, progress};
use crate::report::Percentiles;

/// How often members acknowledge what they received.
const ACK_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub members: usize,
    pub rounds: usize,
    /// From writing the message to the last member having it.
    pub send_to_last_ms: Percentiles,
    /// From the sender reading the server's acceptance to the last member having it
    /// (negative values, when the last member had it first, count as zero).
    pub accepted_to_last_ms: Percentiles,
    /// From writing the message to the server's acceptance reaching the sender.
    pub send_to_accepted_ms: Percentiles,
    /// From the first member having the message to the last: the spread of the delivery
    /// itself, which no ordering of the sender's answer can hide.
    pub first_to_last_ms: Percentiles,
    /// Accepted → last member of every round, in milliseconds and in round order (to see
    /// whether a slow round is alone or part of a pattern).
    pub accepted_to_last_by_round_ms: Vec<f64>,
}

pub async fn run(
    population: &Population,
    members: usize,
    rounds: usize,
    timeout: Duration,
) -> anyhow::Result<FanoutResult> {
    let tag = format!("f{members}");
    let sender = population.register(&format!("{tag}sender")).await?;
    let names: Vec<String> = (0..members).map(|i| format!("{tag}m{i:05}")).collect();
    progress(&format!("registering {members} members"));
    let clients = population.register_all(&names).await?;
    progress(&format!("creating a group of {} devices", members + 1));
    create_group(&sender, &tag, &names).await?;
    progress(&format!("{members} members join (process the Welcome)"));
    let joined: Vec<anyhow::Result<()>> = futures_util::stream::iter(&clients)
        .map(|client| async move {
            client.sync().await?;
            anyhow::Ok(())
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for result in joined {
        result?;
    }

    progress(&format!("connecting {members} members"));
    let (arrivals, mut arrived) = mpsc::unbounded_channel();
    let mut sockets = Vec::with_capacity(members);
    for client in &clients {
        sockets.push(client.connect_push().await?.split());
    }
    // Members acknowledge every 50 ms, as a client does once it has decrypted and stored
    // what arrived, rather than the instant each frame lands.
    let listeners = futures_util::future::join_all(sockets.into_iter().map(|(mut tx, mut rx)| {
        let arrivals = arrivals.clone();
        async move {
            let mut pending = Vec::new();
            let mut tick = tokio::time::interval(ACK_INTERVAL);
            loop {
                tokio::select! {
                    frame = rx.next() => {
                        let Ok(Some(frame)) = frame else { break };
                        if let ServerFrame::Envelopes { envelopes } = frame {
                            let now = Instant::now();
                            for envelope in envelopes {
                                pending.push(envelope.id);
                                if envelope.kind == EnvelopeKind::Application {
                                    let _ = arrivals.send((envelope.message_id, now));
                                }
                            }
                        }
                    }
                    _ = tick.tick() => {
                        if !pending.is_empty() {
                            let ids = std::mem::take(&mut pending);
                            if tx.send(&ClientFrame::Ack { ids, confirm: false }).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }));
    drop(arrivals);
    let (mut tx, mut rx) = sender.connect_push().await?.split();

    let rounds_done = async {
        let (mut to_last, mut accepted_to_last, mut to_accepted) = (vec![], vec![], vec![]);
        let mut first_to_last = vec![];
        for round in 0..rounds {
            let prepared = sender.prepare_texts(&tag, &["x".repeat(200)])?;
            let message = prepared.first().context("nothing was encrypted")?;
            let id = message.request.message_id;
            let sent_at = Instant::now();
            tx.send(&ClientFrame::Send {
                reference: round as u64,
                group_id: message.group_id.clone(),
                message_id: id,
                message: message.request.message.clone(),
            })
            .await?;
            let deadline = sent_at + timeout;
            let mut accepted_at = None;
            let mut last = sent_at;
            let mut first: Option<Instant> = None;
            let mut have = 0;
            while have < members || accepted_at.is_none() {
                tokio::select! {
                    frame = rx.next(), if accepted_at.is_none() => match frame? {
                        Some(ServerFrame::Sent { .. }) => accepted_at = Some(Instant::now()),
                        Some(ServerFrame::SendFailed { error, .. }) => bail!("send failed: {}", error.message),
                        Some(_) => {}
                        None => bail!("the server closed the sender's socket"),
                    },
                    arrival = arrived.recv() => {
                        let (message_id, at) = arrival.context("members disconnected")?;
                        if message_id == id {
                            have += 1;
                            last = last.max(at);
                            first = Some(first.map_or(at, |first| first.min(at)));
                        }
                    },
                    () = tokio::time::sleep_until(deadline.into()) => {
                        bail!("round {round}: only {have} of {members} members got the message")
                    }
                }
            }
            let accepted_at = accepted_at.unwrap_or(sent_at);
            sender.mark_sent(&[id])?;
            to_last.push(last.duration_since(sent_at).as_nanos() as u64);
            accepted_to_last.push(last.saturating_duration_since(accepted_at).as_nanos() as u64);
            to_accepted.push(accepted_at.duration_since(sent_at).as_nanos() as u64);
            first_to_last.push(
                last.saturating_duration_since(first.unwrap_or(last))
                    .as_nanos() as u64,
            );
            // Let the members acknowledge before the next round.
            tokio::time::sleep(2 * ACK_INTERVAL).await;
        }
        tx.close().await.ok();
        let by_round = accepted_to_last.iter().map(|&ns| ns as f64 / 1e6).collect();
        anyhow::Ok(FanoutResult {
            members,
            rounds,
            send_to_last_ms: Percentiles::of(&mut to_last),
            accepted_to_last_ms: Percentiles::of(&mut accepted_to_last),
            send_to_accepted_ms: Percentiles::of(&mut to_accepted),
            first_to_last_ms: Percentiles::of(&mut first_to_last),
            accepted_to_last_by_round_ms: by_round,
        })
    };
    // The listeners run until their sockets close, which ends with the bench.
    tokio::select! {
        result = rounds_done => result,
        _ = listeners => bail!("all member sockets closed"),
    }
}

/// Creates the group, waiting for the key directory to publish brand-new members.
async fn create_group(sender: &Client, name: &str, members: &[String]) -> anyhow::Result<()> {
    let mut attempts = 0;
    loop {
        match sender.create_group(name, members).await {
            Ok(_) => return Ok(()),
            Err(err)
                if attempts < 100
                    && err.server_code() == Some(sealpost_proto::ErrorCode::KtPending) =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err).context("creating the group"),
        }
    }
}
