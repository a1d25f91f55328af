//! Request and response bodies of the HTTP API, and their conversion from domain types.
//!
//! Domain and storage types are never serialized directly: this module is the API's own
//! vocabulary, so the ledger format can change without changing the API.

use meterd_actors::billing::StripeOutcome;
use std::borrow::Cow;
use std::collections::BTreeMap;

use poem::http::StatusCode;
use poem_openapi::Object;
use serde::Deserialize;

use meterd_actors::account::{AccountView, ConsumeReply, CreditReply, MeterView};
use meterd_actors::ledger::{ConsumeRecord, EntryKind, LedgerEntry};
use meterd_actors::model::format_rfc3339;
use meterd_actors::model::{Alert, Outcome};
use meterd_actors::plan::{Access, Entitlement};

use super::error::ApiError;

mod ledger;

pub use ledger::*;

/// `PUT /v1/accounts/{id}`. On update, omitted fields keep their value.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutAccountBody {
    /// A configured plan; required when creating the account.
    pub plan: Option<String>,
    /// Seats (defaults to the plan's `min_seats`, at least 1).
    pub seats: Option<u32>,
    pub email: Option<String>,
    pub stripe_customer_id: Option<String>,
    /// String values only; at most 20 entries.
    pub metadata: Option<BTreeMap<String, String>>,
    /// The most this account may be charged for usage per period; `amount: 0` removes it.
    pub spend_cap: Option<SpendCapBody>,
    /// Set the current billing period (RFC 3339 UTC; it must contain the current time). A
    /// later start begins a new period: usage counters reset. Later periods repeat its shape:
    /// whole months keep the anchor day, other lengths repeat.
    pub period: Option<PeriodBody>,
    /// Subscription status: active, trialing, past_due, canceled, unpaid or incomplete.
    pub status: Option<String>,
    /// Per-meter limits for a `custom` (enterprise) plan; replaces all earlier overrides.
    pub overrides: Option<BTreeMap<String, MeterOverrideBody>>,
}

/// A billing period.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodBody {
    pub start: String,
    pub end: String,
}

/// A spend cap: `amount` in minor units; `action` is `block` or `notify`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendCapBody {
    pub amount: u64,
    pub action: String,
}

/// An alert raised by a consume.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct AlertView {
    /// `usage` (of the included allowance), `spend` (of the spend cap), `low_credits`, or
    /// one of Stripe's: `payment_failed`, `money_refused` (meter: `<code> <event id>`),
    /// `credits_clawed_back` (meter: the payment intent; threshold: credits owed for it in
    /// all, value: taken now, limit: added to debt), `dispute` (meter: the dispute id; value:
    /// its amount; limit: 1 if it suspends credit use), ...
    pub kind: String,
    /// The meter, for `usage` alerts; what the alert is about, for the others.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    /// Percent for `usage` and `spend`; credits for `low_credits`.
    pub threshold: u64,
    pub value: u64,
    pub limit: u64,
    /// The ledger entry that raised it (list only).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_seq: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

pub fn alert_view(a: &Alert, fired: Option<(u64, i64)>) -> AlertView {
    AlertView {
        kind: a.kind.as_str().into(),
        meter: (!a.meter.is_empty()).then(|| a.meter.clone()),
        threshold: a.threshold,
        value: a.value,
        limit: a.limit,
        ledger_seq: fired.map(|f| f.0),
        at: fired.map(|f| format_rfc3339(f.1)),
    }
}

/// `GET /v1/accounts/{id}/alerts`: the alerts of the current period, oldest first.
#[derive(Debug, Object)]
pub struct AlertsPage {
    pub period_start: String,
    pub alerts: Vec<AlertView>,
}

/// One meter's override on a `custom` plan.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterOverrideBody {
    pub included: Option<u64>,
    /// block, credits, bill or unlimited.
    pub overage: Option<String>,
    /// With `overage = "credits"`.
    pub credits_per_unit: Option<u64>,
}

