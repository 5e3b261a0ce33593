//! Scenario 4: offline drain. A device was offline while `messages` messages were queued
//! for it; the figure is the time from the start of its connection (TCP, WebSocket
//! upgrade, login by token) until the server has durably deleted every envelope it
//! acknowledged — that is, until its mailbox is empty again. The receiver acknowledges
//! each pushed frame as it reads it; it does not decrypt (its engine's own speed is a
//! client figure, measured by `cargo bench -p sealpost-core`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sealpost_proto::ws::{ClientFrame, ServerFrame};
use serde::Serialize;

use crate::population::{Pair, prepare, progress};
use crate::server::{ServerProcess, own_cpu_seconds};

#[derive(Debug, Clone, Serialize)]
pub struct DrainResult {
    pub messages: usize,
    pub message_bytes: usize,
    pub drain_ms: f64,
    pub first_envelope_ms: f64,
    pub server_cpu_seconds: f64,
    pub generator_cpu_seconds: f64,
}

/// Queues `messages` messages for the pair's receiver (sent over the sender's push
/// socket, not timed), then times the receiver's drain.
pub async fn run(
    server: &ServerProcess,
    pair: &Pair,
    messages: usize,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<DrainResult> {
    progress(&format!(
        "queueing {messages} messages for an offline device"
    ));
    let prepared = prepare(pair, messages, size)?;
    let (mut tx, mut rx) = pair.sender.connect_push().await?.split();
    for (i, message) in prepared.messages.iter().enumerate() {
        tx.feed(&ClientFrame::Send {
            reference: i as u64,
            group_id: message.group_id.clone(),
            message_id: message.request.message_id,
            message: message.request.message.clone(),
        })
        .await?;
        // Keep the server's per-socket window full, no more.
        if i % 200 == 199 {
            tx.flush().await?;
        }
    }
    tx.flush().await?;
    let mut answered = 0;
    while answered < messages {
        match rx.next().await? {
            Some(ServerFrame::Sent { .. }) => answered += 1,
            Some(ServerFrame::SendFailed { error, .. }) => {
                bail!("queueing failed: {}", error.message)
            }
            Some(_) => {}
            None => bail!("the server closed the sender's socket"),
        }
    }
    tx.close().await.ok();
    let ids: Vec<uuid::Uuid> = prepared
        .messages
        .iter()
        .map(|m| m.request.message_id)
        .collect();
    pair.sender.mark_sent(&ids)?;

    progress("timed part: connect and drain");
    let server_cpu_before = server.cpu_seconds()?;
    let own_cpu_before = own_cpu_seconds()?;
    let start = Instant::now();
    let deadline = start + timeout;
    let (mut tx, mut rx) = pair.receiver.connect_push().await?.split();
    let mut first_envelope = None;
    let (mut received, mut removed) = (0usize, 0u64);
    while removed < messages as u64 {
        let frame = tokio::time::timeout_at(deadline.into(), rx.next())
            .await
            .context("the drain timed out")??;
        match frame {
            Some(ServerFrame::Envelopes { envelopes }) => {
                first_envelope.get_or_insert_with(|| start.elapsed());
                received += envelopes.len();
                let ids = envelopes.iter().map(|e| e.id).collect();
                tx.send(&ClientFrame::Ack { ids, confirm: true }).await?;
            }
            Some(ServerFrame::Acked { removed: n }) => removed += n,
            Some(ServerFrame::Error { error }) => bail!("server error: {}", error.message),
            Some(_) => {}
            None => bail!("the server closed the socket after {received} envelopes"),
        }
    }
    let elapsed = start.elapsed();
    let server_cpu = server.cpu_seconds()? - server_cpu_before;
    let own_cpu = own_cpu_seconds()? - own_cpu_before;
    tx.close().await.ok();
    Ok(DrainResult {
        messages,
        message_bytes: size,
        drain_ms: elapsed.as_secs_f64() * 1e3,
        first_envelope_ms: first_envelope.unwrap_or_default().as_secs_f64() * 1e3,
        server_cpu_seconds: server_cpu,
        generator_cpu_seconds: own_cpu,
    })
}
