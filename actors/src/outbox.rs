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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::Rng;

use crate::account::Accounts;
use crate::model::{AccountId, Clock, Period, UnixMs};
use crate::store::{OutboxItem, OutboxRecord, PruneCursor, QueuedRecord, Store};
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
}

/// Aggregation windows: which (account, meter) pairs merge their entries, and over how long.
/// A window is 0 (off: one event per entry) or a divisor of 86,400 s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aggregation {
    /// Every meter without a setting of its own.
    pub default_s: u64,
    /// Meter → window.
    pub meters: BTreeMap<String, u64>,
    /// Account id → meter → window (wins over the meter's).
    pub accounts: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Aggregation {
    /// The window of `meter` for `account`, in seconds (0: off).
    pub fn window_s(&self, account: &str, meter: &str) -> u64 {
        self.accounts
            .get(account)
            .and_then(|m| m.get(meter))
            .or_else(|| self.meters.get(meter))
            .copied()
            .unwrap_or(self.default_s)
    }

    /// The window of `meter` for `account`, in milliseconds (0: off).
    pub fn window_ms(&self, account: &str, meter: &str) -> i64 {
        i64::try_from(self.window_s(account, meter))
            .unwrap_or(0)
            .saturating_mul(1000)
    }

    /// A window length the outbox accepts: 0 (off), or a divisor of one day, so a window never
    /// straddles a UTC day.
    pub fn valid_window_s(s: u64) -> bool {
        s == 0 || (s <= 86_400 && 86_400 % s == 0)
    }
}

