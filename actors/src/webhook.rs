//! The webhook actor: applies the Stripe events of the durable log to the accounts.
//!
//! The HTTP handler verifies a delivery, writes it to the log (`webhooks` and
//! `webhook_bodies` trees) and waits for that write to be durable before answering 200; then
//! it wakes this actor. The actor keeps an in-memory queue of pending events (rebuilt from the
//! log at start), and applies the due ones oldest-`created` first: it parses the stored body
//! (tolerantly, [`crate::billing::interpret`]), fetches a thin v2 event in full, finds the
//! account (named by the event, or through the customer index), and sends the change to the
//! account actor, the only writer of the account. A failure reschedules that event with
//! exponential backoff and full jitter; other events go on. After `max_attempts`, or on a
//! permanent error, the event is `failed` until an admin replays it.
//!
//! It also backfills: at start (with a Stripe key) and on demand it lists the events Stripe
//! failed to deliver in the last days and logs those the log lacks. It prunes events older
//! than the retention period.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;

use crate::account::{AccountError, Accounts, StripeCmd};
use crate::billing::{
    HANDLED_TYPES, PriceMap, StripeChange, StripeOutcome, Target, head_of, interpret,
};
use crate::model::{AccountId, Clock, backoff};
use crate::store::{
    EventSource, MeterErrorRecord, Store, StoreError, WebhookRecord, WebhookStatus,
};
use crate::stripe::{Disposition, StripeHttp};
use crate::supervisor::{Slot, StartFn, linked};

pub enum WebhookMsg {
    /// An event was logged: apply it soon.
    Logged(String, i64),
    /// Apply what is due (every `poll`).
    Tick,
    /// Apply what is due now (sent to itself after new events; coalesced).
    Run,
    /// Queue a logged event again, whatever its status (admin replay).
    Replay(String, RpcReplyPort<Result<bool, String>>),
    /// List undelivered events from Stripe and log the missing ones.
    Backfill(RpcReplyPort<Result<BackfillReport, String>>),
    Stats(RpcReplyPort<WebhookStats>),
    /// Fault injection (tests only): fail the actor as a bug would.
    #[cfg(feature = "fault-injection")]
    Crash,
}

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `None`: offline; thin events and backfill wait for a key.
    pub client: Option<StripeHttp>,
    pub prices: PriceMap,
    pub fallback_plan: String,
    /// What refunds and disputes of top-ups do (`[webhooks] refund_policy`, ...).
    pub money: crate::account::MoneyPolicy,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub retention: Duration,
    pub refetch: bool,
    pub poll: Duration,
    pub backfill_on_start: bool,
    pub backfill_days: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WebhookStats {
    pub pending: usize,
    pub applied_total: u64,
    pub ignored_total: u64,
    pub failed_total: u64,
    pub retries_total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackfillReport {
    pub listed: usize,
    pub logged: usize,
}

#[derive(Clone)]
pub struct WebhookArgs {
    pub store: Store,
    pub accounts: Accounts,
    pub clock: Clock,
    pub settings: WebhookSettings,
}

pub struct WebhookState {
    args: WebhookArgs,
    /// Where `queue.len()` is published after every message, for readiness.
    pending: Arc<AtomicUsize>,
    /// Pending events: id → (not before, created). Retries are timed on the monotonic clock
    /// (the business clock may be a test's manual one).
    queue: BTreeMap<String, (Instant, i64)>,
    stats: WebhookStats,
    last_prune_ms: i64,
    /// A `Run` is in the mailbox.
    run_queued: bool,
    /// Prices without a plan already warned about (once each).
    unknown_prices: BTreeSet<String>,
}

pub struct WebhookActor;

/// Why applying an event did not succeed this time.
enum Failure {
    /// Try again later.
    Retry(String),
    /// Retrying cannot help.
    Permanent(String),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Retry(e.to_string())
    }
}

