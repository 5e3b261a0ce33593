//! A check of the machine around every scenario: how long `fdatasync` takes, right now, on
//! the file system the server's database lives on, how long a fixed loop of CPU work, a
//! walk through memory and a trivial system call take on the generator's core, and how
//! long one CPU takes to wake a thread on the other.
//!
//! The published figures come from shared virtual machines that slow down for minutes or
//! hours at a time (one session saw `fdatasync` p99 go from 0.3 ms to 5 ms within an hour,
//! and the server CPU per relayed message of an unchanged binary go from 19 to 37 µs).
//! The server answers nothing before a flush, and its figures are CPU time, so a run made
//! in such an hour measures the machine more than the server. Every scenario therefore
//! checks both before and after its work and reports them beside its figures, so that such
//! runs can be told apart instead of being averaged in.

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use crate::report::Percentiles;

/// Bytes written before each flush: one WAL page of the server's database.
const PAGE: usize = 8192;

/// Flushes per check: about 50 ms on a healthy disk, a second or two on a slow one.
const FLUSHES: usize = 200;

/// Steps of the CPU loop: about 0.1 s on a 2 vCPU Xeon of 2026 at full speed.
const CPU_STEPS: u64 = 50_000_000;

/// Entries of the memory walk: 32 MiB of `u32`, far more than the last-level cache.
const WALK_ENTRIES: usize = 8 << 20;

/// Steps of the memory walk: each one a load that misses the caches.
const WALK_STEPS: usize = 1 << 20;

/// Round trips of the cross-CPU wake-up: about 0.1–0.5 s here.
const WAKE_TRIPS: usize = 2_000;

/// Calls of the trivial system call: about 0.1 s at 0.5 µs a call.
const SYSTEM_CALLS: usize = 200_000;

/// p99 above which a check calls flushes slow. A healthy virtual disk here flushes an
/// overwritten page in 0.1–0.4 ms at p99; 1 ms and more is a disk under someone else's load.
pub const SLOW_FLUSH_P99_MS: f64 = 1.0;

/// The machine's state at one moment. `flush`: `fdatasync` latency after overwriting one
/// page of a preallocated file, as SQLite does with its WAL once a checkpoint has
/// restarted it. `cpu_loop_ms`: the wall time of a fixed loop of dependent integer
/// operations; `memory_walk_ns`: the time per step of a random walk through 32 MiB (one
/// cache miss each), which rises when neighbours on the host fight over caches and memory.
/// Both run on the calling thread while nothing else of the generator runs; compare them
/// across runs on the same machine kind, they mean nothing alone. `wake_round_trip`: two
/// threads on CPUs 0 and 1 waking each other in turn, each one idle while it waits, as
/// the server and the generator do for every message at partial load (`None` with one
/// CPU). Waking an idle virtual CPU goes through the hypervisor, and on this machine kind
/// its cost moves with the host's load: p50 77–109 µs a round trip in an hour when an
/// unchanged server relayed half its usual rate (7–12 µs with the guest polling instead
/// of halting while idle). `system_call_ns`: the time of one `gettid`, a system call that
/// does no work, i.e. the kernel's fixed cost of entering and leaving, which includes the
/// CPU's side-channel mitigations (an AMD Zen 3 VM with "Safe RET" against speculative
/// return stack overflow and CPU buffers cleared on each return to user space: ~0.34 µs).
/// The server makes four socket calls per message at partial load, so machine kinds whose
/// CPU loops take the same time can still differ in what a message costs the kernel.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MachineCheck {
    pub page_bytes: usize,
    pub flush: Percentiles,
    pub cpu_loop_ms: f64,
    pub memory_walk_ns: f64,
    pub system_call_ns: f64,
    pub wake_round_trip: Option<Percentiles>,
}

impl MachineCheck {
    /// Whether flushes were slow enough to dominate the figures of a run.
    pub fn slow(&self) -> bool {
        self.flush.p99_ms > SLOW_FLUSH_P99_MS
    }

    /// One line for the console.
    pub fn describe(&self) -> String {
        format!(
            "fdatasync of {} KiB: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} flushes); \
             CPU loop {:.0} ms; memory walk {:.0} ns/step; system call {:.0} ns; {}{}",
            self.page_bytes / 1024,
            self.flush.p50_ms,
            self.flush.p99_ms,
            self.flush.max_ms,
            self.flush.samples,
            self.cpu_loop_ms,
            self.memory_walk_ns,
            self.system_call_ns,
            self.wake_round_trip.map_or_else(
                || "one CPU, no cross-CPU wake-up".to_owned(),
                |wake| format!(
                    "cross-CPU wake-up round trip p50 {:.0} µs, p99 {:.0} µs",
                    wake.p50_ms * 1e3,
                    wake.p99_ms * 1e3
                )
            ),
            if self.slow() {
                " — SLOW: this run measures the disk as much as the server"
            } else {
                ""
            }
        )
    }
}

