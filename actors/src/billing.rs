//! What Stripe says about an account: subscriptions, invoices, payments, payment methods and
//! features, as webhook events deliver them.
//!
//! Two halves, both pure:
//! - [`interpret`] turns a verified event (its JSON, tolerant of fields and types it does not
//!   know) into a [`StripeChange`] and the account it concerns ([`Target`]).
//! - [`BillingState`] is the fold of an account's `Stripe` ledger entries ([`StripeRecord`]):
//!   the subscription, invoice summaries, transactions and the versions that decide whether a
//!   late event is stale.
//!
//! The account actor decides (with the account's state) whether a change applies, and writes
//! one self-contained `Stripe` entry per event, idempotent on the event id.
//!
//! This file holds the fold; `events` holds the interpretation of event JSON.

mod events;

pub use events::*;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::model::AccountId;
use crate::model::Alert;
use crate::model::SubscriptionStatus;

/// At most this many invoice summaries and transactions are kept on an account (newest).
pub const MAX_INVOICES: usize = 100;
pub const MAX_TRANSACTIONS: usize = 500;
const MAX_ENDED: usize = 32;

/// One item of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubItem {
    pub id: String,
    pub price: String,
    /// `licensed` (per seat / base) or `metered`.
    pub usage_type: String,
    pub quantity: Option<u64>,
    /// The Stripe meter of a metered price.
    pub meter: Option<String>,
    /// The meterd plan whose price this is, if any.
    pub plan: Option<String>,
}

/// A subscription as the last applied event described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub id: String,
    /// When the subscription was created (unix s): the newest live one is the account's.
    pub created_s: i64,
    pub customer: Option<String>,
    /// Stripe's status string (`trialing`, `active`, `past_due`, `canceled`, ...).
    pub status: String,
    /// The plan of its licensed item's price (else of its metered item's price).
    pub plan: Option<String>,
    /// The licensed item's quantity.
    pub seats: Option<u64>,
    pub items: Vec<SubItem>,
    /// The current period `[start, end)` in unix seconds (from the items).
    pub period: Option<(i64, i64)>,
    pub trial_end_s: Option<i64>,
    pub cancel_at_period_end: bool,
    pub canceled_at_s: Option<i64>,
    pub ended_at_s: Option<i64>,
}

/// An invoice as Stripe described it last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceSummary {
    /// `None` for an upcoming invoice (a preview).
    pub id: Option<String>,
    pub number: Option<String>,
    pub status: Option<String>,
    pub billing_reason: Option<String>,
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub total: i64,
    /// The part of `total` from metered prices.
    pub metered_amount: i64,
    pub hosted_invoice_url: Option<String>,
    pub period_start_s: Option<i64>,
    pub period_end_s: Option<i64>,
    pub created_s: Option<i64>,
    pub attempt_count: u64,
    pub next_payment_attempt_s: Option<i64>,
    /// When it was paid (`status_transitions.paid_at`).
    pub paid_at_s: Option<i64>,
    pub subscription: Option<String>,
    /// The `created` of the event that described it.
    pub event_created_s: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionKind {
    /// An invoice paid.
    Payment,
    /// Credits bought through Checkout.
    TopUp,
    /// Money returned.
    Refund,
}

impl TransactionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionKind::Payment => "payment",
            TransactionKind::TopUp => "topup",
            TransactionKind::Refund => "refund",
        }
    }
}

/// Money that moved, in minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The invoice, checkout session or refund it is about (unique per kind).
    pub id: String,
    pub kind: TransactionKind,
    pub amount: i64,
    pub currency: String,
    pub at_s: i64,
    /// The invoice number or the top-up package.
    pub reference: Option<String>,
    /// Credits granted (top-ups).
    pub credits: Option<u64>,
    /// The event that recorded it.
    pub event_id: String,
}

/// What an applied event changed in [`BillingState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BillingFact {
    None,
    Subscription {
        info: SubscriptionInfo,
        deleted: bool,
        /// `created` 0, `updated` 1, `deleted` 2: breaks ties between events of one second.
        rank: u8,
        /// About the account's current subscription (or one taking over): else only a
        /// deletion is recorded.
        current: bool,
    },
    Invoice {
        summary: InvoiceSummary,
        /// `Some(true)`: paid; `Some(false)`: a payment failed.
        payment: Option<bool>,
    },
    Transaction(Transaction),
    /// An invoice paid: its summary and the payment.
    Paid {
        summary: InvoiceSummary,
        transaction: Transaction,
    },
    Customer {
        email: Option<String>,
        delinquent: bool,
        default_payment_method: Option<String>,
    },
    PaymentMethod {
        id: String,
        attached: bool,
    },
    Features(Vec<String>),
    MeterErrors {
        count: u64,
    },
    /// A payment was disputed (`open`), or its dispute closed (`won`: the money stays).
    /// `suspends`: credit use is suspended while it is open (`[webhooks] dispute_suspends_credits`).
    Dispute {
        id: String,
        /// The disputed payment (payment intent).
        payment: String,
        amount: i64,
        currency: String,
        open: bool,
        won: bool,
        suspends: bool,
    },
}

/// Whether an event changed the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeOutcome {
    Applied,
    /// Older than what the account holds (or about a deleted subscription): recorded so a
    /// redelivery is recognised, changes nothing.
    Stale(String),
    /// Nothing to do for this account.
    Ignored(String),
}

impl StripeOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            StripeOutcome::Applied => "applied",
            StripeOutcome::Stale(_) => "stale",
            StripeOutcome::Ignored(_) => "ignored",
        }
    }
}

