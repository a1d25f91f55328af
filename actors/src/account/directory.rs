//! The directory: `AccountId` → the one live [`AccountActor`] for it.
//!
//! It spawns account actors on demand (linked, so it supervises them), stops idle ones and the
//! least recently used one beyond `max_live`, and never lets two live actors exist for one
//! account: a stopping actor is *draining* (it finishes what is already in its mailbox), and
//! requests for its account are parked until it has terminated, then served by a fresh actor.
//! A crashed actor is dropped from the map; the next request restarts it from sled.
//!
//! [`Accounts`] is the handle everything else uses. Every call has a timeout, and a call that
//! could not even be delivered (the actor was stopping) is retried through the directory.

use std::collections::{BTreeMap, HashMap};
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

type GetReply = RpcReplyPort<Result<ActorRef<AccountMsg>, AccountError>>;

pub enum DirectoryMsg {
    /// The live actor for an account, spawning it if needed.
    Get(AccountId, GetReply),
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
    actor: ActorRef<AccountMsg>,
    last_used: u64,
}

pub struct DirectoryState {
    deps: AccountDeps,
    live: HashMap<AccountId, Live>,
    /// `last_used` tick → account, for least-recently-used eviction.
    lru: BTreeMap<u64, AccountId>,
    /// Accounts whose actor is stopping, with the callers waiting for the next one.
    draining: HashMap<AccountId, Vec<GetReply>>,
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
            DirectoryMsg::Get(id, reply) => {
                if state.shutdown.is_some() {
                    let _ = reply.send(Err(AccountError::Unavailable("shutting down".into())));
                } else if let Some(parked) = state.draining.get_mut(&id) {
                    parked.push(reply);
                } else {
                    let r = state.get_or_spawn(&myself, &id).await;
                    let _ = reply.send(r);
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
    async fn get_or_spawn(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        id: &AccountId,
    ) -> Result<ActorRef<AccountMsg>, AccountError> {
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
        let (actor, _handle): (ActorRef<AccountMsg>, JoinHandle<()>) =
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
            if self.shutdown.is_some() {
                for p in parked {
                    let _ = p.send(Err(AccountError::Unavailable("shutting down".into())));
                }
            } else if !parked.is_empty() {
                let r = self.get_or_spawn(myself, &id).await;
                for p in parked {
                    let _ = p.send(r.clone());
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
    directory: ActorRef<DirectoryMsg>,
    timeout: Duration,
}

impl Accounts {
    pub async fn spawn(deps: AccountDeps) -> Result<(Accounts, JoinHandle<()>), AccountError> {
        let timeout = deps.settings.call_timeout;
        let (directory, handle) = Actor::spawn(None, DirectoryActor, deps)
            .await
            .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        Ok((Accounts { directory, timeout }, handle))
    }

    async fn actor_for(&self, id: &AccountId) -> Result<ActorRef<AccountMsg>, AccountError> {
        let id = id.clone();
        match self
            .directory
            .call(|p| DirectoryMsg::Get(id, p), Some(self.timeout))
            .await
        {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::Timeout) => Err(AccountError::Timeout(self.timeout)),
            Ok(CallResult::SenderError) | Err(_) => Err(AccountError::Unavailable(
                "the account directory is not running".into(),
            )),
        }
    }

    /// Sends one request to the account's actor. A message that could not be delivered (the
    /// actor was stopping) is retried through the directory; one that was delivered is never
    /// re-sent here, since its effect may already be recorded.
    async fn call<T: Send + 'static>(
        &self,
        id: &AccountId,
        build: impl Fn(RpcReplyPort<Result<T, AccountError>>) -> AccountMsg,
    ) -> Result<T, AccountError> {
        for _ in 0..3 {
            let actor = self.actor_for(id).await?;
            match actor.call(&build, Some(self.timeout)).await {
                Ok(CallResult::Success(r)) => return r,
                Ok(CallResult::Timeout) => return Err(AccountError::Timeout(self.timeout)),
                Ok(CallResult::SenderError) => {
                    return Err(AccountError::Unavailable(
                        "the account actor stopped before answering; retry with the same idempotency key".into(),
                    ));
                }
                Err(MessagingErr::SendErr(_)) => continue,
                Err(e) => return Err(AccountError::Unavailable(e.to_string())),
            }
        }
        Err(AccountError::Unavailable(
            "the account actor kept stopping; retry".into(),
        ))
    }

    pub async fn consume(
        &self,
        id: &AccountId,
        cmd: ConsumeCmd,
    ) -> Result<ConsumeReply, AccountError> {
        self.call(id, |p| AccountMsg::Consume(cmd.clone(), p)).await
    }

    pub async fn check(
        &self,
        id: &AccountId,
        cmd: ConsumeCmd,
    ) -> Result<ConsumeReply, AccountError> {
        self.call(id, |p| AccountMsg::Check(cmd.clone(), p)).await
    }

    pub async fn upsert(
        &self,
        id: &AccountId,
        cmd: UpsertCmd,
    ) -> Result<UpsertReply, AccountError> {
        self.call(id, |p| AccountMsg::Upsert(cmd.clone(), p)).await
    }

    pub async fn credit(
        &self,
        id: &AccountId,
        cmd: CreditCmd,
    ) -> Result<CreditReply, AccountError> {
        self.call(id, |p| AccountMsg::Credit(cmd.clone(), p)).await
    }

    pub async fn get(&self, id: &AccountId) -> Result<AccountView, AccountError> {
        self.call(id, AccountMsg::Get).await
    }

    /// Test and fault-injection hook: makes the account's actor fail.
    #[doc(hidden)]
    pub async fn crash(&self, id: &AccountId) -> Result<(), AccountError> {
        let actor = self.actor_for(id).await?;
        actor
            .cast(AccountMsg::Crash)
            .map_err(|e| AccountError::Unavailable(e.to_string()))
    }

    pub async fn stats(&self) -> Result<DirectoryStats, AccountError> {
        match self
            .directory
            .call(DirectoryMsg::Stats, Some(self.timeout))
            .await
        {
            Ok(CallResult::Success(s)) => Ok(s),
            _ => Err(AccountError::Unavailable("directory did not answer".into())),
        }
    }

    /// Drains every account actor and stops the directory, within `bound`.
    pub async fn shutdown(&self, bound: Duration) -> Result<(), AccountError> {
        let r = self
            .directory
            .call(DirectoryMsg::Shutdown, Some(bound))
            .await;
        self.directory.stop(None);
        match r {
            Ok(CallResult::Success(())) => Ok(()),
            Ok(CallResult::Timeout) => Err(AccountError::Timeout(bound)),
            _ => Err(AccountError::Unavailable("directory did not answer".into())),
        }
    }
}
