//! Offline delivery and server restarts: nothing acknowledged is lost or duplicated.

use crate::common::{Env, texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_sent_while_offline_arrive_once_and_in_order() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    // Bob is offline (does not sync) from here on.
    let sent: Vec<String> = (0..1000).map(|i| format!("message {i:04}")).collect();
    for text in &sent {
        alice.send_direct("bob", text).await.unwrap();
    }
    let received = bob.sync().await.unwrap();
    assert_eq!(texts(&received), sent);
    let mut ids: Vec<&str> = received.iter().map(|e| e.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), received.len(), "an id was shown twice");
    // A second sync shows nothing again, and the server mailbox is empty.
    assert!(bob.sync().await.unwrap().is_empty());
    assert!(bob.peek_mailbox().await.unwrap().is_empty());
    assert_eq!(texts(&bob.history("alice", 5000).unwrap()), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_server_restart_between_send_and_receive() {
    let mut env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.create_group("pair", &["bob".into()]).await.unwrap();
    alice.send_direct("bob", "first").await.unwrap();
    alice.send_group("pair", "second").await.unwrap();

    env.server = env.server.restart().await;

    let received = bob.sync().await.unwrap();
    assert_eq!(texts(&received), ["first", "second"]);
    // Both directions work after the restart, on the same groups.
    bob.send_group("pair", "third").await.unwrap();
    assert_eq!(texts(&alice.sync().await.unwrap()), ["third"]);
}
