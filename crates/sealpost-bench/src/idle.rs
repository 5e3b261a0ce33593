//! Scenario 3: idle connections. `N` authenticated devices each hold a push-mode WebSocket
//! and do nothing; the figure is the server's resident memory per connection.
//!
//! A process here may hold at most 20,000 open files, so the connections are spread over
//! worker processes (`sealpost-bench idle-worker`, at most [`PER_WORKER`] each), and each
//! worker binds its own 127.0.0.x source address so ephemeral ports never run short. The
//! devices are bare (registered and logged in, no MLS state): an idle connection needs no
//! more, and 19,000 full clients would only slow the setup.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use sealpost_core::identity::AccountKey;
use sealpost_core::transport::Transport;
use sealpost_proto::Bytes64;
use sealpost_proto::api::{LoginRequest, RegisterRequest, login_signed_bytes};
use serde::Serialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::population::progress;
use crate::server::ServerProcess;

/// Connections one worker process holds (well under its 20,000 open files).
pub const PER_WORKER: usize = 9_500;

/// Connections opened and closed before the baseline is read (see [`run`]).
const WARM_UP: usize = 1_000;

#[derive(Debug, Clone, Serialize)]
pub struct IdleStep {
    pub connections: usize,
    pub server_rss_bytes: u64,
    /// (RSS − RSS with no connection, after the warm-up) / connections.
    pub bytes_per_connection: f64,
    /// (RSS − RSS right after the registrations, before any connection) / connections.
    pub bytes_per_connection_cold: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// RSS with no connection open, after the warm-up.
    pub baseline_rss_bytes: u64,
    /// RSS right after the registrations, before any connection was ever opened.
    pub cold_baseline_rss_bytes: u64,
    /// Connections opened and closed between the two baselines.
    pub warm_up_connections: usize,
    pub steps: Vec<IdleStep>,
    /// Least-squares slope of RSS over connections.
    pub slope_bytes_per_connection: f64,
}

/// Registers and logs in one bare device; returns its bearer token.
async fn bare_device(transport: &Transport, username: &str) -> anyhow::Result<String> {
    let account = AccountKey::generate();
    let device_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let device_id = uuid::Uuid::new_v4();
    let certificate = account.certify(username, device_id, device_key.verifying_key().to_bytes());
    transport
        .register(&RegisterRequest {
            username: username.to_owned(),
            account_key: Bytes64(account.public().to_vec()),
            device_certificate: Bytes64(certificate.encode()),
        })
        .await?;
    let challenge = transport.challenge(device_id).await?;
    use ed25519_dalek::Signer as _;
    let signature = device_key.sign(&login_signed_bytes(&device_id, challenge.nonce.as_ref()));
    let login = transport
        .login(&LoginRequest {
            challenge_id: challenge.challenge_id,
            signature: Bytes64(signature.to_bytes().to_vec()),
        })
        .await?;
    Ok(login.token)
}

