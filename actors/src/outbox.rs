//! The outbox: delivers billable usage to Stripe Billing Meters, exactly once.
//!
//! Work: the derived `outbox` tree, which account actors fill from billable ledger entries at
//! append time (and recovery fills again from the ledger tail). Each item becomes one meter
//! event whose `identifier` and `Idempotency-Key` derive only from the account and the ledger
//! sequence number, so a resend after any failure is recognised by Stripe. An item leaves the
//! queue only after Stripe's 200 echoing the identifier, or Stripe's "already exists" answer
//! for it (delivered earlier); a permanent error, too many attempts or an event older than
//! Stripe's 35-day window move it to the dead letters.
//!
//! Aggregation (per account and meter, off by default): entries wait until their window
//! (aligned to multiples of its length since the epoch) has closed, then the entries of one
//! account, meter and window become one **batch** record, keyed by the first entry, whose event
//! identifier names the range (`{account}:{first}-{last}`) and whose value is the sum. The
//! batch is fixed durably before its first send, in one atomic sled transaction that removes
//! the members and marks them in the `batched` tree, so after any crash the same units go under
//! the same identifier, and recovery never queues a member again. From then on a batch is sent,
//! retried, dead-lettered and revived as one item. A record that may have been sent under its
//! own identifier (`attempted`, written durably before the first send) is never merged.
//!
//! Stream mode (`MeterEventsMode::Stream`): the same items, identifiers and barrier, but sent
//! through Stripe's v2 meter event stream, up to 100 events per request under one meter event
//! session token, reused until shortly before it expires.
//!
//! Per tick it scans a bounded part of the queue (continuing where the last tick stopped),
//! forms the batches of closed windows, then waits for a group-commit barrier before sending:
//! only durable entries are ever billed. Up to `concurrency` events are in flight at once
//! (each start paced). Retries back off exponentially with full jitter and honour
//! `Retry-After`; a circuit breaker stops calls after consecutive failures and probes again
//! after a cooldown; calls are spaced to stay under `calls_per_second`. Without a Stripe key it
//! is offline: items wait. It never touches the ledger or account state. It also prunes `sent`
//! records and `batched` marks older than 40 days that recovery can no longer need.
//!
//! Where it lives: this file (messages, settings, the actor, one tick), `aggregation` (windows,
//! the scan of due entries, batch formation), `send` (the outcome of each send), `stream` (the
//! v2 session and stream requests) and `pacing` (rate limit, pruning).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::supervisor::{Slot, StartFn, linked};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::account::Accounts;
use crate::model::{AccountId, Clock, Period, UnixMs, backoff};
use crate::store::{OutboxItem, OutboxRecord, PruneCursor, QueuedRecord, Store, StoreError};
mod aggregation;
mod pacing;
mod send;
mod stream;

use aggregation::{AccountInfo, Candidate, WaitingRun};
pub use aggregation::{Aggregation, window_of};
pub use stream::session_margin;

use crate::stripe::{
    Disposition, MeterEventSession, STREAM_MAX_EVENTS, StreamEvent, StripeCallError, StripeHttp,
};

/// Stripe accepts meter events up to 35 days old; keep a margin.
const MAX_AGE_MS: i64 = 34 * 24 * 3_600_000;
/// A window is merged this long after it ended: an entry whose time was read just before the
/// end, but which reached the queue a moment later, still joins its batch. (One that comes
/// later still forms a batch of its own: correct, one call more.)
pub const GRACE_MS: i64 = 1_000;
/// At most this many entries per batch. A batch forms in one sled transaction, which holds
/// sled's global lock (every other write waits) for about 9 µs per entry: 500 keep that
/// under ~5 ms. A window with more becomes several batches, each naming its own range.
pub const MAX_MEMBERS: usize = 500;
/// At most this many queued records are read per tick; the next tick continues after them.
const SCAN_LIMIT: usize = 20_000;
const PAGE: usize = 512;
/// `sent` records and `batched` marks are kept this long (Stripe's 35 days, plus a margin).
pub const SENT_RETENTION_MS: i64 = 40 * 24 * 3_600_000;
/// How long a pass may skip a run of waiting entries it found before (see `WaitingRun`).
const MEMO_TTL: Duration = Duration::from_secs(5);
/// Records read per pruning step.
const PRUNE_PAGE: usize = 10_000;

