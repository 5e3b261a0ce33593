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

    /// User + system CPU seconds the server's storage threads (see [`STORAGE_THREADS`])
    /// have used so far: the work a run leaves behind when its last message is
    /// delivered is theirs.
    pub fn storage_cpu_seconds(&self) -> anyhow::Result<f64> {
        let tasks = format!("/proc/{}/task", self.pid());
        let mut seconds = 0.0;
        for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
            let task = task.with_context(|| format!("reading {tasks}"))?.path();
            // A thread that ended between the listing and the read is not counted.
            let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
                continue;
            };
            if is_storage_thread(name.trim_end()) {
                seconds += cpu_seconds_of(&task.join("stat").to_string_lossy())?;
            }
        }
        Ok(seconds)
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

/// The names the server gives the threads behind its storage (`store::writer`): the
/// group-commit writer, the thread that flushes the WAL, and the checkpoint thread. The
/// kernel keeps the first 15 bytes of a thread's name.
const STORAGE_THREADS: [&str; 3] = ["sealpost-writer", "sealpost-durable", "sealpost-checkpoint"];

/// True for a thread name (as `/proc/<pid>/task/<tid>/comm` shows it, cut to 15 bytes)
/// of one of [`STORAGE_THREADS`].
fn is_storage_thread(comm: &str) -> bool {
    STORAGE_THREADS
        .iter()
        .any(|name| name.get(..name.len().min(15)) == Some(comm))
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
    use super::*;

    #[test]
    fn reads_own_cpu_and_memory() {
        assert!(own_cpu_seconds().unwrap() >= 0.0);
        assert!(rss_of(Path::new("/proc/self/status")).unwrap() > 0);
    }

    /// The names as `/proc` shows them, cut to 15 bytes, and nothing else: not the
    /// process's main thread (`sealpost-server`) nor the tokio workers.
    #[test]
    fn knows_the_storage_threads_by_their_cut_names() {
        for comm in ["sealpost-writer", "sealpost-durabl", "sealpost-checkp"] {
            assert!(is_storage_thread(comm), "{comm}");
        }
        for comm in [
            "sealpost-server",
            "tokio-rt-worker",
            "sealpost-check",
            "",
            "sealpost-",
        ] {
            assert!(!is_storage_thread(comm), "{comm}");
        }
    }
}
