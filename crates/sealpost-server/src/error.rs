//! The one place where server errors become HTTP responses.
//!
//! Handlers return [`ApiError`]. A client-caused error carries its stable
//! [`ErrorCode`] and a message meant for people; a server fault becomes `internal` with a
//! generic message, while the real cause is logged (never sent to the client).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sealpost_proto::{ErrorBody, ErrorCode};

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    current_epoch: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            current_epoch: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The error as carried in a body or a WebSocket frame.
    pub fn detail(self) -> sealpost_proto::ErrorDetail {
        let mut body = ErrorBody::new(self.code, self.message);
        body.error.current_epoch = self.current_epoch;
        body.error
    }

    /// A server fault: logged with its cause, answered with a generic message.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::Internal, "internal server error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = self.code;
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.detail(),
            }),
        )
            .into_response();
        // Every rate limit (address, account, claims, sockets) tells the client when to
        // retry, as the API promises.
        if code == ErrorCode::RateLimited {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::UsernameTaken => {
                Self::new(ErrorCode::UsernameTaken, "that username is already taken")
            }
            StoreError::DeviceExists => Self::new(
                ErrorCode::DeviceExists,
                "that device id is already registered",
            ),
            StoreError::GroupExists => Self::new(
                ErrorCode::GroupExists,
                "a group with that id already exists",
            ),
            StoreError::GroupNotFound => Self::new(ErrorCode::GroupNotFound, "no such group"),
            StoreError::NotAMember => Self::new(
                ErrorCode::NotAMember,
                "this device is not a member of the group",
            ),
            StoreError::EpochConflict { current } => Self {
                code: ErrorCode::EpochConflict,
                message: format!(
                    "the group has moved on to epoch {current}; process new messages and retry"
                ),
                current_epoch: Some(current),
            },
            StoreError::DuplicateMessageId => Self::new(
                ErrorCode::DuplicateMessageId,
                "this message id was already used for different content",
            ),
            StoreError::UnknownDevice(device) => Self::new(
                ErrorCode::DeviceNotFound,
                format!("unknown device {device}"),
            ),
            StoreError::MailboxFull => Self::new(
                ErrorCode::MailboxFull,
                "a recipient's mailbox is full; they must come online first",
            ),
            StoreError::LinkInvalid => Self::new(
                ErrorCode::LinkInvalid,
                "the link code is unknown, expired or already used",
            ),
            StoreError::NoKeyPackages(device) => Self::new(
                ErrorCode::NoKeyPackages,
                format!("device {device} has no KeyPackage left"),
            ),
            StoreError::LimitExceeded(what) => Self::new(ErrorCode::LimitExceeded, what),
            StoreError::Invalid(what) => Self::bad_request(what),
            err @ (StoreError::Backend(_)
            | StoreError::Sqlite(_)
            | StoreError::Migration(_)
            | StoreError::CommitFailed(_)) => Self::internal(&err),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(ErrorCode::PayloadTooLarge, "request body is too large");
        }
        // The rejection text names the offending field or syntax error; it holds no secrets.
        Self::bad_request(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}