impl Actor for WebhookActor {
    type Msg = WebhookMsg;
    type State = WebhookState;
    type Arguments = (WebhookArgs, Arc<AtomicUsize>);

    async fn pre_start(
        &self,
        myself: ActorRef<WebhookMsg>,
        (args, pending): Self::Arguments,
    ) -> Result<WebhookState, ActorProcessingErr> {
        let mut queue = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = args
                .store
                .events(Some(WebhookStatus::Pending), after.as_deref(), 1024)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for r in page {
                queue.insert(r.id, (Instant::now(), r.created_s));
            }
        }
        if !queue.is_empty() {
            tracing::info!(pending = queue.len(), "stripe events waiting to be applied");
        }
        myself.send_interval(args.settings.poll, || WebhookMsg::Tick);
        if args.settings.backfill_on_start && args.settings.client.is_some() {
            let me = myself.clone();
            tokio::spawn(async move {
                match ractor::call!(me, WebhookMsg::Backfill) {
                    Ok(Ok(r)) => tracing::info!(
                        listed = r.listed,
                        logged = r.logged,
                        "stripe event backfill done"
                    ),
                    Ok(Err(e)) => tracing::warn!(error = %e, "stripe event backfill failed"),
                    Err(_) => {}
                }
            });
        }
        pending.store(queue.len(), Ordering::Release);
        Ok(WebhookState {
            args,
            pending,
            queue,
            stats: WebhookStats::default(),
            last_prune_ms: 0,
            run_queued: false,
            unknown_prices: BTreeSet::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<WebhookMsg>,
        msg: WebhookMsg,
        state: &mut WebhookState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WebhookMsg::Logged(id, created) => {
                state.queue.insert(id, (Instant::now(), created));
                // One run for a burst of new events: each run sorts the queue once.
                state.kick(&myself);
            }
            // A storage error is logged, never returned: the actor must keep applying (the
            // event stays pending and is tried again).
            WebhookMsg::Run => {
                state.run_queued = false;
                if state.run_due().await {
                    state.kick(&myself);
                }
            }
            WebhookMsg::Tick => {
                state.run_due().await;
                if let Err(e) = state.prune() {
                    tracing::error!(error = %e, "pruning the stripe event log failed");
                }
            }
            WebhookMsg::Replay(id, reply) => {
                let r = state.replay(&id);
                let _ = reply.send(r.map_err(|e| e.to_string()));
                state.kick(&myself);
            }
            WebhookMsg::Backfill(reply) => {
                let r = state.backfill().await;
                let _ = reply.send(r);
                state.kick(&myself);
            }
            WebhookMsg::Stats(reply) => {
                let mut s = state.stats;
                s.pending = state.queue.len();
                let _ = reply.send(s);
            }
            #[cfg(feature = "fault-injection")]
            WebhookMsg::Crash => return Err("crash requested".into()),
        }
        state.pending.store(state.queue.len(), Ordering::Release);
        Ok(())
    }
}

impl WebhookState {
    /// Queues one `Run` unless one is queued already.
    fn kick(&mut self, myself: &ActorRef<WebhookMsg>) {
        if !self.run_queued {
            self.run_queued = true;
            let _ = myself.cast(WebhookMsg::Run);
        }
    }

    /// Applies the due events, oldest `created` first, for at most half a second (so other
    /// messages get their turn). `true`: some due events are left.
    async fn run_due(&mut self) -> bool {
        let start = Instant::now();
        let mut due: Vec<(i64, String)> = self
            .queue
            .iter()
            .filter(|(_, (at, _))| *at <= start)
            .map(|(id, (_, created))| (*created, id.clone()))
            .collect();
        // Oldest first: the order Stripe created them in, as far as it is known.
        due.sort();
        let budget = Duration::from_millis(500);
        for (_, id) in due {
            if start.elapsed() > budget {
                return true;
            }
            if let Err(e) = self.apply_one(&id).await {
                tracing::error!(event = %id, error = %e, "storage error while applying a stripe event; it stays pending");
                if let Some(q) = self.queue.get_mut(&id) {
                    q.0 = Instant::now() + self.args.settings.base_backoff;
                }
            }
        }
        false
    }

