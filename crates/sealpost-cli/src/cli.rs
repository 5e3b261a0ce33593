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
    },
    /// Show this device's account.
    Whoami,
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
