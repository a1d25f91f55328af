//! The janitor: expires idempotency records older than the retention period.
//!
//! Idempotency records are derived data (the ledger keeps every key forever); the janitor only
//! bounds the index's size. On a timer it takes the expired records from the front of the
//! time-ordered `idem_expiry` index, a page at a time, and goes on at once while pages come
//! back full, so it keeps up with any write rate without scanning `idem`. Deletes are
//! compare-and-swap, so a record rewritten meanwhile survives. It must never touch the ledger.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::model::Clock;
use crate::store::Store;
use crate::supervisor::{Slot, StartFn, start_fn};

/// The janitor's slot (to stop it) and the function that starts (and restarts) it under a
/// supervisor; a restarted janitor begins a new pass.
pub fn prepare(args: JanitorArgs) -> (Slot<JanitorMsg>, StartFn) {
    let slot = Slot::default();
    let start = {
        let slot = slot.clone();
        start_fn(move |supervisor| {
            let (args, slot) = (args.clone(), slot.clone());
            async move {
                let (actor, _) = Actor::spawn_linked(None, JanitorActor, args, supervisor)
                    .await
                    .map_err(|e| e.to_string())?;
                slot.set(actor.clone());
                Ok(actor.get_cell())
            }
        })
    };
    (slot, start)
}

pub enum JanitorMsg {
    /// Expire one page of idempotency records, oldest first (and go on while pages are full).
    Sweep,
}

#[derive(Clone)]
pub struct JanitorArgs {
    pub store: Store,
    pub clock: Clock,
    /// Records younger than this are always kept.
    pub retention: Duration,
    pub interval: Duration,
    pub page: usize,
}

pub struct JanitorState {
    args: JanitorArgs,
    ticker: Option<ractor::concurrency::JoinHandle<()>>,
}

pub struct JanitorActor;

impl Actor for JanitorActor {
    type Msg = JanitorMsg;
    type State = JanitorState;
    type Arguments = JanitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<JanitorMsg>,
        args: JanitorArgs,
    ) -> Result<JanitorState, ActorProcessingErr> {
        let ticker = myself.send_interval(args.interval, || JanitorMsg::Sweep);
        Ok(JanitorState {
            args,
            ticker: Some(ticker),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<JanitorMsg>,
        state: &mut JanitorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<JanitorMsg>,
        msg: JanitorMsg,
        state: &mut JanitorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JanitorMsg::Sweep => {
                let retention_ms =
                    i64::try_from(state.args.retention.as_millis()).unwrap_or(i64::MAX);
                let cutoff = state.args.clock.now_ms().saturating_sub(retention_ms);
                let (taken, deleted) = state.args.store.expire_idem(cutoff, state.args.page)?;
                if deleted > 0 {
                    tracing::debug!(deleted, "expired idempotency records");
                }
                // A full page: more may be due. Go on at once, behind any queued message.
                if taken == state.args.page {
                    let _ = myself.cast(JanitorMsg::Sweep);
                }
            }
        }
        Ok(())
    }
}
