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
pub mod openapi;
mod ws;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::header;
use axum::http::request::Parts;
use axum::{Json, Router};
use sealpost_proto::{ErrorBody, ErrorCode, limits};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt as _};
use utoipa_axum::routes;

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

/// JSON body extractor whose rejections are API errors: `400 bad_request` for a body that
/// is not a JSON object, lacks `Content-Type: application/json` or does not match the
/// type, and `413 payload_too_large` for a body over the route's limit.
///
/// Unlike `axum::Json` it accepts only an object at the top level: serde would also read a
/// struct from a JSON array of its fields (`[]` for a struct whose fields all have
/// defaults), which is not the documented wire format.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json_content_type(request.headers()) {
            return Err(ApiError::bad_request(
                "expected a request with `Content-Type: application/json`",
            ));
        }
        let body = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
                } else {
                    ApiError::bad_request(rejection.body_text())
                }
            })?;
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let Json(value) = Json::<T>::from_bytes(&body)?;
        Ok(Self(value))
    }
}

/// `application/json`, or `application/*+json`, with any parameters.
fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence
        .strip_prefix("application/")
        .is_some_and(|subtype| subtype == "json" || subtype.ends_with("+json"))
}

/// Path parameter extractor whose rejections are API errors (`400 bad_request`, for
/// example a segment that percent-decodes to invalid UTF-8).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

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

/// Every route of the API, each registered from its handler's `#[utoipa::path]`
/// annotation so that the router and the OpenAPI document ([`openapi::document`]) cannot
/// disagree. Register routes only here and only with `routes!`: a test fails on any other
/// way of adding one.
pub(crate) fn documented_routes() -> OpenApiRouter<AppState> {
    let small = || DefaultBodyLimit::max(limits::SMALL_BODY_MAX_BYTES);
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(accounts::register).layer(small()))
        .routes(routes!(accounts::delete_account))
        .routes(routes!(devices::remove))
        .routes(routes!(devices::rename).layer(small()))
        .routes(routes!(devices::claim))
        .routes(routes!(links::create).layer(small()))
        .routes(routes!(links::status))
        .routes(routes!(links::join).layer(small()))
        .routes(routes!(links::complete).layer(small()))
        .routes(routes!(links::result).layer(small()))
        .routes(routes!(accounts::challenge).layer(small()))
        .routes(routes!(accounts::login).layer(small()))
        .routes(routes!(accounts::whoami))
        .routes(
            routes!(keypackages::upload)
                .layer(DefaultBodyLimit::max(limits::KEY_PACKAGE_BODY_MAX_BYTES)),
        )
        .routes(routes!(keypackages::count))
        .routes(routes!(accounts::user_devices))
        .routes(routes!(keypackages::claim).layer(small()))
        .routes(routes!(groups::create).layer(small()))
        .routes(routes!(groups::state))
        .routes(routes!(groups::commit).layer(DefaultBodyLimit::max(limits::COMMIT_BODY_MAX_BYTES)))
        .routes(routes!(groups::proposal).layer(small()))
        .routes(routes!(groups::message).layer(small()))
        .routes(routes!(mailbox::fetch))
        .routes(routes!(mailbox::ack).layer(small()))
        .routes(routes!(ws::upgrade))
        .routes(routes!(kt::keys))
        .routes(routes!(kt::root))
        .routes(routes!(kt::roots))
        .routes(routes!(kt::lookup))
        .routes(routes!(kt::history))
        .routes(routes!(kt::audit))
}

/// Builds the API router.
pub fn router(state: AppState) -> Router {
    let (routes, _) = documented_routes().split_for_parts();
    routes
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

/// The answer of `/healthz` and `/readyz`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StatusResponse {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(pattern = "^(ok|ready)$")]
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is up.", body = StatusResponse))
)]
async fn healthz() -> Json<StatusResponse> {
    Json(StatusResponse { status: "ok" })
}

/// Ready to serve: the database and key directory are open and shutdown has not begun.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready.", body = StatusResponse),
        (status = 503, description = "`unavailable`: starting or shutting down.", body = ErrorBody),
    )
)]
async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<Json<StatusResponse>, ApiError> {
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
    Ok(Json(StatusResponse { status: "ready" }))
}

