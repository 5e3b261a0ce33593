//! The server under test: a `sealpost-server` child process on a loopback port, pinned to
//! chosen CPUs, with its CPU time and resident memory read from `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Linux reports process CPU time in clock ticks of `USER_HZ`, which is 100 on every
/// architecture the kernel's ABI fixes it for (x86_64 included).
const USER_HZ: f64 = 100.0;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The `sealpost-server` binary.
    pub binary: PathBuf,
    /// CPUs to pin the server to (`taskset -c` syntax), if any.
    pub cpus: Option<String>,
    /// Milliseconds between key-directory epochs (short, so that setup is quick).
    pub kt_interval_ms: u64,
}

impl ServerOptions {
    /// The server binary next to this one (both built by the same `cargo build`).
    pub fn default_binary() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("sealpost-server")))
            .unwrap_or_else(|| PathBuf::from("sealpost-server"))
    }
}

/// A running server; killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub url: String,
    data: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free loopback port")?;
    Ok(listener.local_addr()?.port())
}

impl ServerProcess {
    pub async fn start(options: &ServerOptions) -> anyhow::Result<Self> {
        if !options.binary.exists() {
            bail!(
                "no server binary at {} (build it with `cargo build --release -p sealpost-server`)",
                options.binary.display()
            );
        }
        let data = tempfile::Builder::new()
            .prefix("sealpost-bench-server")
            .tempdir()?;
        let port = free_port()?;
        let mut command = match &options.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&options.binary);
                c
            }
            None => Command::new(&options.binary),
        };
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data.path())
            .arg("--kt-interval-ms")
            .arg(options.kt_interval_ms.to_string())
            // A load test is many clients from one address: lift the abuse limits.
            .env("SEALPOST_IP_RATE", "100000000")
            .env("SEALPOST_IP_BURST", "100000000")
            .env("SEALPOST_ACCOUNT_RATE", "100000000")
            .env("SEALPOST_ACCOUNT_BURST", "100000000")
            .env("SEALPOST_CLAIMS_PER_MINUTE", "100000000")
            .env("SEALPOST_CLAIMS_BURST", "100000000")
            .env("SEALPOST_SOCKETS_PER_ACCOUNT", "100000")
            .env("SEALPOST_MAILBOX_QUOTA", "10000000")
            .env("SEALPOST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", options.binary.display()))?;
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            data,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(response) = http.get(format!("{}/readyz", self.url)).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the server did not become ready within 30 s")
    }

    /// The server's SQLite database file (the name `sealpost-server` gives it in its data
    /// directory, `Config::database_path`).
    pub fn database(&self) -> PathBuf {
        self.data.path().join("sealpost.db")
    }

    /// The server's process id (the binary, also when started through `taskset`, which
    /// execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds the server has used so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(&format!("/proc/{}/stat", self.pid()))
    }

    /// User + system CPU seconds of the server's threads so far, by what each thread is
    /// for ([`ThreadRole`]). A thread that ended before this reading is not counted.
    pub fn thread_cpu_seconds(&self) -> anyhow::Result<ThreadCpu> {
        let tasks = format!("/proc/{}/task", self.pid());
        thread_cpu_of(Path::new(&tasks))
    }

    /// The group-commit writer's counters, from the server's `/metrics`.
    pub async fn writer_counters(&self) -> anyhow::Result<WriterCounters> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await?
            .error_for_status()?
            .text()
            .await?;
        let found = |name: &str| -> anyhow::Result<Option<f64>> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .map(|value| {
                    value
                        .trim()
                        .parse::<f64>()
                        .with_context(|| format!("malformed {name} in /metrics"))
                })
                .transpose()
        };
        let value = |name: &str| -> anyhow::Result<u64> {
            Ok(found(name)?.with_context(|| format!("no {name} in /metrics"))? as u64)
        };
        Ok(WriterCounters {
            transactions: value("sealpost_write_batches_total")?,
            requests: value("sealpost_batched_requests_total")?,
            wal_flushes: value("sealpost_wal_flushes_total")?,
            // Servers before the write turns (an older `--server-binary`) have none.
            turn_waits: found("sealpost_writer_turn_waits_total")?.map(|v| v as u64),
            turn_wait_ms: found("sealpost_writer_turn_wait_seconds_total")?.map(|s| s * 1e3),
        })
    }

    /// Resident memory of the server, in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_of(Path::new(&format!("/proc/{}/status", self.pid())))
    }

    /// Bytes the server has caused to be written to storage so far (`write_bytes` of
    /// `/proc/<pid>/io`: its WAL writes and the checkpoints' copies into the database
    /// file); `None` where the kernel does not show them.
    pub fn bytes_written(&self) -> Option<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.pid())).ok()?;
        write_bytes_of(&io)
    }
}

