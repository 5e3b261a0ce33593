//! How the writer waits for SQLite's write lock while another connection holds it.
//!
//! The `sqlx` connection (accounts, KeyPackages, the key directory, expiry) takes the same
//! lock for its own transactions. SQLite's default busy handler (`busy_timeout`) sleeps 1,
//! 2, 5, 10, 15, 20, 25 ms… between tries, so the writer — and with it every message —
//! came back up to a whole step after the lock was free: during a benchmark's
//! registrations it slept 1, 2, 5 and 10 ms in a row for a lock that was free again
//! somewhere between 8 and 18 ms, and 56 ms in all once (docs/BENCHMARKS-LOG.md, section 2,
//! "The writer's waits for the write lock"). The writer polls instead: every
//! [`SHORT_POLL`] for the first [`SHORT_POLLS`] tries, every [`LONG_POLL`] after that, and
//! gives up (the batch fails with "database is locked") once it has waited about
//! [`LIMIT`], as `busy_timeout` did. A try that finds the lock still held costs a few
//! microseconds.

use std::time::Duration;

/// Pause between tries while the wait is short.
pub(super) const SHORT_POLL: Duration = Duration::from_micros(250);
/// Tries at [`SHORT_POLL`] (20 ms) before the pauses grow to [`LONG_POLL`].
pub(super) const SHORT_POLLS: u32 = 80;
/// Pause between tries once the lock has been held for a while (a key-directory epoch).
pub(super) const LONG_POLL: Duration = Duration::from_millis(2);
/// About how long the writer waits in all before its batch fails.
pub(super) const LIMIT: Duration = Duration::from_secs(10);

/// The pause before the next try after `tries` tries that found the lock held, or `None`
/// when the writer has waited [`LIMIT`] and gives up.
pub(super) fn pause(tries: i32) -> Option<Duration> {
    // SQLite counts from 0; a negative count would be a first try.
    let tries = u32::try_from(tries).unwrap_or(0);
    let waited = if tries <= SHORT_POLLS {
        SHORT_POLL * tries
    } else {
        SHORT_POLL * SHORT_POLLS + LONG_POLL * (tries - SHORT_POLLS)
    };
    if waited >= LIMIT {
        None
    } else if tries < SHORT_POLLS {
        Some(SHORT_POLL)
    } else {
        Some(LONG_POLL)
    }
}

/// The writer connection's busy handler (`Connection::busy_handler`): sleeps [`pause`]
/// and asks SQLite to try again, or gives up.
pub(super) fn wait_for_lock(tries: i32) -> bool {
    match pause(tries) {
        Some(pause) => {
            std::thread::sleep(pause);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_often_at_first_then_less_and_gives_up_after_the_limit() {
        assert_eq!(pause(0), Some(SHORT_POLL));
        let short = i32::try_from(SHORT_POLLS).unwrap();
        assert_eq!(pause(short - 1), Some(SHORT_POLL));
        assert_eq!(pause(short), Some(LONG_POLL));
        let mut waited = Duration::ZERO;
        let mut tries = 0;
        while let Some(pause) = pause(tries) {
            waited += pause;
            tries += 1;
            assert!(tries < 100_000, "never gives up");
        }
        assert!(
            waited >= LIMIT && waited <= LIMIT + LONG_POLL,
            "gave up after {waited:?}"
        );
        assert_eq!(pause(i32::MAX), None);
        assert_eq!(
            pause(-1),
            Some(SHORT_POLL),
            "a negative count is a first try"
        );
    }
}
