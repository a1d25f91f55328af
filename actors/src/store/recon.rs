//! The reconciler's trees: per-window comparisons (`recon`), repairs (`recon_repairs`), the
//! accounts to visit (`recon_dirty`) and runs (`recon_runs`).
//!
//! - `recon`: `account 0x00` → the last ledger seq summed into windows (8 bytes), and
//!   `account 0x00 meter 0x00 start_ms_be64` → [`ReconWindow`]. A window's sums and the
//!   account's cursor change in one atomic batch of this one tree, so a crash never counts an
//!   entry twice or not at all.
//! - `recon_repairs`: repair identifier → [`Repair`], written durably before Stripe is called.
//! - `recon_dirty`: `account` → a unique mark (sled's `generate_id`, 8 bytes), written each
//!   time the outbox delivers (or dead-letters) something of the account: the accounts a run
//!   visits. Cleared with a compare-and-swap, so a delivery during a visit keeps it.
//! - `recon_runs`: run id (8 bytes) → [`ReconRun`]; the newest 100 are kept.

use super::codec::{account_prefix, dec, enc};
use super::records::{Freeze, v1};
use super::{Store, StoreError};
use crate::model::{AccountId, UnixMs};

/// What a window's comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconStatus {
    /// Not compared yet (not old enough, or its usage is still queued).
    Unchecked,
    Ok,
    /// Different, left to the outbox or the operator for now (dead letters, usage still
    /// queued); compared again next run.
    Drift,
    /// meterd sent a repair (units Stripe lacked, or a cancel of its own repair); compared
    /// again next run to verify it.
    Repaired,
    /// Different, and nothing meterd can do without guessing: reported.
    Unrepairable,
}

impl ReconStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReconStatus::Unchecked => "unchecked",
            ReconStatus::Ok => "ok",
            ReconStatus::Drift => "drift",
            ReconStatus::Repaired => "repaired",
            ReconStatus::Unrepairable => "unrepairable",
        }
    }

    pub fn parse(s: &str) -> Option<ReconStatus> {
        [
            ReconStatus::Unchecked,
            ReconStatus::Ok,
            ReconStatus::Drift,
            ReconStatus::Repaired,
            ReconStatus::Unrepairable,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// One account, meter and window: meterd's billable units in it and what Stripe said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconWindow {
    /// 3,600 (an hour) or 86,400 (a UTC day).
    pub window_s: u32,
    /// Billable units of the ledger whose usage time is in the window.
    pub local: u64,
    /// The window's first and last billable entries (0 when it has none: Stripe-only usage).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Stripe's aggregated value at the last comparison.
    pub stripe: Option<u64>,
    pub status: ReconStatus,
    /// What was done or why not, in words.
    pub action: String,
    pub checked_ms: Option<UnixMs>,
    pub checks: u32,
    /// The identifier of this window's repair, if one was made (never two).
    pub repair: Option<String>,
    /// The drift was past the alert threshold.
    pub alert: bool,
}

impl ReconWindow {
    pub fn new(window_s: u32) -> ReconWindow {
        ReconWindow {
            window_s,
            local: 0,
            first_seq: 0,
            last_seq: 0,
            stripe: None,
            status: ReconStatus::Unchecked,
            action: String::new(),
            checked_ms: None,
            checks: 0,
            repair: None,
            alert: false,
        }
    }
}

/// What a repair does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairKind {
    /// Sends the units Stripe lacks as one meter event under the repair identifier.
    Resend,
}

/// Where a repair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairState {
    /// Recorded; the meter event may or may not have reached Stripe (sent again, under the
    /// same identifier and idempotency key, after a restart).
    Pending,
    /// Stripe accepted the meter event.
    Sent,
    /// Stripe refused it for good.
    Failed,
    /// meterd asked Stripe to cancel it (Stripe held it in excess); asked again after a
    /// restart, under the same idempotency key.
    Cancelling,
    /// Stripe accepted the cancel.
    Cancelled,
}

