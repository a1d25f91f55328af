//! The pure decisions the account actor records: consume, commit and release against the
//! balances, caps, credits and spend caps. Each returns everything the ledger entry needs, so
//! a replay answers identically and the fold can check the recorded results.

use super::*;

/// The most a meter's `used` may reach right now, or `None` when nothing limits it.
pub fn meter_limit(rule: &MeterRule, usage: MeterUsage, credits: u64) -> Option<u64> {
    match rule.overage {
        Overage::Block => Some(rule.included),
        // What is used, plus what is still included, plus what the balance can buy.
        Overage::Credits { credits_per_unit } => Some(
            usage
                .occupied()
                .max(rule.included)
                .saturating_add(credits / credits_per_unit.max(1)),
        ),
        Overage::Bill | Overage::Unlimited => None,
    }
}

/// The pure decision for one consume: what the record will say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeDecision {
    pub outcome: Outcome,
    pub billable: u64,
    pub credits_spent: u64,
    pub burns: Vec<(u64, u64)>,
    pub included: u64,
    pub limit: Option<u64>,
    pub used_after: u64,
    pub billable_after: u64,
    pub credits_after: u64,
}

/// Decides whether `quantity` units of a meter may be consumed given the current balances,
/// the plan's rule for the meter (`None`: the plan does not offer the meter) and whether the
/// subscription grants access. All or nothing: a request is never partly allowed.
pub fn decide_consume(
    balances: &Balances,
    meter: &str,
    rule: Option<&MeterRule>,
    quantity: u64,
    subscription_active: bool,
    at: UnixMs,
) -> ConsumeDecision {
    let usage = balances.usage(meter);
    let credits = balances.live_credits(at);
    let deny = |code, included, limit| ConsumeDecision {
        outcome: Outcome::Denied(code),
        billable: 0,
        credits_spent: 0,
        burns: Vec::new(),
        included,
        limit,
        used_after: usage.used,
        billable_after: usage.billable,
        credits_after: credits,
    };
    let Some(rule) = rule else {
        return deny(DenyCode::MeterNotInPlan, 0, Some(0));
    };
    let included = rule.included;
    if !subscription_active {
        let limit = meter_limit(rule, usage, credits);
        return deny(DenyCode::SubscriptionInactive, included, limit);
    }
    let within = included.saturating_sub(usage.occupied()).min(quantity);
    let over = quantity - within;
    let (Some(used_after), Some(_)) = (
        usage.used.checked_add(quantity),
        usage.occupied().checked_add(quantity),
    ) else {
        return deny(DenyCode::CapReached, included, Some(usage.used));
    };
    let allow = |billable: u64, burns: Vec<(u64, u64)>, limit| {
        let billable_after = usage.billable.checked_add(billable)?;
        let credits_spent = burns.iter().map(|(_, n)| n).sum::<u64>();
        Some(ConsumeDecision {
            outcome: Outcome::Allowed,
            billable,
            credits_spent,
            burns,
            included,
            limit,
            used_after,
            billable_after,
            credits_after: credits - credits_spent,
        })
    };
    let decided = match rule.overage {
        Overage::Block => {
            if over > 0 {
                None
            } else {
                allow(0, Vec::new(), Some(included))
            }
        }
        Overage::Credits { credits_per_unit } => {
            let limit = meter_limit(rule, usage, credits).unwrap_or(u64::MAX);
            match over
                .checked_mul(credits_per_unit)
                .and_then(|cost| balances.burn_plan(at, cost))
            {
                Some(burns) => allow(0, burns, Some(limit)),
                None => return deny(DenyCode::InsufficientCredits, included, Some(limit)),
            }
        }
        Overage::Bill => allow(over, Vec::new(), None),
        Overage::Unlimited => allow(0, Vec::new(), None),
    };
    decided.unwrap_or_else(|| deny(DenyCode::CapReached, included, Some(included)))
}

