//! The malicious-server suite: for each attack of the threat model, the server (built with
//! the `adversarial` feature) lies in one specific way, and the test shows that clients
//! detect it. Each test fails if the detection is removed.

use sealpost_core::CoreError;
use sealpost_core::adversarial::impostor_device;
use sealpost_proto::api::EnvelopeKind;
use sealpost_proto::kt::DirectoryEntry;
use sealpost_server::store::{DeviceRecord, SequenceRequest};
use uuid::Uuid;

use crate::common::{Env, failures, peek_application, texts};

fn alerts_contain(alerts: &[sealpost_core::HistoryEntry], needle: &str) -> bool {
    alerts.iter().any(|a| a.text.contains(needle))
}

fn device_id(client: &sealpost_core::Client) -> Uuid {
    client.whoami().unwrap().device_id.parse().unwrap()
}

/// Attack 1: the server hands out a substituted key or device for a user without
/// publishing it. The client refuses to encrypt to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn substituted_keys_and_devices_are_refused() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    env.client("carol").await;
    alice.send_direct("bob", "hello").await.unwrap();
    bob.sync().await.unwrap();

    let (fake_key, fake_cert, _) = impostor_device("bob").unwrap();
    env.server
        .state()
        .tamper
        .lock()
        .unwrap()
        .substitute_devices
        .insert(
            "bob".into(),
            (fake_key, vec![(fake_cert.device_id, fake_cert.encode())]),
        );
    let refused = alice.send_direct("bob", "are you bob?").await.unwrap_err();
    assert!(matches!(refused, CoreError::Transparency(_)), "{refused}");
    assert!(refused.to_string().contains("key directory"), "{refused}");
    env.server
        .state()
        .tamper
        .lock()
        .unwrap()
        .substitute_devices
        .clear();
    assert!(texts(&bob.sync().await.unwrap()).is_empty());

    // A KeyPackage for a device the directory does not list is refused too.
    let (_, cert, package) = impostor_device("carol").unwrap();
    env.server
        .state()
        .tamper
        .lock()
        .unwrap()
        .substitute_claims
        .insert("carol".into(), (cert.device_id, cert.encode(), package));
    let refused = alice
        .create_group("club", &["carol".into()])
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("not in the key directory"),
        "{refused}"
    );
}

/// Attack 2: the server publishes a ghost device for bob (under an account key it made
/// up, since it cannot sign with bob's). Bob's self-monitoring alerts; alice sees bob's
/// key change and the ghost in the conversation's roster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_ghost_device_is_seen_by_everyone() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.send_direct("bob", "hello").await.unwrap();
    assert!(
        bob.sync()
            .await
            .unwrap()
            .iter()
            .all(|e| !e.text.starts_with("ALERT"))
    );
    let real_bob = device_id(&bob);

    let (ghost_key, ghost_cert, ghost_package) = impostor_device("bob").unwrap();
    let state = env.server.state();
    state
        .store
        .add_device(
            &DeviceRecord {
                device_id: ghost_cert.device_id,
                username: "bob".into(),
                signature_key: ghost_cert.device_key.to_vec(),
                certificate: ghost_cert.encode(),
                created_day: 0,
                name_sealed: None,
            },
            16,
        )
        .await
        .unwrap();
    state
        .store
        .add_key_packages(ghost_cert.device_id, &[], Some(&ghost_package), 10)
        .await
        .unwrap();
    state
        .kt
        .publish_forged(
            "bob",
            &DirectoryEntry::new(ghost_key, vec![(ghost_cert.device_id, ghost_cert.encode())]),
        )
        .await
        .unwrap();

    // Bob's device notices at its next sync.
    bob.sync().await.unwrap();
    let alerts = bob.alerts().unwrap();
    assert!(
        alerts_contain(
            &alerts,
            "an account key that is not yours was published for your account"
        ),
        "{alerts:?}"
    );
    assert!(
        alerts_contain(&alerts, "a device you did not add"),
        "{alerts:?}"
    );

    // Alice is told, and the ghost is visible in the roster, never silent.
    alice.send_direct("bob", "who is there?").await.unwrap();
    let seen = alice.sync().await.unwrap();
    assert!(
        seen.iter()
            .any(|e| e.text.starts_with("bob's safety number changed")),
        "{seen:?}"
    );
    let roster = alice.group_snapshot("bob").unwrap().members;
    assert!(
        roster
            .iter()
            .any(|m| m.ends_with(&ghost_cert.device_id.to_string())),
        "{roster:?}"
    );
    assert!(
        !roster.iter().any(|m| m.ends_with(&real_bob.to_string())),
        "{roster:?}"
    );
}

