//! The server never holds plaintext: a random marker sent in messages appears in no file
//! of its data directory (database, WAL) nor in its log.

use rand::RngCore as _;

use crate::common::{Env, log_path, texts};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_at_rest_on_the_server() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    let carol = env.client("carol").await;
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    let marker = format!("MARKER{}", hex_string(&raw));

    alice
        .send_direct("bob", &format!("1:1 {marker}"))
        .await
        .unwrap();
    alice
        .create_group("secret club", &["bob".into(), "carol".into()])
        .await
        .unwrap();
    alice
        .send_group("secret club", &format!("group {marker}"))
        .await
        .unwrap();
    // Carol stays offline: her copy waits in the server's mailbox while we look.
    assert!(texts(&bob.sync().await.unwrap()).len() == 2);

    let mut checked = 0;
    for entry in walk(env.server.data_dir()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !contains(&bytes, marker.as_bytes()),
            "plaintext marker found in {}",
            entry.display()
        );
        assert!(
            !contains(&bytes, b"secret club"),
            "group name in {}",
            entry.display()
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected the database and its WAL, found {checked} files"
    );
    let log = std::fs::read(log_path()).unwrap();
    assert!(!log.is_empty());
    assert!(
        !contains(&log, marker.as_bytes()),
        "plaintext marker found in the log"
    );
    // The only address in the log is the server's own listening address.
    for line in String::from_utf8_lossy(&log).lines() {
        assert!(
            line.contains("listening") || !line.contains("127.0.0.1"),
            "an address was logged: {line}"
        );
    }

    // The marker is really in the messages: carol decrypts it.
    let seen = texts(&carol.sync().await.unwrap());
    assert_eq!(seen, [format!("group {marker}")]);
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
