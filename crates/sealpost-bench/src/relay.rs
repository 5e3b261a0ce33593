//! Scenarios 1 and 2: relay throughput and latency under load.
//!
//! P sender/receiver pairs, each in its own real 1:1 MLS group. Before the timed part each
//! sender's engine encrypts its share of the messages (in the wild every client has its
//! own CPU; here the two cores must measure the server), the senders in turn, so that the
//! time-ordered message ids reach the server in about the order real senders would make
//! them. In the timed part every sender
//! pipelines its ciphertexts over a push-mode WebSocket (at most `window` unanswered),
//! either as fast as the server answers or paced at a fixed total rate; every receiver
//! takes envelopes from its own push-mode socket and acknowledges each frame. A message
//! counts as delivered when its receiver has it; latency is from the moment its sender
//! wrote it to the moment its receiver read it. After the timed part the receivers'
//! engines decrypt a sample of what they received, to show it was real MLS traffic.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sealpost_core::transport::{PushReceiver, PushSender};
use sealpost_proto::api::{Envelope, EnvelopeKind};
use sealpost_proto::ws::{ClientFrame, ServerFrame};
use serde::Serialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::cpu_use::{CpuTicks, CpuUse};
use crate::lock_holder::{HoldWriteLock, LockHolder, LockHolding};
use crate::population::{Pair, Prepared, prepare_interleaved, progress};
use crate::renamer::{self, Renames};
use crate::report::{Percentiles, TimelineSlice};
use crate::server::{ServerProcess, ThreadCpu, WriterCounters, own_cpu_seconds};

#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub messages: usize,
    pub size: usize,
    /// Total offered rate in messages/s; `None` sends as fast as the server answers.
    pub rate: Option<f64>,
    /// Unanswered sends per sender.
    pub window: usize,
    /// Receivers keep one message in this many for decryption after the timed part.
    pub decrypt_every: usize,
    /// How long a receiver may hold acknowledgements to send them together; zero
    /// acknowledges every frame the moment it arrives.
    pub ack_delay: Duration,
    /// An outside connection taking turns at the database's write lock, if any.
    pub hold_write_lock: Option<HoldWriteLock>,
    /// How often the first sender's device renames itself through the API, if at all.
    pub rename_every: Option<Duration>,
    /// How long after the timed part the server's storage threads are watched for the
    /// work the run left behind ([`RelayResult::deferred_server_cpu_seconds`]); zero
    /// skips it.
    pub settle: Duration,
    /// Latency percentiles count only the messages sent this long after the timed part
    /// began (delivery, rate and CPU count every message); zero counts all.
    pub measure_after: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayResult {
    pub mode: String,
    pub pairs: usize,
    pub messages: usize,
    pub message_bytes: usize,
    pub ciphertext_bytes: usize,
    pub offered_rate: Option<f64>,
    pub delivered: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub send_failures: usize,
    pub decrypted_sample: usize,
    pub decrypt_failures: usize,
    pub wall_seconds: f64,
    pub delivered_per_second: f64,
    pub server_cpu_seconds: f64,
    pub server_cpu_us_per_message: f64,
    pub server_cpu_seconds_per_1000: f64,
    /// CPU seconds the server's storage threads spent after the timed part, during the
    /// settle time: the work the run left behind. The server drops the ciphertexts of
    /// delivered messages two seconds after storing them (its sweep) and copies the WAL
    /// back into the database after that (its checkpoint), so a run shorter than a few
    /// seconds leaves much of that work to be done when it has ended. `None` without a
    /// settle time.
    pub deferred_server_cpu_seconds: Option<f64>,
    /// Server CPU per message with the deferred work counted: the cost of a message to a
    /// server that keeps up for longer than the run.
    pub server_cpu_us_per_message_with_deferred: Option<f64>,
    /// Server CPU per message during the timed part by thread: tokio's (the sockets),
    /// the writer, the durability thread, the checkpoint thread and the rest.
    pub server_cpu_us_per_message_by_thread: ThreadCpu,
    pub generator_cpu_seconds: f64,
    pub generator_cpu_us_per_message: f64,
    /// Latency of the messages sent [`Self::latency_measured_after_ms`] or later into the
    /// timed part (`samples` says how many).
    pub latency: Percentiles,
    /// Where the latency percentiles begin (`--measure-after-ms`; 0: every message).
    pub latency_measured_after_ms: u64,
    /// Latency by send time, to tell stalls from scattered waits; every message.
    pub timeline: Vec<TimelineSlice>,
    pub server_rss_bytes: u64,
    /// Bytes the server wrote to storage from the start of the timed part until the end
    /// of the watch after it (the WAL, and the checkpoints' copies into the database
    /// file), as `/proc/<pid>/io` counts them; `None` where it cannot be read.
    pub server_bytes_written: Option<u64>,
    /// The same per delivered message.
    pub server_bytes_written_per_message: Option<f64>,
    /// The server's writer during the timed part: transactions, the requests (sends and
    /// acknowledgements) they carried, and the WAL flushes that made them durable.
    pub writer: WriterCounters,
    /// Every CPU of the machine during the timed part, steal included (see [`crate::cpu_use`]).
    pub cpus: Vec<CpuUse>,
    /// What the outside writer saw (`--hold-write-lock`).
    pub outside_writer: Option<LockHolding>,
    /// What the renames saw (`--rename-every`).
    pub renames: Option<Renames>,
}