/// `POST /v1/accounts/{id}/consume` and `/check`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumeBody {
    /// A meter declared in the config, such as `tokens`.
    pub meter: String,
    /// A positive integer, at most 2^53.
    #[oai(validator(minimum(value = "1"), maximum(value = "9007199254740992")))]
    pub quantity: u64,
    /// 1-255 visible ASCII characters; may instead come as the `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// String values only; at most 20 entries.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `POST /v1/accounts/{id}/credits`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditBody {
    /// Positive to grant, negative to adjust (burned from live grants in burn order; never
    /// below zero).
    pub amount: i64,
    #[serde(default)]
    #[oai(default)]
    pub reason: String,
    pub idempotency_key: Option<String>,
    /// Grants only. Lower burns first; 0-100, default 50.
    pub priority: Option<u32>,
    /// Grants only. RFC 3339; default now. Before it, the grant is not spendable.
    pub effective_at: Option<String>,
    /// Grants only. RFC 3339; what is left then expires (a ledger entry).
    pub expires_at: Option<String>,
    /// Grants only. `paid` or `promotional` (default).
    pub category: Option<String>,
    /// Grants only. The payment or reference behind the grant.
    pub external_id: Option<String>,
}

/// `POST /v1/accounts/{id}/topups`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopUpBody {
    /// A configured credit package, such as `credits_500`.
    pub package: String,
    /// The payment behind it (for example a Checkout Session id). A top-up is credited once
    /// per external id, however often it arrives.
    pub external_id: String,
}

/// One credit grant.
#[derive(Debug, Object)]
pub struct GrantView {
    /// The ledger entry that granted it.
    pub id: u64,
    pub amount: u64,
    pub remaining: u64,
    pub priority: u32,
    pub effective_at: String,
    #[oai(skip_serializing_if_is_none)]
    pub expires_at: Option<String>,
    pub category: String,
    #[oai(skip_serializing_if_is_none)]
    pub external_id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub package: Option<String>,
    /// Spendable now.
    pub live: bool,
}

/// `GET /v1/accounts/{id}/credits`.
#[derive(Debug, Object)]
pub struct CreditsPage {
    /// The live balance: the sum of live grants.
    pub balance: u64,
    /// Credits owed back (refunded or lost-dispute top-ups) and not covered yet: while above
    /// 0 credits cannot be spent, and new credits pay it first.
    pub debt: u64,
    /// Why credits cannot be spent now, if they cannot: `credit_debt` or `dispute_open`.
    #[oai(skip_serializing_if_is_none)]
    pub blocked: Option<String>,
    /// Open disputes (ids) that suspend credit use until they close.
    pub open_disputes: Vec<String>,
    /// Grants in burn order first (live ones), then the rest.
    pub grants: Vec<GrantView>,
}

/// `POST /v1/accounts/{id}/reservations`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    pub meter: String,
    /// Units to hold: a positive integer, at most 2^53.
    pub quantity: u64,
    /// How long the hold lives, 1 to 86400 seconds (default 300); then it is released.
    pub ttl_s: Option<u64>,
    pub idempotency_key: Option<String>,
}

/// `POST /v1/reservations/{rid}/commit`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    /// The actual quantity (0 to 2^53). Above the held quantity only if capacity allows.
    pub quantity: u64,
}

/// A reservation that holds capacity.
#[derive(Debug, Object)]
pub struct ReservationResult {
    /// Pass to `/v1/reservations/{id}/commit` or `/release`.
    pub reservation_id: String,
    pub account_id: String,
    pub quantity: u64,
    pub expires_at: String,
    pub ledger_seq: u64,
    pub meter: MeterState,
    pub credits: CreditsView,
}

/// A committed or released reservation.
#[derive(Debug, Object)]
pub struct SettleResult {
    pub reservation_id: String,
    /// `committed` or `released`.
    pub status: String,
    /// The committed quantity.
    #[oai(skip_serializing_if_is_none)]
    pub quantity: Option<u64>,
    pub ledger_seq: u64,
    pub meter: MeterState,
    pub credits: CreditsView,
    /// Alerts the commit raised (as a consume would).
    pub alerts: Vec<AlertView>,
}

/// `rsv_{seq}_{account_id}`: the account is part of the id, so the route finds its actor.
pub fn reservation_id(account: &str, seq: u64) -> String {
    format!("rsv_{seq}_{account}")
}

pub fn parse_reservation_id(rid: &str) -> Option<(String, u64)> {
    let rest = rid.strip_prefix("rsv_")?;
    let (seq, account) = rest.split_once('_')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((account.to_owned(), seq.parse().ok()?))
}

