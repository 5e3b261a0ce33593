//! Writes through the server's `sqlx` connection during the timed part (`--rename-every MS`).
//!
//! Registrations, KeyPackage uploads, device renames and key-directory epochs reach the
//! server's database through its `sqlx` connection, which takes turns at SQLite's write
//! lock with the group-commit writer that stores the messages. To see how long such a
//! write waits on a busy server, one device renames itself every MS ms through the real
//! API (a sealed name: one `UPDATE` on the server) while the messages flow, and the time
//! from each request to its answer is reported. Unlike `--hold-write-lock`, this goes
//! through the server's own connection, so it shows what its users would see.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sealpost_core::Client;
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use crate::report::Percentiles;

/// What the renames saw.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Renames {
    pub every_ms: f64,
    /// From sending each request to its answer (`samples` is the number of renames).
    pub latency: Percentiles,
}

/// Renames `client`'s own device every `every` until `stop` turns true; each request's
/// time to its answer goes into the result. A failed rename fails the run: the server
/// must not refuse a rename under load.
pub async fn rename_until(
    client: &Client,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Renames> {
    let device: Uuid = client
        .whoami()
        .context("the renaming device has no account")?
        .device_id
        .parse()
        .context("the renaming device's id is not a UUID")?;
    let mut times_ns = Vec::new();
    let mut next = tokio::time::Instant::now();
    while !*stop.borrow() {
        let asked = Instant::now();
        client
            .rename_device(device, &format!("bench {}", times_ns.len()))
            .await
            .context("a device rename failed during the timed part")?;
        times_ns.push(u64::try_from(asked.elapsed().as_nanos()).unwrap_or(u64::MAX));
        next += every;
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    break; // nobody can tell it to stop any more
                }
            }
        }
    }
    Ok(Renames {
        every_ms: every.as_secs_f64() * 1e3,
        latency: Percentiles::of(&mut times_ns),
    })
}
