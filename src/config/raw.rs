//! The file format: `config.toml` as serde reads it, before any check across keys.
//!
//! Every table rejects unknown keys, and every default of an optional key lives here. Checks
//! that a type can state are serde's: string choices (`storage.sync`, `log.format`,
//! `plans.<p>.kind`, `plans.<p>.meters.<m>.overage`, `plans.<p>.spend_cap.action`,
//! `stripe.meter_events`) are read by `string_choice!` functions, and settings that must be
//! at least 1 are `NonZero*`. [`from_toml`] reports a serde error with the full key it
//! concerns. Every other check is a section builder's (see the parent module).

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

use meterd_actors::model::{PlanKind, SpendCapAction};
use meterd_actors::outbox::MeterEventsMode;
use meterd_actors::store::SyncMode;
use serde::Deserialize;

use super::{ConfigError, LogFormat};

/// Reads `text`. A serde error names the key it concerns (`storage.sync`); a TOML syntax
/// error, or one about the document as a whole (a missing section), has no key.
pub(super) fn from_toml(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
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

/// `fn $name(deserializer) -> Result<$ty, _>` for a string choice, `"text" => value`. Another
/// string is serde's "unknown variant `…`, expected …" and a value of another type "invalid
/// type: …, expected a string" (a derived enum would get toml's vaguer "wanted string or
/// table").
macro_rules! string_choice {
    ($name:ident -> $ty:ty { $($text:literal => $value:expr),+ $(,)? }) => {
        fn $name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            match String::deserialize(d)?.as_str() {
                $($text => Ok($value),)+
                other => Err(serde::de::Error::unknown_variant(other, &[$($text),+])),
            }
        }
    };
}

string_choice!(sync_mode -> SyncMode {
    "fdatasync" => SyncMode::Fdatasync,
    "flush" => SyncMode::Flush,
});
string_choice!(log_format -> LogFormat { "text" => LogFormat::Text, "json" => LogFormat::Json });
string_choice!(plan_kind -> PlanKind {
    "free" => PlanKind::Free,
    "metered" => PlanKind::Metered,
    "flat" => PlanKind::Flat,
    "seat" => PlanKind::Seat,
    "custom" => PlanKind::Custom,
    "prepaid" => PlanKind::Prepaid,
});
string_choice!(overage -> RawOverage {
    "block" => RawOverage::Block,
    "credits" => RawOverage::Credits,
    "bill" => RawOverage::Bill,
    "unlimited" => RawOverage::Unlimited,
});
string_choice!(spend_cap_action -> SpendCapAction {
    "block" => SpendCapAction::Block,
    "notify" => SpendCapAction::Notify,
});
string_choice!(meter_events_mode -> MeterEventsMode {
    "v1" => MeterEventsMode::V1,
    "stream" => MeterEventsMode::Stream,
});

/// A nonzero default, checked when compiling.
macro_rules! nonzero {
    ($n:literal) => {
        const {
            match std::num::NonZero::new($n) {
                Some(n) => n,
                None => panic!("a nonzero default is zero"),
            }
        }
    };
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub server: RawServer,
    pub storage: RawStorage,
    #[serde(default)]
    pub accounts: RawAccounts,
    #[serde(default)]
    pub idempotency: RawIdempotency,
    #[serde(default)]
    pub supervisor: RawSupervisor,
    pub auth: RawAuth,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub rate_limits: RawRateLimits,
    pub meters: BTreeMap<String, RawMeter>,
    pub plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    pub credit_packages: Vec<RawCreditPackage>,
    #[serde(default)]
    pub stripe: RawStripe,
    #[serde(default)]
    pub webhooks: RawWebhooks,
    #[serde(default)]
    pub reconciler: RawReconciler,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub listen: String,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_max_batch_body")]
    pub max_batch_body_bytes: usize,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_s: u64,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_ms: u64,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_s: u64,
}

