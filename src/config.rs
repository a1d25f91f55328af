//! Configuration: `config.toml` (raw, serde, unknown keys rejected) → validated [`Config`].
//!
//! This module owns the file format and its checks. Secrets never live in the file: it names
//! environment variables, and [`Config`] holds only those names. Relative paths resolve
//! against the folder of the config file. There is deliberately no `Default for Config`: the
//! shipped `config.toml` (embedded in the binary as [`EMBEDDED_DEFAULT`]) is the default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meterd_actors::account::AccountSettings;
use meterd_actors::model::{
    Catalog, CreditPackage, DEFAULT_ALERT_THRESHOLDS, MeterRule, Overage, Plan, PlanKind, SpendCap,
    SpendCapAction,
};
use meterd_actors::pricing::{Decimal, PriceModel, Tier};
use meterd_actors::store::SyncMode;
use serde::Deserialize;

/// The shipped `config.toml`, used when no config file is given and none is found.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config {origin}: `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    storage: RawStorage,
    #[serde(default)]
    accounts: RawAccounts,
    #[serde(default)]
    idempotency: RawIdempotency,
    auth: RawAuth,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    rate_limits: RawRateLimits,
    meters: BTreeMap<String, RawMeter>,
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    credit_packages: Vec<RawCreditPackage>,
    #[serde(default)]
    stripe: RawStripe,
    #[serde(default)]
    webhooks: RawWebhooks,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebhooks {
    secret_env: String,
    tolerance_s: u64,
    max_body_bytes: usize,
    max_attempts: u32,
    base_backoff_ms: u64,
    max_backoff_s: u64,
    retention_days: u64,
    fallback_plan: String,
    backfill_on_start: bool,
    backfill_days: u64,
}

impl Default for RawWebhooks {
    fn default() -> Self {
        Self {
            secret_env: "STRIPE_WEBHOOK_SECRET".into(),
            tolerance_s: 300,
            max_body_bytes: 1024 * 1024,
            max_attempts: 10,
            base_backoff_ms: 1000,
            max_backoff_s: 3600,
            retention_days: 35,
            fallback_plan: "free".into(),
            backfill_on_start: true,
            backfill_days: 30,
        }
    }
}

/// Stripe webhooks (`[webhooks]`): receiving, the event log, applying.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Environment variable with the signing secret(s), comma-separated during a rotation.
    pub secret_env: String,
    pub tolerance_s: u64,
    pub max_body_bytes: usize,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Event ids (and payloads of settled events) are kept at least this long.
    pub retention: Duration,
    /// The plan an account falls back to when its subscription ends.
    pub fallback_plan: String,
    pub backfill_on_start: bool,
    pub backfill_days: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStripe {
    api_base: String,
    secret_key_env: String,
    timeout_ms: u64,
    calls_per_second: u32,
    concurrency: usize,
    max_attempts: u32,
    base_backoff_ms: u64,
    max_backoff_s: u64,
    breaker_failures: u32,
    breaker_cooldown_s: u64,
    poll_ms: u64,
    batch: usize,
    strict: bool,
    meters: BTreeMap<String, RawStripeMeter>,
    checkout_success_url: Option<String>,
    checkout_cancel_url: Option<String>,
    portal_return_url: Option<String>,
    refetch_on_webhook: bool,
    /// Aggregation window of every meter without its own (seconds; 0: off).
    aggregate_s: u64,
    /// Account id → meter → aggregation window (seconds).
    aggregate_accounts: BTreeMap<String, BTreeMap<String, u64>>,
    /// `"v1"` (one request per event) or `"stream"` (the v2 meter event stream).
    meter_events: String,
    meter_events_stream_base: String,
}

