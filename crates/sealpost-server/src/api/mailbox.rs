//! Mailbox fetch and acknowledgement.

use axum::Json;
use axum::extract::{Query, State};
use sealpost_proto::api::{AckRequest, AckResponse, MailboxQuery, MailboxResponse};
use sealpost_proto::{ErrorBody, ErrorCode, limits};

use super::{ApiJson, AppState, AuthDevice};
use crate::error::ApiError;

/// The oldest envelopes in the calling device's mailbox.
#[utoipa::path(
    get,
    path = "/v1/mailbox",
    tag = "mailbox",
    operation_id = "fetch_mailbox",
    security(("bearerAuth" = [])),
    params(MailboxQuery),
    responses(
        (status = 200, description = "Envelopes, oldest first.", body = MailboxResponse),
        (status = 400, description = "`bad_request`: `limit` is not a non-negative integer.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
    )
)]
pub async fn fetch(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    query: Result<Query<MailboxQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MailboxResponse>, ApiError> {
    let Query(query) = query?;
    let limit = query
        .limit
        .unwrap_or(limits::MAILBOX_FETCH_MAX)
        .clamp(1, limits::MAILBOX_FETCH_MAX);
    let (mut envelopes, more) = state.store.fetch_mailbox(device.device_id, limit).await?;
    outgoing(&state, device.device_id, &mut envelopes);
    Ok(Json(MailboxResponse { envelopes, more }))
}

/// Every envelope leaving the server passes here, fetched or pushed: it is counted, and a
/// test build's malicious server may tamper with it.
pub(super) fn outgoing(
    state: &AppState,
    #[allow(unused_variables)] device: uuid::Uuid,
    #[allow(unused_variables)] envelopes: &mut [sealpost_proto::api::Envelope],
) {
    #[cfg(feature = "adversarial")]
    if let Ok(tamper) = state.tamper.lock() {
        if tamper.reverse_mailbox_for == Some(device) {
            envelopes.reverse();
        }
        if tamper.corrupt_application_for == Some(device) {
            for envelope in envelopes.iter_mut() {
                if envelope.kind == sealpost_proto::api::EnvelopeKind::Application {
                    crate::adversary::corrupt(&mut envelope.payload.0);
                }
            }
        }
    }
    state.metrics.envelopes_out.inc_by(envelopes.len() as u64);
}

/// Acknowledges (deletes) delivered envelopes of the calling device.
#[utoipa::path(
    post,
    path = "/v1/mailbox/ack",
    tag = "mailbox",
    operation_id = "ack_mailbox",
    security(("bearerAuth" = [])),
    request_body = AckRequest,
    responses(
        (status = 200, description = "How many envelopes were deleted.", body = AckResponse),
        (status = 400, description = "`bad_request`: an id is over 2^63 - 1, or the body is \
            not JSON (or lacks `Content-Type: application/json`) or has wrong, unknown or \
            missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: more than 1,000 ids, or the body is \
            over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn ack(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ApiJson(request): ApiJson<AckRequest>,
) -> Result<Json<AckResponse>, ApiError> {
    if request.ids.len() > limits::ACK_MAX_IDS {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("at most {} ids per acknowledgement", limits::ACK_MAX_IDS),
        ));
    }
    // Envelope ids are SQLite row ids: larger ones cannot exist and are a malformed request.
    if request.ids.iter().any(|&id| i64::try_from(id).is_err()) {
        return Err(ApiError::bad_request("an envelope id is at most 2^63 - 1"));
    }
    let removed = state.store.ack(device.device_id, &request.ids).await?;
    Ok(Json(AckResponse { removed }))
}
