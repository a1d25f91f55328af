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

mod decide;

pub use decide::{ConsumeDecision, decide_commit, decide_consume, decide_release, meter_limit};

use std::collections::{BTreeMap, BTreeSet};

use crate::billing::{BillingState, StripeRecord};
use crate::model::{
    Alert, AlertKind, DenyCode, MeterOverride, MeterRule, Outcome, Overage, Period, SpendCap,
    SubscriptionStatus, UnixMs,
};

/// Everything the account knows about itself besides its balances.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The account's own spend cap (else the plan's).
    pub spend_cap: Option<SpendCap>,
}

/// One consume decision and everything needed to answer it again.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Which grants paid: `(grant id, credits)`, in burn order.
    pub burns: Vec<(u64, u64)>,
    /// The rule's included units and the effective limit at decision time.
    pub included: u64,
    pub limit: Option<u64>,
    /// Balances after this entry.
    pub used_after: u64,
    pub billable_after: u64,
    pub credits_after: u64,
    /// Alerts this consume raised (each at most once per period per meter and threshold).
    pub alerts: Vec<Alert>,
}

/// An alert fired in the current period, with the entry that fired it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredAlert {
    pub seq: u64,
    pub at_ms: UnixMs,
    pub alert: Alert,
}

/// Whether credits were bought or given away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditCategory {
    Paid,
    Promotional,
}

impl CreditCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            CreditCategory::Paid => "paid",
            CreditCategory::Promotional => "promotional",
        }
    }
}

/// The terms of a credit grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTerms {
    /// Lower burns first (0 is the highest priority; the default is 50, as in Stripe).
    pub priority: u32,
    pub effective_at_ms: UnixMs,
    pub expires_at_ms: Option<UnixMs>,
    pub category: CreditCategory,
    /// The payment or checkout session behind it, for example.
    pub external_id: Option<String>,
    /// The top-up package, for a top-up.
    pub package: Option<String>,
}

/// One grant of credits and what is left of it. Its id is the seq of the granting entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub amount: u64,
    pub remaining: u64,
    pub terms: GrantTerms,
}

impl Grant {
    /// Spendable at `at`: effective, not expired, not used up.
    pub fn live_at(&self, at: UnixMs) -> bool {
        self.remaining > 0
            && self.terms.effective_at_ms <= at
            && self.terms.expires_at_ms.is_none_or(|e| at < e)
    }
}

/// A credit grant (positive `amount`, with `grant` terms) or adjustment (negative `amount`,
/// burned from live grants in burn order, listed in `burns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditRecord {
    pub amount: i64,
    pub reason: String,
    pub idempotency_key: String,
    pub digest: [u8; 32],
    pub grant: Option<GrantTerms>,
    pub burns: Vec<(u64, u64)>,
    /// The live balance after this entry, at its time.
    pub credits_after: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// The account was created or its profile changed.
    AccountUpserted(AccountProfile),
    /// The billing period moved on; usage counters reset.
    PeriodRolled {
        from: Period,
        to: Period,
    },
    /// The current period's end was changed (same start); nothing resets.
    PeriodAdjusted {
        from: Period,
        to: Period,
    },
    Consume(ConsumeRecord),
    Credit(CreditRecord),
    /// A reservation decision.
    Reserved(HoldRecord),
    /// A reservation committed, released or expired.
    Settled(SettleRecord),
    /// What was left of a grant expired.
    CreditExpired {
        grant_id: u64,
        amount: u64,
        credits_after: u64,
    },
    /// A Stripe event applied to (or recorded as stale for) the account.
    Stripe(Box<StripeRecord>),
    /// Credits taken back after a refund (or a lost dispute) of a top-up, or debt paid by
    /// new credits.
    Clawback(ClawbackRecord),
}

/// Credits a refunded payment takes back, or a credit debt paid.
///
/// A refund takes back the refunded share of the top-up's credits: from what is left of
/// them first, then from other live credits; what is already spent becomes `debt`, which
/// blocks credit use until new credits pay it (a settlement: `reference` is [`DEBT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClawbackRecord {
    /// The refunded payment (its payment intent), or [`DEBT`] for a settlement.
    pub reference: String,
    /// Credits owed back for `reference` in total, after this entry (0 for a settlement).
    pub owed: u64,
    /// Credits taken from grants.
    pub burns: Vec<(u64, u64)>,
    /// Owed credits already spent that became debt (`[webhooks] refund_policy =
    /// "negative_balance"`).
    pub debt_added: u64,
    /// Owed credits already spent that are not owed (`refund_policy = "forgive"`).
    pub forgiven: u64,
    pub debt_paid: u64,
    pub credits_after: u64,
    pub debt_after: u64,
}

