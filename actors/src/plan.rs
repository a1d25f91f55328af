//! What an account's plan allows: effective meter rules (with per-account overrides for
//! `custom` plans), access by subscription status, and entitlements.
//!
//! Pure: no I/O, no clock (callers pass `now`). This module never changes state; the account
//! actor asks it and records the answer. It is the meterd equivalent of the seeds'
//! `hasFeatureAccess`, `hasTokensRemaining` and `getSubscriptionStatus`.

use std::collections::BTreeMap;

use crate::ledger::{AccountProfile, Balances, meter_limit};
use crate::model::{
    Alert, AlertKind, Catalog, MeterRule, Overage, Plan, PlanKind, SpendCap, SubscriptionStatus,
    UnixMs,
};
use crate::pricing::{MeterPricing, PeriodCost, PlanPricing, PricingError, period_cost};

/// Whether the account may use what its plan offers right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `active` or `trialing`.
    Allowed,
    /// `past_due`, inside the grace period that ends at `until_ms`.
    Grace { until_ms: UnixMs },
    /// `past_due` after the grace period, `canceled`, `unpaid` or `incomplete`.
    Denied,
}

/// The access rule of each status. `since_ms` is when the status was set.
pub fn access(status: SubscriptionStatus, since_ms: UnixMs, now: UnixMs, grace_ms: i64) -> Access {
    match status {
        SubscriptionStatus::Active | SubscriptionStatus::Trialing => Access::Allowed,
        SubscriptionStatus::PastDue => {
            let until_ms = since_ms.saturating_add(grace_ms);
            if now < until_ms {
                Access::Grace { until_ms }
            } else {
                Access::Denied
            }
        }
        SubscriptionStatus::Canceled
        | SubscriptionStatus::Unpaid
        | SubscriptionStatus::Incomplete => Access::Denied,
    }
}

/// The rule that applies to `meter` for this account: the plan's, with the account's
/// overrides on top for a `custom` plan. `None`: the plan does not offer the meter.
pub fn effective_rule(plan: &Plan, profile: &AccountProfile, meter: &str) -> Option<MeterRule> {
    let base = plan.meters.get(meter);
    let ov = if plan.kind == PlanKind::Custom {
        profile.overrides.get(meter)
    } else {
        None
    };
    match (base, ov) {
        (None, None) => None,
        (Some(b), None) => Some(b.clone()),
        (b, Some(o)) => {
            let mut rule = b.cloned().unwrap_or(MeterRule {
                included: 0,
                overage: Overage::Block,
                price: None,
            });
            if let Some(i) = o.included {
                rule.included = i;
            }
            if let Some(p) = o.overage {
                rule.overage = p.into();
            }
            Some(rule)
        }
    }
}

/// The effective rules of every meter the account can use.
pub fn effective_rules(plan: &Plan, profile: &AccountProfile) -> BTreeMap<String, MeterRule> {
    let mut names: Vec<&String> = plan.meters.keys().collect();
    if plan.kind == PlanKind::Custom {
        names.extend(profile.overrides.keys());
    }
    names
        .into_iter()
        .filter_map(|m| effective_rule(plan, profile, m).map(|r| (m.clone(), r)))
        .collect()
}

/// The plan's prices for this account: base fee, seats, and every billed meter's model.
pub fn plan_pricing(plan: &Plan, profile: &AccountProfile) -> PlanPricing {
    let meters = effective_rules(plan, profile)
        .into_iter()
        .filter_map(|(name, rule)| {
            rule.price.map(|model| {
                (
                    name,
                    MeterPricing {
                        included: rule.included,
                        model,
                    },
                )
            })
        })
        .collect();
    PlanPricing {
        base_price: plan.base_price,
        seat_price: plan.seat_price,
        min_seats: plan.min_seats,
        meters,
    }
}

/// The cost of the period so far: base fee + seats + priced overage of billed meters.
/// Meters without a price (capped, credit-paid, unlimited) cost nothing per unit.
pub fn current_cost(
    plan: &Plan,
    profile: &AccountProfile,
    balances: &Balances,
) -> Result<PeriodCost, PricingError> {
    let pricing = plan_pricing(plan, profile);
    let usage: BTreeMap<String, u64> = pricing
        .meters
        .keys()
        .map(|m| (m.clone(), balances.usage(m).used))
        .collect();
    period_cost(&pricing, profile.seats, &usage)
}

/// Seed 000's upgrade path: when a pay-as-you-go (`metered`) account's usage spend this
/// period passes the price of a flat plan, suggest the cheapest such flat plan.
pub fn suggested_plan(catalog: &Catalog, plan: &Plan, cost: &PeriodCost) -> Option<String> {
    if plan.kind != PlanKind::Metered {
        return None;
    }
    catalog
        .plans
        .values()
        .filter(|p| p.kind == PlanKind::Flat && p.currency == plan.currency)
        .filter(|p| p.base_price > 0 && cost.total > p.base_price)
        .min_by_key(|p| p.base_price)
        .map(|p| p.name.clone())
}

