//! The stored shapes of every record, frozen per format version, apart from the domain types.
//!
//! bincode is positional: a field added to a domain type, or a variant inserted before the
//! last, silently changes what its bytes mean. So nothing the store writes is a domain type.
//! Each version's records are their own types (module [`v1`]), declared once and never edited
//! after a release; [`Freeze`] converts between them and the domain types, field by field.
//! A domain type that gains a field no longer builds from its frozen record (the conversion
//! names every field), which is the moment to add a new version with a conversion from the
//! old one, never to edit a released one.
//!
//! The golden-bytes tests (`store/golden.rs`, bytes in `actors/tests/golden/records.txt`) hold
//! committed bytes of every record kind that every later build must decode to the same value.

use std::collections::BTreeMap;

/// A frozen stored shape `Self` of the domain type `D`.
pub trait Freeze<D>: Sized {
    /// The stored form of `d` (clones what it must).
    fn freeze(d: &D) -> Self;
    /// The domain value this record stands for.
    fn thaw(self) -> D;
}

macro_rules! same {
    ($($t:ty),*) => {$(
        impl Freeze<$t> for $t {
            fn freeze(d: &$t) -> Self {
                d.clone()
            }
            fn thaw(self) -> $t {
                self
            }
        }
    )*};
}
same!(u8, u32, u64, i64, bool, String, [u8; 32]);

impl<F: Freeze<D>, D> Freeze<Option<D>> for Option<F> {
    fn freeze(d: &Option<D>) -> Self {
        d.as_ref().map(F::freeze)
    }
    fn thaw(self) -> Option<D> {
        self.map(F::thaw)
    }
}

impl<F: Freeze<D>, D> Freeze<Vec<D>> for Vec<F> {
    fn freeze(d: &Vec<D>) -> Self {
        d.iter().map(F::freeze).collect()
    }
    fn thaw(self) -> Vec<D> {
        self.into_iter().map(F::thaw).collect()
    }
}

impl<K: Ord + Clone, F: Freeze<D>, D> Freeze<BTreeMap<K, D>> for BTreeMap<K, F> {
    fn freeze(d: &BTreeMap<K, D>) -> Self {
        d.iter().map(|(k, v)| (k.clone(), F::freeze(v))).collect()
    }
    fn thaw(self) -> BTreeMap<K, D> {
        self.into_iter().map(|(k, v)| (k, F::thaw(v))).collect()
    }
}

impl<FA: Freeze<A>, FB: Freeze<B>, A, B> Freeze<(A, B)> for (FA, FB) {
    fn freeze(d: &(A, B)) -> Self {
        (FA::freeze(&d.0), FB::freeze(&d.1))
    }
    fn thaw(self) -> (A, B) {
        (self.0.thaw(), self.1.thaw())
    }
}

