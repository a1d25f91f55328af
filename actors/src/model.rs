//! Domain vocabulary shared by every actor: validated identifiers, the plan catalog, billing
//! periods and the clock; `time`: RFC 3339, retry backoff and the rate limiters' clock.
//!
//! This module owns validation of everything that reaches the core from outside (account ids,
//! idempotency keys, meter names, metadata). It never parses a file format and never knows
//! about HTTP: the daemon builds a [`Catalog`] from its config and hands it in.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

mod time;
pub use time::{TokioClock, backoff, format_rfc3339, parse_rfc3339};

/// The largest quantity one request may consume: 2^53, the largest integer every JSON client
/// (JavaScript included) represents exactly.
pub const MAX_QUANTITY: u64 = 1 << 53;
/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Metadata limits, per request: entries, key length, value length (bytes).
pub const MAX_METADATA_ENTRIES: usize = 20;
pub const MAX_METADATA_KEY_LEN: usize = 40;
pub const MAX_METADATA_VALUE_LEN: usize = 500;

/// An account id is the app's own id: 1 to 128 characters of `[A-Za-z0-9_.:-]`.
///
/// Because `0x00` can never appear in an id, store keys use it as the separator between the id
/// and what follows, so one account's prefix never matches another account's keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

impl AccountId {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.len() > 128 {
            return Err(ValidationError::new(
                "account id must be 1 to 128 characters",
            ));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err(ValidationError::new(
                "account id may contain only A-Z, a-z, 0-9, '_', '.', ':' and '-'",
            ));
        }
        Ok(Self(Arc::from(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.0)
    }
}

/// A client-chosen idempotency key: 1 to 255 bytes of visible ASCII.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() {
            return Err(ValidationError::new("idempotency_key must not be empty"));
        }
        if raw.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(ValidationError::new(format!(
                "idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes"
            )));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ValidationError::new(
                "idempotency_key may contain only visible ASCII characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of a dry run (`check`) sent without one: it contains a space, which `parse`
    /// refuses, so no client key can ever equal it.
    pub fn dry_run() -> Self {
        Self("dry run".to_owned())
    }

    /// This is [`Self::dry_run`]'s key.
    pub fn is_dry_run(&self) -> bool {
        self.0 == "dry run"
    }
}

/// Free-form string metadata attached to a request or an account, bounded in size.
pub type Metadata = BTreeMap<String, String>;

pub fn validate_metadata(m: &Metadata) -> Result<(), ValidationError> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(ValidationError::new(format!(
            "metadata has more than {MAX_METADATA_ENTRIES} entries"
        )));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(ValidationError::new(format!(
                "metadata keys must be 1 to {MAX_METADATA_KEY_LEN} bytes"
            )));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            return Err(ValidationError::new(format!(
                "metadata value for `{k}` is longer than {MAX_METADATA_VALUE_LEN} bytes"
            )));
        }
    }
    Ok(())
}

/// Input that the core refuses; the message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

impl ValidationError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// What happens to consumption beyond a plan's included units for one meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overage {
    /// Hard cap: beyond `included` every request is denied with `cap_reached`.
    Block,
    /// Draw from the prepaid credit balance at `credits_per_unit`; at zero, `insufficient_credits`.
    Credits { credits_per_unit: u64 },
    /// Allowed and counted as billable overage (reported to Stripe by a later component).
    Bill,
    /// Never blocks; still counted, never billable.
    Unlimited,
}

/// One meter's rule inside a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterRule {
    pub included: u64,
    pub overage: Overage,
    /// How billable overage (the `bill` policy) is priced; `None`: not billed per unit.
    pub price: Option<crate::pricing::PriceModel>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    Free,
    Metered,
    Flat,
    Seat,
    Custom,
    Prepaid,
}

impl PlanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanKind::Free => "free",
            PlanKind::Metered => "metered",
            PlanKind::Flat => "flat",
            PlanKind::Seat => "seat",
            PlanKind::Custom => "custom",
            PlanKind::Prepaid => "prepaid",
        }
    }
}