/// The `write_bytes:` value of a `/proc/<pid>/io` text.
fn write_bytes_of(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|value| value.trim().parse().ok())
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the server's group-commit writer did (cumulative).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WriterCounters {
    /// Write transactions.
    pub transactions: u64,
    /// Requests (sends and acknowledgements) they carried.
    pub requests: u64,
    /// WAL flushes that made them durable.
    pub wal_flushes: u64,
    /// Times the writer waited for the `sqlx` connection's turn at the write lock, and for
    /// how long in all (`None` from a server without turns).
    pub turn_waits: Option<u64>,
    pub turn_wait_ms: Option<f64>,
}

impl WriterCounters {
    /// The work done since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            transactions: self.transactions.saturating_sub(before.transactions),
            requests: self.requests.saturating_sub(before.requests),
            wal_flushes: self.wal_flushes.saturating_sub(before.wal_flushes),
            turn_waits: self
                .turn_waits
                .zip(before.turn_waits)
                .map(|(now, then)| now.saturating_sub(then)),
            turn_wait_ms: self
                .turn_wait_ms
                .zip(before.turn_wait_ms)
                .map(|(now, then)| (now - then).max(0.0)),
        }
    }
}

/// What one of the server's threads is for, told by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadRole {
    /// tokio's threads: every socket and HTTP request.
    Runtime,
    /// The group-commit writer (`store::writer`).
    Writer,
    /// The thread that flushes the WAL and publishes what is durable.
    Durability,
    /// The WAL checkpoint thread.
    Checkpoint,
    /// Everything else: the main thread, `sqlx`'s SQLite threads.
    Other,
}

/// The names the server gives the threads behind its storage. The kernel keeps the first
/// 15 bytes of a thread's name (`/proc/<pid>/task/<tid>/comm`).
const STORAGE_THREADS: [(&str, ThreadRole); 3] = [
    ("sealpost-writer", ThreadRole::Writer),
    ("sealpost-durable", ThreadRole::Durability),
    ("sealpost-checkpoint", ThreadRole::Checkpoint),
];

impl ThreadRole {
    /// The role of a thread named `comm` (as `/proc` shows it, cut to 15 bytes).
    fn of(comm: &str) -> Self {
        let storage = STORAGE_THREADS
            .iter()
            .find(|(name, _)| name.get(..name.len().min(15)) == Some(comm));
        match storage {
            Some((_, role)) => *role,
            None if comm.starts_with("tokio-") => Self::Runtime,
            None => Self::Other,
        }
    }
}

/// CPU seconds of the server's threads by what they are for, or the same per message.
/// Where a message's cost goes is what explains a change in it: at partial load the
/// sockets cost several times what they cost per message at the peak
/// (docs/BENCHMARKS-LOG.md, section 2).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ThreadCpu {
    /// tokio's threads: the sockets and the HTTP API.
    pub runtime: f64,
    /// The group-commit writer.
    pub writer: f64,
    /// The thread that flushes the WAL and publishes what is durable.
    pub durability: f64,
    /// The WAL checkpoint thread.
    pub checkpoint: f64,
    /// Every other thread.
    pub other: f64,
}

impl ThreadCpu {
    fn add(&mut self, role: ThreadRole, seconds: f64) {
        let slot = match role {
            ThreadRole::Runtime => &mut self.runtime,
            ThreadRole::Writer => &mut self.writer,
            ThreadRole::Durability => &mut self.durability,
            ThreadRole::Checkpoint => &mut self.checkpoint,
            ThreadRole::Other => &mut self.other,
        };
        *slot += seconds;
    }

    /// The storage threads' share: the work a run leaves behind when its last message
    /// is delivered is theirs.
    pub fn storage(&self) -> f64 {
        self.writer + self.durability + self.checkpoint
    }

    /// What was spent since `before` (never below zero: a thread that ended in between
    /// takes its seconds with it).
    pub fn since(self, before: Self) -> Self {
        self.combine(before, |now, then| (now - then).max(0.0))
    }

    /// Microseconds per message of `messages`.
    pub fn per_message(self, messages: usize) -> Self {
        let per = 1e6 / messages.max(1) as f64;
        self.combine(self, |seconds, _| seconds * per)
    }

    /// `f` of each role's value here and in `other`.
    fn combine(self, other: Self, f: impl Fn(f64, f64) -> f64) -> Self {
        Self {
            runtime: f(self.runtime, other.runtime),
            writer: f(self.writer, other.writer),
            durability: f(self.durability, other.durability),
            checkpoint: f(self.checkpoint, other.checkpoint),
            other: f(self.other, other.other),
        }
    }