    async fn apply_one(&mut self, id: &str) -> Result<(), StoreError> {
        let Some(mut rec) = self.args.store.event(id)? else {
            self.queue.remove(id);
            return Ok(());
        };
        if rec.status != WebhookStatus::Pending {
            self.queue.remove(id);
            return Ok(());
        }
        let now = self.args.clock.now_ms();
        rec.attempts = rec.attempts.saturating_add(1);
        match self.process(&rec).await {
            Ok((status, outcome)) => {
                rec.status = status;
                rec.outcome = Some(outcome);
                rec.last_error = None;
                rec.settled_ms = Some(now);
                match status {
                    WebhookStatus::Ignored => self.stats.ignored_total += 1,
                    _ => self.stats.applied_total += 1,
                }
                self.queue.remove(id);
            }
            Err(Failure::Retry(e)) if rec.attempts < self.args.settings.max_attempts => {
                let wait = backoff(
                    rec.attempts - 1,
                    self.args.settings.base_backoff,
                    self.args.settings.max_backoff,
                );
                rec.next_at_ms = now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                let due = Instant::now() + wait;
                tracing::warn!(event = %rec.id, event_type = %rec.event_type, attempts = rec.attempts, error = %e, "stripe event not applied; will retry");
                rec.last_error = Some(e);
                self.stats.retries_total += 1;
                self.queue.insert(rec.id.clone(), (due, rec.created_s));
            }
            Err(Failure::Retry(e) | Failure::Permanent(e)) => {
                tracing::error!(event = %rec.id, event_type = %rec.event_type, attempts = rec.attempts, error = %e, "stripe event failed; replay it with POST /v1/admin/webhooks/{id}/replay");
                rec.status = WebhookStatus::Failed;
                rec.last_error = Some(e);
                rec.settled_ms = Some(now);
                self.stats.failed_total += 1;
                self.queue.remove(id);
            }
        }
        self.args.store.update_event(&rec)
    }