/// A plan as configured. Prices are integers in minor units of `currency`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub kind: PlanKind,
    pub currency: String,
    pub base_price: u64,
    pub seat_price: u64,
    pub min_seats: u32,
    pub features: Vec<String>,
    pub meters: BTreeMap<String, MeterRule>,
    /// Percentages of the included allowance (and of the spend cap) that raise an alert,
    /// each once per period per meter. Default 50, 80, 95, 100.
    pub alert_thresholds: Vec<u32>,
    /// Alert when the live credit balance drops below this many credits.
    pub low_credit_threshold: Option<u64>,
    /// Default spend cap per period for accounts on this plan (accounts may override it).
    pub spend_cap: Option<SpendCap>,
    /// Promotional credits granted at the start of every period (0: none).
    pub monthly_credits: u64,
    /// `None`: unused monthly credits expire at the period's end. `Some(cap)`: they carry
    /// over, but never more than `cap` of them.
    pub monthly_credits_rollover_cap: Option<u64>,
}

/// The most money an account may be charged for usage in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendCap {
    /// Minor units of the plan's currency.
    pub amount: u64,
    pub action: SpendCapAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendCapAction {
    /// Deny consumption that would pass the cap (402 `spend_cap_reached`).
    Block,
    /// Allow it, but alert.
    Notify,
}

impl SpendCapAction {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        match s {
            "block" => Ok(SpendCapAction::Block),
            "notify" => Ok(SpendCapAction::Notify),
            other => Err(ValidationError::new(format!(
                "`{other}` is not one of: block, notify"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpendCapAction::Block => "block",
            SpendCapAction::Notify => "notify",
        }
    }
}

/// The default alert thresholds, in percent.
pub const DEFAULT_ALERT_THRESHOLDS: [u32; 4] = [50, 80, 95, 100];

/// A prepaid credit package (for example 500 credits for $5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditPackage {
    pub name: String,
    pub credits: u64,
    pub price: u64,
    pub currency: String,
}

/// Meters, plans and credit packages: the daemon's whole commercial model, immutable while it
/// runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub meters: BTreeMap<String, String>,
    pub plans: BTreeMap<String, Plan>,
    pub credit_packages: Vec<CreditPackage>,
}

