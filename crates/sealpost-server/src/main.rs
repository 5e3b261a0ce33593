//! `sealpost-server`: runs the Sealpost delivery server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use sealpost_server::limits::Limits;
use sealpost_server::{Config, serve};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than the system allocator: the relay path makes several short-lived
/// allocations per message (frames, envelopes, answers) on one thread and frees them on
/// another, which glibc's allocator serves with lock traffic and chunk consolidation
/// (see docs/BENCHMARKS-LOG.md for the measured difference).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Sealpost end-to-end encrypted messaging server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SEALPOST_LISTEN", default_value = "127.0.0.1:8420")]
    listen: SocketAddr,
    /// Directory for the database.
    #[arg(long, env = "SEALPOST_DATA_DIR", default_value = "./sealpost-data")]
    data_dir: PathBuf,
    /// Days an undelivered message is kept.
    #[arg(long, env = "SEALPOST_MAILBOX_TTL_DAYS", default_value_t = 30)]
    mailbox_ttl_days: u64,
    /// Milliseconds between key-directory epochs (an epoch is published only when
    /// accounts or devices changed).
    #[arg(long, env = "SEALPOST_KT_INTERVAL_MS", default_value_t = 5_000)]
    kt_interval_ms: u64,
    /// Requests per second from one client address [default: 50].
    #[arg(long, env = "SEALPOST_IP_RATE")]
    ip_rate: Option<u32>,
    /// Burst of requests from one client address [default: 300].
    #[arg(long, env = "SEALPOST_IP_BURST")]
    ip_burst: Option<u32>,
    /// Requests per second by one account [default: 50].
    #[arg(long, env = "SEALPOST_ACCOUNT_RATE")]
    account_rate: Option<u32>,
    /// Burst of requests by one account [default: 500].
    #[arg(long, env = "SEALPOST_ACCOUNT_BURST")]
    account_burst: Option<u32>,
    /// KeyPackage claims per minute by one account [default: 120].
    #[arg(long, env = "SEALPOST_CLAIMS_PER_MINUTE")]
    claims_per_minute: Option<u32>,
    /// Burst of KeyPackage claims by one account [default: 60].
    #[arg(long, env = "SEALPOST_CLAIMS_BURST")]
    claims_burst: Option<u32>,
    /// Open WebSockets per account [default: 32].
    #[arg(long, env = "SEALPOST_SOCKETS_PER_ACCOUNT")]
    sockets_per_account: Option<usize>,
    /// Seconds one request may take, its body included [default: 30].
    #[arg(long, env = "SEALPOST_REQUEST_TIMEOUT_SECS")]
    request_timeout_secs: Option<u64>,
    /// Seconds a client may take to send a request's headers [default: 10].
    #[arg(long, env = "SEALPOST_HEADER_TIMEOUT_SECS")]
    header_timeout_secs: Option<u64>,
    /// Envelopes one device's mailbox may hold before application messages to it are
    /// refused [default: 100000].
    #[arg(long, env = "SEALPOST_MAILBOX_QUOTA")]
    mailbox_quota: Option<u64>,
}

impl Args {
    /// The abuse limits: the defaults of [`Limits`], with what the flags override.
    fn limits(&self) -> Limits {
        let mut limits = Limits::default();
        let set = |slot: &mut u32, value: Option<u32>| {
            if let Some(value) = value {
                *slot = value.max(1);
            }
        };
        set(&mut limits.ip_per_second, self.ip_rate);
        set(&mut limits.ip_burst, self.ip_burst);
        set(&mut limits.account_per_second, self.account_rate);
        set(&mut limits.account_burst, self.account_burst);
        set(&mut limits.claims_per_minute, self.claims_per_minute);
        set(&mut limits.claims_burst, self.claims_burst);
        if let Some(sockets) = self.sockets_per_account {
            limits.sockets_per_account = sockets;
        }
        if let Some(secs) = self.request_timeout_secs {
            limits.request_timeout = Duration::from_secs(secs.max(1));
        }
        if let Some(secs) = self.header_timeout_secs {
            limits.header_read_timeout = Duration::from_secs(secs.max(1));
        }
        if let Some(quota) = self.mailbox_quota {
            limits.mailbox_quota = quota;
        }
        limits
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SEALPOST_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sealpost-server: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let limits = args.limits();
    let mut config = Config::new(args.data_dir);
    config.limits = limits;
    config.listen = args.listen;
    config.mailbox_ttl = Duration::from_secs(args.mailbox_ttl_days.max(1) * 24 * 3600);
    config.kt_interval = Duration::from_millis(args.kt_interval_ms.max(10));
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    serve(config, listener, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// The defaults shown in `--help` are the ones `Limits::default()` uses, and flags
    /// override them.
    #[test]
    fn limit_flags() {
        let help = Args::command().render_long_help().to_string();
        let defaults = Limits::default();
        for shown in [
            format!(
                "from one client address [default: {}]",
                defaults.ip_per_second
            ),
            format!("from one client address [default: {}]", defaults.ip_burst),
            format!("by one account [default: {}]", defaults.account_per_second),
            format!("by one account [default: {}]", defaults.account_burst),
            format!("by one account [default: {}]", defaults.claims_per_minute),
            format!("by one account [default: {}]", defaults.claims_burst),
            format!("per account [default: {}]", defaults.sockets_per_account),
            format!(
                "its body included [default: {}]",
                defaults.request_timeout.as_secs()
            ),
            format!(
                "request's headers [default: {}]",
                defaults.header_read_timeout.as_secs()
            ),
            format!("refused [default: {}]", defaults.mailbox_quota),
        ] {
            assert!(help.contains(&shown), "--help lacks {shown:?}:\n{help}");
        }
        let args =
            Args::try_parse_from(["sealpost-server", "--ip-rate", "7", "--mailbox-quota", "9"])
                .unwrap();
        let limits = args.limits();
        assert_eq!(limits.ip_per_second, 7);
        assert_eq!(limits.mailbox_quota, 9);
        assert_eq!(limits.ip_burst, defaults.ip_burst);
    }
}