    /// Applies one event: `(status, what happened)`.
    async fn process(&mut self, rec: &WebhookRecord) -> Result<(WebhookStatus, String), Failure> {
        let body = self
            .args
            .store
            .event_body(&rec.id)?
            .ok_or_else(|| Failure::Permanent("the event's body is missing".into()))?;
        let mut event: Value = serde_json::from_slice(&body)
            .map_err(|e| Failure::Permanent(format!("the stored body is not JSON: {e}")))?;
        if rec.thin {
            event = self.fetch(&format!("v2/core/events/{}", rec.id)).await?;
        }
        let prices = &self.args.settings.prices;
        let (target, mut change) = interpret(&event, prices).map_err(Failure::Permanent)?;
        if let StripeChange::Ignore(why) = &change {
            return Ok((WebhookStatus::Ignored, why.clone()));
        }
        if self.args.settings.refetch
            && let StripeChange::Subscription { info, deleted, .. } = &mut change
            && !*deleted
        {
            let fresh = self.fetch(&format!("v1/subscriptions/{}", info.id)).await?;
            let mut ev = event.clone();
            ev["data"]["object"] = fresh;
            if let (_, StripeChange::Subscription { info: f, .. }) =
                interpret(&ev, prices).map_err(Failure::Permanent)?
            {
                *info = f;
            }
        }
        let by_identifier = matches!(target, Target::Identifiers(_));
        if let StripeChange::Subscription { info, .. } = &change
            && info.plan.is_none()
        {
            let prices: Vec<&str> = info.items.iter().map(|i| i.price.as_str()).collect();
            let key = prices.join(",");
            if self.unknown_prices.insert(key) {
                tracing::warn!(subscription = %info.id, prices = ?prices, "no configured plan has these Stripe prices (set [plans.<p>] stripe_price); such subscriptions leave the account's plan unchanged");
            }
        }
        // Identifier owners that name no account (not even through the hash index).
        let mut unresolved = Vec::new();
        let customer = match &target {
            Target::Account(_, c) => c.clone(),
            Target::Customer(c) => Some(c.clone()),
            _ => None,
        };
        let accounts: Vec<(AccountId, StripeChange)> = match target {
            Target::None => {
                return Ok((WebhookStatus::Ignored, "no account concerned".into()));
            }
            Target::Account(a, _) => vec![(a, change)],
            Target::Payment(pi) => match self.args.store.payment(&pi)? {
                Some(p) => match AccountId::parse(&p.account) {
                    Ok(a) => vec![(a, change)],
                    Err(e) => return Err(Failure::Permanent(e.to_string())),
                },
                None => {
                    if let StripeChange::Dispute { id, .. } = &change {
                        tracing::warn!(dispute = %id, payment_intent = %pi, "a dispute of a payment that paid no meterd top-up: see the Stripe dashboard");
                    }
                    return Ok((
                        WebhookStatus::Ignored,
                        format!("payment {pi} paid no top-up meterd credited"),
                    ));
                }
            },
            Target::Customer(c) => match self.args.store.customer_account(&c)? {
                Some(a) => vec![(a, change)],
                None => {
                    return Err(Failure::Retry(format!(
                        "no account is linked to Stripe customer {c} (yet)"
                    )));
                }
            },
            Target::Identifiers(list) => {
                let StripeChange::MeterErrors { meter, .. } = &change else {
                    return Err(Failure::Permanent(
                        "identifiers without meter errors".into(),
                    ));
                };
                let mut by: BTreeMap<AccountId, Vec<(String, u64)>> = BTreeMap::new();
                let now = self.args.clock.now_ms();
                for r in list {
                    let Some(account) = self.args.store.identifier_owner(&r.owner)? else {
                        unresolved.push(format!("{}: unknown account", r.owner));
                        continue;
                    };
                    // Marks the outbox record: Stripe accepted it, then found it invalid.
                    self.args.store.record_meter_error(
                        &account,
                        r.seq,
                        &MeterErrorRecord {
                            code: r.code.clone(),
                            identifier: r.identifier,
                            event_id: rec.id.clone(),
                            reported_ms: now,
                        },
                    )?;
                    let codes = by.entry(account).or_default();
                    match codes.iter_mut().find(|(c, _)| *c == r.code) {
                        Some((_, n)) => *n += 1,
                        None => codes.push((r.code, 1)),
                    }
                }
                by.into_iter()
                    .map(|(a, codes)| {
                        (
                            a,
                            StripeChange::MeterErrors {
                                meter: meter.clone(),
                                codes,
                            },
                        )
                    })
                    .collect()
            }
        };
        let mut outcomes = Vec::new();
        let mut seen = BTreeSet::new();
        for (account, change) in accounts {
            if !seen.insert(account.clone()) {
                continue;
            }
            let cmd = StripeCmd {
                event_id: rec.id.clone(),
                event_type: rec.event_type.clone(),
                created_s: rec.created_s,
                change,
                fallback_plan: self.args.settings.fallback_plan.clone(),
                customer: customer.clone(),
                money: self.args.settings.money,
            };
            match self.args.accounts.stripe(&account, cmd).await {
                Ok(r) => outcomes.push(match &r.outcome {
                    StripeOutcome::Applied => format!("{account}: applied"),
                    StripeOutcome::Stale(why) => format!("{account}: stale ({why})"),
                    StripeOutcome::Ignored(why) => format!("{account}: ignored ({why})"),
                }),
                Err(AccountError::Invalid(e)) => return Err(Failure::Permanent(e.to_string())),
                // Meter events name accounts meterd itself reported for: one that is gone
                // now will not come back.
                Err(AccountError::UnknownAccount(a)) if by_identifier => {
                    outcomes.push(format!("{a}: unknown account"));
                }
                Err(AccountError::UnknownAccount(a)) => {
                    return Err(Failure::Retry(format!("account {a} does not exist (yet)")));
                }
                Err(e) => return Err(Failure::Retry(e.to_string())),
            }
        }
        outcomes.extend(unresolved);
        Ok((WebhookStatus::Applied, outcomes.join("; ")))
    }