/// The account's spend cap: its own, else its plan's. An amount of 0 means none.
pub fn effective_spend_cap(plan: &Plan, profile: &AccountProfile) -> Option<SpendCap> {
    profile
        .spend_cap
        .or(plan.spend_cap)
        .filter(|c| c.amount > 0)
}

/// The usage part of the period's cost if `meter` had `used` units (others as they are).
pub fn usage_cost_with(
    plan: &Plan,
    profile: &AccountProfile,
    balances: &Balances,
    meter: &str,
    used: u64,
) -> Result<u64, PricingError> {
    let pricing = plan_pricing(plan, profile);
    let usage: BTreeMap<String, u64> = pricing
        .meters
        .keys()
        .map(|m| {
            // Other meters count with their held units: a hold is spend to come.
            let u = if m == meter {
                used
            } else {
                balances.usage(m).occupied()
            };
            (m.clone(), u)
        })
        .collect();
    let cost = period_cost(&pricing, profile.seats, &usage)?;
    Ok(cost.meters.values().map(|m| m.amount).sum())
}

/// The alerts a consume raises: allowance thresholds of `meter`, spend-cap thresholds, and the
/// low-credit threshold, each only if it has not fired in this period yet.
#[allow(clippy::too_many_arguments)]
pub fn alerts_for(
    plan: &Plan,
    rule: &MeterRule,
    balances: &Balances,
    meter: &str,
    used_after: u64,
    credits_after: u64,
    spend: Option<(u64, SpendCap)>,
) -> Vec<Alert> {
    let mut out = Vec::new();
    let thresholds: Vec<u64> = plan
        .alert_thresholds
        .iter()
        .map(|t| u64::from(*t))
        .collect();
    if rule.included > 0 {
        for &t in &thresholds {
            let reached = u128::from(used_after) * 100 >= u128::from(t) * u128::from(rule.included);
            if reached && !balances.alert_fired(AlertKind::Usage, meter, t) {
                out.push(Alert {
                    kind: AlertKind::Usage,
                    meter: meter.to_owned(),
                    threshold: t,
                    value: used_after,
                    limit: rule.included,
                });
            }
        }
    }
    if let Some((spent, cap)) = spend {
        for &t in &thresholds {
            let reached = u128::from(spent) * 100 >= u128::from(t) * u128::from(cap.amount);
            if reached && !balances.alert_fired(AlertKind::Spend, "", t) {
                out.push(Alert {
                    kind: AlertKind::Spend,
                    meter: String::new(),
                    threshold: t,
                    value: spent,
                    limit: cap.amount,
                });
            }
        }
    }
    if let Some(low) = plan.low_credit_threshold
        && matches!(rule.overage, Overage::Credits { .. })
        && credits_after < low
        && !balances.alert_fired(AlertKind::LowCredits, "", low)
    {
        out.push(Alert {
            kind: AlertKind::LowCredits,
            meter: String::new(),
            threshold: low,
            value: credits_after,
            limit: low,
        });
    }
    out
}

/// One entitlement answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlement {
    pub allowed: bool,
    /// `active`, `trialing`, `grace_period`, `subscription_inactive`, `not_in_plan`,
    /// `cap_reached` or `insufficient_credits`.
    pub reason: &'static str,
}

fn access_reason(status: SubscriptionStatus, access: Access) -> Entitlement {
    match access {
        Access::Allowed => Entitlement {
            allowed: true,
            reason: status.as_str(),
        },
        Access::Grace { .. } => Entitlement {
            allowed: true,
            reason: "grace_period",
        },
        Access::Denied => Entitlement {
            allowed: false,
            reason: "subscription_inactive",
        },
    }
}

/// May the account use `feature`?
pub fn feature_entitlement(
    plan: &Plan,
    status: SubscriptionStatus,
    access: Access,
    feature: &str,
) -> Entitlement {
    if !plan.features.iter().any(|f| f == feature) {
        return Entitlement {
            allowed: false,
            reason: "not_in_plan",
        };
    }
    access_reason(status, access)
}

