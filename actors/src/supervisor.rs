//! The root supervisor: one ractor supervision tree over every singleton actor.
//!
//! Each singleton (the account directory, the outbox, the webhook actor, the janitor, and any
//! later one) is started *by* the [`RootSupervisor`], linked to it, from a [`StartFn`] it
//! keeps. When a child fails (an error from a handler, a panic) or stops on its own while
//! the daemon is not stopping, the supervisor marks its component `degraded` and starts it
//! again after a backoff (full jitter, `base_backoff` doubling up to `max_backoff`). A child
//! that fails more than `max_failures` times within `window`, or one that must not be
//! restarted in process (the directory: its account actors must be gone first), is marked
//! `failed` and the supervisor reports the fault on [`Supervisor::fatal`]: the daemon then
//! stops in order and exits non-zero, so systemd restarts the whole process.
//!
//! [`Components`] is the in-memory health table `/readyz` reads: it never waits on an actor.
//! Handles that callers hold across restarts keep their actor in a [`Slot`], which the start
//! function refills.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::watch;

use crate::model::backoff;

/// A component's health, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Ok,
    /// Working with a problem (restarting, Stripe unreachable, ...): still ready.
    Degraded,
    /// Not working: not ready.
    Failed,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentState {
    pub health: Health,
    /// Why it is not `ok` (for operators; never a secret).
    pub detail: Option<String>,
    /// Restarts since the daemon started.
    pub restarts: u64,
}

/// The health of every component, kept in memory as things happen. Cheap to clone.
#[derive(Clone, Default)]
pub struct Components(Arc<Mutex<BTreeMap<&'static str, ComponentState>>>);

impl Components {
    pub fn set(&self, name: &'static str, health: Health, detail: Option<String>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(name).or_insert(ComponentState {
            health,
            detail: None,
            restarts: 0,
        });
        e.health = health;
        e.detail = detail;
    }

    fn restarted(&self, name: &'static str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = m.get_mut(name) {
            e.restarts += 1;
        }
    }

    /// Every component's state, by name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, ComponentState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The worst health of all components (`Ok` when there are none).
    pub fn worst(&self) -> Health {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| c.health)
            .max()
            .unwrap_or(Health::Ok)
    }
}

/// The actor a handle talks to, replaced when the supervisor restarts it; empty while it is
/// down (calls then fail at once instead of waiting).
pub struct Slot<M: ractor::Message>(Arc<RwLock<Option<ActorRef<M>>>>);

impl<M: ractor::Message> Clone for Slot<M> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<M: ractor::Message> Default for Slot<M> {
    fn default() -> Self {
        Slot(Arc::new(RwLock::new(None)))
    }
}

