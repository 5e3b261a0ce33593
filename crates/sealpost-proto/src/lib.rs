//! Wire types of the Sealpost HTTP/WebSocket API.
//!
//! This crate is the contract between `sealpost-server` and every client: request and
//! response bodies ([`api`]), the stable error codes and error body ([`error`]), the size
//! and count limits both sides enforce ([`limits`]), the device certificate format
//! ([`certificate`]) name validation ([`names`]) and the push-mode WebSocket protocol ([`ws`]). It does no I/O and holds no
//! cryptography, so it can be used from a server, a CLI or a WebAssembly client alike.

pub mod api;
pub mod bytes;
pub mod certificate;
pub mod error;
pub mod kt;
pub mod limits;
pub mod names;
pub mod ws;

pub use bytes::Bytes64;
pub use error::{ErrorBody, ErrorCode, ErrorDetail};