fn default_max_connections() -> usize {
    512
}
fn default_header_read_timeout() -> u64 {
    10_000
}
fn default_body_read_timeout() -> u64 {
    10_000
}
fn default_idle_timeout() -> u64 {
    60
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
pub(super) struct RawStorage {
    pub data_dir: String,
    #[serde(default = "default_sync", deserialize_with = "sync_mode")]
    pub sync: SyncMode,
    #[serde(default = "default_cache_mb")]
    pub cache_capacity_mb: u64,
}

fn default_sync() -> SyncMode {
    SyncMode::Fdatasync
}
fn default_cache_mb() -> u64 {
    256
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccounts {
    pub idle_timeout_s: NonZeroU64,
    pub max_live: NonZeroUsize,
    pub max_queued: NonZeroUsize,
    pub call_timeout_ms: u64,
    pub snapshot_every: NonZeroU64,
    pub past_due_grace_hours: u64,
}

impl Default for RawAccounts {
    fn default() -> Self {
        Self {
            idle_timeout_s: nonzero!(300),
            max_live: nonzero!(100_000),
            max_queued: nonzero!(100_000),
            call_timeout_ms: 5_000,
            snapshot_every: nonzero!(1_000),
            past_due_grace_hours: 72,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawIdempotency {
    pub retention_hours: u64,
    pub sweep_interval_s: NonZeroU64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSupervisor {
    pub max_failures: NonZeroUsize,
    pub window_s: NonZeroU64,
    pub base_backoff_ms: NonZeroU64,
    pub max_backoff_ms: NonZeroU64,
}

impl Default for RawSupervisor {
    fn default() -> Self {
        Self {
            max_failures: nonzero!(5),
            window_s: nonzero!(300),
            base_backoff_ms: nonzero!(500),
            max_backoff_ms: nonzero!(30_000),
        }
    }
}

impl Default for RawIdempotency {
    fn default() -> Self {
        Self {
            retention_hours: 72,
            sweep_interval_s: nonzero!(60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub admin_key_env: String,
    pub app_key_env: String,
    #[serde(default = "default_failed_per_minute")]
    pub failed_per_minute: u64,
    #[serde(default = "default_failed_burst")]
    pub failed_burst: u64,
}

fn default_failed_per_minute() -> u64 {
    30
}
fn default_failed_burst() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    #[serde(deserialize_with = "log_format")]
    pub format: LogFormat,
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimits {
    pub admin: Option<RawRateLimit>,
    pub app: Option<RawRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub requests_per_second: u64,
    pub burst: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMeter {
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    #[serde(deserialize_with = "plan_kind")]
    pub kind: PlanKind,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default)]
    pub base_price: u64,
    #[serde(default)]
    pub seat_price: u64,
    #[serde(default)]
    pub min_seats: u32,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub meters: BTreeMap<String, RawMeterRule>,
    /// Percent thresholds of the included allowance and the spend cap.
    pub alert_thresholds: Option<Vec<u32>>,
    pub low_credit_threshold: Option<u64>,
    pub spend_cap: Option<RawSpendCap>,
    #[serde(default)]
    pub monthly_credits: u64,
    pub monthly_credits_rollover_cap: Option<u64>,
    /// Stripe: the licensed base price of the plan's subscription.
    pub stripe_price: Option<String>,
    /// Stripe: the metered price of the plan's subscription.
    pub stripe_metered_price: Option<String>,
    /// Stripe: free trial days of a new subscription (1-730).
    pub trial_days: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpendCap {
    pub amount: u64,
    #[serde(deserialize_with = "spend_cap_action")]
    pub action: SpendCapAction,
}

fn default_currency() -> String {
    "usd".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMeterRule {
    #[serde(default)]
    pub included: u64,
    #[serde(deserialize_with = "overage")]
    pub overage: RawOverage,
    pub credits_per_unit: Option<u64>,
    /// Shorthand for `price = { model = "per_unit", unit_price = … }`.
    pub unit_price: Option<String>,
    pub price: Option<RawPrice>,
}

/// `plans.<p>.meters.<m>.overage`; `credits` goes with `credits_per_unit`.
#[derive(Debug, Clone, Copy)]
pub(super) enum RawOverage {
    Block,
    Credits,
    Bill,
    Unlimited,
}

/// A price model for billable overage.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "model", rename_all = "snake_case")]
pub(super) enum RawPrice {
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
pub(super) struct RawTier {
    /// Omit on the last tier (infinity).
    pub up_to: Option<u64>,
    pub unit_price: String,
    #[serde(default)]
    pub flat_fee: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCreditPackage {
    pub name: String,
    pub credits: NonZeroU64,
    pub price: u64,
    #[serde(default = "default_currency")]
    pub currency: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStripe {
    pub api_base: String,
    pub secret_key_env: String,
    pub timeout_ms: NonZeroU64,
    pub calls_per_second: NonZeroU32,
    pub concurrency: NonZeroUsize,
    pub max_attempts: NonZeroU32,
    pub base_backoff_ms: u64,
    pub max_backoff_s: u64,
    pub breaker_failures: NonZeroU32,
    pub breaker_cooldown_s: u64,
    pub poll_ms: NonZeroU64,
    pub batch: NonZeroUsize,
    pub strict: bool,
    pub meters: BTreeMap<String, RawStripeMeter>,
    pub checkout_success_url: Option<String>,
    pub checkout_cancel_url: Option<String>,
    pub portal_return_url: Option<String>,
    pub refetch_on_webhook: bool,
    /// Aggregation window of every meter without its own (seconds; 0: off).
    pub aggregate_s: u64,
    /// Account id → meter → aggregation window (seconds).
    pub aggregate_accounts: BTreeMap<String, BTreeMap<String, u64>>,
    /// `"v1"` (one request per event) or `"stream"` (the v2 meter event stream).
    #[serde(deserialize_with = "meter_events_mode")]
    pub meter_events: MeterEventsMode,
    pub meter_events_stream_base: String,
}

impl Default for RawStripe {
    fn default() -> Self {
        Self {
            api_base: "https://api.stripe.com/".into(),
            secret_key_env: "STRIPE_SECRET_KEY".into(),
            timeout_ms: nonzero!(10_000),
            calls_per_second: nonzero!(25),
            concurrency: nonzero!(8),
            max_attempts: nonzero!(12),
            base_backoff_ms: 500,
            max_backoff_s: 600,
            breaker_failures: nonzero!(5),
            breaker_cooldown_s: 30,
            poll_ms: nonzero!(200),
            batch: nonzero!(100),
            strict: false,
            meters: BTreeMap::new(),
            checkout_success_url: None,
            checkout_cancel_url: None,
            portal_return_url: None,
            refetch_on_webhook: false,
            aggregate_s: 0,
            aggregate_accounts: BTreeMap::new(),
            meter_events: MeterEventsMode::V1,
            meter_events_stream_base: meterd_actors::stripe::DEFAULT_STREAM_BASE.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStripeMeter {
    /// Default: the meter's own name.
    #[serde(default)]
    pub event_name: Option<String>,
    /// Aggregation window of this meter (seconds; 0: off); default `stripe.aggregate_s`.
    #[serde(default)]
    pub aggregate_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWebhooks {
    pub secret_env: String,
    pub tolerance_s: u64,
    pub max_body_bytes: usize,
    pub max_attempts: NonZeroU32,
    pub base_backoff_ms: u64,
    pub max_backoff_s: u64,
    pub retention_days: u64,
    pub fallback_plan: String,
    pub backfill_on_start: bool,
    pub backfill_days: u64,
    pub refund_policy: String,
    pub dispute_suspends_credits: bool,
}

impl Default for RawWebhooks {
    fn default() -> Self {
        Self {
            secret_env: "STRIPE_WEBHOOK_SECRET".into(),
            tolerance_s: 300,
            max_body_bytes: 1024 * 1024,
            max_attempts: nonzero!(10),
            base_backoff_ms: 1000,
            max_backoff_s: 3600,
            retention_days: 35,
            fallback_plan: "free".into(),
            backfill_on_start: true,
            backfill_days: 30,
            refund_policy: "negative_balance".into(),
            dispute_suspends_credits: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawReconciler {
    pub enabled: bool,
    pub interval_s: u64,
    pub lag_s: u64,
    pub reads_per_second: u32,
    pub alert_percent: u32,
    pub money_meters: Vec<String>,
    pub keep_ok_days: u64,
    pub state_stale_days: u64,
}

impl Default for RawReconciler {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_s: 3_600,
            lag_s: 3_600,
            reads_per_second: 20,
            alert_percent: 5,
            money_meters: Vec::new(),
            keep_ok_days: 3,
            state_stale_days: 35,
        }
    }
}
