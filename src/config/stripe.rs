//! `[stripe]`: the API client, meter event names, the outbox's aggregation windows, Checkout
//! and portal URLs, and the Stripe prices of each plan (`[plans.<p>] stripe_price`, …).
//! (`stripe.meter_events` and the settings that must be at least 1 are typed, so serde checks
//! them: see [`super::raw`].)

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Duration;

use url::{SyntaxViolation, Url};

use meterd_actors::model::{AccountId, Catalog};
use meterd_actors::outbox::{Aggregation, MeterEventsMode};

use super::raw::{RawPlan, RawStripe};
use super::{Invalid, invalid, valid_env_name};

/// Stripe settings (the secret itself comes from the environment variable named here).
#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub api_base: String,
    pub secret_key_env: String,
    pub timeout: Duration,
    pub calls_per_second: u32,
    /// Meter events in flight at once.
    pub concurrency: usize,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub poll: Duration,
    pub batch: usize,
    /// Refuse to start when the start-up checks against Stripe fail.
    pub strict: bool,
    /// Meter → the Stripe meter's `event_name`.
    pub event_names: BTreeMap<String, String>,
    /// Where Checkout sends the customer after paying (required for checkout).
    pub checkout_success_url: Option<String>,
    /// Where Checkout sends the customer on cancel (required for checkout).
    pub checkout_cancel_url: Option<String>,
    /// Where the customer portal's "return" link leads (else the portal configuration's).
    pub portal_return_url: Option<String>,
    /// Plan → its Stripe prices; every plan of the catalog has an entry.
    pub plans: BTreeMap<String, StripePlan>,
    /// Read the subscription from Stripe again before applying a subscription webhook.
    pub refetch_on_webhook: bool,
    /// Aggregation windows of the outbox (`stripe.aggregate_s`, `[stripe.meters.<m>]
    /// aggregate_s`, `[stripe.aggregate_accounts."<account>"] <meter> = <s>`).
    pub aggregation: Aggregation,
    /// `stripe.meter_events`: v1 (one request per event) or the v2 meter event stream.
    pub meter_events: MeterEventsMode,
    /// The meter event stream's host, with a trailing slash.
    pub meter_events_stream_base: String,
}

/// The Stripe side of one plan (`[plans.<p>] stripe_price`, `stripe_metered_price`,
/// `trial_days`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StripePlan {
    /// The licensed base price (`price_…`); quantity = seats for seat plans, else 1.
    pub stripe_price: Option<String>,
    /// A metered price (`price_…`) added to the subscription without a quantity.
    pub stripe_metered_price: Option<String>,
    /// Free trial length of a new subscription.
    pub trial_days: Option<u32>,
}

impl StripeConfig {
    /// The `event_name` meterd sends for `meter`.
    pub fn event_name<'a>(&'a self, meter: &'a str) -> &'a str {
        self.event_names
            .get(meter)
            .map(String::as_str)
            .unwrap_or(meter)
    }
}