/// How a commit of `actual` units settles reservation `rid`: the hold's capacity is released
/// and `actual` is decided against it in the same step, so a commit up to the held quantity
/// always fits, and more only if capacity allows. Credits the hold took pay first (`kept`);
/// what they do not cover burns from live grants; what is not needed goes back.
pub fn decide_commit(
    balances: &Balances,
    rid: u64,
    rule: Option<&MeterRule>,
    actual: u64,
    at: UnixMs,
) -> Result<SettleRecord, DenyCode> {
    let Some(hold) = balances.holds.get(&rid) else {
        return Err(DenyCode::MeterNotInPlan);
    };
    let Some(rule) = rule else {
        return Err(DenyCode::MeterNotInPlan);
    };
    let usage = balances.usage(&hold.meter);
    let mut free = usage;
    free.reserved -= hold.quantity.min(free.reserved);
    let within = rule.included.saturating_sub(free.occupied()).min(actual);
    let over = actual - within;
    let used_after = usage.used.checked_add(actual).ok_or(DenyCode::CapReached)?;
    let held: u64 = hold.burns.iter().map(|(_, n)| n).sum();
    let (billable, kept, burns) = match rule.overage {
        Overage::Block if over > 0 => return Err(DenyCode::CapReached),
        Overage::Block | Overage::Unlimited => (0, 0, Vec::new()),
        Overage::Bill => (over, 0, Vec::new()),
        Overage::Credits { credits_per_unit } => {
            let cost = over
                .checked_mul(credits_per_unit)
                .ok_or(DenyCode::InsufficientCredits)?;
            let kept = cost.min(held);
            let burns = balances
                .burn_plan(at, cost - kept)
                .ok_or(DenyCode::InsufficientCredits)?;
            (0, kept, burns)
        }
    };
    let refunds = split_refunds(&hold.burns, kept);
    // The credit balance after: refunds back into their grants, new burns out of theirs.
    let mut sim = balances.clone();
    sim.holds.remove(&rid);
    sim.refund(0, &refunds)
        .map_err(|_| DenyCode::InsufficientCredits)?;
    for (id, n) in &burns {
        if let Some(g) = sim.grants.get_mut(id) {
            g.remaining = g.remaining.saturating_sub(*n);
        }
    }
    Ok(SettleRecord {
        rid,
        meter: hold.meter.clone(),
        committed: Some(actual),
        expired: false,
        billable,
        kept,
        refunds,
        burns,
        used_after,
        reserved_after: free.reserved,
        billable_after: usage
            .billable
            .checked_add(billable)
            .ok_or(DenyCode::CapReached)?,
        credits_after: sim.live_credits(at),
        alerts: Vec::new(),
    })
}

/// How a release (or expiry) of reservation `rid` settles: everything goes back.
pub fn decide_release(
    balances: &Balances,
    rid: u64,
    expired: bool,
    at: UnixMs,
) -> Option<SettleRecord> {
    let hold = balances.holds.get(&rid)?;
    let usage = balances.usage(&hold.meter);
    let mut sim = balances.clone();
    sim.holds.remove(&rid);
    sim.refund(0, &hold.burns).ok()?;
    Some(SettleRecord {
        rid,
        meter: hold.meter.clone(),
        committed: None,
        expired,
        billable: 0,
        kept: 0,
        refunds: hold.burns.clone(),
        burns: Vec::new(),
        used_after: usage.used,
        reserved_after: usage.reserved.saturating_sub(hold.quantity),
        billable_after: usage.billable,
        credits_after: sim.live_credits(at),
        alerts: Vec::new(),
    })
}

/// The hold's burns minus the first `kept` credits (kept pays for the commit).
pub(super) fn split_refunds(burns: &[(u64, u64)], kept: u64) -> Vec<(u64, u64)> {
    let mut keep = kept;
    let mut out = Vec::new();
    for (id, n) in burns {
        let k = keep.min(*n);
        keep -= k;
        if n - k > 0 {
            out.push((*id, n - k));
        }
    }
    out
}
