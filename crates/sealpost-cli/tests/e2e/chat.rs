//! 1:1 and group conversations through the CLI, and removal through the library.

use crate::common::{Env, copy_dir, failures, peek_application, texts};
use sealpost_core::Client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_in_both_directions_via_cli() {
    let env = Env::new().await;
    env.cli_register("alice");
    env.cli_register("bob");

    env.cli("alice", &["send", "bob", "hello bob"]).assert_ok();
    let lines = env.cli("bob", &["--json", "sync"]).assert_ok().json_lines();
    let texts: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "text").collect();
    assert_eq!(texts.len(), 1, "{lines:?}");
    assert_eq!(texts[0]["text"], "hello bob");
    assert_eq!(texts[0]["sender"], "alice");
    assert_eq!(texts[0]["conversation"], "alice");
    for field in ["id", "conversation", "sender", "text", "sent_at"] {
        assert!(!texts[0][field].is_null(), "missing {field}");
    }

    env.cli("bob", &["send", "alice", "hi alice"]).assert_ok();
    let lines = env
        .cli("alice", &["--json", "sync"])
        .assert_ok()
        .json_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["text"], "hi alice");
    assert_eq!(lines[0]["sender"], "bob");

    // Nothing is shown twice.
    assert!(
        env.cli("bob", &["--json", "sync"])
            .assert_ok()
            .json_lines()
            .is_empty()
    );

    let history = env
        .cli("alice", &["--json", "history", "bob"])
        .assert_ok()
        .json_lines();
    let said: Vec<&str> = history
        .iter()
        .filter(|l| l["kind"] == "text")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(said, ["hello bob", "hi alice"]);

    let conversations = env
        .cli("bob", &["--json", "conversations"])
        .assert_ok()
        .json_lines();
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0]["name"], "alice");
    assert_eq!(conversations[0]["kind"], "direct");

    let me = env
        .cli("bob", &["--json", "whoami"])
        .assert_ok()
        .json_lines();
    assert_eq!(me[0]["username"], "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_three_via_cli() {
    let env = Env::new().await;
    for name in ["alice", "bob", "carol"] {
        env.cli_register(name);
    }
    env.cli(
        "alice",
        &["group", "create", "club", "--members", "bob,carol"],
    )
    .assert_ok();
    for name in ["bob", "carol"] {
        let lines = env.cli(name, &["--json", "sync"]).assert_ok().json_lines();
        assert!(
            lines
                .iter()
                .any(|l| l["kind"] == "notice" && l["conversation"] == "club"),
            "{name}: {lines:?}"
        );
    }
    for name in ["alice", "bob", "carol"] {
        env.cli(
            name,
            &["send", "--group", "club", &format!("{name} says hi")],
        )
        .assert_ok();
    }
    for name in ["alice", "bob", "carol"] {
        env.cli(name, &["sync"]).assert_ok();
        let history = env
            .cli(name, &["--json", "history", "club"])
            .assert_ok()
            .json_lines();
        let mut said: Vec<String> = history
            .iter()
            .filter(|l| l["kind"] == "text")
            .map(|l| l["text"].as_str().unwrap().to_owned())
            .collect();
        said.sort();
        assert_eq!(
            said,
            ["alice says hi", "bob says hi", "carol says hi"],
            "{name}"
        );
    }
    let members = env
        .cli("carol", &["--json", "group", "members", "club"])
        .assert_ok()
        .json_lines();
    let mut names: Vec<&str> = members
        .iter()
        .map(|m| m["username"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["alice", "bob", "carol"]);

    // Leaving: bob leaves, the others complete the removal and stop sending to him.
    env.cli("bob", &["group", "leave", "club"]).assert_ok();
    env.cli("alice", &["sync"]).assert_ok();
    env.cli("alice", &["send", "--group", "club", "bob is gone"])
        .assert_ok();
    let carol = env
        .cli("carol", &["--json", "sync"])
        .assert_ok()
        .json_lines();
    assert!(carol.iter().any(|l| l["text"] == "bob left"), "{carol:?}");
    assert!(
        carol.iter().any(|l| l["text"] == "bob is gone"),
        "{carol:?}"
    );
    let bob = env.cli("bob", &["--json", "sync"]).assert_ok().json_lines();
    assert!(bob.iter().all(|l| l["text"] != "bob is gone"), "{bob:?}");
    let members = env
        .cli("alice", &["--json", "group", "members", "club"])
        .assert_ok()
        .json_lines();
    assert_eq!(members.len(), 2, "{members:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_member_receives_nothing_and_cannot_decrypt_later_messages() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    let carol = env.client("carol").await;
    alice
        .create_group("club", &["bob".into(), "carol".into()])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    bob.send_group("club", "before removal").await.unwrap();
    assert_eq!(texts(&carol.sync().await.unwrap()), ["before removal"]);

    // Keep a copy of carol's device as it is now, with every key she holds.
    drop(carol);
    let snapshot = env.home("carol-snapshot");
    copy_dir(&env.home("carol"), &snapshot);

    alice.remove_member("club", "carol").await.unwrap();
    bob.send_group("club", "after removal").await.unwrap();

    // Carol learns she was removed and receives nothing later.
    let carol = Client::open(&env.home("carol")).unwrap();
    let seen = carol.sync().await.unwrap();
    assert!(texts(&seen).is_empty(), "{seen:?}");
    assert!(
        seen.iter().any(|e| e.text.contains("removed you")),
        "{seen:?}"
    );
    assert!(carol.send_group("club", "still here?").await.is_err());

    // Fed the raw later ciphertext, her keys from before the removal do not decrypt it.
    let raw = peek_application(&alice).await;
    let old_carol = Client::open(&snapshot).unwrap();
    let result = old_carol.process_raw(&raw).unwrap();
    assert!(texts(&result).is_empty(), "{result:?}");
    assert_eq!(failures(&result).len(), 1, "{result:?}");

    // The remaining members still talk (alice already processed the first message while
    // removing carol; sync shows both, once each).
    assert_eq!(
        texts(&alice.sync().await.unwrap()),
        ["before removal", "after removal"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_failures_print_one_clear_line_and_exit_nonzero() {
    let env = Env::new().await;
    env.cli_register("alice");
    env.cli_register("bob");
    env.cli("alice", &["group", "create", "club", "--members", "bob"])
        .assert_ok();

    let url = env.server.url();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("alice", vec!["send", "nobody", "hi"], "no user named"),
        ("alice", vec!["send", "bob", ""], "empty"),
        (
            "alice",
            vec!["group", "create", "club", "--members", "bob"],
            "already exists",
        ),
        (
            "alice",
            vec!["group", "remove", "club", "carol"],
            "not a member",
        ),
        (
            "alice",
            vec!["group", "add", "club", "bob"],
            "already a member",
        ),
        (
            "alice",
            vec!["send", "--group", "nope", "hi"],
            "no conversation named",
        ),
        ("alice", vec!["history", "nope"], "no conversation named"),
        ("nobody-home", vec!["sync"], "sealpost register"),
        (
            "alice",
            vec!["register", "alice2", "--server", "http://127.0.0.1:9"],
            "already has an account",
        ),
        (
            "fresh",
            vec!["register", "carol", "--server", "http://127.0.0.1:9"],
            "cannot reach the server",
        ),
        (
            "fresh2",
            vec!["register", "bob", "--server", &url],
            "already taken",
        ),
        (
            "fresh3",
            vec!["register", "Not Valid", "--server", &url],
            "username",
        ),
    ];
    for (who, args, expected) in cases {
        let out = env.cli(who, &args);
        assert!(!out.success, "{args:?} succeeded: {}", out.stdout);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", out.stderr);
        assert!(lines[0].starts_with("error: "), "{args:?}: {}", out.stderr);
        assert!(lines[0].contains(expected), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{args:?}");
    }
    // Under --json, the error is a JSON object with a code.
    let out = env.cli("alice", &["--json", "send", "nobody", "hi"]);
    let error: serde_json::Value = serde_json::from_str(out.stderr.trim()).unwrap();
    assert_eq!(error["error"]["code"], "invalid_input");
}
