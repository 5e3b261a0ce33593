//! An outside writer during the timed part (`--hold-write-lock HOLD_MS,EVERY_MS`).
//!
//! The server's group-commit writer shares SQLite's write lock with its `sqlx` connection
//! (registrations, KeyPackage uploads, key-directory epochs). To see what such writes do to
//! messages, and how long such a write waits for the lock on a busy server, a thread with
//! its own connection to the server's database takes the write lock every `EVERY_MS`
//! (`BEGIN IMMEDIATE`, waiting up to 10 s as the server's connections do) and holds it
//! `HOLD_MS` before it commits nothing. The load generator's CPU runs it, not the server's.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::report::Percentiles;

/// How the outside writer takes turns at the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldWriteLock {
    /// How long it keeps the lock once it has it.
    pub hold: Duration,
    /// How often it takes the lock (from one try to the next).
    pub every: Duration,
}

impl FromStr for HoldWriteLock {
    type Err = anyhow::Error;

    /// `HOLD_MS,EVERY_MS`, e.g. `5,50`.
    fn from_str(text: &str) -> anyhow::Result<Self> {
        let (hold, every) = text
            .split_once(',')
            .context("expected HOLD_MS,EVERY_MS, e.g. 5,50")?;
        let ms = |part: &str| -> anyhow::Result<u64> {
            part.trim()
                .parse()
                .with_context(|| format!("{part:?} is not a whole number of milliseconds"))
        };
        let (hold, every) = (ms(hold)?, ms(every)?);
        if every == 0 || hold >= every {
            bail!(
                "the lock must be held for less than the interval (got {hold} ms every {every} ms)"
            );
        }
        Ok(Self {
            hold: Duration::from_millis(hold),
            every: Duration::from_millis(every),
        })
    }
}

impl HoldWriteLock {
    /// How the mode is described in a result.
    pub fn describe(&self) -> String {
        format!(
            "an outside connection holds the write lock {} ms every {} ms",
            self.hold.as_millis(),
            self.every.as_millis()
        )
    }
}

/// What the outside writer saw.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LockHolding {
    pub hold_ms: f64,
    pub every_ms: f64,
    /// How long each turn waited for the lock (`samples` is the number of turns).
    pub wait: Percentiles,
}

/// The running outside writer.
pub struct LockHolder {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<u64>>>,
    spec: HoldWriteLock,
}

impl LockHolder {
    /// Opens its connection to `database` and starts taking turns.
    pub fn start(database: &Path, spec: HoldWriteLock) -> anyhow::Result<Self> {
        let conn = rusqlite::Connection::open(database)
            .with_context(|| format!("cannot open {}", database.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("write-lock-holder".into())
            .spawn(move || take_turns(&conn, spec, &stopping))?;
        Ok(Self { stop, thread, spec })
    }

    /// Stops after the current turn and reports.
    pub fn finish(self) -> anyhow::Result<LockHolding> {
        self.stop.store(true, Ordering::Relaxed);
        let mut waits_ns = match self.thread.join() {
            Ok(waits) => waits?,
            Err(_) => bail!("the write-lock holder panicked"),
        };
        Ok(LockHolding {
            hold_ms: self.spec.hold.as_secs_f64() * 1e3,
            every_ms: self.spec.every.as_secs_f64() * 1e3,
            wait: Percentiles::of(&mut waits_ns),
        })
    }
}

/// Takes the lock every `spec.every` until told to stop; returns each turn's wait (ns).
fn take_turns(
    conn: &rusqlite::Connection,
    spec: HoldWriteLock,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<u64>> {
    let mut waits = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        conn.execute_batch("BEGIN IMMEDIATE")
            .context("the outside writer did not get the write lock within 10 s")?;
        waits.push(u64::try_from(asked.elapsed().as_nanos()).unwrap_or(u64::MAX));
        std::thread::sleep(spec.hold);
        conn.execute_batch("COMMIT")?;
        next += spec.every;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(waits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_is_hold_then_interval_in_milliseconds() {
        let spec: HoldWriteLock = "5,50".parse().unwrap();
        assert_eq!(spec.hold, Duration::from_millis(5));
        assert_eq!(spec.every, Duration::from_millis(50));
        for bad in ["5", "50,5", "5,5", "x,50", "5,0", ""] {
            assert!(bad.parse::<HoldWriteLock>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn takes_turns_at_the_lock_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let holder = LockHolder::start(&path, "2,10".parse().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        // While it runs, another writer still gets in between its turns.
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.execute("INSERT INTO t (x) VALUES (1)", []).unwrap();
        let holding = holder.finish().unwrap();
        assert!(
            holding.wait.samples >= 2,
            "only {} turns",
            holding.wait.samples
        );
        assert_eq!((holding.hold_ms, holding.every_ms), (2.0, 10.0));
    }
}
