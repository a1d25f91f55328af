//! The reconciler: compares meterd's billable usage with Stripe's meter event summaries, per
//! account, meter and window, and repairs what it can prove.
//!
//! **What it compares.** Every billable ledger entry falls in one window per (account,
//! meter): an hour, or a UTC day when the meter's aggregation window does not divide an hour
//! (a batch's timestamp stays inside its aggregation window, so both sides count the same
//! units in the same window). The sums are kept in `recon` as the reconciler reads each
//! account's new ledger entries once (a cursor per account, moved in the same atomic batch as
//! the sums). A window is compared once it ended at least `lag` before the run started:
//! Stripe's `event_summaries` for the account's customer, paged (100 a page) and paced under
//! `reads_per_second`. Units still in the outbox queue are not judged yet; dead letters are
//! the outbox's to revive, and are reported.
//!
//! **What it repairs, never twice.** Each window gets at most one repair, a durable
//! [`Repair`] under a deterministic identifier (`{account}:r{first seq}`) written before
//! Stripe is called, so a restart resends the same event (Stripe drops a repeated identifier):
//! - Stripe lacks units (lost, or rejected by an error report): they are sent again as one
//!   meter event under the repair identifier, while the window is inside Stripe's 35-day
//!   window for meter event timestamps.
//! - Stripe holds more than meterd, and this window's repair is what is in excess (Stripe's
//!   processing was late, not lost): the repair is cancelled
//!   (`POST /v1/billing/meter_event_adjustments`, `type=cancel`) within Stripe's 24 hours.
//! - Anything else is `unrepairable`: reported with its figures, never guessed.
//!
//! A repaired window is compared once more on the next run: equal, it is `ok` (verified);
//! still different, `unrepairable`. Past the alert threshold (`alert_percent` of the local
//! units, or any drift on a `money_meters` meter) a window carries `alert` and is logged at
//! warn.
//!
//! **When.** Every `interval` (and on `POST /v1/admin/reconciliation/run`), over the accounts
//! the outbox marked (`recon_dirty`: it delivered or dead-lettered something of theirs), one
//! account per step, so stats and admin calls are answered between steps. A run's progress
//! (`recon_runs`: the last account finished) survives a restart; the run continues after it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::account::{AccountError, Accounts};
use crate::model::{AccountId, Clock, UnixMs};
use crate::outbox::Aggregation;
use crate::store::{
    ReconRun, ReconStatus, ReconWindow, Repair, RepairKind, RepairState, Store, StoreError,
};
use crate::stripe::{Disposition, StripeCallError, StripeHttp};
use crate::supervisor::{Slot, StartFn, linked};

/// Stripe accepts meter event timestamps up to 35 days old; a repair keeps an hour's margin.
const STRIPE_TIMESTAMP_WINDOW_MS: i64 = 35 * 86_400_000 - 3_600_000;
/// Stripe cancels a meter event within 24 hours of receiving it; a cancel keeps a margin.
const CANCEL_WINDOW_MS: i64 = 23 * 3_600_000;
/// Windows (and repairs) older than this are final and pruned.
const RETENTION_MS: i64 = 40 * 86_400_000;
/// Ledger entries read per page while summing.
const PAGE: usize = 1_000;

#[derive(Debug, Clone)]
pub struct ReconcilerSettings {
    /// `None`: offline; nothing is compared.
    pub client: Option<StripeHttp>,
    /// Meter name → Stripe `event_name` (default: the meter name).
    pub event_names: BTreeMap<String, String>,
    pub aggregation: Aggregation,
    pub interval: Duration,
    /// How long after a window ends Stripe is given to process it.
    pub lag: Duration,
    pub reads_per_second: u32,
    /// Alert when |drift| ≥ this percent of meterd's units.
    pub alert_percent: u32,
    /// Meters whose units are money: any drift alerts.
    pub money_meters: Vec<String>,
    /// `ok` windows are kept this long for the report.
    pub keep_ok: Duration,
    /// The state pass: an account whose subscription looks inconsistent, or whose last
    /// Stripe event is older than this, is re-read from Stripe (`None`: no state pass).
    pub state_stale: Option<Duration>,
    /// Plans by Stripe price, read as the webhook actor reads them.
    pub prices: crate::billing::PriceMap,
    pub fallback_plan: String,
    pub money: crate::account::MoneyPolicy,
}

#[derive(Clone)]
pub struct ReconcilerArgs {
    pub store: Store,
    pub accounts: Accounts,
    pub clock: Clock,
    pub settings: ReconcilerSettings,
}

pub enum ReconcilerMsg {
    /// Start a scheduled run if one is due (its own timer).
    Tick,
    /// Start a run now (admin), unless one is under way: answers its id, and whether it was
    /// started by this call.
    Run(RpcReplyPort<Result<(u64, bool), String>>),
    /// Visit the next account of the run under way.
    Step,
}