impl Catalog {
    /// Checks cross references: every plan's meters exist, seat plans have a minimum.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.plans.is_empty() {
            return Err(ValidationError::new("at least one plan must be configured"));
        }
        for (name, plan) in &self.plans {
            for meter in plan.meters.keys() {
                if !self.meters.contains_key(meter) {
                    return Err(ValidationError::new(format!(
                        "plans.{name}.meters.{meter}: no meter `{meter}` is declared under [meters]"
                    )));
                }
            }
            for (meter, rule) in &plan.meters {
                if let Overage::Credits { credits_per_unit } = rule.overage
                    && credits_per_unit == 0
                {
                    return Err(ValidationError::new(format!(
                        "plans.{name}.meters.{meter}.credits_per_unit must be at least 1"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch, UTC.
pub type UnixMs = i64;

/// The source of "now" for every actor, so tests can move time.
#[derive(Clone)]
pub enum Clock {
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn manual(start_ms: UnixMs) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    pub fn now_ms(&self) -> UnixMs {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock; a no-op on the system clock.
    pub fn set_ms(&self, ms: UnixMs) {
        if let Clock::Manual(t) = self {
            t.store(ms, Ordering::SeqCst);
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Clock::System => f.write_str("Clock::System"),
            Clock::Manual(t) => write!(f, "Clock::Manual({})", t.load(Ordering::SeqCst)),
        }
    }
}

/// A billing period `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start_ms: UnixMs,
    pub end_ms: UnixMs,
}

impl Period {
    /// The calendar month (UTC) containing `at`.
    pub fn calendar_month(at: UnixMs) -> Period {
        let days = at.div_euclid(86_400_000);
        let (y, m, _) = civil_from_days(days);
        let start = days_from_civil(y, m, 1) * 86_400_000;
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let end = days_from_civil(ny, nm, 1) * 86_400_000;
        Period {
            start_ms: start,
            end_ms: end,
        }
    }

    pub fn contains(&self, at: UnixMs) -> bool {
        self.start_ms <= at && at < self.end_ms
    }

    /// If the period spans whole months from its start (same day of month, clamped to the
    /// month's length, and same time of day), how many.
    pub fn months(&self) -> Option<u32> {
        (1..=12).find(|n| add_months(self.start_ms, *n, day_of(self.start_ms)) == self.end_ms)
    }

    /// The period after this one that contains `at` (`at >= end_ms`). Month-shaped periods
    /// keep their anchor day (a period starting on the 31st ends on the last day of shorter
    /// months and returns to the 31st); others repeat their length.
    pub fn next_containing(&self, at: UnixMs) -> Period {
        let len = (self.end_ms - self.start_ms).max(1);
        if let Some(n) = self.months() {
            let anchor = day_of(self.start_ms);
            let mut start = self.end_ms;
            // Bounded: one step per period; a clock years ahead falls back to arithmetic.
            for _ in 0..1200 {
                let end = add_months(start, n, anchor);
                if at < end {
                    return Period {
                        start_ms: start,
                        end_ms: end,
                    };
                }
                start = end;
            }
            return Period::calendar_month(at);
        }
        let k = (at - self.end_ms) / len;
        let start = self.end_ms + k * len;
        Period {
            start_ms: start,
            end_ms: start + len,
        }
    }
}

fn day_of(ms: UnixMs) -> u32 {
    civil_from_days(ms.div_euclid(86_400_000)).2
}

fn days_in_month(y: i64, m: u32) -> u32 {
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    u32::try_from(days_from_civil(ny, nm, 1) - days_from_civil(y, m, 1)).unwrap_or(28)
}

/// `ms` moved `n` months later on day `anchor_day` (clamped to the month), same time of day.
pub fn add_months(ms: UnixMs, n: u32, anchor_day: u32) -> UnixMs {
    let days = ms.div_euclid(86_400_000);
    let tod = ms.rem_euclid(86_400_000);
    let (y, m, _) = civil_from_days(days);
    let total = i64::from(m) - 1 + i64::from(n);
    let ny = y + total.div_euclid(12);
    let nm = u32::try_from(total.rem_euclid(12) + 1).unwrap_or(1);
    let d = anchor_day.min(days_in_month(ny, nm)).max(1);
    days_from_civil(ny, nm, d) * 86_400_000 + tod
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date for a day count since 1970-01-01 (inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    // Both are in range by construction: d in 1..=31, m in 1..=12.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

// ---------------------------------------------------------------------------------------------
// Account vocabulary: subscription status, per-account overrides, decisions and alerts. Shared
// by the ledger (which records them), the plan rules and the billing fold (which produce them).

/// Subscription status, as Stripe names them. Set by admin now, by Stripe webhooks later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubscriptionStatus {
    #[default]
    Active,
    Trialing,
    PastDue,
    Canceled,
    Unpaid,
    Incomplete,
}

impl SubscriptionStatus {
    pub const ALL: [SubscriptionStatus; 6] = [
        SubscriptionStatus::Active,
        SubscriptionStatus::Trialing,
        SubscriptionStatus::PastDue,
        SubscriptionStatus::Canceled,
        SubscriptionStatus::Unpaid,
        SubscriptionStatus::Incomplete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
            SubscriptionStatus::Unpaid => "unpaid",
            SubscriptionStatus::Incomplete => "incomplete",
        }
    }

    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                ValidationError::new(format!(
                    "unknown status `{s}`; one of: active, trialing, past_due, canceled, unpaid, incomplete"
                ))
            })
    }
}

/// Per-account overrides of a `custom` plan's meter rules (enterprise contracts).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeterOverride {
    pub included: Option<u64>,
    /// `Some(None)` is not representable on purpose: an override replaces the whole policy.
    pub overage: Option<OverageOverride>,
}

/// A storable copy of [`Overage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverageOverride {
    Block,
    Credits { credits_per_unit: u64 },
    Bill,
    Unlimited,
}

impl From<OverageOverride> for Overage {
    fn from(o: OverageOverride) -> Self {
        match o {
            OverageOverride::Block => Overage::Block,
            OverageOverride::Credits { credits_per_unit } => Overage::Credits { credits_per_unit },
            OverageOverride::Bill => Overage::Bill,
            OverageOverride::Unlimited => Overage::Unlimited,
        }
    }
}

impl OverageOverride {
    pub fn parse(s: &str, credits_per_unit: Option<u64>) -> Result<Self, ValidationError> {
        match (s, credits_per_unit) {
            ("block", None) => Ok(OverageOverride::Block),
            ("bill", None) => Ok(OverageOverride::Bill),
            ("unlimited", None) => Ok(OverageOverride::Unlimited),
            ("credits", Some(n)) if n >= 1 => Ok(OverageOverride::Credits {
                credits_per_unit: n,
            }),
            ("credits", _) => Err(ValidationError::new(
                "overage `credits` needs credits_per_unit of at least 1",
            )),
            (_, Some(_)) => Err(ValidationError::new(
                "credits_per_unit is only meaningful with overage `credits`",
            )),
            (other, None) => Err(ValidationError::new(format!(
                "unknown overage `{other}`; one of: block, credits, bill, unlimited"
            ))),
        }
    }
}

/// Why a consume was refused. Each one is a recorded decision, replayed identically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyCode {
    /// A hard cap (`block` overage) would be exceeded.
    CapReached,
    /// The credit balance cannot pay for the overage.
    InsufficientCredits,
    /// The account's plan has no rule for this meter.
    MeterNotInPlan,
    /// The subscription is canceled, unpaid, incomplete, or past due beyond the grace period.
    SubscriptionInactive,
    /// The period's usage spend would pass the account's spend cap (`block` action).
    SpendCapReached,
}

