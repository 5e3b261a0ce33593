//! The `sealpost-server` binary: starts with no setup, answers `/healthz`, stops cleanly on
//! SIGTERM and SIGINT, and keeps what it acknowledged across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer as _, SigningKey};
use sealpost_proto::Bytes64;
use sealpost_proto::certificate::DeviceCertificate;
use uuid::Uuid;

struct Server {
    child: Child,
    url: String,
    log: std::sync::mpsc::Receiver<String>,
}

// The child is waited for in `stop`.
#[allow(clippy::zombie_processes)]
fn start(data_dir: &std::path::Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpost-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("SEALPOST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("server did not report its address");
        if let Some(addr) = line.split("addr=").nth(1) {
            let url = format!("http://{}", addr.trim());
            return Server { child, url, log };
        }
    }
}

fn stop(mut server: Server, signal: &str) -> Vec<String> {
    let status = Command::new("kill")
        .args([signal, &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "server exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop on {signal}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut lines = Vec::new();
    while let Ok(line) = server.log.recv_timeout(Duration::from_millis(200)) {
        lines.push(line);
    }
    lines
}

fn registration(username: &str) -> serde_json::Value {
    let account = SigningKey::generate(&mut rand::rngs::OsRng);
    let device = SigningKey::generate(&mut rand::rngs::OsRng);
    let device_id = Uuid::new_v4();
    let account_key = account.verifying_key().to_bytes();
    let device_key = device.verifying_key().to_bytes();
    let signed = DeviceCertificate::signed_bytes(username, &device_id, &device_key, &account_key);
    let cert = DeviceCertificate {
        username: username.into(),
        device_id,
        device_key,
        account_key,
        signature: account.sign(&signed).to_bytes(),
    };
    serde_json::json!({
        "username": username,
        "account_key": Bytes64::encode(&account_key),
        "device_certificate": Bytes64::encode(&cert.encode()),
    })
}

#[tokio::test]
async fn binary_serves_stops_cleanly_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let http = reqwest::Client::new();

    let server = start(&data);
    let health = http
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let created = http
        .post(format!("{}/v1/accounts", server.url))
        .json(&registration("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let log = stop(server, "-TERM");
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");

    // Restarted on the same data: the account is still there.
    let server = start(&data);
    let again = http
        .post(format!("{}/v1/accounts", server.url))
        .json(&registration("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let log = stop(server, "-INT");
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
}
