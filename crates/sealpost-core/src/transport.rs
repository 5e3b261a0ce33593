//! The network layer: the `/v1` HTTP API and the per-device WebSocket.
//!
//! This is the only module of the engine that opens sockets. It maps every failure to a
//! [`CoreError`]: a refused request becomes [`CoreError::Server`] with the server's stable
//! error code, a network failure becomes [`CoreError::Unreachable`].

use std::sync::RwLock;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use sealpost_proto::ErrorBody;
use sealpost_proto::api::{
    AckRequest, AckResponse, ChallengeRequest, ChallengeResponse, ClaimKeyPackagesResponse,
    CompleteLinkRequest, CreateGroupRequest, CreateLinkRequest, CreateLinkResponse,
    GroupStateResponse, JoinLinkRequest, KeyPackageCountResponse, LinkResultRequest,
    LinkResultResponse, LinkStatusResponse, LoginRequest, LoginResponse, MailboxResponse,
    PostCommitRequest, PostMessageRequest, PostProposalRequest, RegisterRequest, RegisterResponse,
    RenameDeviceRequest, SequencedResponse, UploadKeyPackagesRequest, UserDevicesResponse,
    WhoAmIResponse,
};
use sealpost_proto::kt::{
    AuditResponse, HistoryResponse, KtKeysResponse, LookupEnvelope, RootsResponse, SignedRoot,
};
use sealpost_proto::ws::{ClientFrame, ServerFrame};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::error::CoreError;

/// How often a rate-limited request is retried before the error is returned.
const RATE_LIMIT_RETRIES: u32 = 3;

/// Bytes a device WebSocket reads from the kernel at once (see `open_socket`).
const SOCKET_READ_BUFFER: usize = 16 * 1024;

/// A connected device WebSocket.
pub type DeviceSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// HTTP client for one server, holding the device's bearer token.
pub struct Transport {
    http: reqwest::Client,
    base: String,
    token: RwLock<Option<String>>,
}

