//! The Sealpost client engine, used by every front end (CLI, terminal UI, web).
//!
//! - [`engine`]: the protocol state machine. It owns the local store and the MLS groups,
//!   turns user intents into typed requests for the server and turns envelopes from the
//!   server into history entries. It does no network I/O and reads no clock: `now` is
//!   passed in, so everything it decides can be tested without sockets.
//! - [`transport`]: the only module that opens sockets (HTTP and WebSocket).
//! - [`client`]: drives the engine over the transport: logging in, retrying a commit that
//!   lost an epoch race, draining the mailbox, following the WebSocket.
//! - [`identity`], [`payload`], [`store`]: device certificates, the encrypted application
//!   payload format, and the on-disk SQLite store shared with OpenMLS.

#[cfg(feature = "adversarial")]
pub mod adversarial;
pub mod client;
pub mod engine;
pub mod error;
pub mod identity;
pub mod kt;
pub mod link;
pub mod payload;
pub mod safety;
pub mod store;
pub mod transport;

pub use client::Client;
pub use engine::{ConversationKind, ConversationSummary, HistoryEntry};
pub use error::CoreError;
pub use uuid;
