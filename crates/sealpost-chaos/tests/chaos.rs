//! The chaos harness: a server and six client devices as separate processes; the server is
//! killed with SIGKILL and restarted at random moments, and client processes are killed in
//! the middle of sends and syncs. At the end every message a server acknowledged must be in
//! every recipient's history exactly once, in each sender's order, and nothing may have
//! failed to decrypt.
//!
//! Defaults (CI): 20 server kills and 20 client kills. `CHAOS_SERVER_KILLS`,
//! `CHAOS_CLIENT_KILLS` and `CHAOS_SECONDS` make longer runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use sealpost_core::{Client, HistoryEntry};

const NODE: &str = env!("CARGO_BIN_EXE_sealpost-chaos-node");
const USERS: [&str; 6] = ["ana", "ben", "cyd", "dov", "eve", "fay"];
/// 1:1 pairs; plus one group of everyone.
const PAIRS: [(usize, usize); 3] = [(0, 1), (2, 3), (4, 5)];
const GROUP: &str = "everyone";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn start_server(addr: &str, data: &Path) -> Child {
    Command::new(NODE)
        .args(["server", addr])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_until_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server did not come back");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Conversation {
    Direct(usize, usize),
    Group,
}

impl Conversation {
    fn members(&self) -> Vec<usize> {
        match self {
            Self::Direct(a, b) => vec![*a, *b],
            Self::Group => (0..USERS.len()).collect(),
        }
    }

    /// The name `history` takes on `user`'s device.
    fn name_for(&self, user: usize) -> String {
        match self {
            Self::Direct(a, b) => USERS[if user == *a { *b } else { *a }].to_owned(),
            Self::Group => GROUP.to_owned(),
        }
    }
}

#[derive(Debug)]
struct Sent {
    sender: usize,
    conversation: Conversation,
    text: String,
    acknowledged: bool,
}