/// Where each prepared message came from, and when it was written to the socket.
struct Ledger {
    index: HashMap<Uuid, (usize, usize)>,
    sent_at_ns: Vec<Vec<AtomicU64>>,
}

#[derive(Default)]
struct ReceiverTally {
    /// `(sent_ns, latency_ns)` of every message delivered.
    latencies_ns: Vec<(u64, u64)>,
    delivered: usize,
    duplicates: usize,
    sample: Vec<Envelope>,
}

#[derive(Default)]
struct SenderTally {
    accepted: usize,
    failed: usize,
    first_error: Option<String>,
}

/// Encrypts every pair's share of `options.messages` (not timed).
pub fn prepare_all(pairs: &[Pair], options: &RelayOptions) -> anyhow::Result<Vec<Prepared>> {
    let per_pair = options.messages.div_ceil(pairs.len().max(1));
    progress(&format!(
        "encrypting {} messages of {} bytes ({} per sender)",
        per_pair * pairs.len(),
        options.size,
        per_pair
    ));
    prepare_interleaved(pairs, per_pair, options.size, 16)
}

pub async fn run(
    server: &ServerProcess,
    pairs: &[Pair],
    prepared: &[Prepared],
    options: &RelayOptions,
) -> anyhow::Result<RelayResult> {
    let mut index = HashMap::new();
    let mut sent_at_ns = Vec::with_capacity(prepared.len());
    for (p, batch) in prepared.iter().enumerate() {
        for (i, message) in batch.messages.iter().enumerate() {
            index.insert(message.request.message_id, (p, i));
        }
        sent_at_ns.push(
            (0..batch.messages.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
        );
    }
    let ledger = Arc::new(Ledger { index, sent_at_ns });
    let total: usize = prepared.iter().map(|b| b.messages.len()).sum();
    let ciphertext_bytes = prepared
        .first()
        .and_then(|b| b.messages.first())
        .map_or(0, |m| m.request.message.len());

    progress(&format!("connecting {} sockets", 2 * pairs.len()));
    let mut senders = Vec::with_capacity(pairs.len());
    let mut receivers = Vec::with_capacity(pairs.len());
    for pair in pairs {
        senders.push(pair.sender.connect_push().await?.split());
        receivers.push(pair.receiver.connect_push().await?.split());
    }
    // Pacing: each sender's share of the rate, with starts spread over one interval.
    let interval = options
        .rate
        .map(|rate| Duration::from_secs_f64(pairs.len() as f64 / rate.max(1.0)));

    progress("timed part");
    let writer_before = server.writer_counters().await?;
    let server_cpu_before = server.cpu_seconds()?;
    let bytes_written_before = server.bytes_written();
    let threads_before = server.thread_cpu_seconds()?;
    let own_cpu_before = own_cpu_seconds()?;
    let ticks_before = CpuTicks::now()?;
    let holder = options
        .hold_write_lock
        .map(|spec| LockHolder::start(&server.database(), spec))
        .transpose()?;
    let start = Instant::now();
    let deadline = start + options.timeout;
    let receiving =
        futures_util::future::join_all(receivers.into_iter().enumerate().map(|(p, (tx, rx))| {
            receive(
                tx,
                rx,
                prepared[p].messages.len(),
                &ledger,
                start,
                deadline,
                options.decrypt_every,
                options.ack_delay,
            )
        }));
    let sending =
        futures_util::future::join_all(senders.into_iter().enumerate().map(|(p, (tx, rx))| {
            let offset = interval.map(|i| i.mul_f64(p as f64 / pairs.len().max(1) as f64));
            send(
                tx,
                rx,
                p,
                &prepared[p],
                &ledger,
                start,
                deadline,
                interval.zip(offset),
                options.window,
            )
        }));
    let (stop_renames, renames_stopped) = tokio::sync::watch::channel(false);
    let renaming = async {
        match (options.rename_every, pairs.first()) {
            (Some(every), Some(pair)) => {
                Some(renamer::rename_until(&pair.sender, every, renames_stopped).await)
            }
            _ => None,
        }
    };
    let relaying = async {
        let done = tokio::join!(receiving, sending);
        let _ = stop_renames.send(true);
        done
    };
    let ((received, sent), renames) = tokio::join!(relaying, renaming);
    let wall = start.elapsed().as_secs_f64();
    let server_cpu = server.cpu_seconds()? - server_cpu_before;
    let threads_after_run = server.thread_cpu_seconds()?;
    let by_thread = threads_after_run.since(threads_before);
    // Only when the storage threads are to be watched after the run (`settle`).
    let storage_cpu_after_run = (!options.settle.is_zero()).then(|| threads_after_run.storage());
    let run_ended = Instant::now();
    let own_cpu = own_cpu_seconds()? - own_cpu_before;
    let cpus = CpuTicks::now()?.since(&ticks_before);
    let server_rss_bytes = server.rss_bytes()?;
    let writer = server.writer_counters().await?.since(writer_before);
    let outside_writer = holder.map(LockHolder::finish).transpose()?;
    let renames = renames.transpose()?;

    let mut latencies = Vec::with_capacity(total);
    let (mut delivered, mut duplicates) = (0, 0);
    let mut samples = Vec::new();
    for (p, tally) in received.into_iter().enumerate() {
        let tally = tally?;
        delivered += tally.delivered;
        duplicates += tally.duplicates;
        latencies.extend(tally.latencies_ns);
        samples.push((p, tally.sample));
    }
    let mut send_failures = 0;
    for tally in sent {
        let tally = tally?;
        send_failures += tally.failed;
        if let Some(error) = tally.first_error {
            eprintln!("  !! a send failed: {error}");
        }
    }
    // Proof that the traffic was real: the receivers' engines decrypt the sample.
    let (mut decrypted, mut decrypt_failures) = (0, 0);
    for (p, sample) in samples {
        for envelope in sample {
            match pairs[p].receiver.process_raw(&envelope) {
                Ok(_) => decrypted += 1,
                Err(err) => {
                    decrypt_failures += 1;
                    eprintln!("  !! sample message did not decrypt: {err}");
                }
            }
        }
    }
    let deferred_server_cpu = match storage_cpu_after_run {
        None => None,
        Some(after_run) => {
            progress(&format!(
                "watching the server's storage threads for {:.1} s after the timed part",
                options.settle.as_secs_f64()
            ));
            tokio::time::sleep_until((run_ended + options.settle).into()).await;
            Some((server.thread_cpu_seconds()?.storage() - after_run).max(0.0))
        }
    };
    let server_bytes_written = bytes_written_before
        .zip(server.bytes_written())
        .map(|(before, after)| after.saturating_sub(before));
    let per_message = |seconds: f64| seconds * 1e6 / delivered.max(1) as f64;
    let timeline = TimelineSlice::of(&mut latencies);
    let measured_after_ms = u64::try_from(options.measure_after.as_millis()).unwrap_or(u64::MAX);
    let mut latencies = measured_latencies(latencies, measured_after_ms.saturating_mul(1_000_000));
    if latencies.len() < delivered.min(1_000) {
        eprintln!(
            "  !! only {} messages were sent {} ms or more into the run: latency percentiles from so few say little",
            latencies.len(),
            measured_after_ms
        );
    }
    Ok(RelayResult {
        mode: format!(
            "pre-encrypted MLS ciphertexts; receivers decrypt 1 in {} after the timed part; {}{}{}{}",
            options.decrypt_every,
            if options.ack_delay.is_zero() {
                "every frame acknowledged on arrival".to_owned()
            } else {
                format!(
                    "acknowledgements held up to {} ms",
                    options.ack_delay.as_millis()
                )
            },
            options
                .hold_write_lock
                .map(|spec| format!("; {}", spec.describe()))
                .unwrap_or_default(),
            options
                .rename_every
                .map(|every| format!("; a device renames itself every {} ms", every.as_millis()))
                .unwrap_or_default(),
            if options.measure_after.is_zero() {
                String::new()
            } else {
                format!(
                    "; latency of the messages sent {measured_after_ms} ms or more into the run"
                )
            }
        ),
        pairs: pairs.len(),
        messages: total,
        message_bytes: options.size,
        ciphertext_bytes,
        offered_rate: options.rate,
        delivered,
        lost: total.saturating_sub(delivered),
        duplicates,
        send_failures,
        decrypted_sample: decrypted,
        decrypt_failures,
        wall_seconds: wall,
        delivered_per_second: delivered as f64 / wall,
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_message: per_message(server_cpu),
        server_cpu_seconds_per_1000: server_cpu * 1000.0 / delivered.max(1) as f64,
        deferred_server_cpu_seconds: deferred_server_cpu,
        server_cpu_us_per_message_with_deferred: deferred_server_cpu
            .map(|deferred| per_message(server_cpu + deferred)),
        server_cpu_us_per_message_by_thread: by_thread.per_message(delivered),
        generator_cpu_seconds: own_cpu,
        generator_cpu_us_per_message: per_message(own_cpu),
        latency: Percentiles::of(&mut latencies),
        latency_measured_after_ms: measured_after_ms,
        timeline,
        server_rss_bytes,
        server_bytes_written,
        server_bytes_written_per_message: server_bytes_written
            .map(|bytes| bytes as f64 / delivered.max(1) as f64),
        writer,
        cpus,
        outside_writer,
        renames,
    })
}

/// The latencies of the messages sent `from_ns` or later into the timed part, from
/// (send time, latency) pairs in nanoseconds. A run's first seconds are not the server's
/// steady state: it drops the ciphertexts of delivered messages two seconds after storing
/// them, so in a run of a few seconds most messages meet a server that does not sweep yet.
fn measured_latencies(latencies: Vec<(u64, u64)>, from_ns: u64) -> Vec<u64> {
    latencies
        .into_iter()
        .filter(|(sent, _)| *sent >= from_ns)
        .map(|(_, latency)| latency)
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn send(
    mut tx: PushSender,
    mut rx: PushReceiver,
    pair: usize,
    prepared: &Prepared,
    ledger: &Ledger,
    start: Instant,
    deadline: Instant,
    pacing: Option<(Duration, Duration)>,
    window: usize,
) -> anyhow::Result<SenderTally> {
    let total = prepared.messages.len();
    let permits = Semaphore::new(window.max(1));
    let writer = async {
        for (i, message) in prepared.messages.iter().enumerate() {
            if let Some((interval, offset)) = pacing {
                let due = start + offset + interval.mul_f64(i as f64);
                if due > Instant::now() {
                    tx.flush().await?;
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            match permits.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    tx.flush().await?;
                    permits.acquire().await.context("window closed")?.forget();
                }
            }
            ledger.sent_at_ns[pair][i].store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            tx.feed(&ClientFrame::Send {
                reference: i as u64,
                group_id: message.group_id.clone(),
                message_id: message.request.message_id,
                message: message.request.message.clone(),
            })
            .await?;
            if pacing.is_some() {
                // A paced message leaves now, not with the next one.
                tx.flush().await?;
            }
        }
        tx.flush().await?;
        anyhow::Ok(())
    };
    let reader = async {
        let mut tally = SenderTally::default();
        while tally.accepted + tally.failed < total {
            let frame = tokio::time::timeout_at(deadline.into(), rx.next())
                .await
                .context("timed out waiting for send answers")??;
            match frame {
                Some(ServerFrame::Sent { .. }) => tally.accepted += 1,
                Some(ServerFrame::SendFailed { error, .. }) => {
                    tally.failed += 1;
                    tally
                        .first_error
                        .get_or_insert(format!("{:?}: {}", error.code, error.message));
                }
                Some(ServerFrame::Error { error }) => bail!("server error: {}", error.message),
                Some(_) => continue,
                None => bail!("the server closed a sender's socket"),
            }
            permits.add_permits(1);
        }
        anyhow::Ok(tally)
    };
    let (written, tally) = tokio::join!(writer, reader);
    written?;
    tally
}

/// Acknowledgements a receiver holds back at most (the server takes up to
/// `ACK_MAX_IDS` in one frame).
const ACK_BATCH_MAX: usize = 256;

/// The envelope ids a receiver has not acknowledged yet, and when they are due: at once
/// when the delay is zero or [`ACK_BATCH_MAX`] are held, else `delay` after the first.
struct HeldAcks {
    ids: Vec<u64>,
    delay: Duration,
    due: Option<Instant>,
}

impl HeldAcks {
    fn new(delay: Duration) -> Self {
        Self {
            ids: Vec::new(),
            delay,
            due: None,
        }
    }

    /// Holds the ids of a frame just read; true when they must be sent now.
    fn hold(&mut self, ids: impl IntoIterator<Item = u64>, now: Instant) -> bool {
        self.ids.extend(ids);
        if self.delay.is_zero() || self.ids.len() >= ACK_BATCH_MAX {
            return true;
        }
        if !self.ids.is_empty() && self.due.is_none() {
            self.due = Some(now + self.delay);
        }
        false
    }

    /// When the receiver must stop waiting for frames: the due time, if before `deadline`.
    fn wake_at(&self, deadline: Instant) -> Instant {
        self.due.map_or(deadline, |due| due.min(deadline))
    }

    /// True when the held ids fall due before `deadline`.
    fn due_before(&self, deadline: Instant) -> bool {
        self.due.is_some_and(|due| due < deadline)
    }

    /// Sends (quietly) what is held, if anything.
    async fn send(&mut self, tx: &mut PushSender) -> anyhow::Result<()> {
        self.due = None;
        if self.ids.is_empty() {
            return Ok(());
        }
        tx.send(&ClientFrame::Ack {
            ids: std::mem::take(&mut self.ids),
            confirm: false,
        })
        .await?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive(
    mut tx: PushSender,
    mut rx: PushReceiver,
    expected: usize,
    ledger: &Ledger,
    start: Instant,
    deadline: Instant,
    decrypt_every: usize,
    ack_delay: Duration,
) -> anyhow::Result<ReceiverTally> {
    let mut tally = ReceiverTally {
        latencies_ns: Vec::with_capacity(expected),
        ..ReceiverTally::default()
    };
    let mut seen = vec![false; expected];
    let mut acks = HeldAcks::new(ack_delay);
    while tally.delivered < expected {
        let wake = acks.wake_at(deadline);
        let Ok(frame) = tokio::time::timeout_at(wake.into(), rx.next()).await else {
            if acks.due_before(deadline) {
                acks.send(&mut tx).await?;
                continue;
            }
            // Lost messages are counted by the caller.
            break;
        };
        let Some(frame) = frame? else { break };
        let ServerFrame::Envelopes { envelopes } = frame else {
            continue;
        };
        let now = start.elapsed().as_nanos() as u64;
        if acks.hold(envelopes.iter().map(|e| e.id), Instant::now()) {
            acks.send(&mut tx).await?;
        }
        for envelope in envelopes {
            if envelope.kind != EnvelopeKind::Application {
                continue;
            }
            let Some(&(pair, i)) = ledger.index.get(&envelope.message_id) else {
                continue;
            };
            if seen.get(i).copied().unwrap_or(true) {
                tally.duplicates += 1;
                continue;
            }
            seen[i] = true;
            tally.delivered += 1;
            let sent = ledger.sent_at_ns[pair][i].load(Ordering::Relaxed);
            tally.latencies_ns.push((sent, now.saturating_sub(sent)));
            if decrypt_every > 0 && i % decrypt_every == 0 {
                tally.sample.push(envelope);
            }
        }
    }
    acks.send(&mut tx).await?;
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_counts_only_messages_sent_after_the_start_of_measurement() {
        let ms = 1_000_000;
        // (sent, latency): sent at 0, 1.999, 2 and 5 ms into the run.
        let latencies = vec![
            (0, 7 * ms),
            (1_999_999, 9 * ms),
            (2 * ms, 3 * ms),
            (5 * ms, 4 * ms),
        ];
        assert_eq!(
            measured_latencies(latencies.clone(), 2 * ms),
            [3 * ms, 4 * ms]
        );
        assert_eq!(measured_latencies(latencies.clone(), 0).len(), 4);
        assert!(measured_latencies(latencies, 6 * ms).is_empty());
    }

    #[test]
    fn without_a_delay_every_frame_is_acknowledged_at_once() {
        let mut acks = HeldAcks::new(Duration::ZERO);
        assert!(acks.hold([1, 2], Instant::now()));
    }

    #[test]
    fn held_acknowledgements_fall_due_a_delay_after_the_first() {
        let delay = Duration::from_millis(50);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let mut acks = HeldAcks::new(delay);
        assert_eq!(acks.wake_at(deadline), deadline, "nothing held yet");
        assert!(!acks.hold([1], start));
        assert!(!acks.hold([2, 3], start + Duration::from_millis(30)));
        assert_eq!(acks.wake_at(deadline), start + delay, "due after the first");
        assert!(acks.due_before(deadline));
        assert!(!acks.due_before(start + Duration::from_millis(10)));
        assert_eq!(acks.ids, [1, 2, 3]);
    }

    #[test]
    fn a_full_batch_is_acknowledged_at_once() {
        let mut acks = HeldAcks::new(Duration::from_secs(1));
        let now = Instant::now();
        assert!(!acks.hold(0..ACK_BATCH_MAX as u64 - 1, now));
        assert!(acks.hold([ACK_BATCH_MAX as u64], now));
    }
}