impl<M: ractor::Message> Slot<M> {
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, actor: ActorRef<M>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(actor);
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Starts a child linked to the given supervisor cell (and refills its handle's [`Slot`]).
pub type StartFn = Arc<dyn Fn(ActorCell) -> BoxFuture<Result<ActorCell, String>> + Send + Sync>;

/// How a child is treated when it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Started again after a backoff, up to the failure budget.
    WithBackoff,
    /// Never restarted in process: its failure is fatal at once.
    Never,
}

#[derive(Debug, Clone)]
pub struct SupervisorPolicy {
    /// More failures than this within `window` are fatal.
    pub max_failures: usize,
    pub window: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

pub enum SupervisorMsg {
    /// Start a child now and answer once it runs.
    Start {
        name: &'static str,
        start: StartFn,
        restart: Restart,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Start a failed child again (sent to itself after the backoff).
    Restart(&'static str),
    /// The daemon is stopping: children that stop now are not restarted.
    Stopping(RpcReplyPort<()>),
}

struct Child {
    start: StartFn,
    restart: Restart,
    cell: Option<ActorId>,
    failures: VecDeque<Instant>,
}

pub struct SupervisorState {
    policy: SupervisorPolicy,
    components: Components,
    fatal: watch::Sender<Option<String>>,
    children: HashMap<&'static str, Child>,
    stopping: bool,
}

pub struct RootSupervisor;

pub struct SupervisorArgs {
    pub policy: SupervisorPolicy,
    pub components: Components,
}

impl Actor for RootSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = (SupervisorArgs, watch::Sender<Option<String>>);

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        (args, fatal): Self::Arguments,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            policy: args.policy,
            components: args.components,
            fatal,
            children: HashMap::new(),
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start {
                name,
                start,
                restart,
                reply,
            } => {
                let r = start(myself.get_cell()).await;
                if let Ok(cell) = &r {
                    state.components.set(name, Health::Ok, None);
                    state.children.insert(
                        name,
                        Child {
                            start,
                            restart,
                            cell: Some(cell.get_id()),
                            failures: VecDeque::new(),
                        },
                    );
                }
                let _ = reply.send(r.map(|_| ()));
            }
            SupervisorMsg::Restart(name) => {
                if state.stopping {
                    return Ok(());
                }
                let Some(start) = state.children.get(name).map(|c| c.start.clone()) else {
                    return Ok(());
                };
                match start(myself.get_cell()).await {
                    Ok(cell) => {
                        if let Some(c) = state.children.get_mut(name) {
                            c.cell = Some(cell.get_id());
                        }
                        state.components.restarted(name);
                        state.components.set(name, Health::Ok, None);
                        tracing::warn!(component = name, "restarted");
                    }
                    Err(e) => state.failed(&myself, name, &format!("restart failed: {e}")),
                }
            }
            SupervisorMsg::Stopping(reply) => {
                state.stopping = true;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (id, why) = match &evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell.get_id(),
                format!(
                    "stopped unexpectedly{}",
                    reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            ),
            _ => return Ok(()),
        };
        let Some(name) = state
            .children
            .iter()
            .find(|(_, c)| c.cell == Some(id))
            .map(|(n, _)| *n)
        else {
            return Ok(());
        };
        if let Some(c) = state.children.get_mut(name) {
            c.cell = None;
        }
        if state.stopping {
            return Ok(());
        }
        state.failed(&myself, name, &why);
        Ok(())
    }
}

impl SupervisorState {
    /// Counts a failure of `name`: restart after a backoff, or report it as fatal.
    fn failed(&mut self, myself: &ActorRef<SupervisorMsg>, name: &'static str, why: &str) {
        let Some(child) = self.children.get_mut(name) else {
            return;
        };
        let now = Instant::now();
        child.failures.push_back(now);
        while child
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            child.failures.pop_front();
        }
        let n = child.failures.len();
        if child.restart == Restart::Never || n > self.policy.max_failures {
            let reason = if child.restart == Restart::Never {
                format!("{name} {why} (not restarted in process)")
            } else {
                format!(
                    "{name} {why} ({n} failures within {}s)",
                    self.policy.window.as_secs()
                )
            };
            tracing::error!(component = name, reason = %reason, "fatal: the daemon stops and exits non-zero");
            self.components
                .set(name, Health::Failed, Some(reason.clone()));
            let _ = self.fatal.send(Some(reason));
            return;
        }
        let wait = backoff(
            u32::try_from(n).unwrap_or(u32::MAX),
            self.policy.base_backoff,
            self.policy.max_backoff,
        );
        tracing::error!(component = name, reason = %why, restart_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "component failed; restarting");
        self.components
            .set(name, Health::Degraded, Some(format!("{why}; restarting")));
        myself.send_after(wait, move || SupervisorMsg::Restart(name));
    }
}

/// The handle to the root supervisor.
#[derive(Clone)]
pub struct Supervisor {
    actor: ActorRef<SupervisorMsg>,
    components: Components,
    fatal: watch::Receiver<Option<String>>,
}

impl Supervisor {
    pub async fn spawn(
        args: SupervisorArgs,
    ) -> Result<(Supervisor, ractor::concurrency::JoinHandle<()>), String> {
        let components = args.components.clone();
        let (tx, rx) = watch::channel(None);
        let (actor, handle) = Actor::spawn(None, RootSupervisor, (args, tx))
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            Supervisor {
                actor,
                components,
                fatal: rx,
            },
            handle,
        ))
    }

    /// Starts a child under the supervisor and waits until it runs.
    pub async fn start(
        &self,
        name: &'static str,
        restart: Restart,
        start: StartFn,
    ) -> Result<(), String> {
        match self
            .actor
            .call(
                |reply| SupervisorMsg::Start {
                    name,
                    start,
                    restart,
                    reply,
                },
                None,
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r.map_err(|e| format!("{name}: {e}")),
            _ => Err(format!("{name}: the supervisor is not running")),
        }
    }

    pub fn components(&self) -> &Components {
        &self.components
    }

    /// Resolves with the reason once a component failed for good.
    pub async fn fatal(&self) -> String {
        let mut rx = self.fatal.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The supervisor is gone: nothing more can fail.
                std::future::pending::<()>().await;
            }
        }
    }

    /// From now on children that stop are not restarted (the daemon stops them in order).
    pub async fn stopping(&self) {
        let _ = self
            .actor
            .call(SupervisorMsg::Stopping, Some(Duration::from_secs(5)))
            .await;
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

/// The start function of a singleton: spawns `actor` (a unit struct, made by `make`) with a
/// clone of `args`, linked to the supervisor, and points `slot` at it, on every (re)start.
pub fn linked<A>(make: fn() -> A, args: A::Arguments, slot: Slot<A::Msg>) -> StartFn
where
    A: Actor,
    A::Arguments: Clone + Sync,
{
    start_fn(move |supervisor| {
        let (args, slot) = (args.clone(), slot.clone());
        async move {
            let (actor, _) = Actor::spawn_linked(None, make(), args, supervisor)
                .await
                .map_err(|e| e.to_string())?;
            slot.set(actor.clone());
            Ok(actor.get_cell())
        }
    })
}

/// Boxes a start function (saves the caller the `Arc<dyn ...>` and `Box::pin`).
pub fn start_fn<F, Fut>(f: F) -> StartFn
where
    F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<ActorCell, String>> + Send + 'static,
{
    Arc::new(move |cell| Box::pin(f(cell)))
}
