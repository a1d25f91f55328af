//! Aggregation windows: which queued entries are billable now, and merging the entries of one
//! account, meter and window into one batch, fixed durably before its first send.

use super::*;

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

/// The entries of one account, meter and closed window, found by a scan.
pub(super) struct Group {
    pub(super) account: AccountId,
    pub(super) meter: String,
    pub(super) window_start: UnixMs,
    pub(super) window_ms: i64,
    pub(super) members: Vec<QueuedRecord>,
}

/// An account's leading entries (from its first queued key up to `upto`), all waiting for
/// aggregation windows that are still open. Later passes skip them, saving the work of
/// reading them again, until `closes` (the earliest of their windows closes) or until the
/// record is [`MEMO_TTL`] old. New entries of an account come after its last one, so they
/// are read; an entry queued again inside the run (recovery, a revive) waits at most the TTL.
#[derive(Clone)]
pub(super) struct WaitingRun {
    pub(super) upto: u64,
    pub(super) closes: UnixMs,
    pub(super) count: usize,
    pub(super) since: tokio::time::Instant,
}

/// What one scan found.
#[derive(Default)]
pub(super) struct Scan {
    /// Records due now that are sent as they are (entries of pairs without aggregation,
    /// entries that may have been sent already, batches).
    pub(super) due: Vec<QueuedRecord>,
    /// Closed windows to merge.
    pub(super) groups: Vec<Group>,
}

/// A record about to be sent.
pub(super) struct Candidate {
    pub(super) account: AccountId,
    pub(super) seq: u64,
    pub(super) record: OutboxRecord,
    /// As read from the queue (an entry, not a batch formed this tick).
    pub(super) queued: Option<QueuedRecord>,
}

/// What the outbox needs to know about an account (`None`: it did not answer).
#[derive(Clone)]
pub(super) struct AccountInfo {
    pub(super) customer: Option<String>,
    pub(super) period: Period,
}

impl OutboxState {
    /// Reads the queue from the cursor: records due as they are, and the entries of closed
    /// aggregation windows grouped by account, meter and window. Stops after `batch` due
    /// records or `SCAN_LIMIT` reads; the next tick continues there (wrapping at the end).
    pub(super) fn scan(&mut self, now: UnixMs) -> Result<Scan, ActorProcessingErr> {
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
    pub(super) async fn merge(
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
        for (start, all) in parts {
            // Units past u64 cannot be one meter event: such a part splits into runs
            // whose sums fit (in order, so a re-run splits the same way).
            for members in runs_that_fit(all, |q| q.record.item.value) {
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
                    .try_fold(0u64, |s, q| s.checked_add(q.record.item.value))
                    .unwrap_or(u64::MAX);
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
                if self.args.store.form_batch(
                    &g.account,
                    &members,
                    item.clone(),
                    g.window_ms,
                    now,
                )? {
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
        }
        Ok(())
    }

    /// The account's Stripe customer and billing period, looked up once per tick.
    pub(super) async fn info(
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
}

/// Splits `members` (in order) into consecutive runs whose values sum within `u64`.
fn runs_that_fit<T>(members: Vec<T>, value: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut sum = 0u64;
    for m in members {
        let v = value(&m);
        match (sum.checked_add(v), runs.last_mut()) {
            (Some(s), Some(run)) => {
                sum = s;
                run.push(m);
            }
            _ => {
                sum = v;
                runs.push(vec![m]);
            }
        }
    }
    runs
}

#[cfg(test)]
mod runs_tests {
    use super::runs_that_fit;

    #[test]
    fn runs_split_only_where_the_sum_would_pass_u64() {
        let half = u64::MAX / 2;
        let runs = runs_that_fit(vec![1, 2, 3], |v| *v);
        assert_eq!(runs, vec![vec![1, 2, 3]]);
        let runs = runs_that_fit(vec![half, half, 2, 5, u64::MAX], |v| *v);
        assert_eq!(runs, vec![vec![half, half], vec![2, 5], vec![u64::MAX]]);
        assert!(runs_that_fit(Vec::<u64>::new(), |v| *v).is_empty());
    }
}