pub struct ReconcilerState {
    args: ReconcilerArgs,
    run: Option<ReconRun>,
    next_run_ms: UnixMs,
    /// Stripe `event_name` → meter id, read once per run.
    meter_ids: Option<HashMap<String, String>>,
    pacer: tokio::time::Interval,
    ticker: Option<ractor::concurrency::JoinHandle<()>>,
    /// The state pass of the run under way: `Some(last customer done)`; `None`: none.
    state_pass: Option<Option<String>>,
    /// When the next state pass is due (a run starts one at most daily; an admin run always).
    next_state_ms: UnixMs,
}

/// A state pass runs at most once a day (and on every admin run).
const STATE_EVERY_MS: i64 = 86_400_000;
/// A subscription's period is over for longer than this before its renewal counts as missed.
const PERIOD_GRACE_MS: i64 = 86_400_000;

pub struct ReconcilerActor;

/// The handle routes and the daemon use.
#[derive(Clone)]
pub struct Reconciler {
    actor: Slot<ReconcilerMsg>,
}

impl Reconciler {
    /// The handle, and the function that starts (and restarts) the actor under a supervisor.
    pub fn prepare(args: ReconcilerArgs) -> (Reconciler, StartFn) {
        let slot = Slot::default();
        let start = linked(|| ReconcilerActor, args, slot.clone());
        (Reconciler { actor: slot }, start)
    }