    async fn fetch(&self, path: &str) -> Result<Value, Failure> {
        let Some(client) = &self.args.settings.client else {
            return Err(Failure::Retry(
                "offline (no Stripe key): cannot fetch from Stripe".into(),
            ));
        };
        client
            .get_json(path)
            .await
            .map_err(|e| match e.disposition() {
                Disposition::Permanent
                    if !matches!(e, crate::stripe::StripeCallError::Api { status: 404, .. }) =>
                {
                    Failure::Permanent(format!("GET {path}: {e}"))
                }
                _ => Failure::Retry(format!("GET {path}: {e}")),
            })
    }

    fn replay(&mut self, id: &str) -> Result<bool, StoreError> {
        let Some(mut rec) = self.args.store.event(id)? else {
            return Ok(false);
        };
        let now = self.args.clock.now_ms();
        rec.status = WebhookStatus::Pending;
        rec.attempts = 0;
        rec.next_at_ms = now;
        rec.last_error = None;
        rec.settled_ms = None;
        self.args.store.update_event(&rec)?;
        self.queue
            .insert(rec.id.clone(), (Instant::now(), rec.created_s));
        Ok(true)
    }

    async fn backfill(&mut self) -> Result<BackfillReport, String> {
        let Some(client) = self.args.settings.client.clone() else {
            return Err("offline (no Stripe key): nothing to backfill from".into());
        };
        let now = self.args.clock.now_ms();
        let days = i64::try_from(self.args.settings.backfill_days).unwrap_or(30);
        let since = now / 1000 - days * 86_400;
        let types: Vec<&str> = HANDLED_TYPES
            .iter()
            .copied()
            .filter(|t| !t.starts_with("v1.billing"))
            .collect();
        let mut report = BackfillReport::default();
        let mut after: Option<String> = None;
        // Bounded: 100 pages of 100 events.
        for _ in 0..100 {
            let (page, more) = client
                .undelivered_events(since, &types, after.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            for ev in &page {
                report.listed += 1;
                let Ok(h) = head_of(ev) else { continue };
                after = Some(h.id.clone());
                let rec = WebhookRecord {
                    id: h.id.clone(),
                    event_type: h.event_type.clone(),
                    created_s: h.created_s,
                    received_ms: now,
                    source: EventSource::Backfill,
                    thin: h.thin,
                    status: WebhookStatus::Pending,
                    attempts: 0,
                    next_at_ms: now,
                    last_error: None,
                    outcome: None,
                    settled_ms: None,
                };
                let body = serde_json::to_vec(ev).map_err(|e| e.to_string())?;
                if self
                    .args
                    .store
                    .log_event(&rec, &body)
                    .map_err(|e| e.to_string())?
                {
                    report.logged += 1;
                    self.queue.insert(h.id, (Instant::now(), h.created_s));
                }
            }
            if !more || page.is_empty() {
                break;
            }
        }
        self.args.store.barrier().await.map_err(|e| e.to_string())?;
        Ok(report)
    }

    fn prune(&mut self) -> Result<(), StoreError> {
        let now = self.args.clock.now_ms();
        if now - self.last_prune_ms < 3_600_000 {
            return Ok(());
        }
        self.last_prune_ms = now;
        let keep = i64::try_from(self.args.settings.retention.as_millis()).unwrap_or(i64::MAX);
        let n = self.args.store.prune_events(now.saturating_sub(keep))?;
        if n > 0 {
            tracing::info!(pruned = n, "old stripe events pruned from the log");
        }
        let n = self
            .args
            .store
            .prune_meter_errors(now.saturating_sub(keep))?;
        if n > 0 {
            tracing::info!(pruned = n, "old meter error reports pruned");
        }
        Ok(())
    }
}

/// A handle to the webhook actor. It follows the actor across supervisor restarts.
#[derive(Clone)]
pub struct Webhooks {
    actor: Slot<WebhookMsg>,
    /// The event log, for [`Webhooks::intake`].
    store: Store,
    /// Events logged and not yet applied, as the actor last published it.
    pending: Arc<AtomicUsize>,
}

impl Webhooks {
    /// The handle, and the function that starts (and restarts) the actor under a
    /// supervisor: a new actor rebuilds its queue from the log, so nothing announced while
    /// none ran is lost.
    pub fn prepare(args: WebhookArgs) -> (Webhooks, StartFn) {
        let slot = Slot::default();
        let pending = Arc::new(AtomicUsize::new(0));
        let store = args.store.clone();
        let start = linked(|| WebhookActor, (args, pending.clone()), slot.clone());
        (
            Webhooks {
                actor: slot,
                store,
                pending,
            },
            start,
        )
    }

