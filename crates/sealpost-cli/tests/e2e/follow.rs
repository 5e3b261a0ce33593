//! `sync --follow` prints messages as they arrive and survives a server restart.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::Env;

struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(home: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sealpost"))
            .arg("--home")
            .arg(home)
            .args(["--json", "sync", "--follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a text message and returns it.
    fn next_text(&self) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("no message within 30 s");
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            if value["kind"] == "text" {
                return value["text"].as_str().unwrap().to_owned();
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_prints_messages_as_they_arrive_and_survives_a_restart() {
    let mut env = Env::new().await;
    let alice = env.client("alice").await;
    env.client("bob").await;
    let follower = Follower::start(&env.home("bob"));

    alice.send_direct("bob", "one").await.unwrap();
    let got = tokio::task::block_in_place(|| follower.next_text());
    assert_eq!(got, "one");

    env.server = env.server.restart().await;
    alice.send_direct("bob", "two").await.unwrap();
    let got = tokio::task::block_in_place(|| follower.next_text());
    assert_eq!(got, "two");
}
