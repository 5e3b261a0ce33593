//! Abuse limits: request rates per client address and per account, KeyPackage claims per
//! account, WebSocket connections per account, and request timeouts.
//!
//! Addresses are used only in memory, as keys of the rate limiter, and are forgotten when
//! idle; they are never stored or logged. Each limit answers `429 rate_limited` (or
//! `408 timeout`) with a `Retry-After` header where it applies.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sealpost_proto::ErrorCode;

use crate::error::ApiError;

/// Configurable limits (see [`crate::Config::limits`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests per second from one client address (all endpoints), and the burst.
    pub ip_per_second: u32,
    pub ip_burst: u32,
    /// Requests per second by one account (authenticated endpoints), and the burst.
    pub account_per_second: u32,
    pub account_burst: u32,
    /// KeyPackage claims per minute by one account, and the burst.
    pub claims_per_minute: u32,
    pub claims_burst: u32,
    /// Open WebSockets per account.
    pub sockets_per_account: usize,
    /// How long one request may take, reading its body included (slow clients).
    pub request_timeout: Duration,
    /// How long a client may take to send a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// Envelopes one device's mailbox may hold before application messages to it are
    /// refused (`507 mailbox_full`).
    pub mailbox_quota: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ip_per_second: 50,
            ip_burst: 300,
            account_per_second: 50,
            account_burst: 500,
            claims_per_minute: 120,
            claims_burst: 60,
            sockets_per_account: 32,
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            mailbox_quota: 100_000,
        }
    }
}

fn quota_per_second(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

fn quota_per_minute(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(rate).allow_burst(burst)
}

/// The rate limiters of one server process.
pub struct RateLimits {
    ip: DefaultKeyedRateLimiter<IpAddr>,
    account: DefaultKeyedRateLimiter<String>,
    claims: DefaultKeyedRateLimiter<String>,
}

impl RateLimits {
    pub fn new(limits: &Limits) -> Self {
        Self {
            ip: RateLimiter::keyed(quota_per_second(limits.ip_per_second, limits.ip_burst)),
            account: RateLimiter::keyed(quota_per_second(
                limits.account_per_second,
                limits.account_burst,
            )),
            claims: RateLimiter::keyed(quota_per_minute(
                limits.claims_per_minute,
                limits.claims_burst,
            )),
        }
    }

    pub fn check_account(&self, username: &str) -> Result<(), ApiError> {
        self.account
            .check_key(&username.to_owned())
            .map_err(|_| limited("too many requests for this account; slow down"))
    }

    pub fn check_claim(&self, username: &str) -> Result<(), ApiError> {
        self.claims
            .check_key(&username.to_owned())
            .map_err(|_| limited("too many KeyPackage claims; try again in a minute"))
    }

    /// Forgets idle keys (addresses, accounts).
    pub fn forget_idle(&self) {
        self.ip.retain_recent();
        self.account.retain_recent();
        self.claims.retain_recent();
    }
}

fn limited(message: &str) -> ApiError {
    ApiError::new(ErrorCode::RateLimited, message)
}

/// Middleware: the per-address limit on every request.
pub async fn per_address(
    State(limits): State<Arc<RateLimits>>,
    request: Request,
    next: Next,
) -> Response {
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(address) = address
        && limits.ip.check_key(&address).is_err()
    {
        // `Retry-After` is set by `ApiError` for every `rate_limited` answer.
        return limited("too many requests from your address; slow down").into_response();
    }
    next.run(request).await
}
