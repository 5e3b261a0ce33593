//! The per-device WebSocket: pushes a `mailbox_ready` event whenever the device has mail.
//!
//! The socket carries no message content; the client fetches and acknowledges over HTTP.
//! On connect the server sends one event so the client drains what arrived while it was
//! away. Inbound frames are capped and ignored, except close.

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use sealpost_proto::api::ServerEvent;
use uuid::Uuid;

use super::{AppState, AuthDevice};
use crate::error::ApiError;
use axum::response::IntoResponse as _;
use sealpost_proto::{ErrorBody, ErrorCode};

/// Inbound WebSocket frames and messages are tiny; the socket is for wake-ups.
const MAX_INBOUND: usize = 4 * 1024;

/// Opens the device's WebSocket of `ServerEvent`s (`{"type":"mailbox_ready"}` on
/// connect and whenever mail arrives).
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "mailbox",
    operation_id = "websocket",
    security(("bearerAuth" = [])),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket."),
        (status = 400, description = "`bad_request`: not a WebSocket upgrade request (headers \
            `Connection: upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and \
            `Sec-WebSocket-Key` are needed).", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many open WebSockets for this account \
            (or requests from this address or account); retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn upgrade(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // axum answers a request that is no WebSocket upgrade in plain text; every error of
    // this API is an error body.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return ApiError::bad_request(rejection.body_text()).into_response(),
    };
    let Some(slot) = state
        .notifier
        .reserve_socket(&device.username, state.config.limits.sockets_per_account)
    else {
        return ApiError::new(
            ErrorCode::RateLimited,
            "too many open connections for this account",
        )
        .into_response();
    };
    ws.max_message_size(MAX_INBOUND)
        .max_frame_size(MAX_INBOUND)
        .on_upgrade(move |socket| async move {
            run(socket, state, device.device_id).await;
            drop(slot);
        })
}

fn event_frame() -> Message {
    let text = serde_json::to_string(&ServerEvent::MailboxReady).unwrap_or_default();
    Message::Text(text.into())
}

async fn run(mut socket: WebSocket, state: AppState, device: Uuid) {
    state.metrics.websockets.inc();
    let mut wakeups = state.notifier.subscribe(device);
    if socket.send(event_frame()).await.is_ok() {
        loop {
            tokio::select! {
                changed = wakeups.changed() => {
                    if changed.is_err() || socket.send(event_frame()).await.is_err() {
                        break;
                    }
                }
                inbound = socket.recv() => match inbound {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                () = state.shutdown.cancelled() => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            }
        }
    }
    drop(wakeups);
    state.notifier.release(device);
    state.metrics.websockets.dec();
}
