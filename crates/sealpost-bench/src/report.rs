//! Measurements and how they are reported: latency percentiles, a table on stdout and a
//! JSON file per run (so that docs/BENCHMARKS.md and the plots come from the same data).

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Percentiles of latencies given in nanoseconds (sorted in place).
    pub fn of(latencies_ns: &mut [u64]) -> Self {
        if latencies_ns.is_empty() {
            return Self::default();
        }
        latencies_ns.sort_unstable();
        let at = |q: f64| {
            let rank = ((latencies_ns.len() as f64) * q).ceil() as usize;
            let index = rank.clamp(1, latencies_ns.len()) - 1;
            latencies_ns[index] as f64 / 1e6
        };
        Self {
            samples: latencies_ns.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

/// Latency by the time messages were sent, in slices of [`TimelineSlice::WIDTH_MS`]: shows
/// whether the tail comes from stalls (a few slices where every message waits) or from
/// scattered waits (every slice has a tail).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TimelineSlice {
    /// Start of the slice, ms after the timed part began.
    pub start_ms: u64,
    pub messages: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
}

impl TimelineSlice {
    pub const WIDTH_MS: u64 = 50;

    /// The slices of `(sent_ns, latency_ns)` samples (sorted in place).
    pub fn of(samples: &mut [(u64, u64)]) -> Vec<Self> {
        samples.sort_unstable();
        samples
            .chunk_by(|a, b| a.0 / 1_000_000 / Self::WIDTH_MS == b.0 / 1_000_000 / Self::WIDTH_MS)
            .map(|slice| {
                let mut latencies: Vec<u64> = slice.iter().map(|s| s.1).collect();
                let percentiles = Percentiles::of(&mut latencies);
                Self {
                    start_ms: slice[0].0 / 1_000_000 / Self::WIDTH_MS * Self::WIDTH_MS,
                    messages: slice.len(),
                    p50_ms: percentiles.p50_ms,
                    max_ms: percentiles.max_ms,
                }
            })
            .collect()
    }
}

/// Prints rows as an aligned table.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.len());
            }
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        println!("  {}", padded.join("  "));
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Writes a result as pretty JSON, creating the directory.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Formats a number with thousands separators.
pub fn thousands(n: f64) -> String {
    let rounded = n.round() as i64;
    let digits = rounded.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_ranks() {
        let mut ns: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        let p = Percentiles::of(&mut ns);
        assert_eq!(p.samples, 1000);
        assert_eq!(p.p50_ms, 500.0);
        assert_eq!(p.p99_ms, 990.0);
        assert_eq!(p.p999_ms, 999.0);
        assert_eq!(p.max_ms, 1000.0);
        assert_eq!(Percentiles::of(&mut []).samples, 0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
    }
}
