//! The per-device WebSocket, in one of two modes (see `sealpost_proto::ws`).
//!
//! - *wake* (default, `GET /v1/ws`): the server sends a `mailbox_ready` event whenever the
//!   device has mail, and once on connect; the client fetches and acknowledges over HTTP.
//!   Inbound frames are ignored, except close.
//! - *push* (`GET /v1/ws?mode=push`): the socket is the delivery path. The server sends
//!   what is waiting, then every new envelope as soon as it is durable; the client
//!   acknowledges and may send application messages on the same socket.
//!
//! One task serves one socket, whatever its mode, so an idle connection costs one task and
//! its buffers. Inbound frames are capped, sends are rate-limited per account like HTTP
//! requests, and at most `WS_SENDS_IN_FLIGHT` sends wait for the disk at once: beyond that
//! the server stops reading the socket until answers are out.

use std::future::Future;
use std::pin::Pin;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::IntoResponse as _;
use axum::response::Response;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use sealpost_proto::api::ServerEvent;
use sealpost_proto::ws::{ClientFrame, ServerFrame};
use sealpost_proto::{ErrorCode, limits};
use serde::Deserialize;
use uuid::Uuid;

use super::{AppState, AuthDevice, groups};
use crate::error::ApiError;
use crate::notify::PushSubscription;
use crate::store::DeviceRecord;
use sealpost_proto::ErrorBody;

/// Inbound frames on a wake-mode socket are tiny.
const WAKE_INBOUND_MAX: usize = 4 * 1024;
/// Read buffer: small, because most sockets are idle (memory per connection).
const READ_BUFFER: usize = 1024;
/// Frames are written when the session flushes (once per turn, see `PushSession::serve`)
/// or when this much is buffered. The buffer is allocated on first use, so an idle socket
/// that never sent anything holds none of it.
const WRITE_BUFFER: usize = 16 * 1024;

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Wake,
    Push,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsQuery {
    #[serde(default)]
    mode: Mode,
}

/// Opens the device's WebSocket: in wake mode (default) a socket of `ServerEvent`s
/// (`{"type":"mailbox_ready"}` on connect and whenever mail arrives); with `mode=push` the
/// delivery protocol of `sealpost_proto::ws` (envelopes, acknowledgements and sends).
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "mailbox",
    operation_id = "websocket",
    security(("bearerAuth" = [])),
    params(("mode" = Option<String>, Query, description = "`wake` (default) or `push`.")),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket."),
        (status = 400, description = "`bad_request`: an unknown `mode`, or not a WebSocket upgrade request (headers \
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
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // axum answers a request that is no WebSocket upgrade in plain text; every error of
    // this API is an error body.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return ApiError::bad_request(rejection.body_text()).into_response(),
    };
    let mode = match query {
        Ok(Query(query)) => query.mode,
        Err(rejection) => return ApiError::from(rejection).into_response(),
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
    let inbound_max = match mode {
        Mode::Wake => WAKE_INBOUND_MAX,
        Mode::Push => limits::WS_INBOUND_FRAME_MAX_BYTES,
    };
    ws.max_message_size(inbound_max)
        .max_frame_size(inbound_max)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            state.metrics.websockets.inc();
            match mode {
                Mode::Wake => run_wake(socket, &state, device.device_id).await,
                Mode::Push => run_push(socket, &state, device).await,
            }
            state.metrics.websockets.dec();
            drop(slot);
        })
}

fn json_frame<T: serde::Serialize>(value: &T) -> Message {
    Message::Text(serde_json::to_string(value).unwrap_or_default().into())
}

/// A push-mode frame as a binary WebSocket message.
fn push_frame(frame: &ServerFrame) -> Message {
    match frame.encode() {
        Ok(bytes) => Message::Binary(bytes.into()),
        // Only a field over its length prefix fails, and the server makes none (group ids
        // are 32 characters, payloads are capped far below 4 GiB).
        Err(err) => {
            let error = ApiError::internal(&format_args!("cannot encode a frame: {err}")).detail();
            Message::Binary(
                ServerFrame::Error { error }
                    .encode()
                    .unwrap_or_default()
                    .into(),
            )
        }
    }
}