/// One meter's state.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct MeterState {
    pub name: String,
    /// Units used in the current period.
    pub used: u64,
    /// Units held by open reservations (reservation answers only).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved: Option<u64>,
    /// Units the plan includes per period.
    pub included: u64,
    /// The most `used` may reach now; absent when nothing limits it.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Billable overage units this period.
    pub billable: u64,
}

#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct CreditsView {
    pub balance: u64,
    /// Credits this request spent (consume only).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent: Option<u64>,
    /// Credits owed back after a refund or lost dispute of a top-up and not covered yet (on
    /// account reads; absent when 0). New credits pay it first.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debt: Option<u64>,
    /// Why credits cannot be spent now, if they cannot (account reads): `credit_debt` or
    /// `dispute_open`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

/// The answer to a consume (200) or a check.
#[derive(Debug, Object)]
pub struct ConsumeResult {
    pub allowed: bool,
    /// For a check that would be denied: the code a consume would get.
    #[oai(skip_serializing_if_is_none)]
    pub code: Option<String>,
    /// The ledger entry of this decision (absent for a check).
    #[oai(skip_serializing_if_is_none)]
    pub ledger_seq: Option<u64>,
    pub quantity: u64,
    pub meter: MeterState,
    pub credits: CreditsView,
    /// Alerts this consume raised (empty for most).
    pub alerts: Vec<AlertView>,
}

pub fn meter_state(r: &ConsumeRecord) -> MeterState {
    MeterState {
        name: r.meter.clone(),
        used: r.used_after,
        reserved: None,
        included: r.included,
        limit: r.limit,
        remaining: r.limit.map(|l| l.saturating_sub(r.used_after)),
        billable: r.billable_after,
    }
}

pub fn consume_result(reply: &ConsumeReply) -> ConsumeResult {
    let r = &reply.record;
    ConsumeResult {
        allowed: r.outcome == Outcome::Allowed,
        code: match r.outcome {
            Outcome::Allowed => None,
            Outcome::Denied(c) => Some(c.as_str().to_owned()),
        },
        ledger_seq: reply.seq,
        quantity: r.quantity,
        meter: meter_state(r),
        credits: CreditsView {
            balance: r.credits_after,
            spent: Some(r.credits_spent),
            debt: None,
            blocked: None,
        },
        alerts: r.alerts.iter().map(|a| alert_view(a, None)).collect(),
    }
}

#[derive(Debug, Object)]
pub struct CreditResult {
    pub ledger_seq: u64,
    pub amount: i64,
    pub credits: CreditsView,
}

pub fn credit_result(reply: &CreditReply) -> CreditResult {
    CreditResult {
        ledger_seq: reply.seq,
        amount: reply.record.amount,
        credits: CreditsView {
            balance: reply.record.credits_after,
            spent: None,
            debt: None,
            blocked: None,
        },
    }
}

#[derive(Debug, Object)]
pub struct PeriodView {
    pub start: String,
    pub end: String,
}

#[derive(Debug, Object)]
pub struct AccountMeterView {
    pub used: u64,
    /// Held by open reservations; counts against limits.
    pub reserved: u64,
    pub included: u64,
    #[oai(skip_serializing_if_is_none)]
    pub limit: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub remaining: Option<u64>,
    pub billable: u64,
    /// block, credits, bill or unlimited.
    pub overage: String,
}

/// What the period costs so far, in minor units of `currency`. Exact: each priced line is
/// computed exactly and rounded once, half up; the total is the sum of the lines.
#[derive(Debug, Object)]
pub struct CostView {
    pub currency: String,
    /// The plan's base fee.
    pub base: u64,
    /// Seat price × max(seats, min_seats).
    pub seats: u64,
    /// Priced overage of billed meters.
    pub usage: u64,
    pub total: u64,
    /// `total` with the usage part projected linearly to the end of the period.
    pub projected_total: u64,
    /// Per billed meter: billable units and their amount.
    pub meters: BTreeMap<String, MeterCostView>,
}

#[derive(Debug, Object)]
pub struct MeterCostView {
    pub billable_units: u64,
    pub amount: u64,
}

