//! Request and response bodies of the HTTP API, and their conversion from domain types.
//!
//! Domain and storage types are never serialized directly: this module is the API's own
//! vocabulary, so the ledger format can change without changing the API.

use std::collections::BTreeMap;

use poem_openapi::Object;
use serde::Deserialize;

use meterd_actors::account::{AccountView, ConsumeReply, CreditReply, MeterView};
use meterd_actors::ledger::{ConsumeRecord, EntryKind, LedgerEntry, Outcome};
use meterd_actors::model::format_rfc3339;
use meterd_actors::plan::{Access, Entitlement};

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
    /// Subscription status: active, trialing, past_due, canceled, unpaid or incomplete.
    pub status: Option<String>,
    /// Per-meter limits for a `custom` (enterprise) plan; replaces all earlier overrides.
    pub overrides: Option<BTreeMap<String, MeterOverrideBody>>,
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
    /// Positive to grant, negative to adjust (never below zero).
    pub amount: i64,
    #[serde(default)]
    #[oai(default)]
    pub reason: String,
    pub idempotency_key: Option<String>,
}

/// One meter's state.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct MeterState {
    pub name: String,
    /// Units used in the current period.
    pub used: u64,
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
}

pub fn meter_state(r: &ConsumeRecord) -> MeterState {
    MeterState {
        name: r.meter.clone(),
        used: r.used_after,
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
        },
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
    pub included: u64,
    #[oai(skip_serializing_if_is_none)]
    pub limit: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub remaining: Option<u64>,
    pub billable: u64,
    /// block, credits, bill or unlimited.
    pub overage: String,
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
}

fn meter_view(m: &MeterView) -> AccountMeterView {
    AccountMeterView {
        used: m.used,
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
        },
        features: v.features.clone(),
        ledger_seq: v.last_seq,
    }
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

/// One ledger entry, flat so it maps onto one CSV row.
#[derive(Debug, Object)]
pub struct LedgerEntryView {
    pub seq: u64,
    pub at: String,
    /// account_upserted, period_rolled, consume or credit.
    pub kind: String,
    #[oai(skip_serializing_if_is_none)]
    pub meter: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub quantity: Option<u64>,
    /// allowed or denied (consume).
    #[oai(skip_serializing_if_is_none)]
    pub decision: Option<String>,
    /// Denial code (consume).
    #[oai(skip_serializing_if_is_none)]
    pub code: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub billable: Option<u64>,
    /// Change of the credit balance.
    #[oai(skip_serializing_if_is_none)]
    pub credits_delta: Option<i64>,
    #[oai(skip_serializing_if_is_none)]
    pub used_after: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub credits_after: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub idempotency_key: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub plan: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub period_start: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Object)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntryView>,
    /// Pass as `after_seq` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_after_seq: Option<u64>,
}

pub fn ledger_entry_view(e: &LedgerEntry) -> LedgerEntryView {
    let mut v = LedgerEntryView {
        seq: e.seq,
        at: format_rfc3339(e.at_ms),
        kind: e.kind.name().to_owned(),
        meter: None,
        quantity: None,
        decision: None,
        code: None,
        billable: None,
        credits_delta: None,
        used_after: None,
        credits_after: None,
        idempotency_key: None,
        plan: None,
        reason: None,
        period_start: None,
        metadata: None,
    };
    match &e.kind {
        EntryKind::AccountUpserted(p) => v.plan = Some(p.plan.clone()),
        EntryKind::PeriodRolled { to, .. } => v.period_start = Some(format_rfc3339(to.start_ms)),
        EntryKind::Consume(c) => {
            v.meter = Some(c.meter.clone());
            v.quantity = Some(c.quantity);
            let (decision, code) = match c.outcome {
                Outcome::Allowed => ("allowed", None),
                Outcome::Denied(d) => ("denied", Some(d.as_str().to_owned())),
            };
            v.decision = Some(decision.into());
            v.code = code;
            v.billable = Some(c.billable);
            v.credits_delta = Some(-i64::try_from(c.credits_spent).unwrap_or(i64::MAX));
            v.used_after = Some(c.used_after);
            v.credits_after = Some(c.credits_after);
            v.idempotency_key = Some(c.idempotency_key.clone());
            if !c.metadata.is_empty() {
                v.metadata = Some(c.metadata.iter().cloned().collect());
            }
        }
        EntryKind::Credit(c) => {
            v.credits_delta = Some(c.amount);
            v.credits_after = Some(c.credits_after);
            v.idempotency_key = Some(c.idempotency_key.clone());
            v.reason = Some(c.reason.clone());
        }
    }
    v
}

const CSV_HEADER: &str = "seq,at,kind,meter,quantity,decision,code,billable,credits_delta,used_after,credits_after,idempotency_key,plan,reason\n";

/// RFC 4180 field quoting; also defuses spreadsheet formulas in client-chosen strings.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

pub fn ledger_csv(entries: &[LedgerEntryView]) -> String {
    let mut out = String::from(CSV_HEADER);
    let num = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
    let text = |s: &Option<String>| s.as_deref().map(csv_field).unwrap_or_default();
    for e in entries {
        let row = [
            e.seq.to_string(),
            e.at.clone(),
            e.kind.clone(),
            text(&e.meter),
            num(e.quantity),
            text(&e.decision),
            text(&e.code),
            num(e.billable),
            e.credits_delta.map(|n| n.to_string()).unwrap_or_default(),
            num(e.used_after),
            num(e.credits_after),
            text(&e.idempotency_key),
            text(&e.plan),
            text(&e.reason),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_client_strings() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
    }
}