async fn run_wake(mut socket: WebSocket, state: &AppState, device: Uuid) {
    let mut wakeups = state.notifier.subscribe(device);
    let event = || json_frame(&ServerEvent::MailboxReady);
    if socket.send(event()).await.is_ok() {
        loop {
            tokio::select! {
                changed = wakeups.changed() => {
                    if changed.is_err() || socket.send(event()).await.is_err() {
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
}

/// The answer to a client frame, computed off the socket task's hands; `None` when the
/// frame wants none (an acknowledgement without `confirm` that succeeded).
type Pending = Pin<Box<dyn Future<Output = Option<ServerFrame>> + Send>>;

/// The state of one push-mode socket.
struct PushSession<'a> {
    socket: WebSocket,
    state: &'a AppState,
    device: DeviceRecord,
    /// The highest mailbox position sent on this socket.
    cursor: u64,
}

/// Why a push session ends.
enum End {
    /// The peer went away or the socket failed.
    Closed,
}

async fn run_push(socket: WebSocket, state: &AppState, device: DeviceRecord) {
    // Subscribe before the first read of the mailbox: an entry committed in between is
    // then either in that read or in the queue (or both; positions already sent are
    // skipped).
    let mut subscription = state.notifier.subscribe_push(device.device_id);
    let mut session = PushSession {
        socket,
        state,
        device,
        cursor: 0,
    };
    let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
    if session.drain_mailbox().await.is_ok() {
        let _ = session.serve(&mut subscription, &mut in_flight).await;
    }
    drop(subscription);
}

impl PushSession<'_> {
    /// Serves the socket until it closes. Each turn waits for one thing to do (an answer
    /// ready, an envelope pushed, a frame from the client), then also does everything
    /// else that is ready at once, and flushes once: frames produced together leave in one
    /// write, which on a busy socket is most of what the kernel charges per message.
    async fn serve(
        &mut self,
        subscription: &mut PushSubscription,
        in_flight: &mut FuturesOrdered<Pending>,
    ) -> Result<(), End> {
        // Made once: a new one per turn registered and dropped a waiter on the token in
        // every turn, about 0.7% of the server's CPU at 20,000 msg/s, where a turn carries
        // one frame (docs/BENCHMARKS-LOG.md).
        let state = self.state;
        let shutdown = state.shutdown.cancelled();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    let _ = self.socket.send(Message::Close(None)).await;
                    return Ok(());
                }
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(answer) = answer {
                        self.feed(push_frame(&answer)).await?;
                    }
                }
                push = subscription.queue.recv() => {
                    let Some(first) = push else { return Ok(()) };
                    self.forward(first, subscription).await?;
                }
                inbound = self.socket.recv(), if in_flight.len() < limits::WS_SENDS_IN_FLIGHT => {
                    if !self.inbound(inbound, in_flight).await? {
                        return Ok(());
                    }
                }
            }
            // Whatever else is ready now goes into the same write.
            loop {
                let mut busy = false;
                while let Some(Some(answer)) = in_flight.next().now_or_never() {
                    if let Some(answer) = answer {
                        self.feed(push_frame(&answer)).await?;
                    }
                    busy = true;
                }
                if let Ok(push) = subscription.queue.try_recv() {
                    self.forward(push, subscription).await?;
                    busy = true;
                }
                if in_flight.len() < limits::WS_SENDS_IN_FLIGHT
                    && let Some(inbound) = self.socket.recv().now_or_never()
                {
                    if !self.inbound(inbound, in_flight).await? {
                        return Ok(());
                    }
                    busy = true;
                }
                if !busy {
                    break;
                }
            }
            self.flush().await?;
        }
    }

    /// Takes one inbound message; `false` when the peer closed the socket.
    async fn inbound(
        &mut self,
        inbound: Option<Result<Message, axum::Error>>,
        in_flight: &mut FuturesOrdered<Pending>,
    ) -> Result<bool, End> {
        match inbound {
            Some(Ok(Message::Binary(bytes))) => {
                if let Some(answer) = handle(self.state, &self.device, &bytes).await {
                    in_flight.push_back(answer);
                }
            }
            Some(Ok(Message::Text(_))) => {
                let error =
                    ApiError::bad_request("push-mode frames are binary (see sealpost_proto::ws)")
                        .detail();
                self.feed(push_frame(&ServerFrame::Error { error })).await?;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(false),
            Some(Ok(_)) => {}
        }
        Ok(true)
    }

    /// Sends a pushed entry and every other one already queued, in frames of
    /// `WS_ENVELOPES_PER_FRAME`, falling back to the mailbox when entries were dropped.
    ///
    /// The lag flag is checked before each entry is taken: an entry is dropped only when
    /// the queue is full, so every entry taken before the check is older than the dropped
    /// one and the cursor has not passed it; the mailbox read then starts early enough.
    async fn forward(
        &mut self,
        first: crate::notify::Push,
        subscription: &mut PushSubscription,
    ) -> Result<(), End> {
        let mut envelopes = Vec::new();
        let mut next = Some(first);
        loop {
            if subscription.take_lagged() {
                self.state.metrics.push_overflows.inc();
                self.send_envelopes(std::mem::take(&mut envelopes), false)
                    .await?;
                self.drain_mailbox().await?;
            }
            let Some(push) = next else { break };
            if push.mailbox_id > self.cursor {
                self.cursor = push.mailbox_id;
                envelopes.push(push.message.envelope(push.mailbox_id));
            }
            if envelopes.len() >= limits::WS_ENVELOPES_PER_FRAME {
                self.send_envelopes(std::mem::take(&mut envelopes), false)
                    .await?;
            }
            next = subscription.queue.try_recv().ok();
        }
        self.send_envelopes(envelopes, false).await
    }

    async fn feed(&mut self, message: Message) -> Result<(), End> {
        self.socket.feed(message).await.map_err(|_| End::Closed)
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.socket.flush().await.map_err(|_| End::Closed)
    }

    /// Sends envelopes (after the malicious-server hook of test builds) in one frame.
    async fn send_envelopes(
        &mut self,
        mut envelopes: Vec<sealpost_proto::api::Envelope>,
        flush: bool,
    ) -> Result<(), End> {
        if !envelopes.is_empty() {
            super::mailbox::outgoing(self.state, self.device.device_id, &mut envelopes);
            self.feed(push_frame(&ServerFrame::Envelopes { envelopes }))
                .await?;
        }
        if flush { self.flush().await } else { Ok(()) }
    }

    /// Sends every mailbox entry after the cursor, from the database.
    async fn drain_mailbox(&mut self) -> Result<(), End> {
        loop {
            let page = self
                .state
                .store
                .fetch_mailbox_after(
                    self.device.device_id,
                    self.cursor,
                    limits::WS_ENVELOPES_PER_FRAME,
                )
                .await;
            let (envelopes, more) = match page {
                Ok(page) => page,
                Err(err) => {
                    let error = ApiError::from(err).detail();
                    let _ = self
                        .socket
                        .send(push_frame(&ServerFrame::Error { error }))
                        .await;
                    return Err(End::Closed);
                }
            };
            if let Some(last) = envelopes.last() {
                self.cursor = self.cursor.max(last.id);
            }
            self.send_envelopes(envelopes, !more).await?;
            if !more {
                return Ok(());
            }
        }
    }
}