pub enum OutboxMsg {
    /// Deliver what is due (scheduled by the actor itself).
    Tick,
    Stats(RpcReplyPort<OutboxStats>),
    /// Queue dead letters again (admin): one (`Some`), or up to 10,000 (`None`). Answers how
    /// many were revived. Handled here, so a revive never races the actor's own moves.
    Revive(Option<(AccountId, u64)>, RpcReplyPort<Result<u64, String>>),
}

/// How meter events reach Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeterEventsMode {
    /// One `POST /v1/billing/meter_events` per event (the default).
    #[default]
    V1,
    /// Stripe's v2 meter event stream: up to 100 events per request, authenticated by a
    /// meter event session's token (valid about 15 minutes, reused until shortly before it
    /// expires).
    Stream,
}

/// What the outbox sends for one record.
type Ready = (AccountId, u64, OutboxRecord, String, String);

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// `None`: offline (no Stripe key); items wait.
    pub client: Option<StripeHttp>,
    /// Meter name → the Stripe meter's `event_name` (default: the meter name).
    pub event_names: BTreeMap<String, String>,
    pub poll: Duration,
    pub batch: usize,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub calls_per_second: u32,
    /// Meter events in flight at once.
    pub concurrency: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// Aggregation windows (default: off everywhere).
    pub aggregation: Aggregation,
    /// v1 events one by one, or the v2 meter event stream.
    pub meter_events: MeterEventsMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub online: bool,
    pub queued: usize,
    pub dead: usize,
    pub sent: usize,
    pub breaker_open: bool,
    pub delivered_total: u64,
    pub already_total: u64,
    pub failed_total: u64,
    pub dead_total: u64,
    pub waiting_customer: u64,
    pub calls_total: u64,
    /// Queued entries whose aggregation window was still open, as of the last full pass over
    /// the queue.
    pub waiting_window: usize,
    /// Batches formed, and the ledger entries merged into them.
    pub batches_total: u64,
    pub batched_entries_total: u64,
    /// Entries recovery queued again after they joined a batch (dropped, never sent).
    pub requeued_members_dropped: u64,
    /// `sent` records and `batched` marks pruned.
    pub pruned_total: u64,
    /// Stream mode: meter event sessions created, and stream requests sent.
    pub sessions_total: u64,
    pub stream_requests_total: u64,
}

#[derive(Clone)]
pub struct OutboxArgs {
    pub store: Store,
    pub accounts: Accounts,
    pub clock: Clock,
    pub settings: OutboxSettings,
}

pub struct OutboxState {
    args: OutboxArgs,
    consecutive_failures: u32,
    breaker_open_until: Option<i64>,
    /// The pacing of call starts, made at the first call.
    pacer: Option<pacing::Pacer>,
    stats: OutboxStats,
    /// Where the next scan of the queue starts (`None`: the beginning).
    cursor: Option<(AccountId, u64)>,
    /// Entries seen waiting for their window in the current pass.
    pass_waiting: usize,
    /// Per account, its leading run of entries waiting for open windows, as the last pass
    /// found it (skipped while certainly still waiting), and as this pass finds it.
    memo: HashMap<AccountId, WaitingRun>,
    pass_memo: HashMap<AccountId, WaitingRun>,
    prune_cursor: PruneCursor,
    next_prune: tokio::time::Instant,
    /// Stream mode: the meter event session in use, and when to replace it.
    session: Option<(MeterEventSession, tokio::time::Instant)>,
}

pub struct OutboxActor;

/// The identifier of a queued record (keyed `seq`): an entry's or a batch's.
pub fn record_identifier(account: &AccountId, seq: u64, record: &OutboxRecord) -> String {
    match &record.batch {
        Some(b) => crate::identifier::batch(account, seq, b.last_seq),
        None => crate::identifier::entry(account, seq),
    }
}

