//! Server configuration: where to listen, where data lives, and retention.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a server instance needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// How long an undelivered message waits in a mailbox.
    pub mailbox_ttl: Duration,
    /// How long a bearer token is valid.
    pub token_ttl: Duration,
    /// How long a login challenge is valid.
    pub challenge_ttl: Duration,
    /// How often expired rows are purged.
    pub expiry_interval: Duration,
    /// How long a device-link session lives.
    pub link_ttl: Duration,
    /// How often the key directory publishes a new epoch when there are changes.
    pub kt_interval: Duration,
    /// Abuse limits.
    pub limits: crate::limits::Limits,
}

impl Config {
    /// The defaults of `sealpost-server` with no flags.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8420)),
            data_dir: data_dir.into(),
            mailbox_ttl: Duration::from_secs(30 * 24 * 3600),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            challenge_ttl: Duration::from_secs(60),
            expiry_interval: Duration::from_secs(60),
            link_ttl: Duration::from_secs(sealpost_proto::limits::LINK_TTL_SECS),
            kt_interval: Duration::from_secs(5),
            limits: crate::limits::Limits::default(),
        }
    }

    /// Path of the SQLite database inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("sealpost.db")
    }
}
