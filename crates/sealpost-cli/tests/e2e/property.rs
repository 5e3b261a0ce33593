//! Property test: any interleaving of sends, syncs, adds and removes among 3–4 users
//! leaves every remaining member able to decrypt every message sent after they joined.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sealpost_core::Client;

use crate::common::{Env, failures};

const USERS: [&str; 4] = ["ann", "ben", "cat", "dan"];

#[derive(Debug, Clone)]
enum Op {
    Send(usize),
    Sync(usize),
    Add(usize, usize),
    Remove(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize).prop_map(Op::Send),
        3 => (0..4usize).prop_map(Op::Sync),
        2 => (0..4usize, 0..4usize).prop_map(|(a, b)| Op::Add(a, b)),
        1 => (0..4usize, 0..4usize).prop_map(|(a, b)| Op::Remove(a, b)),
    ]
}

/// Runs one interleaving and checks the property.
async fn run(users: usize, ops: Vec<Op>) {
    let env = Env::new().await;
    let mut clients: Vec<Client> = Vec::new();
    for name in &USERS[..users] {
        clients.push(env.client(name).await);
    }
    // ann starts the group with ben; the rest join through Add ops.
    clients[0].create_group("g", &["ben".into()]).await.unwrap();
    let mut members: BTreeMap<usize, usize> = BTreeMap::from([(0, 0), (1, 0)]);
    // Every message: (text, sender, step).
    let mut sent: Vec<(String, usize, usize)> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        let step = step + 1;
        match op {
            Op::Send(u) if u < users && members.contains_key(&u) => {
                let text = format!("m{step} from {}", USERS[u]);
                clients[u].send_group("g", &text).await.unwrap();
                sent.push((text, u, step));
            }
            Op::Sync(u) if u < users => {
                clients[u].sync().await.unwrap();
            }
            Op::Add(a, b)
                if a < users
                    && b < users
                    && members.contains_key(&a)
                    && !members.contains_key(&b) =>
            {
                clients[a].add_member("g", USERS[b]).await.unwrap();
                members.insert(b, step);
            }
            Op::Remove(a, b)
                if a < users
                    && b < users
                    && a != b
                    && members.contains_key(&a)
                    && members.contains_key(&b) =>
            {
                clients[a].remove_member("g", USERS[b]).await.unwrap();
                members.remove(&b);
            }
            _ => {}
        }
    }
    for (&member, &joined) in &members {
        let client = &clients[member];
        client.sync().await.unwrap();
        let history = client.history("g", 10_000).unwrap();
        assert!(
            failures(&history).is_empty(),
            "{}: {history:?}",
            USERS[member]
        );
        for (text, _, step) in sent
            .iter()
            .filter(|(_, s, step)| *step > joined && *s != member)
        {
            assert!(
                history.iter().any(|e| &e.text == text),
                "{} (joined at step {joined}) misses {text:?} sent at step {step}",
                USERS[member]
            );
        }
    }
    // Every remaining member agrees on the group state.
    let snapshots: Vec<_> = members
        .keys()
        .map(|&m| clients[m].group_snapshot("g").unwrap())
        .collect();
    for snapshot in &snapshots {
        assert_eq!(snapshot, &snapshots[0]);
        assert_eq!(snapshot.members.len(), members.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // More with PROPTEST_CASES=N (e.g. a nightly soak).
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        max_shrink_iters: 20,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn members_decrypt_everything_sent_after_they_joined(
        users in 3..=4usize,
        ops in proptest::collection::vec(op(), 4..14),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(users, ops));
    }
}
