//! A server for tests: temporary SQLite data dir, random loopback port, stops on drop.
// Test fixture: failing to bind loopback or a crashed server must fail the test loudly.
#![allow(clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::api::AppState;
use crate::store::{AccountRecord, DeviceRecord, Store};
use crate::{Config, ServerError, open_state, run};

pub struct TestServer {
    pub addr: SocketAddr,
    data_dir: PathBuf,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// Starts a server on `127.0.0.1:0` with its data in `data_dir`.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(Self::config(data_dir)).await
    }

    /// The configuration of a test server: the key directory publishes every 20 ms so
    /// that tests need not wait for epochs.
    pub fn config(data_dir: &Path) -> Config {
        let mut config = Config::new(data_dir);
        config.kt_interval = std::time::Duration::from_millis(20);
        // Every test client shares one address and runs far faster than a person.
        config.limits.ip_per_second = 100_000;
        config.limits.ip_burst = 100_000;
        config.limits.account_per_second = 100_000;
        config.limits.account_burst = 100_000;
        config.limits.claims_per_minute = 100_000;
        config.limits.claims_burst = 100_000;
        config
    }

    pub async fn start_with(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        Self::start_on_listener(config, listener).await
    }

    /// Stops the server cleanly and starts it again on the same address and data.
    pub async fn restart(mut self) -> Self {
        let addr = self.addr;
        let config = Self::config(&self.data_dir);
        self.shutdown().await;
        let listener = TcpListener::bind(addr).await.expect("rebind the same port");
        Self::start_on_listener(config, listener).await
    }

    async fn start_on_listener(config: Config, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let state = open_state(config).await.expect("open server state");
        let task = tokio::spawn(run(state.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            data_dir,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The running server's state (store, key directory, and with the `adversarial`
    /// feature, its lies).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Shuts the server down cleanly and waits until the database is closed.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Puts an account with one device straight into `store`, without the registration
/// protocol (its key directory entry is then pending); returns the device's id.
pub async fn put_account(store: &dyn Store, username: &str, account_key: [u8; 32]) -> Uuid {
    let device_id = Uuid::new_v4();
    store
        .create_account(
            &AccountRecord {
                username: username.into(),
                account_key: account_key.to_vec(),
                created_day: 0,
                last_seen_day: 0,
            },
            &DeviceRecord {
                device_id,
                username: username.into(),
                signature_key: vec![2; 32],
                certificate: vec![3],
                created_day: 0,
                name_sealed: None,
            },
        )
        .await
        .expect("create a test account");
    device_id
}
