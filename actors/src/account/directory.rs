//! The directory: `AccountId` → the one live [`AccountActor`] for it.
//!
//! It spawns account actors on demand (linked, so it supervises them), stops idle ones and the
//! least recently used one beyond `max_live`, and never lets two live actors exist for one
//! account: a stopping actor is *draining* (it finishes what is already in its mailbox), and
//! requests for its account are parked until it has terminated, then served by a fresh actor.
//! A crashed actor is dropped from the map; the next request restarts it from sled.
//!
//! Messages are routed *through* the directory ([`DirectoryMsg::Route`]): it forwards each one
//! into the live actor's mailbox in the same handler that decides evictions, so a forwarded
//! message is always queued ahead of a drain marker and is never lost to a stopping actor.
//! Messages for a draining account are parked and forwarded to its next actor.
//!
//! An unknown account costs the directory one key lookup: it gets `UnknownAccount` and no
//! actor is spawned (only an upsert creates an account).
//!
//! [`Accounts`] is the handle everything else uses. Every call has a timeout; beyond
//! `max_queued` waiting requests a call fails at once with `Overloaded` (each admitted
//! request holds a [`Ticket`] until its account actor has handled it).
//!
//! A cold account is loaded from sled in its actor's `post_start`, beside the directory:
//! requests for it wait in its mailbox meanwhile, and other accounts are not held up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort,
    SupervisionEvent,
};

use super::{
    AccountActor, AccountArgs, AccountDeps, AccountError, AccountMsg, AccountView, ConsumeCmd,
    ConsumeReply, CreditCmd, CreditReply, UpsertCmd, UpsertReply,
};
use crate::model::AccountId;
use crate::supervisor::{Slot, StartFn, linked};

/// A request on its way to an account actor, with the ticket that counts it as queued.
pub struct Envelope {
    pub(crate) msg: AccountMsg,
    pub(crate) ticket: Option<Ticket>,
}

impl Envelope {
    /// A message no caller waits for (timers, fault injection): not counted.
    pub(crate) fn bare(msg: AccountMsg) -> Envelope {
        Envelope { msg, ticket: None }
    }

    fn fail(self, err: AccountError) {
        self.msg.fail(err);
    }
}

