//! `[rate_limits]`: the per-API-key token buckets of each key scope, and their bounds.

use super::raw::{RawRateLimit, RawRateLimits};
use super::{Invalid, invalid};

/// Upper bound for `requests_per_second` and `burst`: the limiter (`governor`) counts time in
/// nanoseconds and bursts in `u32`, so 10^9 per second (one per nanosecond) is its finest rate.
/// Higher limits are meaningless; omit the scope instead.
pub const RATE_LIMIT_MAX: u64 = 1_000_000_000;

/// One token bucket: a key may make `burst` requests at once, refilled at
/// `requests_per_second`. Both are at least 1 and at most [`RATE_LIMIT_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests_per_second: u64,
    pub burst: u64,
}

/// Per-scope limits; each API key of a scope has its own bucket. `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub admin: Option<RateLimit>,
    pub app: Option<RateLimit>,
}

pub(super) fn build(raw: &RawRateLimits) -> Result<RateLimits, Invalid> {
    Ok(RateLimits {
        admin: scope("rate_limits.admin", raw.admin.as_ref())?,
        app: scope("rate_limits.app", raw.app.as_ref())?,
    })
}

/// Checks one `[rate_limits.<scope>]` table; an error carries the full key it concerns.
fn scope(key: &str, raw: Option<&RawRateLimit>) -> Result<Option<RateLimit>, Invalid> {
    let Some(r) = raw else {
        return Ok(None);
    };
    for (field, value) in [
        ("requests_per_second", r.requests_per_second),
        ("burst", r.burst),
    ] {
        if !(1..=RATE_LIMIT_MAX).contains(&value) {
            return Err(invalid(
                format!("{key}.{field}"),
                format!("must be between 1 and {RATE_LIMIT_MAX}"),
            ));
        }
    }
    Ok(Some(RateLimit {
        requests_per_second: r.requests_per_second,
        burst: r.burst,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EMBEDDED_DEFAULT;
    use crate::config::tests::parse;

    /// The shipped config with `body` right under its (empty) `[rate_limits]` header.
    fn with_rate_limits(body: &str) -> String {
        assert!(EMBEDDED_DEFAULT.contains("\n[rate_limits]\n"));
        EMBEDDED_DEFAULT.replacen(
            "\n[rate_limits]\n",
            &format!("\n[rate_limits]\n{body}\n"),
            1,
        )
    }

    #[test]
    fn rate_limits_are_optional_and_off_by_default() {
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.rate_limits, RateLimits::default());
        let without = EMBEDDED_DEFAULT.replacen("\n[rate_limits]\n", "\n", 1);
        assert!(!without.contains("[rate_limits]"));
        assert_eq!(parse(&without).unwrap().rate_limits, RateLimits::default());
        let text = with_rate_limits("app = { requests_per_second = 2000, burst = 4000 }");
        let c = parse(&text).unwrap();
        assert_eq!(
            c.rate_limits.app,
            Some(RateLimit {
                requests_per_second: 2000,
                burst: 4000
            })
        );
        assert_eq!(c.rate_limits.admin, None);
        let text = with_rate_limits("[rate_limits.admin]\nrequests_per_second = 1\nburst = 1");
        let c = parse(&text).unwrap();
        assert_eq!(
            c.rate_limits.admin,
            Some(RateLimit {
                requests_per_second: 1,
                burst: 1
            })
        );
    }

    #[test]
    fn rate_limit_errors_name_their_key() {
        let cases = [
            (
                "app = { requests_per_second = 0, burst = 5 }",
                "rate_limits.app.requests_per_second",
            ),
            (
                "app = { requests_per_second = 5, burst = 0 }",
                "rate_limits.app.burst",
            ),
            (
                "admin = { requests_per_second = 5, burst = 2000000000 }",
                "rate_limits.admin.burst",
            ),
            // Integers only; a fraction is a type error naming the key.
            (
                "app = { requests_per_second = 0.5, burst = 5 }",
                "requests_per_second",
            ),
            // Both fields are required.
            ("app = { requests_per_second = 5 }", "burst"),
            // Unknown keys, inside a scope and at the section level.
            (
                "app = { requests_per_second = 5, burst = 5, brust = 1 }",
                "brust",
            ),
            ("guest = { requests_per_second = 5, burst = 5 }", "guest"),
        ];
        for (section, key) in cases {
            let text = with_rate_limits(section);
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
        let text =
            with_rate_limits("[rate_limits.app]\nrequests_per_second = 5\nburst = 5\nrps = 3");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("rps"), "{err}");
    }
}