/// The `reference` of a [`ClawbackRecord`] that pays debt.
pub const DEBT: &str = "debt";

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::AccountUpserted(_) => "account_upserted",
            EntryKind::PeriodRolled { .. } => "period_rolled",
            EntryKind::PeriodAdjusted { .. } => "period_adjusted",
            EntryKind::Consume(_) => "consume",
            EntryKind::Credit(_) => "credit",
            EntryKind::CreditExpired { .. } => "credit_expired",
            EntryKind::Reserved(_) => "reserved",
            EntryKind::Settled(_) => "settled",
            EntryKind::Stripe(_) => "stripe",
            EntryKind::Clawback(_) => "clawback",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Per-account sequence number: 1, 2, 3, ... with no gaps.
    pub seq: u64,
    pub at_ms: UnixMs,
    pub kind: EntryKind,
}

impl LedgerEntry {
    /// What this entry bills to Stripe: its meter and billable units (allowed consumes and
    /// settled reservations with billable units; nothing else). The outbox queues exactly
    /// this; the reconciler sums it.
    pub fn billable(&self) -> Option<(&str, u64)> {
        match &self.kind {
            EntryKind::Consume(c)
                if c.outcome == crate::model::Outcome::Allowed && c.billable > 0 =>
            {
                Some((&c.meter, c.billable))
            }
            EntryKind::Settled(r) if r.billable > 0 => Some((&r.meter, r.billable)),
            _ => None,
        }
    }
}

/// Usage of one meter in the current period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterUsage {
    pub used: u64,
    pub billable: u64,
    /// Units held by open reservations; they count against caps and the allowance.
    pub reserved: u64,
}

impl MeterUsage {
    /// Used plus reserved: what limits are checked against.
    pub fn occupied(&self) -> u64 {
        self.used.saturating_add(self.reserved)
    }
}

/// An open reservation: capacity held for work whose size is known only at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub meter: String,
    pub quantity: u64,
    pub expires_at_ms: UnixMs,
    /// Credits taken from grants for the hold, `(grant id, credits)`.
    pub burns: Vec<(u64, u64)>,
}

/// A reservation decision (allowed: a hold exists; denied: recorded like a consume denial).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRecord {
    pub meter: String,
    pub quantity: u64,
    pub expires_at_ms: UnixMs,
    pub idempotency_key: String,
    pub digest: [u8; 32],
    pub outcome: Outcome,
    pub burns: Vec<(u64, u64)>,
    pub included: u64,
    pub limit: Option<u64>,
    pub reserved_after: u64,
    pub used_after: u64,
    pub credits_after: u64,
}

/// The end of a reservation: committed (with the actual quantity), released, or expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleRecord {
    /// The seq of the `Reserved` entry.
    pub rid: u64,
    pub meter: String,
    /// `Some(actual quantity)` for a commit.
    pub committed: Option<u64>,
    pub expired: bool,
    pub billable: u64,
    /// Credits of the hold that pay for the committed quantity.
    pub kept: u64,
    /// Credits of the hold returned to their grants.
    pub refunds: Vec<(u64, u64)>,
    /// Further credits burned when the commit exceeds the hold.
    pub burns: Vec<(u64, u64)>,
    pub used_after: u64,
    pub reserved_after: u64,
    pub billable_after: u64,
    pub credits_after: u64,
    /// Alerts a commit raised (as a consume would).
    pub alerts: Vec<Alert>,
}