#[test]
fn nothing_acknowledged_is_lost_under_server_and_client_kills() {
    let server_kill_target = env_number("CHAOS_SERVER_KILLS", 20) as usize;
    let client_kill_target = env_number("CHAOS_CLIENT_KILLS", 20) as usize;
    let deadline = Instant::now() + Duration::from_secs(env_number("CHAOS_SECONDS", 300));

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");
    let home = |user: usize| dir.path().join(USERS[user]);
    let server = Arc::new(Mutex::new(start_server(&addr, &data)));
    wait_until_listening(&addr);

    // Set up accounts and conversations without chaos.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut clients = Vec::new();
        for (i, name) in USERS.iter().enumerate() {
            clients.push(Client::register(&home(i), name, &url, 20).await.unwrap());
        }
        for (a, b) in PAIRS {
            clients[a].send_direct(USERS[b], "hello").await.unwrap();
        }
        let others: Vec<String> = USERS[1..].iter().map(|s| s.to_string()).collect();
        clients[0].create_group(GROUP, &others).await.unwrap();
        for client in &clients {
            client.sync().await.unwrap();
        }
    });

    // The server killer.
    let stop = Arc::new(AtomicBool::new(false));
    let server_kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (server, stop, kills, addr, data) = (
            server.clone(),
            stop.clone(),
            server_kills.clone(),
            addr.clone(),
            data.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = rand::thread_rng();
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(rng.gen_range(150..600)));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut child = server.lock().unwrap();
                child.kill().unwrap();
                child.wait().unwrap();
                kills.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..80)));
                *child = start_server(&addr, &data);
            }
        })
    };

    // The load, with client kills.
    let mut rng = rand::thread_rng();
    let mut sent: Vec<Sent> = Vec::new();
    let mut client_kills = 0usize;
    let mut errors: HashMap<String, usize> = HashMap::new();
    let conversations: Vec<Conversation> = PAIRS
        .iter()
        .map(|(a, b)| Conversation::Direct(*a, *b))
        .chain([Conversation::Group])
        .collect();
    while (server_kills.load(Ordering::SeqCst) < server_kill_target
        || client_kills < client_kill_target)
        && Instant::now() < deadline
    {
        let user = rng.gen_range(0..USERS.len());
        let mut command = Command::new(NODE);
        let mut message = None;
        if rng.gen_bool(0.7) {
            let options: Vec<&Conversation> = conversations
                .iter()
                .filter(|c| c.members().contains(&user))
                .collect();
            let conversation = options[rng.gen_range(0..options.len())].clone();
            let text = format!("m{} from {}", sent.len(), USERS[user]);
            command.arg("send").arg(home(user));
            match &conversation {
                Conversation::Group => command.args(["group", GROUP]),
                direct => command.args(["direct", &direct.name_for(user)]),
            };
            command.arg(&text);
            message = Some((conversation, text));
        } else {
            command.arg("sync").arg(home(user));
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let killed = if rng.gen_bool(0.35) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
            let running = child.try_wait().unwrap().is_none();
            if running {
                child.kill().unwrap();
                client_kills += 1;
            }
            running
        } else {
            false
        };
        let output = child.wait_with_output().unwrap();
        if !killed && !output.status.success() {
            let text = String::from_utf8_lossy(&output.stderr);
            let kind = text
                .split(": ")
                .nth(1)
                .unwrap_or("unknown")
                .chars()
                .take(60)
                .collect::<String>();
            *errors.entry(kind).or_default() += 1;
        }
        if let Some((conversation, text)) = message {
            sent.push(Sent {
                sender: user,
                conversation,
                text,
                acknowledged: !killed && output.status.success(),
            });
        }
    }
    stop.store(true, Ordering::SeqCst);
    killer.join().unwrap();
    wait_until_listening(&addr);

    // Let every device catch up (and resend whatever its outbox still holds).
    let histories: Vec<HashMap<Conversation, Vec<HistoryEntry>>> = runtime.block_on(async {
        let clients: Vec<Client> = (0..USERS.len())
            .map(|i| Client::open(&home(i)).unwrap())
            .collect();
        for _ in 0..3 {
            for client in &clients {
                client.sync().await.unwrap();
            }
        }
        for client in &clients {
            assert!(client.alerts().unwrap().is_empty(), "{:?}", client.alerts());
        }
        clients
            .iter()
            .enumerate()
            .map(|(user, client)| {
                conversations
                    .iter()
                    .filter(|c| c.members().contains(&user))
                    .map(|c| {
                        (
                            c.clone(),
                            client.history(&c.name_for(user), 1_000_000).unwrap(),
                        )
                    })
                    .collect()
            })
            .collect()
    });

    // Check: exactly once, per-sender order, nothing undecryptable.
    let mut lost = 0;
    let mut duplicates = 0;
    let mut undecryptable = 0;
    for (user, history) in histories.iter().enumerate() {
        for (conversation, entries) in history {
            undecryptable += entries
                .iter()
                .filter(|e| {
                    e.kind == "notice"
                        && (e.text.contains("could not be decrypted")
                            || e.text.contains("rejected"))
                })
                .count();
            let mut positions: HashMap<&str, usize> = HashMap::new();
            for (position, entry) in entries.iter().enumerate() {
                if entry.kind == "text" && positions.insert(entry.text.as_str(), position).is_some()
                {
                    duplicates += 1;
                }
            }
            let mut last_by_sender: HashMap<usize, usize> = HashMap::new();
            for message in sent.iter().filter(|m| &m.conversation == conversation) {
                match positions.get(message.text.as_str()) {
                    Some(&position) if message.acknowledged => {
                        let last = last_by_sender.entry(message.sender).or_insert(0);
                        assert!(
                            position >= *last,
                            "{} sees {:?} out of its sender's order",
                            USERS[user],
                            message.text
                        );
                        *last = position;
                    }
                    None if message.acknowledged => {
                        lost += 1;
                        eprintln!("LOST at {}: {:?}", USERS[user], message);
                    }
                    _ => {}
                }
            }
        }
    }
    let acknowledged = sent.iter().filter(|m| m.acknowledged).count();
    let report = format!(
        "chaos: server kills={}, client kills={client_kills}, messages sent={}, acknowledged={acknowledged}, lost={lost}, duplicates={duplicates}, undecryptable={undecryptable}; client errors: {errors:?}",
        server_kills.load(Ordering::SeqCst),
        sent.len()
    );
    println!("{report}");
    eprintln!("{report}");
    assert!(
        server_kills.load(Ordering::SeqCst) >= server_kill_target,
        "{report}"
    );
    assert!(client_kills >= client_kill_target, "{report}");
    assert!(acknowledged > 0, "{report}");
    assert_eq!((lost, duplicates, undecryptable), (0, 0, 0), "{report}");
    server.lock().unwrap().kill().unwrap();
}
