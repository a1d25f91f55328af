//! The account actor: the only writer of one account's state.
//!
//! One [`AccountActor`] per live account serializes every change to that account: consumes,
//! credit grants, profile updates and period rollovers. Its state is the fold of the account's
//! ledger ([`AccountFold`]); there is no lock around it anywhere, because no one else holds it.
//!
//! Write path of a consume: decide (pure, [`decide_consume`]), append one self-contained ledger
//! entry, update the derived idempotency index, then hand the reply to the store's group
//! commit ([`Store::commit`]). The reply is sent by the flusher thread once the entry is on
//! disk, while this actor already decides the next request. This module must never wait for a
//! flush itself, and never reply to a state-revealing request before a flush.

pub mod directory;
mod stripe;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sha2::{Digest, Sha256};

use crate::ledger::{
    AccountFold, AccountProfile, Balances, ConsumeDecision, ConsumeRecord, CreditCategory,
    CreditRecord, EntryKind, FoldError, GrantTerms, HoldRecord, LedgerEntry, SettleRecord,
    decide_commit, decide_consume, decide_release, meter_limit,
};
use crate::model::{
    AccountId, Catalog, Clock, IdempotencyKey, Metadata, Period, Plan, PlanKind, ValidationError,
    validate_metadata,
};
use crate::model::{DenyCode, Outcome};
use crate::model::{MeterOverride, SubscriptionStatus};
use crate::model::{SpendCap, SpendCapAction};
use crate::plan::{
    Access, Entitlement, access, alerts_for, current_cost, effective_rule, effective_rules,
    effective_spend_cap, feature_entitlement, meter_entitlement, suggested_plan, usage_cost_with,
};
use crate::pricing::{PeriodCost, projected};
use crate::store::{AccountSnapshot, CommitError, IdemOp, IdemRecord, Store, StoreError};

pub use directory::{Accounts, DirectoryActor, DirectoryMsg, DirectoryStats};
pub use stripe::{StripeCmd, StripeReply};

/// Messages an account actor understands. Callers never build these: they use [`Accounts`].
pub enum AccountMsg {
    /// Consume units of a meter (durable, idempotent).
    Consume(ConsumeCmd, RpcReplyPort<Result<ConsumeReply, AccountError>>),
    /// The same decision as `Consume`, as a dry run that changes nothing.
    Check(ConsumeCmd, RpcReplyPort<Result<ConsumeReply, AccountError>>),
    /// Create the account or change its profile.
    Upsert(
        Box<UpsertCmd>,
        RpcReplyPort<Result<UpsertReply, AccountError>>,
    ),
    /// Grant or adjust credits (durable, idempotent).
    Credit(CreditCmd, RpcReplyPort<Result<CreditReply, AccountError>>),
    /// Credit a top-up package (durable, idempotent on its external id).
    TopUp(TopUpCmd, RpcReplyPort<Result<CreditReply, AccountError>>),
    /// Hold capacity for work whose size is known only at the end (durable, idempotent).
    Reserve(ReserveCmd, RpcReplyPort<Result<ReserveReply, AccountError>>),
    /// Commit (`Some(quantity)`) or release (`None`) reservation `rid` (idempotent).
    Settle(
        u64,
        Option<u64>,
        RpcReplyPort<Result<SettleReply, AccountError>>,
    ),
    /// Apply a Stripe event (durable, idempotent on the event id).
    Stripe(
        Box<StripeCmd>,
        RpcReplyPort<Result<StripeReply, AccountError>>,
    ),
    /// The account's current state.
    Get(RpcReplyPort<Result<AccountView, AccountError>>),
    /// Periodic: report to the directory when idle for longer than the idle timeout.
    IdleTick,
    /// Test only: fail the actor as a bug or storage fault would.
    #[doc(hidden)]
    Crash,
}