/// An account's balances: the fold of its ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balances {
    pub period: Period,
    pub meters: BTreeMap<String, MeterUsage>,
    /// Credit grants by id: those with something left, or that an open hold may refund into.
    /// A grant used up or expired leaves (the ledger keeps it).
    pub grants: BTreeMap<u64, Grant>,
    /// Open reservations by id (the seq of their `Reserved` entry).
    pub holds: BTreeMap<u64, Hold>,
    /// Alerts fired in the current period (reset at rollover).
    pub alerts: Vec<FiredAlert>,
    /// Credits owed back and not covered yet: while above 0, credits cannot be spent.
    pub credit_debt: u64,
    /// Payment (payment intent) → credits owed back for it so far (refunds, lost disputes).
    pub clawbacks: BTreeMap<String, u64>,
    /// Open disputes that suspend credit use until they close.
    pub disputes: BTreeSet<String>,
    /// Disputes that closed (a late `created` must not open them again).
    pub disputes_closed: BTreeSet<String>,
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
            grants: BTreeMap::new(),
            holds: BTreeMap::new(),
            alerts: Vec::new(),
            credit_debt: 0,
            clawbacks: BTreeMap::new(),
            disputes: BTreeSet::new(),
            disputes_closed: BTreeSet::new(),
        }
    }

    /// The entry that pays credit debt from live credits at `at`, if there is debt and
    /// something to pay it with.
    pub fn settlement(&self, at: UnixMs) -> Option<ClawbackRecord> {
        if self.credit_debt == 0 {
            return None;
        }
        let burns = self.take_plan(at, self.credit_debt, None);
        let paid: u64 = burns.iter().map(|(_, n)| n).sum();
        if paid == 0 {
            return None;
        }
        Some(ClawbackRecord {
            reference: DEBT.to_owned(),
            owed: 0,
            burns,
            debt_added: 0,
            forgiven: 0,
            debt_paid: paid,
            credits_after: self.live_credits(at) - paid,
            debt_after: self.credit_debt - paid,
        })
    }

    /// Credits cannot be spent: a debt is not covered yet, or a dispute is open.
    pub fn credits_blocked(&self) -> bool {
        self.credit_debt > 0 || !self.disputes.is_empty()
    }

    /// Up to `amount` credits taken at `at`: from grant `first` (if live) first, then in burn
    /// order. Unlike [`Balances::burn_plan`] it takes what there is, blocked or not.
    pub fn take_plan(&self, at: UnixMs, amount: u64, first: Option<u64>) -> Vec<(u64, u64)> {
        let mut order = self.burn_order(at);
        if let Some(f) = first
            && let Some(i) = order.iter().position(|(id, _)| *id == f)
        {
            let g = order.remove(i);
            order.insert(0, g);
        }
        let mut left = amount;
        let mut burns = Vec::new();
        for (id, g) in order {
            if left == 0 {
                break;
            }
            let take = g.remaining.min(left);
            if take > 0 {
                burns.push((id, take));
                left -= take;
            }
        }
        burns
    }

    /// Adds the alerts an entry raised; each may fire once per period.
    fn record_alerts(&mut self, seq: u64, at: UnixMs, alerts: &[Alert]) -> Result<(), FoldError> {
        for a in alerts {
            if self.alert_fired(a.kind, &a.meter, a.threshold) {
                return Err(FoldError::Mismatch {
                    seq,
                    what: "alert fired twice",
                    recorded: a.threshold,
                    folded: a.threshold,
                });
            }
            self.alerts.push(FiredAlert {
                seq,
                at_ms: at,
                alert: a.clone(),
            });
        }
        Ok(())
    }

    /// Has this alert (kind, meter, threshold) fired in the current period?
    pub fn alert_fired(&self, kind: AlertKind, meter: &str, threshold: u64) -> bool {
        self.alerts.iter().any(|f| {
            f.alert.kind == kind && f.alert.meter == meter && f.alert.threshold == threshold
        })
    }

    /// Reservations whose expiry is due at `at`.
    pub fn due_holds(&self, at: UnixMs) -> Vec<u64> {
        self.holds
            .iter()
            .filter(|(_, h)| h.expires_at_ms <= at)
            .map(|(id, _)| *id)
            .collect()
    }

    fn refund(&mut self, seq: u64, refunds: &[(u64, u64)]) -> Result<u64, FoldError> {
        let mut total = 0u64;
        for (id, amount) in refunds {
            let g = self
                .grants
                .get_mut(id)
                .ok_or(FoldError::Arithmetic { seq })?;
            g.remaining = g
                .remaining
                .checked_add(*amount)
                .filter(|r| *r <= g.amount)
                .ok_or(FoldError::Arithmetic { seq })?;
            total = total
                .checked_add(*amount)
                .ok_or(FoldError::Arithmetic { seq })?;
        }
        Ok(total)
    }

    /// The spendable credit balance at `at`: the sum of live grants.
    /// Whether grants may hold `more` credits on top of what all of them (live or not yet
    /// effective) hold now, staying within `i64::MAX` in total. Grants are refused past it, so
    /// every sum of credits (balances, burns, trims) fits a `u64` and every credit entry's
    /// amount an `i64`.
    pub fn can_hold(&self, more: u64) -> bool {
        let held = self
            .grants
            .values()
            .try_fold(0u64, |acc, g| acc.checked_add(g.remaining));
        held.and_then(|h| h.checked_add(more))
            .is_some_and(|total| total <= i64::MAX.unsigned_abs())
    }

    pub fn live_credits(&self, at: UnixMs) -> u64 {
        self.grants
            .values()
            .filter(|g| g.live_at(at))
            .fold(0u64, |acc, g| acc.saturating_add(g.remaining))
    }

    /// Live grants in burn order: priority, then earliest expiry, then oldest.
    fn burn_order(&self, at: UnixMs) -> Vec<(u64, &Grant)> {
        let mut live: Vec<(u64, &Grant)> = self
            .grants
            .iter()
            .filter(|(_, g)| g.live_at(at))
            .map(|(id, g)| (*id, g))
            .collect();
        live.sort_by_key(|(id, g)| {
            (
                g.terms.priority,
                g.terms.expires_at_ms.unwrap_or(i64::MAX),
                *id,
            )
        });
        live
    }

    /// Which grants pay `amount` credits at `at`, or `None` if the live balance is short (or
    /// credits are blocked: a debt or an open dispute).
    pub fn burn_plan(&self, at: UnixMs, amount: u64) -> Option<Vec<(u64, u64)>> {
        if amount > 0 && self.credits_blocked() {
            return None;
        }
        let mut left = amount;
        let mut burns = Vec::new();
        for (id, g) in self.burn_order(at) {
            if left == 0 {
                break;
            }
            let take = g.remaining.min(left);
            burns.push((id, take));
            left -= take;
        }
        (left == 0).then_some(burns)
    }

    /// Grants whose expiry is due at `at` with something left: `(grant id, remaining)`.
    pub fn due_expiries(&self, at: UnixMs) -> Vec<(u64, u64)> {
        self.grants
            .iter()
            .filter(|(_, g)| g.remaining > 0 && g.terms.expires_at_ms.is_some_and(|e| e <= at))
            .map(|(id, g)| (*id, g.remaining))
            .collect()
    }

    fn apply_burns(
        &mut self,
        seq: u64,
        at: UnixMs,
        burns: &[(u64, u64)],
    ) -> Result<u64, FoldError> {
        let mut total = 0u64;
        for (id, amount) in burns {
            let g = self
                .grants
                .get_mut(id)
                .filter(|g| g.live_at(at))
                .ok_or(FoldError::Arithmetic { seq })?;
            g.remaining = g
                .remaining
                .checked_sub(*amount)
                .ok_or(FoldError::Arithmetic { seq })?;
            total = total
                .checked_add(*amount)
                .ok_or(FoldError::Arithmetic { seq })?;
        }
        Ok(total)
    }

    pub fn usage(&self, meter: &str) -> MeterUsage {
        self.meters.get(meter).copied().unwrap_or_default()
    }

    /// Applies one entry and checks the balances it records. This is the only place balances
    /// change, for live decisions, recovery and verification alike.
    pub fn apply(&mut self, entry: &LedgerEntry) -> Result<(), FoldError> {
        let seq = entry.seq;
        let at = entry.at_ms;
        let check_credits = |b: &Balances, recorded: u64| {
            let folded = b.live_credits(at);
            if folded == recorded {
                Ok(())
            } else {
                Err(FoldError::Mismatch {
                    seq,
                    what: "credits",
                    recorded,
                    folded,
                })
            }
        };
        let mismatch = |what, recorded, folded| FoldError::Mismatch {
            seq,
            what,
            recorded,
            folded,
        };
        // Grants this entry may have emptied or released from a hold.
        let mut touched: Vec<u64> = Vec::new();
        match &entry.kind {
            EntryKind::AccountUpserted(_) => {}
            EntryKind::PeriodRolled { to, .. } => {
                // Open reservations keep their hold across the boundary.
                let held: Vec<(String, u64)> = self
                    .meters
                    .iter()
                    .filter(|(_, u)| u.reserved > 0)
                    .map(|(m, u)| (m.clone(), u.reserved))
                    .collect();
                self.meters.clear();
                for (m, r) in held {
                    self.meters.entry(m).or_default().reserved = r;
                }
                self.alerts.clear();
                self.period = *to;
            }
            EntryKind::PeriodAdjusted { from, to } => {
                if *from != self.period || from.start_ms != to.start_ms {
                    return Err(FoldError::Arithmetic { seq });
                }
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
                    let spent = self.apply_burns(seq, entry.at_ms, &c.burns)?;
                    touched.extend(c.burns.iter().map(|(g, _)| *g));
                    if spent != c.credits_spent {
                        return Err(mismatch("credits_spent", c.credits_spent, spent));
                    }
                }
                let u = self.usage(&c.meter);
                if u.used != c.used_after {
                    return Err(mismatch("used", c.used_after, u.used));
                }
                if u.billable != c.billable_after {
                    return Err(mismatch("billable", c.billable_after, u.billable));
                }
                check_credits(self, c.credits_after)?;
                self.record_alerts(seq, at, &c.alerts)?;
            }
            EntryKind::Credit(c) => {
                match (&c.grant, c.amount) {
                    (Some(terms), amount) if amount > 0 => {
                        self.grants.insert(
                            seq,
                            Grant {
                                amount: amount.unsigned_abs(),
                                remaining: amount.unsigned_abs(),
                                terms: terms.clone(),
                            },
                        );
                    }
                    (None, amount) if amount < 0 => {
                        let burned = self.apply_burns(seq, entry.at_ms, &c.burns)?;
                        touched.extend(c.burns.iter().map(|(g, _)| *g));
                        if burned != amount.unsigned_abs() {
                            return Err(mismatch("burned", amount.unsigned_abs(), burned));
                        }
                    }
                    _ => return Err(FoldError::Arithmetic { seq }),
                }
                check_credits(self, c.credits_after)?;
            }
            EntryKind::Reserved(h) => {
                if h.outcome == Outcome::Allowed {
                    self.apply_burns(seq, at, &h.burns)?;
                    let u = self.meters.entry(h.meter.clone()).or_default();
                    u.reserved = u
                        .reserved
                        .checked_add(h.quantity)
                        .ok_or(FoldError::Arithmetic { seq })?;
                    self.holds.insert(
                        seq,
                        Hold {
                            meter: h.meter.clone(),
                            quantity: h.quantity,
                            expires_at_ms: h.expires_at_ms,
                            burns: h.burns.clone(),
                        },
                    );
                }
                let u = self.usage(&h.meter);
                if u.reserved != h.reserved_after {
                    return Err(mismatch("reserved", h.reserved_after, u.reserved));
                }
                if u.used != h.used_after {
                    return Err(mismatch("used", h.used_after, u.used));
                }
                check_credits(self, h.credits_after)?;
            }
            EntryKind::Settled(r) => {
                let hold = self
                    .holds
                    .remove(&r.rid)
                    .filter(|h| h.meter == r.meter)
                    .ok_or(FoldError::Arithmetic { seq })?;
                if r.expired && hold.expires_at_ms > at {
                    return Err(mismatch("expires_at", 0, 0));
                }
                let held: u64 = hold.burns.iter().map(|(_, n)| n).sum();
                touched.extend(hold.burns.iter().chain(&r.burns).map(|(g, _)| *g));
                let refunded = self.refund(seq, &r.refunds)?;
                if refunded.checked_add(r.kept) != Some(held) {
                    return Err(mismatch(
                        "hold credits",
                        held,
                        refunded.saturating_add(r.kept),
                    ));
                }
                let u = self.meters.entry(r.meter.clone()).or_default();
                u.reserved = u
                    .reserved
                    .checked_sub(hold.quantity)
                    .ok_or(FoldError::Arithmetic { seq })?;
                if let Some(q) = r.committed {
                    u.used = u.used.checked_add(q).ok_or(FoldError::Arithmetic { seq })?;
                    u.billable = u
                        .billable
                        .checked_add(r.billable)
                        .ok_or(FoldError::Arithmetic { seq })?;
                    self.apply_burns(seq, at, &r.burns)?;
                } else if r.kept > 0 || !r.burns.is_empty() || r.billable > 0 {
                    return Err(FoldError::Arithmetic { seq });
                }
                let u = self.usage(&r.meter);
                for (what, recorded, folded) in [
                    ("used", r.used_after, u.used),
                    ("reserved", r.reserved_after, u.reserved),
                    ("billable", r.billable_after, u.billable),
                ] {
                    if recorded != folded {
                        return Err(mismatch(what, recorded, folded));
                    }
                }
                check_credits(self, r.credits_after)?;
                self.record_alerts(seq, at, &r.alerts)?;
            }
            EntryKind::CreditExpired {
                grant_id,
                amount,
                credits_after,
            } => {
                let g = self
                    .grants
                    .get_mut(grant_id)
                    .ok_or(FoldError::Arithmetic { seq })?;
                let due = g.terms.expires_at_ms.is_some_and(|e| e <= entry.at_ms);
                if !due || g.remaining != *amount {
                    return Err(mismatch("expired", *amount, g.remaining));
                }
                g.remaining = 0;
                touched.push(*grant_id);
                check_credits(self, *credits_after)?;
            }
            EntryKind::Stripe(r) => {
                self.record_alerts(seq, at, &r.alerts)?;
                if r.outcome == crate::billing::StripeOutcome::Applied
                    && let crate::billing::BillingFact::Dispute {
                        id, open, suspends, ..
                    } = &r.fact
                {
                    if !*open {
                        self.disputes.remove(id);
                        self.disputes_closed.insert(id.clone());
                    } else if *suspends && !self.disputes_closed.contains(id) {
                        self.disputes.insert(id.clone());
                    }
                }
            }
            EntryKind::Clawback(c) => {
                let taken = self.apply_burns(seq, entry.at_ms, &c.burns)?;
                touched.extend(c.burns.iter().map(|(g, _)| *g));
                if c.reference == DEBT {
                    if c.debt_added != 0 || c.forgiven != 0 || c.debt_paid != taken || c.owed != 0 {
                        return Err(mismatch("debt paid", c.debt_paid, taken));
                    }
                } else {
                    if c.debt_paid != 0 {
                        return Err(mismatch("debt paid", c.debt_paid, 0));
                    }
                    let before = self.clawbacks.get(&c.reference).copied().unwrap_or(0);
                    let owed = before
                        .checked_add(taken)
                        .and_then(|o| o.checked_add(c.debt_added))
                        .and_then(|o| o.checked_add(c.forgiven))
                        .ok_or(FoldError::Arithmetic { seq })?;
                    if owed != c.owed {
                        return Err(mismatch("owed", c.owed, owed));
                    }
                    self.clawbacks.insert(c.reference.clone(), owed);
                }
                let debt = self
                    .credit_debt
                    .checked_add(c.debt_added)
                    .and_then(|d| d.checked_sub(c.debt_paid))
                    .ok_or(FoldError::Arithmetic { seq })?;
                if debt != c.debt_after {
                    return Err(mismatch("debt", c.debt_after, debt));
                }
                self.credit_debt = debt;
                check_credits(self, c.credits_after)?;
            }
        }
        self.prune_grants(touched);
        Ok(())
    }

    /// Drops the given grants if they can never count again: nothing left in them, and no
    /// open hold may refund into them. The ledger keeps them; the live state (and every
    /// snapshot and read) stays the size of what can still be spent.
    fn prune_grants(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            let spent = self.grants.get(&id).is_some_and(|g| g.remaining == 0);
            if spent
                && !self
                    .holds
                    .values()
                    .any(|h| h.burns.iter().any(|(g, _)| *g == id))
            {
                self.grants.remove(&id);
            }
        }
    }

    /// Drops every grant that can never count again (see `prune_grants`): for balances from a
    /// snapshot written before grants were pruned as they emptied.
    pub fn prune_spent_grants(&mut self) {
        let ids: Vec<u64> = self.grants.keys().copied().collect();
        self.prune_grants(ids);
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
    /// What Stripe said about the account.
    pub billing: BillingState,
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
            (EntryKind::Stripe(r), Some(b)) => {
                b.apply(entry)?;
                self.billing.apply(r);
            }
            (_, Some(b)) => b.apply(entry)?,
        }
        self.last_seq = entry.seq;
        Ok(())
    }
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
            price: None,
        }
    }

    fn grant(amount: u64, priority: u32, expires_at_ms: Option<i64>) -> Grant {
        Grant {
            amount,
            remaining: amount,
            terms: GrantTerms {
                priority,
                effective_at_ms: 0,
                expires_at_ms,
                category: CreditCategory::Promotional,
                external_id: None,
                package: None,
            },
        }
    }

    #[test]
    fn grants_burn_by_priority_then_earliest_expiry_then_age() {
        let mut b = Balances::new(period());
        b.grants.insert(1, grant(10, 50, None));
        b.grants.insert(2, grant(10, 50, Some(500)));
        b.grants.insert(3, grant(10, 10, None));
        b.grants.insert(4, grant(10, 50, Some(400)));
        b.grants.insert(5, grant(10, 50, None));
        assert_eq!(b.live_credits(1), 50);
        assert_eq!(
            b.burn_plan(1, 45),
            Some(vec![(3, 10), (4, 10), (2, 10), (1, 10), (5, 5)])
        );
        assert_eq!(b.burn_plan(1, 51), None);
        // At 450 grant 4 has expired: it neither counts nor burns.
        assert_eq!(b.live_credits(450), 40);
        assert_eq!(b.burn_plan(450, 15), Some(vec![(3, 10), (2, 5)]));
        assert_eq!(b.due_expiries(450), vec![(4, 10)]);
    }

    #[test]
    fn a_future_grant_is_not_spendable_until_effective() {
        let mut b = Balances::new(period());
        let mut g = grant(10, 50, None);
        g.terms.effective_at_ms = 100;
        b.grants.insert(1, g);
        assert_eq!(b.live_credits(99), 0);
        assert_eq!(b.live_credits(100), 10);
        let r = rule(
            0,
            Overage::Credits {
                credits_per_unit: 1,
            },
        );
        let d = decide_consume(&b, "tokens", Some(&r), 1, true, 99);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::InsufficientCredits));
        let d = decide_consume(&b, "tokens", Some(&r), 1, true, 100);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.burns, vec![(1, 1)]);
    }

    #[test]
    fn an_expiry_entry_must_be_due_and_exact() {
        let mut b = Balances::new(period());
        b.grants.insert(1, grant(10, 50, Some(100)));
        let early = LedgerEntry {
            seq: 2,
            at_ms: 99,
            kind: EntryKind::CreditExpired {
                grant_id: 1,
                amount: 10,
                credits_after: 0,
            },
        };
        assert!(b.clone().apply(&early).is_err());
        let due = LedgerEntry {
            at_ms: 100,
            ..early
        };
        b.apply(&due).unwrap();
        assert!(
            !b.grants.contains_key(&1),
            "an expired grant leaves the live state"
        );
    }

    fn clawback(seq: u64, at_ms: i64, c: ClawbackRecord) -> LedgerEntry {
        LedgerEntry {
            seq,
            at_ms,
            kind: EntryKind::Clawback(c),
        }
    }

    #[test]
    fn a_clawback_takes_credits_and_what_is_spent_becomes_debt_that_new_credits_pay() {
        let mut b = Balances::new(period());
        b.grants.insert(1, grant(100, 50, None));
        let r = rule(
            0,
            Overage::Credits {
                credits_per_unit: 1,
            },
        );
        // 150 credits owed for pi_1: 100 live are taken, 50 become debt.
        let c = ClawbackRecord {
            reference: "pi_1".into(),
            owed: 150,
            burns: b.take_plan(1, 150, None),
            debt_added: 50,
            forgiven: 0,
            debt_paid: 0,
            credits_after: 0,
            debt_after: 50,
        };
        assert_eq!(c.burns, vec![(1, 100)]);
        // A record that does not add up is refused: owed, debt, and credits are checked.
        for bad in [
            ClawbackRecord {
                owed: 140,
                ..c.clone()
            },
            ClawbackRecord {
                debt_after: 40,
                ..c.clone()
            },
            ClawbackRecord {
                credits_after: 10,
                ..c.clone()
            },
            ClawbackRecord {
                debt_paid: 5,
                ..c.clone()
            },
        ] {
            assert!(b.clone().apply(&clawback(2, 1, bad)).is_err());
        }
        b.apply(&clawback(2, 1, c)).unwrap();
        assert_eq!((b.credit_debt, b.clawbacks["pi_1"]), (50, 150));
        assert!(b.credits_blocked());
        // Debt blocks credit use, but not consumption that spends no credits.
        b.grants.insert(3, grant(10, 50, Some(500)));
        assert_eq!(b.burn_plan(1, 1), None);
        assert_eq!(b.burn_plan(1, 0), Some(vec![]));
        let d = decide_consume(&b, "tokens", Some(&r), 1, true, 1);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::InsufficientCredits));
        // New credits pay the debt: a settlement takes what is live, up to the debt.
        let s = b.settlement(1).unwrap();
        assert_eq!(
            (s.burns.clone(), s.debt_paid, s.debt_after, s.credits_after),
            (vec![(3, 10)], 10, 40, 0)
        );
        assert!(
            b.clone()
                .apply(&clawback(
                    3,
                    1,
                    ClawbackRecord {
                        debt_paid: 9,
                        ..s.clone()
                    }
                ))
                .is_err()
        );
        b.apply(&clawback(3, 1, s)).unwrap();
        b.grants.insert(4, grant(100, 50, None));
        let s = b.settlement(1).unwrap();
        assert_eq!((s.debt_paid, s.debt_after, s.credits_after), (40, 0, 60));
        b.apply(&clawback(4, 1, s)).unwrap();
        assert!(!b.credits_blocked());
        assert_eq!(b.settlement(1), None);
        assert_eq!(b.burn_plan(1, 60), Some(vec![(4, 60)]));
        // What was owed for pi_1 stays known: the same refund again owes nothing more.
        assert_eq!(b.clawbacks["pi_1"], 150);
    }

    #[test]
    fn an_open_dispute_blocks_credits_until_it_closes_and_a_late_open_does_not_reopen_it() {
        use crate::billing::{BillingFact, StripeOutcome, StripeRecord};
        let dispute = |seq, open: bool| LedgerEntry {
            seq,
            at_ms: 1,
            kind: EntryKind::Stripe(Box::new(StripeRecord {
                event_id: format!("evt_{seq}"),
                event_type: "charge.dispute".into(),
                created_s: 1,
                outcome: StripeOutcome::Applied,
                fact: BillingFact::Dispute {
                    id: "dp_1".into(),
                    payment: "pi_1".into(),
                    amount: 500,
                    currency: "usd".into(),
                    open,
                    won: !open,
                    suspends: open,
                },
                alerts: vec![],
            })),
        };
        let mut b = Balances::new(period());
        b.grants.insert(1, grant(100, 50, None));
        b.apply(&dispute(1, true)).unwrap();
        assert!(b.credits_blocked());
        assert_eq!(b.burn_plan(1, 1), None);
        b.apply(&dispute(2, false)).unwrap();
        assert!(!b.credits_blocked());
        b.apply(&dispute(3, true)).unwrap();
        assert!(!b.credits_blocked(), "a closed dispute stays closed");
        assert_eq!(b.burn_plan(1, 1), Some(vec![(1, 1)]));
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
                burns: d.burns.clone(),
                included: d.included,
                limit: d.limit,
                used_after: d.used_after,
                billable_after: d.billable_after,
                credits_after: d.credits_after,
                alerts: Vec::new(),
            }),
        }
    }

    #[test]
    fn block_allows_exactly_the_included_units() {
        let r = rule(100, Overage::Block);
        let mut b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), 60, true, 1);
        assert_eq!(d.outcome, Outcome::Allowed);
        b.apply(&consume_entry(1, 60, &d)).unwrap();
        let d = decide_consume(&b, "tokens", Some(&r), 41, true, 1);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::CapReached));
        assert_eq!(d.used_after, 60);
        let d = decide_consume(&b, "tokens", Some(&r), 40, true, 1);
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
        b.grants.insert(100, grant(30, 50, None));
        // 15 units = 10 included + 5 over, at 3 credits each.
        let d = decide_consume(&b, "tokens", Some(&r), 15, true, 1);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.credits_spent, 15);
        assert_eq!(d.credits_after, 15);
        assert_eq!(d.limit, Some(20));
        b.apply(&consume_entry(1, 15, &d)).unwrap();
        // 5 more units cost 15 credits: exactly affordable; 6 are not.
        assert_eq!(
            decide_consume(&b, "tokens", Some(&r), 6, true, 1).outcome,
            Outcome::Denied(DenyCode::InsufficientCredits)
        );
        let d = decide_consume(&b, "tokens", Some(&r), 5, true, 1);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.credits_after, 0);
    }

    #[test]
    fn bill_counts_only_overage_as_billable() {
        let r = rule(10, Overage::Bill);
        let b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), 25, true, 1);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.billable, 15);
        assert_eq!(d.limit, None);
    }

    #[test]
    fn unlimited_never_blocks_and_is_never_billable() {
        let r = rule(0, Overage::Unlimited);
        let b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), crate::model::MAX_QUANTITY, true, 1);
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.billable, 0);
    }

    #[test]
    fn an_inactive_subscription_is_a_recorded_denial() {
        let r = rule(100, Overage::Block);
        let b = Balances::new(period());
        let d = decide_consume(&b, "tokens", Some(&r), 1, false, 1);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::SubscriptionInactive));
        assert_eq!(d.used_after, 0);
    }

    #[test]
    fn a_meter_outside_the_plan_is_denied() {
        let b = Balances::new(period());
        let d = decide_consume(&b, "images", None, 1, true, 1);
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
                reserved: 0,
            },
        );
        let d = decide_consume(&b, "tokens", Some(&r), 2, true, 1);
        assert_eq!(d.outcome, Outcome::Denied(DenyCode::CapReached));
    }

    #[test]
    fn fold_rejects_an_entry_whose_balances_do_not_follow() {
        let r = rule(100, Overage::Block);
        let mut b = Balances::new(period());
        let mut d = decide_consume(&b, "tokens", Some(&r), 5, true, 1);
        d.used_after = 6;
        let err = b.apply(&consume_entry(1, 5, &d)).unwrap_err();
        assert!(matches!(err, FoldError::Mismatch { what: "used", .. }));
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
                        digest: [0; 32], grant: Some(grant(n, (seq % 3) as u32, None).terms),
                        burns: vec![], credits_after: live.live_credits(1) + n }) }
                } else {
                    let d = decide_consume(&live, "tokens", Some(&r), n, true, 1);
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
            prop_assert_eq!(live.live_credits(1) + spent, granted);
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
