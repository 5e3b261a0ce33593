//! Push-mode WebSocket delivery: the backlog, then live envelopes, acknowledgements and
//! sends on one socket; nothing lost, duplicated or reordered, even for a slow reader.

use std::time::Duration;

use sealpost_core::Client;
use sealpost_core::transport::{PushReceiver, PushSender};
use sealpost_proto::api::{Envelope, EnvelopeKind};
use sealpost_proto::ws::{ClientFrame, ServerFrame};
use sealpost_proto::{ErrorCode, limits};

use crate::common::{Env, texts};

/// Reads frames until `count` application envelopes arrived; returns them and every
/// envelope id seen (to acknowledge).
async fn next_applications(rx: &mut PushReceiver, count: usize) -> (Vec<Envelope>, Vec<u64>) {
    let mut applications = Vec::new();
    let mut ids = Vec::new();
    while applications.len() < count {
        let frame = tokio::time::timeout(Duration::from_secs(30), rx.next())
            .await
            .expect("timed out waiting for envelopes")
            .unwrap()
            .expect("socket closed");
        if let ServerFrame::Envelopes { envelopes } = frame {
            for envelope in envelopes {
                ids.push(envelope.id);
                if envelope.kind == EnvelopeKind::Application {
                    applications.push(envelope);
                }
            }
        }
    }
    (applications, ids)
}

/// Sends a prepared text on a push socket and returns the server's answer.
async fn send_text(
    client: &Client,
    conversation: &str,
    text: &str,
    tx: &mut PushSender,
    rx: &mut PushReceiver,
) -> ServerFrame {
    let prepared = client
        .prepare_texts(conversation, &[text.to_owned()])
        .unwrap();
    let message = &prepared[0];
    tx.send(&ClientFrame::Send {
        reference: 42,
        group_id: message.group_id.clone(),
        message_id: message.request.message_id,
        message: message.request.message.clone(),
    })
    .await
    .unwrap();
    loop {
        let frame = rx.next().await.unwrap().expect("socket closed");
        if matches!(
            frame,
            ServerFrame::Sent { .. } | ServerFrame::SendFailed { .. }
        ) {
            return frame;
        }
    }
}

