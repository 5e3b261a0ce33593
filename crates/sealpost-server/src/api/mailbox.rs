//! Mailbox fetch and acknowledgement.

use axum::Json;
use axum::extract::{Query, State};
use sealpost_proto::api::{AckRequest, AckResponse, MailboxQuery, MailboxResponse};
use sealpost_proto::{ErrorCode, limits};

use super::{ApiJson, AppState, AuthDevice};
use crate::error::ApiError;

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
    let removed = state.store.ack(device.device_id, &request.ids).await?;
    Ok(Json(AckResponse { removed }))
}