/// Attack 3: the server forges a commit (here: it alters a member's commit before
/// delivering it). Every other member rejects it and alerts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_commit_is_rejected_by_every_member() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    let carol = env.client("carol").await;
    env.client("dave").await;
    alice
        .create_group("club", &["bob".into(), "carol".into()])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let before = bob.group_snapshot("club").unwrap();

    env.server.state().tamper.lock().unwrap().corrupt_commits = true;
    alice.add_member("club", "dave").await.unwrap();
    for (name, member) in [("bob", &bob), ("carol", &carol)] {
        let seen = member.sync().await.unwrap();
        let rejected = failures(&seen);
        assert_eq!(rejected.len(), 1, "{name}: {seen:?}");
        assert!(
            rejected[0].starts_with("ALERT: a group change was rejected"),
            "{rejected:?}"
        );
        assert_eq!(member.group_snapshot("club").unwrap(), before, "{name}");
    }
}

/// Attack 4: split view. The server shows bob a different root for an epoch than it
/// showed alice; alice's messages carry her root, so bob catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_view_is_caught_through_root_gossip() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.send_direct("bob", "hello").await.unwrap();
    bob.sync().await.unwrap();

    // A new epoch that alice sees and bob has not seen yet.
    env.client("carol").await;
    let epoch = loop {
        let root = env.server.state().kt.root().await.unwrap();
        if env
            .server
            .state()
            .store
            .kt_pending()
            .await
            .unwrap()
            .is_empty()
        {
            break root.epoch;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    alice.sync().await.unwrap();
    env.server
        .state()
        .tamper
        .lock()
        .unwrap()
        .forged_roots
        .insert(epoch, vec![0x42; 32]);
    alice
        .send_direct("bob", "what root do you see?")
        .await
        .unwrap();

    let seen = bob.sync().await.unwrap();
    assert_eq!(texts(&seen), ["what root do you see?"]);
    let alerts = bob.alerts().unwrap();
    assert!(
        alerts_contain(&alerts, "was shown a different key directory"),
        "{alerts:?}"
    );
}

/// Attack 5: rollback. The server serves an older epoch than one the client has seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_to_an_older_epoch_is_refused() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    // Bob in a later epoch than alice's (registered together they may share one).
    while !env
        .server
        .state()
        .store
        .kt_is_published("alice")
        .await
        .unwrap()
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    env.client("bob").await;
    alice.send_direct("bob", "hello").await.unwrap();
    alice.sync().await.unwrap();
    let seen = env.server.state().kt.root().await.unwrap().epoch;
    assert!(seen >= 2, "epoch {seen}");
    env.server.state().tamper.lock().unwrap().rollback_to = Some(seen - 1);
    let refused = alice.sync().await.unwrap_err();
    assert!(matches!(refused, CoreError::Transparency(_)), "{refused}");
    assert!(refused.to_string().contains("rollback"), "{refused}");
    env.server.state().tamper.lock().unwrap().rollback_to = None;
    alice.sync().await.unwrap();
}

