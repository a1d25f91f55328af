//! The commands an account actor takes and the replies it gives (built by [`super::Accounts`]).

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeCmd {
    pub meter: String,
    pub quantity: u64,
    pub idempotency_key: IdempotencyKey,
    pub metadata: Metadata,
}

impl ConsumeCmd {
    /// SHA-256 over a canonical, length-prefixed encoding of what makes two requests "the
    /// same": meter, quantity and metadata.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"consume/v1");
        put_str(&mut h, &self.meter);
        h.update(self.quantity.to_be_bytes());
        h.update((self.metadata.len() as u64).to_be_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut h, k);
            put_str(&mut h, v);
        }
        h.finalize().into()
    }
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// The answer to a consume or a check: the ledger entry it produced (or would produce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeReply {
    /// `None` for a check (nothing was written).
    pub seq: Option<u64>,
    pub record: ConsumeRecord,
    /// True when this answers a replayed idempotency key.
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpsertCmd {
    pub plan: Option<String>,
    pub seats: Option<u32>,
    pub email: Option<String>,
    pub stripe_customer_id: Option<String>,
    /// Link this Stripe customer only if the account has none yet (decided in the actor, so
    /// a customer set meanwhile by someone else is never overwritten).
    pub link_customer_if_unset: Option<String>,
    pub metadata: Option<Metadata>,
    pub status: Option<SubscriptionStatus>,
    /// Replaces all overrides; only for a `custom` plan.
    pub overrides: Option<BTreeMap<String, MeterOverride>>,
    /// The account's spend cap; an amount of 0 means no cap (not even the plan's).
    pub spend_cap: Option<SpendCap>,
    /// Set the current billing period.
    pub period: Option<Period>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertReply {
    pub created: bool,
    pub view: AccountView,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditCmd {
    pub amount: i64,
    pub reason: String,
    pub idempotency_key: IdempotencyKey,
    /// Terms of a grant (positive amounts only).
    pub grant: GrantInput,
}

/// Optional terms of a grant; defaults: priority 50, effective now, no expiry, promotional.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrantInput {
    pub priority: Option<u32>,
    pub effective_at_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
    pub category: Option<CreditCategory>,
    pub external_id: Option<String>,
}

impl CreditCmd {
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"credit/v2");
        h.update(self.amount.to_be_bytes());
        put_str(&mut h, &self.reason);
        let g = &self.grant;
        h.update(format!(
            "{:?}",
            (g.priority, g.effective_at_ms, g.expires_at_ms, g.category)
        ));
        put_str(&mut h, g.external_id.as_deref().unwrap_or(""));
        h.finalize().into()
    }
}

/// Credit a configured top-up package once per `external_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpCmd {
    pub package: String,
    /// The payment behind it (for example the Checkout Session id): the idempotency key.
    pub external_id: IdempotencyKey,
}

impl TopUpCmd {
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"topup/v1");
        put_str(&mut h, &self.package);
        h.finalize().into()
    }
}

/// Which idempotency index an entry belongs to, and under which key.
pub(crate) fn idem_of(kind: &EntryKind) -> Option<(IdemOp, String)> {
    match kind {
        EntryKind::Consume(c) => Some((IdemOp::Consume, c.idempotency_key.clone())),
        EntryKind::Credit(c) if c.grant.as_ref().is_some_and(|g| g.package.is_some()) => {
            Some((IdemOp::Topup, c.idempotency_key.clone()))
        }
        EntryKind::Credit(c) => Some((IdemOp::Credit, c.idempotency_key.clone())),
        EntryKind::Reserved(h) => Some((IdemOp::Reserve, h.idempotency_key.clone())),
        EntryKind::Settled(r) => Some((IdemOp::Settle, r.rid.to_string())),
        EntryKind::Stripe(r) => Some((IdemOp::Stripe, r.event_id.clone())),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveCmd {
    pub meter: String,
    pub quantity: u64,
    pub ttl_ms: i64,
    pub idempotency_key: IdempotencyKey,
}

impl ReserveCmd {
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"reserve/v1");
        put_str(&mut h, &self.meter);
        h.update(self.quantity.to_be_bytes());
        h.update(self.ttl_ms.to_be_bytes());
        h.finalize().into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveReply {
    /// The reservation id: the seq of its entry.
    pub seq: u64,
    pub record: HoldRecord,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleReply {
    pub seq: u64,
    pub record: SettleRecord,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditReply {
    pub seq: u64,
    pub record: CreditRecord,
    pub replayed: bool,
}

/// One meter as an account sees it in its current period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterView {
    pub meter: String,
    pub used: u64,
    /// Held by open reservations.
    pub reserved: u64,
    pub included: u64,
    pub billable: u64,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub overage: &'static str,
}

/// What `GET /v1/accounts/{id}` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    pub id: AccountId,
    pub profile: AccountProfile,
    pub plan_kind: &'static str,
    pub features: Vec<String>,
    pub period: Period,
    pub meters: Vec<MeterView>,
    pub credits: u64,
    /// Credits owed back and not covered yet (refunded or lost-dispute top-ups).
    pub credit_debt: u64,
    /// Open disputes that suspend credit use.
    pub open_disputes: Vec<String>,
    pub last_seq: u64,
    /// Access under the subscription status, as of the view.
    pub access: Access,
    /// Whether each meter can take at least one more unit, and why.
    pub meter_entitlements: BTreeMap<String, Entitlement>,
    /// The plan, for feature entitlements.
    pub plan: Plan,
    /// The period's cost so far (`Err`: the plan's prices cannot price the usage).
    pub cost: Result<PeriodCost, String>,
    /// The usage part of the cost projected linearly to the end of the period.
    pub projected_usage: u64,
    /// A flat plan that would have been cheaper this period (pay-as-you-go only).
    pub suggested_plan: Option<String>,
    /// Alerts fired in the current period.
    pub alerts: Vec<crate::ledger::FiredAlert>,
    /// Credit grants by id, and the time the view was taken (for `live_at`).
    pub grants: BTreeMap<u64, crate::ledger::Grant>,
    pub as_of_ms: i64,
    /// What Stripe said about the account (subscription, invoices, transactions).
    pub billing: crate::billing::BillingState,
}

impl AccountView {
    /// Why credits cannot be spent now, if they cannot: `credit_debt` or `dispute_open`.
    pub fn credits_blocked(&self) -> Option<&'static str> {
        if self.credit_debt > 0 {
            Some("credit_debt")
        } else if !self.open_disputes.is_empty() {
            Some("dispute_open")
        } else {
            None
        }
    }

    /// May the account use `feature`? (`hasFeatureAccess`.)
    pub fn feature(&self, feature: &str) -> Entitlement {
        feature_entitlement(&self.plan, self.profile.status, self.access, feature)
    }
}
