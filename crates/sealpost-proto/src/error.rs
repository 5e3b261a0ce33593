//! Stable error codes and the error body every endpoint answers with.
//!
//! Every failed request gets `{"error":{"code":"...","message":"..."}}`. The `code` is part
//! of the API contract: clients match on it, so a code is never renamed or reused. The
//! `message` is for people and may change. The HTTP status for each code is defined here
//! once ([`ErrorCode::http_status`]) so that server and clients agree on it.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not valid JSON, has wrong types or misses fields.
    BadRequest,
    /// The body or a field in it is larger than allowed.
    PayloadTooLarge,
    /// The username does not match `[a-z0-9_.]{3,32}`.
    InvalidUsername,
    /// Another account already has this username.
    UsernameTaken,
    /// A device certificate does not parse or does not verify against the account key.
    InvalidCertificate,
    /// A signature does not verify.
    InvalidSignature,
    /// No valid bearer token was presented.
    Unauthorized,
    /// A login challenge is unknown, expired or already used.
    ChallengeInvalid,
    /// No account has this username.
    UserNotFound,
    /// No device has this id.
    DeviceNotFound,
    /// A device id is already registered.
    DeviceExists,
    /// No group has this id.
    GroupNotFound,
    /// A group with this id already exists.
    GroupExists,
    /// The authenticated device is not a member of the group.
    NotAMember,
    /// A handshake or application message is for an epoch other than the group's current
    /// one. The client must process what it missed and retry.
    EpochConflict,
    /// An MLS message does not parse, has the wrong wire format, or names another group.
    InvalidMessage,
    /// A message id was reused for different content.
    DuplicateMessageId,
    /// A device-link code is unknown, expired, already used, or was guessed too often.
    LinkInvalid,
    /// A device-link proof does not match the link code.
    LinkProofInvalid,
    /// A device-link session is not ready for this step yet; retry shortly.
    LinkPending,
    /// The key directory has not published this account yet; retry in a few seconds.
    KtPending,
    /// A device of the user has no KeyPackage left.
    NoKeyPackages,
    /// An account or device limit has been reached.
    LimitExceeded,
    /// A recipient's mailbox is full.
    MailboxFull,
    /// Too many requests; retry later.
    RateLimited,
    /// The route does not exist.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The server failed; details are in its log, never in the response.
    Internal,
    /// The request took too long (for example a body sent too slowly).
    Timeout,
    /// The server is shutting down or not ready.
    Unavailable,
}

impl ErrorCode {
    /// The HTTP status code that goes with this error code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest
            | Self::InvalidUsername
            | Self::InvalidCertificate
            | Self::InvalidMessage => 400,
            Self::Unauthorized | Self::ChallengeInvalid | Self::InvalidSignature => 401,
            Self::NotAMember => 403,
            Self::LinkProofInvalid => 401,
            Self::UserNotFound
            | Self::LinkInvalid
            | Self::DeviceNotFound
            | Self::GroupNotFound
            | Self::NotFound
            | Self::NoKeyPackages => 404,
            Self::MethodNotAllowed => 405,
            Self::Timeout => 408,
            Self::UsernameTaken
            | Self::DeviceExists
            | Self::GroupExists
            | Self::EpochConflict
            | Self::LinkPending
            | Self::KtPending
            | Self::DuplicateMessageId => 409,
            Self::PayloadTooLarge => 413,
            Self::LimitExceeded => 422,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::MailboxFull => 507,
            Self::Unavailable => 503,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::InvalidUsername => "invalid_username",
            Self::UsernameTaken => "username_taken",
            Self::InvalidCertificate => "invalid_certificate",
            Self::InvalidSignature => "invalid_signature",
            Self::Unauthorized => "unauthorized",
            Self::ChallengeInvalid => "challenge_invalid",
            Self::UserNotFound => "user_not_found",
            Self::DeviceNotFound => "device_not_found",
            Self::DeviceExists => "device_exists",
            Self::GroupNotFound => "group_not_found",
            Self::GroupExists => "group_exists",
            Self::NotAMember => "not_a_member",
            Self::EpochConflict => "epoch_conflict",
            Self::InvalidMessage => "invalid_message",
            Self::DuplicateMessageId => "duplicate_message_id",
            Self::LinkInvalid => "link_invalid",
            Self::LinkProofInvalid => "link_proof_invalid",
            Self::LinkPending => "link_pending",
            Self::KtPending => "kt_pending",
            Self::NoKeyPackages => "no_key_packages",
            Self::LimitExceeded => "limit_exceeded",
            Self::MailboxFull => "mailbox_full",
            Self::RateLimited => "rate_limited",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal => "internal",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
        }
    }
}

impl ErrorCode {
    /// The code for its wire form ([`ErrorCode::as_str`]); `None` for a code this version
    /// does not know.
    pub fn from_wire(code: &str) -> Option<Self> {
        use serde::de::IntoDeserializer as _;
        let deserializer: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            code.into_deserializer();
        Self::deserialize(deserializer).ok()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// For `epoch_conflict`: the group's current epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_epoch: Option<u64>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                current_epoch: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_matches_as_str() {
        let all = [
            ErrorCode::BadRequest,
            ErrorCode::PayloadTooLarge,
            ErrorCode::InvalidUsername,
            ErrorCode::UsernameTaken,
            ErrorCode::InvalidCertificate,
            ErrorCode::InvalidSignature,
            ErrorCode::Unauthorized,
            ErrorCode::ChallengeInvalid,
            ErrorCode::UserNotFound,
            ErrorCode::DeviceNotFound,
            ErrorCode::DeviceExists,
            ErrorCode::GroupNotFound,
            ErrorCode::GroupExists,
            ErrorCode::NotAMember,
            ErrorCode::EpochConflict,
            ErrorCode::InvalidMessage,
            ErrorCode::DuplicateMessageId,
            ErrorCode::LinkInvalid,
            ErrorCode::LinkProofInvalid,
            ErrorCode::LinkPending,
            ErrorCode::KtPending,
            ErrorCode::NoKeyPackages,
            ErrorCode::LimitExceeded,
            ErrorCode::MailboxFull,
            ErrorCode::RateLimited,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Internal,
            ErrorCode::Timeout,
            ErrorCode::Unavailable,
        ];
        for code in all {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
            assert!((400..600).contains(&code.http_status()));
        }
    }

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::new(ErrorCode::EpochConflict, "stale epoch");
        let value = serde_json::to_value(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"error": {"code": "epoch_conflict", "message": "stale epoch"}})
        );
    }
}