#[derive(Debug, Object)]
pub struct AccountResult {
    pub id: String,
    pub plan: String,
    /// free, metered, flat, seat, custom or prepaid.
    pub plan_kind: String,
    /// Subscription status: active, trialing, past_due, canceled, unpaid or incomplete.
    pub status: String,
    /// `allowed`, `grace_period` (past_due, still allowed) or `denied`.
    pub access: String,
    /// End of the past_due grace period.
    #[oai(skip_serializing_if_is_none)]
    pub grace_until: Option<String>,
    pub seats: u32,
    #[oai(skip_serializing_if_is_none)]
    pub email: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub stripe_customer_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: String,
    pub period: PeriodView,
    pub meters: BTreeMap<String, AccountMeterView>,
    pub credits: CreditsView,
    pub features: Vec<String>,
    /// The latest ledger entry.
    pub ledger_seq: u64,
    /// Absent only if the plan's prices cannot price the usage (see the log).
    #[oai(skip_serializing_if_is_none)]
    pub cost: Option<CostView>,
    /// The spend cap in force (the account's, else the plan's).
    #[oai(skip_serializing_if_is_none)]
    pub spend_cap: Option<SpendCapView>,
    /// A flat plan that would cost less than this period's pay-as-you-go spend.
    #[oai(skip_serializing_if_is_none)]
    pub suggested_plan: Option<String>,
    /// What Stripe's webhooks told about the account; absent until the first one.
    #[oai(skip_serializing_if_is_none)]
    pub stripe: Option<StripeStateView>,
}

/// An account's state as Stripe's webhooks described it.
#[derive(Debug, Object)]
pub struct StripeStateView {
    #[oai(skip_serializing_if_is_none)]
    pub subscription: Option<SubscriptionView>,
    /// Subscriptions Stripe deleted (never brought back by a late event).
    pub ended_subscriptions: Vec<String>,
    /// Stripe Entitlements features (lookup keys) of the customer.
    pub features: Vec<String>,
    pub delinquent: bool,
    #[oai(skip_serializing_if_is_none)]
    pub default_payment_method: Option<String>,
    /// Payment methods attached to the customer.
    pub payment_methods: Vec<String>,
    /// Invalid meter events Stripe reported for the account.
    pub meter_errors: u64,
    /// Stripe events applied.
    pub events_applied: u64,
}

#[derive(Debug, Object)]
pub struct SubscriptionView {
    pub id: String,
    /// Stripe's status.
    pub status: String,
    #[oai(skip_serializing_if_is_none)]
    pub plan: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub seats: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub current_period_start: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub current_period_end: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub trial_end: Option<String>,
    pub cancel_at_period_end: bool,
    pub items: Vec<SubscriptionItemView>,
}

#[derive(Debug, Object)]
pub struct SubscriptionItemView {
    pub id: String,
    pub price: String,
    /// `licensed` or `metered`.
    pub usage_type: String,
    #[oai(skip_serializing_if_is_none)]
    pub quantity: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub meter: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub plan: Option<String>,
}

/// Unix seconds as RFC 3339 (Stripe's times).
pub fn unix_s(s: Option<i64>) -> Option<String> {
    s.and_then(|s| s.checked_mul(1000)).map(format_rfc3339)
}

pub fn stripe_state_view(b: &meterd_actors::billing::BillingState) -> Option<StripeStateView> {
    if b.events_applied == 0 {
        return None;
    }
    Some(StripeStateView {
        subscription: b.subscription.as_ref().map(|s| SubscriptionView {
            id: s.id.clone(),
            status: s.status.clone(),
            plan: s.plan.clone(),
            seats: s.seats,
            current_period_start: unix_s(s.period.map(|p| p.0)),
            current_period_end: unix_s(s.period.map(|p| p.1)),
            trial_end: unix_s(s.trial_end_s),
            cancel_at_period_end: s.cancel_at_period_end,
            items: s
                .items
                .iter()
                .map(|i| SubscriptionItemView {
                    id: i.id.clone(),
                    price: i.price.clone(),
                    usage_type: i.usage_type.clone(),
                    quantity: i.quantity,
                    meter: i.meter.clone(),
                    plan: i.plan.clone(),
                })
                .collect(),
        }),
        ended_subscriptions: b.ended_subscriptions.clone(),
        features: b.features.clone(),
        delinquent: b.delinquent,
        default_payment_method: b.default_payment_method.clone(),
        payment_methods: b
            .payment_methods
            .iter()
            .filter(|p| p.attached)
            .map(|p| p.id.clone())
            .collect(),
        meter_errors: b.meter_errors,
        events_applied: b.events_applied,
    })
}