/// May the account consume at least one more unit of `meter`?
pub fn meter_entitlement(
    rule: Option<&MeterRule>,
    balances: &Balances,
    credits: u64,
    status: SubscriptionStatus,
    access: Access,
    meter: &str,
) -> Entitlement {
    let Some(rule) = rule else {
        return Entitlement {
            allowed: false,
            reason: "not_in_plan",
        };
    };
    let by_status = access_reason(status, access);
    if !by_status.allowed {
        return by_status;
    }
    let usage = balances.usage(meter);
    match meter_limit(rule, usage, credits) {
        Some(limit) if usage.used >= limit => Entitlement {
            allowed: false,
            reason: match rule.overage {
                Overage::Credits { .. } => "insufficient_credits",
                _ => "cap_reached",
            },
        },
        _ => by_status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::MeterUsage;
    use crate::model::{MeterOverride, OverageOverride, Period};

    const HOUR: i64 = 3_600_000;

    fn plan(kind: PlanKind) -> Plan {
        Plan {
            name: "p".into(),
            kind,
            currency: "usd".into(),
            base_price: 0,
            seat_price: 0,
            min_seats: 0,
            features: vec!["basic".into(), "premium".into()],
            alert_thresholds: vec![50, 80, 95, 100],
            low_credit_threshold: None,
            spend_cap: None,
            monthly_credits: 0,
            monthly_credits_rollover_cap: None,
            meters: BTreeMap::from([(
                "tokens".into(),
                MeterRule {
                    included: 100,
                    overage: Overage::Block,
                    price: None,
                },
            )]),
        }
    }

    fn profile() -> AccountProfile {
        AccountProfile {
            plan: "p".into(),
            seats: 1,
            email: None,
            stripe_customer_id: None,
            metadata: vec![],
            created_at_ms: 0,
            status: SubscriptionStatus::Active,
            status_since_ms: 0,
            overrides: BTreeMap::new(),
            spend_cap: None,
        }
    }

    #[test]
    fn each_status_has_its_access_rule() {
        let grace = 72 * HOUR;
        for s in [SubscriptionStatus::Active, SubscriptionStatus::Trialing] {
            assert_eq!(access(s, 0, 10 * grace, grace), Access::Allowed);
        }
        assert_eq!(
            access(SubscriptionStatus::PastDue, 1000, 1000 + grace - 1, grace),
            Access::Grace {
                until_ms: 1000 + grace
            }
        );
        assert_eq!(
            access(SubscriptionStatus::PastDue, 1000, 1000 + grace, grace),
            Access::Denied
        );
        for s in [
            SubscriptionStatus::Canceled,
            SubscriptionStatus::Unpaid,
            SubscriptionStatus::Incomplete,
        ] {
            assert_eq!(access(s, 0, 0, grace), Access::Denied);
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in SubscriptionStatus::ALL {
            assert_eq!(SubscriptionStatus::parse(s.as_str()).unwrap(), s);
        }
        assert!(SubscriptionStatus::parse("trial").is_err());
    }

    #[test]
    fn feature_entitlements_give_the_reason() {
        let p = plan(PlanKind::Flat);
        let active = SubscriptionStatus::Active;
        let e = feature_entitlement(&p, active, Access::Allowed, "premium");
        assert_eq!((e.allowed, e.reason), (true, "active"));
        let e = feature_entitlement(&p, active, Access::Allowed, "sso");
        assert_eq!((e.allowed, e.reason), (false, "not_in_plan"));
        let due = SubscriptionStatus::PastDue;
        let e = feature_entitlement(&p, due, Access::Grace { until_ms: 5 }, "basic");
        assert_eq!((e.allowed, e.reason), (true, "grace_period"));
        let e = feature_entitlement(&p, due, Access::Denied, "basic");
        assert_eq!((e.allowed, e.reason), (false, "subscription_inactive"));
    }

    #[test]
    fn meter_entitlement_reports_an_exhausted_cap() {
        let p = plan(PlanKind::Free);
        let rule = p.meters.get("tokens");
        let mut b = Balances::new(Period {
            start_ms: 0,
            end_ms: 10,
        });
        let active = SubscriptionStatus::Active;
        assert!(meter_entitlement(rule, &b, 0, active, Access::Allowed, "tokens").allowed);
        b.meters.insert(
            "tokens".into(),
            MeterUsage {
                used: 100,
                billable: 0,
                reserved: 0,
            },
        );
        let e = meter_entitlement(rule, &b, 0, active, Access::Allowed, "tokens");
        assert_eq!((e.allowed, e.reason), (false, "cap_reached"));
        let e = meter_entitlement(None, &b, 0, active, Access::Allowed, "images");
        assert_eq!((e.allowed, e.reason), (false, "not_in_plan"));
    }

    #[test]
    fn overrides_apply_only_to_custom_plans() {
        let mut prof = profile();
        prof.overrides.insert(
            "tokens".into(),
            MeterOverride {
                included: Some(5000),
                overage: Some(OverageOverride::Bill),
            },
        );
        prof.overrides.insert(
            "images".into(),
            MeterOverride {
                included: Some(10),
                overage: None,
            },
        );
        let custom = effective_rules(&plan(PlanKind::Custom), &prof);
        assert_eq!(custom["tokens"].included, 5000);
        assert_eq!(custom["tokens"].overage, Overage::Bill);
        assert_eq!(custom["images"].included, 10);
        assert_eq!(custom["images"].overage, Overage::Block);
        let flat = effective_rules(&plan(PlanKind::Flat), &prof);
        assert_eq!(flat["tokens"].included, 100);
        assert!(!flat.contains_key("images"));
    }
}