impl RepairState {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairState::Pending => "pending",
            RepairState::Sent => "sent",
            RepairState::Failed => "failed",
            RepairState::Cancelling => "cancelling",
            RepairState::Cancelled => "cancelled",
        }
    }
}

/// One repair, keyed by its meter event identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub account: String,
    pub meter: String,
    pub window_start_ms: UnixMs,
    pub kind: RepairKind,
    pub event_name: String,
    pub customer: String,
    pub value: u64,
    /// The meter event's timestamp (unix seconds, inside the window).
    pub timestamp_s: i64,
    pub state: RepairState,
    pub created_ms: UnixMs,
    pub sent_ms: Option<UnixMs>,
    pub last_error: Option<String>,
}

/// One reconciliation run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconRun {
    pub id: u64,
    /// `schedule` or `admin`.
    pub trigger: String,
    pub started_ms: UnixMs,
    /// Windows ending at or before this are compared (start minus the lag).
    pub upto_ms: UnixMs,
    /// The last account finished (a restarted run continues after it).
    pub after: Option<String>,
    pub finished_ms: Option<UnixMs>,
    pub accounts: u64,
    pub windows: u64,
    pub ok: u64,
    pub drift: u64,
    pub repaired: u64,
    pub unrepairable: u64,
    /// Stripe reads made (event summary pages, subscriptions).
    pub reads: u64,
    pub alerts: u64,
    /// The state pass: linked accounts checked, and those whose subscription was re-read
    /// from Stripe and applied.
    pub state_checked: u64,
    pub state_reread: u64,
}

#[derive(Debug, bincode::Encode, bincode::Decode)]
enum StoredReconWindow {
    V1(v1::ReconWindow),
}

#[derive(Debug, bincode::Encode, bincode::Decode)]
enum StoredRepair {
    V1(v1::Repair),
}

#[derive(Debug, bincode::Encode, bincode::Decode)]
enum StoredReconRun {
    V1(v1::ReconRun),
}

pub(super) fn encode_recon_window(w: &ReconWindow) -> Result<Vec<u8>, StoreError> {
    enc(&StoredReconWindow::V1(Freeze::freeze(w)), "recon")
}

pub(super) fn decode_recon_window(b: &[u8]) -> Result<ReconWindow, StoreError> {
    match dec::<StoredReconWindow>(b, "recon")? {
        StoredReconWindow::V1(w) => Ok(w.thaw()),
    }
}

pub(super) fn encode_repair(r: &Repair) -> Result<Vec<u8>, StoreError> {
    enc(&StoredRepair::V1(Freeze::freeze(r)), "recon_repairs")
}

pub(super) fn decode_repair(b: &[u8]) -> Result<Repair, StoreError> {
    match dec::<StoredRepair>(b, "recon_repairs")? {
        StoredRepair::V1(r) => Ok(r.thaw()),
    }
}

pub(super) fn encode_recon_run(r: &ReconRun) -> Result<Vec<u8>, StoreError> {
    enc(&StoredReconRun::V1(Freeze::freeze(r)), "recon_runs")
}

pub(super) fn decode_recon_run(b: &[u8]) -> Result<ReconRun, StoreError> {
    match dec::<StoredReconRun>(b, "recon_runs")? {
        StoredReconRun::V1(r) => Ok(r.thaw()),
    }
}

/// Runs kept in `recon_runs`.
const RUNS_KEPT: usize = 100;

fn window_key(account: &AccountId, meter: &str, start_ms: UnixMs) -> Vec<u8> {
    let mut k = account_prefix(account);
    k.extend_from_slice(meter.as_bytes());
    k.push(0);
    k.extend_from_slice(&u64::try_from(start_ms.max(0)).unwrap_or(0).to_be_bytes());
    k
}