impl Actor for OutboxActor {
    type Msg = OutboxMsg;
    type State = OutboxState;
    type Arguments = OutboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<OutboxMsg>,
        args: OutboxArgs,
    ) -> Result<OutboxState, ActorProcessingErr> {
        let _ = myself.cast(OutboxMsg::Tick);
        let online = args.settings.client.is_some();
        Ok(OutboxState {
            args,
            consecutive_failures: 0,
            breaker_open_until: None,
            pacer: None,
            stats: OutboxStats {
                online,
                ..OutboxStats::default()
            },
            cursor: None,
            pass_waiting: 0,
            memo: HashMap::new(),
            pass_memo: HashMap::new(),
            prune_cursor: PruneCursor::default(),
            next_prune: tokio::time::Instant::now(),
            session: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<OutboxMsg>,
        msg: OutboxMsg,
        state: &mut OutboxState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            OutboxMsg::Tick => {
                // Pruning is housekeeping: a failure is logged and retried later, never
                // allowed to stop deliveries.
                if let Err(e) = state.prune_step().await {
                    tracing::warn!(error = %e, "outbox: pruning old sent records failed; retrying later");
                    state.next_prune = tokio::time::Instant::now() + state.args.settings.poll * 500;
                }
                state.tick().await?;
                myself.send_after(state.args.settings.poll, || OutboxMsg::Tick);
            }
            OutboxMsg::Revive(which, reply) => {
                let _ = reply.send(state.revive(which).map_err(|e| e.to_string()));
            }
            OutboxMsg::Stats(reply) => {
                let (queued, dead, sent) = state.args.store.outbox_counts();
                let mut s = state.stats;
                s.queued = queued;
                s.dead = dead;
                s.sent = sent;
                s.breaker_open = state.breaker_open_until.is_some();
                let _ = reply.send(s);
            }
        }
        Ok(())
    }
}

impl OutboxState {
    fn revive(&mut self, which: Option<(AccountId, u64)>) -> Result<u64, StoreError> {
        let now = self.args.clock.now_ms();
        let store = &self.args.store;
        let targets = match which {
            Some(one) => vec![one],
            None => store
                .outbox_items(true, None, 10_000)?
                .into_iter()
                .map(|(a, seq, _)| (a, seq))
                .collect(),
        };
        let mut n = 0;
        for (a, seq) in targets {
            if store.revive(&a, seq, now)? {
                tracing::info!(account = %a, seq, "outbox dead letter revived");
                n += 1;
            }
        }
        Ok(n)
    }

