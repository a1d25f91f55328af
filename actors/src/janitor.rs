//! The janitor: expires idempotency records older than the retention period, and pending
//! top-ups older than `TOPUP_RETENTION`.
//!
//! Idempotency records are derived data (the ledger keeps every key forever); the janitor only
//! bounds the index's size. On a timer it drops the generations of records older than the
//! retention, whole (`Store::expire_idem`): no scan, no per-record delete, so it keeps up with
//! any write rate. It must never touch the ledger.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::model::Clock;
use crate::store::Store;
use crate::supervisor::{Slot, StartFn, linked};

/// The janitor's slot (to stop it) and the function that starts (and restarts) it under a
/// supervisor; a restarted janitor begins a new pass.
pub fn prepare(args: JanitorArgs) -> (Slot<JanitorMsg>, StartFn) {
    let slot = Slot::default();
    let start = linked(|| JanitorActor, args, slot.clone());
    (slot, start)
}

pub enum JanitorMsg {
    /// Drop the idempotency generations older than the retention.
    Sweep,
}

#[derive(Clone)]
pub struct JanitorArgs {
    pub store: Store,
    pub clock: Clock,
    /// Records younger than this are always kept.
    pub retention: Duration,
    pub interval: Duration,
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
        _myself: ActorRef<JanitorMsg>,
        msg: JanitorMsg,
        state: &mut JanitorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JanitorMsg::Sweep => {
                let retention_ms =
                    i64::try_from(state.args.retention.as_millis()).unwrap_or(i64::MAX);
                let cutoff = state.args.clock.now_ms().saturating_sub(retention_ms);
                let (generations, records) = state.args.store.expire_idem(cutoff)?;
                if generations > 0 {
                    tracing::info!(generations, records, "expired idempotency records");
                }
                let topup_ms =
                    i64::try_from(crate::store::TOPUP_RETENTION.as_millis()).unwrap_or(i64::MAX);
                let topups = state
                    .args
                    .store
                    .prune_pending_topups(state.args.clock.now_ms().saturating_sub(topup_ms))?;
                if topups > 0 {
                    tracing::info!(topups, "pruned pending top-ups");
                }
            }
        }
        Ok(())
    }
}