/// `[stripe]`, on the meters of `catalog`, with the Stripe keys of `plans`.
pub(super) fn build(
    st: &RawStripe,
    plans: &BTreeMap<String, RawPlan>,
    catalog: &Catalog,
) -> Result<StripeConfig, Invalid> {
    let api_base = http_base("stripe.api_base", &st.api_base)?;
    let meter_events_stream_base = http_base(
        "stripe.meter_events_stream_base",
        &st.meter_events_stream_base,
    )?;
    if !valid_env_name(&st.secret_key_env) {
        return Err(invalid(
            "stripe.secret_key_env",
            "not an environment variable name",
        ));
    }
    let mut event_names = BTreeMap::new();
    for (meter, m) in &st.meters {
        if !catalog.meters.contains_key(meter) {
            return Err(invalid(
                format!("stripe.meters.{meter}"),
                format!("no meter `{meter}` is declared under [meters]"),
            ));
        }
        if let Some(name) = &m.event_name {
            if name.is_empty() || name.len() > 100 {
                return Err(invalid(
                    format!("stripe.meters.{meter}.event_name"),
                    "must be 1 to 100 characters",
                ));
            }
            event_names.insert(meter.clone(), name.clone());
        }
    }
    let aggregation = aggregation(st, catalog)?;
    for (key, url) in [
        ("stripe.checkout_success_url", &st.checkout_success_url),
        ("stripe.checkout_cancel_url", &st.checkout_cancel_url),
        ("stripe.portal_return_url", &st.portal_return_url),
    ] {
        if let Some(u) = url {
            // Kept as written: Stripe fills in templates such as `{CHECKOUT_SESSION_ID}`.
            http_url(key, u)?;
        }
    }
    if st.checkout_success_url.is_some() != st.checkout_cancel_url.is_some() {
        return Err(invalid(
            if st.checkout_success_url.is_none() {
                "stripe.checkout_success_url"
            } else {
                "stripe.checkout_cancel_url"
            },
            "set both checkout_success_url and checkout_cancel_url, or neither",
        ));
    }
    Ok(StripeConfig {
        api_base,
        secret_key_env: st.secret_key_env.clone(),
        timeout: Duration::from_millis(st.timeout_ms.get()),
        calls_per_second: st.calls_per_second.get(),
        concurrency: st.concurrency.get(),
        max_attempts: st.max_attempts.get(),
        base_backoff: Duration::from_millis(st.base_backoff_ms.max(1)),
        max_backoff: Duration::from_secs(st.max_backoff_s.max(1)),
        breaker_failures: st.breaker_failures.get(),
        breaker_cooldown: Duration::from_secs(st.breaker_cooldown_s),
        poll: Duration::from_millis(st.poll_ms.get()),
        batch: st.batch.get(),
        strict: st.strict,
        event_names,
        checkout_success_url: st.checkout_success_url.clone(),
        checkout_cancel_url: st.checkout_cancel_url.clone(),
        portal_return_url: st.portal_return_url.clone(),
        plans: stripe_plans(plans)?,
        refetch_on_webhook: st.refetch_on_webhook,
        aggregation,
        meter_events: st.meter_events,
        meter_events_stream_base,
    })
}

/// An http(s) base URL for API calls: no user name or password, no query or fragment. Returned
/// as the `url` crate writes it, with a trailing slash added if it lacks one.
fn http_base(key: &str, u: &str) -> Result<String, Invalid> {
    let url = http_url(key, u)?;
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: it holds a credential.
        return Err(invalid(
            key,
            "a base URL must not hold a user name or password (the Stripe key comes from the environment)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            key,
            format!("`{u}` is not an http(s) base URL: it has a query or a fragment"),
        ));
    }
    let s = url.as_str();
    Ok(if s.ends_with('/') {
        s.to_owned()
    } else {
        format!("{s}/")
    })
}

/// An absolute http(s) URL with a host, read by the `url` crate. Refused besides: whitespace
/// and control characters, and what the crate would silently repair (`https:/x`, `https:///x`,
/// backslashes), so that the URL used is the one written. Characters it percent-encodes are
/// allowed (`{CHECKOUT_SESSION_ID}`).
fn http_url(key: &str, u: &str) -> Result<Url, Invalid> {
    let refuse = |why: &str| invalid(key, format!("`{u}` is not an http(s) URL: {why}"));
    if u.bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(refuse("it holds whitespace or a control character"));
    }
    let repaired = Cell::new(None);
    let note = |v: SyntaxViolation| {
        if matches!(
            v,
            SyntaxViolation::Backslash | SyntaxViolation::ExpectedDoubleSlash
        ) {
            repaired.set(Some(v));
        }
    };
    let url = Url::options()
        .syntax_violation_callback(Some(&note))
        .parse(u)
        .map_err(|e| refuse(&e.to_string()))?;
    if let Some(v) = repaired.get() {
        return Err(refuse(v.description()));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(refuse("it has no host"));
    }
    Ok(url)
}

