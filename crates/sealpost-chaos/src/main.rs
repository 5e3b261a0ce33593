//! `sealpost-chaos-node`: one process of the chaos harness, which kills these processes with
//! SIGKILL at random moments. `server` runs a Sealpost server; `send` and `sync` run one
//! client operation against a home directory and exit.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sealpost_core::Client;
use sealpost_server::Config;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sealpost-chaos-node: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", listen, data_dir] => {
            let mut config = Config::new(PathBuf::from(data_dir));
            config.listen = listen.parse().context("listen address")?;
            config.kt_interval = Duration::from_millis(50);
            // All chaos clients share one address and run flat out.
            config.limits.ip_per_second = 100_000;
            config.limits.ip_burst = 100_000;
            config.limits.account_per_second = 100_000;
            config.limits.account_burst = 100_000;
            let listener = tokio::net::TcpListener::bind(config.listen).await?;
            sealpost_server::serve(config, listener, std::future::pending()).await?;
            Ok(())
        }
        ["send", home, "group", name, text] => {
            let client = Client::open(&PathBuf::from(home))?;
            client.send_group(name, text).await?;
            Ok(())
        }
        ["send", home, "direct", user, text] => {
            let client = Client::open(&PathBuf::from(home))?;
            client.send_direct(user, text).await?;
            Ok(())
        }
        ["sync", home] => {
            let client = Client::open(&PathBuf::from(home))?;
            client.sync().await?;
            Ok(())
        }
        _ => bail!(
            "usage: sealpost-chaos-node server ADDR DIR | send HOME group|direct NAME TEXT | sync HOME"
        ),
    }
}
