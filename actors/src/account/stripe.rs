//! Stripe events applied to an account: the account actor's half of the webhook pipeline.
//!
//! The webhook actor interprets an event ([`crate::billing::interpret`]) and sends the change
//! here; this is the only place Stripe changes an account. Each event is decided against the
//! account's own state (is it newer than what the account holds?), then written as entries
//! that are each valid on their own: a profile change (`AccountUpserted`), a new period, a
//! top-up credit, and last the `Stripe` entry that records the event and carries its
//! idempotency key. A crash before the last entry makes the redelivered event decide again
//! from the partly updated state, with the same result; after it, the event is a replay.

use crate::billing::{
    BillingFact, StripeChange, StripeOutcome, StripeRecord, Transaction, TransactionKind, status_of,
};
use crate::ledger::{ClawbackRecord, EntryKind};
use crate::model::SubscriptionStatus;
use crate::model::{Alert, AlertKind};
use crate::model::{IdempotencyKey, Period, ValidationError};
use crate::store::{IdemOp, StoreError, TopUpPayment};

use super::{AccountError, AccountState, TopUpCmd};

/// One Stripe event for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeCmd {
    pub event_id: String,
    pub event_type: String,
    /// The event's `created` (unix seconds): decides what is newer.
    pub created_s: i64,
    pub change: StripeChange,
    /// The plan an account falls back to when its subscription is deleted.
    pub fallback_plan: String,
    /// The Stripe customer the event is about, if it names one. It must be the account's
    /// (the customer is the authority): an event naming another is refused.
    pub customer: Option<String>,
    pub money: MoneyPolicy,
}

/// What a refund or dispute of a top-up does (`[webhooks] refund_policy` and
/// `dispute_suspends_credits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoneyPolicy {
    /// `true` ("negative_balance"): refunded credits already spent become a debt that blocks
    /// credit use until new credits cover it. `false` ("forgive"): they are not owed.
    pub refund_debt: bool,
    /// An open dispute suspends credit use until it closes.
    pub dispute_suspends: bool,
}