/// The outbox's aggregation windows from `[stripe]`: each one 0 (off) or a divisor of 86,400 s
/// (a window never straddles a UTC day), on meters declared under `[meters]` and valid account
/// ids. An error names the key.
fn aggregation(st: &RawStripe, catalog: &Catalog) -> Result<Aggregation, Invalid> {
    let check = |key: &str, s: u64| {
        if Aggregation::valid_window_s(s) {
            Ok(s)
        } else {
            Err(invalid(
                key,
                format!(
                    "{s} is not an aggregation window: use 0 (off) or a number of seconds that divides 86400, such as 60, 300 or 3600"
                ),
            ))
        }
    };
    let mut agg = Aggregation {
        default_s: check("stripe.aggregate_s", st.aggregate_s)?,
        ..Aggregation::default()
    };
    for (meter, m) in &st.meters {
        if let Some(s) = m.aggregate_s {
            let s = check(&format!("stripe.meters.{meter}.aggregate_s"), s)?;
            agg.meters.insert(meter.clone(), s);
        }
    }
    for (account, meters) in &st.aggregate_accounts {
        let base = format!("stripe.aggregate_accounts.\"{account}\"");
        if let Err(e) = AccountId::parse(account) {
            return Err(invalid(base, format!("not an account id: {e}")));
        }
        let mut per = BTreeMap::new();
        for (meter, s) in meters {
            let key = format!("{base}.{meter}");
            if !catalog.meters.contains_key(meter) {
                return Err(invalid(
                    key,
                    format!("no meter `{meter}` is declared under [meters]"),
                ));
            }
            per.insert(meter.clone(), check(&key, *s)?);
        }
        agg.accounts.insert(account.clone(), per);
    }
    Ok(agg)
}

/// The Stripe keys of every plan: price ids, and trial days from 1 to 730.
fn stripe_plans(
    plans: &BTreeMap<String, RawPlan>,
) -> Result<BTreeMap<String, StripePlan>, Invalid> {
    let mut stripe_plans = BTreeMap::new();
    for (name, p) in plans {
        for (field, price) in [
            ("stripe_price", &p.stripe_price),
            ("stripe_metered_price", &p.stripe_metered_price),
        ] {
            if let Some(id) = price
                && !valid_price_id(id)
            {
                return Err(invalid(
                    format!("plans.{name}.{field}"),
                    format!("`{id}` is not a Stripe price id such as price_1AbC"),
                ));
            }
        }
        if p.stripe_metered_price.is_some() && p.stripe_price.is_none() {
            return Err(invalid(
                format!("plans.{name}.stripe_price"),
                "stripe_metered_price needs a stripe_price (the licensed base price)",
            ));
        }
        if let Some(d) = p.trial_days
            && !(1..=730).contains(&d)
        {
            return Err(invalid(
                format!("plans.{name}.trial_days"),
                "must be from 1 to 730",
            ));
        }
        stripe_plans.insert(
            name.clone(),
            StripePlan {
                stripe_price: p.stripe_price.clone(),
                stripe_metered_price: p.stripe_metered_price.clone(),
                trial_days: p.trial_days,
            },
        );
    }
    Ok(stripe_plans)
}

