//! A client killed between any two steps of an operation recovers on its next run: the
//! outbox is resent with the same message ids, the server answers resends idempotently,
//! and no group is left undecryptable and no message shown twice.

use sealpost_core::Client;
use sealpost_core::engine::Engine;
use sealpost_core::transport::Transport;

use crate::common::{Env, failures, now, texts};

/// Opens alice's engine and an authenticated transport, as her client would.
fn raw_device(env: &Env, name: &str) -> (Engine, Transport) {
    let engine = Engine::open(&sealpost_core::client::database_path(&env.home(name))).unwrap();
    let transport = Transport::new(&env.server.url()).unwrap();
    transport.set_token(engine.token().unwrap());
    (engine, transport)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_recovers_every_operation_exactly_once() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    let carol = env.client("carol").await;
    let group = alice
        .create_group("club", &["bob".into()])
        .await
        .unwrap()
        .group_id;
    bob.sync().await.unwrap();
    drop(alice);

    // 1. Killed after staging a commit, before sending it.
    {
        let (mut engine, transport) = raw_device(&env, "alice");
        // As the client does: learn carol's proven devices, then claim.
        let carol_entry = transport.user_devices("carol").await.unwrap();
        engine.observe_directory(&carol_entry, now()).unwrap();
        let claimed = transport.claim_key_packages("carol").await.unwrap();
        engine.begin_add(&group, &[claimed], now()).unwrap();
    }
    let alice = Client::open(&env.home("alice")).unwrap();
    alice.sync().await.unwrap();
    assert!(texts(&carol.sync().await.unwrap()).is_empty());
    assert_eq!(
        carol.group_snapshot("club").unwrap(),
        alice.group_snapshot("club").unwrap()
    );
    drop(alice);

    // 2. Killed after the server accepted a commit, before merging it.
    {
        let (mut engine, transport) = raw_device(&env, "alice");
        let outgoing = engine.begin_remove(&group, "carol", now()).unwrap();
        transport
            .post_commit(&group, &outgoing.request)
            .await
            .unwrap();
    }
    let alice = Client::open(&env.home("alice")).unwrap();
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(
        bob.group_snapshot("club").unwrap(),
        alice.group_snapshot("club").unwrap()
    );
    assert_eq!(alice.group_snapshot("club").unwrap().members.len(), 2);
    let seen = carol.sync().await.unwrap();
    assert!(
        seen.iter().any(|e| e.text.contains("removed you")),
        "{seen:?}"
    );
    drop(alice);

    // 3. Killed after encrypting a message, before sending it.
    {
        let (mut engine, _) = raw_device(&env, "alice");
        engine
            .encrypt_text(&group, "written before the crash", None, now() * 1000)
            .unwrap();
    }
    // 4. Killed after the server stored a message, before recording that.
    {
        let (mut engine, transport) = raw_device(&env, "alice");
        let outgoing = engine
            .encrypt_text(&group, "stored before the crash", None, now() * 1000)
            .unwrap();
        transport
            .post_message(&group, &outgoing.request)
            .await
            .unwrap();
    }
    let alice = Client::open(&env.home("alice")).unwrap();
    alice.sync().await.unwrap();
    let seen = bob.sync().await.unwrap();
    assert!(failures(&seen).is_empty(), "{seen:?}");
    let mut got = texts(&seen);
    got.sort();
    assert_eq!(got, ["stored before the crash", "written before the crash"]);
    assert!(bob.sync().await.unwrap().is_empty());

    // The group still works both ways.
    bob.send_group("club", "all good?").await.unwrap();
    assert_eq!(texts(&alice.sync().await.unwrap()), ["all good?"]);
}