    async fn tick(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(client) = self.args.settings.client.clone() else {
            return Ok(());
        };
        let now = self.args.clock.now_ms();
        // Breaker: open until the cooldown is over, then half-open: one probe.
        let half_open = match self.breaker_open_until {
            Some(until) if now < until => return Ok(()),
            Some(_) => true,
            None => false,
        };
        let scan = self.scan(now)?;
        if scan.due.is_empty() && scan.groups.is_empty() {
            return Ok(());
        }
        let mut infos: HashMap<AccountId, Option<AccountInfo>> = HashMap::new();
        let mut candidates: Vec<Candidate> = scan
            .due
            .into_iter()
            .map(|q| Candidate {
                account: q.account.clone(),
                seq: q.seq,
                record: q.record.clone(),
                queued: Some(q),
            })
            .collect();
        if !scan.groups.is_empty() {
            // Members must be durable before a batch can name them.
            self.args.store.barrier().await?;
            for g in scan.groups {
                self.merge(g, now, &mut infos, &mut candidates).await?;
            }
        }
        // What can be sent now, with its customer and event name.
        let mut ready = Vec::new();
        for c in candidates {
            let Candidate {
                account,
                seq,
                mut record,
                queued,
            } = c;
            if half_open && !ready.is_empty() {
                break;
            }
            // Delivered already: a crash fell between marking it sent and dequeuing it.
            if let Some(q) = &queued
                && self.args.store.is_sent(&account, seq)?
            {
                if self.args.store.drop_queued(q)? {
                    self.stats.already_total += 1;
                }
                continue;
            }
            // A single entry whose key is marked as a batch member is a re-queued member
            // (recovery raced with the batch): the batch carries its units.
            if record.batch.is_none()
                && !record.attempted
                && let Some(q) = &queued
                && self.args.store.is_batched(&account, seq)?
            {
                if self.args.store.drop_queued(q)? {
                    self.stats.requeued_members_dropped += 1;
                }
                continue;
            }
            if record.item.at_ms < now - MAX_AGE_MS {
                record.item.last_error = Some("too_old: older than Stripe's 35-day window".into());
                self.args.store.mark_dead(&account, seq, &record)?;
                self.stats.dead_total += 1;
                tracing::warn!(account = %account, seq, id = %record_identifier(&account, seq, &record), "billable usage too old for Stripe: dead-lettered for reconciliation");
                continue;
            }
            let customer = self
                .info(&account, &mut infos)
                .await
                .and_then(|i| i.customer);
            let Some(customer) = customer else {
                self.stats.waiting_customer += 1;
                record.item.last_error =
                    Some("waiting for the account's stripe_customer_id".into());
                // Look again after the longest backoff (at most 30 s).
                let wait = self.args.settings.max_backoff.min(Duration::from_secs(30));
                record.item.next_at_ms = now + i64::try_from(wait.as_millis()).unwrap_or(30_000);
                self.args.store.update_outbox(&account, seq, &record)?;
                continue;
            };
            let event_name = self
                .args
                .settings
                .event_names
                .get(&record.item.meter)
                .cloned()
                .unwrap_or_else(|| record.item.meter.clone());
            if !record.attempted {
                // From here on Stripe may have it under this identifier: never merge it.
                record.attempted = true;
                self.args.store.update_outbox(&account, seq, &record)?;
            }
            ready.push((account, seq, record, customer, event_name));
        }
        if ready.is_empty() {
            return Ok(());
        }
        // Only durable entries are billed: everything read above, each batch formed and each
        // attempted flag is on disk after this.
        self.args.store.barrier().await?;
        if self.args.settings.meter_events == MeterEventsMode::Stream {
            return self.send_stream(&client, ready, now, half_open).await;
        }
        // Send up to `concurrency` at a time, each start paced; settle the results in order.
        let width = self.args.settings.concurrency.max(1);
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            let chunk: Vec<_> = ready.by_ref().take(width).collect();
            let mut sends = tokio::task::JoinSet::new();
            for (i, (account, seq, record, customer, event_name)) in chunk.iter().enumerate() {
                self.pace().await;
                self.stats.calls_total += 1;
                let client = client.clone();
                let id = record_identifier(account, *seq, record);
                let (customer, event_name) = (customer.clone(), event_name.clone());
                let (value, ts) = (record.item.value, record.item.at_ms.div_euclid(1000));
                sends.spawn(async move {
                    let r = client
                        .send_meter_event(&event_name, &customer, value, ts, &id)
                        .await;
                    (i, r)
                });
            }
            let mut results: Vec<Option<Result<(), crate::stripe::StripeCallError>>> =
                (0..chunk.len()).map(|_| None).collect();
            while let Some(joined) = sends.join_next().await {
                if let Ok((i, r)) = joined
                    && let Some(slot) = results.get_mut(i)
                {
                    *slot = Some(r);
                }
            }
            let mut opened = false;
            for ((account, seq, record, _, _), result) in chunk.into_iter().zip(results) {
                // A send task that did not finish counts as a network failure: retried.
                let result = result.unwrap_or_else(|| {
                    Err(crate::stripe::StripeCallError::Network(
                        "send task failed".into(),
                    ))
                });
                opened |= self.settle(&account, seq, record, result, now, half_open, true)?;
            }
            if opened {
                break;
            }
        }
        Ok(())
    }
}

/// The handle to the outbox. It follows the actor across supervisor restarts.
#[derive(Clone)]
pub struct Outbox {
    actor: Slot<OutboxMsg>,
    aggregation: Arc<Aggregation>,
}

