//! `sealpost-bench`: the load generator and benchmark scenarios of issue 6.
//!
//! Every scenario starts its own `sealpost-server` on a loopback port (pinned to the CPUs
//! given by `--server-cpus`), builds its population with the real client engine, runs a
//! bounded amount of work, prints a table and writes JSON under `--out`. Run the generator
//! itself on the other core, e.g.
//! `taskset -c 1 target/release/sealpost-bench --server-cpus 0 relay --pairs 100`.
//! docs/BENCHMARKS.md lists the commands behind every published figure.

mod cpu_use;
mod drain;
mod fanout;
mod idle;
mod lock_holder;
mod machine;
mod plot;
mod population;
mod relay;
mod renamer;
mod repeats;
mod report;
mod server;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::lock_holder::HoldWriteLock;
use crate::machine::Recorded;
use crate::population::Population;
use crate::relay::{RelayOptions, RelayResult};
use crate::report::{print_table, thousands, write_json};
use crate::server::{ServerOptions, ServerProcess};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Sealpost load generator and benchmarks (loopback only)"
)]
struct Args {
    /// The server binary (default: `sealpost-server` next to this binary).
    #[arg(long, global = true)]
    server_binary: Option<PathBuf>,
    /// CPUs the server is pinned to (`taskset -c` list); empty for no pinning.
    #[arg(long, global = true, default_value = "0")]
    server_cpus: String,
    /// Directory for the JSON results.
    #[arg(long, global = true, default_value = "target/bench-results")]
    out: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// How receivers acknowledge, and what else runs during every timed part (relay and
/// latency).
#[derive(Debug, clap::Args)]
struct TimedPartArgs {
    /// Milliseconds a receiver may hold acknowledgements to send them together (0:
    /// every frame is acknowledged on arrival).
    #[arg(long, default_value_t = 0)]
    ack_delay_ms: u64,
    /// During every timed part, an outside connection to the server's database takes
    /// SQLite's write lock every EVERY_MS and holds it HOLD_MS, as the server's own
    /// registrations and key-directory writes do; its waits for the lock are reported.
    #[arg(long, value_name = "HOLD_MS,EVERY_MS")]
    hold_write_lock: Option<HoldWriteLock>,
    /// During every timed part, the first sender's device renames itself through the
    /// API every MS (a small write through the server's `sqlx` connection, as
    /// registrations and KeyPackage uploads are); the renames' times are reported.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    rename_every: Option<u64>,
    /// Milliseconds to watch the server's storage threads after every timed part: the
    /// CPU they spend then is the work the run left behind (the sweep of delivered
    /// ciphertexts runs two seconds after they were stored, the checkpoint after it),
    /// reported and counted in "µs/msg with deferred"; 0 skips it.
    #[arg(long, default_value_t = 3_000)]
    settle_ms: u64,
}

impl TimedPartArgs {
    /// The relay settings with these.
    fn relay_options(
        &self,
        messages: usize,
        size: usize,
        window: usize,
        decrypt_every: usize,
    ) -> RelayOptions {
        RelayOptions {
            messages,
            size,
            rate: None,
            window,
            decrypt_every,
            ack_delay: Duration::from_millis(self.ack_delay_ms),
            hold_write_lock: self.hold_write_lock,
            rename_every: self.rename_every.map(Duration::from_millis),
            settle: Duration::from_millis(self.settle_ms),
            measure_after: Duration::ZERO,
            timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay throughput: P sender/receiver pairs, as fast as the server answers.
    Relay {
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        pairs: Vec<usize>,
        /// Total messages per run.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// Plaintext bytes per message.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Unanswered sends per sender.
        #[arg(long, default_value_t = 32)]
        window: usize,
        #[arg(long, default_value_t = 100)]
        decrypt_every: usize,
        #[command(flatten)]
        timed: TimedPartArgs,
        /// Timed runs per pair count, on the same server and population (fresh messages
        /// each time); the JSON has every run.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Latency at fractions of the peak rate (measured first unless `--peak` is given),
    /// plotted into an SVG.
    Latency {
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Messages of each run at full speed (the peak). A paced run sends for
        /// `--measure-after-ms` plus about 5 s at its rate, at most 1,000,000 messages.
        #[arg(long, default_value_t = 60_000)]
        messages: usize,
        #[arg(long)]
        peak: Option<f64>,
        #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
        fractions: Vec<f64>,
        /// Where the plot goes (default: `latency-under-load.svg` beside the JSON, so that
        /// a probe at one rate never replaces the plot in docs/; `scripts/bench.sh` names
        /// docs/latency-under-load.svg).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// The latency percentiles of a paced run count only the messages sent this many
        /// milliseconds or more into it (its rate, delivery and CPU count them all), and it
        /// sends for about 5 s after that: the server's steady state, which begins when it
        /// starts to sweep delivered ciphertexts two seconds after storing them. 0 counts
        /// every message. The runs at full speed count every message.
        #[arg(long, default_value_t = 3_000)]
        measure_after_ms: u64,
        #[command(flatten)]
        timed: TimedPartArgs,
        /// Timed runs of every setting (the peak and each fraction) on the same server;
        /// the peak is the median of its runs, the summary and the plot use the run with
        /// the median p99 of each fraction, and the JSON has every run.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Idle authenticated push-mode connections: server memory per connection.
    Idle {
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,19000")]
        steps: Vec<usize>,
    },
    /// Offline drain: connect and acknowledge a backlog.
    Drain {
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Group fan-out: one sender, every member online.
    Fanout {
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        members: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// (internal) Holds idle connections for the `idle` scenario.
    #[command(hide = true)]
    IdleWorker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
        #[arg(long)]
        source: String,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // One thread: the generator gets one core and must not compete with the server's.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sealpost-bench: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sealpost-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn server_options(args: &Args) -> ServerOptions {
    ServerOptions {
        binary: args
            .server_binary
            .clone()
            .unwrap_or_else(ServerOptions::default_binary),
        cpus: Some(args.server_cpus.clone()).filter(|c| !c.is_empty()),
        kt_interval_ms: 50,
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let options = server_options(&args);
    if let Command::IdleWorker {
        url,
        tokens,
        from,
        to,
        source,
    } = &args.command
    {
        return idle::worker(url, tokens, *from, *to, source).await;
    }
    // The server's database goes into the temporary directory (see `server`). Nothing
    // else runs yet, so the blocking check holds up nothing.
    let disk_dir = std::env::temp_dir();
    let machine = machine::check(&disk_dir)?;
    println!("machine: {}", machine.describe());
    match &args.command {
        Command::Relay {
            pairs,
            messages,
            size,
            window,
            decrypt_every,
            timed,
            repeat,
        } => {
            let mut results = Vec::new();
            for &p in pairs {
                let server = ServerProcess::start(&options).await?;
                let population = Population::new(&server.url)?;
                let pairs = population.pairs(p, "").await?;
                let relay = timed.relay_options(*messages, *size, *window, *decrypt_every);
                for _ in 0..(*repeat).max(1) {
                    let prepared = relay::prepare_all(&pairs, &relay)?;
                    results.push(relay::run(&server, &pairs, &prepared, &relay).await?);
                    print_relay(&results);
                }
            }
            write_json(
                &args.out.join("relay.json"),
                &Recorded::finish(&disk_dir, machine, results)?,
            )
        }
        Command::Latency {
            pairs,
            messages,
            peak,
            fractions,
            plot: plot_path,
            measure_after_ms,
            timed,
            repeat,
        } => {
            let repeat = (*repeat).max(1);
            let server = ServerProcess::start(&options).await?;
            let population = Population::new(&server.url)?;
            let pairs = population.pairs(*pairs, "").await?;
            let mut relay = timed.relay_options(*messages, 200, 32, 100);
            let mut results = Vec::new();
            let peak = match peak {
                Some(peak) => *peak,
                None => {
                    for _ in 0..repeat {
                        let prepared = relay::prepare_all(&pairs, &relay)?;
                        results.push(relay::run(&server, &pairs, &prepared, &relay).await?);
                        print_relay(&results);
                    }
                    let rates: Vec<f64> = results.iter().map(|r| r.delivered_per_second).collect();
                    repeats::median_of(&rates, |rate| *rate).context("no peak run")?
                }
            };
            relay.measure_after = Duration::from_millis(*measure_after_ms);
            for fraction in fractions {
                relay.rate = Some(peak * fraction);
                // Enough messages for ~5 s at this rate after the part not measured.
                let seconds = 5.0 + relay.measure_after.as_secs_f64();
                relay.messages =
                    ((peak * fraction * seconds) as usize).clamp(1_000, PACED_MESSAGES_MAX);
                for _ in 0..repeat {
                    let prepared = relay::prepare_all(&pairs, &relay)?;
                    results.push(relay::run(&server, &pairs, &prepared, &relay).await?);
                    print_relay(&results);
                }
            }
            // The JSON first: a plot that cannot be written must not lose the figures.
            let recorded = Recorded::finish(&disk_dir, machine, results)?;
            write_json(&args.out.join("latency.json"), &recorded)?;
            let settings = repeats::by_setting(
                &recorded.results,
                |r| r.offered_rate.map(f64::to_bits),
                |r| match r.offered_rate {
                    // The peak's runs stand for the peak by their rate, the rest by p99.
                    None => r.delivered_per_second,
                    Some(_) => r.latency.p99_ms,
                },
            );
            if repeat > 1 {
                print_latency_summary(&recorded.results, &settings);
            }
            let medians: Vec<&RelayResult> = settings
                .iter()
                .map(|s| &recorded.results[s.median])
                .collect();
            let plot_path = plot_path
                .clone()
                .unwrap_or_else(|| args.out.join("latency-under-load.svg"));
            plot::latency_under_load(&plot_path, &medians)
        }
        Command::Idle { steps } => {
            let server = ServerProcess::start(&options).await?;
            let result = idle::run(&server, steps).await?;
            let rows: Vec<Vec<String>> = result
                .steps
                .iter()
                .map(|s| {
                    vec![
                        thousands(s.connections as f64),
                        format!("{:.1}", s.server_rss_bytes as f64 / 1048576.0),
                        thousands(s.bytes_per_connection),
                        thousands(s.bytes_per_connection_cold),
                    ]
                })
                .collect();
            print_table(
                &format!(
                    "idle push-mode connections (baseline RSS {:.1} MiB after {} connections \
                     opened and closed, {:.1} MiB before; slope {} bytes/connection)",
                    result.baseline_rss_bytes as f64 / 1048576.0,
                    result.warm_up_connections,
                    result.cold_baseline_rss_bytes as f64 / 1048576.0,
                    thousands(result.slope_bytes_per_connection)
                ),
                &[
                    "connections",
                    "server RSS MiB",
                    "bytes/connection",
                    "from cold baseline",
                ],
                &rows,
            );
            write_json(
                &args.out.join("idle.json"),
                &Recorded::finish(&disk_dir, machine, result)?,
            )
        }
        Command::Drain { messages, runs } => {
            let server = ServerProcess::start(&options).await?;
            let population = Population::new(&server.url)?;
            let pairs = population.pairs(1, "drain").await?;
            let pair = pairs.first().context("no pair")?;
            let mut results = Vec::new();
            for _ in 0..*runs {
                results.push(
                    drain::run(&server, pair, *messages, 200, Duration::from_secs(120)).await?,
                );
            }
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    vec![
                        thousands(r.messages as f64),
                        format!("{:.1}", r.first_envelope_ms),
                        format!("{:.1}", r.drain_ms),
                        format!("{:.3}", r.server_cpu_seconds),
                        format!("{:.3}", r.generator_cpu_seconds),
                    ]
                })
                .collect();
            print_table(
                "offline drain (connect → every envelope acknowledged and deleted)",
                &[
                    "messages",
                    "first ms",
                    "all acked ms",
                    "server CPU s",
                    "generator CPU s",
                ],
                &rows,
            );
            write_json(
                &args.out.join("drain.json"),
                &Recorded::finish(&disk_dir, machine, results)?,
            )
        }
        Command::Fanout { members, rounds } => {
            let server = ServerProcess::start(&options).await?;
            let population = Population::new(&server.url)?;
            let mut results = Vec::new();
            for &m in members {
                results.push(fanout::run(&population, m, *rounds, Duration::from_secs(30)).await?);
            }
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    vec![
                        thousands(r.members as f64),
                        format!("{:.2}", r.send_to_accepted_ms.p50_ms),
                        format!("{:.2}", r.send_to_last_ms.p50_ms),
                        format!("{:.2}", r.send_to_last_ms.max_ms),
                        format!("{:.2}", r.accepted_to_last_ms.p50_ms),
                        format!("{:.2}", r.accepted_to_last_ms.max_ms),
                        format!("{:.2}", r.first_to_last_ms.p50_ms),
                        format!("{:.2}", r.first_to_last_ms.max_ms),
                    ]
                })
                .collect();
            print_table(
                &format!("group fan-out ({rounds} rounds each; ms)"),
                &[
                    "members",
                    "accepted p50",
                    "last p50",
                    "last max",
                    "accepted→last p50",
                    "accepted→last max",
                    "first→last p50",
                    "first→last max",
                ],
                &rows,
            );
            write_json(
                &args.out.join("fanout.json"),
                &Recorded::finish(&disk_dir, machine, results)?,
            )
        }
        Command::IdleWorker { .. } => unreachable!("handled above"),
    }
}

/// Most messages a paced latency run sends (they are encrypted before it, ~1 KiB of
/// memory each with the ledger).
const PACED_MESSAGES_MAX: usize = 1_000_000;

/// The column of the server's CPU per message by thread (`ThreadCpu::cell`).
const THREADS_HEADER: &str = "µs/msg: runtime/writer/flush/ckpt/other";

/// One row per setting of a repeated latency run: its median run and the spread of p99.
fn print_latency_summary(results: &[RelayResult], settings: &[repeats::Setting]) {
    let rows: Vec<Vec<String>> = settings
        .iter()
        .map(|setting| {
            let median = &results[setting.median];
            let p99s = setting.runs.iter().map(|i| results[*i].latency.p99_ms);
            let low = p99s.clone().fold(f64::INFINITY, f64::min);
            let high = p99s.fold(f64::NEG_INFINITY, f64::max);
            vec![
                median.offered_rate.map_or("max".into(), thousands),
                setting.runs.len().to_string(),
                thousands(median.delivered_per_second),
                format!("{:.1}", median.server_cpu_us_per_message),
                median.server_cpu_us_per_message_by_thread.cell(),
                format!("{:.2}", median.latency.p50_ms),
                format!("{:.2}", median.latency.p99_ms),
                format!("{low:.2}–{high:.2}"),
                cpu_use::busy_cell(&median.cpus),
            ]
        })
        .collect();
    print_table(
        "latency by setting (the run with the median p99; for the peak, the median rate)",
        &[
            "offered/s",
            "runs",
            "msg/s",
            "server µs/msg",
            THREADS_HEADER,
            "p50 ms",
            "p99 ms",
            "p99 range ms",
            "busy % by CPU",
        ],
        &rows,
    );
}

fn print_relay(results: &[RelayResult]) {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.pairs.to_string(),
                r.offered_rate.map_or("max".into(), thousands),
                thousands(r.delivered as f64),
                r.lost.to_string(),
                r.duplicates.to_string(),
                thousands(r.delivered_per_second),
                format!("{:.1}", r.server_cpu_us_per_message),
                r.server_cpu_us_per_message_with_deferred
                    .map_or("-".into(), |us| format!("{us:.1}")),
                r.server_cpu_us_per_message_by_thread.cell(),
                format!("{:.1}", r.generator_cpu_us_per_message),
                format!("{:.2}", r.latency.p50_ms),
                format!("{:.2}", r.latency.p99_ms),
                format!("{:.2}", r.latency.p999_ms),
                format!("{}/{}", r.decrypted_sample, r.decrypt_failures),
                format!(
                    "{:.0}",
                    r.writer.requests as f64 / r.writer.transactions.max(1) as f64
                ),
                thousands(r.writer.wal_flushes as f64 / r.wall_seconds.max(1e-9)),
                r.server_bytes_written_per_message
                    .map_or("-".into(), |bytes| format!("{:.2}", bytes / 1024.0)),
                cpu_use::busy_cell(&r.cpus),
                cpu_use::steal_cell(&r.cpus),
            ]
        })
        .collect();
    print_table(
        "relay (pre-encrypted MLS; latency send → receipt)",
        &[
            "pairs",
            "offered/s",
            "delivered",
            "lost",
            "dup",
            "msg/s",
            "server µs/msg",
            "with deferred",
            THREADS_HEADER,
            "gen µs/msg",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "decrypted/failed",
            "requests/tx",
            "flushes/s",
            "KiB written/msg",
            "busy % by CPU",
            "steal % by CPU",
        ],
        &rows,
    );
    if let Some(held) = results.last().and_then(|r| r.outside_writer) {
        println!(
            "outside writer ({} ms every {} ms), last run: {} turns; its wait for the write lock p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            held.hold_ms,
            held.every_ms,
            held.wait.samples,
            held.wait.p50_ms,
            held.wait.p99_ms,
            held.wait.max_ms
        );
    }
    if let Some(renames) = results.last().and_then(|r| r.renames) {
        println!(
            "renames (every {} ms), last run: {}; request to answer p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            renames.every_ms,
            renames.latency.samples,
            renames.latency.p50_ms,
            renames.latency.p99_ms,
            renames.latency.max_ms
        );
    }
    if let Some(last) = results.last()
        && let (Some(waits), Some(ms)) = (last.writer.turn_waits, last.writer.turn_wait_ms)
        && waits > 0
    {
        println!(
            "the writer waited for the sqlx connection's turn {waits} times in the last run, {ms:.1} ms in all"
        );
    }
}