/// An answer that is ready now, in its place among the socket's answers.
fn ready(frame: ServerFrame) -> Option<Pending> {
    Some(Box::pin(std::future::ready(Some(frame))))
}

/// Turns one client frame into the future of its answer; `None` when nothing will be
/// answered (a quiet acknowledgement the store queued). A send or an acknowledgement is
/// queued before this returns, so a socket's frames keep their order.
async fn handle(state: &AppState, device: &DeviceRecord, bytes: &[u8]) -> Option<Pending> {
    let state = state.clone();
    let frame = match ClientFrame::decode(bytes) {
        Ok(frame) => frame,
        Err(err) => {
            let error = ApiError::bad_request(format!("invalid frame: {err}")).detail();
            return ready(ServerFrame::Error { error });
        }
    };
    match frame {
        ClientFrame::Send {
            reference,
            group_id,
            message_id,
            message,
        } => {
            let request = state
                .rate_limits
                .check_account(&device.username)
                .and_then(|()| {
                    groups::application_request(
                        &state,
                        device.device_id,
                        group_id,
                        message_id,
                        message.into_inner(),
                    )
                });
            let queued = match request {
                Ok(request) => groups::queue(&state, request).await,
                Err(err) => Err(err),
            };
            Some(Box::pin(async move {
                let result = match queued {
                    Ok(answer) => answer.await,
                    Err(err) => Err(err),
                };
                Some(match result {
                    Ok(result) => ServerFrame::Sent { reference, result },
                    Err(err) => ServerFrame::SendFailed {
                        reference,
                        error: err.detail(),
                    },
                })
            }))
        }
        ClientFrame::Ack { ids, confirm } => {
            if let Err(err) = state.rate_limits.check_account(&device.username) {
                return ready(ServerFrame::Error {
                    error: err.detail(),
                });
            }
            if ids.len() > limits::ACK_MAX_IDS {
                let error = ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("at most {} ids per acknowledgement", limits::ACK_MAX_IDS),
                )
                .detail();
                return ready(ServerFrame::Error { error });
            }
            let device = device.device_id;
            if !confirm {
                match state.store.queue_quiet_ack(device, &ids).await {
                    Ok(true) => return None,
                    Ok(false) => {}
                    Err(err) => {
                        return ready(ServerFrame::Error {
                            error: ApiError::from(err).detail(),
                        });
                    }
                }
            }
            Some(Box::pin(async move {
                match state.store.ack(device, &ids).await {
                    Ok(removed) => confirm.then_some(ServerFrame::Acked { removed }),
                    Err(err) => Some(ServerFrame::Error {
                        error: ApiError::from(err).detail(),
                    }),
                }
            }))
        }
    }
}
