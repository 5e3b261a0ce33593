//! Safety numbers, verification, and what a changed account key does.

use std::time::Duration;

use sealpost_core::Client;

use crate::common::{Env, texts};

fn safety_number(env: &Env, who: &str, other: &str) -> serde_json::Value {
    let lines = env
        .cli(who, &["--json", "safety-number", other])
        .assert_ok()
        .json_lines();
    lines.into_iter().next().unwrap()
}

/// Deletes `name`'s account and registers the same username again: a new account key.
fn reregister(env: &Env, name: &str) {
    env.cli(name, &["account", "delete", "--yes"]).assert_ok();
    env.cli_register(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_numbers_match_on_both_sides_and_verify() {
    let env = Env::new().await;
    env.cli_register("alice");
    env.cli_register("bob");
    let at_alice = safety_number(&env, "alice", "bob");
    let at_bob = safety_number(&env, "bob", "alice");
    let number = at_alice["number"].as_str().unwrap().to_owned();
    assert_eq!(number.len(), 60);
    assert!(number.chars().all(|c| c.is_ascii_digit()));
    assert_eq!(at_bob["number"], at_alice["number"]);
    assert_eq!(at_alice["verified"], false);

    // The text form shows the digits in groups and a QR code.
    let text = env
        .cli("alice", &["safety-number", "bob"])
        .assert_ok()
        .stdout
        .clone();
    assert!(text.contains(&number[..5]));
    assert!(text.contains('█') || text.contains('▀'), "{text}");

    let mut wrong = number.clone().into_bytes();
    wrong[0] = if wrong[0] == b'1' { b'2' } else { b'1' };
    let wrong = String::from_utf8(wrong).unwrap();
    let out = env.cli("alice", &["verify", "bob", &wrong]);
    assert!(!out.success);
    assert!(out.stderr.contains("does NOT match"), "{}", out.stderr);
    assert_eq!(safety_number(&env, "alice", "bob")["verified"], false);

    // Spaces, as read aloud, are fine.
    let spaced: String = number
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    env.cli("alice", &["verify", "bob", &spaced]).assert_ok();
    assert_eq!(safety_number(&env, "alice", "bob")["verified"], true);

    // A new key for bob gives a different number.
    reregister(&env, "bob");
    let after = safety_number(&env, "alice", "bob");
    assert_ne!(after["number"], at_alice["number"]);
    assert_eq!(after["key_changed"], true);
    assert_eq!(
        safety_number(&env, "bob", "alice")["number"],
        after["number"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_contact_key_change_blocks_sending_until_accepted() {
    let env = Env::new().await;
    env.cli_register("alice");
    env.cli_register("bob");
    env.cli("alice", &["send", "bob", "hi bob"]).assert_ok();
    env.cli("bob", &["sync"]).assert_ok();
    let number = safety_number(&env, "alice", "bob")["number"]
        .as_str()
        .unwrap()
        .to_owned();
    env.cli("alice", &["verify", "bob", &number]).assert_ok();

    reregister(&env, "bob");

    let out = env.cli("alice", &["send", "bob", "are you still you?"]);
    assert!(
        !out.success,
        "sending to a changed verified key went through"
    );
    assert!(
        out.stderr.contains("safety number changed"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1);
    let notices = env
        .cli("alice", &["--json", "sync"])
        .assert_ok()
        .json_lines();
    assert!(
        notices.iter().any(|l| l["kind"] == "notice"
            && l["text"]
                .as_str()
                .unwrap()
                .starts_with("WARNING: bob's safety number changed")),
        "{notices:?}"
    );
    // Still blocked on a second try, and nothing reached the new bob.
    assert!(!env.cli("alice", &["send", "bob", "again?"]).success);
    let at_bob = env.cli("bob", &["--json", "sync"]).assert_ok().json_lines();
    assert!(at_bob.iter().all(|l| l["kind"] != "text"), "{at_bob:?}");

    env.cli("alice", &["verify", "bob", "--accept-new-key"])
        .assert_ok();
    assert_eq!(safety_number(&env, "alice", "bob")["verified"], false);
    env.cli("alice", &["send", "bob", "welcome back"])
        .assert_ok();
    let at_bob = env.cli("bob", &["--json", "sync"]).assert_ok().json_lines();
    let texts: Vec<&str> = at_bob
        .iter()
        .filter(|l| l["kind"] == "text")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["welcome back"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_contact_key_change_is_a_notice_in_sync_and_history() {
    let env = Env::new().await;
    env.cli_register("alice");
    env.cli_register("bob");
    env.cli("alice", &["send", "bob", "hi bob"]).assert_ok();
    env.cli("bob", &["sync"]).assert_ok();

    reregister(&env, "bob");

    env.cli("alice", &["send", "bob", "still there?"])
        .assert_ok();
    let lines = env
        .cli("alice", &["--json", "sync"])
        .assert_ok()
        .json_lines();
    assert!(
        lines.iter().any(|l| l["kind"] == "notice"
            && l["text"]
                .as_str()
                .unwrap()
                .starts_with("bob's safety number changed")),
        "{lines:?}"
    );
    let history = env
        .cli("alice", &["--json", "history", "bob"])
        .assert_ok()
        .json_lines();
    assert!(
        history.iter().any(|l| l["text"]
            .as_str()
            .unwrap()
            .starts_with("bob's safety number changed")),
        "{history:?}"
    );
    let at_bob = env.cli("bob", &["--json", "sync"]).assert_ok().json_lines();
    assert!(
        at_bob.iter().any(|l| l["text"] == "still there?"),
        "{at_bob:?}"
    );
}

/// A name deleted and registered again is a new account that the key directory has not
/// published yet: the server answers `kt_pending` rather than the old account's entry, so
/// a contact's send waits for the new epoch and reaches the new account, not the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_registered_again_waits_for_its_epoch() {
    // Epochs only when the test publishes them.
    let env = Env::with_config(|c| c.kt_interval = Duration::from_secs(3600)).await;
    let kt = &env.server.state().kt;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    kt.publish_pending().await.unwrap();
    alice.send_direct("bob", "hi bob").await.unwrap();
    assert_eq!(texts(&bob.sync().await.unwrap()), ["hi bob"]);

    bob.delete_account().await.unwrap();
    let new_bob = Client::register(&env.home("new-bob"), "bob", &env.server.url(), 5)
        .await
        .unwrap();
    let sending = alice.send_direct("bob", "is this you?");
    let publishing = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        kt.publish_pending().await.unwrap()
    };
    let (sent, published) = tokio::join!(sending, publishing);
    assert!(published.is_some());
    sent.unwrap();
    assert_eq!(texts(&new_bob.sync().await.unwrap()), ["is this you?"]);
}
