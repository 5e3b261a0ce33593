//! Shared test fixtures: a server, clients, and a runner for the CLI binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use sealpost_core::{Client, HistoryEntry};
use sealpost_server::testing::TestServer;
use tempfile::TempDir;

/// KeyPackages per test device: enough for the tests, fewer than a real device keeps.
pub const TEST_KEY_PACKAGES: usize = 8;

/// Log file that every in-process server of this test binary writes to (checked for
/// plaintext by `at_rest`).
pub fn log_path() -> PathBuf {
    std::env::temp_dir().join(format!("sealpost-e2e-{}.log", std::process::id()))
}

static LOGGING: Once = Once::new();

fn init_logging() {
    LOGGING.call_once(|| {
        let file = std::fs::File::create(log_path()).expect("log file");
        tracing_subscriber::fmt()
            .with_env_filter(
                "debug,hyper=info,sqlx=info,reqwest=info,tungstenite=info,tokio_tungstenite=info",
            )
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init();
    });
}

/// A running server with a temporary directory for its data and for client homes.
pub struct Env {
    pub dir: TempDir,
    pub server: TestServer,
}

impl Env {
    pub async fn new() -> Self {
        Self::with_config(|_| {}).await
    }

    /// A server with a changed configuration.
    pub async fn with_config(change: impl FnOnce(&mut sealpost_server::Config)) -> Self {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let mut config = TestServer::config(&dir.path().join("server"));
        change(&mut config);
        let server = TestServer::start_with(config).await;
        Self { dir, server }
    }

    /// Links a new device named `name` to the account of `existing`.
    pub async fn link_device(&self, existing: &Client, name: &str) -> Client {
        let code = existing.create_link().await.unwrap();
        let url = self.server.url();
        let home = self.home(name);
        let shown = code.display();
        let (linked, new) = tokio::join!(
            existing.complete_link(&code, |_| {}),
            Client::link(&home, &shown, &url, name, TEST_KEY_PACKAGES),
        );
        linked.unwrap();
        new.unwrap()
    }

    pub fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join("homes").join(name)
    }

    /// Registers `name` through the library.
    pub async fn client(&self, name: &str) -> Client {
        Client::register(
            &self.home(name),
            name,
            &self.server.url(),
            TEST_KEY_PACKAGES,
        )
        .await
        .unwrap_or_else(|e| panic!("register {name}: {e}"))
    }

    /// Runs the CLI as `name` and returns (status success, stdout, stderr).
    pub fn cli(&self, name: &str, args: &[&str]) -> CliOutput {
        run_cli(&self.home(name), args)
    }

    /// Registers `name` through the CLI.
    pub fn cli_register(&self, name: &str) {
        let url = self.server.url();
        let out = self.cli(
            name,
            &["register", name, "--server", &url, "--key-packages", "8"],
        );
        out.assert_ok();
    }
}

pub struct CliOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.success,
            "command failed: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        self
    }

    /// Parses stdout as JSON lines.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
            .collect()
    }
}

pub fn run_cli(home: &Path, args: &[&str]) -> CliOutput {
    let output = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SEALPOST_HOME")
        .env_remove("SEALPOST_SERVER")
        .output()
        .expect("run sealpost");
    CliOutput {
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Text messages only (no notices).
pub fn texts(entries: &[HistoryEntry]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.kind == "text")
        .map(|e| e.text.clone())
        .collect()
}

/// Notices that report a failure to decrypt or process.
pub fn failures(entries: &[HistoryEntry]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| {
            e.kind == "notice"
                && (e.text.contains("could not be decrypted") || e.text.contains("rejected"))
        })
        .map(|e| e.text.clone())
        .collect()
}

/// Copies a client home (after its client is dropped), to keep its keys as they are.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The first application message waiting in `client`'s mailbox, left there (not
/// processed, not acknowledged): the raw ciphertext a server would deliver.
pub async fn peek_application(client: &Client) -> sealpost_proto::api::Envelope {
    client
        .peek_mailbox()
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.kind == sealpost_proto::api::EnvelopeKind::Application)
        .expect("an application message is waiting")
}