pub async fn run(server: &ServerProcess, steps: &[usize]) -> anyhow::Result<IdleResult> {
    let total = steps.iter().copied().max().unwrap_or(0);
    progress(&format!("registering {total} bare devices"));
    let transport = Transport::new(&server.url)?;
    let names: Vec<String> = (0..total).map(|i| format!("idle{i:06}")).collect();
    let tokens: Vec<anyhow::Result<String>> = futures_util::stream::iter(&names)
        .map(|name| bare_device(&transport, name))
        .buffered(64)
        .collect()
        .await;
    let tokens: Vec<String> = tokens.into_iter().collect::<anyhow::Result<_>>()?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, tokens.join("\n"))?;
    drop(transport);
    // The key directory publishes the registrations in epochs after they are answered.
    let cold_baseline = settled_rss(server).await?;
    // The first burst of connections leaves memory behind that later connections reuse
    // (allocator segments, the database's page caches filled by the token lookups): RSS
    // at 1,000 connections was once higher than at 10,000. A burst opened and closed
    // before the baseline is read makes the figure the cost of holding connections, as
    // on a server that has served some before, rather than of that state.
    let warm_up = WARM_UP.min(total);
    if warm_up > 0 {
        progress(&format!("warm-up: {warm_up} connections opened and closed"));
        drop(Worker::start(
            &server.url,
            &token_file,
            0,
            warm_up,
            "127.0.0.200",
        )?);
    }
    let baseline = settled_rss(server).await?;

    let mut workers: Vec<Worker> = Vec::new();
    let mut connected = 0;
    let mut result_steps = Vec::new();
    for &target in steps {
        while connected < target {
            let count = (target - connected).min(PER_WORKER);
            let source = format!("127.0.0.{}", 2 + workers.len());
            progress(&format!(
                "worker {} opens {count} connections from {source}",
                workers.len() + 1
            ));
            workers.push(Worker::start(
                &server.url,
                &token_file,
                connected,
                connected + count,
                &source,
            )?);
            connected += count;
        }
        // Let allocations settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = server.rss_bytes()?;
        let step = IdleStep {
            connections: connected,
            server_rss_bytes: rss,
            bytes_per_connection: rss.saturating_sub(baseline) as f64 / connected.max(1) as f64,
            bytes_per_connection_cold: rss.saturating_sub(cold_baseline) as f64
                / connected.max(1) as f64,
        };
        progress(&format!(
            "{} connections: server RSS {:.1} MiB, {:.0} bytes each",
            step.connections,
            rss as f64 / 1048576.0,
            step.bytes_per_connection
        ));
        result_steps.push(step);
    }
    drop(workers);
    let points: Vec<(f64, f64)> = std::iter::once((0.0, baseline as f64))
        .chain(
            result_steps
                .iter()
                .map(|s| (s.connections as f64, s.server_rss_bytes as f64)),
        )
        .collect();
    Ok(IdleResult {
        baseline_rss_bytes: baseline,
        cold_baseline_rss_bytes: cold_baseline,
        warm_up_connections: warm_up,
        steps: result_steps,
        slope_bytes_per_connection: slope(&points),
    })
}

/// The server's RSS once it has changed by less than 1 MiB in a second (at most 30 s):
/// work finishing in the background (key-directory epochs, the allocator returning freed
/// memory) otherwise moves the baseline by tens of MiB.
async fn settled_rss(server: &ServerProcess) -> anyhow::Result<u64> {
    let mut last = server.rss_bytes()?;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = server.rss_bytes()?;
        if now.abs_diff(last) < 1 << 20 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// A worker process holding connections until it is dropped.
struct Worker {
    child: Child,
}

impl Worker {
    fn start(
        url: &str,
        tokens: &Path,
        from: usize,
        to: usize,
        source: &str,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("idle-worker")
            .arg("--url")
            .arg(url)
            .arg("--tokens")
            .arg(tokens)
            .arg("--from")
            .arg(from.to_string())
            .arg("--to")
            .arg(to.to_string())
            .arg("--source")
            .arg(source)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start an idle worker")?;
        let stdout = child.stdout.take().context("no worker stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("ready") {
            let _ = child.kill();
            bail!("an idle worker failed: {line}");
        }
        Ok(Self { child })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing its stdin tells the worker to exit.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The worker process: opens connections `from..to` of the token file from `source`,
/// prints `ready`, and holds them until its stdin closes.
pub async fn worker(
    url: &str,
    tokens: &PathBuf,
    from: usize,
    to: usize,
    source: &str,
) -> anyhow::Result<()> {
    let tokens = std::fs::read_to_string(tokens)?;
    let tokens: Vec<&str> = tokens.lines().skip(from).take(to - from).collect();
    let server: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .parse()
        .context("the idle scenario needs an http://IP:port server URL")?;
    let source: std::net::IpAddr = source.parse().context("bad source address")?;
    let ws_url = format!("ws://{server}/v1/ws?mode=push");
    let sockets: Vec<anyhow::Result<_>> = futures_util::stream::iter(tokens)
        .map(|token| {
            let ws_url = ws_url.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(source, 0))?;
                let stream = socket.connect(server).await?;
                let mut request = ws_url.into_client_request()?;
                request.headers_mut().insert(
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {token}"))?,
                );
                let (socket, _) = tokio_tungstenite::client_async(request, stream).await?;
                anyhow::Ok(socket)
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let sockets: Vec<_> = sockets.into_iter().collect::<anyhow::Result<_>>()?;
    println!("ready {}", sockets.len());
    std::io::stdout().flush()?;
    // Hold the sockets until the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    drop(sockets);
    Ok(())
}