    /// Events logged and not yet applied (O(1): no actor is asked).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    fn actor(&self) -> Result<ActorRef<WebhookMsg>, String> {
        self.actor
            .get()
            .ok_or_else(|| "the webhook actor is not running".to_owned())
    }

    /// Tells the actor an event was logged.
    /// Takes a verified delivery: logs it unless its id is there already, waits until the log
    /// is durable (a duplicate waits too: its first delivery may not be on disk yet), and
    /// announces it to the actor. `Ok(true)`: new. A duplicate whose first delivery was logged
    /// but never acknowledged (its flush failed, or the request was cancelled) may never have
    /// reached the actor, so a pending one is announced again. Only then may the delivery be
    /// acknowledged to Stripe.
    pub async fn intake(&self, rec: &WebhookRecord, body: &[u8]) -> Result<bool, String> {
        let new = self.store.log_event(rec, body).map_err(|e| e.to_string())?;
        self.store.barrier().await.map_err(|e| e.to_string())?;
        let pending = !new
            && self
                .store
                .event(&rec.id)
                .ok()
                .flatten()
                .is_some_and(|r| r.status == WebhookStatus::Pending);
        if new || pending {
            self.logged(&rec.id, rec.created_s);
        }
        Ok(new)
    }

    /// Announces a logged event to the actor. If none runs (it is restarting), the next one
    /// finds the event in the log.
    pub fn logged(&self, id: &str, created_s: i64) {
        if let Ok(a) = self.actor() {
            let _ = a.cast(WebhookMsg::Logged(id.to_owned(), created_s));
        }
    }

    pub async fn replay(&self, id: &str) -> Result<bool, String> {
        ractor::call!(self.actor()?, WebhookMsg::Replay, id.to_owned())
            .map_err(|e| e.to_string())?
    }

    pub async fn backfill(&self) -> Result<BackfillReport, String> {
        ractor::call!(self.actor()?, WebhookMsg::Backfill).map_err(|e| e.to_string())?
    }

    pub async fn stats(&self) -> Option<WebhookStats> {
        ractor::call_t!(self.actor().ok()?, WebhookMsg::Stats, 2000).ok()
    }

    /// Fault injection (tests only): makes the actor fail.
    #[cfg(feature = "fault-injection")]
    pub fn crash(&self) {
        if let Ok(a) = self.actor() {
            let _ = a.cast(WebhookMsg::Crash);
        }
    }

    /// Stops the actor and waits (at most `bound`) until it has.
    pub async fn stop_and_wait(&self, bound: Duration) {
        if let Ok(a) = self.actor() {
            let _ = a.stop_and_wait(None, Some(bound)).await;
        }
    }
}
