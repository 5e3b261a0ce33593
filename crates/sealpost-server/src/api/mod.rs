//! The HTTP and WebSocket API: routing, shared state, extractors.
//!
//! Handlers are thin: they validate input (sizes, formats), call the [`Store`], wake
//! recipients and map errors through [`ApiError`]. Every body is capped by a per-route
//! limit before it is buffered.

mod accounts;
mod devices;
mod groups;
mod keypackages;
mod kt;
mod links;
mod mailbox;
mod ws;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use axum::http::{Request, header};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use sealpost_proto::{ErrorCode, limits};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::clock;
use crate::config::Config;
use crate::error::ApiError;
use crate::notify::Notifier;
use crate::store::{DeviceRecord, Store};

/// State shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// The same store as its concrete type, for closing it at shutdown.
    pub sqlite: Arc<crate::store::sqlite::SqliteStore>,
    pub kt: Arc<crate::kt::KeyTransparency>,
    pub notifier: Notifier,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub rate_limits: Arc<crate::limits::RateLimits>,
    /// True between startup and the beginning of shutdown.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    pub config: Arc<Config>,
    pub shutdown: CancellationToken,
    /// What a malicious server does (tests only).
    #[cfg(feature = "adversarial")]
    pub tamper: Arc<std::sync::Mutex<crate::adversary::Tamper>>,
}

/// JSON body extractor whose rejections are API errors.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// The device that presented a valid bearer token.
pub struct AuthDevice(pub DeviceRecord);

impl FromRequestParts<AppState> for AuthDevice {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing bearer token"))?;
        let hash = Sha256::digest(token.trim().as_bytes());
        let device = state
            .store
            .device_for_token(&hash, clock::now_unix())
            .await?
            .ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthorized, "invalid or expired bearer token")
            })?;
        state.rate_limits.check_account(&device.username)?;
        Ok(Self(device))
    }
}

/// Looks up an account named in a path, validating the name first.
pub(crate) async fn existing_account(
    state: &AppState,
    username: &str,
) -> Result<crate::store::AccountRecord, ApiError> {
    sealpost_proto::names::validate_username(username)
        .map_err(|e| ApiError::new(ErrorCode::InvalidUsername, e.to_string()))?;
    state
        .store
        .account(username)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UserNotFound, "no such user"))
}

/// Builds the API router.
pub fn router(state: AppState) -> Router {
    let small = DefaultBodyLimit::max(limits::SMALL_BODY_MAX_BYTES);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/accounts", post(accounts::register).layer(small))
        .route("/v1/accounts/me", delete(accounts::delete_account))
        .route("/v1/devices/{device_id}", delete(devices::remove))
        .route(
            "/v1/devices/{device_id}/name",
            put(devices::rename).layer(small),
        )
        .route(
            "/v1/devices/{device_id}/keypackages/claim",
            post(devices::claim),
        )
        .route("/v1/links", post(links::create).layer(small))
        .route("/v1/links/{link_id}", get(links::status))
        .route("/v1/links/{link_id}/join", post(links::join).layer(small))
        .route(
            "/v1/links/{link_id}/complete",
            post(links::complete).layer(small),
        )
        .route(
            "/v1/links/{link_id}/result",
            post(links::result).layer(small),
        )
        .route("/v1/auth/challenge", post(accounts::challenge).layer(small))
        .route("/v1/auth/login", post(accounts::login).layer(small))
        .route("/v1/me", get(accounts::whoami))
        .route(
            "/v1/keypackages",
            post(keypackages::upload)
                .layer(DefaultBodyLimit::max(limits::KEY_PACKAGE_BODY_MAX_BYTES))
                .get(keypackages::count),
        )
        .route("/v1/users/{username}", get(accounts::user_devices))
        .route(
            "/v1/users/{username}/keypackages/claim",
            post(keypackages::claim).layer(small),
        )
        .route("/v1/groups", post(groups::create).layer(small))
        .route("/v1/groups/{group_id}", get(groups::state))
        .route(
            "/v1/groups/{group_id}/commits",
            post(groups::commit).layer(DefaultBodyLimit::max(limits::COMMIT_BODY_MAX_BYTES)),
        )
        .route(
            "/v1/groups/{group_id}/proposals",
            post(groups::proposal).layer(small),
        )
        .route(
            "/v1/groups/{group_id}/messages",
            post(groups::message).layer(small),
        )
        .route("/v1/mailbox", get(mailbox::fetch))
        .route("/v1/mailbox/ack", post(mailbox::ack).layer(small))
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/kt/keys", get(kt::keys))
        .route("/v1/kt/root", get(kt::root))
        .route("/v1/kt/roots", get(kt::roots))
        .route("/v1/kt/lookup/{username}", get(kt::lookup))
        .route("/v1/kt/history/{username}", get(kt::history))
        .route("/v1/kt/audit", get(kt::audit))
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.rate_limits.clone(),
            crate::limits::per_address,
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async {
                        ApiError::new(ErrorCode::Timeout, "the request took too long")
                    },
                ))
                .timeout(state.config.limits.request_timeout),
        )
        // Log the route template, never the concrete URI (usernames) or the peer address.
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let route = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map(MatchedPath::as_str)
                    .unwrap_or("unmatched");
                tracing::info_span!("request", method = %request.method(), route)
            }),
        )
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready to serve: the database and key directory are open and shutdown has not begun.
async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !state.ready.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the server is starting or stopping",
        ));
    }
    // The database must answer too.
    state
        .store
        .group("00000000000000000000000000000000")
        .await?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

/// Prometheus metrics (no per-user labels).
async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    if let Ok(depth) = state.store.mailbox_depth().await {
        state.metrics.mailbox_depth.set(depth as i64);
    }
    let stats = state.sqlite.batch_stats();
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    let requests = stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    let counted = state.metrics.write_batches.get();
    state
        .metrics
        .write_batches
        .inc_by(batches.saturating_sub(counted));
    let counted = state.metrics.batched_requests.get();
    state
        .metrics
        .batched_requests
        .inc_by(requests.saturating_sub(counted));
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    ))
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed for this endpoint",
    )
}
