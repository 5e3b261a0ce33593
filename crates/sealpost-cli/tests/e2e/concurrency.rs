//! Commits racing for the same epoch: one wins, the others retry, everyone converges.

use crate::common::{Env, failures, texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_commits_converge_on_one_epoch() {
    let env = Env::new().await;
    let founders = ["alice", "bob", "carol", "dave"];
    let mut clients = Vec::new();
    for name in founders {
        clients.push(env.client(name).await);
    }
    let others: Vec<String> = founders[1..].iter().map(|s| s.to_string()).collect();
    clients[0].create_group("race", &others).await.unwrap();
    for client in &clients[1..] {
        client.sync().await.unwrap();
    }

    // Rounds of concurrent adds, until at least one commit lost a race and was retried.
    let mut added = Vec::new();
    for round in 0..5 {
        let newcomers: Vec<String> = (0..clients.len())
            .map(|i| format!("new{round}x{i}"))
            .collect();
        for name in &newcomers {
            env.client(name).await;
        }
        let adds = clients
            .iter()
            .zip(&newcomers)
            .map(|(client, user)| client.add_member("race", user));
        for result in futures_util::future::join_all(adds).await {
            result.unwrap();
        }
        added.extend(newcomers);
        if clients.iter().map(|c| c.conflicts_seen()).sum::<usize>() > 0 {
            break;
        }
    }
    assert!(
        clients.iter().map(|c| c.conflicts_seen()).sum::<usize>() > 0,
        "no commit ever lost a race"
    );

    for client in &clients {
        client.sync().await.unwrap();
    }
    let snapshots: Vec<_> = clients
        .iter()
        .map(|c| c.group_snapshot("race").unwrap())
        .collect();
    for snapshot in &snapshots[1..] {
        assert_eq!(snapshot, &snapshots[0]);
    }
    assert_eq!(snapshots[0].members.len(), founders.len() + added.len());

    // Messages sent just after decrypt everywhere.
    for (client, name) in clients.iter().zip(founders) {
        client
            .send_group("race", &format!("from {name}"))
            .await
            .unwrap();
    }
    for (client, name) in clients.iter().zip(founders) {
        let seen = client.sync().await.unwrap();
        assert!(failures(&seen).is_empty(), "{name}: {seen:?}");
        let mut got = texts(&seen);
        got.sort();
        let mut want: Vec<String> = founders
            .iter()
            .filter(|n| **n != name)
            .map(|n| format!("from {n}"))
            .collect();
        want.sort();
        assert_eq!(got, want, "{name}");
    }
}
