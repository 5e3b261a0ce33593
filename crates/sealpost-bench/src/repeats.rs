//! Repeated runs of one setting, and which of them stands for it.
//!
//! On the virtual machines these figures come from, one binary's p99 at a fixed load moves
//! by a factor of five from run to run within an hour (docs/BENCHMARKS-LOG.md, section 2), so a
//! single run says little. `latency --repeat N` makes N runs of every setting; this module
//! groups them by setting and picks the run with the median of a figure (p99 for latency,
//! delivered messages/s for the peak), which is what the summary prints and the plot draws.
//! Every run stays in the JSON.

/// The runs of one setting, in the order the settings first appeared.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Indexes of the setting's runs, in run order.
    pub runs: Vec<usize>,
    /// Index of the run whose figure is the (lower) median of the setting's runs.
    pub median: usize,
}

/// Groups `items` by `key` and picks, in each group, the run with the median of
/// `figure` (for an even count the lower of the two middle runs, so that the pick is a
/// real run, not an average of two). NaN figures sort last.
pub fn by_setting<T, K: PartialEq>(
    items: &[T],
    key: impl Fn(&T) -> K,
    figure: impl Fn(&T) -> f64,
) -> Vec<Setting> {
    let mut keys: Vec<K> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let k = key(item);
        match keys.iter().position(|known| *known == k) {
            Some(at) => groups[at].push(index),
            None => {
                keys.push(k);
                groups.push(vec![index]);
            }
        }
    }
    groups
        .into_iter()
        .map(|runs| {
            // Every group has its first run, so it is never empty.
            let median = median_of(&runs, |i| figure(&items[*i])).unwrap_or(runs[0]);
            Setting { runs, median }
        })
        .collect()
}

/// The item with the median of `figure` (the lower middle one for an even count);
/// `None` when there is none.
pub fn median_of<T: Copy>(items: &[T], figure: impl Fn(&T) -> f64) -> Option<T> {
    let mut sorted = items.to_vec();
    sorted.sort_by(|a, b| figure(a).total_cmp(&figure(b)));
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn groups_keep_first_appearance_order_and_pick_the_median_run() {
        // (setting, p99) in run order: two settings interleaved.
        let runs = [
            (1, 30.0),
            (2, 5.0),
            (1, 10.0),
            (2, 7.0),
            (1, 20.0),
            (2, 6.0),
        ];
        let settings = by_setting(&runs, |r| r.0, |r| r.1);
        assert_eq!(
            settings,
            vec![
                Setting {
                    runs: vec![0, 2, 4],
                    median: 4,
                },
                Setting {
                    runs: vec![1, 3, 5],
                    median: 5,
                },
            ]
        );
    }

    #[test]
    fn an_even_count_picks_the_lower_middle_run() {
        let runs = [(0, 4.0), (0, 1.0), (0, 3.0), (0, 2.0)];
        let settings = by_setting(&runs, |r| r.0, |r| r.1);
        assert_eq!(settings.len(), 1);
        assert_eq!(settings[0].median, 3, "2.0 is the lower of the middle two");
        assert_eq!(median_of(&[4.0, 1.0, 3.0, 2.0], |v| *v), Some(2.0));
        assert_eq!(median_of(&[] as &[f64], |v| *v), None);
    }

    #[test]
    fn a_single_run_stands_for_itself() {
        let settings = by_setting(&[(None, 12.5)], |r: &(Option<u64>, f64)| r.0, |r| r.1);
        assert_eq!(
            settings,
            vec![Setting {
                runs: vec![0],
                median: 0
            }]
        );
    }

    proptest! {
        /// Every run lands in exactly one setting, and the median run's figure has at
        /// least half of its setting's runs at or below it and at least half at or above.
        #[test]
        fn the_median_run_splits_its_setting(
            runs in proptest::collection::vec((0u8..4, 0.0f64..1000.0), 1..40)
        ) {
            let settings = by_setting(&runs, |r| r.0, |r| r.1);
            let mut seen: Vec<usize> = settings.iter().flat_map(|s| s.runs.clone()).collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..runs.len()).collect::<Vec<_>>());
            for setting in &settings {
                prop_assert!(setting.runs.contains(&setting.median));
                let m = runs[setting.median].1;
                let n = setting.runs.len();
                let below = setting.runs.iter().filter(|i| runs[**i].1 <= m).count();
                let above = setting.runs.iter().filter(|i| runs[**i].1 >= m).count();
                prop_assert!(2 * below >= n && 2 * above >= n);
                prop_assert!(setting.runs.iter().all(|i| runs[*i].0 == runs[setting.runs[0]].0));
            }
        }
    }
}
