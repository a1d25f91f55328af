//! Time helpers shared by the core and the daemon: RFC 3339 (through `jiff`), retry backoff,
//! and the clock of the rate limiters (`governor`).

use std::time::Duration;

use jiff::Timestamp;
use rand::Rng;

use super::UnixMs;

/// `0000-01-01T00:00:00.000Z`, the first time RFC 3339 can write (four-digit years).
const RFC3339_MIN_MS: UnixMs = -62_167_219_200_000;

/// Parses an RFC 3339 UTC time into Unix milliseconds: `2026-12-01T00:00:00Z`,
/// `2026-11-20T10:15:03.422Z`.
///
/// Seconds are required; up to 9 fractional digits are read, truncated to the millisecond.
/// `T` and `Z` may be lowercase and `+00:00` stands for `Z`; any other offset is refused (Stripe
/// and our clients send UTC). Dates and times that do not exist (`2026-02-31`, `10:99:99`, a
/// leap second `23:59:60`) are refused.
pub fn parse_rfc3339(s: &str) -> Option<UnixMs> {
    let local = s
        .strip_suffix(['Z', 'z'])
        .or_else(|| s.strip_suffix("+00:00"))?;
    let (date_time, fraction) = (local.get(..19)?, local.get(19..)?);
    if !(fraction.is_empty() || fraction.starts_with('.')) {
        return None;
    }
    let ts: Timestamp = s.parse().ok()?;
    // jiff reads more than RFC 3339 (ISO 8601's space for `T`, times without seconds, a leap
    // second clamped to :59): the date and time must be written as RFC 3339 writes them.
    let written = ts.strftime("%Y-%m-%dT%H:%M:%S").to_string();
    if !date_time.eq_ignore_ascii_case(&written) {
        return None;
    }
    i64::try_from(ts.as_nanosecond().div_euclid(1_000_000)).ok()
}

/// RFC 3339 rendering of a Unix-millisecond timestamp, UTC, millisecond precision:
/// `2026-12-01T00:00:00.000Z`. Times before the year 0000 (which RFC 3339 cannot write) or
/// after `9999-12-30T22:00:00.999Z` (jiff's last) are clamped to those bounds.
pub fn format_rfc3339(ms: UnixMs) -> String {
    let ts = Timestamp::from_millisecond(ms.max(RFC3339_MIN_MS)).unwrap_or(Timestamp::MAX);
    format!("{ts:.3}")
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^attempts)]`, to the
/// millisecond. The one backoff of the outbox's Stripe calls and of the webhook events.
pub fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    let cap = base
        .saturating_mul(1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX))
        .min(max);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// The clock of every rate limiter (`governor`): tokio's monotonic time, as the `std` instants
/// governor measures with, so a test that pauses tokio's time pauses the limiters too.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl governor::clock::Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_unix_milliseconds() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-20T10:15:03.422Z"),
            Some(1_795_169_703_422)
        );
        assert_eq!(parse_rfc3339("2000-02-29T23:59:59Z"), Some(951_868_799_000));
        assert_eq!(
            parse_rfc3339("2026-12-01T00:00:00Z"),
            Some(1_796_083_200_000)
        );
        // Lowercase `t` and `z`, `+00:00` for `Z`, fractions of any length up to 9 digits.
        assert_eq!(
            parse_rfc3339("2026-12-01t00:00:00.5z"),
            Some(1_796_083_200_500)
        );
        assert_eq!(
            parse_rfc3339("2026-12-01T00:00:00.123456789+00:00"),
            Some(1_796_083_200_123)
        );
        // Before 1970 the fraction still counts forward from the whole second.
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.250Z"), Some(-750));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.9999Z"), Some(-1));
    }

    #[test]
    fn rfc3339_refuses_what_is_not_a_utc_rfc3339_time() {
        for s in [
            // Dates and times that do not exist.
            "2026-02-31T10:00:00Z",
            "2026-02-29T10:00:00Z",
            "2026-13-20T10:15:03Z",
            "2026-00-20T10:15:03Z",
            "2026-11-00T10:15:03Z",
            "2026-11-20T24:00:00Z",
            "2026-11-20T10:99:00Z",
            "2026-11-20T10:00:99Z",
            "2026-02-31T10:99:99Z",
            "2026-12-31T23:59:60Z",
            // Not RFC 3339's syntax (some are ISO 8601's).
            "2026-11-20 10:15:03Z",
            "2026-11-20T10:15Z",
            "20261120T101503Z",
            "2026-11-20T10:15:03",
            "2026-11-20T10:15:03.Z",
            "2026-11-20T10:15:03,5Z",
            "2026-11-20T10:15:03.1234567890Z",
            "2026-11-20T10:15:03Z[UTC]",
            "2026-11-20T10:15:03garbageZ",
            "2026-1-20T10:15:03Z",
            "+2026-11-20T10:15:03Z",
            " 2026-11-20T10:15:03Z",
            "",
            "Z",
            // Offsets other than UTC.
            "2026-11-20T10:15:03+01:00",
            "2026-11-20T10:15:03-00:00",
            "2026-11-20T10:15:03+0000",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s:?}");
        }
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59.999Z");
        // What RFC 3339 cannot write is clamped to what it can.
        assert_eq!(format_rfc3339(i64::MAX), "9999-12-30T22:00:00.999Z");
        assert_eq!(format_rfc3339(i64::MIN), "0000-01-01T00:00:00.000Z");
        let last = Timestamp::MAX.as_millisecond();
        for ms in [0, 1, 999, 1_795_169_703_422, -750, RFC3339_MIN_MS, last] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Some(ms), "{ms}");
        }
    }

    #[test]
    fn backoff_is_full_jitter_bounded_by_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempts in 0..40 {
            let cap = base
                .saturating_mul(1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX))
                .min(max);
            for _ in 0..20 {
                assert!(backoff(attempts, base, max) <= cap);
            }
        }
        assert!(backoff(50, base, max) <= max);
        // Full jitter: the whole range from 0 is used, not only its upper half.
        let draws: Vec<Duration> = (0..2000).map(|_| backoff(3, base, max)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(400)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(400)));
        assert!(draws.iter().all(|d| *d <= Duration::from_millis(800)));
        // A zero base never waits.
        assert_eq!(backoff(5, Duration::ZERO, max), Duration::ZERO);
    }
}