impl Default for RawStripe {
    fn default() -> Self {
        Self {
            api_base: "https://api.stripe.com/".into(),
            secret_key_env: "STRIPE_SECRET_KEY".into(),
            timeout_ms: 10_000,
            calls_per_second: 25,
            concurrency: 8,
            max_attempts: 12,
            base_backoff_ms: 500,
            max_backoff_s: 600,
            breaker_failures: 5,
            breaker_cooldown_s: 30,
            poll_ms: 200,
            batch: 100,
            strict: false,
            meters: BTreeMap::new(),
            checkout_success_url: None,
            checkout_cancel_url: None,
            portal_return_url: None,
            refetch_on_webhook: false,
            aggregate_s: 0,
            aggregate_accounts: BTreeMap::new(),
            meter_events: "v1".into(),
            meter_events_stream_base: meterd_actors::stripe::DEFAULT_STREAM_BASE.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStripeMeter {
    /// Default: the meter's own name.
    #[serde(default)]
    event_name: Option<String>,
    /// Aggregation window of this meter (seconds; 0: off); default `stripe.aggregate_s`.
    #[serde(default)]
    aggregate_s: Option<u64>,
}

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
    pub aggregation: meterd_actors::outbox::Aggregation,
    /// `stripe.meter_events`: v1 (one request per event) or the v2 meter event stream.
    pub meter_events: meterd_actors::outbox::MeterEventsMode,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_max_batch_body")]
    max_batch_body_bytes: usize,
    #[serde(default = "default_shutdown_timeout")]
    shutdown_timeout_s: u64,
}

fn default_max_batch_body() -> usize {
    256 * 1024
}
fn default_max_body() -> usize {
    16 * 1024
}
fn default_shutdown_timeout() -> u64 {
    20
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    data_dir: String,
    #[serde(default = "default_sync")]
    sync: String,
    #[serde(default = "default_cache_mb")]
    cache_capacity_mb: u64,
}

fn default_sync() -> String {
    "fdatasync".into()
}
fn default_cache_mb() -> u64 {
    256
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAccounts {
    idle_timeout_s: u64,
    max_live: usize,
    call_timeout_ms: u64,
    snapshot_every: u64,
    past_due_grace_hours: u64,
}

impl Default for RawAccounts {
    fn default() -> Self {
        Self {
            idle_timeout_s: 300,
            max_live: 100_000,
            call_timeout_ms: 5_000,
            snapshot_every: 1_000,
            past_due_grace_hours: 72,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawIdempotency {
    retention_hours: u64,
    sweep_interval_s: u64,
}

impl Default for RawIdempotency {
    fn default() -> Self {
        Self {
            retention_hours: 72,
            sweep_interval_s: 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    admin_key_env: String,
    app_key_env: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimits {
    admin: Option<RawRateLimit>,
    app: Option<RawRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_second: u64,
    burst: u64,
}

/// Upper bound for `requests_per_second` and `burst`: keeps the limiter's integer arithmetic
/// (nanotokens) far from overflow. Higher limits are meaningless; omit the scope instead.
pub const RATE_LIMIT_MAX: u64 = 1_000_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeter {
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    kind: String,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default)]
    base_price: u64,
    #[serde(default)]
    seat_price: u64,
    #[serde(default)]
    min_seats: u32,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    meters: BTreeMap<String, RawMeterRule>,
    /// Percent thresholds of the included allowance and the spend cap.
    alert_thresholds: Option<Vec<u32>>,
    low_credit_threshold: Option<u64>,
    spend_cap: Option<RawSpendCap>,
    #[serde(default)]
    monthly_credits: u64,
    monthly_credits_rollover_cap: Option<u64>,
    /// Stripe: the licensed base price of the plan's subscription.
    stripe_price: Option<String>,
    /// Stripe: the metered price of the plan's subscription.
    stripe_metered_price: Option<String>,
    /// Stripe: free trial days of a new subscription (1-730).
    trial_days: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpendCap {
    amount: u64,
    action: String,
}

fn default_currency() -> String {
    "usd".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeterRule {
    #[serde(default)]
    included: u64,
    overage: String,
    credits_per_unit: Option<u64>,
    /// Shorthand for `price = { model = "per_unit", unit_price = … }`.
    unit_price: Option<String>,
    price: Option<RawPrice>,
}

/// A price model for billable overage.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "model", rename_all = "snake_case")]
enum RawPrice {
    PerUnit {
        unit_price: String,
    },
    Package {
        package_size: u64,
        package_price: u64,
    },
    Graduated {
        tiers: Vec<RawTier>,
    },
    Volume {
        tiers: Vec<RawTier>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    /// Omit on the last tier (infinity).
    up_to: Option<u64>,
    unit_price: String,
    #[serde(default)]
    flat_fee: u64,
}

fn build_price(raw: &RawPrice) -> Result<PriceModel, String> {
    let tiers = |ts: &[RawTier]| -> Result<Vec<Tier>, String> {
        ts.iter()
            .enumerate()
            .map(|(i, t)| {
                let p = Decimal::parse(&t.unit_price)
                    .map_err(|e| format!("tiers[{i}].unit_price: {e}"))?;
                Ok(Tier::new(t.up_to, p, t.flat_fee))
            })
            .collect()
    };
    let m = match raw {
        RawPrice::PerUnit { unit_price } => PriceModel::per_unit(unit_price),
        RawPrice::Package {
            package_size,
            package_price,
        } => PriceModel::package(*package_size, *package_price),
        RawPrice::Graduated { tiers: ts } => PriceModel::graduated(tiers(ts)?),
        RawPrice::Volume { tiers: ts } => PriceModel::volume(tiers(ts)?),
    };
    m.map_err(|e| e.to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCreditPackage {
    name: String,
    credits: u64,
    price: u64,
    #[serde(default = "default_currency")]
    currency: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

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

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from: a path, or "(embedded default)".
    pub origin: String,
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub shutdown_timeout: Duration,
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    pub cache_capacity_bytes: u64,
    pub accounts: AccountSettings,
    pub idempotency_retention: Duration,
    pub sweep_interval: Duration,
    pub admin_key_env: String,
    pub app_key_env: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub rate_limits: RateLimits,
    pub catalog: Catalog,
    pub stripe: StripeConfig,
    pub webhooks: WebhookConfig,
}

impl Config {
    /// Loads `path`, resolving relative paths against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&text, &path.display().to_string(), &base)
    }

    /// The embedded default, with relative paths against `base` (the working directory).
    pub fn embedded(base: &Path) -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, "(embedded default)", base)
    }

    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw = read_raw(text, origin)?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let listen: SocketAddr = raw.server.listen.parse().map_err(|e| {
            invalid(
                "server.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:8787 ({e})",
                    raw.server.listen
                ),
            )
        })?;
        if raw.server.max_batch_body_bytes < raw.server.max_body_bytes {
            return Err(invalid(
                "server.max_batch_body_bytes",
                "must be at least server.max_body_bytes".into(),
            ));
        }
        if raw.server.max_body_bytes < 256 {
            return Err(invalid(
                "server.max_body_bytes",
                "must be at least 256".into(),
            ));
        }
        let sync = match raw.storage.sync.as_str() {
            "fdatasync" => SyncMode::Fdatasync,
            "flush" => SyncMode::Flush,
            other => {
                return Err(invalid(
                    "storage.sync",
                    format!("`{other}` is not one of: fdatasync, flush"),
                ));
            }
        };
        if raw.storage.data_dir.is_empty() {
            return Err(invalid("storage.data_dir", "must not be empty".into()));
        }
        let data_dir = resolve(base, &raw.storage.data_dir);
        let a = &raw.accounts;
        if a.idle_timeout_s == 0 {
            return Err(invalid(
                "accounts.idle_timeout_s",
                "must be at least 1".into(),
            ));
        }
        if a.max_live == 0 {
            return Err(invalid("accounts.max_live", "must be at least 1".into()));
        }
        if a.call_timeout_ms < 10 {
            return Err(invalid(
                "accounts.call_timeout_ms",
                "must be at least 10".into(),
            ));
        }
        if a.snapshot_every == 0 {
            return Err(invalid(
                "accounts.snapshot_every",
                "must be at least 1".into(),
            ));
        }
        if raw.idempotency.retention_hours < 72 {
            return Err(invalid(
                "idempotency.retention_hours",
                "must be at least 72: clients retry for up to three days".into(),
            ));
        }
        if raw.idempotency.sweep_interval_s == 0 {
            return Err(invalid(
                "idempotency.sweep_interval_s",
                "must be at least 1".into(),
            ));
        }
        for (key, var) in [
            ("auth.admin_key_env", &raw.auth.admin_key_env),
            ("auth.app_key_env", &raw.auth.app_key_env),
        ] {
            if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(invalid(
                    key,
                    format!("`{var}` is not an environment variable name"),
                ));
            }
        }
        if raw.auth.admin_key_env == raw.auth.app_key_env {
            return Err(invalid(
                "auth.app_key_env",
                "must differ from auth.admin_key_env".into(),
            ));
        }
        let log_format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is not one of: text, json"),
                ));
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a log filter such as `info`", raw.log.level),
            ));
        }
        let rate_limits = RateLimits {
            admin: validate_rate_limit("rate_limits.admin", raw.rate_limits.admin.as_ref())
                .map_err(|(k, m)| invalid(&k, m))?,
            app: validate_rate_limit("rate_limits.app", raw.rate_limits.app.as_ref())
                .map_err(|(k, m)| invalid(&k, m))?,
        };
        let catalog = build_catalog(&raw, &invalid)?;
        let st = &raw.stripe;
        if !(st.api_base.starts_with("https://") || st.api_base.starts_with("http://")) {
            return Err(invalid(
                "stripe.api_base",
                format!("`{}` is not an http(s) URL", st.api_base),
            ));
        }
        let meter_events = match st.meter_events.as_str() {
            "v1" => meterd_actors::outbox::MeterEventsMode::V1,
            "stream" => meterd_actors::outbox::MeterEventsMode::Stream,
            other => {
                return Err(invalid(
                    "stripe.meter_events",
                    format!("`{other}` is neither \"v1\" nor \"stream\""),
                ));
            }
        };
        if !(st.meter_events_stream_base.starts_with("https://")
            || st.meter_events_stream_base.starts_with("http://"))
        {
            return Err(invalid(
                "stripe.meter_events_stream_base",
                format!("`{}` is not an http(s) URL", st.meter_events_stream_base),
            ));
        }
        if st.secret_key_env.is_empty()
            || !st
                .secret_key_env
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(invalid(
                "stripe.secret_key_env",
                "not an environment variable name".into(),
            ));
        }
        for (key, v) in [
            ("stripe.timeout_ms", st.timeout_ms),
            ("stripe.calls_per_second", u64::from(st.calls_per_second)),
            ("stripe.max_attempts", u64::from(st.max_attempts)),
            ("stripe.breaker_failures", u64::from(st.breaker_failures)),
            ("stripe.poll_ms", st.poll_ms),
            ("stripe.batch", st.batch as u64),
            ("stripe.concurrency", st.concurrency as u64),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        let mut event_names = BTreeMap::new();
        for (meter, m) in &st.meters {
            if !raw.meters.contains_key(meter) {
                return Err(invalid(
                    &format!("stripe.meters.{meter}"),
                    format!("no meter `{meter}` is declared under [meters]"),
                ));
            }
            if let Some(name) = &m.event_name {
                if name.is_empty() || name.len() > 100 {
                    return Err(invalid(
                        &format!("stripe.meters.{meter}.event_name"),
                        "must be 1 to 100 characters".into(),
                    ));
                }
                event_names.insert(meter.clone(), name.clone());
            }
        }
        let aggregation = build_aggregation(&raw, &invalid)?;
        for (key, url) in [
            ("stripe.checkout_success_url", &st.checkout_success_url),
            ("stripe.checkout_cancel_url", &st.checkout_cancel_url),
            ("stripe.portal_return_url", &st.portal_return_url),
        ] {
            if let Some(u) = url
                && !valid_url(u)
            {
                return Err(invalid(key, format!("`{u}` is not an http(s) URL")));
            }
        }
        if st.checkout_success_url.is_some() != st.checkout_cancel_url.is_some() {
            return Err(invalid(
                if st.checkout_success_url.is_none() {
                    "stripe.checkout_success_url"
                } else {
                    "stripe.checkout_cancel_url"
                },
                "set both checkout_success_url and checkout_cancel_url, or neither".into(),
            ));
        }
        let mut stripe_plans = BTreeMap::new();
        for (name, p) in &raw.plans {
            for (field, price) in [
                ("stripe_price", &p.stripe_price),
                ("stripe_metered_price", &p.stripe_metered_price),
            ] {
                if let Some(id) = price
                    && !valid_price_id(id)
                {
                    return Err(invalid(
                        &format!("plans.{name}.{field}"),
                        format!("`{id}` is not a Stripe price id such as price_1AbC"),
                    ));
                }
            }
            if p.stripe_metered_price.is_some() && p.stripe_price.is_none() {
                return Err(invalid(
                    &format!("plans.{name}.stripe_price"),
                    "stripe_metered_price needs a stripe_price (the licensed base price)".into(),
                ));
            }
            if let Some(d) = p.trial_days
                && !(1..=730).contains(&d)
            {
                return Err(invalid(
                    &format!("plans.{name}.trial_days"),
                    "must be from 1 to 730".into(),
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
        let api_base = if st.api_base.ends_with('/') {
            st.api_base.clone()
        } else {
            format!("{}/", st.api_base)
        };
        let stripe = StripeConfig {
            api_base,
            secret_key_env: st.secret_key_env.clone(),
            timeout: Duration::from_millis(st.timeout_ms),
            calls_per_second: st.calls_per_second,
            concurrency: st.concurrency,
            max_attempts: st.max_attempts,
            base_backoff: Duration::from_millis(st.base_backoff_ms.max(1)),
            max_backoff: Duration::from_secs(st.max_backoff_s.max(1)),
            breaker_failures: st.breaker_failures,
            breaker_cooldown: Duration::from_secs(st.breaker_cooldown_s),
            poll: Duration::from_millis(st.poll_ms),
            batch: st.batch,
            strict: st.strict,
            event_names,
            checkout_success_url: st.checkout_success_url.clone(),
            checkout_cancel_url: st.checkout_cancel_url.clone(),
            portal_return_url: st.portal_return_url.clone(),
            plans: stripe_plans,
            refetch_on_webhook: st.refetch_on_webhook,
            aggregation,
            meter_events,
            meter_events_stream_base: if st.meter_events_stream_base.ends_with('/') {
                st.meter_events_stream_base.clone()
            } else {
                format!("{}/", st.meter_events_stream_base)
            },
        };
        let webhooks = build_webhooks(&raw, &stripe, &invalid)?;
        Ok(Config {
            origin: origin.to_owned(),
            listen,
            max_body_bytes: raw.server.max_body_bytes,
            max_batch_body_bytes: raw.server.max_batch_body_bytes,
            shutdown_timeout: Duration::from_secs(raw.server.shutdown_timeout_s.max(1)),
            data_dir,
            sync,
            cache_capacity_bytes: raw.storage.cache_capacity_mb.max(1) * 1024 * 1024,
            accounts: AccountSettings {
                idle_timeout: Duration::from_secs(a.idle_timeout_s),
                snapshot_every: a.snapshot_every,
                call_timeout: Duration::from_millis(a.call_timeout_ms),
                max_live: a.max_live,
                past_due_grace: Duration::from_secs(a.past_due_grace_hours * 3600),
            },
            idempotency_retention: Duration::from_secs(raw.idempotency.retention_hours * 3600),
            sweep_interval: Duration::from_secs(raw.idempotency.sweep_interval_s),
            admin_key_env: raw.auth.admin_key_env,
            app_key_env: raw.auth.app_key_env,
            log_format,
            log_level: raw.log.level,
            rate_limits,
            catalog,
            stripe,
            webhooks,
        })
    }
}

/// Reads `text` into the raw sections. A serde error names the key it concerns
/// (`server.listen_port`); a TOML syntax error, or one about the document as a whole (a
/// missing section), has no key.
fn read_raw(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    let parse_error = |message: String| ConfigError::Parse {
        origin: origin.to_owned(),
        message,
    };
    let de = toml::Deserializer::parse(text).map_err(|e| parse_error(e.to_string()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().to_string();
        if key == "." || key == "?" {
            parse_error(message)
        } else {
            ConfigError::Invalid {
                origin: origin.to_owned(),
                key,
                message,
            }
        }
    })
}

/// The outbox's aggregation windows from `[stripe]`: each one 0 (off) or a divisor of 86,400 s
/// (a window never straddles a UTC day), on meters declared under `[meters]` and valid account
/// ids. An error names the key.
fn build_aggregation(
    raw: &RawConfig,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<meterd_actors::outbox::Aggregation, ConfigError> {
    use meterd_actors::outbox::Aggregation;
    let st = &raw.stripe;
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
        if let Err(e) = meterd_actors::model::AccountId::parse(account) {
            return Err(invalid(&base, format!("not an account id: {e}")));
        }
        let mut per = BTreeMap::new();
        for (meter, s) in meters {
            let key = format!("{base}.{meter}");
            if !raw.meters.contains_key(meter) {
                return Err(invalid(
                    &key,
                    format!("no meter `{meter}` is declared under [meters]"),
                ));
            }
            per.insert(meter.clone(), check(&key, *s)?);
        }
        agg.accounts.insert(account.clone(), per);
    }
    Ok(agg)
}

fn build_webhooks(
    raw: &RawConfig,
    stripe: &StripeConfig,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<WebhookConfig, ConfigError> {
    let w = &raw.webhooks;
    if w.secret_env.is_empty()
        || !w
            .secret_env
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(invalid(
            "webhooks.secret_env",
            "not an environment variable name".into(),
        ));
    }
    if !(1..=3600).contains(&w.tolerance_s) {
        return Err(invalid(
            "webhooks.tolerance_s",
            "must be from 1 to 3600 seconds".into(),
        ));
    }
    if !(1024..=16 * 1024 * 1024).contains(&w.max_body_bytes) {
        return Err(invalid(
            "webhooks.max_body_bytes",
            "must be from 1024 to 16777216".into(),
        ));
    }
    if w.max_attempts == 0 {
        return Err(invalid(
            "webhooks.max_attempts",
            "must be at least 1".into(),
        ));
    }
    if w.retention_days < 30 {
        return Err(invalid(
            "webhooks.retention_days",
            "must be at least 30 (Stripe retries for 3 days; its events list covers 30)".into(),
        ));
    }
    if !(1..=30).contains(&w.backfill_days) {
        return Err(invalid(
            "webhooks.backfill_days",
            "must be from 1 to 30 (Stripe lists events of the last 30 days)".into(),
        ));
    }
    if !raw.plans.contains_key(&w.fallback_plan) {
        return Err(invalid(
            "webhooks.fallback_plan",
            format!("no plan `{}` is declared under [plans]", w.fallback_plan),
        ));
    }
    // A licensed price must mean one plan, or a subscription webhook could not name its
    // plan. (Plans may share a metered price: the licensed item decides.)
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (plan, sp) in &stripe.plans {
        if let Some(price) = &sp.stripe_price
            && let Some(other) = seen.insert(price, plan)
        {
            return Err(invalid(
                &format!("plans.{plan}.stripe_price"),
                format!("price `{price}` is also the stripe_price of plan `{other}`"),
            ));
        }
    }
    for (plan, sp) in &stripe.plans {
        if let Some(price) = &sp.stripe_metered_price
            && let Some(other) = seen.get(price.as_str())
        {
            return Err(invalid(
                &format!("plans.{plan}.stripe_metered_price"),
                format!("price `{price}` is the licensed stripe_price of plan `{other}`"),
            ));
        }
    }
    Ok(WebhookConfig {
        secret_env: w.secret_env.clone(),
        tolerance_s: w.tolerance_s,
        max_body_bytes: w.max_body_bytes,
        max_attempts: w.max_attempts,
        base_backoff: Duration::from_millis(w.base_backoff_ms.max(1)),
        max_backoff: Duration::from_secs(w.max_backoff_s.max(1)),
        retention: Duration::from_secs(w.retention_days * 86_400),
        fallback_plan: w.fallback_plan.clone(),
        backfill_on_start: w.backfill_on_start,
        backfill_days: w.backfill_days,
    })
}

/// Checks one `[rate_limits.<scope>]` table; an error carries the full key it concerns.
fn validate_rate_limit(
    key: &str,
    raw: Option<&RawRateLimit>,
) -> Result<Option<RateLimit>, (String, String)> {
    let Some(r) = raw else {
        return Ok(None);
    };
    for (field, value) in [
        ("requests_per_second", r.requests_per_second),
        ("burst", r.burst),
    ] {
        if !(1..=RATE_LIMIT_MAX).contains(&value) {
            return Err((
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

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn valid_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        && !u
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
}

fn valid_price_id(id: &str) -> bool {
    id.strip_prefix("price_").is_some_and(|r| {
        !r.is_empty() && r.len() <= 200 && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn build_catalog(
    raw: &RawConfig,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Catalog, ConfigError> {
    let mut catalog = Catalog::default();
    if raw.meters.is_empty() {
        return Err(invalid("meters", "declare at least one meter".into()));
    }
    for (name, m) in &raw.meters {
        if !valid_name(name) {
            return Err(invalid(
                &format!("meters.{name}"),
                "meter names are 1-64 characters of A-Z a-z 0-9 _ -".into(),
            ));
        }
        catalog.meters.insert(name.clone(), m.description.clone());
    }
    for (name, p) in &raw.plans {
        let key = format!("plans.{name}");
        if !valid_name(name) {
            return Err(invalid(
                &key,
                "plan names are 1-64 characters of A-Z a-z 0-9 _ -".into(),
            ));
        }
        let kind = match p.kind.as_str() {
            "free" => PlanKind::Free,
            "metered" => PlanKind::Metered,
            "flat" => PlanKind::Flat,
            "seat" => PlanKind::Seat,
            "custom" => PlanKind::Custom,
            "prepaid" => PlanKind::Prepaid,
            other => {
                return Err(invalid(
                    &format!("{key}.kind"),
                    format!("`{other}` is not one of: free, metered, flat, seat, custom, prepaid"),
                ));
            }
        };
        if kind == PlanKind::Seat && p.min_seats == 0 {
            return Err(invalid(
                &format!("{key}.min_seats"),
                "a seat plan needs min_seats of at least 1".into(),
            ));
        }
        validate_currency(&p.currency).map_err(|m| invalid(&format!("{key}.currency"), m))?;
        let mut meters = BTreeMap::new();
        for (meter, r) in &p.meters {
            let rkey = format!("{key}.meters.{meter}");
            if !raw.meters.contains_key(meter) {
                return Err(invalid(
                    &rkey,
                    format!("no meter `{meter}` is declared under [meters]"),
                ));
            }
            let overage = match (r.overage.as_str(), r.credits_per_unit) {
                ("block", None) => Overage::Block,
                ("bill", None) => Overage::Bill,
                ("unlimited", None) => Overage::Unlimited,
                ("credits", Some(n)) if n >= 1 => Overage::Credits {
                    credits_per_unit: n,
                },
                ("credits", _) => {
                    return Err(invalid(
                        &format!("{rkey}.credits_per_unit"),
                        "overage = \"credits\" needs credits_per_unit of at least 1".into(),
                    ));
                }
                ("block" | "bill" | "unlimited", Some(_)) => {
                    return Err(invalid(
                        &format!("{rkey}.credits_per_unit"),
                        "only meaningful with overage = \"credits\"".into(),
                    ));
                }
                (other, _) => {
                    return Err(invalid(
                        &format!("{rkey}.overage"),
                        format!("`{other}` is not one of: block, credits, bill, unlimited"),
                    ));
                }
            };
            let price = match (&r.unit_price, &r.price) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &format!("{rkey}.unit_price"),
                        "give either unit_price or price, not both".into(),
                    ));
                }
                (Some(u), None) => Some(
                    PriceModel::per_unit(u)
                        .map_err(|e| invalid(&format!("{rkey}.unit_price"), e.to_string()))?,
                ),
                (None, Some(p)) => {
                    Some(build_price(p).map_err(|m| invalid(&format!("{rkey}.price"), m))?)
                }
                (None, None) => None,
            };
            if price.is_some() && overage != Overage::Bill {
                return Err(invalid(
                    &format!("{rkey}.price"),
                    "a price applies to billed overage: set overage = \"bill\"".into(),
                ));
            }
            if overage == Overage::Bill && price.is_none() {
                return Err(invalid(
                    &format!("{rkey}.unit_price"),
                    "overage = \"bill\" needs a price (unit_price or a price table)".into(),
                ));
            }
            meters.insert(
                meter.clone(),
                MeterRule {
                    included: r.included,
                    overage,
                    price,
                },
            );
        }
        catalog.plans.insert(
            name.clone(),
            Plan {
                alert_thresholds: {
                    let t = p
                        .alert_thresholds
                        .clone()
                        .unwrap_or_else(|| DEFAULT_ALERT_THRESHOLDS.to_vec());
                    if t.iter().any(|x| *x == 0 || *x > 100) || t.windows(2).any(|w| w[0] >= w[1]) {
                        return Err(invalid(
                            &format!("{key}.alert_thresholds"),
                            "percentages from 1 to 100 in increasing order".into(),
                        ));
                    }
                    t
                },
                low_credit_threshold: p.low_credit_threshold,
                monthly_credits: p.monthly_credits,
                monthly_credits_rollover_cap: p.monthly_credits_rollover_cap,
                spend_cap: match &p.spend_cap {
                    None => None,
                    Some(c) => Some(SpendCap {
                        amount: c.amount,
                        action: SpendCapAction::parse(&c.action).map_err(|e| {
                            invalid(&format!("{key}.spend_cap.action"), e.to_string())
                        })?,
                    }),
                },
                name: name.clone(),
                kind,
                currency: p.currency.clone(),
                base_price: p.base_price,
                seat_price: p.seat_price,
                min_seats: p.min_seats,
                features: p.features.clone(),
                meters,
            },
        );
    }
    if catalog.plans.is_empty() {
        return Err(invalid("plans", "declare at least one plan".into()));
    }
    for (i, c) in raw.credit_packages.iter().enumerate() {
        let key = format!("credit_packages[{i}]");
        if !valid_name(&c.name) {
            return Err(invalid(
                &format!("{key}.name"),
                "invalid package name".into(),
            ));
        }
        if c.credits == 0 {
            return Err(invalid(
                &format!("{key}.credits"),
                "must be at least 1".into(),
            ));
        }
        validate_currency(&c.currency).map_err(|m| invalid(&format!("{key}.currency"), m))?;
        catalog.credit_packages.push(CreditPackage {
            name: c.name.clone(),
            credits: c.credits,
            price: c.price,
            currency: c.currency.clone(),
        });
    }
    Ok(catalog)
}

fn validate_currency(c: &str) -> Result<(), String> {
    if c.len() == 3 && c.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(format!(
            "`{c}` is not a lowercase ISO 4217 code such as usd"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/meterd"))
    }

    #[test]
    fn the_shipped_default_is_valid_and_carries_the_seed_plans() {
        let c = Config::embedded(Path::new("/srv")).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.data_dir, PathBuf::from("/srv/data"));
        assert_eq!(c.sync, SyncMode::Fdatasync);
        for plan in ["free", "payg", "pro", "team", "enterprise", "prepaid"] {
            assert!(c.catalog.plans.contains_key(plan), "missing plan {plan}");
        }
        let free = &c.catalog.plans["free"].meters["tokens"];
        assert_eq!(free.included, 100);
        assert_eq!(free.overage, Overage::Block);
        assert_eq!(
            c.catalog.plans["prepaid"].meters["tokens"].overage,
            Overage::Credits {
                credits_per_unit: 1
            }
        );
        assert_eq!(c.catalog.plans["team"].min_seats, 2);
        assert_eq!(c.catalog.plans["team"].seat_price, 1900);
        assert_eq!(c.catalog.plans["pro"].base_price, 2900);
        let credits: Vec<u64> = c
            .catalog
            .credit_packages
            .iter()
            .map(|p| p.credits)
            .collect();
        assert_eq!(credits, vec![500, 1000, 5000, 10000]);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let text = EMBEDDED_DEFAULT.replace("[server]", "[server]\nlisten_port = 1");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
        let text = EMBEDDED_DEFAULT.replace("included = 100", "included = 100\nincluded_typo = 3");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("included_typo"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (
                "sync = \"fdatasync\"",
                "sync = \"sometimes\"",
                "storage.sync",
            ),
            (
                "listen = \"127.0.0.1:8787\"",
                "listen = \"localhost\"",
                "server.listen",
            ),
            (
                "retention_hours = 72",
                "retention_hours = 1",
                "idempotency.retention_hours",
            ),
            (
                "overage = \"block\"",
                "overage = \"explode\"",
                "plans.free.meters.tokens.overage",
            ),
        ];
        for (from, to, key) in cases {
            assert!(EMBEDDED_DEFAULT.contains(from), "default lacks {from}");
            let err = parse(&EMBEDDED_DEFAULT.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn webhook_settings_default_and_bad_ones_name_their_key() {
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.webhooks.secret_env, "STRIPE_WEBHOOK_SECRET");
        assert_eq!(c.webhooks.tolerance_s, 300);
        assert_eq!(c.webhooks.fallback_plan, "free");
        assert_eq!(c.webhooks.retention, Duration::from_secs(35 * 86_400));
        assert!(!c.stripe.refetch_on_webhook);
        let cases = [
            (
                "tolerance_s = 300",
                "tolerance_s = 0",
                "webhooks.tolerance_s",
            ),
            (
                "retention_days = 35",
                "retention_days = 7",
                "webhooks.retention_days",
            ),
            (
                "backfill_days = 30",
                "backfill_days = 90",
                "webhooks.backfill_days",
            ),
            (
                "fallback_plan = \"free\"",
                "fallback_plan = \"gratis\"",
                "webhooks.fallback_plan",
            ),
            (
                "secret_env = \"STRIPE_WEBHOOK_SECRET\"",
                "secret_env = \"not a var\"",
                "webhooks.secret_env",
            ),
            (
                "max_body_bytes = 1048576",
                "max_body_bytes = 10",
                "webhooks.max_body_bytes",
            ),
            (
                "backfill_days = 30",
                "backfill_days = 30\nsecret = \"whsec_x\"",
                "secret",
            ),
        ];
        for (from, to, key) in cases {
            assert!(EMBEDDED_DEFAULT.contains(from), "default lacks {from}");
            let err = parse(&EMBEDDED_DEFAULT.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
        // One licensed price cannot belong to two plans; plans may share a metered price.
        let two = EMBEDDED_DEFAULT
            .replacen(
                "# stripe_price = \"price_...\"",
                "stripe_price = \"price_1Team\"\nstripe_metered_price = \"price_1Meter\"",
                1,
            )
            .replacen(
                "[plans.enterprise]",
                "[plans.enterprise]\nstripe_price = \"price_1Team\"",
                1,
            );
        let err = parse(&two).unwrap_err().to_string();
        assert!(err.contains("plans.team.stripe_price"), "{err}");
        let shared = EMBEDDED_DEFAULT
            .replacen(
                "# stripe_price = \"price_...\"",
                "stripe_price = \"price_1Team\"\nstripe_metered_price = \"price_1Meter\"",
                1,
            )
            .replacen(
                "[plans.enterprise]",
                "[plans.enterprise]\nstripe_price = \"price_1Ent\"\nstripe_metered_price = \"price_1Meter\"",
                1,
            );
        assert!(parse(&shared).is_ok());
    }

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
        for (from, to, key) in cases {
            assert!(EMBEDDED_DEFAULT.contains(from), "{from}");
            let err = parse(&EMBEDDED_DEFAULT.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
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
        for (from, to, key) in cases {
            let err = parse(&EMBEDDED_DEFAULT.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn a_plan_cannot_reference_an_undeclared_meter() {
        let text = EMBEDDED_DEFAULT.replacen(
            "[plans.free.meters.tokens]",
            "[plans.free.meters.images]",
            1,
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("plans.free.meters.images"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/meterd/data"));
        let abs =
            EMBEDDED_DEFAULT.replacen("data_dir = \"data\"", "data_dir = \"/var/lib/meterd\"", 1);
        assert_eq!(
            parse(&abs).unwrap().data_dir,
            PathBuf::from("/var/lib/meterd")
        );
    }

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

    #[test]
    fn price_tables_parse_and_bad_ones_name_their_key() {
        let tiers = r#"
[plans.tiered]
kind = "metered"
[plans.tiered.meters.tokens]
overage = "bill"
price = { model = "graduated", tiers = [
  { up_to = 10000, unit_price = "10" },
  { up_to = 50000, unit_price = "5" },
  { unit_price = "2" },
] }
[plans.pack]
kind = "metered"
[plans.pack.meters.tokens]
overage = "bill"
price = { model = "package", package_size = 100, package_price = 500 }
"#;
        let c = parse(&format!("{EMBEDDED_DEFAULT}{tiers}")).unwrap();
        let model = c.catalog.plans["tiered"].meters["tokens"]
            .price
            .clone()
            .unwrap();
        assert_eq!(
            meterd_actors::pricing::cost(&model, 60_000).unwrap(),
            320_000
        );
        let model = c.catalog.plans["pack"].meters["tokens"]
            .price
            .clone()
            .unwrap();
        assert_eq!(meterd_actors::pricing::cost(&model, 101).unwrap(), 1000);
        let bad = tiers.replace("{ unit_price = \"2\" },", "");
        let err = parse(&format!("{EMBEDDED_DEFAULT}{bad}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plans.tiered.meters.tokens.price"), "{err}");
        let bad = EMBEDDED_DEFAULT.replacen("unit_price = \"50\"", "unit_price = \"0.5.0\"", 1);
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("plans.payg.meters.tokens.unit_price"), "{err}");
        let bad = EMBEDDED_DEFAULT.replacen("unit_price = \"50\"", "", 1);
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("needs a price"), "{err}");
    }
}
