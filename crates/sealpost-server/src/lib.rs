//! The Sealpost delivery server.
//!
//! It is the MLS Delivery Service and nothing more: it keeps accounts, devices and
//! KeyPackages, sequences each group's commits (the first commit for the current epoch
//! wins), stores every message durably in a mailbox per recipient device before
//! answering the sender, and wakes connected devices over their WebSocket. It never sees
//! plaintext or private keys and never parses application content.
//!
//! Embed it with [`serve`], which runs on a listener you bind, until a shutdown future
//! resolves; `sealpost-server` (the binary) is a thin wrapper around it.

#[cfg(feature = "adversarial")]
pub mod adversary;
pub mod api;
pub mod clock;
pub mod config;
pub mod error;
pub mod kt;
pub mod limits;
pub mod metrics;
pub mod mls;
pub mod notify;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

use std::future::Future;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use store::sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot open the key directory: {0}")]
    Kt(#[from] kt::KtError),
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the data directory, the database and the key directory: everything a server
/// instance shares between its handlers.
pub async fn open_state(config: Config) -> Result<api::AppState, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Arc::new(SqliteStore::open(&config.database_path()).await?);
    let kt = Arc::new(
        kt::KeyTransparency::open(&config.data_dir, store.clone(), store.akd_storage()).await?,
    );
    let metrics = Arc::new(metrics::Metrics::default());
    let observed = metrics.clone();
    store
        .batch_stats()
        .observe(move |size| observed.write_batch_size.observe(size as f64));
    let notifier = notify::Notifier::default();
    let delivering = notifier.clone();
    store.on_deliveries(move |deliveries| delivering.deliver(deliveries));
    Ok(api::AppState {
        sqlite: store.clone(),
        store,
        kt,
        notifier,
        metrics,
        rate_limits: Arc::new(limits::RateLimits::new(&config.limits)),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        config: Arc::new(config),
        shutdown: CancellationToken::new(),
        #[cfg(feature = "adversarial")]
        tamper: Default::default(),
    })
}

/// Runs the server on `listener` until `shutdown` resolves, then finishes in-flight
/// requests, closes WebSockets and closes the database cleanly.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let state = open_state(config).await?;
    run(state, listener, shutdown).await
}

/// Runs an opened server state on `listener` until `shutdown` resolves.
pub async fn run(
    state: api::AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let cancel = state.shutdown.clone();
    let sqlite = state.sqlite.clone();
    let expiry = tokio::spawn(run_expiry(state.clone()));
    let publisher = tokio::spawn(run_kt_publisher(state.clone()));
    state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let ready = state.ready.clone();
    let header_timeout = state.config.limits.header_read_timeout;
    let app = api::router(state);
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let stop = cancel.clone();
    accept_loop(listener, app, header_timeout, async move {
        tokio::select! {
            () = shutdown => {}
            () = stop.cancelled() => {}
        }
        // Stop taking new work: load balancers see /readyz fail while requests drain, and
        // WebSockets close.
        ready.store(false, std::sync::atomic::Ordering::SeqCst);
        stop.cancel();
    })
    .await;
    cancel.cancel();
    let _ = expiry.await;
    let _ = publisher.await;
    sqlite.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves HTTP/1 and HTTP/2 connections until `shutdown` resolves, then lets open
/// connections finish (WebSockets are closed by the shutdown token) for up to 10 s.
///
/// Written out instead of `axum::serve` for one reason: a client that sends request headers
/// slowly (slowloris) must be cut off, and that needs hyper's header-read timeout, which
/// `axum::serve` does not configure.
async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: std::time::Duration,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use tower::ServiceExt as _;

    let mut make_service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small frames (a pushed envelope, a `sent` answer) must leave at once, not wait
        // for Nagle's algorithm to collect more (a 40 ms stall against delayed ACKs).
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let Ok(service) = tower::Service::call(&mut make_service, peer).await;
        let hyper_service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                service.clone().oneshot(request)
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), hyper_service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(std::time::Duration::from_secs(10)) => {
            tracing::warn!("connections still open after 10 s; closing");
        }
    }
}

async fn run_expiry(state: api::AppState) {
    let mut interval = tokio::time::interval(state.config.expiry_interval);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                state.rate_limits.forget_idle();
                match state.store.expire(clock::now_unix()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "expired undelivered messages"),
                    Err(err) => tracing::warn!(error = %err, "expiry failed"),
                }
            }
            () = state.shutdown.cancelled() => break,
        }
    }
}

/// Publishes a key-directory epoch whenever accounts or devices changed, at most once per
/// `kt_interval`.
async fn run_kt_publisher(state: api::AppState) {
    let mut interval = tokio::time::interval(state.config.kt_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                if let Err(err) = state.kt.publish_pending().await {
                    tracing::warn!(error = %err, "key directory publish failed");
                }
            }
            () = state.shutdown.cancelled() => break,
        }
    }
}