/// Prometheus metrics (no per-user labels).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((
        status = 200,
        description = "Prometheus text exposition format 0.0.4.",
        body = String,
        content_type = "text/plain"
    ))
)]
async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    if let Ok(depth) = state.store.mailbox_depth().await {
        state.metrics.mailbox_depth.set(depth as i64);
    }
    let stats = state.sqlite.batch_stats();
    for (counter, total) in [
        (&state.metrics.write_batches, &stats.batches),
        (&state.metrics.batched_requests, &stats.requests),
        (&state.metrics.wal_flushes, &stats.flushes),
        (&state.metrics.writer_turn_waits, &stats.turn_waits),
    ] {
        let total = total.load(std::sync::atomic::Ordering::Relaxed);
        counter.inc_by(total.saturating_sub(counter.get()));
    }
    let waited = stats
        .turn_wait_micros
        .load(std::sync::atomic::Ordering::Relaxed) as f64
        / 1e6;
    let counted = state.metrics.writer_turn_wait_seconds.get();
    if waited > counted {
        state
            .metrics
            .writer_turn_wait_seconds
            .inc_by(waited - counted);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    ))
}

/// The message of the `404 not_found` answer for a path that is no route.
pub(crate) const NO_SUCH_ENDPOINT: &str = "no such endpoint";

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, NO_SUCH_ENDPOINT)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed for this endpoint",
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::*;
    use crate::testing::{TestServer, put_account};

    /// A device with a bearer token, put straight into the store.
    async fn token(server: &TestServer) -> String {
        let store = &server.state().store;
        let device_id = put_account(store.as_ref(), "tester", [1; 32]).await;
        let token = "test-token";
        store
            .insert_token(&Sha256::digest(token), device_id, clock::now_unix() + 3600)
            .await
            .unwrap();
        token.to_owned()
    }

    async fn answer(response: reqwest::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// serde reads a struct from a JSON array of its fields too; the API takes objects only.
    #[tokio::test]
    async fn bodies_must_be_json_objects() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(dir.path()).await;
        let http = reqwest::Client::new();
        let url = format!("{}/v1/auth/challenge", server.url());
        let nil = Uuid::nil().to_string();
        for body in [json!([nil]), json!([]), json!(null), json!("x")] {
            let (status, error) = answer(http.post(&url).json(&body).send().await.unwrap()).await;
            assert_eq!(status, 400, "{body}: {error}");
            assert_eq!(error["error"]["code"], "bad_request");
        }
        // Without the JSON content type, also 400 (axum would say 415).
        let response = http.post(&url).body(format!(r#"{{"device_id":"{nil}"}}"#));
        let (status, error) = answer(response.send().await.unwrap()).await;
        assert_eq!(
            (status, &error["error"]["code"]),
            (400, &json!("bad_request"))
        );
        // An object goes through to the handler (no such device).
        let response = http
            .post(&url)
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .body(format!(r#" {{"device_id":"{nil}"}}"#));
        let (status, error) = answer(response.send().await.unwrap()).await;
        assert_eq!(
            (status, &error["error"]["code"]),
            (404, &json!("device_not_found"))
        );
        server.stop().await;
    }

    /// Envelope ids and epochs are SQLite integers; larger values are refused, not wrapped.
    #[tokio::test]
    async fn integers_above_i64_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(dir.path()).await;
        let http = reqwest::Client::new();
        let big = u64::MAX / 2 + 1;
        for path in ["roots", "audit"] {
            let url = format!("{}/v1/kt/{path}?from={big}&to={big}", server.url());
            let (status, error) = answer(http.get(url).send().await.unwrap()).await;
            assert_eq!(
                (status, &error["error"]["code"]),
                (400, &json!("bad_request"))
            );
        }
        let token = token(&server).await;
        let ack = |ids: Vec<u64>| {
            http.post(format!("{}/v1/mailbox/ack", server.url()))
                .bearer_auth(&token)
                .json(&json!({ "ids": ids }))
                .send()
        };
        let (status, error) = answer(ack(vec![1, big]).await.unwrap()).await;
        assert_eq!(
            (status, &error["error"]["code"]),
            (400, &json!("bad_request"))
        );
        let (status, removed) = answer(ack(vec![1, big - 1]).await.unwrap()).await;
        assert_eq!((status, removed), (200, json!({ "removed": 0 })));
        server.stop().await;
    }

    /// Every rate-limited answer says when to retry.
    #[tokio::test]
    async fn rate_limited_answers_carry_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = TestServer::config(dir.path());
        config.limits.account_per_second = 1;
        config.limits.account_burst = 1;
        let server = TestServer::start_with(config).await;
        let token = token(&server).await;
        let http = reqwest::Client::new();
        let mut limited = None;
        for _ in 0..5 {
            let response = http
                .get(format!("{}/v1/me", server.url()))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            if response.status() == 429 {
                limited = Some(response);
                break;
            }
        }
        let response = limited.expect("the account limit never answered 429");
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let (_, error) = answer(response).await;
        assert_eq!(error["error"]["code"], "rate_limited");
        server.stop().await;
    }
}