/// The ledger entry of one Stripe event applied to one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeRecord {
    pub event_id: String,
    pub event_type: String,
    pub created_s: i64,
    pub outcome: StripeOutcome,
    pub fact: BillingFact,
    pub alerts: Vec<Alert>,
}

/// A payment method and whether it is attached, as of `at_s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentMethodState {
    pub id: String,
    pub attached: bool,
    pub at_s: i64,
}

/// The fold of an account's `Stripe` entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BillingState {
    pub subscription: Option<SubscriptionInfo>,
    /// `(created, rank)` of the last subscription event applied.
    pub subscription_version: (i64, u8),
    /// Subscriptions Stripe deleted (newest last): never resurrected by a late event.
    pub ended_subscriptions: Vec<String>,
    pub customer_version: i64,
    pub delinquent: bool,
    pub default_payment_method: Option<String>,
    pub payment_methods: Vec<PaymentMethodState>,
    pub features: Vec<String>,
    pub features_version: i64,
    /// `created` of the last invoice payment event (paid or failed) applied.
    pub payment_version: i64,
    /// Newest first, at most [`MAX_INVOICES`].
    pub invoices: Vec<InvoiceSummary>,
    pub upcoming: Option<InvoiceSummary>,
    /// Newest first, at most [`MAX_TRANSACTIONS`].
    pub transactions: Vec<Transaction>,
    pub meter_errors: u64,
    pub events_applied: u64,
}

impl BillingState {
    /// Folds one `Stripe` entry. Stale and ignored events change nothing.
    pub fn apply(&mut self, r: &StripeRecord) {
        if r.outcome != StripeOutcome::Applied {
            return;
        }
        self.events_applied += 1;
        match &r.fact {
            // A dispute changes the balances (see `Balances::apply`), not the billing state.
            BillingFact::None | BillingFact::Dispute { .. } => {}
            BillingFact::Subscription {
                info,
                deleted,
                rank,
                current,
            } => {
                if *deleted && !self.ended_subscriptions.contains(&info.id) {
                    self.ended_subscriptions.push(info.id.clone());
                    if self.ended_subscriptions.len() > MAX_ENDED {
                        self.ended_subscriptions.remove(0);
                    }
                }
                if *current {
                    self.subscription_version = (r.created_s, *rank);
                    self.subscription = Some(info.clone());
                }
            }
            BillingFact::Invoice { summary, payment } => {
                if payment.is_some() {
                    self.payment_version = r.created_s;
                }
                self.put_invoice(summary);
            }
            BillingFact::Paid {
                summary,
                transaction,
            } => {
                self.payment_version = self.payment_version.max(r.created_s);
                self.put_invoice(summary);
                self.put_transaction(transaction);
            }
            BillingFact::Transaction(t) => self.put_transaction(t),
            BillingFact::Customer {
                email: _,
                delinquent,
                default_payment_method,
            } => {
                self.customer_version = r.created_s;
                self.delinquent = *delinquent;
                self.default_payment_method = default_payment_method.clone();
            }
            BillingFact::PaymentMethod { id, attached } => {
                let state = PaymentMethodState {
                    id: id.clone(),
                    attached: *attached,
                    at_s: r.created_s,
                };
                match self.payment_methods.iter_mut().find(|p| p.id == *id) {
                    Some(p) => *p = state,
                    None => self.payment_methods.push(state),
                }
            }
            BillingFact::Features(f) => {
                self.features = f.clone();
                self.features_version = r.created_s;
            }
            BillingFact::MeterErrors { count } => {
                self.meter_errors = self.meter_errors.saturating_add(*count);
            }
        }
    }

    fn put_invoice(&mut self, s: &InvoiceSummary) {
        let Some(id) = &s.id else {
            self.upcoming = Some(s.clone());
            return;
        };
        self.invoices.retain(|i| i.id.as_ref() != Some(id));
        self.invoices.push(s.clone());
        self.invoices.sort_by_key(|i| {
            (
                std::cmp::Reverse(i.created_s.unwrap_or(i.event_created_s)),
                i.id.clone(),
            )
        });
        self.invoices.truncate(MAX_INVOICES);
        // A real invoice for the upcoming period replaces its preview.
        if self
            .upcoming
            .as_ref()
            .is_some_and(|u| u.period_end_s.is_some() && u.period_end_s == s.period_end_s)
        {
            self.upcoming = None;
        }
    }

    fn put_transaction(&mut self, t: &Transaction) {
        if let Some(x) = self
            .transactions
            .iter_mut()
            .find(|x| x.id == t.id && x.kind == t.kind)
        {
            // A refund's amount is the charge's refunded total: a later one replaces it.
            if t.kind == TransactionKind::Refund && t.at_s >= x.at_s {
                *x = t.clone();
            }
            return;
        }
        self.transactions.push(t.clone());
        self.transactions
            .sort_by_key(|x| (std::cmp::Reverse(x.at_s), x.id.clone()));
        self.transactions.truncate(MAX_TRANSACTIONS);
    }

    /// The summary held for invoice `id`.
    pub fn invoice(&self, id: &str) -> Option<&InvoiceSummary> {
        self.invoices.iter().find(|i| i.id.as_deref() == Some(id))
    }

    pub fn has_transaction(&self, kind: TransactionKind, id: &str) -> bool {
        self.transactions
            .iter()
            .any(|t| t.kind == kind && t.id == id)
    }

    /// Attached payment methods.
    pub fn attached_methods(&self) -> usize {
        self.payment_methods.iter().filter(|p| p.attached).count()
    }
}