impl Outbox {
    /// The handle, and the function that starts (and restarts) the actor under a
    /// supervisor. The actor keeps nothing that is not in sled: a restart resumes the queue.
    pub fn prepare(args: OutboxArgs) -> (Outbox, StartFn) {
        let aggregation = Arc::new(args.settings.aggregation.clone());
        let slot = Slot::default();
        let start = linked(|| OutboxActor, args, slot.clone());
        (
            Outbox {
                actor: slot,
                aggregation,
            },
            start,
        )
    }

    fn actor(&self) -> Result<ActorRef<OutboxMsg>, String> {
        self.actor
            .get()
            .ok_or_else(|| "the outbox is not running".to_owned())
    }

    pub async fn stats(&self) -> Option<OutboxStats> {
        match self
            .actor()
            .ok()?
            .call(OutboxMsg::Stats, Some(Duration::from_secs(30)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(s)) => Some(s),
            _ => None,
        }
    }

    /// When a queued entry is merged into its batch: its aggregation window's end plus
    /// [`GRACE_MS`] (`None`: it is sent as it is: no window, a batch, or possibly sent before).
    pub fn merged_at(&self, account: &AccountId, record: &OutboxRecord) -> Option<UnixMs> {
        if record.batch.is_some() || record.attempted {
            return None;
        }
        let w = self
            .aggregation
            .window_ms(account.as_str(), &record.item.meter);
        if w <= 0 {
            return None;
        }
        let (_, end) = window_of(record.item.at_ms, w);
        Some(end + GRACE_MS)
    }

    /// Queues dead letter `seq` of `account` again: `Ok(false)` if there is no such dead
    /// letter. Waits behind a send in progress (at most the Stripe timeout).
    pub async fn revive(&self, account: &AccountId, seq: u64) -> Result<bool, String> {
        self.call_revive(Some((account.clone(), seq)))
            .await
            .map(|n| n > 0)
    }

    /// Queues up to 10,000 dead letters again; answers how many.
    pub async fn revive_all(&self) -> Result<u64, String> {
        self.call_revive(None).await
    }

    async fn call_revive(&self, which: Option<(AccountId, u64)>) -> Result<u64, String> {
        match self
            .actor()?
            .call(
                |r| OutboxMsg::Revive(which, r),
                Some(Duration::from_secs(60)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(_) => Err("the outbox did not answer in time".into()),
            Err(e) => Err(format!("the outbox is not running: {e}")),
        }
    }

    /// Stops the actor and waits (at most `bound`) until it has.
    pub async fn stop_and_wait(&self, bound: Duration) {
        if let Ok(a) = self.actor() {
            let _ = a.stop_and_wait(None, Some(bound)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_and_settings_resolve_account_then_meter_then_default() {
        assert_eq!(window_of(125_000, 60_000), (120_000, 180_000));
        assert_eq!(window_of(120_000, 60_000), (120_000, 180_000));
        assert_eq!(window_of(-1, 60_000), (-60_000, 0));
        let mut agg = Aggregation {
            default_s: 60,
            ..Aggregation::default()
        };
        agg.meters.insert("tokens".into(), 300);
        agg.accounts
            .entry("big".into())
            .or_default()
            .insert("tokens".into(), 0);
        assert_eq!(agg.window_s("a", "other"), 60);
        assert_eq!(agg.window_s("a", "tokens"), 300);
        assert_eq!(agg.window_s("big", "tokens"), 0);
        assert_eq!(agg.window_s("big", "other"), 60);
        assert_eq!(agg.window_ms("a", "tokens"), 300_000);
        for ok in [0, 1, 60, 300, 3600, 86_400] {
            assert!(Aggregation::valid_window_s(ok), "{ok}");
        }
        for bad in [7, 1000, 86_401, 172_800] {
            assert!(!Aggregation::valid_window_s(bad), "{bad}");
        }
    }

    #[test]
    fn sessions_are_replaced_ahead_of_their_expiry() {
        // Stripe's 15 minutes: replaced a minute early.
        assert_eq!(
            session_margin(Duration::from_secs(900)),
            Duration::from_secs(60)
        );
        // Short lifetimes: a quarter early.
        assert_eq!(
            session_margin(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(session_margin(Duration::ZERO), Duration::ZERO);
    }
}