impl Default for MoneyPolicy {
    fn default() -> Self {
        Self {
            refund_debt: true,
            dispute_suspends: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeReply {
    pub outcome: StripeOutcome,
    /// The `Stripe` entry.
    pub seq: u64,
    /// The event was applied before: nothing was written.
    pub replayed: bool,
}

/// What an event does to an account, decided before anything is written.
struct Plan {
    outcome: StripeOutcome,
    fact: BillingFact,
    alerts: Vec<Alert>,
    profile: Option<crate::ledger::AccountProfile>,
    period: Option<Period>,
    top_up: Option<TopUpCmd>,
    /// The payment that paid the top-up (payment intent and record), written with it.
    payment: Option<(String, TopUpPayment)>,
    /// Credits owed back for a payment: `(payment intent, owed in total, top-up session)`.
    clawback: Option<(String, u64, String)>,
}

impl Plan {
    fn stale(why: &str) -> Plan {
        Plan {
            outcome: StripeOutcome::Stale(why.to_owned()),
            fact: BillingFact::None,
            alerts: Vec::new(),
            profile: None,
            period: None,
            top_up: None,
            payment: None,
            clawback: None,
        }
    }

    /// Refused for a reason that is recorded (`refused: <code>: <detail>`); nothing changes.
    fn refused(code: &str, detail: String) -> Plan {
        Plan {
            outcome: StripeOutcome::Ignored(format!("refused: {code}: {detail}")),
            ..Plan::applied(BillingFact::None)
        }
    }

    fn applied(fact: BillingFact) -> Plan {
        Plan {
            outcome: StripeOutcome::Applied,
            fact,
            alerts: Vec::new(),
            profile: None,
            period: None,
            top_up: None,
            payment: None,
            clawback: None,
        }
    }
}

impl AccountState {
    pub(super) fn apply_stripe(
        &mut self,
        cmd: StripeCmd,
    ) -> Result<Result<StripeReply, AccountError>, StoreError> {
        if self.fold.profile.is_none() {
            return Ok(Err(AccountError::UnknownAccount(self.id.clone())));
        }
        if cmd.event_id.is_empty() || cmd.event_id.len() > 255 {
            return Ok(Err(
                ValidationError::new("event id must be 1 to 255 bytes").into()
            ));
        }
        if let Some(prev) = self.find_replay(IdemOp::Stripe, &cmd.event_id)?
            && let EntryKind::Stripe(r) = prev.kind
        {
            return Ok(Ok(StripeReply {
                outcome: r.outcome,
                seq: prev.seq,
                replayed: true,
            }));
        }
        let now = self.deps.clock.now_ms();
        self.catch_up(now)?;
        let mut plan = match self.decide_stripe(&cmd) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        if let StripeOutcome::Ignored(why) = &plan.outcome
            && let Some(rest) = why.strip_prefix("refused: ")
        {
            // Money in that meterd refused is worth someone's attention.
            let code = rest.split(':').next().unwrap_or("refused");
            let alert = Alert {
                kind: AlertKind::MoneyRefused,
                meter: format!("{code} {}", cmd.event_id),
                threshold: u64::try_from(cmd.created_s).unwrap_or(0),
                value: match &cmd.change {
                    StripeChange::TopUp { amount, .. } => u64::try_from(*amount).unwrap_or(0),
                    _ => 0,
                },
                limit: 0,
            };
            if self.alert_new(&alert) {
                plan.alerts.push(alert);
            }
        }
        if plan.outcome == StripeOutcome::Applied {
            if let Some(p) = plan.profile
                && self.fold.profile.as_ref() != Some(&p)
            {
                self.append(EntryKind::AccountUpserted(p), now)?;
            }
            if let Some(p) = plan.period {
                // A period that does not contain now (a late event, a trial in the past)
                // or starts before the current one is not applied; the rest of the event is.
                let _ = self.set_period(p, now)?;
            }
            if let Some((pi, rec)) = &plan.payment {
                // Before the credit: a refund or dispute of the payment must find its top-up.
                self.deps.store.put_payment(pi, rec)?;
            }
            if let Some(t) = plan.top_up {
                if let Err(e) = self.write_top_up(t)? {
                    return Ok(Err(e));
                }
                self.settle_debt(now)?;
            }
            if let Some((pi, owed, session)) = &plan.clawback
                && let Some(c) = self.clawback_for(pi, *owed, session, cmd.money.refund_debt, now)
            {
                let alert = Alert {
                    kind: AlertKind::CreditsClawedBack,
                    meter: pi.clone(),
                    threshold: c.owed,
                    value: c.burns.iter().map(|(_, n)| n).sum(),
                    limit: c.debt_added,
                };
                if self.alert_new(&alert) {
                    plan.alerts.push(alert);
                }
                self.append(EntryKind::Clawback(c), now)?;
            }
        }
        let record = StripeRecord {
            event_id: cmd.event_id.clone(),
            event_type: cmd.event_type,
            created_s: cmd.created_s,
            outcome: plan.outcome,
            fact: plan.fact,
            alerts: plan.alerts,
        };
        let entry = self.record_keyed(
            EntryKind::Stripe(Box::new(record)),
            now,
            IdemOp::Stripe,
            &cmd.event_id,
        )?;
        let EntryKind::Stripe(r) = &entry.kind else {
            return Ok(Err(AccountError::Storage("stripe entry expected".into())));
        };
        self.log_alerts(entry.seq, &r.alerts);
        tracing::info!(
            account = %self.id,
            event = %r.event_id,
            event_type = %r.event_type,
            outcome = r.outcome.as_str(),
            "stripe event"
        );
        Ok(Ok(StripeReply {
            outcome: r.outcome.clone(),
            seq: entry.seq,
            replayed: false,
        }))
    }

    fn alert_new(&self, a: &Alert) -> bool {
        self.fold
            .balances
            .as_ref()
            .is_none_or(|b| !b.alert_fired(a.kind, &a.meter, a.threshold))
    }

    /// The entry that takes back what is owed for payment `pi` beyond what was taken before
    /// (`owed` in total: refunds are cumulative, so a late or repeated event takes nothing):
    /// from the top-up's own grant (`session`) first, then other live credits; the rest
    /// becomes debt, or is forgiven.
    fn clawback_for(
        &self,
        pi: &str,
        owed: u64,
        session: &str,
        refund_debt: bool,
        now: i64,
    ) -> Option<ClawbackRecord> {
        let b = self.fold.balances.as_ref()?;
        let before = b.clawbacks.get(pi).copied().unwrap_or(0);
        let delta = owed.checked_sub(before).filter(|d| *d > 0)?;
        let first = b
            .grants
            .iter()
            .find(|(_, g)| g.terms.external_id.as_deref() == Some(session))
            .map(|(id, _)| *id);
        let burns = b.take_plan(now, delta, first);
        let taken: u64 = burns.iter().map(|(_, n)| n).sum();
        let rest = delta - taken;
        let (debt_added, forgiven) = if refund_debt { (rest, 0) } else { (0, rest) };
        Some(ClawbackRecord {
            reference: pi.to_owned(),
            owed,
            burns,
            debt_added,
            forgiven,
            debt_paid: 0,
            credits_after: b.live_credits(now) - taken,
            debt_after: b.credit_debt + debt_added,
        })
    }

    /// Pays credit debt from live credits, if there is both (after new credits arrive).
    pub(super) fn settle_debt(&mut self, now: i64) -> Result<(), StoreError> {
        if let Some(c) = self.fold.balances.as_ref().and_then(|b| b.settlement(now)) {
            self.append(EntryKind::Clawback(c), now)?;
        }
        Ok(())
    }

    /// The top-up payment `pi` paid for this account, if meterd credited one.
    fn own_payment(&self, pi: &str) -> Result<Option<TopUpPayment>, StoreError> {
        Ok(self
            .deps
            .store
            .payment(pi)?
            .filter(|p| p.account == self.id.as_str()))
    }

    fn decide_stripe(&self, cmd: &StripeCmd) -> Result<Plan, AccountError> {
        let (Some(profile), Some(_)) = (&self.fold.profile, &self.fold.balances) else {
            return Err(AccountError::UnknownAccount(self.id.clone()));
        };
        let billing = &self.fold.billing;
        let created = cmd.created_s;
        let now = self.deps.clock.now_ms();
        // The Stripe customer is the authority: an event about another customer than the
        // account's is refused, whatever account its metadata names (anyone paying through
        // another integration on the same Stripe account can set those).
        if let (Some(linked), Some(c)) = (&profile.stripe_customer_id, &cmd.customer)
            && linked != c
        {
            return Ok(Plan::refused(
                "customer_mismatch",
                format!("the event is about customer {c}; the account's customer is {linked}"),
            ));
        }
        let mut plan = match &cmd.change {
            StripeChange::Ignore(why) => Plan {
                outcome: StripeOutcome::Ignored(why.clone()),
                ..Plan::applied(BillingFact::None)
            },
            StripeChange::Linked { customer, .. } => {
                if let Some(c) = customer
                    && profile.stripe_customer_id.is_none()
                    && let Some(owner) = self.customer_owner_elsewhere(c)?
                {
                    return Ok(Plan::refused(
                        "customer_in_use",
                        format!("customer {c} is linked to account {owner}"),
                    ));
                }
                let mut p = Plan::applied(BillingFact::None);
                if let Some(c) = customer
                    && profile.stripe_customer_id.as_ref() != Some(c)
                {
                    let mut next = profile.clone();
                    next.stripe_customer_id = Some(c.clone());
                    p.profile = Some(next);
                }
                p
            }
            StripeChange::TopUp {
                session_id,
                topup_id,
                package,
                credits: _,
                amount,
                currency,
                payment_intent,
            } => {
                // Only a session meterd created (its pending record, made for this account and
                // its customer) is credited, for the package recorded, at the price recorded.
                let pending = match topup_id {
                    Some(t) => self.deps.store.pending_topup(t)?,
                    None => None,
                };
                let Some(pending) = pending else {
                    return Ok(Plan::refused(
                        "not_ours",
                        format!("checkout session {session_id} is not a top-up meterd created"),
                    ));
                };
                if pending.account != self.id.as_str()
                    || Some(&pending.customer) != profile.stripe_customer_id.as_ref()
                {
                    return Ok(Plan::refused(
                        "not_ours",
                        format!(
                            "checkout session {session_id} was made for account {} and customer {}",
                            pending.account, pending.customer
                        ),
                    ));
                }
                if package.as_ref().is_some_and(|p| *p != pending.package) {
                    return Ok(Plan::refused(
                        "package_mismatch",
                        format!(
                            "checkout session {session_id} names package {package:?}; meterd sold {}",
                            pending.package
                        ),
                    ));
                }
                // Credited only for what was paid: the recorded price, in its currency.
                if !currency.eq_ignore_ascii_case(&pending.currency)
                    || u64::try_from(*amount).ok() != Some(pending.amount)
                {
                    return Ok(Plan::refused(
                        "amount_mismatch",
                        format!(
                            "checkout session {session_id} paid {amount} {currency}; package {} was sold for {} {}",
                            pending.package, pending.amount, pending.currency
                        ),
                    ));
                }
                let packages = &self.deps.catalog.credit_packages;
                let pkg = packages
                    .iter()
                    .find(|p| p.name == pending.package)
                    .ok_or_else(|| {
                        ValidationError::new(format!(
                            "checkout session {session_id} bought package {}, which is no longer configured",
                            pending.package
                        ))
                    })?;
                let key = IdempotencyKey::parse(session_id)?;
                if billing.has_transaction(TransactionKind::TopUp, session_id) {
                    // Credited already (a second event for the same session): the top-up's
                    // own key would refuse it too; this also holds for events of another id.
                    return Ok(Plan::stale("this checkout session was credited already"));
                }
                let mut p = Plan::applied(BillingFact::Transaction(Transaction {
                    id: session_id.clone(),
                    kind: TransactionKind::TopUp,
                    amount: *amount,
                    currency: currency.clone(),
                    at_s: created,
                    reference: Some(pkg.name.clone()),
                    credits: Some(pkg.credits),
                    event_id: cmd.event_id.clone(),
                }));
                p.top_up = Some(TopUpCmd {
                    package: pkg.name.clone(),
                    external_id: key,
                });
                p.payment = payment_intent.as_ref().map(|pi| {
                    (
                        pi.clone(),
                        TopUpPayment {
                            account: self.id.to_string(),
                            session_id: session_id.clone(),
                            package: pkg.name.clone(),
                            credits: pkg.credits,
                            amount: pending.amount,
                            currency: pending.currency.clone(),
                        },
                    )
                });
                p
            }
            StripeChange::Subscription {
                info,
                deleted,
                rank,
            } => {
                let ended = billing.ended_subscriptions.contains(&info.id);
                if !deleted && ended {
                    return Ok(Plan::stale("the subscription was deleted"));
                }
                let held = billing.subscription.as_ref();
                let same = held.is_some_and(|c| c.id == info.id);
                if same && (created, *rank) < billing.subscription_version {
                    return Ok(Plan::stale(
                        "older than the subscription state the account holds",
                    ));
                }
                // The account follows its newest live subscription. An event about another,
                // older one is recorded (a deletion ends it) but changes neither plan nor
                // access.
                // A subscription with no price of a configured plan is not a meterd
                // subscription: neither it nor its deletion changes the account.
                if info.plan.is_none() {
                    return Ok(Plan::refused(
                        "unknown_prices",
                        format!(
                            "subscription {} has no price of a configured plan; the account is unchanged",
                            info.id
                        ),
                    ));
                }
                let other_live = held
                    .filter(|c| c.id != info.id && !billing.ended_subscriptions.contains(&c.id));
                // Deleting a subscription ends the account's plan only if no other live one
                // is the account's (events may arrive in any order: a deletion can come
                // before the creation of the same subscription).
                let current = match other_live {
                    None => true,
                    Some(c) => !deleted && info.created_s > c.created_s,
                };
                let fact = BillingFact::Subscription {
                    info: info.clone(),
                    deleted: *deleted,
                    rank: *rank,
                    current,
                };
                if !current {
                    return Ok(if *deleted {
                        Plan::applied(fact)
                    } else {
                        Plan {
                            outcome: StripeOutcome::Stale(
                                "about an older subscription than the account's current one".into(),
                            ),
                            ..Plan::applied(fact)
                        }
                    });
                }
                if let Some(c) = &info.customer
                    && profile.stripe_customer_id.is_none()
                    && let Some(owner) = self.customer_owner_elsewhere(c)?
                {
                    return Ok(Plan::refused(
                        "customer_in_use",
                        format!("customer {c} is linked to account {owner}"),
                    ));
                }
                let mut p = Plan::applied(fact);
                let mut next = profile.clone();
                if let Some(c) = &info.customer {
                    next.stripe_customer_id = Some(c.clone());
                }
                if *deleted {
                    let fallback = self.deps.catalog.plans.get(&cmd.fallback_plan);
                    next.plan = cmd.fallback_plan.clone();
                    next.seats = fallback.map(|f| f.min_seats.max(1)).unwrap_or(1);
                    next.overrides.clear();
                    set_status(&mut next, SubscriptionStatus::Active, now);
                } else {
                    if let Some(name) = &info.plan
                        && self.deps.catalog.plans.contains_key(name)
                    {
                        if *name != next.plan {
                            next.overrides.clear();
                        }
                        next.plan = name.clone();
                    } else if info.plan.is_none() {
                        tracing::debug!(account = %self.id, subscription = %info.id, "no configured plan has the subscription's prices; the plan is unchanged");
                    }
                    if let Some(q) = info.seats {
                        next.seats = u32::try_from(q.max(1)).unwrap_or(u32::MAX);
                    }
                    set_status(&mut next, status_of(&info.status), now);
                    p.period = info.period.and_then(|(a, b)| {
                        Some(Period {
                            start_ms: a.checked_mul(1000)?,
                            end_ms: b.checked_mul(1000)?,
                        })
                    });
                }
                p.profile = Some(next);
                p
            }
            StripeChange::TrialWillEnd {
                subscription,
                trial_end_s,
            } => {
                let mut p = Plan::applied(BillingFact::None);
                p.alerts.push(Alert {
                    kind: AlertKind::TrialEnding,
                    meter: subscription.clone(),
                    threshold: 0,
                    value: trial_end_s.and_then(|t| u64::try_from(t).ok()).unwrap_or(0),
                    limit: 0,
                });
                p
            }
            StripeChange::Invoice { summary, payment } => {
                let held = match summary.id.as_deref() {
                    Some(id) => billing.invoice(id),
                    None => billing.upcoming.as_ref(),
                };
                let newer_held = held.filter(|h| h.event_created_s > created).cloned();
                // An invoice of a subscription Stripe deleted no longer changes access.
                let ended = summary
                    .subscription
                    .as_ref()
                    .is_some_and(|s| billing.ended_subscriptions.contains(s));
                match payment {
                    Some(true) => {
                        let summary = newer_held.unwrap_or_else(|| summary.clone());
                        let id = summary.id.clone().unwrap_or_default();
                        let mut p = Plan::applied(BillingFact::Paid {
                            transaction: Transaction {
                                id,
                                kind: TransactionKind::Payment,
                                amount: summary.amount_paid,
                                currency: summary.currency.clone(),
                                at_s: summary.paid_at_s.unwrap_or(created),
                                reference: summary.number.clone(),
                                credits: None,
                                event_id: cmd.event_id.clone(),
                            },
                            summary,
                        });
                        if profile.status == SubscriptionStatus::PastDue
                            && !ended
                            && created >= billing.payment_version
                        {
                            let mut next = profile.clone();
                            set_status(&mut next, SubscriptionStatus::Active, now);
                            p.profile = Some(next);
                        }
                        p
                    }
                    Some(false) => {
                        if created < billing.payment_version {
                            return Ok(Plan::stale("a later payment event was applied"));
                        }
                        let mut p = Plan::applied(BillingFact::Invoice {
                            summary: summary.clone(),
                            payment: Some(false),
                        });
                        if !ended
                            && matches!(
                                profile.status,
                                SubscriptionStatus::Active | SubscriptionStatus::Trialing
                            )
                        {
                            let mut next = profile.clone();
                            set_status(&mut next, SubscriptionStatus::PastDue, now);
                            p.profile = Some(next);
                        }
                        p.alerts.push(Alert {
                            kind: AlertKind::PaymentFailed,
                            meter: summary.id.clone().unwrap_or_default(),
                            threshold: summary.attempt_count,
                            value: u64::try_from(summary.amount_due).unwrap_or(0),
                            limit: 0,
                        });
                        p
                    }
                    None => {
                        if newer_held.is_some() {
                            return Ok(Plan::stale("a newer state of the invoice is held"));
                        }
                        let mut p = Plan::applied(BillingFact::Invoice {
                            summary: summary.clone(),
                            payment: None,
                        });
                        let due = matches!(
                            cmd.event_type.as_str(),
                            "invoice.finalized" | "invoice.upcoming"
                        );
                        if due && summary.metered_amount > 0 {
                            p.alerts.push(Alert {
                                kind: AlertKind::InvoiceDue,
                                meter: summary.id.clone().unwrap_or_else(|| "upcoming".to_owned()),
                                threshold: summary
                                    .period_end_s
                                    .and_then(|t| u64::try_from(t).ok())
                                    .unwrap_or(0),
                                value: u64::try_from(summary.metered_amount).unwrap_or(0),
                                limit: u64::try_from(summary.total).unwrap_or(0),
                            });
                        }
                        p
                    }
                }
            }
            StripeChange::Customer {
                email,
                delinquent,
                default_payment_method,
            } => {
                if created < billing.customer_version {
                    return Ok(Plan::stale(
                        "older than the customer state the account holds",
                    ));
                }
                let mut p = Plan::applied(BillingFact::Customer {
                    email: email.clone(),
                    delinquent: *delinquent,
                    default_payment_method: default_payment_method.clone(),
                });
                if let Some(e) = email
                    && e.len() <= 256
                    && profile.email.as_ref() != Some(e)
                {
                    let mut next = profile.clone();
                    next.email = Some(e.clone());
                    p.profile = Some(next);
                }
                p
            }
            StripeChange::PaymentMethod { id, attached } => {
                if billing
                    .payment_methods
                    .iter()
                    .any(|m| m.id == *id && m.at_s > created)
                {
                    return Ok(Plan::stale("older than the payment method state held"));
                }
                let mut p = Plan::applied(BillingFact::PaymentMethod {
                    id: id.clone(),
                    attached: *attached,
                });
                let others = billing
                    .payment_methods
                    .iter()
                    .filter(|m| m.attached && m.id != *id)
                    .count();
                if !attached && others == 0 {
                    p.alerts.push(Alert {
                        kind: AlertKind::PaymentMethodRemoved,
                        meter: id.clone(),
                        threshold: 0,
                        value: 0,
                        limit: 0,
                    });
                }
                p
            }
            StripeChange::Refund {
                charge,
                amount,
                currency,
                reference,
            } => {
                let held = billing
                    .transactions
                    .iter()
                    .find(|t| t.kind == TransactionKind::Refund && t.id == *charge);
                if held.is_some_and(|t| t.at_s > created) {
                    return Ok(Plan::stale("a later refund of this charge was recorded"));
                }
                let mut p = Plan::applied(BillingFact::Transaction(Transaction {
                    id: charge.clone(),
                    kind: TransactionKind::Refund,
                    amount: *amount,
                    currency: currency.clone(),
                    at_s: created,
                    reference: reference.clone(),
                    credits: None,
                    event_id: cmd.event_id.clone(),
                }));
                // A refund of a top-up takes back the refunded share of its credits
                // (`amount` is the charge's refunded total: cumulative, so order-free).
                if let Some(pi) = reference
                    && let Some(pay) = self.own_payment(pi)?
                    && pay.amount > 0
                    && currency.eq_ignore_ascii_case(&pay.currency)
                {
                    let refunded = u64::try_from(*amount).unwrap_or(0).min(pay.amount);
                    let owed =
                        u128::from(pay.credits) * u128::from(refunded) / u128::from(pay.amount);
                    let owed = u64::try_from(owed).unwrap_or(pay.credits);
                    p.clawback = Some((pi.clone(), owed, pay.session_id));
                }
                p
            }
            StripeChange::Dispute {
                id,
                payment_intent,
                amount,
                currency,
                open,
                status,
            } => {
                let Some(pay) = self.own_payment(payment_intent)? else {
                    return Ok(Plan::refused(
                        "not_ours",
                        format!("payment {payment_intent} paid no top-up of this account"),
                    ));
                };
                let b = self.fold.balances.as_ref();
                if *open && b.is_some_and(|b| b.disputes_closed.contains(id)) {
                    return Ok(Plan::stale("the dispute closed already"));
                }
                let lost = !*open && status == "lost";
                let suspends = *open && cmd.money.dispute_suspends;
                let mut p = Plan::applied(BillingFact::Dispute {
                    id: id.clone(),
                    payment: payment_intent.clone(),
                    amount: *amount,
                    currency: currency.clone(),
                    open: *open,
                    won: !*open && !lost,
                    suspends,
                });
                if *open {
                    p.alerts.push(Alert {
                        kind: AlertKind::Dispute,
                        meter: id.clone(),
                        threshold: u64::try_from(created).unwrap_or(0),
                        value: u64::try_from(*amount).unwrap_or(0),
                        limit: u64::from(suspends),
                    });
                }
                if lost {
                    // A lost dispute returned the money: the credits go back as after a full
                    // refund.
                    p.clawback = Some((payment_intent.clone(), pay.credits, pay.session_id));
                }
                p
            }
            StripeChange::Features(f) => {
                if created < billing.features_version {
                    return Ok(Plan::stale("older than the features the account holds"));
                }
                Plan::applied(BillingFact::Features(f.clone()))
            }
            StripeChange::MeterErrors { meter, codes } => {
                let count: u64 = codes.iter().map(|(_, n)| *n).sum();
                let mut p = Plan::applied(BillingFact::MeterErrors { count });
                p.alerts.push(Alert {
                    kind: AlertKind::MeterErrors,
                    meter: meter.clone().unwrap_or_default(),
                    threshold: u64::try_from(created).unwrap_or(0),
                    value: count,
                    limit: 0,
                });
                p
            }
        };
        plan.alerts.retain(|a| self.alert_new(a));
        Ok(plan)
    }
}

fn set_status(p: &mut crate::ledger::AccountProfile, s: SubscriptionStatus, now: i64) {
    if p.status != s {
        p.status = s;
        p.status_since_ms = now;
    }
}
