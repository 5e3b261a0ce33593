//! What each CPU of the machine did during a timed part, from `/proc/stat`: busy, idle,
//! and *stolen*: time the guest wanted to run but the hypervisor gave its CPU to someone
//! else.
//!
//! The published figures come from a 2 vCPU virtual machine whose speed changes for hours
//! at a time while the disk and a fixed CPU loop ([`crate::machine`]) look normal: an
//! unchanged server relayed 48,000–54,000 msg/s in one hour and 20,000–33,000 in another.
//! During the slow runs the kernel counted 9% of the server's core and 20% of the
//! generator's as stolen, so this is printed beside every relay and latency figure: a run
//! with steal measured the neighbours as much as the server.

use anyhow::Context as _;
use serde::Serialize;

/// Jiffies of one CPU by state, as `/proc/stat` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Ticks {
    busy: u64,
    idle: u64,
    steal: u64,
}

impl Ticks {
    fn total(self) -> u64 {
        self.busy + self.idle + self.steal
    }
}

/// The counters of every CPU at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTicks(Vec<(usize, Ticks)>);

impl CpuTicks {
    /// Reads `/proc/stat` now.
    pub fn now() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        Self::parse(&text)
    }

    /// The `cpuN` lines of a `/proc/stat` text: `user nice system idle iowait irq softirq
    /// steal`, then the guest columns, which `user` and `nice` already include.
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut cpus = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let Some(cpu) = fields
                .next()
                .and_then(|name| name.strip_prefix("cpu"))
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            let cpu: usize = cpu
                .parse()
                .with_context(|| format!("a /proc/stat line names no CPU: {line}"))?;
            let values = fields
                .take(8)
                .map(str::parse::<u64>)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("a /proc/stat line has a non-number: {line}"))?;
            let [user, nice, system, idle, iowait, irq, softirq, steal] = values[..] else {
                anyhow::bail!("a /proc/stat line has fewer than 8 counters: {line}");
            };
            cpus.push((
                cpu,
                Ticks {
                    busy: user + nice + system + irq + softirq,
                    idle: idle + iowait,
                    steal,
                },
            ));
        }
        anyhow::ensure!(!cpus.is_empty(), "/proc/stat lists no CPU");
        Ok(Self(cpus))
    }

    /// What each CPU did between `before` and this reading, in shares of its time.
    pub fn since(&self, before: &Self) -> Vec<CpuUse> {
        self.0
            .iter()
            .filter_map(|&(cpu, after)| {
                let (_, then) = before.0.iter().find(|(c, _)| *c == cpu)?;
                let delta = Ticks {
                    busy: after.busy.saturating_sub(then.busy),
                    idle: after.idle.saturating_sub(then.idle),
                    steal: after.steal.saturating_sub(then.steal),
                };
                let total = delta.total().max(1) as f64;
                Some(CpuUse {
                    cpu,
                    busy_percent: 100.0 * delta.busy as f64 / total,
                    idle_percent: 100.0 * delta.idle as f64 / total,
                    steal_percent: 100.0 * delta.steal as f64 / total,
                })
            })
            .collect()
    }
}

/// One CPU's time during a timed part, in percent: running anything (`busy`), idle, or
/// taken by the hypervisor (`steal`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct CpuUse {
    pub cpu: usize,
    pub busy_percent: f64,
    pub idle_percent: f64,
    pub steal_percent: f64,
}

/// The steal of every CPU for a table cell: `9/20` is 9% on CPU 0 and 20% on CPU 1.
pub fn steal_cell(cpus: &[CpuUse]) -> String {
    percent_cell(cpus, |c| c.steal_percent)
}

/// How busy every CPU was, for a table cell: `99/27` is 99% on CPU 0 and 27% on CPU 1.
/// The server's CPU's share is what its latency under load follows (docs/BENCHMARKS-LOG.md,
/// section 2).
pub fn busy_cell(cpus: &[CpuUse]) -> String {
    percent_cell(cpus, |c| c.busy_percent)
}

fn percent_cell(cpus: &[CpuUse], share: impl Fn(&CpuUse) -> f64) -> String {
    cpus.iter()
        .map(|c| format!("{:.0}", share(c)))
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  300 0 60 200 10 0 5 20 0 0\n\
        cpu0 100 0 20 100 5 0 2 10 0 0\n\
        cpu1 200 0 40 100 5 0 3 10 0 0\n\
        intr 12345\nctxt 999\n";
    // CPU 0: 50 busy, 30 idle, 20 stolen; CPU 1: 100 busy, nothing else.
    const AFTER: &str = "cpu  450 0 80 230 10 0 5 40 0 0\n\
        cpu0 140 0 28 130 5 0 4 30 0 0\n\
        cpu1 290 0 50 100 5 0 3 10 7 0\n";

    #[test]
    fn shares_come_from_the_per_cpu_lines() {
        let before = CpuTicks::parse(BEFORE).unwrap();
        let after = CpuTicks::parse(AFTER).unwrap();
        let used = after.since(&before);
        assert_eq!(used.len(), 2, "the aggregate `cpu` line is not a CPU");
        assert_eq!(
            used[0],
            CpuUse {
                cpu: 0,
                busy_percent: 50.0,
                idle_percent: 30.0,
                steal_percent: 20.0,
            }
        );
        assert_eq!(used[1].busy_percent, 100.0);
        assert_eq!(used[1].steal_percent, 0.0);
        assert_eq!(steal_cell(&used), "20/0");
        assert_eq!(busy_cell(&used), "50/100");
    }

    #[test]
    fn a_cpu_that_did_nothing_counts_nothing() {
        let ticks = CpuTicks::parse(BEFORE).unwrap();
        let used = ticks.since(&ticks);
        assert!(
            used.iter()
                .all(|c| c.busy_percent == 0.0 && c.steal_percent == 0.0)
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(CpuTicks::parse("cpu0 1 2 3\n").is_err(), "too few counters");
        assert!(
            CpuTicks::parse("cpu0 1 2 x 4 5 6 7 8\n").is_err(),
            "not a number"
        );
        assert!(CpuTicks::parse("intr 1\n").is_err(), "no CPU at all");
    }

    #[test]
    fn this_machine_can_be_read() {
        let now = CpuTicks::now().unwrap();
        assert!(!now.0.is_empty());
    }
}