/// One admitted request, counted in [`Accounts::queued`] until dropped: when its account
/// actor's handler ends, or when the request is failed or lost with a stopped actor.
pub struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub enum DirectoryMsg {
    /// Forward a message to the account's live actor, spawning it if needed.
    Route(AccountId, Envelope),
    /// An account actor has been idle for the idle timeout.
    Idle(AccountId, ActorId),
    Stats(RpcReplyPort<DirectoryStats>),
    /// Stop every account actor (they drain first), then answer. Later `Get`s fail.
    Shutdown(RpcReplyPort<()>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirectoryStats {
    pub live: usize,
    pub draining: usize,
    pub spawned_total: u64,
    pub failed_total: u64,
}

struct Live {
    actor: ActorRef<Envelope>,
    last_used: u64,
}

pub struct DirectoryState {
    deps: AccountDeps,
    live: HashMap<AccountId, Live>,
    /// `last_used` tick → account, for least-recently-used eviction.
    lru: BTreeMap<u64, AccountId>,
    /// Accounts whose actor is stopping, with the messages waiting for the next one.
    draining: HashMap<AccountId, Vec<Envelope>>,
    /// Which account each running actor serves.
    by_actor: HashMap<ActorId, AccountId>,
    tick: u64,
    stats: DirectoryStats,
    shutdown: Option<Vec<RpcReplyPort<()>>>,
}

pub struct DirectoryActor;

impl Actor for DirectoryActor {
    type Msg = DirectoryMsg;
    type State = DirectoryState;
    type Arguments = AccountDeps;

    async fn pre_start(
        &self,
        _myself: ActorRef<DirectoryMsg>,
        deps: AccountDeps,
    ) -> Result<DirectoryState, ActorProcessingErr> {
        Ok(DirectoryState {
            deps,
            live: HashMap::new(),
            lru: BTreeMap::new(),
            draining: HashMap::new(),
            by_actor: HashMap::new(),
            tick: 0,
            stats: DirectoryStats::default(),
            shutdown: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<DirectoryMsg>,
        msg: DirectoryMsg,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DirectoryMsg::Route(id, msg) => {
                if state.shutdown.is_some() {
                    msg.fail(AccountError::Unavailable("shutting down".into()));
                } else if let Some(parked) = state.draining.get_mut(&id) {
                    parked.push(msg);
                } else {
                    state.forward(&myself, &id, msg).await;
                }
            }
            DirectoryMsg::Idle(id, actor_id) => {
                let current = state.live.get(&id).map(|l| l.actor.get_id());
                if current == Some(actor_id) {
                    state.start_drain(&id);
                }
            }
            DirectoryMsg::Stats(reply) => {
                let mut s = state.stats;
                s.live = state.live.len();
                s.draining = state.draining.len();
                let _ = reply.send(s);
            }
            DirectoryMsg::Shutdown(reply) => {
                let ids: Vec<AccountId> = state.live.keys().cloned().collect();
                for id in ids {
                    state.start_drain(&id);
                }
                state.shutdown.get_or_insert_with(Vec::new).push(reply);
                state.maybe_finish_shutdown();
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<DirectoryMsg>,
        evt: SupervisionEvent,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err)),
            _ => return Ok(()),
        };
        state.on_child_exit(&myself, &cell, failure).await;
        Ok(())
    }
}

impl DirectoryState {
    /// Puts `msg` into the mailbox of the account's live actor, spawning one if needed.
    async fn forward(&mut self, myself: &ActorRef<DirectoryMsg>, id: &AccountId, msg: Envelope) {
        // Only an upsert may create an account: anything else for an id with no live actor
        // costs one key lookup, and an unknown one gets no actor at all.
        if !self.live.contains_key(id) && !matches!(msg.msg, AccountMsg::Upsert(..)) {
            match self.deps.store.account_exists(id) {
                Ok(true) => {}
                Ok(false) => return msg.fail(AccountError::UnknownAccount(id.clone())),
                Err(e) => return msg.fail(e.into()),
            }
        }
        let actor = match self.get_or_spawn(myself, id).await {
            Ok(a) => a,
            Err(e) => return msg.fail(e),
        };
        if let Err(MessagingErr::SendErr(msg)) = actor.send_message(msg) {
            // The actor died and its exit event is still in our mailbox: forget it now and
            // give the message to a fresh one.
            if let Some(l) = self.live.remove(id) {
                self.lru.remove(&l.last_used);
            }
            match self.get_or_spawn(myself, id).await {
                Ok(a) => {
                    if let Err(MessagingErr::SendErr(msg)) = a.send_message(msg) {
                        msg.fail(AccountError::Unavailable("account actor stopped".into()));
                    }
                }
                Err(e) => msg.fail(e),
            }
        }
    }

    async fn get_or_spawn(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        id: &AccountId,
    ) -> Result<ActorRef<Envelope>, AccountError> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(l) = self.live.get_mut(id) {
            self.lru.remove(&l.last_used);
            l.last_used = tick;
            self.lru.insert(tick, id.clone());
            return Ok(l.actor.clone());
        }
        // Make room first: the least recently used actor drains and stops.
        while self.live.len() >= self.deps.settings.max_live.max(1) {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            self.start_drain(&victim);
        }
        let args = AccountArgs {
            id: id.clone(),
            deps: self.deps.clone(),
            directory: myself.clone(),
        };
        let (actor, _handle): (ActorRef<Envelope>, JoinHandle<()>) =
            Actor::spawn_linked(None, AccountActor, args, myself.get_cell())
                .await
                .map_err(|e| {
                    tracing::error!(account = %id, error = %e, "account actor failed to start");
                    AccountError::Storage(format!("account {id} could not be loaded: {e}"))
                })?;
        self.stats.spawned_total += 1;
        self.by_actor.insert(actor.get_id(), id.clone());
        self.live.insert(
            id.clone(),
            Live {
                actor: actor.clone(),
                last_used: tick,
            },
        );
        self.lru.insert(tick, id.clone());
        Ok(actor)
    }

    /// Moves an account's actor from live to draining: it finishes its queued messages, then
    /// stops; new requests for the account wait for that.
    fn start_drain(&mut self, id: &AccountId) {
        let Some(l) = self.live.remove(id) else {
            return;
        };
        self.lru.remove(&l.last_used);
        self.draining.entry(id.clone()).or_default();
        if l.actor.drain().is_err() {
            // Already stopped: its termination event will arrive and clear the entry.
            tracing::debug!(account = %id, "drain of a stopped actor");
        }
    }

    async fn on_child_exit(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        cell: &ActorCell,
        failure: Option<ActorProcessingErr>,
    ) {
        let Some(id) = self.by_actor.remove(&cell.get_id()) else {
            return;
        };
        if let Some(err) = failure {
            self.stats.failed_total += 1;
            tracing::error!(account = %id, error = %err, "account actor failed; it restarts from the store on its next request");
        }
        // A live actor that exited on its own (failure): forget it.
        if let Some(l) = self.live.get(&id)
            && l.actor.get_id() == cell.get_id()
        {
            let l = self.live.remove(&id);
            if let Some(l) = l {
                self.lru.remove(&l.last_used);
            }
        }
        if let Some(parked) = self.draining.remove(&id) {
            for msg in parked {
                if self.shutdown.is_some() {
                    msg.fail(AccountError::Unavailable("shutting down".into()));
                } else {
                    self.forward(myself, &id, msg).await;
                }
            }
        }
        self.maybe_finish_shutdown();
    }

    fn maybe_finish_shutdown(&mut self) {
        if self.live.is_empty()
            && self.draining.is_empty()
            && let Some(waiters) = self.shutdown.as_mut()
        {
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

/// The handle to every account: what the HTTP layer (and tests) call.
#[derive(Clone)]
pub struct Accounts {
    directory: Slot<DirectoryMsg>,
    timeout: Duration,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl Accounts {
    /// Spawns the directory on its own (tests; the daemon uses [`Accounts::prepare`]).
    pub async fn spawn(deps: AccountDeps) -> Result<(Accounts, JoinHandle<()>), AccountError> {
        let (accounts, _) = Accounts::prepare(deps.clone());
        let (directory, handle) = Actor::spawn(None, DirectoryActor, deps)
            .await
            .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        accounts.directory.set(directory);
        Ok((accounts, handle))
    }

    /// The handle, and the function that starts the directory under a supervisor. The
    /// directory is never restarted in process (its account actors would have to be gone
    /// first): its failure is fatal.
    pub fn prepare(deps: AccountDeps) -> (Accounts, StartFn) {
        let accounts = Accounts {
            directory: Slot::default(),
            timeout: deps.settings.call_timeout,
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued: deps.settings.max_queued,
        };
        let start = linked(|| DirectoryActor, deps, accounts.directory.clone());
        (accounts, start)
    }

    fn directory(&self) -> Result<ActorRef<DirectoryMsg>, AccountError> {
        self.directory
            .get()
            .ok_or_else(|| AccountError::Unavailable("the account directory is not running".into()))
    }

    /// Requests admitted and not yet handled by their account actor.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// A ticket for one more queued request, or `Overloaded`.
    fn admit(&self) -> Result<Ticket, AccountError> {
        let before = self.queued.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket(self.queued.clone());
        if before >= self.max_queued {
            drop(ticket);
            return Err(AccountError::Overloaded(before));
        }
        Ok(ticket)
    }

    /// Sends one request to the account's actor through the directory and waits (bounded)
    /// for the answer. Never re-sends: a delivered message may already have taken effect, so
    /// only the client retries, with its idempotency key.
    async fn call<T: Send + 'static>(
        &self,
        id: &AccountId,
        build: impl FnOnce(RpcReplyPort<Result<T, AccountError>>) -> AccountMsg,
    ) -> Result<T, AccountError> {
        let ticket = Some(self.admit()?);
        let id = id.clone();
        match self
            .directory()?
            .call(
                |p| {
                    DirectoryMsg::Route(
                        id,
                        Envelope {
                            msg: build(p),
                            ticket,
                        },
                    )
                },
                Some(self.timeout),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::Timeout) => Err(AccountError::Timeout(self.timeout)),
            Ok(CallResult::SenderError) => Err(AccountError::Unavailable(
                "the account actor stopped before answering; retry with the same idempotency key"
                    .into(),
            )),
            Err(_) => Err(AccountError::Unavailable(
                "the account directory is not running".into(),
            )),
        }
    }

    pub async fn consume(
        &self,
        id: &AccountId,
        cmd: ConsumeCmd,
    ) -> Result<ConsumeReply, AccountError> {
        self.call(id, |p| AccountMsg::Consume(cmd, p)).await
    }

    pub async fn check(
        &self,
        id: &AccountId,
        cmd: ConsumeCmd,
    ) -> Result<ConsumeReply, AccountError> {
        self.call(id, |p| AccountMsg::Check(cmd, p)).await
    }

    pub async fn upsert(
        &self,
        id: &AccountId,
        cmd: UpsertCmd,
    ) -> Result<UpsertReply, AccountError> {
        self.call(id, |p| AccountMsg::Upsert(Box::new(cmd), p))
            .await
    }

    pub async fn credit(
        &self,
        id: &AccountId,
        cmd: CreditCmd,
    ) -> Result<CreditReply, AccountError> {
        self.call(id, |p| AccountMsg::Credit(cmd, p)).await
    }

    pub async fn top_up(
        &self,
        id: &AccountId,
        cmd: super::TopUpCmd,
    ) -> Result<CreditReply, AccountError> {
        self.call(id, |p| AccountMsg::TopUp(cmd, p)).await
    }

    pub async fn reserve(
        &self,
        id: &AccountId,
        cmd: super::ReserveCmd,
    ) -> Result<super::ReserveReply, AccountError> {
        self.call(id, |p| AccountMsg::Reserve(cmd, p)).await
    }

    /// Commits (`Some(quantity)`) or releases (`None`) reservation `rid` of account `id`.
    pub async fn settle(
        &self,
        id: &AccountId,
        rid: u64,
        quantity: Option<u64>,
    ) -> Result<super::SettleReply, AccountError> {
        self.call(id, |p| AccountMsg::Settle(rid, quantity, p))
            .await
    }

    /// Applies a Stripe event to account `id` (idempotent on the event id).
    pub async fn stripe(
        &self,
        id: &AccountId,
        cmd: super::StripeCmd,
    ) -> Result<super::StripeReply, AccountError> {
        self.call(id, |p| AccountMsg::Stripe(Box::new(cmd), p))
            .await
    }

    /// Records a top-up Checkout Session meterd is about to create (durable when it returns).
    pub async fn pending_topup(
        &self,
        id: &AccountId,
        topup_id: String,
        rec: crate::store::PendingTopUp,
    ) -> Result<(), AccountError> {
        self.call(id, |p| {
            AccountMsg::PendingTopUp(Box::new((topup_id, rec)), p)
        })
        .await
    }

    pub async fn get(&self, id: &AccountId) -> Result<AccountView, AccountError> {
        self.call(id, AccountMsg::Get).await
    }

    /// Fault injection (tests only): makes the account's actor fail.
    #[cfg(feature = "fault-injection")]
    pub async fn crash(&self, id: &AccountId) -> Result<(), AccountError> {
        self.directory()?
            .cast(DirectoryMsg::Route(
                id.clone(),
                Envelope::bare(AccountMsg::Crash),
            ))
            .map_err(|e| AccountError::Unavailable(e.to_string()))
    }

    /// Fault injection (tests only): keeps the account's actor busy for `d`. The stall is a
    /// queued request like any other (it holds a ticket while it runs).
    #[cfg(feature = "fault-injection")]
    pub fn stall(&self, id: &AccountId, d: Duration) -> Result<(), AccountError> {
        let ticket = Some(self.admit()?);
        self.directory()?
            .cast(DirectoryMsg::Route(
                id.clone(),
                Envelope {
                    msg: AccountMsg::Stall(d),
                    ticket,
                },
            ))
            .map_err(|e| AccountError::Unavailable(e.to_string()))
    }

    pub async fn stats(&self) -> Result<DirectoryStats, AccountError> {
        match self
            .directory()?
            .call(DirectoryMsg::Stats, Some(self.timeout))
            .await
        {
            Ok(CallResult::Success(s)) => Ok(s),
            _ => Err(AccountError::Unavailable("directory did not answer".into())),
        }
    }

    /// Drains every account actor and stops the directory, within `bound`.
    pub async fn shutdown(&self, bound: Duration) -> Result<(), AccountError> {
        let started = std::time::Instant::now();
        let directory = self.directory()?;
        let r = directory.call(DirectoryMsg::Shutdown, Some(bound)).await;
        // Wait for the directory itself, so nothing holds the store afterwards.
        let rest = bound.saturating_sub(started.elapsed());
        let _ = directory.stop_and_wait(None, Some(rest)).await;
        match r {
            Ok(CallResult::Success(())) => Ok(()),
            Ok(CallResult::Timeout) => Err(AccountError::Timeout(bound)),
            _ => Err(AccountError::Unavailable("directory did not answer".into())),
        }
    }
}