    /// Starts a run now (or names the one under way): `(run id, started by this call)`.
    pub async fn run_now(&self) -> Result<(u64, bool), String> {
        let a = self
            .actor
            .get()
            .ok_or_else(|| "the reconciler is not running".to_owned())?;
        match a
            .call(ReconcilerMsg::Run, Some(Duration::from_secs(30)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(_) => Err("the reconciler did not answer in time".into()),
            Err(e) => Err(format!("the reconciler is not running: {e}")),
        }
    }

    /// Stops the actor and waits (at most `bound`) until it has.
    pub async fn stop_and_wait(&self, bound: Duration) {
        if let Some(a) = self.actor.get() {
            let _ = a.stop_and_wait(None, Some(bound)).await;
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The reconciliation window of a meter whose aggregation window is `agg_s` (0: off): an hour
/// when it divides an hour, else a UTC day (every aggregation window divides a day).
pub fn window_s_for(agg_s: u64) -> u32 {
    if agg_s == 0 || 3_600 % agg_s == 0 {
        3_600
    } else {
        86_400
    }
}

impl Actor for ReconcilerActor {
    type Msg = ReconcilerMsg;
    type State = ReconcilerState;
    type Arguments = ReconcilerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ReconcilerMsg>,
        args: ReconcilerArgs,
    ) -> Result<ReconcilerState, ActorProcessingErr> {
        let last = args.store.recon_runs(1)?.into_iter().next();
        let now = args.clock.now_ms();
        let interval = ms(args.settings.interval);
        let (run, next_run_ms) = match last {
            Some(r) if r.finished_ms.is_none() => (Some(r), now),
            Some(r) => (None, r.started_ms.saturating_add(interval)),
            None => (
                None,
                now.saturating_add(interval.min(ms(args.settings.lag))),
            ),
        };
        let rate = args.settings.reads_per_second.max(1);
        let mut pacer = tokio::time::interval(Duration::from_secs(1) / rate);
        pacer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ticker = myself.send_interval(
            Duration::from_millis(500).min(args.settings.interval),
            || ReconcilerMsg::Tick,
        );
        if let Some(r) = &run {
            tracing::info!(run = r.id, after = ?r.after, "reconciler: resuming an interrupted run");
            let _ = myself.cast(ReconcilerMsg::Step);
        }
        Ok(ReconcilerState {
            args,
            run,
            next_run_ms,
            meter_ids: None,
            pacer,
            ticker: Some(ticker),
            state_pass: None,
            next_state_ms: now,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ReconcilerMsg>,
        state: &mut ReconcilerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ReconcilerMsg>,
        msg: ReconcilerMsg,
        state: &mut ReconcilerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReconcilerMsg::Tick => {
                if state.run.is_none()
                    && state.args.settings.client.is_some()
                    && state.args.clock.now_ms() >= state.next_run_ms
                {
                    state.start("schedule")?;
                    let _ = myself.cast(ReconcilerMsg::Step);
                }
            }
            ReconcilerMsg::Run(reply) => {
                if state.args.settings.client.is_none() {
                    let _ = reply.send(Err(
                        "offline: no Stripe key is configured, so there is nothing to compare with"
                            .into(),
                    ));
                    return Ok(());
                }
                let answer = match &state.run {
                    Some(r) => (r.id, false),
                    None => {
                        let id = state.start("admin")?;
                        let _ = myself.cast(ReconcilerMsg::Step);
                        (id, true)
                    }
                };
                let _ = reply.send(Ok(answer));
            }
            ReconcilerMsg::Step => {
                if state.run.is_some() {
                    if state.step().await? {
                        let _ = myself.cast(ReconcilerMsg::Step);
                    } else {
                        state.finish()?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a comparison decided for one window.
struct Judged {
    status: ReconStatus,
    action: String,
    stripe: Option<u64>,
}

impl ReconcilerState {
    fn start(&mut self, trigger: &str) -> Result<u64, StoreError> {
        let now = self.args.clock.now_ms();
        let id = self
            .args
            .store
            .recon_runs(1)?
            .first()
            .map_or(1, |r| r.id + 1);
        if id == 1 && self.args.store.recon_dirty_count() == 0 {
            // The first run over data written before the reconciler: every account once.
            let n = self.args.store.seed_recon_dirty()?;
            if n > 0 {
                tracing::info!(
                    accounts = n,
                    "reconciler: the first run visits every account"
                );
            }
        }
        let run = ReconRun {
            id,
            trigger: trigger.to_owned(),
            started_ms: now,
            upto_ms: now - ms(self.args.settings.lag),
            after: None,
            finished_ms: None,
            accounts: 0,
            windows: 0,
            ok: 0,
            drift: 0,
            repaired: 0,
            unrepairable: 0,
            reads: 0,
            alerts: 0,
            state_checked: 0,
            state_reread: 0,
        };
        self.state_pass = (self.args.settings.state_stale.is_some()
            && (trigger == "admin" || now >= self.next_state_ms))
            .then_some(None);
        self.args.store.put_recon_run(&run)?;
        tracing::info!(run = id, trigger, "reconciliation run started");
        self.run = Some(run);
        self.meter_ids = None;
        Ok(id)
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        let Some(mut run) = self.run.take() else {
            return Ok(());
        };
        let now = self.args.clock.now_ms();
        run.finished_ms = Some(now);
        self.args.store.put_recon_run(&run)?;
        let pruned = self.args.store.prune_repairs(now - RETENTION_MS)?;
        tracing::info!(
            run = run.id,
            accounts = run.accounts,
            windows = run.windows,
            ok = run.ok,
            drift = run.drift,
            repaired = run.repaired,
            unrepairable = run.unrepairable,
            reads = run.reads,
            alerts = run.alerts,
            state_checked = run.state_checked,
            state_reread = run.state_reread,
            pruned_repairs = pruned,
            "reconciliation run finished"
        );
        self.next_run_ms = run
            .started_ms
            .saturating_add(ms(self.args.settings.interval));
        Ok(())
    }

    /// Visits the next dirty account; false when the run has none left.
    async fn step(&mut self) -> Result<bool, ActorProcessingErr> {
        let Some(client) = self.args.settings.client.clone() else {
            return Ok(false);
        };
        if self.meter_ids.is_none() {
            // First step of the run. Repairs a crash (or a lost answer) left unfinished go
            // first, under their identifier and idempotency key.
            for (ident, r) in self.args.store.unfinished_repairs()? {
                self.finish_repair(&client, &ident, r).await?;
            }
            match client.active_meters().await {
                Ok(m) => {
                    self.meter_ids = Some(m.into_iter().map(|(id, name)| (name, id)).collect())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reconciler: cannot list Stripe's meters; the run stops here and resumes next time");
                    self.pause_run()?;
                    return Ok(false);
                }
            }
        }
        let after = self
            .run
            .as_ref()
            .and_then(|r| r.after.as_deref())
            .and_then(|a| AccountId::parse(a).ok());
        let Some((account, mark)) = self
            .args
            .store
            .recon_dirty(after.as_ref(), 1)?
            .into_iter()
            .next()
        else {
            return self.state_step(&client).await;
        };
        match self.visit(&client, &account, &mark).await {
            Ok(()) => {}
            Err(Visit::Stripe(e)) => {
                tracing::warn!(account = %account, error = %e, "reconciler: Stripe did not answer; the run stops here and resumes next time");
                self.pause_run()?;
                return Ok(false);
            }
            Err(Visit::Store(e)) => return Err(e.into()),
        }
        if let Some(run) = &mut self.run {
            run.after = Some(account.as_str().to_owned());
            run.accounts += 1;
            self.args.store.put_recon_run(run)?;
        }
        Ok(true)
    }

    /// Ends the run where it is (Stripe unreachable): the next scheduled run starts over the
    /// dirty accounts, which are all still marked.
    fn pause_run(&mut self) -> Result<(), StoreError> {
        self.finish()?;
        self.next_run_ms = self.args.clock.now_ms() + ms(self.args.settings.interval).min(60_000);
        Ok(())
    }

    async fn read_pace(&mut self) {
        self.pacer.tick().await;
        if let Some(r) = &mut self.run {
            r.reads += 1;
        }
    }

    /// Sums the account's new entries, compares its due windows, repairs, and clears its
    /// dirty mark when nothing of it is left to compare.
    async fn visit(
        &mut self,
        client: &StripeHttp,
        account: &AccountId,
        mark: &[u8],
    ) -> Result<(), Visit> {
        let now = self.args.clock.now_ms();
        let store = self.args.store.clone();
        let customer = match self.args.accounts.get(account).await {
            Ok(v) => v.profile.stripe_customer_id,
            Err(AccountError::UnknownAccount(_)) => {
                store.clear_recon_dirty(account, mark)?;
                return Ok(());
            }
            Err(e) => {
                // Busy or restarting: visited again next run.
                tracing::debug!(account = %account, error = %e, "reconciler: account not readable now");
                return Ok(());
            }
        };
        self.sum_new_entries(account, now)?;
        let upto = self.run.as_ref().map_or(now, |r| r.upto_ms);
        let mut windows: BTreeMap<(String, UnixMs), ReconWindow> = store
            .recon_windows_of(account)?
            .into_iter()
            .map(|k| ((k.meter, k.start_ms), k.window))
            .collect();
        let mut remove = Vec::new();
        for ((meter, start), w) in &windows {
            let old = *start < now - RETENTION_MS;
            let stale_ok = w.status == ReconStatus::Ok
                && w.checked_ms
                    .is_some_and(|c| c < now - ms(self.args.settings.keep_ok));
            if old || stale_ok {
                remove.push((meter.clone(), *start));
            }
        }
        for k in &remove {
            windows.remove(k);
        }
        let due = |k: &(String, UnixMs), w: &ReconWindow| {
            k.1 + i64::from(w.window_s) * 1000 <= upto
                && matches!(
                    w.status,
                    ReconStatus::Unchecked | ReconStatus::Drift | ReconStatus::Repaired
                )
        };
        // Meter → (window size, first start, last end) of the due windows.
        let mut ranges: BTreeMap<(String, u32), (UnixMs, UnixMs)> = BTreeMap::new();
        for (k, w) in &windows {
            if due(k, w) {
                let end = k.1 + i64::from(w.window_s) * 1000;
                let r = ranges
                    .entry((k.0.clone(), w.window_s))
                    .or_insert((k.1, end));
                r.0 = r.0.min(k.1);
                r.1 = r.1.max(end);
            }
        }
        let mut changed: Vec<(String, UnixMs)> = Vec::new();
        if let Some(customer) = customer.as_deref() {
            for ((meter, window_s), (from, to)) in ranges {
                let event_name = self
                    .args
                    .settings
                    .event_names
                    .get(&meter)
                    .cloned()
                    .unwrap_or_else(|| meter.clone());
                let Some(meter_id) = self
                    .meter_ids
                    .as_ref()
                    .and_then(|m| m.get(&event_name))
                    .cloned()
                else {
                    for (k, w) in windows.iter_mut() {
                        if k.0 == meter && due(k, w) {
                            w.status = ReconStatus::Drift;
                            w.action = format!(
                                "not compared: Stripe has no active meter with event_name `{event_name}`"
                            );
                            w.checked_ms = Some(now);
                            changed.push(k.clone());
                        }
                    }
                    continue;
                };
                let stripe = self
                    .read_summaries(client, &meter_id, customer, (from, to), window_s)
                    .await?;
                // Usage Stripe has where meterd has none: a window of its own.
                for (start_s, value) in &stripe {
                    let key = (meter.clone(), start_s * 1000);
                    if *value > 0 && !windows.contains_key(&key) {
                        windows.insert(key, ReconWindow::new(window_s));
                    }
                }
                let keys: Vec<(String, UnixMs)> = windows
                    .iter()
                    .filter(|(k, w)| k.0 == meter && w.window_s == window_s && due(k, w))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    let Some(w) = windows.get(&k).cloned() else {
                        continue;
                    };
                    let theirs = stripe.get(&(k.1.div_euclid(1000))).copied();
                    let w = self
                        .judge(client, account, customer, &event_name, &k, w, theirs, now)
                        .await?;
                    windows.insert(k.clone(), w);
                    changed.push(k);
                }
            }
        }
        let cursor = store.recon_cursor(account)?.unwrap_or(0);
        let writes: Vec<(String, UnixMs, ReconWindow)> = changed
            .iter()
            .filter_map(|k| windows.get(k).map(|w| (k.0.clone(), k.1, w.clone())))
            .collect();
        store.put_recon_windows(account, cursor, &writes, &remove)?;
        let open = windows.values().any(|w| {
            matches!(
                w.status,
                ReconStatus::Unchecked | ReconStatus::Drift | ReconStatus::Repaired
            )
        });
        if !open {
            store.clear_recon_dirty(account, mark)?;
        }
        Ok(())
    }

    /// Reads the account's new ledger entries into its windows (one atomic batch with the
    /// cursor). A first visit starts at the entries of the last 35 days.
    fn sum_new_entries(&self, account: &AccountId, now: UnixMs) -> Result<(), StoreError> {
        let store = &self.args.store;
        let oldest = now - STRIPE_TIMESTAMP_WINDOW_MS;
        let mut cursor = match store.recon_cursor(account)? {
            Some(c) => c,
            None => store.first_seq_at(account, oldest)?.saturating_sub(1),
        };
        loop {
            let entries = store.entries_after(account, cursor, PAGE)?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                return Ok(());
            };
            let mut touched: BTreeMap<(String, UnixMs), ReconWindow> = BTreeMap::new();
            for e in &entries {
                let Some((meter, units)) = e.billable() else {
                    continue;
                };
                let agg = self
                    .args
                    .settings
                    .aggregation
                    .window_s(account.as_str(), meter);
                let window_s = window_s_for(agg);
                let width = i64::from(window_s) * 1000;
                let start = e.at_ms.div_euclid(width) * width;
                if start < now - RETENTION_MS {
                    continue;
                }
                let key = (meter.to_owned(), start);
                if !touched.contains_key(&key) {
                    let w = store
                        .recon_window(account, meter, start)?
                        .unwrap_or_else(|| ReconWindow::new(window_s));
                    touched.insert(key.clone(), w);
                }
                if let Some(w) = touched.get_mut(&key) {
                    w.local = w.local.saturating_add(units);
                    if w.first_seq == 0 {
                        w.first_seq = e.seq;
                    }
                    w.last_seq = w.last_seq.max(e.seq);
                    if w.status == ReconStatus::Ok {
                        // Usage arrived in a window already compared: compare it again.
                        w.status = ReconStatus::Unchecked;
                    }
                }
            }
            let writes: Vec<(String, UnixMs, ReconWindow)> =
                touched.into_iter().map(|((m, s), w)| (m, s, w)).collect();
            store.put_recon_windows(account, last, &writes, &[])?;
            cursor = last;
            if entries.len() < PAGE {
                return Ok(());
            }
        }
    }

    /// Stripe's value per window start (unix seconds) over `[from, to)`, every page.
    async fn read_summaries(
        &mut self,
        client: &StripeHttp,
        meter_id: &str,
        customer: &str,
        (from, to): (UnixMs, UnixMs),
        window_s: u32,
    ) -> Result<HashMap<i64, u64>, Visit> {
        let mut out = HashMap::new();
        let mut after: Option<String> = None;
        // Bounded: 40 days of hours is under 1,000 windows, 10 pages.
        for _ in 0..100 {
            self.read_pace().await;
            let (page, more) = client
                .meter_event_summaries(
                    meter_id,
                    customer,
                    from.div_euclid(1000),
                    to.div_euclid(1000),
                    window_s,
                    after.as_deref(),
                )
                .await
                .map_err(Visit::Stripe)?;
            for s in &page {
                match s.value {
                    Some(v) => {
                        out.insert(s.start_s, v);
                    }
                    None => {
                        return Err(Visit::Stripe(StripeCallError::Answer(format!(
                            "summary {} is not a whole number of units",
                            s.id
                        ))));
                    }
                }
            }
            after = page.last().map(|s| s.id.clone());
            if !more || after.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Compares one due window and repairs it if it can.
    #[allow(clippy::too_many_arguments)]
    async fn judge(
        &mut self,
        client: &StripeHttp,
        account: &AccountId,
        customer: &str,
        event_name: &str,
        (meter, start): &(String, UnixMs),
        mut w: ReconWindow,
        stripe: Option<u64>,
        now: UnixMs,
    ) -> Result<ReconWindow, Visit> {
        let store = self.args.store.clone();
        let end = start + i64::from(w.window_s) * 1000;
        let (queued, dead) = if w.first_seq > 0 {
            store.outbox_units_in(account, meter, (w.first_seq, w.last_seq), (*start, end))?
        } else {
            (0, 0)
        };
        if queued > 0 {
            // The outbox has not sent all of it yet: compared on a later run.
            return Ok(w);
        }
        let theirs = stripe.unwrap_or(0);
        let expected = w.local.saturating_sub(dead);
        let was_repaired = w.status == ReconStatus::Repaired;
        let repair = match &w.repair {
            Some(id) => store.repair(id)?.map(|r| (id.clone(), r)),
            None => None,
        };
        let errors = if w.first_seq > 0 {
            store.meter_errors_in(account, (w.first_seq, w.last_seq))?
        } else {
            Vec::new()
        };
        let reported = if errors.is_empty() {
            String::new()
        } else {
            let codes: Vec<String> = errors
                .iter()
                .take(3)
                .map(|(seq, code)| format!("{account}:{seq} {code}"))
                .collect();
            format!(" Stripe reported errors: {}.", codes.join(", "))
        };
        let verdict = if theirs == expected {
            if dead > 0 {
                Judged {
                    status: ReconStatus::Drift,
                    action: format!(
                        "{dead} units are dead letters in the outbox: revive them there (POST /v1/admin/outbox/revive) or accept the loss"
                    ),
                    stripe,
                }
            } else if was_repaired {
                Judged {
                    status: ReconStatus::Ok,
                    action: format!(
                        "repaired ({}), verified",
                        w.repair.as_deref().unwrap_or("repair")
                    ),
                    stripe,
                }
            } else {
                Judged {
                    status: ReconStatus::Ok,
                    action: String::new(),
                    stripe,
                }
            }
        } else if theirs > expected {
            let excess = theirs - expected;
            match repair {
                Some((ident, r))
                    if r.state == RepairState::Sent
                        && r.value <= excess
                        && r.sent_ms.is_some_and(|t| now - t < CANCEL_WINDOW_MS) =>
                {
                    let r = Repair {
                        state: RepairState::Cancelling,
                        ..r
                    };
                    store.put_repair(&ident, &r)?;
                    store.barrier().await.map_err(|e| {
                        Visit::Store(StoreError::Corrupt {
                            tree: "recon_repairs",
                            detail: e.to_string(),
                        })
                    })?;
                    let r = self.finish_repair(client, &ident, r).await?;
                    Judged {
                        status: if r.state == RepairState::Cancelled {
                            ReconStatus::Repaired
                        } else {
                            ReconStatus::Drift
                        },
                        action: match r.state {
                            RepairState::Cancelled => format!(
                                "Stripe held {excess} units more than meterd: its late usage arrived after the repair; the repair {ident} ({} units) was cancelled",
                                r.value
                            ),
                            _ => format!(
                                "Stripe holds {excess} units more than meterd; cancelling the repair {ident} is pending: {}",
                                r.last_error.as_deref().unwrap_or("")
                            ),
                        },
                        stripe,
                    }
                }
                _ => Judged {
                    status: ReconStatus::Unrepairable,
                    action: format!(
                        "Stripe holds {excess} units more than meterd, and no event of meterd's can be shown to be the excess: reported, nothing cancelled.{reported}"
                    ),
                    stripe,
                },
            }
        } else {
            let missing = expected - theirs;
            if w.repair.is_some() || was_repaired {
                Judged {
                    status: ReconStatus::Unrepairable,
                    action: format!(
                        "Stripe lacks {missing} units (has {theirs}, meterd {expected}) and this window was repaired once already ({}): reported, not repaired twice.{reported}",
                        w.repair.as_deref().unwrap_or("")
                    ),
                    stripe,
                }
            } else if *start < now - STRIPE_TIMESTAMP_WINDOW_MS {
                Judged {
                    status: ReconStatus::Unrepairable,
                    action: format!(
                        "Stripe lacks {missing} units, but the window is older than Stripe accepts meter events (35 days): reported.{reported}"
                    ),
                    stripe,
                }
            } else {
                let ident = crate::identifier::repair(account, w.first_seq);
                let r = Repair {
                    account: account.as_str().to_owned(),
                    meter: meter.clone(),
                    window_start_ms: *start,
                    kind: RepairKind::Resend,
                    event_name: event_name.to_owned(),
                    customer: customer.to_owned(),
                    value: missing,
                    timestamp_s: start.div_euclid(1000),
                    state: RepairState::Pending,
                    created_ms: now,
                    sent_ms: None,
                    last_error: None,
                };
                // Durable before Stripe hears of it: a restart sends the same event again.
                store.put_repair(&ident, &r)?;
                w.repair = Some(ident.clone());
                let cursor = store.recon_cursor(account)?.unwrap_or(0);
                store.put_recon_windows(
                    account,
                    cursor,
                    &[(meter.clone(), *start, w.clone())],
                    &[],
                )?;
                store.barrier().await.map_err(|e| {
                    Visit::Store(StoreError::Corrupt {
                        tree: "recon_repairs",
                        detail: e.to_string(),
                    })
                })?;
                let state = self.finish_repair(client, &ident, r).await?;
                let action = match state.state {
                    RepairState::Sent => {
                        format!("Stripe lacked {missing} units: sent again as {ident}.{reported}")
                    }
                    RepairState::Failed => format!(
                        "Stripe lacked {missing} units; the repair {ident} was refused: {}.{reported}",
                        state.last_error.as_deref().unwrap_or("")
                    ),
                    _ => format!(
                        "Stripe lacks {missing} units; the repair {ident} is pending (retried next run): {}",
                        state.last_error.as_deref().unwrap_or("")
                    ),
                };
                Judged {
                    status: if state.state == RepairState::Failed {
                        ReconStatus::Unrepairable
                    } else {
                        ReconStatus::Repaired
                    },
                    action,
                    stripe,
                }
            }
        };
        w.stripe = verdict.stripe;
        w.checked_ms = Some(now);
        w.checks = w.checks.saturating_add(1);
        let drift = theirs.abs_diff(expected).max(theirs.abs_diff(w.local));
        if drift > 0 && !w.alert && self.past_threshold(meter, drift, w.local) {
            w.alert = true;
            if let Some(r) = &mut self.run {
                r.alerts += 1;
            }
            tracing::warn!(
                account = %account,
                meter = %meter,
                window_start_ms = start,
                local = w.local,
                stripe = theirs,
                status = verdict.status.as_str(),
                "reconciliation drift"
            );
        }
        w.status = verdict.status;
        w.action = verdict.action;
        if let Some(r) = &mut self.run {
            r.windows += 1;
            match w.status {
                ReconStatus::Ok => r.ok += 1,
                ReconStatus::Drift => r.drift += 1,
                ReconStatus::Repaired => r.repaired += 1,
                ReconStatus::Unrepairable => r.unrepairable += 1,
                ReconStatus::Unchecked => {}
            }
        }
        Ok(w)
    }

    fn past_threshold(&self, meter: &str, drift: u64, local: u64) -> bool {
        let s = &self.args.settings;
        if s.money_meters.iter().any(|m| m == meter) {
            return true;
        }
        u128::from(drift) * 100 >= u128::from(s.alert_percent) * u128::from(local.max(1))
    }

    /// Carries a `Pending` repair (send) or a `Cancelling` one (cancel) to Stripe, and
    /// records the outcome. A call that may be retried leaves it as it was.
    async fn finish_repair(
        &mut self,
        client: &StripeHttp,
        ident: &str,
        mut r: Repair,
    ) -> Result<Repair, StoreError> {
        let now = self.args.clock.now_ms();
        let result = match r.state {
            RepairState::Pending => {
                client
                    .send_meter_event(&r.event_name, &r.customer, r.value, r.timestamp_s, ident)
                    .await
            }
            RepairState::Cancelling => client.cancel_meter_event(&r.event_name, ident).await,
            _ => return Ok(r),
        };
        let cancelling = r.state == RepairState::Cancelling;
        match result.map_err(|e| (e.disposition(), e)) {
            Ok(()) | Err((Disposition::AlreadyDelivered, _)) => {
                r.state = if cancelling {
                    RepairState::Cancelled
                } else {
                    RepairState::Sent
                };
                if !cancelling {
                    r.sent_ms = Some(now);
                }
                r.last_error = None;
                tracing::info!(identifier = ident, account = %r.account, units = r.value, state = r.state.as_str(), "reconciler repair");
            }
            Err((Disposition::Permanent, e)) => {
                // A refused cancel leaves the event in place: back to `Sent`.
                r.state = if cancelling {
                    RepairState::Sent
                } else {
                    RepairState::Failed
                };
                r.last_error = Some(e.to_string());
                tracing::warn!(identifier = ident, account = %r.account, error = %e, "reconciler repair refused by Stripe");
            }
            Err((Disposition::Retry { .. }, e)) => {
                r.last_error = Some(e.to_string());
                tracing::warn!(identifier = ident, account = %r.account, error = %e, "reconciler repair not carried out yet; retried next run");
            }
        }
        self.args.store.put_repair(ident, &r)?;
        Ok(r)
    }
}

/// Why an account's Stripe state is worth reading again, and the subscription to read
/// (`None`: list the customer's).
fn state_doubt(
    view: &crate::account::AccountView,
    prices: &crate::billing::PriceMap,
    now: UnixMs,
    stale: Duration,
) -> Option<(&'static str, Option<String>)> {
    let b = &view.billing;
    let held = b
        .subscription
        .as_ref()
        .filter(|s| !b.ended_subscriptions.contains(&s.id));
    let Some(s) = held else {
        // On a plan sold through Stripe, with no live subscription known: events were lost,
        // or the plan was set by hand.
        let sold = prices.plans.values().any(|p| *p == view.profile.plan);
        return sold.then_some(("plan_without_subscription", None));
    };
    let id = Some(s.id.clone());
    let status = s.status.as_str();
    if matches!(status, "canceled" | "incomplete_expired") {
        return Some(("ended_not_applied", id));
    }
    if matches!(status, "active" | "trialing" | "past_due")
        && s.plan.as_ref().is_some_and(|p| *p != view.profile.plan)
    {
        return Some(("plan_mismatch", id));
    }
    if matches!(status, "active" | "trialing")
        && s.period
            .is_some_and(|(_, end)| end.saturating_mul(1000).saturating_add(PERIOD_GRACE_MS) < now)
    {
        return Some(("period_over", id));
    }
    let last_s = [
        b.subscription_version.0,
        b.customer_version,
        b.features_version,
        b.payment_version,
        b.invoices.first().map_or(0, |i| i.event_created_s),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let stale_ms = i64::try_from(stale.as_millis()).unwrap_or(i64::MAX);
    (last_s.saturating_mul(1000).saturating_add(stale_ms) < now).then_some(("quiet", id))
}

impl ReconcilerState {
    /// One linked customer of the state pass; false when the pass (and so the run) is done.
    async fn state_step(&mut self, client: &StripeHttp) -> Result<bool, ActorProcessingErr> {
        let Some(cursor) = self.state_pass.clone() else {
            return Ok(false);
        };
        let Some((customer, account)) = self
            .args
            .store
            .linked_customers(cursor.as_deref(), 1)?
            .into_iter()
            .next()
        else {
            self.state_pass = None;
            self.next_state_ms = self.args.clock.now_ms().saturating_add(STATE_EVERY_MS);
            return Ok(false);
        };
        self.state_pass = Some(Some(customer.clone()));
        match self.check_state(client, &customer, &account).await {
            Ok(()) => Ok(true),
            Err(Visit::Stripe(e)) => {
                tracing::warn!(account = %account, error = %e, "reconciler: Stripe did not answer; the state pass stops here and runs again next time");
                self.state_pass = None;
                Ok(false)
            }
            Err(Visit::Store(e)) => Err(e.into()),
        }
    }

    /// Re-reads the account's subscription from Stripe if its state looks inconsistent or
    /// stale, and applies what Stripe holds now as an event would (`reread_…`).
    async fn check_state(
        &mut self,
        client: &StripeHttp,
        customer: &str,
        account: &AccountId,
    ) -> Result<(), Visit> {
        let Some(stale) = self.args.settings.state_stale else {
            return Ok(());
        };
        let view = match self.args.accounts.get(account).await {
            Ok(v) => v,
            Err(AccountError::UnknownAccount(_)) => return Ok(()),
            Err(e) => {
                tracing::warn!(account = %account, error = %e, "reconciler: cannot read the account; its state is checked next time");
                return Ok(());
            }
        };
        if view.profile.stripe_customer_id.as_deref() != Some(customer) {
            return Ok(());
        }
        if let Some(r) = &mut self.run {
            r.state_checked += 1;
        }
        let now = self.args.clock.now_ms();
        let Some((reason, sub)) = state_doubt(&view, &self.args.settings.prices, now, stale) else {
            return Ok(());
        };
        self.read_pace().await;
        let read = match &sub {
            Some(id) => client.subscription(id).await.map(|s| vec![s]),
            None => client.customer_subscriptions(customer).await,
        };
        let subs = match read {
            Ok(s) => s,
            Err(e) if matches!(e.disposition(), Disposition::Permanent) => {
                tracing::warn!(account = %account, reason, error = %e, "reconciler: Stripe refused to read the account's subscription; reported, nothing changed");
                return Ok(());
            }
            Err(e) => return Err(Visit::Stripe(e)),
        };
        // The subscription to apply: the one read, or the customer's newest live one of a
        // configured plan. None: reported, not guessed.
        let plan_of = |s: &serde_json::Value| {
            s["items"]["data"].as_array().is_some_and(|items| {
                items.iter().any(|i| {
                    i["price"]["id"]
                        .as_str()
                        .or_else(|| i["price"].as_str())
                        .is_some_and(|p| self.args.settings.prices.plans.contains_key(p))
                })
            })
        };
        let chosen = match &sub {
            Some(_) => subs.into_iter().next(),
            None => subs
                .into_iter()
                .filter(|s| {
                    !matches!(
                        s["status"].as_str(),
                        Some("canceled" | "incomplete_expired" | "incomplete")
                    ) && plan_of(s)
                })
                .max_by_key(|s| s["created"].as_i64().unwrap_or(0)),
        };
        let Some(obj) = chosen else {
            tracing::warn!(account = %account, customer, reason, "reconciler: the account's plan is sold through Stripe but its customer has no live subscription of a configured plan; reported, nothing changed");
            return Ok(());
        };
        let now_s = now.div_euclid(1000);
        let ended = matches!(
            obj["status"].as_str(),
            Some("canceled" | "incomplete_expired")
        );
        let sub_id = obj["id"].as_str().unwrap_or_default().to_owned();
        let event_type = if ended {
            "customer.subscription.deleted"
        } else {
            "customer.subscription.updated"
        };
        let event = serde_json::json!({
            "id": format!("reread_{sub_id}_{now_s}"),
            "object": "event",
            "type": event_type,
            "created": now_s,
            "data": {"object": obj},
        });
        let (_, change) = match crate::billing::interpret(&event, &self.args.settings.prices) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(account = %account, subscription = %sub_id, error = %e, "reconciler: Stripe's subscription could not be read; reported, nothing changed");
                return Ok(());
            }
        };
        let sub_customer = match &change {
            crate::billing::StripeChange::Subscription { info, .. } => info.customer.clone(),
            _ => None,
        };
        let cmd = crate::account::StripeCmd {
            event_id: format!("reread_{sub_id}_{now_s}"),
            event_type: event_type.to_owned(),
            created_s: now_s,
            change,
            fallback_plan: self.args.settings.fallback_plan.clone(),
            customer: sub_customer,
            money: self.args.settings.money,
        };
        match self.args.accounts.stripe(account, cmd).await {
            Ok(r) => {
                if let Some(run) = &mut self.run {
                    run.state_reread += 1;
                }
                tracing::info!(account = %account, subscription = %sub_id, reason, outcome = ?r.outcome, "reconciler: re-read the account's subscription from Stripe");
            }
            Err(e) => {
                tracing::warn!(account = %account, subscription = %sub_id, reason, error = %e, "reconciler: the subscription read from Stripe was not applied");
            }
        }
        Ok(())
    }
}

/// Why a visit stopped.
enum Visit {
    Stripe(StripeCallError),
    Store(StoreError),
}

impl From<StoreError> for Visit {
    fn from(e: StoreError) -> Visit {
        Visit::Store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_hours_unless_the_aggregation_window_does_not_divide_one() {
        assert_eq!(window_s_for(0), 3_600);
        assert_eq!(window_s_for(60), 3_600);
        assert_eq!(window_s_for(3_600), 3_600);
        assert_eq!(window_s_for(4_800), 86_400);
        assert_eq!(window_s_for(7_200), 86_400);
        assert_eq!(window_s_for(86_400), 86_400);
    }
}