fn valid_price_id(id: &str) -> bool {
    id.strip_prefix("price_").is_some_and(|r| {
        !r.is_empty() && r.len() <= 200 && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EMBEDDED_DEFAULT;
    use crate::config::tests::{assert_edits_name_keys, parse};

    #[test]
    fn aggregation_windows_default_off_resolve_and_name_the_bad_key() {
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(
            c.stripe.aggregation,
            meterd_actors::outbox::Aggregation::default()
        );
        assert_eq!(c.stripe.aggregation.window_s("a", "tokens"), 0);
        let text = EMBEDDED_DEFAULT
            .replacen("aggregate_s = 0", "aggregate_s = 3600", 1)
            .replacen("# aggregate_s = 60", "aggregate_s = 60", 1)
            .replacen(
                "[stripe.meters.tokens]",
                "[stripe.aggregate_accounts.\"team_1.x\"]\ntokens = 300\n\n[stripe.meters.tokens]",
                1,
            );
        let c = parse(&text).unwrap();
        let agg = &c.stripe.aggregation;
        assert_eq!(agg.default_s, 3600);
        assert_eq!(agg.window_s("someone", "tokens"), 60);
        assert_eq!(agg.window_s("team_1.x", "tokens"), 300);
        assert_eq!(agg.window_s("someone", "other"), 3600);
        // event_name stays as configured; a meter table may set only aggregate_s.
        assert_eq!(c.stripe.event_name("tokens"), "tokens");
        let only_window = EMBEDDED_DEFAULT.replacen(
            "event_name = \"tokens\"\n# aggregate_s = 60",
            "aggregate_s = 300",
            1,
        );
        let c = parse(&only_window).unwrap();
        assert_eq!(c.stripe.aggregation.window_s("a", "tokens"), 300);
        assert_eq!(c.stripe.event_name("tokens"), "tokens");
        let cases = [
            ("aggregate_s = 0", "aggregate_s = 7", "stripe.aggregate_s"),
            (
                "aggregate_s = 0",
                "aggregate_s = 172800",
                "stripe.aggregate_s",
            ),
            (
                "# aggregate_s = 60",
                "aggregate_s = 90000",
                "stripe.meters.tokens.aggregate_s",
            ),
            (
                "[stripe.meters.tokens]",
                "[stripe.aggregate_accounts.\"a\"]\ntokens = 61\n\n[stripe.meters.tokens]",
                "stripe.aggregate_accounts.\"a\".tokens",
            ),
            (
                "[stripe.meters.tokens]",
                "[stripe.aggregate_accounts.\"a\"]\nimages = 60\n\n[stripe.meters.tokens]",
                "stripe.aggregate_accounts.\"a\".images",
            ),
            (
                "[stripe.meters.tokens]",
                "[stripe.aggregate_accounts.\"not valid!\"]\ntokens = 60\n\n[stripe.meters.tokens]",
                "stripe.aggregate_accounts.\"not valid!\"",
            ),
            (
                "# aggregate_s = 60",
                "aggregate_seconds = 60",
                "aggregate_seconds",
            ),
        ];
        assert_edits_name_keys(&cases);
    }

    #[test]
    fn stripe_checkout_keys_are_optional_and_validated() {
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.stripe.checkout_success_url, None);
        assert_eq!(c.stripe.portal_return_url, None);
        assert_eq!(c.stripe.plans["team"], StripePlan::default());
        let text = EMBEDDED_DEFAULT
            .replacen(
                "strict = false",
                "strict = false\ncheckout_success_url = \"https://app.example.com/ok\"\ncheckout_cancel_url = \"https://app.example.com/no\"\nportal_return_url = \"https://app.example.com/billing\"",
                1,
            )
            .replacen(
                "min_seats = 2",
                "min_seats = 2\nstripe_price = \"price_team\"\nstripe_metered_price = \"price_tokens\"\ntrial_days = 14",
                1,
            );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.stripe.checkout_success_url.as_deref(),
            Some("https://app.example.com/ok")
        );
        assert_eq!(
            c.stripe.portal_return_url.as_deref(),
            Some("https://app.example.com/billing")
        );
        assert_eq!(
            c.stripe.plans["team"],
            StripePlan {
                stripe_price: Some("price_team".into()),
                stripe_metered_price: Some("price_tokens".into()),
                trial_days: Some(14),
            }
        );
        let cases = [
            (
                "strict = false",
                "strict = false\ncheckout_success_url = \"ftp://x\"\ncheckout_cancel_url = \"https://x\"",
                "stripe.checkout_success_url",
            ),
            (
                "strict = false",
                "strict = false\ncheckout_success_url = \"https://x\"",
                "stripe.checkout_cancel_url",
            ),
            (
                "strict = false",
                "strict = false\nportal_return_url = \"nope\"",
                "stripe.portal_return_url",
            ),
            (
                "min_seats = 2",
                "min_seats = 2\nstripe_price = \"prod_x\"",
                "plans.team.stripe_price",
            ),
            (
                "min_seats = 2",
                "min_seats = 2\nstripe_metered_price = \"price_m\"",
                "plans.team.stripe_price",
            ),
            (
                "min_seats = 2",
                "min_seats = 2\nstripe_price = \"price_a\"\nstripe_metered_price = \"x\"",
                "plans.team.stripe_metered_price",
            ),
            (
                "min_seats = 2",
                "min_seats = 2\ntrial_days = 0",
                "plans.team.trial_days",
            ),
            (
                "min_seats = 2",
                "min_seats = 2\nstripe_prices = \"price_a\"",
                "stripe_prices",
            ),
        ];
        assert_edits_name_keys(&cases);
    }

    #[test]
    fn urls_are_checked_by_the_url_crate_and_errors_name_the_key() {
        // Bases: normalised by the url crate, a trailing slash added.
        assert_eq!(
            http_base("k", "https://api.stripe.com").unwrap(),
            "https://api.stripe.com/"
        );
        assert_eq!(
            http_base("k", "HTTP://127.0.0.1:9/x").unwrap(),
            "http://127.0.0.1:9/x/"
        );
        for bad in [
            "https://user:secret@api.stripe.com/",
            "https://user@api.stripe.com/",
        ] {
            let e = http_base("stripe.api_base", bad).unwrap_err();
            assert_eq!(e.key, "stripe.api_base", "{bad}");
            assert!(
                !e.message.contains("secret") && !e.message.contains("user@"),
                "{}",
                e.message
            );
        }
        for bad in [
            "https://api.stripe.com/?a=1",
            "https://api.stripe.com/#x",
            "https://",
            "https:///api.stripe.com",
            "https:/api.stripe.com",
            "https:\\\\api.stripe.com",
            "ftp://api.stripe.com",
            "mailto:a@b.c",
            "api.stripe.com",
            " https://api.stripe.com",
            "https://api.stripe.com/a b",
            "",
        ] {
            let e = http_base("stripe.api_base", bad).unwrap_err();
            assert_eq!(e.key, "stripe.api_base", "{bad}");
            assert!(e.message.contains(bad), "{bad}: {}", e.message);
        }
        // Browser URLs: Stripe's templates are allowed; the value is used as written.
        let ok = "https://app.example.com/done?session={CHECKOUT_SESSION_ID}";
        assert!(http_url("k", ok).is_ok());
        for bad in [
            "https://",
            "https:///x",
            "nope",
            "javascript:alert(1)",
            "https://x/\ty",
        ] {
            assert!(http_url("k", bad).is_err(), "{bad}");
        }
        let c = parse(&EMBEDDED_DEFAULT.replacen(
            "strict = false",
            &format!("strict = false\ncheckout_success_url = \"{ok}\"\ncheckout_cancel_url = \"https://x\""),
            1,
        ))
        .unwrap();
        assert_eq!(c.stripe.checkout_success_url.as_deref(), Some(ok));
        let err = parse(&EMBEDDED_DEFAULT.replacen(
            "api_base = \"https://api.stripe.com/\"",
            "api_base = \"https://u:p@api.stripe.com/\"",
            1,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("stripe.api_base"), "{err}");
    }

    #[test]
    fn meter_events_mode_defaults_to_v1_and_bad_values_name_their_key() {
        use meterd_actors::outbox::MeterEventsMode;
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.stripe.meter_events, MeterEventsMode::V1);
        assert_eq!(
            c.stripe.meter_events_stream_base,
            "https://meter-events.stripe.com/"
        );
        // Without the keys at all: the same defaults.
        let without = EMBEDDED_DEFAULT
            .replacen("meter_events = \"v1\"\n", "", 1)
            .replacen(
                "meter_events_stream_base = \"https://meter-events.stripe.com/\"\n",
                "",
                1,
            );
        assert!(!without.contains("\nmeter_events"));
        let c = parse(&without).unwrap();
        assert_eq!(c.stripe.meter_events, MeterEventsMode::V1);
        let stream = EMBEDDED_DEFAULT
            .replacen("meter_events = \"v1\"", "meter_events = \"stream\"", 1)
            .replacen(
                "\"https://meter-events.stripe.com/\"",
                "\"http://127.0.0.1:9/x\"",
                1,
            );
        let c = parse(&stream).unwrap();
        assert_eq!(c.stripe.meter_events, MeterEventsMode::Stream);
        assert_eq!(c.stripe.meter_events_stream_base, "http://127.0.0.1:9/x/");
        let bad = EMBEDDED_DEFAULT.replacen("meter_events = \"v1\"", "meter_events = \"v2\"", 1);
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("stripe.meter_events"), "{err}");
        let bad = EMBEDDED_DEFAULT.replacen(
            "\"https://meter-events.stripe.com/\"",
            "\"meter-events.stripe.com\"",
            1,
        );
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("stripe.meter_events_stream_base"), "{err}");
    }
}
