//! The janitor: expires idempotency records older than the retention period.
//!
//! Idempotency records are derived data (the ledger keeps every key forever); the janitor only
//! bounds the index's size. It sweeps a page at a time on a timer, so it never holds the store
//! for long, and deletes with compare-and-swap, so a record rewritten meanwhile survives.
//! It must never touch the ledger.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::model::Clock;
use crate::store::Store;

pub enum JanitorMsg {
    /// Sweep one page of the idempotency index.
    Sweep,
}

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
    cursor: Option<Vec<u8>>,
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
            cursor: None,
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
                let (deleted, next) =
                    state
                        .args
                        .store
                        .sweep_idem(state.cursor.take(), cutoff, state.args.page)?;
                if deleted > 0 {
                    tracing::debug!(deleted, "expired idempotency records");
                }
                state.cursor = next;
            }
        }
        Ok(())
    }
}