    /// `runtime/writer/durability/checkpoint/other`, one decimal each, for a table cell.
    pub fn cell(&self) -> String {
        format!(
            "{:.1}/{:.1}/{:.1}/{:.1}/{:.1}",
            self.runtime, self.writer, self.durability, self.checkpoint, self.other
        )
    }
}

/// CPU seconds of the threads under a `/proc/<pid>/task` directory, by role.
fn thread_cpu_of(tasks: &Path) -> anyhow::Result<ThreadCpu> {
    let mut cpu = ThreadCpu::default();
    let listing =
        std::fs::read_dir(tasks).with_context(|| format!("reading {}", tasks.display()))?;
    for task in listing {
        let task = task
            .with_context(|| format!("reading {}", tasks.display()))?
            .path();
        // A thread that ended between the listing and the reads is not counted.
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        let Ok(seconds) = cpu_seconds_of(&task.join("stat").to_string_lossy()) else {
            continue;
        };
        cpu.add(ThreadRole::of(name.trim_end()), seconds);
    }
    Ok(cpu)
}

/// CPU seconds of this process so far.
pub fn own_cpu_seconds() -> anyhow::Result<f64> {
    cpu_seconds_of("/proc/self/stat")
}

fn cpu_seconds_of(stat_path: &str) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("bad /proc stat")? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

fn rss_of(status_path: &Path) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(status_path)
        .with_context(|| format!("reading {}", status_path.display()))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()
        .context("malformed VmRSS")?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_write_bytes_from_proc_io() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\n\
                  write_bytes: 1228800\ncancelled_write_bytes: 0\n";
        assert_eq!(write_bytes_of(io), Some(1_228_800));
        assert_eq!(write_bytes_of("rchar: 10\n"), None);
    }

    use super::*;

    #[test]
    fn reads_own_cpu_and_memory() {
        assert!(own_cpu_seconds().unwrap() >= 0.0);
        assert!(rss_of(Path::new("/proc/self/status")).unwrap() > 0);
    }

    /// The names as `/proc` shows them, cut to 15 bytes; tokio's threads by their prefix.
    #[test]
    fn tells_the_threads_by_their_cut_names() {
        let cases = [
            ("sealpost-writer", ThreadRole::Writer),
            ("sealpost-durabl", ThreadRole::Durability),
            ("sealpost-checkp", ThreadRole::Checkpoint),
            ("tokio-rt-worker", ThreadRole::Runtime),
            ("tokio-runtime-w", ThreadRole::Runtime),
            ("sealpost-server", ThreadRole::Other),
            ("sqlx-sqlite-wor", ThreadRole::Other),
            ("sealpost-check", ThreadRole::Other),
            ("sealpost-", ThreadRole::Other),
            ("", ThreadRole::Other),
        ];
        for (comm, role) in cases {
            assert_eq!(ThreadRole::of(comm), role, "{comm}");
        }
    }

    #[test]
    fn thread_cpu_differences_per_message_and_cell() {
        let before = ThreadCpu {
            runtime: 1.0,
            writer: 0.5,
            durability: 0.25,
            checkpoint: 0.125,
            other: 0.5,
        };
        let after = ThreadCpu {
            runtime: 3.0,
            writer: 1.5,
            durability: 0.75,
            checkpoint: 0.375,
            // A thread of this role ended in between.
            other: 0.25,
        };
        let spent = after.since(before);
        assert_eq!(
            spent,
            ThreadCpu {
                runtime: 2.0,
                writer: 1.0,
                durability: 0.5,
                checkpoint: 0.25,
                other: 0.0,
            }
        );
        assert_eq!(spent.storage(), 1.75);
        let per_message = spent.per_message(100_000);
        assert_eq!(per_message.cell(), "20.0/10.0/5.0/2.5/0.0");
        // No messages: per message of one, not a division by zero.
        assert_eq!(spent.per_message(0).runtime, 2e6);
    }

    /// This process's own threads: the test's thread (named after the test) counts as
    /// "other" with the CPU it used, and no more than the process has used in all.
    #[test]
    fn reads_the_threads_of_a_process() {
        let started = std::time::Instant::now();
        let mut sum = 0.0f64;
        while cpu_seconds_of("/proc/thread-self/stat").unwrap() < 0.03
            && started.elapsed() < Duration::from_secs(5)
        {
            sum += (0..100_000u64).map(|i| (i as f64).sqrt()).sum::<f64>();
        }
        assert!(sum >= 0.0);
        let cpu = thread_cpu_of(Path::new("/proc/self/task")).unwrap();
        assert!(cpu.other >= 0.03, "{cpu:?}");
        assert_eq!(cpu.storage(), 0.0);
        let total = cpu.runtime + cpu.storage() + cpu.other;
        assert!(total <= own_cpu_seconds().unwrap() + 0.01, "{cpu:?}");
    }
}
