//! Operations: health, readiness and metrics endpoints, and every abuse limit.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sealpost_core::transport::Transport;

use crate::common::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_without_user_labels() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.send_direct("bob", "hello").await.unwrap();
    bob.sync().await.unwrap();
    let transport = Transport::new(&env.server.url()).unwrap();
    transport.set_token(
        sealpost_core::engine::Engine::open(&sealpost_core::client::database_path(
            &env.home("bob"),
        ))
        .unwrap()
        .token()
        .unwrap(),
    );
    let _socket = transport.connect_socket().await.unwrap();

    let http = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let response = http
            .get(format!("{}{path}", env.server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let metrics = http
        .get(format!("{}/metrics", env.server.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "sealpost_messages_in_total{kind=\"application\"} 1",
        "sealpost_messages_in_total{kind=\"commit\"}",
        "sealpost_websocket_connections 1",
        "sealpost_envelopes_out_total",
        "sealpost_mailbox_depth",
        "sealpost_write_batches_total",
        "sealpost_writer_turn_waits_total",
        "sealpost_writer_turn_wait_seconds_total",
        "sealpost_write_batch_size_bucket",
        "route=\"/v1/groups/{group_id}/messages\"",
    ] {
        assert!(metrics.contains(expected), "missing {expected}:\n{metrics}");
    }
    for private in [
        "alice",
        "bob",
        &alice.whoami().unwrap().device_id,
        "127.0.0.1",
    ] {
        assert!(!metrics.contains(private), "metrics mention {private}");
    }
}

async fn status_of(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut request = http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_default())
}

fn token_of(env: &Env, name: &str) -> String {
    sealpost_core::engine::Engine::open(&sealpost_core::client::database_path(&env.home(name)))
        .unwrap()
        .token()
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limit_answers_429_with_retry_after() {
    let env = Env::with_config(|c| {
        c.limits.ip_per_second = 1;
        c.limits.ip_burst = 3;
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/healthz", env.server.url());
    let mut limited = None;
    for _ in 0..10 {
        let response = http.get(&url).send().await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    let response = limited.expect("the address was never limited");
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_account_and_claim_limits_answer_429() {
    let env = Env::with_config(|c| {
        c.limits.claims_per_minute = 1;
        c.limits.claims_burst = 2;
    })
    .await;
    env.client("alice").await;
    env.client("bob").await;
    let http = reqwest::Client::new();
    let token = token_of(&env, "alice");
    let claim = format!("{}/v1/users/bob/keypackages/claim", env.server.url());
    let mut codes = Vec::new();
    for _ in 0..3 {
        let response = http.post(&claim).bearer_auth(&token).send().await.unwrap();
        codes.push(response.status());
    }
    assert_eq!(
        codes,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );

    let env = Env::with_config(|c| {
        c.limits.account_per_second = 1;
        c.limits.account_burst = 50;
    })
    .await;
    env.client("carol").await;
    let token = token_of(&env, "carol");
    let me = format!("{}/v1/me", env.server.url());
    let mut limited = false;
    for _ in 0..60 {
        let (status, body) = status_of(&http, &me, Some(&token)).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["error"]["code"], "rate_limited");
            limited = true;
            break;
        }
    }
    assert!(limited, "the account was never limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_account_are_capped() {
    let env = Env::with_config(|c| c.limits.sockets_per_account = 1).await;
    env.client("alice").await;
    let transport = Transport::new(&env.server.url()).unwrap();
    transport.set_token(Some(token_of(&env, "alice")));
    let first = transport.connect_socket().await.unwrap();
    assert!(transport.connect_socket().await.is_err());
    drop(first);
    // The slot is freed when the socket closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if transport.connect_socket().await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the socket slot was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_time_out() {
    let env = Env::with_config(|c| c.limits.request_timeout = Duration::from_millis(300)).await;
    let addr = env.server.addr;
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(
                b"POST /v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 100\r\n\r\n{\"user",
            )
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"timeout\""), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailboxes_refuse_messages_but_not_group_changes() {
    let env = Env::with_config(|c| c.limits.mailbox_quota = 3).await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    env.client("carol").await;
    alice.create_group("club", &["bob".into()]).await.unwrap();
    // Bob stays offline: Welcome + two messages fill his mailbox.
    alice.send_group("club", "one").await.unwrap();
    alice.send_group("club", "two").await.unwrap();
    let refused = alice.send_group("club", "three").await.unwrap_err();
    assert_eq!(refused.code(), "mailbox_full", "{refused}");
    assert!(refused.to_string().contains("mailbox is full"), "{refused}");
    // Group changes still go through, and once bob catches up there is room again.
    alice.add_member("club", "carol").await.unwrap();
    let seen = bob.sync().await.unwrap();
    assert_eq!(crate::common::texts(&seen), ["one", "two"]);
    alice.send_group("club", "three").await.unwrap();
    assert_eq!(crate::common::texts(&bob.sync().await.unwrap()), ["three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_key_packages_fall_back_to_last_resort_and_are_refilled() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    // Bob registered with TEST_KEY_PACKAGES one-time packages; use them all and more.
    let groups = crate::common::TEST_KEY_PACKAGES + 2;
    for i in 0..groups {
        alice
            .create_group(&format!("g{i}"), &["bob".into()])
            .await
            .unwrap();
    }
    let transport = Transport::new(&env.server.url()).unwrap();
    transport.set_token(Some(token_of(&env, "bob")));
    let count = transport.key_package_count().await.unwrap();
    assert_eq!(count.one_time, 0);
    assert!(count.last_resort, "the last-resort package must stay");
    // Bob joins every group (the last-resort package works) and refills at that sync.
    let joined = bob.sync().await.unwrap();
    assert_eq!(
        joined
            .iter()
            .filter(|e| e.text.contains("added you to"))
            .count(),
        groups,
        "{joined:?}"
    );
    let count = transport.key_package_count().await.unwrap();
    assert!(count.one_time >= 50, "not refilled: {count:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_headers_are_cut_off() {
    let env = Env::with_config(|c| c.limits.header_read_timeout = Duration::from_millis(300)).await;
    let addr = env.server.addr;
    let started = Instant::now();
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        // Headers that never end.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buffer = Vec::new();
        let _ = stream.read_to_end(&mut buffer);
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        closed_after < Duration::from_secs(5),
        "still open after {closed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_websocket_frames_close_the_socket() {
    use futures_util::{SinkExt as _, StreamExt as _};
    let env = Env::new().await;
    env.client("alice").await;
    let transport = Transport::new(&env.server.url()).unwrap();
    transport.set_token(Some(token_of(&env, "alice")));
    let mut socket = transport.connect_socket().await.unwrap();
    let _ = socket.next().await; // the first mailbox_ready event
    let big = "x".repeat(64 * 1024);
    let _ = socket
        .send(tokio_tungstenite::tungstenite::Message::Text(big.into()))
        .await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                None
                | Some(Err(_))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => {
                    return true;
                }
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the server kept a socket that sent a 64 KiB frame");
    // The server is fine.
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{}/healthz", env.server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
