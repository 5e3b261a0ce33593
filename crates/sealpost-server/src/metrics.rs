//! Prometheus metrics at `/metrics`, with no per-user labels: the only labels are route
//! templates and message kinds, never usernames, device ids or addresses.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
    pub status: u16,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Open device WebSockets.
    pub websockets: Gauge,
    /// Messages accepted for sequencing, by kind.
    pub messages_in: Family<KindLabel, Counter>,
    /// Envelopes handed to devices in mailbox fetches.
    pub envelopes_out: Counter,
    /// Times a push-mode socket's queue overflowed and the socket re-read the mailbox.
    pub push_overflows: Counter,
    /// Envelopes waiting in all mailboxes (sampled at each scrape).
    pub mailbox_depth: Gauge,
    /// Requests per write transaction of the group-commit writer (sampled at each scrape).
    pub write_batches: Counter,
    pub batched_requests: Counter,
    /// WAL flushes (`fdatasync`) that made those transactions durable (sampled at each
    /// scrape); one flush may cover several transactions.
    pub wal_flushes: Counter,
    /// Times the group-commit writer waited for the `sqlx` connection's turn at the write
    /// lock, and the time it spent waiting (sampled at each scrape).
    pub writer_turn_waits: Counter,
    pub writer_turn_wait_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Sequenced messages per write transaction of the group-commit writer.
    pub write_batch_size: Histogram,
    /// Request latency by route template and status.
    pub request_seconds: Family<RouteLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sealpost");
        let websockets = Gauge::default();
        let messages_in = Family::<KindLabel, Counter>::default();
        let envelopes_out = Counter::default();
        let push_overflows = Counter::default();
        let mailbox_depth = Gauge::default();
        let write_batches = Counter::default();
        let batched_requests = Counter::default();
        let wal_flushes = Counter::default();
        let writer_turn_waits = Counter::default();
        let writer_turn_wait_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        let write_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        let request_seconds = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        registry.register(
            "websocket_connections",
            "Open device WebSockets",
            websockets.clone(),
        );
        registry.register(
            "messages_in",
            "Messages accepted for sequencing",
            messages_in.clone(),
        );
        registry.register(
            "envelopes_out",
            "Envelopes handed to devices",
            envelopes_out.clone(),
        );
        registry.register(
            "push_overflows",
            "Push-socket queue overflows (the socket re-read the mailbox)",
            push_overflows.clone(),
        );
        registry.register(
            "mailbox_depth",
            "Envelopes waiting in all mailboxes",
            mailbox_depth.clone(),
        );
        registry.register(
            "write_batches",
            "Write transactions of the group-commit writer",
            write_batches.clone(),
        );
        registry.register(
            "batched_requests",
            "Requests carried by those transactions",
            batched_requests.clone(),
        );
        registry.register(
            "wal_flushes",
            "WAL flushes that made those transactions durable",
            wal_flushes.clone(),
        );
        registry.register(
            "writer_turn_waits",
            "Times the group-commit writer waited for the sqlx connection's turn at the write lock",
            writer_turn_waits.clone(),
        );
        registry.register(
            "writer_turn_wait_seconds",
            "Time the group-commit writer spent waiting for those turns",
            writer_turn_wait_seconds.clone(),
        );
        registry.register(
            "write_batch_size",
            "Messages per write transaction",
            write_batch_size.clone(),
        );
        registry.register(
            "request_seconds",
            "Request latency by route",
            request_seconds.clone(),
        );
        Self {
            registry,
            websockets,
            messages_in,
            envelopes_out,
            push_overflows,
            mailbox_depth,
            write_batches,
            batched_requests,
            wal_flushes,
            writer_turn_waits,
            writer_turn_wait_seconds,
            write_batch_size,
            request_seconds,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Middleware: records each request's latency under its route template.
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let start = Instant::now();
    let response = next.run(request).await;
    metrics
        .request_seconds
        .get_or_create(&RouteLabel {
            route,
            status: response.status().as_u16(),
        })
        .observe(start.elapsed().as_secs_f64());
    response
}