impl Transport {
    pub fn new(base_url: &str) -> Result<Self, CoreError> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(CoreError::InvalidInput(format!(
                "the server URL must start with http:// or https:// (got {base_url:?})"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            // The server closes a keep-alive connection that sends no request for 10 s
            // (its slow-header timeout). Dropping ours sooner avoids sending a request on
            // a connection the server is closing, which fails without a retry.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CoreError::Unreachable {
                url: base.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            http,
            base,
            token: RwLock::new(None),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<String> {
        self.token.read().map(|t| t.clone()).unwrap_or_default()
    }

    pub fn set_token(&self, token: Option<String>) {
        if let Ok(mut slot) = self.token.write() {
            *slot = token;
        }
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        auth: bool,
    ) -> Result<T, CoreError> {
        let url = format!("{}{}", self.base, path);
        let mut attempt = 0;
        let response = loop {
            let mut request = self.http.request(method.clone(), &url);
            if auth {
                let token = self.token().ok_or_else(|| CoreError::Server {
                    code: sealpost_proto::ErrorCode::Unauthorized,
                    message: "not logged in".into(),
                    current_epoch: None,
                })?;
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| CoreError::Unreachable {
                url: self.base.clone(),
                reason: describe(&e),
            })?;
            // Rate limited: wait as the server asks (at most a few times), then go on.
            if response.status() == StatusCode::TOO_MANY_REQUESTS && attempt < RATE_LIMIT_RETRIES {
                attempt += 1;
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(30);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            break response;
        };
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| CoreError::Unreachable {
            url: self.base.clone(),
            reason: describe(&e),
        })?;
        if status.is_success() {
            let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(bytes)
                .map_err(|e| CoreError::BadResponse(format!("{path}: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(CoreError::Server {
                code: body.error.code,
                message: body.error.message,
                current_epoch: body.error.current_epoch,
            }),
            Err(_) => Err(CoreError::BadResponse(format!(
                "{path}: HTTP {status} without an error body"
            ))),
        }
    }

    pub async fn register(&self, request: &RegisterRequest) -> Result<RegisterResponse, CoreError> {
        self.call(Method::POST, "/v1/accounts", Some(request), false)
            .await
    }

    pub async fn challenge(&self, device_id: Uuid) -> Result<ChallengeResponse, CoreError> {
        self.call(
            Method::POST,
            "/v1/auth/challenge",
            Some(&ChallengeRequest { device_id }),
            false,
        )
        .await
    }

    pub async fn login(&self, request: &LoginRequest) -> Result<LoginResponse, CoreError> {
        self.call(Method::POST, "/v1/auth/login", Some(request), false)
            .await
    }

    pub async fn whoami(&self) -> Result<WhoAmIResponse, CoreError> {
        self.call::<(), _>(Method::GET, "/v1/me", None, true).await
    }

    pub async fn upload_key_packages(
        &self,
        request: &UploadKeyPackagesRequest,
    ) -> Result<KeyPackageCountResponse, CoreError> {
        self.call(Method::POST, "/v1/keypackages", Some(request), true)
            .await
    }

    pub async fn key_package_count(&self) -> Result<KeyPackageCountResponse, CoreError> {
        self.call::<(), _>(Method::GET, "/v1/keypackages", None, true)
            .await
    }

    pub async fn user_devices(&self, username: &str) -> Result<UserDevicesResponse, CoreError> {
        self.call::<(), _>(Method::GET, &format!("/v1/users/{username}"), None, true)
            .await
    }

    pub async fn claim_key_packages(
        &self,
        username: &str,
    ) -> Result<ClaimKeyPackagesResponse, CoreError> {
        self.call::<(), _>(
            Method::POST,
            &format!("/v1/users/{username}/keypackages/claim"),
            None,
            true,
        )
        .await
    }

    pub async fn create_group(&self, group_id: &str) -> Result<GroupStateResponse, CoreError> {
        let request = CreateGroupRequest {
            group_id: group_id.to_owned(),
        };
        self.call(Method::POST, "/v1/groups", Some(&request), true)
            .await
    }

    pub async fn group_state(&self, group_id: &str) -> Result<GroupStateResponse, CoreError> {
        self.call::<(), _>(Method::GET, &format!("/v1/groups/{group_id}"), None, true)
            .await
    }

    pub async fn post_commit(
        &self,
        group_id: &str,
        request: &PostCommitRequest,
    ) -> Result<SequencedResponse, CoreError> {
        self.call(
            Method::POST,
            &format!("/v1/groups/{group_id}/commits"),
            Some(request),
            true,
        )
        .await
    }

    pub async fn post_proposal(
        &self,
        group_id: &str,
        request: &PostProposalRequest,
    ) -> Result<SequencedResponse, CoreError> {
        self.call(
            Method::POST,
            &format!("/v1/groups/{group_id}/proposals"),
            Some(request),
            true,
        )
        .await
    }

    pub async fn post_message(
        &self,
        group_id: &str,
        request: &PostMessageRequest,
    ) -> Result<SequencedResponse, CoreError> {
        self.call(
            Method::POST,
            &format!("/v1/groups/{group_id}/messages"),
            Some(request),
            true,
        )
        .await
    }

    pub async fn fetch_mailbox(&self, limit: usize) -> Result<MailboxResponse, CoreError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/mailbox?limit={limit}"),
            None,
            true,
        )
        .await
    }

    pub async fn ack(&self, ids: Vec<u64>) -> Result<AckResponse, CoreError> {
        self.call(
            Method::POST,
            "/v1/mailbox/ack",
            Some(&AckRequest { ids }),
            true,
        )
        .await
    }

    /// Sends a request whose success answer has no body (204).
    async fn call_empty<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        auth: bool,
    ) -> Result<(), CoreError> {
        self.call::<B, serde::de::IgnoredAny>(method, path, body, auth)
            .await
            .map(|_| ())
    }

    pub async fn delete_account(&self) -> Result<(), CoreError> {
        self.call_empty::<()>(Method::DELETE, "/v1/accounts/me", None, true)
            .await
    }

    pub async fn rename_device(
        &self,
        device_id: Uuid,
        request: &RenameDeviceRequest,
    ) -> Result<(), CoreError> {
        self.call_empty(
            Method::PUT,
            &format!("/v1/devices/{device_id}/name"),
            Some(request),
            true,
        )
        .await
    }

    pub async fn remove_device(&self, device_id: Uuid) -> Result<(), CoreError> {
        self.call_empty::<()>(
            Method::DELETE,
            &format!("/v1/devices/{device_id}"),
            None,
            true,
        )
        .await
    }

    pub async fn claim_device_key_package(
        &self,
        device_id: Uuid,
    ) -> Result<ClaimKeyPackagesResponse, CoreError> {
        self.call::<(), _>(
            Method::POST,
            &format!("/v1/devices/{device_id}/keypackages/claim"),
            None,
            true,
        )
        .await
    }

    pub async fn create_link(
        &self,
        request: &CreateLinkRequest,
    ) -> Result<CreateLinkResponse, CoreError> {
        self.call(Method::POST, "/v1/links", Some(request), true)
            .await
    }

    pub async fn link_status(&self, link_id: &str) -> Result<LinkStatusResponse, CoreError> {
        self.call::<(), _>(Method::GET, &format!("/v1/links/{link_id}"), None, true)
            .await
    }

    pub async fn join_link(
        &self,
        link_id: &str,
        request: &JoinLinkRequest,
    ) -> Result<(), CoreError> {
        self.call_empty(
            Method::POST,
            &format!("/v1/links/{link_id}/join"),
            Some(request),
            false,
        )
        .await
    }

    pub async fn complete_link(
        &self,
        link_id: &str,
        request: &CompleteLinkRequest,
    ) -> Result<(), CoreError> {
        self.call_empty(
            Method::POST,
            &format!("/v1/links/{link_id}/complete"),
            Some(request),
            true,
        )
        .await
    }

    pub async fn link_result(
        &self,
        link_id: &str,
        request: &LinkResultRequest,
    ) -> Result<LinkResultResponse, CoreError> {
        self.call(
            Method::POST,
            &format!("/v1/links/{link_id}/result"),
            Some(request),
            false,
        )
        .await
    }

    pub async fn kt_keys(&self) -> Result<KtKeysResponse, CoreError> {
        self.call::<(), _>(Method::GET, "/v1/kt/keys", None, false)
            .await
    }

    pub async fn kt_root(&self) -> Result<SignedRoot, CoreError> {
        self.call::<(), _>(Method::GET, "/v1/kt/root", None, false)
            .await
    }

    pub async fn kt_roots(&self, from: u64, to: u64) -> Result<RootsResponse, CoreError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/kt/roots?from={from}&to={to}"),
            None,
            false,
        )
        .await
    }

    pub async fn kt_lookup(&self, username: &str) -> Result<LookupEnvelope, CoreError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/kt/lookup/{username}"),
            None,
            false,
        )
        .await
    }

    pub async fn kt_history(&self, username: &str) -> Result<HistoryResponse, CoreError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/kt/history/{username}"),
            None,
            false,
        )
        .await
    }

    pub async fn kt_audit(&self, from: u64, to: u64) -> Result<AuditResponse, CoreError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/kt/audit?from={from}&to={to}"),
            None,
            false,
        )
        .await
    }

    /// Opens the device WebSocket in wake mode (events only; mail is fetched over HTTP).
    pub async fn connect_socket(&self) -> Result<DeviceSocket, CoreError> {
        self.open_socket("").await
    }

    /// Opens the device WebSocket in push mode: envelopes, acknowledgements and sends all
    /// travel on it (see `sealpost_proto::ws`).
    pub async fn connect_push(&self) -> Result<PushConnection, CoreError> {
        Ok(PushConnection {
            socket: self.open_socket("?mode=push").await?,
        })
    }

    async fn open_socket(&self, query: &str) -> Result<DeviceSocket, CoreError> {
        let url = format!(
            "{}/v1/ws{query}",
            self.base
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1)
        );
        let mut request = url
            .into_client_request()
            .map_err(|e| CoreError::InvalidInput(e.to_string()))?;
        let token = self.token().unwrap_or_default();
        let header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| CoreError::InvalidInput(e.to_string()))?;
        request.headers_mut().insert("authorization", header);
        // tungstenite zero-fills its whole read buffer before every read (128 KiB by
        // default): with small frames that memset was most of a receiving client's CPU.
        // 16 KiB still takes a full frame of envelopes in a few reads.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(SOCKET_READ_BUFFER);
        // TCP_NODELAY: an acknowledgement or a send is one small frame that must leave now.
        match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response))
                if response.status() == StatusCode::UNAUTHORIZED =>
            {
                Err(CoreError::Server {
                    code: sealpost_proto::ErrorCode::Unauthorized,
                    message: "the WebSocket login was refused".into(),
                    current_epoch: None,
                })
            }
            Err(e) => Err(CoreError::Unreachable {
                url: self.base.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

/// A push-mode device WebSocket (see `sealpost_proto::ws`). [`PushConnection::split`]
/// gives halves that a sender and a receiver task can use at once.
pub struct PushConnection {
    socket: DeviceSocket,
}

/// The sending half of a [`PushConnection`].
pub struct PushSender {
    sink: futures_util::stream::SplitSink<DeviceSocket, WsMessage>,
}

/// The receiving half of a [`PushConnection`].
pub struct PushReceiver {
    stream: futures_util::stream::SplitStream<DeviceSocket>,
}

fn socket_lost(err: impl std::fmt::Display) -> CoreError {
    CoreError::Unreachable {
        url: "the device WebSocket".into(),
        reason: err.to_string(),
    }
}

impl PushConnection {
    /// Splits the connection into a sending and a receiving half.
    pub fn split(self) -> (PushSender, PushReceiver) {
        use futures_util::StreamExt as _;
        let (sink, stream) = self.socket.split();
        (PushSender { sink }, PushReceiver { stream })
    }
}

impl PushSender {
    /// Queues a frame without flushing; call [`PushSender::flush`] after a burst.
    pub async fn feed(&mut self, frame: &ClientFrame) -> Result<(), CoreError> {
        use futures_util::SinkExt as _;
        let bytes = frame
            .encode()
            .map_err(|e| CoreError::Codec(e.to_string()))?;
        self.sink
            .feed(WsMessage::Binary(bytes.into()))
            .await
            .map_err(socket_lost)
    }

    /// Sends a frame now.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), CoreError> {
        self.feed(frame).await?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<(), CoreError> {
        use futures_util::SinkExt as _;
        self.sink.flush().await.map_err(socket_lost)
    }

    /// Closes the socket politely.
    pub async fn close(&mut self) -> Result<(), CoreError> {
        use futures_util::SinkExt as _;
        self.sink.close().await.map_err(socket_lost)
    }
}

impl PushReceiver {
    /// The next server frame; `None` once the server closed the socket.
    pub async fn next(&mut self) -> Result<Option<ServerFrame>, CoreError> {
        use futures_util::StreamExt as _;
        loop {
            match self.stream.next().await {
                None | Some(Ok(WsMessage::Close(_))) => return Ok(None),
                Some(Ok(WsMessage::Binary(bytes))) => {
                    return ServerFrame::decode(&bytes)
                        .map(Some)
                        .map_err(|e| CoreError::Codec(format!("bad server frame: {e}")));
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(socket_lost(err)),
            }
        }
    }
}

fn describe(err: &reqwest::Error) -> String {
    if err.is_connect() {
        "connection refused or host unreachable".to_owned()
    } else if err.is_timeout() {
        "timed out".to_owned()
    } else {
        err.to_string()
    }
}