/// Checks the machine: flushes in `dir` (with a temporary file that is removed
/// afterwards), then the CPU loop, the memory walk, the system call and the wake-up.
/// Blocking: call it while nothing else of the generator runs.
pub fn check(dir: &Path) -> anyhow::Result<MachineCheck> {
    let mut file = tempfile::Builder::new()
        .prefix("sealpost-bench-machine-check")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {} to check it", dir.display()))?;
    // Preallocate, so that each flush writes data only, not a larger file size.
    file.write_all(&vec![0; PAGE * FLUSHES])?;
    file.as_file().sync_all()?;
    let page = vec![0x5a; PAGE];
    let handle = file.as_file();
    let mut latencies = Vec::with_capacity(FLUSHES);
    for i in 0..FLUSHES {
        handle.write_all_at(&page, (i * PAGE) as u64)?;
        let started = Instant::now();
        handle.sync_data().context("fdatasync failed")?;
        latencies.push(started.elapsed().as_nanos() as u64);
    }
    Ok(MachineCheck {
        page_bytes: PAGE,
        flush: Percentiles::of(&mut latencies),
        cpu_loop_ms: cpu_loop_ms(CPU_STEPS),
        memory_walk_ns: memory_walk_ns(WALK_ENTRIES, WALK_STEPS),
        system_call_ns: system_call_ns(SYSTEM_CALLS),
        // A machine that will not let a thread onto CPU 0 or 1 (a cpuset) still gets its
        // other figures.
        wake_round_trip: wake_round_trip((0, 1), WAKE_TRIPS).unwrap_or_else(|err| {
            eprintln!("  !! no cross-CPU wake-up check: {err:#}");
            None
        }),
    })
}

/// Round trips between a thread pinned to `cpus.0` and one pinned to `cpus.1`, each
/// blocking (idle) until the other wakes it; `None` when the machine has one CPU.
fn wake_round_trip(cpus: (usize, usize), trips: usize) -> anyhow::Result<Option<Percentiles>> {
    let online = std::fs::read_to_string("/proc/stat")
        .context("cannot read /proc/stat")?
        .lines()
        .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
        .count();
    if cpus.0.max(cpus.1) >= online {
        return Ok(None);
    }
    let pin = |cpu: usize| -> anyhow::Result<()> {
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        rustix::thread::sched_setaffinity(None, &set)
            .with_context(|| format!("cannot pin a thread to CPU {cpu}"))
    };
    let (to_echo, echo_gets) = std::sync::mpsc::channel::<()>();
    let (to_caller, caller_gets) = std::sync::mpsc::channel::<()>();
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(cpus.1)?;
        while echo_gets.recv().is_ok() {
            if to_caller.send(()).is_err() {
                break;
            }
        }
        Ok(())
    });
    let caller = std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
        pin(cpus.0)?;
        let mut latencies = Vec::with_capacity(trips);
        for _ in 0..trips {
            let started = Instant::now();
            to_echo.send(()).context("the echo thread stopped")?;
            caller_gets.recv().context("the echo thread stopped")?;
            latencies.push(started.elapsed().as_nanos() as u64);
        }
        Ok(latencies)
    });
    let joined = |name| move |_| anyhow::anyhow!("the {name} thread of the wake-up check panicked");
    let calls = caller.join().map_err(joined("calling"))?;
    // When the echo thread could not be pinned the caller only sees it gone: report why.
    echo.join().map_err(joined("echo"))??;
    let mut latencies = calls?;
    Ok(Some(Percentiles::of(&mut latencies)))
}

/// Nanoseconds per step of a walk through [`random_cycle`] over `entries` slots.
fn memory_walk_ns(entries: usize, steps: usize) -> f64 {
    let next = random_cycle(entries);
    let started = Instant::now();
    let mut at = std::hint::black_box(0_usize);
    for _ in 0..steps {
        at = next[at] as usize;
    }
    std::hint::black_box(at);
    started.elapsed().as_secs_f64() * 1e9 / steps.max(1) as f64
}

/// Nanoseconds per call of `gettid`, which enters the kernel every time (neither the C
/// library nor rustix keeps the answer), so the figure is the cost of the entry and exit.
fn system_call_ns(calls: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..calls {
        std::hint::black_box(rustix::thread::gettid());
    }
    started.elapsed().as_secs_f64() * 1e9 / calls.max(1) as f64
}