/// Sends prepared messages on a new push socket of `client`, all at once, and waits until
/// every one is accepted.
async fn send_prepared(
    client: &Client,
    prepared: &[sealpost_core::engine::conversations::OutgoingMessage],
) {
    let (mut tx, mut rx) = client.connect_push().await.unwrap().split();
    for (i, message) in prepared.iter().enumerate() {
        tx.feed(&ClientFrame::Send {
            reference: i as u64,
            group_id: message.group_id.clone(),
            message_id: message.request.message_id,
            message: message.request.message.clone(),
        })
        .await
        .unwrap();
    }
    tx.flush().await.unwrap();
    let mut accepted = 0;
    while accepted < prepared.len() {
        match rx.next().await.unwrap().unwrap() {
            ServerFrame::Sent { .. } => accepted += 1,
            ServerFrame::SendFailed { error, .. } => panic!("send failed: {error:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_socket_carries_backlog_live_mail_acks_and_sends() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.send_direct("bob", "hello").await.unwrap();
    bob.sync().await.unwrap();
    // Sent while Bob is offline: the backlog.
    for text in ["one", "two", "three"] {
        alice.send_direct("bob", text).await.unwrap();
    }

    let (mut bob_tx, mut bob_rx) = bob.connect_push().await.unwrap().split();
    let (backlog, mut ids) = next_applications(&mut bob_rx, 3).await;
    let mut shown = Vec::new();
    for envelope in &backlog {
        shown.extend(bob.process_raw(envelope).unwrap());
    }
    assert_eq!(texts(&shown), ["one", "two", "three"]);

    // Live: Alice sends on her own push socket; Bob has it without asking.
    let (mut alice_tx, mut alice_rx) = alice.connect_push().await.unwrap().split();
    let answer = send_text(&alice, "bob", "live", &mut alice_tx, &mut alice_rx).await;
    let ServerFrame::Sent { reference, result } = answer else {
        panic!("send refused: {answer:?}");
    };
    assert_eq!(reference, 42);
    let (live, live_ids) = next_applications(&mut bob_rx, 1).await;
    assert_eq!(live[0].group_seq, result.group_seq);
    assert_eq!(texts(&bob.process_raw(&live[0]).unwrap()), ["live"]);
    ids.extend(live_ids);

    // Acknowledged envelopes are gone from the server.
    bob_tx
        .send(&ClientFrame::Ack {
            ids: ids.clone(),
            confirm: true,
        })
        .await
        .unwrap();
    loop {
        if let ServerFrame::Acked { removed } = bob_rx.next().await.unwrap().unwrap() {
            assert_eq!(removed, ids.len() as u64);
            break;
        }
    }
    assert!(bob.peek_mailbox().await.unwrap().is_empty());

    // Bad input is answered and the socket stays usable.
    alice_tx
        .send(&ClientFrame::Send {
            reference: 7,
            group_id: "not-a-group".into(),
            message_id: uuid::Uuid::new_v4(),
            message: sealpost_proto::Bytes64(vec![1, 2, 3]),
        })
        .await
        .unwrap();
    match alice_rx.next().await.unwrap().unwrap() {
        ServerFrame::SendFailed { reference, error } => {
            assert_eq!(reference, 7);
            assert_eq!(error.code, ErrorCode::BadRequest);
        }
        other => panic!("expected send_failed, got {other:?}"),
    }
    let answer = send_text(&alice, "bob", "still works", &mut alice_tx, &mut alice_rx).await;
    assert!(matches!(answer, ServerFrame::Sent { .. }), "{answer:?}");
    let (after, after_ids) = next_applications(&mut bob_rx, 1).await;
    assert_eq!(texts(&bob.process_raw(&after[0]).unwrap()), ["still works"]);

    // An acknowledgement without `confirm` deletes just the same and is not answered: the
    // next frame Bob gets is the next message, not an `Acked`.
    bob_tx
        .send(&ClientFrame::Ack {
            ids: after_ids,
            confirm: false,
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !bob.peek_mailbox().await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the quiet ack never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // One the server refuses at once is answered, and the socket stays usable.
    bob_tx
        .send(&ClientFrame::Ack {
            ids: (1..=limits::ACK_MAX_IDS as u64 + 1).collect(),
            confirm: false,
        })
        .await
        .unwrap();
    match bob_rx.next().await.unwrap().unwrap() {
        ServerFrame::Error { error } => assert_eq!(error.code, ErrorCode::PayloadTooLarge),
        other => panic!("expected an error, got {other:?}"),
    }
    let answer = send_text(
        &alice,
        "bob",
        "after a quiet ack",
        &mut alice_tx,
        &mut alice_rx,
    )
    .await;
    assert!(matches!(answer, ServerFrame::Sent { .. }), "{answer:?}");
    match bob_rx.next().await.unwrap().unwrap() {
        ServerFrame::Envelopes { envelopes } => {
            assert_eq!(
                texts(&bob.process_raw(&envelopes[0]).unwrap()),
                ["after a quiet ack"]
            );
        }
        other => panic!("expected the next envelopes, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_push_reader_loses_nothing() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.send_direct("bob", "hello").await.unwrap();
    bob.sync().await.unwrap();

    // Bob connects but does not read while far more than the server's per-socket queue
    // (and the kernel's socket buffers) arrives: the server must fall back to the
    // mailbox without losing or repeating anything.
    let (_bob_tx, mut bob_rx) = bob.connect_push().await.unwrap().split();
    let count = 2_500;
    let texts_sent: Vec<String> = (0..count)
        .map(|i| format!("{i:05} {}", "x".repeat(8_000)))
        .collect();
    let prepared = alice.prepare_texts("bob", &texts_sent).unwrap();
    send_prepared(&alice, &prepared).await;

    let (received, _) = next_applications(&mut bob_rx, count).await;
    let expected: Vec<uuid::Uuid> = prepared.iter().map(|m| m.request.message_id).collect();
    let got: Vec<uuid::Uuid> = received.iter().map(|e| e.message_id).collect();
    if got != expected {
        let first = got.iter().zip(&expected).position(|(a, b)| a != b);
        let positions: Vec<Option<usize>> = got
            .iter()
            .take(first.unwrap_or(0) + 5)
            .skip(first.unwrap_or(0).saturating_sub(2))
            .map(|id| expected.iter().position(|e| e == id))
            .collect();
        let ids: Vec<u64> = received.iter().map(|e| e.id).collect();
        panic!(
            "lost, repeated or reordered envelopes: first difference at {first:?}, \
             received positions around it {positions:?}, mailbox ids {:?}",
            &ids[first.unwrap_or(0).saturating_sub(2)..(first.unwrap_or(0) + 5).min(ids.len())]
        );
    }
    // Nothing more arrives after the last one.
    let extra = tokio::time::timeout(Duration::from_millis(300), bob_rx.next()).await;
    assert!(
        extra.is_err(),
        "unexpected frame after the backlog: {extra:?}"
    );
}

/// Sends `count` texts of `client` for `conversation` on its own push socket and waits for
/// all answers.
async fn send_all(client: &Client, conversation: &str, count: usize) {
    let texts: Vec<String> = (0..count).map(|i| format!("message {i}")).collect();
    let prepared = client.prepare_texts(conversation, &texts).unwrap();
    send_prepared(client, &prepared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_reach_a_push_reader_in_group_order() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    let carol = env.client("carol").await;
    alice
        .create_group("trio", &["bob".into(), "carol".into()])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();

    let (_bob_tx, mut bob_rx) = bob.connect_push().await.unwrap().split();
    let count = 400;
    tokio::join!(
        send_all(&alice, "trio", count),
        send_all(&carol, "trio", count)
    );
    // Every message of both senders, each once, in the group's order.
    let (received, _) = next_applications(&mut bob_rx, 2 * count).await;
    let seqs: Vec<u64> = received.iter().map(|e| e.group_seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "envelopes out of group order: {seqs:?}"
    );
    let extra = tokio::time::timeout(Duration::from_millis(300), bob_rx.next()).await;
    assert!(extra.is_err(), "unexpected frame: {extra:?}");
}

/// A clean shutdown closes open push sockets at once (with a Close frame) instead of
/// leaving them to the server's 10 s grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_closes_push_sockets() {
    let env = Env::new().await;
    let bob = env.client("bob").await;
    let (_bob_tx, mut bob_rx) = bob.connect_push().await.unwrap().split();
    let Env { server, dir: _dir } = env;
    let stopping = tokio::spawn(server.stop());
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match bob_rx.next().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("the push socket was not closed within 5 s");
    assert!(
        matches!(closed, Ok(None)),
        "the socket ended without a Close frame: {closed:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the server took more than 5 s to stop")
        .unwrap();
}