/// The window `[start, end)` containing `at_ms`, aligned to multiples of `window_ms` (> 0)
/// since the epoch.
pub fn window_of(at_ms: UnixMs, window_ms: i64) -> (UnixMs, UnixMs) {
    let start = at_ms.div_euclid(window_ms) * window_ms;
    (start, start + window_ms)
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
    /// The next free call slot.
    last_call: Option<tokio::time::Instant>,
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

/// How long before its expiry a meter event session is replaced: a quarter of its lifetime,
/// at most a minute (Stripe's sessions last 15 minutes: replaced after 14).
pub fn session_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(Duration::from_secs(60))
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^attempts)]`.
pub fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    let cap = base
        .saturating_mul(1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX))
        .min(max);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// The entries of one account, meter and closed window, found by a scan.
struct Group {
    account: AccountId,
    meter: String,
    window_start: UnixMs,
    window_ms: i64,
    members: Vec<QueuedRecord>,
}

/// An account's leading entries (from its first queued key up to `upto`), all waiting for
/// aggregation windows that are still open. Later passes skip them, saving the work of
/// reading them again, until `closes` (the earliest of their windows closes) or until the
/// record is [`MEMO_TTL`] old. New entries of an account come after its last one, so they
/// are read; an entry queued again inside the run (recovery, a revive) waits at most the TTL.
#[derive(Clone)]
struct WaitingRun {
    upto: u64,
    closes: UnixMs,
    count: usize,
    since: tokio::time::Instant,
}

/// What one scan found.
#[derive(Default)]
struct Scan {
    /// Records due now that are sent as they are (entries of pairs without aggregation,
    /// entries that may have been sent already, batches).
    due: Vec<QueuedRecord>,
    /// Closed windows to merge.
    groups: Vec<Group>,
}

/// A record about to be sent.
struct Candidate {
    account: AccountId,
    seq: u64,
    record: OutboxRecord,
    /// As read from the queue (an entry, not a batch formed this tick).
    queued: Option<QueuedRecord>,
}

/// What the outbox needs to know about an account (`None`: it did not answer).
#[derive(Clone)]
struct AccountInfo {
    customer: Option<String>,
    period: Period,
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
            last_call: None,
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

    /// Reads the queue from the cursor: records due as they are, and the entries of closed
    /// aggregation windows grouped by account, meter and window. Stops after `batch` due
    /// records or `SCAN_LIMIT` reads; the next tick continues there (wrapping at the end).
    fn scan(&mut self, now: UnixMs) -> Result<Scan, ActorProcessingErr> {
        let agg = &self.args.settings.aggregation;
        let due_limit = match self.args.settings.meter_events {
            MeterEventsMode::V1 => self.args.settings.batch.max(1),
            // Enough for `concurrency` full stream requests per tick.
            MeterEventsMode::Stream => self
                .args
                .settings
                .batch
                .max(STREAM_MAX_EVENTS * self.args.settings.concurrency.max(1)),
        };
        let mut out = Scan::default();
        let tick_start = self.cursor.clone();
        let mut from = tick_start.clone();
        // Groups of the account being read, by (meter, window start); complete when the scan
        // moves past the account.
        let mut open: BTreeMap<(String, UnixMs), Group> = BTreeMap::new();
        // The account being read: where its reading began, whether it began this tick's
        // reading, and its waiting entries.
        let mut current: Option<(AccountId, u64, bool)> = None;
        let mut current_waiting = 0usize;
        // The account's leading run of waiting entries (`None` once it is broken, or when the
        // reading did not begin at the account's first entry).
        let mut run: Option<WaitingRun> = None;
        let mut waiting = 0usize;
        let mut read = 0usize;
        let mut stopped = false;
        let mut ended = false;
        // Pages start small and grow: after a skip, most of a big page would be read in vain.
        let mut page_len = 16;
        while !stopped {
            let (page, end) = self
                .args
                .store
                .outbox_page(from.as_ref(), page_len.min(SCAN_LIMIT - read))?;
            page_len = (page_len * 2).min(PAGE);
            let mut reseek = false;
            for q in page {
                if current.as_ref().is_none_or(|(a, _, _)| *a != q.account) {
                    out.groups.extend(std::mem::take(&mut open).into_values());
                    let first_of_tick = current.is_none();
                    if let (Some((prev, _, _)), Some(r)) = (current.take(), run.take())
                        && r.count > 0
                    {
                        self.pass_memo.insert(prev, r);
                    }
                    current = Some((q.account.clone(), q.seq, first_of_tick));
                    current_waiting = 0;
                    // A run found by the last pass that is certainly still waiting: skip it.
                    if let Some(m) = self.memo.get(&q.account)
                        && q.seq <= m.upto
                        && now < m.closes
                        && m.since.elapsed() < MEMO_TTL
                    {
                        waiting += m.count;
                        current_waiting += m.count;
                        run = Some(m.clone());
                        from = m.upto.checked_add(1).map(|n| (q.account.clone(), n));
                        reseek = true;
                        break;
                    }
                    // A run is only known from the account's first entry.
                    run = (!first_of_tick || tick_start.is_none()).then(|| WaitingRun {
                        upto: q.seq,
                        closes: UnixMs::MAX,
                        count: 0,
                        since: tokio::time::Instant::now(),
                    });
                }
                read += 1;
                from = q.seq.checked_add(1).map(|n| (q.account.clone(), n));
                let window_ms = if q.record.batch.is_none() && !q.record.attempted {
                    agg.window_ms(q.account.as_str(), &q.record.item.meter)
                } else {
                    0
                };
                let mut waits = false;
                if window_ms <= 0 {
                    if q.record.item.next_at_ms <= now {
                        out.due.push(q);
                    }
                } else {
                    let (ws, we) = window_of(q.record.item.at_ms, window_ms);
                    if we + GRACE_MS > now {
                        waits = true;
                        waiting += 1;
                        current_waiting += 1;
                        if let Some(r) = run.as_mut() {
                            r.upto = q.seq;
                            r.closes = r.closes.min(we + GRACE_MS);
                            r.count += 1;
                        }
                    } else {
                        let key = (q.record.item.meter.clone(), ws);
                        let g = open.entry(key.clone()).or_insert_with(|| Group {
                            account: q.account.clone(),
                            meter: q.record.item.meter.clone(),
                            window_start: ws,
                            window_ms,
                            members: Vec::new(),
                        });
                        g.members.push(q);
                        if g.members.len() >= MAX_MEMBERS
                            && let Some(full) = open.remove(&key)
                        {
                            out.groups.push(full);
                        }
                    }
                }
                if !waits && let Some(r) = run.take() {
                    // The run ends here: remember what it had.
                    if r.count > 0
                        && let Some((a, _, _)) = &current
                    {
                        self.pass_memo.insert(a.clone(), r);
                    }
                }
                if out.due.len() >= due_limit || read >= SCAN_LIMIT {
                    stopped = true;
                    break;
                }
            }
            if reseek {
                page_len = 16;
                if from.is_some() {
                    continue;
                }
                ended = true;
                break;
            }
            if from.is_none() || (end && !stopped) {
                ended = true;
                break;
            }
        }
        if ended {
            out.groups.extend(open.into_values());
            if let (Some((a, _, _)), Some(r)) = (current, run)
                && r.count > 0
            {
                self.pass_memo.insert(a, r);
            }
            self.cursor = None;
            self.stats.waiting_window = self.pass_waiting + waiting;
            self.pass_waiting = 0;
            self.memo = std::mem::take(&mut self.pass_memo);
            return Ok(out);
        }
        // Stopped inside an account: its groups may be incomplete. Unless this tick began
        // with that account (then it alone fills a tick: merge what there is), read the
        // account again from its start next tick.
        match current {
            Some((account, first, false)) => {
                if !open.is_empty() {
                    self.cursor = Some((account, first));
                    waiting -= current_waiting;
                } else {
                    self.cursor = from;
                }
            }
            _ => {
                out.groups.extend(open.into_values());
                self.cursor = from;
            }
        }
        self.pass_waiting += waiting;
        Ok(out)
    }

    /// Merges a closed window's entries: split at the account's billing-period boundaries
    /// inside the window (so every member falls into one Stripe period), each part of two or
    /// more entries becomes a batch; a part of one is sent as the entry it is.
    async fn merge(
        &mut self,
        g: Group,
        now: UnixMs,
        infos: &mut HashMap<AccountId, Option<AccountInfo>>,
        candidates: &mut Vec<Candidate>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(info) = self.info(&g.account, infos).await else {
            // The account did not answer: leave the entries queued; a later pass merges them.
            return Ok(());
        };
        let window_end = g.window_start + g.window_ms;
        let mut cuts: Vec<UnixMs> = [info.period.start_ms, info.period.end_ms]
            .into_iter()
            // Stripe's period boundaries are whole seconds.
            .map(|c| (c + 999).div_euclid(1000) * 1000)
            .filter(|c| *c > g.window_start && *c < window_end)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut parts: BTreeMap<UnixMs, Vec<QueuedRecord>> = BTreeMap::new();
        for q in g.members {
            // A member already marked is a re-queued one: drop it, its units are in a batch.
            if self.args.store.is_batched(&q.account, q.seq)? {
                if self.args.store.drop_queued(&q)? {
                    self.stats.requeued_members_dropped += 1;
                }
                continue;
            }
            let start = cuts
                .iter()
                .rev()
                .find(|c| **c <= q.record.item.at_ms)
                .copied()
                .unwrap_or(g.window_start);
            parts.entry(start).or_default().push(q);
        }
        for (start, members) in parts {
            if members.len() == 1 {
                if let Some(q) = members.into_iter().next()
                    && q.record.item.next_at_ms <= now
                {
                    candidates.push(Candidate {
                        account: q.account.clone(),
                        seq: q.seq,
                        record: q.record.clone(),
                        queued: Some(q),
                    });
                }
                continue;
            }
            let value = members
                .iter()
                .fold(0u64, |s, q| s.saturating_add(q.record.item.value));
            let item = OutboxItem {
                meter: g.meter.clone(),
                value,
                at_ms: start,
                attempts: 0,
                next_at_ms: now,
                last_error: None,
            };
            let first = members.first().map(|q| q.seq).unwrap_or_default();
            let count = members.len();
            if self
                .args
                .store
                .form_batch(&g.account, &members, item.clone(), g.window_ms, now)?
            {
                self.stats.batches_total += 1;
                self.stats.batched_entries_total += count as u64;
                let record = OutboxRecord {
                    item,
                    batch: Some(crate::store::OutboxBatch {
                        last_seq: members.last().map(|q| q.seq).unwrap_or(first),
                        members: u32::try_from(count).unwrap_or(u32::MAX),
                        window_ms: g.window_ms,
                    }),
                    attempted: false,
                };
                tracing::debug!(account = %g.account, id = %record_identifier(&g.account, first, &record), entries = count, value, "aggregation window merged");
                candidates.push(Candidate {
                    account: g.account.clone(),
                    seq: first,
                    record,
                    queued: None,
                });
            }
        }
        Ok(())
    }

    /// The account's Stripe customer and billing period, looked up once per tick.
    async fn info(
        &self,
        account: &AccountId,
        infos: &mut HashMap<AccountId, Option<AccountInfo>>,
    ) -> Option<AccountInfo> {
        if let Some(i) = infos.get(account) {
            return i.clone();
        }
        let i = self
            .args
            .accounts
            .get(account)
            .await
            .ok()
            .map(|v| AccountInfo {
                customer: v.profile.stripe_customer_id,
                period: v.period,
            });
        infos.insert(account.clone(), i.clone());
        i
    }

    /// Records the outcome of one send (an entry or a batch, as a unit). Returns true if the
    /// breaker opened. `call` is false for the second and later events of one stream request:
    /// one request is one call to the breaker.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        account: &AccountId,
        seq: u64,
        mut record: OutboxRecord,
        result: Result<(), crate::stripe::StripeCallError>,
        now: i64,
        half_open: bool,
        call: bool,
    ) -> Result<bool, crate::store::StoreError> {
        let disposition = match &result {
            Ok(()) => None,
            Err(e) => Some(e.disposition()),
        };
        match disposition {
            None | Some(Disposition::AlreadyDelivered) => {
                self.args.store.mark_sent(account, seq, now)?;
                if disposition.is_some() {
                    self.stats.already_total += 1;
                } else {
                    self.stats.delivered_total += 1;
                }
                self.consecutive_failures = 0;
                self.breaker_open_until = None;
            }
            Some(Disposition::Permanent) => {
                let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(account = %account, seq, id = %record_identifier(account, seq, &record), error = %reason, "meter event refused by Stripe: dead-lettered");
                record.item.last_error = Some(reason);
                self.args.store.mark_dead(account, seq, &record)?;
                self.stats.dead_total += 1;
            }
            Some(Disposition::Retry { after }) => {
                let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
                self.stats.failed_total += 1;
                record.item.attempts += 1;
                record.item.last_error = Some(reason.clone());
                if record.item.attempts >= self.args.settings.max_attempts {
                    record.item.last_error = Some(format!("max_attempts: {reason}"));
                    self.args.store.mark_dead(account, seq, &record)?;
                    self.stats.dead_total += 1;
                } else {
                    let wait = backoff(
                        record.item.attempts,
                        self.args.settings.base_backoff,
                        self.args.settings.max_backoff,
                    )
                    .max(after.unwrap_or_default());
                    record.item.next_at_ms =
                        now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                    self.args.store.update_outbox(account, seq, &record)?;
                }
                if !call {
                    return Ok(false);
                }
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.args.settings.breaker_failures || half_open {
                    let cooldown = i64::try_from(self.args.settings.breaker_cooldown.as_millis())
                        .unwrap_or(i64::MAX / 2);
                    self.breaker_open_until = Some(now + cooldown);
                    tracing::warn!(
                        failures = self.consecutive_failures,
                        "Stripe circuit breaker open"
                    );
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Stream mode: sends `ready` in requests of up to [`STREAM_MAX_EVENTS`] events, up to
    /// `concurrency` requests at a time (each start paced: one request is one call), all with
    /// the current session's token. A request refused for its token (expired) creates a new
    /// session and is sent again once. Each event of a request settles with the request's
    /// outcome: sent only after the stream's 200.
    async fn send_stream(
        &mut self,
        client: &StripeHttp,
        ready: Vec<Ready>,
        now: i64,
        half_open: bool,
    ) -> Result<(), ActorProcessingErr> {
        let width = self.args.settings.concurrency.max(1);
        let mut requests: Vec<Vec<Ready>> = Vec::new();
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            requests.push(ready.by_ref().take(STREAM_MAX_EVENTS).collect());
        }
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let group: Vec<Vec<Ready>> = requests.by_ref().take(width).collect();
            let mut results: Vec<Option<Result<(), StripeCallError>>> =
                (0..group.len()).map(|_| None).collect();
            // Without a session no request was sent: one failed call, not one per request.
            let mut no_session = false;
            match self.stream_session(client).await {
                Err(e) => {
                    no_session = true;
                    tracing::warn!(error = %e, "Stripe: cannot create a meter event session");
                    for r in &mut results {
                        *r = Some(Err(e.clone()));
                    }
                }
                Ok(token) => {
                    let mut sends = tokio::task::JoinSet::new();
                    for (i, request) in group.iter().enumerate() {
                        self.pace().await;
                        self.stats.calls_total += 1;
                        self.stats.stream_requests_total += 1;
                        let events: Vec<StreamEvent> = request
                            .iter()
                            .map(|(account, seq, record, customer, event_name)| StreamEvent {
                                event_name: event_name.clone(),
                                identifier: record_identifier(account, *seq, record),
                                customer: customer.clone(),
                                value: record.item.value,
                                // Whole seconds, as v1 sends them.
                                timestamp_ms: record.item.at_ms.div_euclid(1000) * 1000,
                            })
                            .collect();
                        let client = client.clone();
                        let token = token.clone();
                        sends.spawn(async move {
                            let r = client.send_meter_event_stream(&token, &events).await;
                            match r {
                                Err(e) if e.is_session_expired() => {
                                    match client.create_meter_event_session().await {
                                        Ok(s) => {
                                            let r = client
                                                .send_meter_event_stream(&s.token, &events)
                                                .await;
                                            (i, r, Some(s))
                                        }
                                        Err(e) => (i, Err(e), None),
                                    }
                                }
                                r => (i, r, None),
                            }
                        });
                    }
                    while let Some(joined) = sends.join_next().await {
                        if let Ok((i, r, fresh)) = joined {
                            if let Some(s) = fresh {
                                self.stats.sessions_total += 1;
                                self.stats.calls_total += 1;
                                tracing::debug!(
                                    "Stripe: the meter event session expired; a new one was created"
                                );
                                self.adopt_session(s);
                            }
                            if let Some(slot) = results.get_mut(i) {
                                *slot = Some(r);
                            }
                        }
                    }
                }
            }
            let mut opened = false;
            for (i, (request, result)) in group.into_iter().zip(results).enumerate() {
                // A send task that did not finish counts as a network failure: retried.
                let result = match result {
                    None => Err(StripeCallError::Network("send task failed".into())),
                    // A token refused even when fresh: a problem of the session, not of the
                    // events (never dead-letter them for it).
                    Some(Err(StripeCallError::Api {
                        status: 401,
                        code,
                        message,
                        retry_after,
                        ..
                    })) => Err(StripeCallError::Api {
                        status: 401,
                        code,
                        message,
                        should_retry: Some(true),
                        retry_after,
                    }),
                    Some(r) => r,
                };
                for (k, (account, seq, record, _, _)) in request.into_iter().enumerate() {
                    opened |= self.settle(
                        &account,
                        seq,
                        record,
                        result.clone(),
                        now,
                        half_open,
                        k == 0 && (i == 0 || !no_session),
                    )?;
                }
            }
            if opened {
                break;
            }
        }
        Ok(())
    }

    /// The token of a meter event session valid for a while yet: the current one, or a new
    /// one (created [`session_margin`] before the current one expires).
    async fn stream_session(&mut self, client: &StripeHttp) -> Result<String, StripeCallError> {
        if let Some((s, refresh_at)) = &self.session
            && tokio::time::Instant::now() < *refresh_at
        {
            return Ok(s.token.clone());
        }
        self.stats.calls_total += 1;
        let s = client.create_meter_event_session().await?;
        self.stats.sessions_total += 1;
        let token = s.token.clone();
        self.adopt_session(s);
        Ok(token)
    }

    /// Uses `s` from now on, until shortly before it expires. Its lifetime is measured by
    /// Stripe's own `created` and `expires_at` and counted on the local monotonic clock, so a
    /// skewed local clock cannot keep an expired token.
    fn adopt_session(&mut self, s: MeterEventSession) {
        let lifetime =
            Duration::from_secs(u64::try_from(s.expires_at_s - s.created_s).unwrap_or(0));
        let refresh_at =
            tokio::time::Instant::now() + lifetime.saturating_sub(session_margin(lifetime));
        self.session = Some((s, refresh_at));
    }

    /// One bounded step of pruning `sent` records and `batched` marks older than
    /// [`SENT_RETENTION_MS`] whose entries the account's snapshot covers (recovery replays only
    /// entries after it, so nothing could queue them again). The snapshots read are made
    /// durable (a barrier) before anything is deleted. Runs every 50 polls while a pass is
    /// under way, then rests 500 polls.
    async fn prune_step(&mut self) -> Result<(), ActorProcessingErr> {
        let now_i = tokio::time::Instant::now();
        if now_i < self.next_prune {
            return Ok(());
        }
        let cutoff = self.args.clock.now_ms() - SENT_RETENTION_MS;
        let (plan, next) =
            self.args
                .store
                .prune_candidates(&self.prune_cursor, cutoff, PRUNE_PAGE)?;
        if !plan.is_empty() {
            self.args.store.barrier().await?;
            let n = self.args.store.prune(&plan)?;
            self.stats.pruned_total += n as u64;
            tracing::debug!(pruned = n, "outbox: old sent records pruned");
        }
        let rest = if next.at_start() { 500 } else { 50 };
        self.next_prune = now_i + self.args.settings.poll * rest;
        self.prune_cursor = next;
        Ok(())
    }

    /// Spaces call starts to stay under `calls_per_second` on average. Slots advance from the
    /// scheduled time, not from when a sleep woke (timers overshoot), and up to `concurrency`
    /// starts may go back to back.
    async fn pace(&mut self) {
        let per = self.args.settings.calls_per_second.max(1);
        let gap = Duration::from_secs(1) / per;
        let burst = gap * u32::try_from(self.args.settings.concurrency.max(1)).unwrap_or(1);
        let now = tokio::time::Instant::now();
        let slot = match self.last_call {
            // Never let unused slots pile up beyond one burst.
            Some(next) => next.max(now.checked_sub(burst).unwrap_or(now)),
            None => now,
        };
        if slot > now {
            tokio::time::sleep_until(slot).await;
        }
        self.last_call = Some(slot + gap);
    }
}

/// The handle to the outbox.
#[derive(Clone)]
pub struct Outbox {
    actor: ActorRef<OutboxMsg>,
    aggregation: Arc<Aggregation>,
}

impl Outbox {
    pub async fn spawn(
        args: OutboxArgs,
    ) -> Result<(Outbox, ractor::concurrency::JoinHandle<()>), String> {
        let aggregation = Arc::new(args.settings.aggregation.clone());
        let (actor, handle) = Actor::spawn(None, OutboxActor, args)
            .await
            .map_err(|e| e.to_string())?;
        Ok((Outbox { actor, aggregation }, handle))
    }

    pub async fn stats(&self) -> Option<OutboxStats> {
        match self
            .actor
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

    pub fn stop(&self) {
        self.actor.stop(None);
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

    #[test]
    fn backoff_is_bounded_and_grows() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempts in 0..40 {
            let cap = base
                .saturating_mul(1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX))
                .min(max);
            for _ in 0..20 {
                assert!(backoff(attempts, base, max) <= cap);
            }
        }
        assert!(backoff(50, base, max) <= max);
    }
}
