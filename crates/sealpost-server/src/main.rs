//! `sealpost-server`: runs the Sealpost delivery server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use sealpost_server::{Config, serve};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

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
    let mut config = Config::new(args.data_dir);
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
