//! The ledger: what one account's history is made of, and the pure arithmetic over it.
//!
//! Every change to an account is one [`LedgerEntry`]. An entry is self-contained: a consume
//! records the decision, the quantity, the idempotency key and request digest, whether and how
//! much is billable, and the balances that result. So one single-key insert makes a decision
//! atomic, the response to a replayed request can be rebuilt from the entry alone, and the
//! account's balances are always the fold of its entries ([`Balances::apply`]).
//!
//! This module is pure: no I/O, no clock, no actor. The account actor calls [`decide_consume`]
//! and [`Balances::apply`]; `meterd ledger verify` and crash recovery call [`Balances::apply`].

use std::collections::BTreeMap;

use bincode::{Decode, Encode};

use crate::model::{MeterRule, Overage, Period, UnixMs};
use crate::plan::{MeterOverride, SubscriptionStatus};

/// Everything the account knows about itself besides its balances.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct AccountProfile {
    pub plan: String,
    pub seats: u32,
    pub email: Option<String>,
    pub stripe_customer_id: Option<String>,
    pub metadata: Vec<(String, String)>,
    pub created_at_ms: UnixMs,
    pub status: SubscriptionStatus,
    /// When `status` was last set (the grace period of `past_due` counts from here).
    pub status_since_ms: UnixMs,
    /// Per-meter overrides; only a `custom` plan honours them.
    pub overrides: BTreeMap<String, MeterOverride>,
}

/// Why a consume was refused. Each one is a recorded decision, replayed identically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum DenyCode {
    /// A hard cap (`block` overage) would be exceeded.
    CapReached,
    /// The credit balance cannot pay for the overage.
    InsufficientCredits,
    /// The account's plan has no rule for this meter.
    MeterNotInPlan,
    /// The subscription is canceled, unpaid, incomplete, or past due beyond the grace period.
    SubscriptionInactive,
}

impl DenyCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::CapReached => "cap_reached",
            DenyCode::InsufficientCredits => "insufficient_credits",
            DenyCode::MeterNotInPlan => "meter_not_in_plan",
            DenyCode::SubscriptionInactive => "subscription_inactive",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Outcome {
    Allowed,
    Denied(DenyCode),
}

/// One consume decision and everything needed to answer it again.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ConsumeRecord {
    pub meter: String,
    pub quantity: u64,
    pub idempotency_key: String,
    /// SHA-256 of the canonical request (meter, quantity, metadata).
    pub digest: [u8; 32],
    pub metadata: Vec<(String, String)>,
    pub outcome: Outcome,
    /// Units of this consume that are billable overage (0 unless the rule is `bill`).
    pub billable: u64,
    /// Credits this consume burned (0 unless the rule is `credits`).
    pub credits_spent: u64,
    /// The rule's included units and the effective limit at decision time.
    pub included: u64,
    pub limit: Option<u64>,
    /// Balances after this entry.
    pub used_after: u64,
    pub billable_after: u64,
    pub credits_after: u64,
}

/// A credit grant (positive) or adjustment (negative).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CreditRecord {
    pub amount: i64,
    pub reason: String,
    pub idempotency_key: String,
    pub digest: [u8; 32],
    pub credits_after: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum EntryKind {
    /// The account was created or its profile changed.
    AccountUpserted(AccountProfile),
    /// The billing period moved on; usage counters reset.
    PeriodRolled {
        from: Period,
        to: Period,
    },
    Consume(ConsumeRecord),
    Credit(CreditRecord),
}

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::AccountUpserted(_) => "account_upserted",
            EntryKind::PeriodRolled { .. } => "period_rolled",
            EntryKind::Consume(_) => "consume",
            EntryKind::Credit(_) => "credit",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct LedgerEntry {
    /// Per-account sequence number: 1, 2, 3, ... with no gaps.
    pub seq: u64,
    pub at_ms: UnixMs,
    pub kind: EntryKind,
}

/// Usage of one meter in the current period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode)]
pub struct MeterUsage {
    pub used: u64,
    pub billable: u64,
}

/// An account's balances: the fold of its ledger.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Balances {
    pub period: Period,
    pub meters: BTreeMap<String, MeterUsage>,
    pub credits: u64,
}

