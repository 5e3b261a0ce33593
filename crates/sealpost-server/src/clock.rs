//! Wall-clock helpers. The server stores account and device times as days only (design §8).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Days since the Unix epoch.
pub fn today() -> i64 {
    now_unix() / 86_400
}

/// A day number as `YYYY-MM-DD`.
pub fn format_day(day: i64) -> String {
    // Julian day 2440588 is 1970-01-01.
    let julian = i32::try_from(day + 2_440_588).unwrap_or(2_440_588);
    match time::Date::from_julian_day(julian) {
        Ok(date) => format!(
            "{:04}-{:02}-{:02}",
            date.year(),
            u8::from(date.month()),
            date.day()
        ),
        Err(_) => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_days() {
        assert_eq!(format_day(0), "1970-01-01");
        assert_eq!(format_day(20_000), "2024-10-04");
    }
}