/// A frozen struct and its field-by-field conversion from and to the domain struct. The domain
/// struct literal in `thaw` names every field, so a field added to the domain type without a
/// new stored version fails to build.
macro_rules! frozen_struct {
    ($(#[$m:meta])* $name:ident => $dom:path { $($f:ident: $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
        pub struct $name {
            $(pub $f: $t),*
        }
        impl $crate::store::records::Freeze<$dom> for $name {
            fn freeze(d: &$dom) -> Self {
                Self { $($f: $crate::store::records::Freeze::freeze(&d.$f)),* }
            }
            fn thaw(self) -> $dom {
                self.into()
            }
        }
        impl From<$name> for $dom {
            fn from(v: $name) -> $dom {
                $dom { $($f: $crate::store::records::Freeze::thaw(v.$f)),* }
            }
        }
    };
}

/// A frozen fieldless enum mapped variant for variant onto the domain enum.
macro_rules! frozen_unit_enum {
    ($(#[$m:meta])* $name:ident => $dom:path { $($v:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
        pub enum $name {
            $($v),*
        }
        impl $crate::store::records::Freeze<$dom> for $name {
            fn freeze(d: &$dom) -> Self {
                match d {
                    $(<$dom>::$v => $name::$v),*
                }
            }
            fn thaw(self) -> $dom {
                match self {
                    $($name::$v => <$dom>::$v),*
                }
            }
        }
    };
}

/// The first frozen format: the shapes written by releases up to and including the one that
/// introduced this module. Release 6 (outbox, before webhooks) wrote a subset of it: its
/// ledger variants are a prefix of [`v1::EntryKind`], its snapshots are
/// [`v1::SnapshotV1`] and its outbox records `StoredOutbox::V1`.
///
/// Never edit a type in here; add `v2` with conversions from these instead.
pub mod v1 {
    use std::collections::BTreeMap;

    use super::Freeze;
    use crate::billing as b;
    use crate::ledger as l;
    use crate::model as m;
    use crate::store::events as ev;
    use crate::store::recon as rc;

    frozen_struct!(Period => m::Period { start_ms: i64, end_ms: i64 });

    frozen_unit_enum!(SubscriptionStatus => m::SubscriptionStatus {
        Active, Trialing, PastDue, Canceled, Unpaid, Incomplete,
    });

    /// `OverageOverride`: variant 1 carries data, so it is mapped by hand.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub enum OverageOverride {
        Block,
        Credits { credits_per_unit: u64 },
        Bill,
        Unlimited,
    }

    impl Freeze<m::OverageOverride> for OverageOverride {
        fn freeze(d: &m::OverageOverride) -> Self {
            match *d {
                m::OverageOverride::Block => Self::Block,
                m::OverageOverride::Credits { credits_per_unit } => {
                    Self::Credits { credits_per_unit }
                }
                m::OverageOverride::Bill => Self::Bill,
                m::OverageOverride::Unlimited => Self::Unlimited,
            }
        }
        fn thaw(self) -> m::OverageOverride {
            match self {
                Self::Block => m::OverageOverride::Block,
                Self::Credits { credits_per_unit } => {
                    m::OverageOverride::Credits { credits_per_unit }
                }
                Self::Bill => m::OverageOverride::Bill,
                Self::Unlimited => m::OverageOverride::Unlimited,
            }
        }
    }

    frozen_struct!(MeterOverride => m::MeterOverride {
        included: Option<u64>,
        overage: Option<OverageOverride>,
    });

    frozen_unit_enum!(SpendCapAction => m::SpendCapAction { Block, Notify });

    frozen_struct!(SpendCap => m::SpendCap { amount: u64, action: SpendCapAction });

    frozen_struct!(AccountProfile => l::AccountProfile {
        plan: String,
        seats: u32,
        email: Option<String>,
        stripe_customer_id: Option<String>,
        metadata: Vec<(String, String)>,
        created_at_ms: i64,
        status: SubscriptionStatus,
        status_since_ms: i64,
        overrides: BTreeMap<String, MeterOverride>,
        spend_cap: Option<SpendCap>,
    });

    frozen_unit_enum!(DenyCode => m::DenyCode {
        CapReached, InsufficientCredits, MeterNotInPlan, SubscriptionInactive, SpendCapReached,
    });

    #[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub enum Outcome {
        Allowed,
        Denied(DenyCode),
    }

    impl Freeze<m::Outcome> for Outcome {
        fn freeze(d: &m::Outcome) -> Self {
            match d {
                m::Outcome::Allowed => Self::Allowed,
                m::Outcome::Denied(c) => Self::Denied(DenyCode::freeze(c)),
            }
        }
        fn thaw(self) -> m::Outcome {
            match self {
                Self::Allowed => m::Outcome::Allowed,
                Self::Denied(c) => m::Outcome::Denied(c.thaw()),
            }
        }
    }

    // Variants are only ever appended (older data never holds the new ones): `MoneyRefused`,
    // `CreditsClawedBack` and `Dispute` arrived with issue 12.
    frozen_unit_enum!(AlertKind => m::AlertKind {
        Usage, Spend, LowCredits, TrialEnding, PaymentFailed, InvoiceDue, PaymentMethodRemoved,
        MeterErrors, MoneyRefused, CreditsClawedBack, Dispute,
    });

    frozen_struct!(Alert => m::Alert {
        kind: AlertKind,
        meter: String,
        threshold: u64,
        value: u64,
        limit: u64,
    });

    frozen_struct!(FiredAlert => l::FiredAlert { seq: u64, at_ms: i64, alert: Alert });

    frozen_unit_enum!(CreditCategory => l::CreditCategory { Paid, Promotional });

    frozen_struct!(GrantTerms => l::GrantTerms {
        priority: u32,
        effective_at_ms: i64,
        expires_at_ms: Option<i64>,
        category: CreditCategory,
        external_id: Option<String>,
        package: Option<String>,
    });

    frozen_struct!(Grant => l::Grant { amount: u64, remaining: u64, terms: GrantTerms });

    frozen_struct!(ConsumeRecord => l::ConsumeRecord {
        meter: String,
        quantity: u64,
        idempotency_key: String,
        digest: [u8; 32],
        metadata: Vec<(String, String)>,
        outcome: Outcome,
        billable: u64,
        credits_spent: u64,
        burns: Vec<(u64, u64)>,
        included: u64,
        limit: Option<u64>,
        used_after: u64,
        billable_after: u64,
        credits_after: u64,
        alerts: Vec<Alert>,
    });

    frozen_struct!(CreditRecord => l::CreditRecord {
        amount: i64,
        reason: String,
        idempotency_key: String,
        digest: [u8; 32],
        grant: Option<GrantTerms>,
        burns: Vec<(u64, u64)>,
        credits_after: u64,
    });

    frozen_struct!(HoldRecord => l::HoldRecord {
        meter: String,
        quantity: u64,
        expires_at_ms: i64,
        idempotency_key: String,
        digest: [u8; 32],
        outcome: Outcome,
        burns: Vec<(u64, u64)>,
        included: u64,
        limit: Option<u64>,
        reserved_after: u64,
        used_after: u64,
        credits_after: u64,
    });

    frozen_struct!(SettleRecord => l::SettleRecord {
        rid: u64,
        meter: String,
        committed: Option<u64>,
        expired: bool,
        billable: u64,
        kept: u64,
        refunds: Vec<(u64, u64)>,
        burns: Vec<(u64, u64)>,
        used_after: u64,
        reserved_after: u64,
        billable_after: u64,
        credits_after: u64,
        alerts: Vec<Alert>,
    });

    frozen_struct!(SubItem => b::SubItem {
        id: String,
        price: String,
        usage_type: String,
        quantity: Option<u64>,
        meter: Option<String>,
        plan: Option<String>,
    });

    frozen_struct!(SubscriptionInfo => b::SubscriptionInfo {
        id: String,
        created_s: i64,
        customer: Option<String>,
        status: String,
        plan: Option<String>,
        seats: Option<u64>,
        items: Vec<SubItem>,
        period: Option<(i64, i64)>,
        trial_end_s: Option<i64>,
        cancel_at_period_end: bool,
        canceled_at_s: Option<i64>,
        ended_at_s: Option<i64>,
    });

    frozen_struct!(InvoiceSummary => b::InvoiceSummary {
        id: Option<String>,
        number: Option<String>,
        status: Option<String>,
        billing_reason: Option<String>,
        currency: String,
        amount_due: i64,
        amount_paid: i64,
        amount_remaining: i64,
        total: i64,
        metered_amount: i64,
        hosted_invoice_url: Option<String>,
        period_start_s: Option<i64>,
        period_end_s: Option<i64>,
        created_s: Option<i64>,
        attempt_count: u64,
        next_payment_attempt_s: Option<i64>,
        paid_at_s: Option<i64>,
        subscription: Option<String>,
        event_created_s: i64,
    });

    frozen_unit_enum!(TransactionKind => b::TransactionKind { Payment, TopUp, Refund });

    frozen_struct!(Transaction => b::Transaction {
        id: String,
        kind: TransactionKind,
        amount: i64,
        currency: String,
        at_s: i64,
        reference: Option<String>,
        credits: Option<u64>,
        event_id: String,
    });

    #[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub enum BillingFact {
        None,
        Subscription {
            info: SubscriptionInfo,
            deleted: bool,
            rank: u8,
            current: bool,
        },
        Invoice {
            summary: InvoiceSummary,
            payment: Option<bool>,
        },
        Transaction(Transaction),
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
        /// Appended with issue 12 (older data never holds it).
        Dispute {
            id: String,
            payment: String,
            amount: i64,
            currency: String,
            open: bool,
            won: bool,
            suspends: bool,
        },
    }

    impl Freeze<b::BillingFact> for BillingFact {
        fn freeze(d: &b::BillingFact) -> Self {
            match d {
                b::BillingFact::None => Self::None,
                b::BillingFact::Subscription {
                    info,
                    deleted,
                    rank,
                    current,
                } => Self::Subscription {
                    info: Freeze::freeze(info),
                    deleted: *deleted,
                    rank: *rank,
                    current: *current,
                },
                b::BillingFact::Invoice { summary, payment } => Self::Invoice {
                    summary: Freeze::freeze(summary),
                    payment: *payment,
                },
                b::BillingFact::Transaction(t) => Self::Transaction(Freeze::freeze(t)),
                b::BillingFact::Paid {
                    summary,
                    transaction,
                } => Self::Paid {
                    summary: Freeze::freeze(summary),
                    transaction: Freeze::freeze(transaction),
                },
                b::BillingFact::Customer {
                    email,
                    delinquent,
                    default_payment_method,
                } => Self::Customer {
                    email: email.clone(),
                    delinquent: *delinquent,
                    default_payment_method: default_payment_method.clone(),
                },
                b::BillingFact::PaymentMethod { id, attached } => Self::PaymentMethod {
                    id: id.clone(),
                    attached: *attached,
                },
                b::BillingFact::Features(f) => Self::Features(f.clone()),
                b::BillingFact::MeterErrors { count } => Self::MeterErrors { count: *count },
                b::BillingFact::Dispute {
                    id,
                    payment,
                    amount,
                    currency,
                    open,
                    won,
                    suspends,
                } => Self::Dispute {
                    id: id.clone(),
                    payment: payment.clone(),
                    amount: *amount,
                    currency: currency.clone(),
                    open: *open,
                    won: *won,
                    suspends: *suspends,
                },
            }
        }
        fn thaw(self) -> b::BillingFact {
            match self {
                Self::None => b::BillingFact::None,
                Self::Subscription {
                    info,
                    deleted,
                    rank,
                    current,
                } => b::BillingFact::Subscription {
                    info: info.thaw(),
                    deleted,
                    rank,
                    current,
                },
                Self::Invoice { summary, payment } => b::BillingFact::Invoice {
                    summary: summary.thaw(),
                    payment,
                },
                Self::Transaction(t) => b::BillingFact::Transaction(t.thaw()),
                Self::Paid {
                    summary,
                    transaction,
                } => b::BillingFact::Paid {
                    summary: summary.thaw(),
                    transaction: transaction.thaw(),
                },
                Self::Customer {
                    email,
                    delinquent,
                    default_payment_method,
                } => b::BillingFact::Customer {
                    email,
                    delinquent,
                    default_payment_method,
                },
                Self::PaymentMethod { id, attached } => {
                    b::BillingFact::PaymentMethod { id, attached }
                }
                Self::Features(f) => b::BillingFact::Features(f),
                Self::MeterErrors { count } => b::BillingFact::MeterErrors { count },
                Self::Dispute {
                    id,
                    payment,
                    amount,
                    currency,
                    open,
                    won,
                    suspends,
                } => b::BillingFact::Dispute {
                    id,
                    payment,
                    amount,
                    currency,
                    open,
                    won,
                    suspends,
                },
            }
        }
    }

    #[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub enum StripeOutcome {
        Applied,
        Stale(String),
        Ignored(String),
    }

    impl Freeze<b::StripeOutcome> for StripeOutcome {
        fn freeze(d: &b::StripeOutcome) -> Self {
            match d {
                b::StripeOutcome::Applied => Self::Applied,
                b::StripeOutcome::Stale(s) => Self::Stale(s.clone()),
                b::StripeOutcome::Ignored(s) => Self::Ignored(s.clone()),
            }
        }
        fn thaw(self) -> b::StripeOutcome {
            match self {
                Self::Applied => b::StripeOutcome::Applied,
                Self::Stale(s) => b::StripeOutcome::Stale(s),
                Self::Ignored(s) => b::StripeOutcome::Ignored(s),
            }
        }
    }

    frozen_struct!(StripeRecord => b::StripeRecord {
        event_id: String,
        event_type: String,
        created_s: i64,
        outcome: StripeOutcome,
        fact: BillingFact,
        alerts: Vec<Alert>,
    });

    /// `EntryKind`. Release 6 wrote variants 0 to 7 only.
    #[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub enum EntryKind {
        AccountUpserted(AccountProfile),
        PeriodRolled {
            from: Period,
            to: Period,
        },
        PeriodAdjusted {
            from: Period,
            to: Period,
        },
        Consume(ConsumeRecord),
        Credit(CreditRecord),
        Reserved(HoldRecord),
        Settled(SettleRecord),
        CreditExpired {
            grant_id: u64,
            amount: u64,
            credits_after: u64,
        },
        /// Boxed like the domain's (bincode writes a box as its content).
        Stripe(Box<StripeRecord>),
        /// Appended with issue 12 (older data never holds it).
        Clawback(ClawbackRecord),
    }

    frozen_struct!(ClawbackRecord => l::ClawbackRecord {
        reference: String,
        owed: u64,
        burns: Vec<(u64, u64)>,
        debt_added: u64,
        forgiven: u64,
        debt_paid: u64,
        credits_after: u64,
        debt_after: u64,
    });

    impl Freeze<l::EntryKind> for EntryKind {
        fn freeze(d: &l::EntryKind) -> Self {
            match d {
                l::EntryKind::AccountUpserted(p) => Self::AccountUpserted(Freeze::freeze(p)),
                l::EntryKind::PeriodRolled { from, to } => Self::PeriodRolled {
                    from: Freeze::freeze(from),
                    to: Freeze::freeze(to),
                },
                l::EntryKind::PeriodAdjusted { from, to } => Self::PeriodAdjusted {
                    from: Freeze::freeze(from),
                    to: Freeze::freeze(to),
                },
                l::EntryKind::Consume(c) => Self::Consume(Freeze::freeze(c)),
                l::EntryKind::Credit(c) => Self::Credit(Freeze::freeze(c)),
                l::EntryKind::Reserved(h) => Self::Reserved(Freeze::freeze(h)),
                l::EntryKind::Settled(s) => Self::Settled(Freeze::freeze(s)),
                l::EntryKind::CreditExpired {
                    grant_id,
                    amount,
                    credits_after,
                } => Self::CreditExpired {
                    grant_id: *grant_id,
                    amount: *amount,
                    credits_after: *credits_after,
                },
                l::EntryKind::Stripe(r) => Self::Stripe(Box::new(StripeRecord::freeze(r))),
                l::EntryKind::Clawback(c) => Self::Clawback(Freeze::freeze(c)),
            }
        }
        fn thaw(self) -> l::EntryKind {
            match self {
                Self::AccountUpserted(p) => l::EntryKind::AccountUpserted(p.thaw()),
                Self::PeriodRolled { from, to } => l::EntryKind::PeriodRolled {
                    from: from.thaw(),
                    to: to.thaw(),
                },
                Self::PeriodAdjusted { from, to } => l::EntryKind::PeriodAdjusted {
                    from: from.thaw(),
                    to: to.thaw(),
                },
                Self::Consume(c) => l::EntryKind::Consume(c.thaw()),
                Self::Credit(c) => l::EntryKind::Credit(c.thaw()),
                Self::Reserved(h) => l::EntryKind::Reserved(h.thaw()),
                Self::Settled(s) => l::EntryKind::Settled(s.thaw()),
                Self::CreditExpired {
                    grant_id,
                    amount,
                    credits_after,
                } => l::EntryKind::CreditExpired {
                    grant_id,
                    amount,
                    credits_after,
                },
                Self::Stripe(r) => l::EntryKind::Stripe(Box::new((*r).thaw())),
                Self::Clawback(c) => l::EntryKind::Clawback(c.thaw()),
            }
        }
    }

    frozen_struct!(LedgerEntry => l::LedgerEntry { seq: u64, at_ms: i64, kind: EntryKind });

    frozen_struct!(MeterUsage => l::MeterUsage { used: u64, billable: u64, reserved: u64 });

    frozen_struct!(Hold => l::Hold {
        meter: String,
        quantity: u64,
        expires_at_ms: i64,
        burns: Vec<(u64, u64)>,
    });

    /// `Balances` as releases before issue 12 wrote it. The credit debt, clawbacks and open
    /// disputes that came later travel beside it (`BalancesExtra`, snapshot V3); thawed alone
    /// (V1, V2 snapshots) they are empty, as they were.
    #[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub struct Balances {
        pub period: Period,
        pub meters: BTreeMap<String, MeterUsage>,
        pub grants: BTreeMap<u64, Grant>,
        pub holds: BTreeMap<u64, Hold>,
        pub alerts: Vec<FiredAlert>,
    }

    impl Freeze<l::Balances> for Balances {
        fn freeze(d: &l::Balances) -> Self {
            Self {
                period: Freeze::freeze(&d.period),
                meters: Freeze::freeze(&d.meters),
                grants: Freeze::freeze(&d.grants),
                holds: Freeze::freeze(&d.holds),
                alerts: Freeze::freeze(&d.alerts),
            }
        }
        fn thaw(self) -> l::Balances {
            l::Balances {
                period: self.period.thaw(),
                meters: self.meters.thaw(),
                grants: self.grants.thaw(),
                holds: self.holds.thaw(),
                alerts: self.alerts.thaw(),
                credit_debt: 0,
                clawbacks: BTreeMap::new(),
                disputes: std::collections::BTreeSet::new(),
                disputes_closed: std::collections::BTreeSet::new(),
            }
        }
    }

    /// What `Balances` gained with issue 12 (snapshot V3).
    #[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub struct BalancesExtra {
        pub credit_debt: u64,
        pub clawbacks: BTreeMap<String, u64>,
        pub disputes: Vec<String>,
        pub disputes_closed: Vec<String>,
    }

    impl BalancesExtra {
        pub fn of(b: &l::Balances) -> Self {
            Self {
                credit_debt: b.credit_debt,
                clawbacks: b.clawbacks.clone(),
                disputes: b.disputes.iter().cloned().collect(),
                disputes_closed: b.disputes_closed.iter().cloned().collect(),
            }
        }

        pub fn restore(self, b: &mut l::Balances) {
            b.credit_debt = self.credit_debt;
            b.clawbacks = self.clawbacks;
            b.disputes = self.disputes.into_iter().collect();
            b.disputes_closed = self.disputes_closed.into_iter().collect();
        }
    }

    frozen_struct!(PaymentMethodState => b::PaymentMethodState {
        id: String,
        attached: bool,
        at_s: i64,
    });

    frozen_struct!(BillingState => b::BillingState {
        subscription: Option<SubscriptionInfo>,
        subscription_version: (i64, u8),
        ended_subscriptions: Vec<String>,
        customer_version: i64,
        delinquent: bool,
        default_payment_method: Option<String>,
        payment_methods: Vec<PaymentMethodState>,
        features: Vec<String>,
        features_version: i64,
        payment_version: i64,
        invoices: Vec<InvoiceSummary>,
        upcoming: Option<InvoiceSummary>,
        transactions: Vec<Transaction>,
        meter_errors: u64,
        events_applied: u64,
    });

    /// A snapshot of release 6 (no billing state yet).
    #[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
    pub struct SnapshotV1 {
        pub profile: AccountProfile,
        pub balances: Balances,
        pub last_seq: u64,
    }

    frozen_struct!(AccountSnapshot => crate::store::AccountSnapshot {
        profile: AccountProfile,
        balances: Balances,
        billing: BillingState,
        last_seq: u64,
    });

    frozen_struct!(OutboxItem => crate::store::OutboxItem {
        meter: String,
        value: u64,
        at_ms: i64,
        attempts: u32,
        next_at_ms: i64,
        last_error: Option<String>,
    });

    frozen_struct!(OutboxBatch => crate::store::OutboxBatch {
        last_seq: u64,
        members: u32,
        window_ms: i64,
    });

    frozen_unit_enum!(EventSource => ev::EventSource { Webhook, Backfill });

    frozen_unit_enum!(WebhookStatus => ev::WebhookStatus { Pending, Applied, Ignored, Failed });

    frozen_struct!(WebhookRecord => ev::WebhookRecord {
        id: String,
        event_type: String,
        created_s: i64,
        received_ms: i64,
        source: EventSource,
        thin: bool,
        status: WebhookStatus,
        attempts: u32,
        next_at_ms: i64,
        last_error: Option<String>,
        outcome: Option<String>,
        settled_ms: Option<i64>,
    });

    frozen_struct!(MeterErrorRecord => ev::MeterErrorRecord {
        code: String,
        identifier: String,
        event_id: String,
        reported_ms: i64,
    });

    frozen_struct!(PendingTopUp => ev::PendingTopUp {
        account: String,
        package: String,
        amount: u64,
        currency: String,
        customer: String,
        created_ms: i64,
    });

    frozen_struct!(TopUpPayment => ev::TopUpPayment {
        account: String,
        session_id: String,
        package: String,
        credits: u64,
        amount: u64,
        currency: String,
    });

    frozen_unit_enum!(ReconStatus => rc::ReconStatus {
        Unchecked,
        Ok,
        Drift,
        Repaired,
        Unrepairable,
    });

    frozen_struct!(ReconWindow => rc::ReconWindow {
        window_s: u32,
        local: u64,
        first_seq: u64,
        last_seq: u64,
        stripe: Option<u64>,
        status: ReconStatus,
        action: String,
        checked_ms: Option<i64>,
        checks: u32,
        repair: Option<String>,
        alert: bool,
    });

    frozen_unit_enum!(RepairKind => rc::RepairKind { Resend });

    frozen_unit_enum!(RepairState => rc::RepairState {
        Pending,
        Sent,
        Failed,
        Cancelling,
        Cancelled,
    });

    frozen_struct!(Repair => rc::Repair {
        account: String,
        meter: String,
        window_start_ms: i64,
        kind: RepairKind,
        event_name: String,
        customer: String,
        value: u64,
        timestamp_s: i64,
        state: RepairState,
        created_ms: i64,
        sent_ms: Option<i64>,
        last_error: Option<String>,
    });

    frozen_struct!(ReconRun => rc::ReconRun {
        id: u64,
        trigger: String,
        started_ms: i64,
        upto_ms: i64,
        after: Option<String>,
        finished_ms: Option<i64>,
        accounts: u64,
        windows: u64,
        ok: u64,
        drift: u64,
        repaired: u64,
        unrepairable: u64,
        reads: u64,
        alerts: u64,
        state_checked: u64,
        state_reread: u64,
    });
}
