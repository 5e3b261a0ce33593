//! Errors of the client engine.

use sealpost_proto::ErrorCode;
use thiserror::Error;

/// Everything that can go wrong in the client engine, typed so front ends can explain it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoreError {
    #[error("this home directory has no account yet; run `sealpost register` first")]
    NotRegistered,
    #[error("this home directory already has an account ({0})")]
    AlreadyRegistered(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("no conversation named {0:?}")]
    UnknownConversation(String),
    #[error("{0:?} names more than one conversation; use the group id")]
    AmbiguousConversation(String),
    #[error("you are no longer a member of {0:?}")]
    NotActive(String),
    #[error("{user} is not a member of {conversation:?}")]
    NotAMember { user: String, conversation: String },
    #[error("{user} is already a member of {conversation:?}")]
    AlreadyAMember { user: String, conversation: String },
    #[error("a group named {0:?} already exists")]
    NameTaken(String),
    #[error("this device was removed from its account; link it again with `sealpost link`")]
    DeviceRevoked,
    #[error("the key of {user} changed: {detail}")]
    KeyMismatch { user: String, detail: String },
    #[error("key transparency check failed: {0}")]
    Transparency(String),
    #[error("invalid device certificate: {0}")]
    InvalidCertificate(String),
    #[error("server: {message} ({code})")]
    Server {
        code: ErrorCode,
        message: String,
        current_epoch: Option<u64>,
    },
    #[error("cannot reach the server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the server sent a malformed response: {0}")]
    BadResponse(String),
    #[error("gave up after {0} attempts: the group kept changing")]
    TooManyConflicts(usize),
    #[error("MLS error: {0}")]
    Mls(String),
    #[error("local store error: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("local store codec error: {0}")]
    Codec(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl CoreError {
    /// The server's error code, when the server refused the request.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A stable code for front ends: the server's code when the server refused the
    /// request, otherwise a code naming the local failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Server { code, .. } => code.as_str(),
            Self::NotRegistered => "not_registered",
            Self::AlreadyRegistered(_) => "already_registered",
            Self::InvalidInput(_) => "invalid_input",
            Self::UnknownConversation(_) => "unknown_conversation",
            Self::AmbiguousConversation(_) => "ambiguous_conversation",
            Self::NotActive(_) => "not_active",
            Self::NotAMember { .. } => "not_a_member",
            Self::AlreadyAMember { .. } => "already_a_member",
            Self::NameTaken(_) => "name_taken",
            Self::DeviceRevoked => "device_revoked",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::InvalidCertificate(_) => "invalid_certificate",
            Self::Transparency(_) => "transparency",
            Self::Unreachable { .. } => "unreachable",
            Self::BadResponse(_) => "bad_response",
            Self::TooManyConflicts(_) => "too_many_conflicts",
            Self::Mls(_) => "mls",
            Self::Store(_) | Self::Codec(_) | Self::Io(_) => "local_store",
        }
    }

    pub(crate) fn mls(err: impl std::fmt::Display) -> Self {
        Self::Mls(err.to_string())
    }
}