fn meter_view(m: &MeterView) -> AccountMeterView {
    AccountMeterView {
        used: m.used,
        reserved: m.reserved,
        included: m.included,
        limit: m.limit,
        remaining: m.remaining,
        billable: m.billable,
        overage: m.overage.to_owned(),
    }
}

pub fn account_result(v: &AccountView) -> AccountResult {
    AccountResult {
        id: v.id.to_string(),
        plan: v.profile.plan.clone(),
        plan_kind: v.plan_kind.to_owned(),
        status: v.profile.status.as_str().into(),
        access: match v.access {
            Access::Allowed => "allowed",
            Access::Grace { .. } => "grace_period",
            Access::Denied => "denied",
        }
        .into(),
        grace_until: match v.access {
            Access::Grace { until_ms } => Some(format_rfc3339(until_ms)),
            _ => None,
        },
        seats: v.profile.seats,
        email: v.profile.email.clone(),
        stripe_customer_id: v.profile.stripe_customer_id.clone(),
        metadata: v.profile.metadata.iter().cloned().collect(),
        created_at: format_rfc3339(v.profile.created_at_ms),
        period: PeriodView {
            start: format_rfc3339(v.period.start_ms),
            end: format_rfc3339(v.period.end_ms),
        },
        meters: v
            .meters
            .iter()
            .map(|m| (m.meter.clone(), meter_view(m)))
            .collect(),
        credits: CreditsView {
            balance: v.credits,
            spent: None,
            debt: (v.credit_debt > 0).then_some(v.credit_debt),
            blocked: v.credits_blocked().map(str::to_owned),
        },
        features: v.features.clone(),
        ledger_seq: v.last_seq,
        cost: v.cost.as_ref().ok().map(|c| {
            let usage: u64 = c.meters.values().map(|m| m.amount).sum();
            CostView {
                currency: v.plan.currency.clone(),
                base: c.base,
                seats: c.seats,
                usage,
                total: c.total,
                projected_total: c
                    .base
                    .saturating_add(c.seats)
                    .saturating_add(v.projected_usage.max(usage)),
                meters: c
                    .meters
                    .iter()
                    .map(|(m, mc)| {
                        (
                            m.clone(),
                            MeterCostView {
                                billable_units: mc.billable_units,
                                amount: mc.amount,
                            },
                        )
                    })
                    .collect(),
            }
        }),
        suggested_plan: v.suggested_plan.clone(),
        stripe: stripe_state_view(&v.billing),
        spend_cap: meterd_actors::plan::effective_spend_cap(&v.plan, &v.profile).map(|c| {
            SpendCapView {
                amount: c.amount,
                action: c.action.as_str().into(),
            }
        }),
    }
}

#[derive(Debug, Object)]
pub struct SpendCapView {
    pub amount: u64,
    /// `block` or `notify`.
    pub action: String,
}

/// One entitlement: may the account use this, and why (or why not).
#[derive(Debug, Object)]
pub struct EntitlementView {
    pub allowed: bool,
    /// `active`, `trialing`, `grace_period`, `subscription_inactive`, `not_in_plan`,
    /// `cap_reached` or `insufficient_credits`.
    pub reason: String,
}

pub fn entitlement_view(e: &Entitlement) -> EntitlementView {
    EntitlementView {
        allowed: e.allowed,
        reason: e.reason.to_owned(),
    }
}

/// Everything the account is entitled to (`hasFeatureAccess`, `hasTokensRemaining`,
/// `getSubscriptionStatus` in one answer).
#[derive(Debug, Object)]
pub struct EntitlementsView {
    pub status: String,
    #[oai(skip_serializing_if_is_none)]
    pub grace_until: Option<String>,
    /// Every feature of the plan.
    pub features: BTreeMap<String, EntitlementView>,
    /// Every meter of the plan: can it take one more unit?
    pub meters: BTreeMap<String, EntitlementView>,
}

pub fn entitlements_view(v: &AccountView) -> EntitlementsView {
    EntitlementsView {
        status: v.profile.status.as_str().into(),
        grace_until: match v.access {
            Access::Grace { until_ms } => Some(format_rfc3339(until_ms)),
            _ => None,
        },
        features: v
            .features
            .iter()
            .map(|f| (f.clone(), entitlement_view(&v.feature(f))))
            .collect(),
        meters: v
            .meter_entitlements
            .iter()
            .map(|(m, e)| (m.clone(), entitlement_view(e)))
            .collect(),
    }
}
