//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Sealpost: end-to-end encrypted messaging (MLS).
#[derive(Debug, Parser)]
#[command(name = "sealpost", version, about)]
pub struct Args {
    /// Directory holding this device's keys and messages.
    #[arg(long, global = true, env = "SEALPOST_HOME")]
    pub home: Option<PathBuf>,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an account with this device as its first device.
    Register {
        username: String,
        /// The server, e.g. http://127.0.0.1:8420.
        #[arg(long, env = "SEALPOST_SERVER")]
        server: String,
        /// One-time KeyPackages to upload.
        #[arg(long, default_value_t = 100, hide = true)]
        key_packages: usize,
        /// A name for this device (shown in `sealpost devices`).
        #[arg(long)]
        name: Option<String>,
        /// The server's key-directory signing key (hex), obtained out of band; without it
        /// the key the server presents now is pinned.
        #[arg(long)]
        kt_key: Option<String>,
    },
    /// Verify that the key directory only ever grew (append-only proofs between epochs).
    Audit {
        /// First epoch (default 0).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last epoch (default: the current one).
        #[arg(long)]
        to: Option<u64>,
    },
    /// Show this device's account.
    Whoami,
    /// Make this device a new device of an existing account, with a code from
    /// `sealpost device link` on one of its devices.
    Link {
        code: String,
        /// The server, e.g. http://127.0.0.1:8420.
        #[arg(long, env = "SEALPOST_SERVER")]
        server: String,
        /// A name for this device (shown in `sealpost devices`).
        #[arg(long)]
        name: Option<String>,
        /// One-time KeyPackages to upload.
        #[arg(long, default_value_t = 100, hide = true)]
        key_packages: usize,
    },
    /// List this account's devices.
    Devices,
    /// Manage this account's devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Show the safety number with a user (digits and a QR code).
    SafetyNumber { user: String },
    /// Mark a user verified by their safety number, or accept their new key.
    Verify {
        user: String,
        /// The 60-digit safety number as the other person sees it.
        number: Option<String>,
        /// Accept a verified contact's new account key (they become unverified).
        #[arg(long, conflicts_with = "number")]
        accept_new_key: bool,
    },
    /// Manage the account.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Send a message: `send USERNAME TEXT` (1:1) or `send --group NAME TEXT`.
    Send {
        /// Send to this group instead of a user.
        #[arg(long)]
        group: Option<String>,
        /// USERNAME TEXT, or TEXT with --group.
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
    },
    /// Fetch, decrypt and print new messages.
    Sync {
        /// Stay connected and print messages as they arrive, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// List conversations.
    Conversations,
    /// Show a conversation's messages (a group name, or a username for 1:1).
    History {
        conversation: String,
        /// How many of the latest messages to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Manage groups.
    #[command(subcommand)]
    Group(GroupCommand),
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group.
    Create {
        name: String,
        /// Comma-separated usernames.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
    },
    /// Add a user to a group.
    Add { name: String, user: String },
    /// Remove a user from a group.
    Remove { name: String, user: String },
    /// Leave a group.
    Leave { name: String },
    /// List a group's members and their devices.
    Members { name: String },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Show a one-time code (valid 10 minutes) to link a new device, and wait for it.
    Link,
    /// Rename a device of this account.
    Rename { id: String, name: String },
    /// Revoke a device: it is removed from every conversation and can no longer log in.
    Remove { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Delete the account and all its devices from the server.
    Delete {
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}