fn be_u64(b: &[u8], tree: &'static str) -> Result<u64, StoreError> {
    let arr: [u8; 8] = b.try_into().map_err(|_| StoreError::Corrupt {
        tree,
        detail: "value is not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// A window read back with its key parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedWindow {
    pub account: AccountId,
    pub meter: String,
    pub start_ms: UnixMs,
    pub window: ReconWindow,
}

fn split_window_key(k: &[u8]) -> Result<(AccountId, String, UnixMs), StoreError> {
    let bad = || StoreError::Corrupt {
        tree: "recon",
        detail: "malformed window key".into(),
    };
    let sep = k.iter().position(|b| *b == 0).ok_or_else(bad)?;
    let account = std::str::from_utf8(&k[..sep])
        .ok()
        .and_then(|s| AccountId::parse(s).ok())
        .ok_or_else(bad)?;
    let rest = &k[sep + 1..];
    if rest.len() < 9 || rest[rest.len() - 9] != 0 {
        return Err(bad());
    }
    let meter = std::str::from_utf8(&rest[..rest.len() - 9])
        .map_err(|_| bad())?
        .to_owned();
    let start = be_u64(&rest[rest.len() - 8..], "recon")?;
    Ok((account, meter, i64::try_from(start).map_err(|_| bad())?))
}

impl Store {
    /// The last ledger seq of `account` summed into its windows (`None`: never visited).
    pub fn recon_cursor(&self, account: &AccountId) -> Result<Option<u64>, StoreError> {
        self.inner
            .recon
            .get(account_prefix(account))?
            .map(|v| be_u64(&v, "recon"))
            .transpose()
    }

    /// One window (`None`: no usage or comparison recorded there).
    pub fn recon_window(
        &self,
        account: &AccountId,
        meter: &str,
        start_ms: UnixMs,
    ) -> Result<Option<ReconWindow>, StoreError> {
        self.inner
            .recon
            .get(window_key(account, meter, start_ms))?
            .map(|v| decode_recon_window(&v))
            .transpose()
    }

    /// Every window of `account`, in (meter, start) order.
    pub fn recon_windows_of(&self, account: &AccountId) -> Result<Vec<KeyedWindow>, StoreError> {
        let prefix = account_prefix(account);
        let mut out = Vec::new();
        for kv in self.inner.recon.scan_prefix(&prefix) {
            let (k, v) = kv?;
            if k.len() == prefix.len() {
                continue; // the cursor
            }
            let (account, meter, start_ms) = split_window_key(&k)?;
            out.push(KeyedWindow {
                account,
                meter,
                start_ms,
                window: decode_recon_window(&v)?,
            });
        }
        Ok(out)
    }

    /// Writes windows and the account's cursor in one atomic batch, and deletes `remove`.
    pub fn put_recon_windows(
        &self,
        account: &AccountId,
        cursor: u64,
        windows: &[(String, UnixMs, ReconWindow)],
        remove: &[(String, UnixMs)],
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (meter, start, w) in windows {
            b.insert(window_key(account, meter, *start), encode_recon_window(w)?);
        }
        for (meter, start) in remove {
            b.remove(window_key(account, meter, *start));
        }
        b.insert(account_prefix(account), &cursor.to_be_bytes());
        self.inner.recon.apply_batch(b)?;
        Ok(())
    }

    /// Windows from `after` (exclusive: account, meter, start) in key order, filtered by
    /// account and status, at most `limit`.
    pub fn recon_windows(
        &self,
        account: Option<&AccountId>,
        status: Option<ReconStatus>,
        after: Option<(&AccountId, &str, UnixMs)>,
        limit: usize,
    ) -> Result<Vec<KeyedWindow>, StoreError> {
        let from = match (after, account) {
            (Some((a, m, s)), _) => {
                let mut k = window_key(a, m, s);
                k.push(0);
                k
            }
            (None, Some(a)) => account_prefix(a),
            (None, None) => Vec::new(),
        };
        let mut out = Vec::new();
        for kv in self.inner.recon.range(from..) {
            let (k, v) = kv?;
            if let Some(a) = account
                && !k.starts_with(&account_prefix(a))
            {
                break;
            }
            if k.last() == Some(&0) && k.iter().filter(|b| **b == 0).count() == 1 {
                continue; // a cursor: `account 0x00`
            }
            let (acct, meter, start_ms) = split_window_key(&k)?;
            let window = decode_recon_window(&v)?;
            if status.is_some_and(|s| s != window.status) {
                continue;
            }
            out.push(KeyedWindow {
                account: acct,
                meter,
                start_ms,
                window,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Marks `account` for the next reconciliation run (the outbox delivered or dead-lettered
    /// something of it).
    pub(super) fn mark_recon_dirty(&self, account: &AccountId) -> Result<(), StoreError> {
        let mark = self.inner.db.generate_id()?;
        self.inner
            .recon_dirty
            .insert(account.as_str().as_bytes(), &mark.to_be_bytes())?;
        Ok(())
    }

    /// Marks every account with a ledger dirty, once (the first run over a data dir written by
    /// a release without the reconciler). Returns how many.
    pub fn seed_recon_dirty(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        let accounts: Vec<AccountId> = self.ledger_accounts().collect::<Result<_, _>>()?;
        for a in accounts {
            self.mark_recon_dirty(&a)?;
            n += 1;
        }
        Ok(n)
    }

    /// Up to `limit` dirty accounts after `after`, with the mark each had.
    pub fn recon_dirty(
        &self,
        after: Option<&AccountId>,
        limit: usize,
    ) -> Result<Vec<(AccountId, Vec<u8>)>, StoreError> {
        let from: Vec<u8> = match after {
            Some(a) => {
                let mut k = a.as_str().as_bytes().to_vec();
                k.push(0);
                k
            }
            None => Vec::new(),
        };
        let mut out = Vec::new();
        for kv in self.inner.recon_dirty.range(from..).take(limit) {
            let (k, v) = kv?;
            let a = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| AccountId::parse(s).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    tree: "recon_dirty",
                    detail: "malformed account key".into(),
                })?;
            out.push((a, v.to_vec()));
        }
        Ok(out)
    }

    /// Clears `account`'s dirty mark if it is still `mark` (a delivery since keeps it).
    pub fn clear_recon_dirty(&self, account: &AccountId, mark: &[u8]) -> Result<(), StoreError> {
        let _ = self.inner.recon_dirty.compare_and_swap(
            account.as_str().as_bytes(),
            Some(mark),
            None::<&[u8]>,
        )?;
        Ok(())
    }

    /// How many accounts are marked for the next run.
    pub fn recon_dirty_count(&self) -> usize {
        self.inner.recon_dirty.len()
    }

    pub fn put_repair(&self, identifier: &str, r: &Repair) -> Result<(), StoreError> {
        self.inner
            .recon_repairs
            .insert(identifier.as_bytes(), encode_repair(r)?)?;
        Ok(())
    }

    pub fn repair(&self, identifier: &str) -> Result<Option<Repair>, StoreError> {
        self.inner
            .recon_repairs
            .get(identifier.as_bytes())?
            .map(|v| decode_repair(&v))
            .transpose()
    }

    /// Repairs still in flight (`Pending` or `Cancelling`): a restart finishes them.
    pub fn unfinished_repairs(&self) -> Result<Vec<(String, Repair)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.recon_repairs.iter() {
            let (k, v) = kv?;
            let r = decode_repair(&v)?;
            if matches!(r.state, RepairState::Pending | RepairState::Cancelling) {
                out.push((String::from_utf8_lossy(&k).into_owned(), r));
            }
        }
        Ok(out)
    }

    /// Drops repairs created before `cutoff_ms` that are settled.
    pub fn prune_repairs(&self, cutoff_ms: UnixMs) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.inner.recon_repairs.iter() {
            let (k, v) = kv?;
            let r = decode_repair(&v)?;
            if r.created_ms < cutoff_ms
                && !matches!(r.state, RepairState::Pending | RepairState::Cancelling)
            {
                self.inner.recon_repairs.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn put_recon_run(&self, r: &ReconRun) -> Result<(), StoreError> {
        self.inner
            .recon_runs
            .insert(r.id.to_be_bytes(), encode_recon_run(r)?)?;
        while self.inner.recon_runs.len() > RUNS_KEPT {
            if self.inner.recon_runs.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// The newest runs, newest first.
    pub fn recon_runs(&self, limit: usize) -> Result<Vec<ReconRun>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.recon_runs.iter().rev().take(limit) {
            let (_, v) = kv?;
            out.push(decode_recon_run(&v)?);
        }
        Ok(out)
    }

    /// Units of `meter` with usage in `[start_ms, end_ms)` among the records of entries
    /// `first..=last` of `account` still in the outbox queue, and among its dead letters (a
    /// batch counts whole: its members share its window).
    pub fn outbox_units_in(
        &self,
        account: &AccountId,
        meter: &str,
        (first, last): (u64, u64),
        (start_ms, end_ms): (UnixMs, UnixMs),
    ) -> Result<(u64, u64), StoreError> {
        let mut sums = [0u64; 2];
        for (i, tree) in [&self.inner.outbox, &self.inner.dead]
            .into_iter()
            .enumerate()
        {
            let from = super::codec::ledger_key(account, first);
            let to = super::codec::ledger_key(account, last);
            for kv in tree.range(from..=to) {
                let (_, v) = kv?;
                let r = super::codec::decode_outbox(&v)?;
                if r.item.meter == meter && (start_ms..end_ms).contains(&r.item.at_ms) {
                    sums[i] = sums[i].saturating_add(r.item.value);
                }
            }
        }
        Ok((sums[0], sums[1]))
    }

    /// Stripe's error reports about entries `first..=last` of `account`: `(seq, code)`.
    pub fn meter_errors_in(
        &self,
        account: &AccountId,
        (first, last): (u64, u64),
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let from = super::codec::ledger_key(account, first);
        let to = super::codec::ledger_key(account, last);
        let mut out = Vec::new();
        for kv in self.inner.meter_errors.range(from..=to) {
            let (k, v) = kv?;
            let (_, seq) = super::codec::split_ledger_key(&k)?;
            out.push((seq, super::events::decode_meter_error(&v)?.code));
        }
        Ok(out)
    }

    /// The binary-searched first seq of `account` whose entry is at or after `at_ms` (entry
    /// times follow seqs, up to clock steps; a step only moves where summing starts), or
    /// `last + 1` if none is. Reads O(log n) entries.
    pub fn first_seq_at(&self, account: &AccountId, at_ms: UnixMs) -> Result<u64, StoreError> {
        let Some(last) = self.last_seq(account)? else {
            return Ok(1);
        };
        let (mut lo, mut hi) = (1u64, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.entries_after(account, mid - 1, 1)?;
            match e.first() {
                Some(e) if e.at_ms < at_ms => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{ConsumeRecord, EntryKind, LedgerEntry};
    use crate::model::Outcome;
    use crate::store::{StoreConfig, SyncMode};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Flush,
            cache_capacity_bytes: 16 << 20,
        })
        .unwrap();
        (dir, store)
    }

    fn consume(seq: u64, at_ms: UnixMs) -> LedgerEntry {
        LedgerEntry {
            seq,
            at_ms,
            kind: EntryKind::Consume(ConsumeRecord {
                meter: "tokens".into(),
                quantity: 1,
                idempotency_key: format!("k{seq}"),
                digest: [0; 32],
                metadata: Vec::new(),
                outcome: Outcome::Allowed,
                billable: 1,
                credits_spent: 0,
                burns: Vec::new(),
                included: 0,
                limit: None,
                used_after: seq,
                billable_after: seq,
                credits_after: 0,
                alerts: Vec::new(),
            }),
        }
    }

    #[tokio::test]
    async fn the_first_entry_at_a_time_is_binary_searched() {
        let (_dir, store) = store();
        let a = AccountId::parse("a").unwrap();
        assert_eq!(store.first_seq_at(&a, 0).unwrap(), 1, "no ledger");
        for seq in 1..=100 {
            store
                .append_entry(&a, &consume(seq, i64::try_from(seq).unwrap() * 10))
                .unwrap();
        }
        assert_eq!(store.first_seq_at(&a, 0).unwrap(), 1);
        assert_eq!(store.first_seq_at(&a, 10).unwrap(), 1);
        assert_eq!(store.first_seq_at(&a, 11).unwrap(), 2);
        assert_eq!(store.first_seq_at(&a, 500).unwrap(), 50);
        assert_eq!(store.first_seq_at(&a, 1000).unwrap(), 100);
        assert_eq!(store.first_seq_at(&a, 1001).unwrap(), 101, "none: last + 1");
    }

    #[tokio::test]
    async fn a_dirty_mark_set_during_a_visit_survives_its_clearing() {
        let (_dir, store) = store();
        let a = AccountId::parse("a").unwrap();
        let b = AccountId::parse("b").unwrap();
        store.mark_recon_dirty(&a).unwrap();
        store.mark_recon_dirty(&b).unwrap();
        let seen = store.recon_dirty(None, 10).unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(store.recon_dirty(Some(&a), 10).unwrap()[0].0, b);
        // A delivery for `a` lands while it is visited: clearing with the old mark keeps it.
        store.mark_recon_dirty(&a).unwrap();
        store.clear_recon_dirty(&a, &seen[0].1).unwrap();
        store.clear_recon_dirty(&b, &seen[1].1).unwrap();
        let left = store.recon_dirty(None, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, a);
        assert_eq!(store.recon_dirty_count(), 1);
    }

    #[tokio::test]
    async fn windows_and_the_cursor_change_together_and_list_by_filter() {
        let (_dir, store) = store();
        let a = AccountId::parse("a").unwrap();
        let b = AccountId::parse("b").unwrap();
        assert_eq!(store.recon_cursor(&a).unwrap(), None);
        let mut w = ReconWindow::new(3_600);
        w.local = 5;
        store
            .put_recon_windows(
                &a,
                7,
                &[
                    ("tokens".into(), 0, w.clone()),
                    ("tokens".into(), 3_600_000, w.clone()),
                ],
                &[],
            )
            .unwrap();
        w.status = ReconStatus::Ok;
        store
            .put_recon_windows(&b, 3, &[("calls".into(), 0, w.clone())], &[])
            .unwrap();
        assert_eq!(store.recon_cursor(&a).unwrap(), Some(7));
        assert_eq!(store.recon_windows_of(&a).unwrap().len(), 2);
        let all = store.recon_windows(None, None, None, 10).unwrap();
        assert_eq!(all.len(), 3, "cursors are not windows");
        let ok = store
            .recon_windows(None, Some(ReconStatus::Ok), None, 10)
            .unwrap();
        assert_eq!((ok.len(), ok[0].account.as_str()), (1, "b"));
        let after = store
            .recon_windows(None, None, Some((&a, "tokens", 0)), 10)
            .unwrap();
        assert_eq!(after.len(), 2);
        assert_eq!(after[0].start_ms, 3_600_000);
        let only_a = store.recon_windows(Some(&a), None, None, 10).unwrap();
        assert_eq!(only_a.len(), 2);
        store
            .put_recon_windows(&a, 9, &[], &[("tokens".into(), 0)])
            .unwrap();
        assert_eq!(store.recon_windows_of(&a).unwrap().len(), 1);
        assert_eq!(store.recon_cursor(&a).unwrap(), Some(9));
    }

    #[test]
    fn window_keys_split_back() {
        let a = AccountId::parse("team_1").unwrap();
        let k = window_key(&a, "tokens", 7_200_000);
        assert_eq!(
            split_window_key(&k).unwrap(),
            (a, "tokens".to_owned(), 7_200_000)
        );
        assert!(split_window_key(b"team_1\0").is_err());
    }

    #[test]
    fn statuses_parse_back() {
        for s in [
            ReconStatus::Unchecked,
            ReconStatus::Ok,
            ReconStatus::Drift,
            ReconStatus::Repaired,
            ReconStatus::Unrepairable,
        ] {
            assert_eq!(ReconStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(ReconStatus::parse("fine"), None);
    }
}