/// `next[i]` is the slot after `i` in one random cycle through all `entries` slots
/// (Sattolo's shuffle, with a fixed seed): a walk visits every slot before it repeats, and
/// no prefetcher can guess the next address.
fn random_cycle(entries: usize) -> Vec<u32> {
    let mut next: Vec<u32> = (0..entries as u32).collect();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for i in (1..entries).rev() {
        seed = xorshift(seed);
        next.swap(i, (seed % i as u64) as usize);
    }
    next
}

/// Milliseconds of wall time for `steps` xorshift steps (each depends on the one before,
/// so the compiler cannot spread or drop them).
fn cpu_loop_ms(steps: u64) -> f64 {
    let started = Instant::now();
    let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15_u64);
    for _ in 0..steps {
        x = xorshift(x);
    }
    std::hint::black_box(x);
    started.elapsed().as_secs_f64() * 1e3
}

/// One step of Marsaglia's xorshift64: a few dependent integer operations, and a fixed,
/// well-spread sequence for the shuffle.
fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// What a scenario writes as JSON: its results with the machine checks around them.
#[derive(Debug, Serialize)]
pub struct Recorded<T> {
    pub before: MachineCheck,
    pub after: MachineCheck,
    pub results: T,
}

impl<T> Recorded<T> {
    /// Checks the machine again now that the work is done, and prints both checks.
    pub fn finish(dir: &Path, before: MachineCheck, results: T) -> anyhow::Result<Self> {
        let after = check(dir)?;
        println!("\nmachine before: {}", before.describe());
        println!("machine after:  {}", after.describe());
        Ok(Self {
            before,
            after,
            results,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_flush_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let check = check(dir.path()).unwrap();
        assert_eq!(check.flush.samples, FLUSHES);
        assert_eq!(check.page_bytes, PAGE);
        assert!(check.flush.p50_ms > 0.0);
        assert!(check.flush.p50_ms <= check.flush.p99_ms);
        assert!(check.flush.p99_ms <= check.flush.max_ms);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(check.cpu_loop_ms > 0.0);
        assert!(check.memory_walk_ns > 0.0);
        assert!(check.system_call_ns > 0.0);
    }

    #[test]
    fn the_system_call_check_enters_the_kernel_each_time() {
        // Entering and leaving the kernel takes tens of nanoseconds even on a fast CPU
        // without mitigations; an answer kept in user space takes about one.
        let ns = system_call_ns(20_000);
        assert!(
            ns >= 10.0,
            "{ns} ns per call: the call did not reach the kernel"
        );
    }

    #[test]
    fn the_wake_up_check_times_every_round_trip_or_says_there_is_one_cpu() {
        match wake_round_trip((0, 1), 50).unwrap() {
            Some(wake) => {
                assert_eq!(wake.samples, 50);
                assert!(wake.p50_ms > 0.0 && wake.p50_ms <= wake.max_ms);
            }
            None => assert_eq!(std::thread::available_parallelism().unwrap().get(), 1),
        }
        assert!(
            wake_round_trip((0, 4096), 1).unwrap().is_none(),
            "no such CPU"
        );
    }

    #[test]
    fn the_memory_walk_is_one_cycle_through_every_slot() {
        // Sattolo's shuffle must give a single cycle; a walk that fell into a short cycle
        // would stay in the cache and measure nothing.
        let entries = 1 << 12;
        let next = random_cycle(entries);
        let (mut at, mut seen) = (0_usize, vec![false; entries]);
        for _ in 0..entries {
            assert!(!seen[at], "slot {at} visited twice");
            seen[at] = true;
            at = next[at] as usize;
        }
        assert_eq!(at, 0);
        assert!(memory_walk_ns(entries, 1_000) > 0.0);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = check(&dir.path().join("gone")).unwrap_err();
        assert!(format!("{err:#}").contains("cannot create a file in"));
    }

    #[test]
    fn slow_only_above_the_threshold() {
        let at = |p99_ms: f64| MachineCheck {
            page_bytes: PAGE,
            cpu_loop_ms: 100.0,
            memory_walk_ns: 100.0,
            system_call_ns: 500.0,
            wake_round_trip: None,
            flush: Percentiles {
                samples: FLUSHES,
                p50_ms: 0.1,
                p99_ms,
                p999_ms: p99_ms,
                max_ms: p99_ms,
            },
        };
        assert!(!at(0.3).slow());
        assert!(!at(SLOW_FLUSH_P99_MS).slow());
        assert!(at(3.1).slow());
        assert!(at(3.1).describe().contains("SLOW"));
        assert!(!at(0.3).describe().contains("SLOW"));
    }
}