impl AccountMsg {
    /// Answers the message's caller with `err` without handling it (used by the directory
    /// when no actor can take the message).
    pub(crate) fn fail(self, err: AccountError) {
        match self {
            AccountMsg::Consume(_, r) | AccountMsg::Check(_, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Upsert(_, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Credit(_, r) | AccountMsg::TopUp(_, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Reserve(_, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Settle(_, _, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Get(r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Stripe(_, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::IdleTick | AccountMsg::Crash => {}
        }
    }
}

/// Expected refusals, answered inside the reply (the actor stays healthy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("account `{0}` does not exist")]
    UnknownAccount(AccountId),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("idempotency key was already used with a different request (ledger entry {seq})")]
    IdempotencyConflict { seq: u64 },
    #[error("credit balance is {balance}; an adjustment of {amount} would make it negative")]
    CreditBalanceTooLow { balance: u64, amount: i64 },
    #[error("reservation {rid} does not exist")]
    UnknownReservation { rid: u64 },
    #[error("reservation {rid} was already {how}")]
    ReservationSettled { rid: u64, how: &'static str },
    #[error("the commit exceeds the reservation and the account cannot cover the excess ({code})")]
    CommitDenied { code: &'static str },
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("the account service is unavailable: {0}")]
    Unavailable(String),
    #[error("the account did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<StoreError> for AccountError {
    fn from(e: StoreError) -> Self {
        AccountError::Storage(e.to_string())
    }
}

impl From<CommitError> for AccountError {
    fn from(e: CommitError) -> Self {
        AccountError::Storage(e.to_string())
    }
}

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
    /// May the account use `feature`? (`hasFeatureAccess`.)
    pub fn feature(&self, feature: &str) -> Entitlement {
        feature_entitlement(&self.plan, self.profile.status, self.access, feature)
    }
}

/// Tunables every account actor shares.
#[derive(Debug, Clone)]
pub struct AccountSettings {
    /// Stop an actor that handled nothing for this long.
    pub idle_timeout: Duration,
    /// Write a snapshot after this many new ledger entries.
    pub snapshot_every: u64,
    /// Timeout of every call into an actor.
    pub call_timeout: Duration,
    /// At most this many live account actors; the least recently used is stopped beyond it.
    pub max_live: usize,
    /// How long a `past_due` subscription keeps access.
    pub past_due_grace: Duration,
}

/// Everything an account actor needs, shared by all of them.
#[derive(Clone)]
pub struct AccountDeps {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    pub clock: Clock,
    pub settings: Arc<AccountSettings>,
}

pub struct AccountActor;

pub struct AccountArgs {
    pub id: AccountId,
    pub deps: AccountDeps,
    pub directory: ActorRef<DirectoryMsg>,
}

pub struct AccountState {
    id: AccountId,
    deps: AccountDeps,
    directory: ActorRef<DirectoryMsg>,
    fold: AccountFold,
    snapshot_seq: u64,
    last_activity: Instant,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for AccountActor {
    type Msg = AccountMsg;
    type State = AccountState;
    type Arguments = AccountArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AccountMsg>,
        args: AccountArgs,
    ) -> Result<AccountState, ActorProcessingErr> {
        let (fold, snapshot_seq) = recover(&args.deps.store, &args.id)?;
        let period = (args.deps.settings.idle_timeout / 2).max(Duration::from_millis(10));
        let ticker = myself.send_interval(period, || AccountMsg::IdleTick);
        Ok(AccountState {
            id: args.id,
            deps: args.deps,
            directory: args.directory,
            fold,
            snapshot_seq,
            last_activity: Instant::now(),
            ticker: Some(ticker),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<AccountMsg>,
        state: &mut AccountState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        if state.fold.last_seq > state.snapshot_seq {
            state.write_snapshot()?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<AccountMsg>,
        msg: AccountMsg,
        state: &mut AccountState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(msg, AccountMsg::IdleTick) {
            state.last_activity = Instant::now();
        }
        match msg {
            AccountMsg::Consume(cmd, reply) => state.consume(cmd, reply)?,
            AccountMsg::Check(cmd, reply) => state.check(cmd, reply),
            AccountMsg::Upsert(cmd, reply) => state.upsert(*cmd, reply)?,
            AccountMsg::Credit(cmd, reply) => state.credit(cmd, reply)?,
            AccountMsg::TopUp(cmd, reply) => state.top_up(cmd, reply)?,
            AccountMsg::Reserve(cmd, reply) => state.reserve(cmd, reply)?,
            AccountMsg::Settle(rid, qty, reply) => state.settle(rid, qty, reply)?,
            AccountMsg::Stripe(cmd, reply) => {
                let r = state.apply_stripe(*cmd)?;
                state.reply_after_commit(reply, r);
            }
            AccountMsg::Get(reply) => {
                let r = state.view();
                state.reply_after_commit(reply, r);
            }
            AccountMsg::IdleTick => {
                if state.last_activity.elapsed() >= state.deps.settings.idle_timeout {
                    let _ = state
                        .directory
                        .cast(DirectoryMsg::Idle(state.id.clone(), myself.get_id()));
                }
            }
            AccountMsg::Crash => return Err("crash requested".into()),
        }
        Ok(())
    }
}

/// Rebuilds an account from its snapshot plus the ledger entries after it, and repairs the
/// derived idempotency index for those entries (it may have been lost in a crash).
fn recover(store: &Store, id: &AccountId) -> Result<(AccountFold, u64), StoreError> {
    let mut fold = AccountFold::default();
    let mut snapshot_seq = 0;
    if let Some(s) = store.get_snapshot(id)? {
        snapshot_seq = s.last_seq;
        fold = AccountFold {
            profile: Some(s.profile),
            balances: Some(s.balances),
            billing: s.billing,
            last_seq: s.last_seq,
        };
    }
    loop {
        let batch = store.entries_after(id, fold.last_seq, 1024)?;
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            fold.apply(e).map_err(|err| corrupt(id, err))?;
            let alerts = match &e.kind {
                EntryKind::Consume(c) => c.alerts.as_slice(),
                EntryKind::Settled(r) => r.alerts.as_slice(),
                EntryKind::Stripe(r) => r.alerts.as_slice(),
                _ => &[],
            };
            for (i, a) in alerts.iter().enumerate() {
                let idx = u32::try_from(i).unwrap_or(u32::MAX);
                store.queue_alert(id, e.seq, idx, e.at_ms, a)?;
            }
            queue_billable(store, id, e, false)?;
            if let Some((op, key)) = idem_of(&e.kind) {
                let rec = IdemRecord {
                    seq: e.seq,
                    at_ms: e.at_ms,
                };
                store.put_idem(id, op, &key, rec)?;
            }
        }
    }
    // The customer index is written before the entry that links a customer; a crash in
    // between, or data from before the index existed, is repaired here.
    if let Some(c) = fold
        .profile
        .as_ref()
        .and_then(|p| p.stripe_customer_id.as_ref())
        && store.customer_account(c)?.as_ref() != Some(id)
    {
        store.link_customer(c, id)?;
    }
    Ok((fold, snapshot_seq))
}

/// The entries that start a period's monthly credits, given the balances just after the
/// period began: a trim of carried-over monthly credits above the rollover cap, then the
/// grant. Pure, so reads can show what the next write will record.
fn monthly_entries(plan: &Plan, b: &Balances, now: i64) -> Vec<EntryKind> {
    let mut out = Vec::new();
    if plan.monthly_credits == 0 {
        return out;
    }
    let Ok(amount) = i64::try_from(plan.monthly_credits) else {
        return out;
    };
    let period = b.period;
    let mut credits = b.live_credits(now);
    if let Some(cap) = plan.monthly_credits_rollover_cap {
        let mut monthly: Vec<(u64, u64)> = b
            .grants
            .iter()
            .filter(|(_, g)| {
                g.live_at(now)
                    && g.terms
                        .external_id
                        .as_deref()
                        .is_some_and(|x| x.starts_with("monthly credits "))
            })
            .map(|(id, g)| (*id, g.remaining))
            .collect();
        let left: u64 = monthly.iter().map(|(_, r)| r).sum();
        let total = left.saturating_sub(cap);
        if total > 0 {
            monthly.sort_by_key(|(id, _)| *id);
            let mut excess = total;
            let mut burns = Vec::new();
            for (id, r) in monthly {
                let take = r.min(excess);
                if take > 0 {
                    burns.push((id, take));
                    excess -= take;
                }
            }
            credits = credits.saturating_sub(total);
            out.push(EntryKind::Credit(CreditRecord {
                amount: -i64::try_from(total).unwrap_or(i64::MAX),
                reason: format!("monthly credits above the rollover cap of {cap}"),
                idempotency_key: format!("monthly trim {}", period.start_ms),
                digest: [0; 32],
                grant: None,
                burns,
                credits_after: credits,
            }));
        }
    }
    // Keys with spaces: no client key can collide with them.
    let key = format!("monthly credits {}", period.start_ms);
    out.push(EntryKind::Credit(CreditRecord {
        amount,
        reason: format!("monthly credits of plan {}", plan.name),
        idempotency_key: key.clone(),
        digest: [0; 32],
        grant: Some(GrantTerms {
            priority: 10,
            effective_at_ms: now,
            expires_at_ms: match plan.monthly_credits_rollover_cap {
                None => Some(period.end_ms),
                Some(_) => None,
            },
            category: CreditCategory::Promotional,
            external_id: Some(key),
            package: None,
        }),
        burns: Vec::new(),
        credits_after: credits.saturating_add(plan.monthly_credits),
    }));
    out
}

/// Queues a billable entry (the `bill` overage of a consume or a commit) for Stripe. Derived
/// from the entry alone, so recovery can queue again what a crash lost; the store skips what
/// was already sent or dead-lettered.
fn queue_billable(
    store: &Store,
    id: &AccountId,
    e: &LedgerEntry,
    fresh: bool,
) -> Result<(), StoreError> {
    let (meter, value) = match &e.kind {
        EntryKind::Consume(c) if c.outcome == Outcome::Allowed && c.billable > 0 => {
            (&c.meter, c.billable)
        }
        EntryKind::Settled(r) if r.billable > 0 => (&r.meter, r.billable),
        _ => return Ok(()),
    };
    store.queue_outbox(
        id,
        e.seq,
        &crate::store::OutboxItem {
            meter: meter.clone(),
            value,
            at_ms: e.at_ms,
            attempts: 0,
            next_at_ms: e.at_ms,
            last_error: None,
        },
        fresh,
    )
}

/// The ledger record of a consume decision (a check builds the same, unwritten).
fn consume_record(
    cmd: ConsumeCmd,
    digest: [u8; 32],
    d: ConsumeDecision,
    alerts: Vec<crate::model::Alert>,
) -> ConsumeRecord {
    ConsumeRecord {
        meter: cmd.meter,
        quantity: cmd.quantity,
        idempotency_key: cmd.idempotency_key.as_str().to_owned(),
        digest,
        metadata: cmd.metadata.into_iter().collect(),
        outcome: d.outcome,
        billable: d.billable,
        credits_spent: d.credits_spent,
        burns: d.burns,
        included: d.included,
        limit: d.limit,
        used_after: d.used_after,
        billable_after: d.billable_after,
        credits_after: d.credits_after,
        alerts,
    }
}

fn corrupt(id: &AccountId, err: FoldError) -> StoreError {
    StoreError::Corrupt {
        tree: "ledger",
        detail: format!("account {id}: {err}"),
    }
}

impl AccountState {
    fn catalog_plan(&self, profile: &AccountProfile) -> Result<&Plan, AccountError> {
        self.deps.catalog.plans.get(&profile.plan).ok_or_else(|| {
            AccountError::Storage(format!(
                "account {} is on plan `{}`, which is no longer configured",
                self.id, profile.plan
            ))
        })
    }

    /// The priced usage spend if `meter` reached `units`, with the spend cap in force, for a
    /// billed meter under a cap; `None` otherwise.
    fn spend_with(
        &self,
        plan: &Plan,
        profile: &AccountProfile,
        rule: &crate::model::MeterRule,
        balances: &Balances,
        meter: &str,
        units: u64,
    ) -> Option<(u64, SpendCap)> {
        let cap = effective_spend_cap(plan, profile)?;
        rule.price.as_ref()?;
        match usage_cost_with(plan, profile, balances, meter, units) {
            Ok(spent) => Some((spent, cap)),
            Err(e) => {
                tracing::warn!(account = %self.id, error = %e, "cannot price usage for the spend cap");
                None
            }
        }
    }

    /// Would `units` of `meter` pass a blocking spend cap?
    fn over_blocking_cap(
        &self,
        profile: &AccountProfile,
        balances: &Balances,
        meter: &str,
        units: u64,
    ) -> bool {
        let Some(plan) = self.deps.catalog.plans.get(&profile.plan) else {
            return false;
        };
        let Some(rule) = effective_rule(plan, profile, meter) else {
            return false;
        };
        matches!(
            self.spend_with(plan, profile, &rule, balances, meter, units),
            Some((spent, cap)) if cap.action == SpendCapAction::Block && spent > cap.amount
        )
    }

    fn access_at(&self, profile: &AccountProfile, now: i64) -> Access {
        let grace =
            i64::try_from(self.deps.settings.past_due_grace.as_millis()).unwrap_or(i64::MAX);
        access(profile.status, profile.status_since_ms, now, grace)
    }

    /// Sends `r` once everything this actor wrote so far is durable.
    fn reply_after_commit<T: Send + 'static>(
        &self,
        reply: RpcReplyPort<Result<T, AccountError>>,
        r: Result<T, AccountError>,
    ) {
        self.deps.store.commit(move |c| {
            let out = match c {
                Ok(()) => r,
                Err(e) => Err(e.into()),
            };
            let _ = reply.send(out);
        });
    }

    fn append(&mut self, kind: EntryKind, at_ms: i64) -> Result<LedgerEntry, StoreError> {
        // Index a newly linked Stripe customer before the entry (webhooks find accounts by it).
        if let EntryKind::AccountUpserted(p) = &kind
            && let Some(c) = &p.stripe_customer_id
            && self
                .fold
                .profile
                .as_ref()
                .and_then(|x| x.stripe_customer_id.as_ref())
                != Some(c)
        {
            self.deps.store.link_customer(c, &self.id)?;
        }
        let entry = LedgerEntry {
            seq: self.fold.last_seq + 1,
            at_ms,
            kind,
        };
        // Fold first: an entry that does not follow is a bug and must never reach disk. On
        // any error the handler fails the actor, which discards this in-memory state and
        // restarts from the store, so no rollback is needed here.
        self.fold.apply(&entry).map_err(|e| corrupt(&self.id, e))?;
        self.deps.store.append_entry(&self.id, &entry)?;
        Ok(entry)
    }

    fn after_write(&mut self) -> Result<(), StoreError> {
        if self.fold.last_seq - self.snapshot_seq >= self.deps.settings.snapshot_every {
            self.write_snapshot()?;
        }
        Ok(())
    }

    fn write_snapshot(&mut self) -> Result<(), StoreError> {
        if let (Some(profile), Some(balances)) = (&self.fold.profile, &self.fold.balances) {
            self.deps.store.put_snapshot(
                &self.id,
                &AccountSnapshot {
                    profile: profile.clone(),
                    balances: balances.clone(),
                    billing: self.fold.billing.clone(),
                    last_seq: self.fold.last_seq,
                },
            )?;
            self.snapshot_seq = self.fold.last_seq;
        }
        Ok(())
    }

    /// Writes the period rollover entry if `now` is past the current period. Lazy: only an
    /// account that is used again rolls over.
    fn roll_period(&mut self, now: i64) -> Result<(), StoreError> {
        let Some(b) = &self.fold.balances else {
            return Ok(());
        };
        if now >= b.period.end_ms {
            let from = b.period;
            let to = from.next_containing(now);
            self.append(EntryKind::PeriodRolled { from, to }, now)?;
            self.grant_monthly(now)?;
        }
        Ok(())
    }

    /// At the start of a period: cap the carried-over monthly credits, then grant the plan's
    /// monthly credits (expiring at the period's end unless they may roll over).
    fn grant_monthly(&mut self, now: i64) -> Result<(), StoreError> {
        let (Some(profile), Some(b)) = (&self.fold.profile, &self.fold.balances) else {
            return Ok(());
        };
        let Some(plan) = self.deps.catalog.plans.get(&profile.plan) else {
            return Ok(());
        };
        for kind in monthly_entries(plan, b, now) {
            self.append(kind, now)?;
        }
        Ok(())
    }

    /// Sets the current period as an admin (or, later, Stripe) says: a later start begins a
    /// new period (counters reset, monthly credits granted); the same start only moves the end.
    fn set_period(&mut self, p: Period, now: i64) -> Result<Result<(), AccountError>, StoreError> {
        let Some(b) = &self.fold.balances else {
            return Ok(Ok(()));
        };
        let cur = b.period;
        if p.end_ms <= p.start_ms || !p.contains(now) {
            return Ok(Err(ValidationError::new(
                "period: start must be before end, and the period must contain the current time",
            )
            .into()));
        }
        if p == cur {
            return Ok(Ok(()));
        }
        if p.start_ms == cur.start_ms {
            self.append(EntryKind::PeriodAdjusted { from: cur, to: p }, now)?;
        } else if p.start_ms > cur.start_ms {
            self.append(EntryKind::PeriodRolled { from: cur, to: p }, now)?;
            self.grant_monthly(now)?;
        } else {
            return Ok(Err(ValidationError::new(
                "period: a period cannot start before the current one",
            )
            .into()));
        }
        Ok(Ok(()))
    }

    /// Writes a `CreditExpired` entry for every grant whose expiry is due at `now`. Lazy, like
    /// period rollover: only an account that is used again writes them.
    fn expire_grants(&mut self, now: i64) -> Result<(), StoreError> {
        let due = match &self.fold.balances {
            Some(b) => b.due_expiries(now),
            None => return Ok(()),
        };
        for (grant_id, amount) in due {
            let credits_after = self
                .fold
                .balances
                .as_ref()
                .map(|b| {
                    let mut after = b.clone();
                    if let Some(g) = after.grants.get_mut(&grant_id) {
                        g.remaining = 0;
                    }
                    after.live_credits(now)
                })
                .unwrap_or(0);
            self.append(
                EntryKind::CreditExpired {
                    grant_id,
                    amount,
                    credits_after,
                },
                now,
            )?;
        }
        Ok(())
    }

    /// The balances as of `now` without writing anything: a due rollover is applied in memory.
    fn balances_at(&self, now: i64) -> Option<Balances> {
        let b = self.fold.balances.as_ref()?;
        let mut out = b.clone();
        let mut seq = self.fold.last_seq;
        // Apply in memory what the next write will record: expired holds, the rollover and
        // the new period's monthly credits.
        let mut apply = |out: &mut Balances, kind: EntryKind| {
            seq += 1;
            out.apply(&LedgerEntry {
                seq,
                at_ms: now,
                kind,
            })
        };
        for rid in b.due_holds(now) {
            if let Some(r) = decide_release(&out, rid, true, now)
                && apply(&mut out, EntryKind::Settled(r)).is_err()
            {
                return Some(b.clone());
            }
        }
        if now >= out.period.end_ms {
            let from = out.period;
            let to = from.next_containing(now);
            if apply(&mut out, EntryKind::PeriodRolled { from, to }).is_err() {
                return Some(b.clone());
            }
            let plan = self
                .fold
                .profile
                .as_ref()
                .and_then(|p| self.deps.catalog.plans.get(&p.plan));
            if let Some(plan) = plan {
                for kind in monthly_entries(plan, &out, now) {
                    if apply(&mut out, kind).is_err() {
                        return Some(b.clone());
                    }
                }
            }
        }
        Some(out)
    }

    /// Writes a `Settled { expired }` entry for every reservation whose expiry is due.
    fn expire_holds(&mut self, now: i64) -> Result<(), StoreError> {
        let due = match &self.fold.balances {
            Some(b) => b.due_holds(now),
            None => return Ok(()),
        };
        for rid in due {
            let Some(r) = self
                .fold
                .balances
                .as_ref()
                .and_then(|b| decide_release(b, rid, true, now))
            else {
                continue;
            };
            let entry = self.append(EntryKind::Settled(r), now)?;
            self.deps.store.put_idem(
                &self.id,
                IdemOp::Settle,
                &rid.to_string(),
                IdemRecord {
                    seq: entry.seq,
                    at_ms: now,
                },
            )?;
        }
        Ok(())
    }

    /// Everything lazy that is due at `now`: rollover, grant expiry, hold expiry.
    fn catch_up(&mut self, now: i64) -> Result<(), StoreError> {
        self.roll_period(now)?;
        self.expire_grants(now)?;
        self.expire_holds(now)
    }

    fn validate_consume(&self, cmd: &ConsumeCmd) -> Result<&AccountProfile, AccountError> {
        if !self.deps.catalog.meters.contains_key(&cmd.meter) {
            return Err(ValidationError::new(format!("unknown meter `{}`", cmd.meter)).into());
        }
        if cmd.quantity == 0 || cmd.quantity > crate::model::MAX_QUANTITY {
            return Err(ValidationError::new(format!(
                "quantity must be an integer from 1 to {}",
                crate::model::MAX_QUANTITY
            ))
            .into());
        }
        validate_metadata(&cmd.metadata)?;
        self.fold
            .profile
            .as_ref()
            .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))
    }

    /// Looks up an idempotency key. `Ok(Some(entry))` is a replay of that entry.
    /// Queues the alerts entry `seq` raised for outgoing notification.
    fn queue_alerts(
        &self,
        seq: u64,
        now: i64,
        alerts: &[crate::model::Alert],
    ) -> Result<(), StoreError> {
        for (i, a) in alerts.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            self.deps.store.queue_alert(&self.id, seq, idx, now, a)?;
            tracing::info!(account = %self.id, kind = a.kind.as_str(), meter = %a.meter, threshold = a.threshold, "alert");
        }
        Ok(())
    }

    /// The answer to a repeated grant, adjustment or top-up: the first reply, or a conflict
    /// if the key came with a different request. `None`: the key is new.
    fn credit_replay(
        &self,
        op: IdemOp,
        key: &str,
        digest: [u8; 32],
    ) -> Result<Option<Result<CreditReply, AccountError>>, StoreError> {
        Ok(self.find_replay(op, key)?.map(|prev| match prev.kind {
            EntryKind::Credit(rec) if rec.digest == digest => Ok(CreditReply {
                seq: prev.seq,
                record: rec,
                replayed: true,
            }),
            _ => Err(AccountError::IdempotencyConflict { seq: prev.seq }),
        }))
    }

    /// Appends an entry that answers idempotency key `key` of `op`, indexes the key, and
    /// snapshots when due: the write path of every keyed operation but consume (which claims
    /// its key before deciding).
    fn record_keyed(
        &mut self,
        kind: EntryKind,
        now: i64,
        op: IdemOp,
        key: &str,
    ) -> Result<LedgerEntry, StoreError> {
        let entry = self.append(kind, now)?;
        self.deps.store.put_idem(
            &self.id,
            op,
            key,
            IdemRecord {
                seq: entry.seq,
                at_ms: now,
            },
        )?;
        self.after_write()?;
        Ok(entry)
    }

    fn find_replay(&self, op: IdemOp, key: &str) -> Result<Option<LedgerEntry>, StoreError> {
        match self.deps.store.get_idem(&self.id, op, key)? {
            Some(rec) => self.entry_for_key(rec.seq, op, key),
            None => Ok(None),
        }
    }

    /// The entry an idempotency record points at, if it really is that key's entry. A record
    /// can dangle (it is written just before its entry, and a crash can fall in between): a
    /// dangling record is no replay.
    fn entry_for_key(
        &self,
        seq: u64,
        op: IdemOp,
        key: &str,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        if seq > self.fold.last_seq {
            return Ok(None);
        }
        Ok(self
            .deps
            .store
            .read_entry(&self.id, seq)?
            .filter(|e| idem_of(&e.kind).is_some_and(|(o, k)| o == op && k == key)))
    }

    fn consume(
        &mut self,
        cmd: ConsumeCmd,
        reply: RpcReplyPort<Result<ConsumeReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let plan = match self.validate_consume(&cmd) {
            Ok(p) => p.plan.clone(),
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let digest = cmd.digest();
        let now = self.deps.clock.now_ms();
        // One tree operation for the common case, a new key: claim the key for the entry about
        // to be written. If it was taken, put the old record back and answer as before. The
        // replay check comes before any lazy catch-up, so a replay writes nothing at all.
        let key = cmd.idempotency_key.as_str();
        let claim = IdemRecord {
            seq: self.fold.last_seq + 1,
            at_ms: now,
        };
        if let Some(old) = self
            .deps
            .store
            .swap_idem(&self.id, IdemOp::Consume, key, claim)?
            && let Some(prev) = self.entry_for_key(old.seq, IdemOp::Consume, key)?
        {
            self.deps
                .store
                .put_idem(&self.id, IdemOp::Consume, key, old)?;
            let r = match prev.kind {
                EntryKind::Consume(rec) if rec.digest == digest => Ok(ConsumeReply {
                    seq: Some(prev.seq),
                    record: rec,
                    replayed: true,
                }),
                _ => Err(AccountError::IdempotencyConflict { seq: prev.seq }),
            };
            // The first answer may not be durable yet: a replay waits for the same flush.
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        self.catch_up(now)?;
        let claim = if self.fold.last_seq + 1 == claim.seq {
            claim
        } else {
            // Catch-up wrote entries: move the claim to the consume's real seq.
            let moved = IdemRecord {
                seq: self.fold.last_seq + 1,
                at_ms: now,
            };
            self.deps
                .store
                .put_idem(&self.id, IdemOp::Consume, key, moved)?;
            moved
        };
        let (Some(profile), Some(balances)) = (&self.fold.profile, &self.fold.balances) else {
            return Ok(());
        };
        let rule = self
            .deps
            .catalog
            .plans
            .get(&plan)
            .and_then(|p| effective_rule(p, profile, &cmd.meter));
        let active = self.access_at(profile, now) != Access::Denied;
        let mut d = decide_consume(
            balances,
            &cmd.meter,
            rule.as_ref(),
            cmd.quantity,
            active,
            now,
        );
        let mut alerts = Vec::new();
        if let (Some(rule), Some(plan_def), Outcome::Allowed) =
            (rule.as_ref(), self.deps.catalog.plans.get(&plan), d.outcome)
        {
            // Held units count as spend to come, so holds cannot slip past the cap.
            let reserved = balances.usage(&cmd.meter).reserved;
            let spend = self.spend_with(
                plan_def,
                profile,
                rule,
                balances,
                &cmd.meter,
                d.used_after.saturating_add(reserved),
            );
            if let Some((spent, cap)) = spend
                && cap.action == SpendCapAction::Block
                && spent > cap.amount
            {
                let usage = balances.usage(&cmd.meter);
                d = ConsumeDecision {
                    outcome: Outcome::Denied(DenyCode::SpendCapReached),
                    billable: 0,
                    credits_spent: 0,
                    burns: Vec::new(),
                    used_after: usage.used,
                    billable_after: usage.billable,
                    credits_after: balances.live_credits(now),
                    ..d
                };
            } else {
                alerts = alerts_for(
                    plan_def,
                    rule,
                    balances,
                    &cmd.meter,
                    d.used_after,
                    d.credits_after,
                    spend,
                );
            }
        }
        let record = consume_record(cmd, digest, d, alerts);
        let entry = self.append(EntryKind::Consume(record), now)?;
        if let EntryKind::Consume(rec) = &entry.kind {
            self.queue_alerts(entry.seq, now, &rec.alerts)?;
        }
        queue_billable(&self.deps.store, &self.id, &entry, true)?;
        debug_assert_eq!(entry.seq, claim.seq);
        self.after_write()?;
        let EntryKind::Consume(record) = entry.kind else {
            return Ok(());
        };
        self.reply_after_commit(
            reply,
            Ok(ConsumeReply {
                seq: Some(entry.seq),
                record,
                replayed: false,
            }),
        );
        Ok(())
    }

    fn check(&self, cmd: ConsumeCmd, reply: RpcReplyPort<Result<ConsumeReply, AccountError>>) {
        let r = (|| {
            let profile = self.validate_consume(&cmd)?;
            let plan = self.catalog_plan(profile)?;
            let now = self.deps.clock.now_ms();
            let balances = self
                .balances_at(now)
                .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))?;
            let rule = effective_rule(plan, profile, &cmd.meter);
            let active = self.access_at(profile, now) != Access::Denied;
            let d = decide_consume(
                &balances,
                &cmd.meter,
                rule.as_ref(),
                cmd.quantity,
                active,
                now,
            );
            let digest = cmd.digest();
            Ok(ConsumeReply {
                seq: None,
                record: consume_record(cmd, digest, d, Vec::new()),
                replayed: false,
            })
        })();
        self.reply_after_commit(reply, r);
    }

    fn upsert(
        &mut self,
        cmd: UpsertCmd,
        reply: RpcReplyPort<Result<UpsertReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let now = self.deps.clock.now_ms();
        let created = self.fold.profile.is_none();
        let cmd_period = cmd.period;
        let next = match self.merge_profile(cmd, now) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let period = cmd_period;
        if !created {
            self.catch_up(now)?;
        }
        if self.fold.profile.as_ref() != Some(&next) {
            self.append(EntryKind::AccountUpserted(next), now)?;
            if created {
                self.grant_monthly(now)?;
            }
        }
        if let Some(p) = period
            && let Err(e) = self.set_period(p, now)?
        {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        if created {
            // A new account gets its snapshot at once so later recoveries start from it.
            self.write_snapshot()?;
        } else {
            self.after_write()?;
        }
        let r = self.view().map(|view| UpsertReply { created, view });
        self.reply_after_commit(reply, r);
        Ok(())
    }

    fn merge_profile(&self, cmd: UpsertCmd, now: i64) -> Result<AccountProfile, AccountError> {
        let current = self.fold.profile.as_ref();
        let plan_name = match (&cmd.plan, current) {
            (Some(p), _) => p.clone(),
            (None, Some(c)) => c.plan.clone(),
            (None, None) => {
                return Err(ValidationError::new("`plan` is required to create an account").into());
            }
        };
        let Some(plan) = self.deps.catalog.plans.get(&plan_name) else {
            let known: Vec<&str> = self.deps.catalog.plans.keys().map(String::as_str).collect();
            return Err(ValidationError::new(format!(
                "unknown plan `{plan_name}`; configured plans: {}",
                known.join(", ")
            ))
            .into());
        };
        let seats = cmd
            .seats
            .or(current.map(|c| c.seats))
            .unwrap_or(plan.min_seats.max(1));
        if seats == 0 || seats < plan.min_seats {
            return Err(ValidationError::new(format!(
                "plan `{plan_name}` needs at least {} seat(s); got {seats}",
                plan.min_seats.max(1)
            ))
            .into());
        }
        let metadata = match cmd.metadata {
            Some(m) => {
                validate_metadata(&m)?;
                m.into_iter().collect()
            }
            None => current.map(|c| c.metadata.clone()).unwrap_or_default(),
        };
        let check_len = |name: &str, v: &Option<String>| match v {
            Some(s) if s.len() > 256 => Err(ValidationError::new(format!(
                "`{name}` is longer than 256 bytes"
            ))),
            _ => Ok(()),
        };
        check_len("email", &cmd.email)?;
        check_len("stripe_customer_id", &cmd.stripe_customer_id)?;
        check_len("stripe_customer_id", &cmd.link_customer_if_unset)?;
        let (status, status_since_ms) = match (cmd.status, current) {
            (Some(s), Some(c)) if s == c.status => (s, c.status_since_ms),
            (Some(s), _) => (s, now),
            (None, Some(c)) => (c.status, c.status_since_ms),
            (None, None) => (SubscriptionStatus::Active, now),
        };
        let overrides = match cmd.overrides {
            Some(o) => {
                if plan.kind != PlanKind::Custom && !o.is_empty() {
                    return Err(ValidationError::new(format!(
                        "plan `{plan_name}` is not a custom plan; only custom plans take overrides"
                    ))
                    .into());
                }
                if let Some(m) = o
                    .keys()
                    .find(|m| !self.deps.catalog.meters.contains_key(*m))
                {
                    return Err(
                        ValidationError::new(format!("overrides: unknown meter `{m}`")).into(),
                    );
                }
                o
            }
            None if plan.kind == PlanKind::Custom => {
                current.map(|c| c.overrides.clone()).unwrap_or_default()
            }
            // Leaving a custom plan drops its overrides.
            None => BTreeMap::new(),
        };
        Ok(AccountProfile {
            spend_cap: cmd.spend_cap.or(current.and_then(|c| c.spend_cap)),
            status,
            status_since_ms,
            overrides,
            plan: plan_name,
            seats,
            email: cmd.email.or_else(|| current.and_then(|c| c.email.clone())),
            stripe_customer_id: cmd
                .stripe_customer_id
                .or_else(|| current.and_then(|c| c.stripe_customer_id.clone()))
                .or(cmd.link_customer_if_unset),
            metadata,
            created_at_ms: current.map(|c| c.created_at_ms).unwrap_or(now),
        })
    }

    fn credit(
        &mut self,
        cmd: CreditCmd,
        reply: RpcReplyPort<Result<CreditReply, AccountError>>,
    ) -> Result<(), StoreError> {
        // A retry of an earlier grant answers as before, even once its terms (an expiry in
        // the future, say) would no longer be accepted as new.
        if self.fold.profile.is_some()
            && let Some(r) =
                self.credit_replay(IdemOp::Credit, cmd.idempotency_key.as_str(), cmd.digest())?
        {
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        let now = self.deps.clock.now_ms();
        let checked = (|| {
            if cmd.amount == 0 || cmd.amount == i64::MIN {
                return Err(ValidationError::new("amount must be a non-zero integer"));
            }
            if cmd.reason.len() > 500 {
                return Err(ValidationError::new("reason is longer than 500 bytes"));
            }
            let g = &cmd.grant;
            let has_terms = g.priority.is_some()
                || g.effective_at_ms.is_some()
                || g.expires_at_ms.is_some()
                || g.category.is_some()
                || g.external_id.is_some();
            if cmd.amount < 0 {
                if has_terms {
                    return Err(ValidationError::new(
                        "grant terms (priority, effective_at, expires_at, category, external_id) apply to positive amounts only",
                    ));
                }
                return Ok(None);
            }
            let priority = g.priority.unwrap_or(50);
            if priority > 100 {
                return Err(ValidationError::new("priority must be from 0 to 100"));
            }
            let effective_at_ms = g.effective_at_ms.unwrap_or(now);
            if let Some(e) = g.expires_at_ms
                && (e <= effective_at_ms || e <= now)
            {
                return Err(ValidationError::new(
                    "expires_at must be after effective_at and in the future",
                ));
            }
            if g.external_id
                .as_ref()
                .is_some_and(|x| x.is_empty() || x.len() > 255)
            {
                return Err(ValidationError::new("external_id must be 1 to 255 bytes"));
            }
            Ok(Some(GrantTerms {
                priority,
                effective_at_ms,
                expires_at_ms: g.expires_at_ms,
                category: g.category.unwrap_or(CreditCategory::Promotional),
                external_id: g.external_id.clone(),
                package: None,
            }))
        })();
        let terms = match checked {
            Ok(t) => t,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return Ok(());
            }
        };
        let digest = cmd.digest();
        self.apply_credit(
            IdemOp::Credit,
            cmd.idempotency_key.as_str(),
            digest,
            cmd.amount,
            cmd.reason,
            terms,
            reply,
        )
    }

    fn top_up(
        &mut self,
        cmd: TopUpCmd,
        reply: RpcReplyPort<Result<CreditReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let r = self.write_top_up(cmd)?;
        self.reply_after_commit(reply, r);
        Ok(())
    }

    fn write_top_up(
        &mut self,
        cmd: TopUpCmd,
    ) -> Result<Result<CreditReply, AccountError>, StoreError> {
        let Some(package) = self
            .deps
            .catalog
            .credit_packages
            .iter()
            .find(|p| p.name == cmd.package)
            .cloned()
        else {
            let known: Vec<&str> = self
                .deps
                .catalog
                .credit_packages
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            return Ok(Err(ValidationError::new(format!(
                "unknown package `{}`; configured packages: {}",
                cmd.package,
                known.join(", ")
            ))
            .into()));
        };
        let Ok(amount) = i64::try_from(package.credits) else {
            return Ok(Err(ValidationError::new("package too large").into()));
        };
        let now = self.deps.clock.now_ms();
        let terms = GrantTerms {
            priority: 50,
            effective_at_ms: now,
            expires_at_ms: None,
            category: CreditCategory::Paid,
            external_id: Some(cmd.external_id.as_str().to_owned()),
            package: Some(package.name.clone()),
        };
        let digest = cmd.digest();
        self.write_credit(
            IdemOp::Topup,
            cmd.external_id.as_str(),
            digest,
            amount,
            format!("top-up {}", package.name),
            Some(terms),
        )
    }

    /// The shared write path of grants, adjustments and top-ups: replay or conflict by key,
    /// lazy rollover and expiry, then one `Credit` entry.
    #[allow(clippy::too_many_arguments)]
    fn apply_credit(
        &mut self,
        op: IdemOp,
        key: &str,
        digest: [u8; 32],
        amount: i64,
        reason: String,
        terms: Option<GrantTerms>,
        reply: RpcReplyPort<Result<CreditReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let r = self.write_credit(op, key, digest, amount, reason, terms)?;
        self.reply_after_commit(reply, r);
        Ok(())
    }

    /// [`Self::apply_credit`] without the reply: the answer (a replay, a refusal or the new
    /// entry), to be sent only after a commit.
    fn write_credit(
        &mut self,
        op: IdemOp,
        key: &str,
        digest: [u8; 32],
        amount: i64,
        reason: String,
        terms: Option<GrantTerms>,
    ) -> Result<Result<CreditReply, AccountError>, StoreError> {
        if self.fold.profile.is_none() {
            return Ok(Err(AccountError::UnknownAccount(self.id.clone())));
        }
        if let Some(r) = self.credit_replay(op, key, digest)? {
            return Ok(r);
        }
        let now = self.deps.clock.now_ms();
        self.catch_up(now)?;
        let Some(balances) = &self.fold.balances else {
            return Ok(Err(AccountError::UnknownAccount(self.id.clone())));
        };
        let balance = balances.live_credits(now);
        let (burns, credits_after) = if amount > 0 {
            // A grant that is effective already counts at once.
            let live_now = terms.as_ref().is_some_and(|t| t.effective_at_ms <= now);
            let after = if live_now {
                balance.checked_add(amount.unsigned_abs())
            } else {
                Some(balance)
            };
            let Some(after) = after else {
                return Ok(Err(
                    ValidationError::new("credit balance would overflow").into()
                ));
            };
            (Vec::new(), after)
        } else {
            match balances.burn_plan(now, amount.unsigned_abs()) {
                Some(b) => (b, balance - amount.unsigned_abs()),
                None => {
                    return Ok(Err(AccountError::CreditBalanceTooLow { balance, amount }));
                }
            }
        };
        let record = CreditRecord {
            amount,
            reason,
            idempotency_key: key.to_owned(),
            digest,
            grant: terms,
            burns,
            credits_after,
        };
        let entry = self.record_keyed(EntryKind::Credit(record), now, op, key)?;
        let EntryKind::Credit(record) = entry.kind else {
            return Ok(Err(AccountError::Storage("credit entry expected".into())));
        };
        Ok(Ok(CreditReply {
            seq: entry.seq,
            record,
            replayed: false,
        }))
    }

    fn reserve(
        &mut self,
        cmd: ReserveCmd,
        reply: RpcReplyPort<Result<ReserveReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let as_consume = ConsumeCmd {
            meter: cmd.meter.clone(),
            quantity: cmd.quantity,
            idempotency_key: cmd.idempotency_key.clone(),
            metadata: Metadata::new(),
        };
        let plan = match self.validate_consume(&as_consume) {
            Ok(p) => p.plan.clone(),
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        if !(1_000..=86_400_000).contains(&cmd.ttl_ms) {
            let _ = reply.send(Err(ValidationError::new(
                "ttl_s must be from 1 to 86400 seconds",
            )
            .into()));
            return Ok(());
        }
        let digest = cmd.digest();
        if let Some(prev) = self.find_replay(IdemOp::Reserve, cmd.idempotency_key.as_str())? {
            let r = match prev.kind {
                EntryKind::Reserved(rec) if rec.digest == digest => Ok(ReserveReply {
                    seq: prev.seq,
                    record: rec,
                    replayed: true,
                }),
                _ => Err(AccountError::IdempotencyConflict { seq: prev.seq }),
            };
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        let now = self.deps.clock.now_ms();
        self.catch_up(now)?;
        let (Some(profile), Some(balances)) = (&self.fold.profile, &self.fold.balances) else {
            return Ok(());
        };
        let rule = self
            .deps
            .catalog
            .plans
            .get(&plan)
            .and_then(|p| effective_rule(p, profile, &cmd.meter));
        let active = self.access_at(profile, now) != Access::Denied;
        let mut d = decide_consume(
            balances,
            &cmd.meter,
            rule.as_ref(),
            cmd.quantity,
            active,
            now,
        );
        let usage = balances.usage(&cmd.meter);
        if d.outcome == Outcome::Allowed
            && self.over_blocking_cap(
                profile,
                balances,
                &cmd.meter,
                usage.occupied().saturating_add(cmd.quantity),
            )
        {
            d = ConsumeDecision {
                outcome: Outcome::Denied(DenyCode::SpendCapReached),
                burns: Vec::new(),
                credits_spent: 0,
                credits_after: balances.live_credits(now),
                ..d
            };
        }
        let allowed = d.outcome == Outcome::Allowed;
        let record = HoldRecord {
            meter: cmd.meter,
            quantity: cmd.quantity,
            expires_at_ms: now.saturating_add(cmd.ttl_ms),
            idempotency_key: cmd.idempotency_key.as_str().to_owned(),
            digest,
            outcome: d.outcome,
            burns: d.burns,
            included: d.included,
            limit: d.limit,
            reserved_after: if allowed {
                usage.reserved + cmd.quantity
            } else {
                usage.reserved
            },
            used_after: usage.used,
            credits_after: d.credits_after,
        };
        let entry = self.record_keyed(
            EntryKind::Reserved(record),
            now,
            IdemOp::Reserve,
            cmd.idempotency_key.as_str(),
        )?;
        if let EntryKind::Reserved(record) = entry.kind {
            self.reply_after_commit(
                reply,
                Ok(ReserveReply {
                    seq: entry.seq,
                    record,
                    replayed: false,
                }),
            );
        }
        Ok(())
    }

    fn settle(
        &mut self,
        rid: u64,
        quantity: Option<u64>,
        reply: RpcReplyPort<Result<SettleReply, AccountError>>,
    ) -> Result<(), StoreError> {
        if self.fold.profile.is_none() {
            let _ = reply.send(Err(AccountError::UnknownAccount(self.id.clone())));
            return Ok(());
        }
        if quantity.is_some_and(|q| q > crate::model::MAX_QUANTITY) {
            let _ = reply.send(Err(ValidationError::new(format!(
                "quantity must be an integer from 0 to {}",
                crate::model::MAX_QUANTITY
            ))
            .into()));
            return Ok(());
        }
        // Settling twice answers with the first settlement, if it was the same request.
        if let Some(prev) = self.find_replay(IdemOp::Settle, &rid.to_string())? {
            let r = match prev.kind {
                EntryKind::Settled(rec) if rec.committed == quantity && !rec.expired => {
                    Ok(SettleReply {
                        seq: prev.seq,
                        record: rec,
                        replayed: true,
                    })
                }
                EntryKind::Settled(rec) => Err(AccountError::ReservationSettled {
                    rid,
                    how: if rec.expired {
                        "expired"
                    } else if rec.committed.is_some() {
                        "committed"
                    } else {
                        "released"
                    },
                }),
                _ => Err(AccountError::UnknownReservation { rid }),
            };
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        let now = self.deps.clock.now_ms();
        self.catch_up(now)?;
        // The hold may just have expired in catch_up: answer as for a replay.
        if let Some(prev) = self.find_replay(IdemOp::Settle, &rid.to_string())? {
            let _ = prev;
            self.reply_after_commit(
                reply,
                Err(AccountError::ReservationSettled {
                    rid,
                    how: "expired",
                }),
            );
            return Ok(());
        }
        let (Some(profile), Some(balances)) = (&self.fold.profile, &self.fold.balances) else {
            return Ok(());
        };
        let Some(hold) = balances.holds.get(&rid) else {
            let _ = reply.send(Err(AccountError::UnknownReservation { rid }));
            return Ok(());
        };
        let record = match quantity {
            None => decide_release(balances, rid, false, now),
            Some(q) => {
                let rule = self
                    .deps
                    .catalog
                    .plans
                    .get(&profile.plan)
                    .and_then(|p| effective_rule(p, profile, &hold.meter));
                // Units beyond the hold are new spend: the cap applies to them.
                let usage = balances.usage(&hold.meter);
                let others = usage.reserved.saturating_sub(hold.quantity);
                let over_cap = q > hold.quantity
                    && self.over_blocking_cap(
                        profile,
                        balances,
                        &hold.meter,
                        usage.used.saturating_add(others).saturating_add(q),
                    );
                match decide_commit(balances, rid, rule.as_ref(), q, now) {
                    Ok(_) if over_cap => {
                        let _ = reply.send(Err(AccountError::CommitDenied {
                            code: "spend_cap_reached",
                        }));
                        return Ok(());
                    }
                    Ok(mut r) => {
                        if let (Some(rule), Some(plan)) =
                            (rule.as_ref(), self.deps.catalog.plans.get(&profile.plan))
                        {
                            let reserved = r.reserved_after;
                            let spend = self.spend_with(
                                plan,
                                profile,
                                rule,
                                balances,
                                &hold.meter,
                                r.used_after.saturating_add(reserved),
                            );
                            r.alerts = alerts_for(
                                plan,
                                rule,
                                balances,
                                &hold.meter,
                                r.used_after,
                                r.credits_after,
                                spend,
                            );
                        }
                        Some(r)
                    }
                    Err(code) => {
                        let code = match code {
                            DenyCode::InsufficientCredits => "insufficient_credits",
                            _ => "cap_reached",
                        };
                        let _ = reply.send(Err(AccountError::CommitDenied { code }));
                        return Ok(());
                    }
                }
            }
        };
        let Some(record) = record else {
            let _ = reply.send(Err(AccountError::UnknownReservation { rid }));
            return Ok(());
        };
        let entry = self.record_keyed(
            EntryKind::Settled(record),
            now,
            IdemOp::Settle,
            &rid.to_string(),
        )?;
        if let EntryKind::Settled(rec) = &entry.kind {
            self.queue_alerts(entry.seq, now, &rec.alerts)?;
        }
        queue_billable(&self.deps.store, &self.id, &entry, true)?;
        if let EntryKind::Settled(record) = entry.kind {
            self.reply_after_commit(
                reply,
                Ok(SettleReply {
                    seq: entry.seq,
                    record,
                    replayed: false,
                }),
            );
        }
        Ok(())
    }

    fn view(&self) -> Result<AccountView, AccountError> {
        let profile = self
            .fold
            .profile
            .clone()
            .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))?;
        let plan = self.catalog_plan(&profile)?;
        let balances = self
            .balances_at(self.deps.clock.now_ms())
            .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))?;
        let now = self.deps.clock.now_ms();
        let access = self.access_at(&profile, now);
        let credits = balances.live_credits(now);
        let mut meters = Vec::new();
        let mut meter_entitlements = BTreeMap::new();
        for (name, rule) in &effective_rules(plan, &profile) {
            meter_entitlements.insert(
                name.clone(),
                meter_entitlement(Some(rule), &balances, credits, profile.status, access, name),
            );
            let usage = balances.usage(name);
            let limit = meter_limit(rule, usage, credits);
            meters.push(MeterView {
                meter: name.clone(),
                used: usage.used,
                reserved: usage.reserved,
                included: rule.included,
                billable: usage.billable,
                limit,
                remaining: limit.map(|l| l.saturating_sub(usage.occupied())),
                overage: match rule.overage {
                    crate::model::Overage::Block => "block",
                    crate::model::Overage::Credits { .. } => "credits",
                    crate::model::Overage::Bill => "bill",
                    crate::model::Overage::Unlimited => "unlimited",
                },
            });
        }
        let cost = current_cost(plan, &profile, &balances).map_err(|e| e.to_string());
        let (projected_usage, suggested_plan) = match &cost {
            Ok(c) => {
                let usage: u64 = c.meters.values().map(|m| m.amount).sum();
                let elapsed = now - balances.period.start_ms;
                let length = balances.period.end_ms - balances.period.start_ms;
                (
                    projected(usage, elapsed, length),
                    suggested_plan(&self.deps.catalog, plan, c),
                )
            }
            Err(_) => (0, None),
        };
        Ok(AccountView {
            id: self.id.clone(),
            cost,
            projected_usage,
            suggested_plan,
            access,
            meter_entitlements,
            plan: plan.clone(),
            grants: balances.grants.clone(),
            alerts: balances.alerts.clone(),
            as_of_ms: now,
            billing: self.fold.billing.clone(),
            plan_kind: plan.kind.as_str(),
            features: plan.features.clone(),
            period: balances.period,
            meters,
            credits,
            last_seq: self.fold.last_seq,
            profile,
        })
    }
}