/// Attack 6: replayed, reordered, altered or misrouted messages are rejected or shown
/// with their authenticated sender, never as authentic from someone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_reordered_and_altered_messages_are_caught() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    let carol = env.client("carol").await;
    let club = alice
        .create_group("club", &["bob".into(), "carol".into()])
        .await
        .unwrap()
        .group_id;
    alice.send_direct("bob", "a 1:1 too").await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let state = env.server.state();

    // Replay: the server delivers a message again, as if new.
    bob.send_group("club", "one").await.unwrap();
    let original = peek_application(&alice).await;
    assert_eq!(texts(&alice.sync().await.unwrap()), ["one"]);
    let epoch = state.store.group(&club).await.unwrap().unwrap().epoch;
    let replay = |group_id: &str, payload: &[u8], epoch: u64| SequenceRequest {
        group_id: group_id.to_owned(),
        sender_device: device_id(&bob),
        message_id: Uuid::new_v4(),
        kind: EnvelopeKind::Application,
        epoch,
        mailbox_quota: u64::MAX,
        payload: payload.to_vec(),
        welcome: None,
        added_devices: Vec::new(),
        removed_devices: Vec::new(),
        leaving_devices: Vec::new(),
        now: 0,
        expires_at: i64::MAX,
    };
    state
        .store
        .sequence(replay(&club, original.payload.as_ref(), epoch))
        .await
        .unwrap();
    let seen = alice.sync().await.unwrap();
    assert!(texts(&seen).is_empty(), "a replay was shown: {seen:?}");
    assert_eq!(failures(&seen).len(), 1, "{seen:?}");

    // Misrouting: bob's group message delivered as if it were in the 1:1.
    let direct = alice
        .conversations()
        .unwrap()
        .into_iter()
        .find(|c| c.name == "bob")
        .unwrap();
    let direct_epoch = state
        .store
        .group(&direct.group_id)
        .await
        .unwrap()
        .unwrap()
        .epoch;
    state
        .store
        .sequence(replay(
            &direct.group_id,
            original.payload.as_ref(),
            direct_epoch,
        ))
        .await
        .unwrap();
    let seen = alice.sync().await.unwrap();
    assert!(
        texts(&seen).is_empty(),
        "a misrouted message was shown: {seen:?}"
    );
    assert_eq!(failures(&seen).len(), 1, "{seen:?}");

    // Reordering: shown, each with its real sender.
    state.tamper.lock().unwrap().reverse_mailbox_for = Some(device_id(&alice));
    bob.send_group("club", "two").await.unwrap();
    carol.send_group("club", "three").await.unwrap();
    let seen = alice.sync().await.unwrap();
    assert!(failures(&seen).is_empty(), "{seen:?}");
    let shown: Vec<(String, String)> = seen
        .iter()
        .filter(|e| e.kind == "text")
        .map(|e| (e.sender.clone(), e.text.clone()))
        .collect();
    assert_eq!(
        shown,
        [
            ("carol".to_owned(), "three".to_owned()),
            ("bob".to_owned(), "two".to_owned())
        ]
    );
    state.tamper.lock().unwrap().reverse_mailbox_for = None;

    // Altered bytes (e.g. a rewritten sender): rejected, attributed to nobody.
    state.tamper.lock().unwrap().corrupt_application_for = Some(device_id(&alice));
    bob.send_group("club", "four").await.unwrap();
    let seen = alice.sync().await.unwrap();
    assert!(texts(&seen).is_empty(), "{seen:?}");
    assert_eq!(failures(&seen).len(), 1, "{seen:?}");
    assert_eq!(texts(&carol.sync().await.unwrap()), ["one", "two", "four"]);
}

/// `sealpost audit` verifies append-only proofs over every epoch, and fails loudly when
/// the server serves a root that does not follow from the previous one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verifies_the_directory_and_catches_a_forged_root() {
    let env = Env::new().await;
    env.cli_register("alice");
    env.cli_register("bob");
    env.cli("alice", &["send", "bob", "hello"]).assert_ok();
    env.cli_register("carol");
    // Wait until carol is published, so there are at least three epochs.
    while !env
        .server
        .state()
        .store
        .kt_pending()
        .await
        .unwrap()
        .is_empty()
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let current = env.server.state().kt.root().await.unwrap().epoch;
    assert!(current >= 3, "epoch {current}");

    let summary = env
        .cli("alice", &["--json", "audit"])
        .assert_ok()
        .json_lines();
    assert_eq!(summary[0]["from"], 0);
    assert_eq!(summary[0]["to"], current);
    let text = env
        .cli("alice", &["audit", "--from", "1"])
        .assert_ok()
        .stdout
        .clone();
    assert!(text.contains("append-only"), "{text}");
    let out = env.cli("alice", &["audit", "--from", "5", "--to", "2"]);
    assert!(
        !out.success && out.stderr.contains("nothing to audit"),
        "{}",
        out.stderr
    );

    // A root that was swapped after the fact breaks the chain of proofs.
    env.server
        .state()
        .tamper
        .lock()
        .unwrap()
        .forged_roots
        .insert(current - 1, vec![0x13; 32]);
    let out = env.cli("bob", &["audit"]);
    assert!(!out.success, "a forged root passed the audit");
    assert!(
        out.stderr.contains("key transparency check failed"),
        "{}",
        out.stderr
    );
}
