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
//!
//! Where each concern lives (all `impl AccountState`): `messages` (the commands and replies),
//! `recovery` (rebuild from snapshot and ledger tail; the append/snapshot/reply helpers),
//! `lifecycle` (lazy period rollover, monthly grants, grant and hold expiry), `consume`
//! (consume and check), `credits` (grants, adjustments, top-ups), `reservations` (reserve,
//! commit, release), `profile` (create and update), `views` (reads), `stripe` (Stripe events),
//! and [`directory`] (one actor per account, routing, passivation).

mod consume;
mod credits;
pub mod directory;
mod lifecycle;
mod messages;
mod profile;
mod recovery;
mod reservations;
mod stripe;
mod views;

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

pub use directory::{Accounts, DirectoryActor, DirectoryMsg, DirectoryStats, Envelope};
pub use messages::*;
use recovery::{corrupt, recover};
pub use stripe::{MoneyPolicy, StripeCmd, StripeReply};

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
    /// Record a top-up Checkout Session about to be created (durable before the answer).
    PendingTopUp(
        Box<(String, crate::store::PendingTopUp)>,
        RpcReplyPort<Result<(), AccountError>>,
    ),
    /// The account's current state.
    Get(RpcReplyPort<Result<AccountView, AccountError>>),
    /// Periodic: report to the directory when idle for longer than the idle timeout.
    IdleTick,
    /// Fault injection (tests only): fail the actor as a bug or storage fault would.
    #[cfg(feature = "fault-injection")]
    Crash,
    /// Fault injection (tests only): keep the actor busy for a while, as a slow disk would.
    #[cfg(feature = "fault-injection")]
    Stall(Duration),
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
            AccountMsg::PendingTopUp(_, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Get(r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::Stripe(_, r) => {
                let _ = r.send(Err(err));
            }
            AccountMsg::IdleTick => {}
            #[cfg(feature = "fault-injection")]
            AccountMsg::Crash | AccountMsg::Stall(_) => {}
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
    /// A Stripe customer belongs to one account at most.
    #[error("Stripe customer {customer} is linked to account `{account}`")]
    CustomerInUse {
        customer: String,
        account: AccountId,
    },
    /// Load shedding: `max_queued` requests are already waiting for account actors.
    #[error("overloaded: {0} requests are already queued; retry shortly")]
    Overloaded(usize),
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
    /// At most this many requests wait for account actors (in every mailbox, parked or
    /// loading, together); beyond it calls fail at once with `Overloaded`.
    pub max_queued: usize,
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
    type Msg = Envelope;
    type State = AccountState;
    type Arguments = AccountArgs;

    /// Cheap: the directory waits for it. The load from sled happens in `post_start`, in
    /// this actor's own task, while requests queue in its mailbox.
    async fn pre_start(
        &self,
        _myself: ActorRef<Envelope>,
        args: AccountArgs,
    ) -> Result<AccountState, ActorProcessingErr> {
        Ok(AccountState {
            id: args.id,
            deps: args.deps,
            directory: args.directory,
            fold: AccountFold::default(),
            snapshot_seq: 0,
            last_activity: Instant::now(),
            ticker: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Envelope>,
        state: &mut AccountState,
    ) -> Result<(), ActorProcessingErr> {
        let (fold, snapshot_seq) = recover(&state.deps.store, &state.id)?;
        state.fold = fold;
        state.snapshot_seq = snapshot_seq;
        let now = state.deps.clock.now_ms();
        state.finish_interrupted(now)?;
        let period = (state.deps.settings.idle_timeout / 2).max(Duration::from_millis(10));
        state.ticker = Some(myself.send_interval(period, || Envelope::bare(AccountMsg::IdleTick)));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Envelope>,
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
        myself: ActorRef<Envelope>,
        envelope: Envelope,
        state: &mut AccountState,
    ) -> Result<(), ActorProcessingErr> {
        // The ticket is returned when this handler ends: the request has left the queue.
        let Envelope {
            msg,
            ticket: _ticket,
        } = envelope;
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
            AccountMsg::PendingTopUp(rec, reply) => {
                let (id, rec) = *rec;
                let r = state.record_pending_topup(&id, rec)?;
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
            #[cfg(feature = "fault-injection")]
            AccountMsg::Crash => return Err("crash requested".into()),
            #[cfg(feature = "fault-injection")]
            AccountMsg::Stall(d) => tokio::time::sleep(d).await,
        }
        Ok(())
    }
}