impl DenyCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::CapReached => "cap_reached",
            DenyCode::InsufficientCredits => "insufficient_credits",
            DenyCode::MeterNotInPlan => "meter_not_in_plan",
            DenyCode::SubscriptionInactive => "subscription_inactive",
            DenyCode::SpendCapReached => "spend_cap_reached",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied(DenyCode),
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertKind {
    /// `used` reached `threshold` % of the included allowance.
    Usage,
    /// The period's usage spend reached `threshold` % of the spend cap.
    Spend,
    /// The live credit balance dropped below `threshold` credits.
    LowCredits,
    /// Stripe: the trial ends soon (`meter`: the subscription; `value`: the end, unix s).
    TrialEnding,
    /// Stripe: an invoice payment failed (`meter`: the invoice; `threshold`: the attempt;
    /// `value`: the amount due).
    PaymentFailed,
    /// Stripe: metered charges are due on an invoice (`meter`: the invoice or `upcoming`;
    /// `value`: the metered amount; `limit`: the total).
    InvoiceDue,
    /// Stripe: the customer's last payment method was removed (`meter`: the method).
    PaymentMethodRemoved,
    /// Stripe reported invalid meter events (`meter`: the Stripe meter; `value`: the count).
    MeterErrors,
    /// Money in was refused: a payment meterd cannot credit (`meter`: the refusal code, such
    /// as `not_ours` or `amount_mismatch`, a space and the Stripe event id; `threshold`: the
    /// event's `created`; `value`: the amount paid, minor units).
    MoneyRefused,
    /// A refund took credits back (`meter`: the charge; `value`: credits taken from
    /// grants; `limit`: credits that became debt).
    CreditsClawedBack,
    /// A payment was disputed (`meter`: the dispute; `value`: the disputed amount, minor
    /// units; `threshold`: 1 when credit use is suspended until it closes).
    Dispute,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Usage => "usage",
            AlertKind::Spend => "spend",
            AlertKind::LowCredits => "low_credits",
            AlertKind::TrialEnding => "trial_ending",
            AlertKind::PaymentFailed => "payment_failed",
            AlertKind::InvoiceDue => "invoice_due",
            AlertKind::PaymentMethodRemoved => "payment_method_removed",
            AlertKind::MeterErrors => "meter_errors",
            AlertKind::MoneyRefused => "money_refused",
            AlertKind::CreditsClawedBack => "credits_clawed_back",
            AlertKind::Dispute => "dispute",
        }
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub meter: String,
    /// Percent for `usage` and `spend`; credits for `low_credits`.
    pub threshold: u64,
    /// The value that crossed it (units, minor units, or credits).
    pub value: u64,
    /// What the threshold is of (included units, the cap in minor units, or the threshold).
    pub limit: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_follow_the_documented_alphabet() {
        assert!(AccountId::parse("team_42:user-7.a").is_ok());
        assert!(AccountId::parse(&"a".repeat(128)).is_ok());
        assert!(AccountId::parse("").is_err());
        assert!(AccountId::parse(&"a".repeat(129)).is_err());
        assert!(AccountId::parse("a b").is_err());
        assert!(AccountId::parse("a/b").is_err());
        assert!(AccountId::parse("é").is_err());
    }

    #[test]
    fn idempotency_keys_are_bounded_visible_ascii() {
        assert!(IdempotencyKey::parse("req-1").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
    }

    #[test]
    fn civil_round_trip_over_four_centuries() {
        for days in (-200_000..200_000).step_by(37) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn calendar_months_have_exact_utc_boundaries() {
        // 2024-02-29T23:59:59.999Z is in February of a leap year.
        let feb_end = days_from_civil(2024, 3, 1) * 86_400_000;
        let p = Period::calendar_month(feb_end - 1);
        assert_eq!(p.start_ms, days_from_civil(2024, 2, 1) * 86_400_000);
        assert_eq!(p.end_ms, feb_end);
        assert!(p.contains(feb_end - 1));
        assert!(!p.contains(feb_end));
        // The boundary instant itself belongs to the next month.
        let march = Period::calendar_month(feb_end);
        assert_eq!(march.start_ms, feb_end);
        // December rolls into the next year.
        let dec = Period::calendar_month(days_from_civil(2025, 12, 15) * 86_400_000);
        assert_eq!(dec.end_ms, days_from_civil(2026, 1, 1) * 86_400_000);
    }

    #[test]
    fn month_shaped_periods_keep_their_anchor_day() {
        let at = |y, m, d| days_from_civil(y, m, d) * 86_400_000 + 3_600_000;
        let p = Period {
            start_ms: at(2026, 1, 31),
            end_ms: at(2026, 2, 28),
        };
        assert_eq!(p.months(), Some(1));
        let next = p.next_containing(at(2026, 3, 1));
        assert_eq!(
            (next.start_ms, next.end_ms),
            (at(2026, 2, 28), at(2026, 3, 31))
        );
        let later = p.next_containing(at(2026, 5, 1));
        assert_eq!(
            (later.start_ms, later.end_ms),
            (at(2026, 4, 30), at(2026, 5, 31))
        );
        // Calendar months are month-shaped: the next one is the next calendar month.
        let cal = Period::calendar_month(at(2026, 11, 5));
        assert_eq!(
            cal.next_containing(cal.end_ms),
            Period::calendar_month(cal.end_ms)
        );
        // Yearly.
        let y = Period {
            start_ms: at(2026, 3, 15),
            end_ms: at(2027, 3, 15),
        };
        assert_eq!(y.months(), Some(12));
        // Fixed length: 10 days repeat.
        let f = Period {
            start_ms: 0,
            end_ms: 10 * 86_400_000,
        };
        assert_eq!(f.months(), None);
        let n = f.next_containing(25 * 86_400_000);
        assert_eq!((n.start_ms, n.end_ms), (20 * 86_400_000, 30 * 86_400_000));
    }
}