/// A ledger entry that does not follow from the entries before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error("entry {seq}: expected sequence number {expected}")]
    Gap { seq: u64, expected: u64 },
    #[error("entry {seq}: {what} is {recorded} in the entry but {folded} by the fold")]
    Mismatch {
        seq: u64,
        what: &'static str,
        recorded: u64,
        folded: u64,
    },
    #[error("entry {seq}: arithmetic overflow or negative balance")]
    Arithmetic { seq: u64 },
    #[error("entry {seq}: account changed before it was created")]
    NotCreated { seq: u64 },
}

impl Balances {
    pub fn new(period: Period) -> Self {
        Self {
            period,
            meters: BTreeMap::new(),
            credits: 0,
        }
    }

    pub fn usage(&self, meter: &str) -> MeterUsage {
        self.meters.get(meter).copied().unwrap_or_default()
    }

    /// Applies one entry and checks the balances it records. This is the only place balances
    /// change, for live decisions, recovery and verification alike.
    pub fn apply(&mut self, entry: &LedgerEntry) -> Result<(), FoldError> {
        let seq = entry.seq;
        let mismatch = |what, recorded, folded| FoldError::Mismatch {
            seq,
            what,
            recorded,
            folded,
        };
        match &entry.kind {
            EntryKind::AccountUpserted(_) => {}
            EntryKind::PeriodRolled { to, .. } => {
                self.meters.clear();
                self.period = *to;
            }
            EntryKind::Consume(c) => {
                if c.outcome == Outcome::Allowed {
                    let u = self.meters.entry(c.meter.clone()).or_default();
                    u.used = u
                        .used
                        .checked_add(c.quantity)
                        .ok_or(FoldError::Arithmetic { seq })?;
                    u.billable = u
                        .billable
                        .checked_add(c.billable)
                        .ok_or(FoldError::Arithmetic { seq })?;
                    self.credits = self
                        .credits
                        .checked_sub(c.credits_spent)
                        .ok_or(FoldError::Arithmetic { seq })?;
                }
                let u = self.usage(&c.meter);
                if u.used != c.used_after {
                    return Err(mismatch("used", c.used_after, u.used));
                }
                if u.billable != c.billable_after {
                    return Err(mismatch("billable", c.billable_after, u.billable));
                }
                if self.credits != c.credits_after {
                    return Err(mismatch("credits", c.credits_after, self.credits));
                }
            }
            EntryKind::Credit(c) => {
                self.credits = apply_credit_delta(self.credits, c.amount)
                    .ok_or(FoldError::Arithmetic { seq })?;
                if self.credits != c.credits_after {
                    return Err(mismatch("credits", c.credits_after, self.credits));
                }
            }
        }
        Ok(())
    }
}

/// An account's whole state as the fold of its ledger: what recovery rebuilds, what live
/// decisions advance, and what `meterd ledger verify` recomputes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccountFold {
    /// `None` until the account is created.
    pub profile: Option<AccountProfile>,
    /// `None` until the account is created.
    pub balances: Option<Balances>,
    pub last_seq: u64,
}

impl AccountFold {
    /// Applies the next entry: checks that it is the next sequence number and that the
    /// balances it records follow from the state before it.
    pub fn apply(&mut self, entry: &LedgerEntry) -> Result<(), FoldError> {
        let expected = self.last_seq + 1;
        if entry.seq != expected {
            return Err(FoldError::Gap {
                seq: entry.seq,
                expected,
            });
        }
        match (&entry.kind, &mut self.balances) {
            (EntryKind::AccountUpserted(p), balances) => {
                if balances.is_none() {
                    // A new account starts in the calendar month of its creation.
                    *balances = Some(Balances::new(Period::calendar_month(entry.at_ms)));
                }
                self.profile = Some(p.clone());
            }
            (_, None) => return Err(FoldError::NotCreated { seq: entry.seq }),
            (_, Some(b)) => b.apply(entry)?,
        }
        self.last_seq = entry.seq;
        Ok(())
    }
}

/// The most a meter's `used` may reach right now, or `None` when nothing limits it.
pub fn meter_limit(rule: &MeterRule, usage: MeterUsage, credits: u64) -> Option<u64> {
    match rule.overage {
        Overage::Block => Some(rule.included),
        // What is used, plus what is still included, plus what the balance can buy.
        Overage::Credits { credits_per_unit } => Some(
            usage
                .used
                .max(rule.included)
                .saturating_add(credits / credits_per_unit.max(1)),
        ),
        Overage::Bill | Overage::Unlimited => None,
    }
}

/// `credits + amount`, or `None` if that overflows or goes below zero.
pub fn apply_credit_delta(credits: u64, amount: i64) -> Option<u64> {
    if amount >= 0 {
        credits.checked_add(amount.unsigned_abs())
    } else {
        credits.checked_sub(amount.unsigned_abs())
    }
}

/// The pure decision for one consume: what the record will say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeDecision {
    pub outcome: Outcome,
    pub billable: u64,
    pub credits_spent: u64,
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
) -> ConsumeDecision {
    let usage = balances.usage(meter);
    let credits = balances.credits;
    let deny = |code, included, limit| ConsumeDecision {
        outcome: Outcome::Denied(code),
        billable: 0,
        credits_spent: 0,
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
    let within = included.saturating_sub(usage.used).min(quantity);
    let over = quantity - within;
    let Some(used_after) = usage.used.checked_add(quantity) else {
        return deny(DenyCode::CapReached, included, Some(usage.used));
    };
    let allow = |billable: u64, credits_spent: u64, limit| {
        let billable_after = usage.billable.checked_add(billable)?;
        Some(ConsumeDecision {
            outcome: Outcome::Allowed,
            billable,
            credits_spent,
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
                allow(0, 0, Some(included))
            }
        }
        Overage::Credits { credits_per_unit } => {
            let limit = meter_limit(rule, usage, credits).unwrap_or(u64::MAX);
            match over.checked_mul(credits_per_unit) {
                Some(cost) if cost <= credits => allow(0, cost, Some(limit)),
                _ => return deny(DenyCode::InsufficientCredits, included, Some(limit)),
            }
        }
        Overage::Bill => allow(over, 0, None),
        Overage::Unlimited => allow(0, 0, None),
    };
    decided.unwrap_or_else(|| deny(DenyCode::CapReached, included, Some(included)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn period() -> Period {
        Period {
            start_ms: 0,
            end_ms: 1000,
        }
    }

    fn rule(included: u64, overage: Overage) -> MeterRule {
        MeterRule {
            included,
            overage,
            unit_price: None,
        }
    }

    fn consume_entry(seq: u64, q: u64, d: &ConsumeDecision) -> LedgerEntry {
        LedgerEntry {
            seq,
            at_ms: 1,
            kind: EntryKind::Consume(ConsumeRecord {
                meter: "tokens".into(),
                quantity: q,
                idempotency_key: format!("k{seq}"),
                digest: [0; 32],
                metadata: vec![],
                outcome: d.outcome,
                billable: d.billable,
                credits_spent: d.credits_spent,
                included: d.included,
                limit: d.limit,
                used_after: d.used_after,
                billable_after: d.billable_after,
                credits_after: d.credits_after,
            }),
        }
    }

    #[test]
    fn block_allows_exactly_the_included_units() {
        let r = rule(100, Overage::Block);
        let mut b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), 60, true);
        assert_eq!(d.outcome, Outcome::Allowed);
        b.apply(&consume_entry(1, 60, &d)).unwrap();
        let d = decide_consume(&b, "tokens", Some(&r), 41, true);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::CapReached));
        assert_eq!(d.used_after, 60);
        let d = decide_consume(&b, "tokens", Some(&r), 40, true);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.used_after, 100);
        assert_eq!(d.limit, Some(100));
    }

    #[test]
    fn credits_pay_only_for_the_part_beyond_included() {
        let r = rule(
            10,
            Overage::Credits {
                credits_per_unit: 3,
            },
        );
        let mut b = Balances::new(period());
        b.credits = 30;
        // 15 units = 10 included + 5 over, at 3 credits each.
        let d = decide_consume(&b, "tokens", Some(&r), 15, true);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.credits_spent, 15);
        assert_eq!(d.credits_after, 15);
        assert_eq!(d.limit, Some(20));
        b.apply(&consume_entry(1, 15, &d)).unwrap();
        // 5 more units cost 15 credits: exactly affordable; 6 are not.
        assert_eq!(
            decide_consume(&b, "tokens", Some(&r), 6, true).outcome,
            Outcome::Denied(DenyCode::InsufficientCredits)
        );
        let d = decide_consume(&b, "tokens", Some(&r), 5, true);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.credits_after, 0);
    }

    #[test]
    fn bill_counts_only_overage_as_billable() {
        let r = rule(10, Overage::Bill);
        let b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), 25, true);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.billable, 15);
        assert_eq!(d.limit, None);
    }

    #[test]
    fn unlimited_never_blocks_and_is_never_billable() {
        let r = rule(0, Overage::Unlimited);
        let b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), crate::model::MAX_QUANTITY, true);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.billable, 0);
    }

    #[test]
    fn an_inactive_subscription_is_a_recorded_denial() {
        let r = rule(100, Overage::Block);
        let b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), 1, false);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::SubscriptionInactive));
        assert_eq!(d.used_after, 0);
    }

    #[test]
    fn a_meter_outside_the_plan_is_denied() {
        let b = Balances::new(period());
        let d = decide_consume(&b, "images", None, 1, true);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::MeterNotInPlan));
    }

    #[test]
    fn counter_overflow_is_a_denial_not_a_wrap() {
        let r = rule(0, Overage::Unlimited);
        let mut b = Balances::new(period());
        b.meters.insert(
            "tokens".into(),
            MeterUsage {
                used: u64::MAX - 1,
                billable: 0,
            },
        );
        let d = decide_consume(&b, "tokens", Some(&r), 2, true);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::CapReached));
    }

    #[test]
    fn fold_rejects_an_entry_whose_balances_do_not_follow() {
        let r = rule(100, Overage::Block);
        let mut b = Balances::new(period());
        let mut d = decide_consume(&b, "tokens", Some(&r), 5, true);
        d.used_after = 6;
        let err = b.apply(&consume_entry(1, 5, &d)).unwrap_err();
        assert!(matches!(err, FoldError::Mismatch { what: "used", .. }));
    }

    #[test]
    fn credit_delta_never_goes_below_zero() {
        assert_eq!(apply_credit_delta(5, -5), Some(0));
        assert_eq!(apply_credit_delta(5, -6), None);
        assert_eq!(apply_credit_delta(u64::MAX, 1), None);
        assert_eq!(apply_credit_delta(1, i64::MIN), None);
    }

    proptest! {
        /// Over any sequence of consumes and grants, decisions never overspend a cap or the
        /// credit balance, and every decided entry folds back to the balances it records.
        #[test]
        fn decisions_fold_consistently(
            included in 0u64..200,
            per_unit in 1u64..5,
            policy in 0u8..4,
            ops in proptest::collection::vec((any::<bool>(), 1u64..60), 1..80),
        ) {
            let overage = match policy {
                0 => Overage::Block,
                1 => Overage::Credits { credits_per_unit: per_unit },
                2 => Overage::Bill,
                _ => Overage::Unlimited,
            };
            let r = rule(included, overage.clone());
            let mut live = Balances::new(period());
            let mut entries = Vec::new();
            let mut granted = 0u64;
            for (i, (is_grant, n)) in ops.into_iter().enumerate() {
                let seq = i as u64 + 1;
                let entry = if is_grant {
                    granted += n;
                    LedgerEntry { seq, at_ms: 1, kind: EntryKind::Credit(CreditRecord {
                        amount: n as i64, reason: String::new(), idempotency_key: format!("g{seq}"),
                        digest: [0; 32], credits_after: live.credits + n }) }
                } else {
                    let d = decide_consume(&live, "tokens", Some(&r), n, true);
                    consume_entry(seq, n, &d)
                };
                live.apply(&entry).unwrap();
                entries.push(entry);
            }
            let used = live.usage("tokens").used;
            let spent: u64 = entries.iter().filter_map(|e| match &e.kind {
                EntryKind::Consume(c) if c.outcome == Outcome::Allowed => Some(c.credits_spent),
                _ => None,
            }).sum();
            prop_assert_eq!(live.credits + spent, granted);
            match overage {
                Overage::Block => prop_assert!(used <= included),
                Overage::Credits { credits_per_unit } => {
                    prop_assert_eq!(spent, used.saturating_sub(included) * credits_per_unit);
                }
                Overage::Bill => prop_assert_eq!(live.usage("tokens").billable, used.saturating_sub(included)),
                Overage::Unlimited => prop_assert_eq!(live.usage("tokens").billable, 0),
            }
            let mut refold = Balances::new(period());
            for e in &entries { refold.apply(e).unwrap(); }
            prop_assert_eq!(refold, live);
        }
    }
}
