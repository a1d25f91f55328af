//! The sled store: key spaces, versioned records, and the one group-commit flusher.
//!
//! This module owns every byte meterd writes to disk. It must never make a caller wait for a
//! flush inside an actor: [`Store::commit`] hands a callback to the flusher thread, which runs
//! it once everything inserted before the call is durable.
//!
//! Key spaces (trees):
//! - `ledger`:   `account_id 0x00 seq_be64` → [`StoredEntry`]. Append-only. The source of truth.
//! - `accounts`: `account_id` → [`StoredSnapshot`]. Derived, written lazily.
//! - `idem`:     `account_id 0x00 op key` → [`StoredIdem`]: the idempotency records kept for
//!   good (top-ups, Stripe events). Derived, written lazily.
//! - `idem@{start}-{end}` (generations): the same shape, for every other idempotency record
//!   written for a time in `[start, end)`; the janitor drops a whole generation once it is
//!   older than the retention (see `idem`).
//! - `notify`:   `at_ms_be account_id 0x00 seq_be idx_be` → [`StoredNotification`]: alerts
//!   queued for outgoing notification, in time order. Derived, written lazily, rebuilt from
//!   the ledger tail; a notifier (a later component) deletes what it delivered.
//! - `webhooks`: `event id` → [`WebhookRecord`]: the durable log of Stripe events (status,
//!   attempts, next retry), written before the webhook is acknowledged. Pruned after the
//!   retention period.
//! - `webhook_bodies`: `event id` → the raw, verified body (parsed only when applied).
//! - `customers`: `Stripe customer id` → account id. Written before the ledger entry that
//!   links the customer; checked again at account recovery.
//! - `meter_errors`: `account_id 0x00 seq_be64` → [`MeterErrorRecord`]: meter events Stripe
//!   accepted but then reported invalid (`v1.billing.meter.error_report_triggered`).
//! - `outbox`, `dead`: `account_id 0x00 seq_be64` → [`OutboxRecord`]: billable entries (or
//!   batches of them, keyed by the first) on their way to Stripe, and the dead letters.
//! - `sent`:     same key → delivery time: what Stripe has (recovery skips it).
//! - `batched`:  same key → the batch's first seq and formation time: entries merged into a
//!   batch (recovery skips them). `sent` and `batched` are pruned after 40 days once the
//!   account's snapshot covers the entry.
//! - `hashed_ids`: `h{40 hex}` → account id: the accounts whose meter event identifiers may
//!   carry a hash of the id (see [`crate::identifier`]), written with the account's creation.
//! - `topups`:   `topup id` → [`PendingTopUp`]: the top-up Checkout Sessions meterd created
//!   (account, package, price, currency, customer), written before the session is created;
//!   a session completion credits only against its record.
//! - `payments`: `payment intent` → [`TopUpPayment`]: the top-ups credited, by the payment that
//!   paid them (written with the credit): a refund or dispute of that payment finds its
//!   top-up, its account and its credits.
//! - `recon`, `recon_repairs`, `recon_dirty`, `recon_runs`: the reconciler's windows (with
//!   each account's summing cursor), repairs, accounts to visit and runs (see `recon`).
//! - `meta`:     `format` → the data dir's format version (see `migrate`).
//!
//! Where it lives: `ledger` (ledger, snapshots, hash index), `outbox` (the outbox family),
//! `idem` (idempotency records, in generations), `index` (the notification queue), `events` (webhook log, customers, meter
//! errors), `flusher` (group commit), `codec` (keys and versioned records), `records` (the
//! frozen stored shapes), `migrate` (the data dir's format), `golden` (golden-bytes tests).
//!
//! Durability: sled 0.34.7 deadlocks when several threads call `flush_async` at once (upstream
//! issues #1308, #1241) and its `flush` makes data safe from a process crash but not from a
//! power loss. So exactly one thread, the flusher, ever flushes, and in `fdatasync` mode it
//! also calls `fdatasync` on sled's log file after each flush, and syncs what sled never
//! does: the blob files it writes for large values (over ~128 KiB: webhook bodies, big
//! snapshots), the `blobs` directory, and once the data directory.

mod codec;
mod events;
mod flusher;
#[cfg(test)]
mod golden;
mod idem;
mod index;
mod ledger;
mod migrate;
mod outbox;
mod recon;
pub mod records;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;

pub use codec::{OutboxBatch, OutboxRecord};
pub use codec::{OutboxItem, StoredEntry, StoredIdem, StoredNotification, StoredSnapshot};
pub use events::{
    EventSource, MeterErrorRecord, PendingTopUp, TOPUP_RETENTION, TopUpPayment, WebhookRecord,
    WebhookStatus,
};
pub use flusher::FlushStats;
use flusher::{FlushCmd, flusher_loop, open_db};
pub use outbox::{OutboxLocation, PruneCursor, PrunePlan, QueuedRecord};
pub use recon::{KeyedWindow, ReconRun, ReconStatus, ReconWindow, Repair, RepairKind, RepairState};

use crate::ledger::{AccountProfile, Balances, LedgerEntry};
use crate::model::{AccountId, UnixMs};

/// The data dir format this build writes and understands (older ones are migrated at open,
/// see `migrate`).
pub const FORMAT_VERSION: u32 = 3;

/// The tree of the hashed-identifier index.
const HASHED_IDS: &str = "hashed_ids";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt record in `{tree}`: {detail}")]
    Corrupt { tree: &'static str, detail: String },
    #[error(
        "the data dir has format {found}, newer than this build's format {FORMAT_VERSION}: it was \
         written by a newer meterd; run that release (or newer) on it"
    )]
    NewerFormat { found: u32 },
    #[error(transparent)]
    Commit(#[from] CommitError),
}

/// Why a group commit did not make data durable. Cheap to clone: one flush failure is reported
/// to every waiter of that flush.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("flush to disk failed: {0}")]
    FlushFailed(String),
    #[error("the store is closed")]
    Closed,
}

/// How far a flush goes before replies are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// sled's flush plus `fdatasync` of its log: survives power loss.
    Fdatasync,
    /// sled's flush only: survives a process crash (kill -9, panic), not a power loss.
    Flush,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub sync: SyncMode,
    pub cache_capacity_bytes: u64,
}

/// What an idempotency key belongs to; keys of different operations never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdemOp {
    Consume = 1,
    Credit = 2,
    /// A top-up, keyed by its external id (e.g. the checkout session).
    Topup = 3,
    /// A reservation, keyed by the client's idempotency key.
    Reserve = 4,
    /// The settlement (commit or release) of a reservation, keyed by the reservation's seq.
    Settle = 5,
    /// A Stripe event applied to the account, keyed by the event id.
    Stripe = 6,
}

impl IdemOp {
    /// Top-ups (a payment) and Stripe events are kept for good: Stripe, an admin replay or a
    /// backfill may bring them back long after the retention period, and they must still be
    /// recognised. Every other record expires.
    pub fn expires(self) -> bool {
        !matches!(self, IdemOp::Topup | IdemOp::Stripe)
    }
}

/// Where an idempotency key points: the ledger entry that answered it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdemRecord {
    pub seq: u64,
    pub at_ms: UnixMs,
}

/// A derived copy of an account's state up to `last_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSnapshot {
    pub profile: AccountProfile,
    pub balances: Balances,
    pub billing: crate::billing::BillingState,
    pub last_seq: u64,
}

struct Inner {
    ledger: sled::Tree,
    accounts: sled::Tree,
    db: sled::Db,
    /// Records kept for good (top-ups, Stripe events).
    idem: sled::Tree,
    /// Expiring idempotency records, in generations (see `idem`).
    idem_gens: std::sync::RwLock<idem::Generations>,
    notify: sled::Tree,
    outbox: sled::Tree,
    sent: sled::Tree,
    dead: sled::Tree,
    batched: sled::Tree,
    webhooks: sled::Tree,
    webhook_bodies: sled::Tree,
    customers: sled::Tree,
    meter_errors: sled::Tree,
    hashed_ids: sled::Tree,
    topups: sled::Tree,
    payments: sled::Tree,
    recon: sled::Tree,
    recon_repairs: sled::Tree,
    recon_dirty: sled::Tree,
    recon_runs: sled::Tree,
    /// Records in `outbox` and `dead`, counted once at open and kept as they change, so
    /// readiness and metrics never scan a tree.
    queued: AtomicI64,
    dead_count: AtomicI64,
    flush_tx: mpsc::Sender<FlushCmd>,
    failed: Arc<AtomicBool>,
    stats: Arc<FlushStats>,
    flusher: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A cheap, cloneable handle to the open store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// A read-only view of the store, for the HTTP routes: committed ledger pages, the outbox
/// lists, the webhook log and the store's health. Every write goes through an actor's handle
/// (`Accounts`, `Outbox`, `Webhooks`), so the type system keeps routes from writing.
#[derive(Clone)]
pub struct StoreReader(Store);

impl StoreReader {
    /// The store behind the view, for read-only checks inside this crate (`verify`).
    pub(crate) fn store(&self) -> &Store {
        &self.0
    }

    /// True once a flush has failed: nothing more can be acknowledged.
    pub fn has_failed(&self) -> bool {
        self.0.has_failed()
    }

    /// (queued, dead) outbox records, O(1).
    pub fn outbox_gauges(&self) -> (u64, u64) {
        self.0.outbox_gauges()
    }

    /// Up to `limit` ledger entries of `account` after `after`, in order.
    pub fn entries_after(
        &self,
        account: &AccountId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.0.entries_after(account, after, limit)
    }

    /// Queued (`dead = false`) or dead-lettered outbox records, from `after`.
    pub fn outbox_items(
        &self,
        dead: bool,
        after: Option<(AccountId, u64)>,
        limit: usize,
    ) -> Result<Vec<(AccountId, u64, OutboxRecord)>, StoreError> {
        self.0.outbox_items(dead, after, limit)
    }

    /// Counts of the webhook log by status: pending, applied, ignored, failed.
    pub fn event_counts(&self) -> Result<[u64; 4], StoreError> {
        self.0.event_counts()
    }

    /// A page of the webhook log.
    pub fn events(
        &self,
        status: Option<WebhookStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<WebhookRecord>, StoreError> {
        self.0.events(status, after, limit)
    }

    /// One event of the webhook log.
    pub fn event(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        self.0.event(id)
    }

    /// Reconciliation windows (see [`Store::recon_windows`]).
    pub fn recon_windows(
        &self,
        account: Option<&AccountId>,
        status: Option<ReconStatus>,
        after: Option<(&AccountId, &str, UnixMs)>,
        limit: usize,
    ) -> Result<Vec<KeyedWindow>, StoreError> {
        self.0.recon_windows(account, status, after, limit)
    }

    /// The newest reconciliation runs, newest first.
    pub fn recon_runs(&self, limit: usize) -> Result<Vec<ReconRun>, StoreError> {
        self.0.recon_runs(limit)
    }

    /// One repair, by its identifier.
    pub fn repair(&self, identifier: &str) -> Result<Option<Repair>, StoreError> {
        self.0.repair(identifier)
    }

    /// Accounts marked for the next reconciliation run.
    pub fn recon_dirty_count(&self) -> usize {
        self.0.recon_dirty_count()
    }

    /// Meter events Stripe reported invalid.
    pub fn meter_errors(
        &self,
        limit: usize,
    ) -> Result<Vec<(AccountId, u64, MeterErrorRecord)>, StoreError> {
        self.0.meter_errors(limit)
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Stops a multi-key change at failpoint `name` if a test armed it for `scope` (see
/// [`crate::failpoint`]); nothing without the `fault-injection` feature.
#[allow(unused_variables)]
pub(crate) fn failpoint(name: &'static str, scope: &str) -> Result<(), StoreError> {
    #[cfg(feature = "fault-injection")]
    if crate::failpoint::hit(name, scope) {
        return Err(StoreError::Corrupt {
            tree: "failpoint",
            detail: format!("stopped at {name}"),
        });
    }
    Ok(())
}

/// Opens the sled database under `path` as it is (no migration, no flusher), waiting
/// (bounded) for its lock as [`Store::open`] does: for tools and tests that inspect or edit
/// a stopped store.
pub fn open_raw(path: &std::path::Path) -> Result<sled::Db, StoreError> {
    flusher::open_db(&StoreConfig {
        path: path.to_path_buf(),
        sync: SyncMode::Flush,
        cache_capacity_bytes: 16 << 20,
    })
}

impl Store {
    /// The read-only view the HTTP routes get.
    pub fn reader(&self) -> StoreReader {
        StoreReader(self.clone())
    }

    /// Opens (or creates) the store and starts its flusher thread.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&cfg.path).map_err(|source| StoreError::Io {
            path: cfg.path.clone(),
            source,
        })?;
        let db = open_db(cfg)?;
        migrate::check_and_migrate(&db, &cfg.path)?;
        let sync_file = match cfg.sync {
            SyncMode::Fdatasync => {
                let p = cfg.path.join("db");
                Some(File::open(&p).map_err(|source| StoreError::Io { path: p, source })?)
            }
            SyncMode::Flush => None,
        };
        let extras = match cfg.sync {
            SyncMode::Fdatasync => Some(flusher::SyncExtras::new(cfg.path.clone())),
            SyncMode::Flush => None,
        };
        let (flush_tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(FlushStats::default());
        let flusher = {
            let db = db.clone();
            let failed = failed.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("meterd-flusher".into())
                .spawn(move || flusher_loop(db, sync_file, extras, rx, failed, stats))
                .map_err(|source| StoreError::Io {
                    path: cfg.path.clone(),
                    source,
                })?
        };
        let outbox = db.open_tree("outbox")?;
        let dead = db.open_tree("dead")?;
        let repaired = outbox::settle_dead_and_queued(&outbox, &dead)?;
        if repaired > 0 {
            tracing::warn!(
                repaired,
                "dead letters that were also queued (a crash while reviving or dead-lettering) left `dead`; they are retried"
            );
        }
        // The only full count: once, at open.
        let queued = AtomicI64::new(i64::try_from(outbox.len()).unwrap_or(i64::MAX));
        let dead_count = AtomicI64::new(i64::try_from(dead.len()).unwrap_or(i64::MAX));
        Ok(Store {
            inner: Arc::new(Inner {
                db: db.clone(),
                ledger: db.open_tree("ledger")?,
                accounts: db.open_tree("accounts")?,
                idem: db.open_tree("idem")?,
                idem_gens: std::sync::RwLock::new(idem::Generations::open(&db)?),
                notify: db.open_tree("notify")?,
                outbox,
                sent: db.open_tree("sent")?,
                dead,
                batched: db.open_tree("batched")?,
                webhooks: db.open_tree("webhooks")?,
                webhook_bodies: db.open_tree("webhook_bodies")?,
                customers: db.open_tree("customers")?,
                meter_errors: db.open_tree("meter_errors")?,
                hashed_ids: db.open_tree(HASHED_IDS)?,
                topups: db.open_tree("topups")?,
                payments: db.open_tree("payments")?,
                recon: db.open_tree("recon")?,
                recon_repairs: db.open_tree("recon_repairs")?,
                recon_dirty: db.open_tree("recon_dirty")?,
                recon_runs: db.open_tree("recon_runs")?,
                queued,
                dead_count,
                flush_tx,
                failed,
                stats,
                flusher: std::sync::Mutex::new(Some(flusher)),
            }),
        })
    }

    /// Runs `done` on the flusher thread once everything inserted before this call is on disk
    /// (or the flush failed). Never blocks the caller.
    pub fn commit(&self, done: impl FnOnce(Result<(), CommitError>) + Send + 'static) {
        if self.inner.failed.load(Ordering::Acquire) {
            done(Err(CommitError::FlushFailed(
                "an earlier flush failed; the store refuses further writes".into(),
            )));
            return;
        }
        if let Err(mpsc::SendError(cmd)) = self.inner.flush_tx.send(FlushCmd::Wait(Box::new(done)))
            && let FlushCmd::Wait(w) = cmd
        {
            w(Err(CommitError::Closed));
        }
    }

    /// Waits until everything inserted before this call is durable.
    pub async fn barrier(&self) -> Result<(), CommitError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commit(move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or(Err(CommitError::Closed))
    }

    /// True once a flush has failed: nothing more can be acknowledged.
    pub fn has_failed(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Final flush, then stops the flusher thread. Later commits fail with `Closed`.
    pub fn close(&self) -> Result<(), CommitError> {
        let (tx, rx) = mpsc::channel();
        if self.inner.flush_tx.send(FlushCmd::Stop(tx)).is_err() {
            return Ok(());
        }
        let r = rx.recv().unwrap_or(Err(CommitError::Closed));
        if let Ok(mut guard) = self.inner.flusher.lock()
            && let Some(h) = guard.take()
        {
            let _ = h.join();
        }
        r
    }

    // ---- ledger ----

    // ---- snapshots ----

    // ---- Stripe outbox ----

    // ---- notification queue ----

    // ---- idempotency index ----
}

#[cfg(test)]
mod tests {
    use super::idem::DEFAULT_GENERATION_MS;
    use super::*;
    use crate::ledger::{EntryKind, LedgerEntry};
    use crate::model::Period;

    /// `Store::open` waits (bounded) for the lock a just-closed store's threads may hold.
    fn open(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.to_path_buf(),
            sync: SyncMode::Fdatasync,
            cache_capacity_bytes: 16 << 20,
        })
        .unwrap()
    }

    fn sled_open(dir: &std::path::Path) -> sled::Db {
        open_raw(dir).unwrap()
    }

    fn entry(seq: u64) -> LedgerEntry {
        LedgerEntry {
            seq,
            at_ms: 5,
            kind: EntryKind::PeriodRolled {
                from: Period {
                    start_ms: 0,
                    end_ms: 1,
                },
                to: Period {
                    start_ms: 1,
                    end_ms: 2,
                },
            },
        }
    }

    #[tokio::test]
    async fn ledger_keys_sort_numerically_and_never_leak_across_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = AccountId::parse("a").unwrap();
        let ab = AccountId::parse("ab").unwrap();
        for seq in [1u64, 2, 255, 256, 70_000] {
            store.append_entry(&a, &entry(seq)).unwrap();
        }
        store.append_entry(&ab, &entry(1)).unwrap();
        let seqs: Vec<u64> = store
            .entries_after(&a, 0, 100)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 255, 256, 70_000]);
        assert_eq!(store.last_seq(&a).unwrap(), Some(70_000));
        assert_eq!(store.last_seq(&ab).unwrap(), Some(1));
        assert_eq!(
            store.last_seq(&AccountId::parse("zz").unwrap()).unwrap(),
            None
        );
        let ids: Vec<String> = store
            .ledger_accounts()
            .map(|r| r.unwrap().to_string())
            .collect();
        assert_eq!(ids, vec!["a", "ab"]);
        store.barrier().await.unwrap();
        store.close().unwrap();
    }

    #[tokio::test]
    async fn group_commit_acknowledges_every_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = AccountId::parse("acct").unwrap();
        let mut rxs = Vec::new();
        for seq in 1..=500 {
            store.append_entry(&a, &entry(seq)).unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            store.commit(move |r| {
                let _ = tx.send(r);
            });
            rxs.push(rx);
        }
        for rx in rxs {
            rx.await.unwrap().unwrap();
        }
        let flushes = store.stats().flushes.load(Ordering::Relaxed);
        assert!(flushes >= 1);
        assert_eq!(store.stats().waiters.load(Ordering::Relaxed), 500);
        store.close().unwrap();
        // After close, commits are refused rather than silently dropped.
        assert_eq!(store.barrier().await, Err(CommitError::Closed));
    }

    #[tokio::test]
    async fn data_survives_reopen_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::parse("acct").unwrap();
        {
            let store = open(dir.path());
            store.append_entry(&a, &entry(1)).unwrap();
            store
                .put_idem(&a, IdemOp::Consume, "k", IdemRecord { seq: 1, at_ms: 9 })
                .unwrap();
            store.barrier().await.unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.read_entry(&a, 1).unwrap(), Some(entry(1)));
        assert_eq!(
            store.get_idem(&a, IdemOp::Consume, "k").unwrap(),
            Some(IdemRecord { seq: 1, at_ms: 9 })
        );
        assert_eq!(store.get_idem(&a, IdemOp::Credit, "k").unwrap(), None);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn idempotency_records_expire_by_whole_generations() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_idem_generation(60_000);
        let a = AccountId::parse("acct").unwrap();
        let rec = |seq: u64, at_ms: i64| IdemRecord { seq, at_ms };
        let get = |s: &Store, op, k: &str| s.get_idem(&a, op, k).unwrap();
        // k0..k5 in the generation [0, 60 s), k6..k9 in [60 s, 120 s).
        for i in 0..10u64 {
            let at = i64::try_from(i).unwrap() * 10_000;
            store
                .put_idem(&a, IdemOp::Consume, &format!("k{i}"), rec(i, at))
                .unwrap();
        }
        // Old, but kept for good: a top-up and a Stripe event.
        store
            .put_idem(&a, IdemOp::Topup, "cs_1", rec(99, 0))
            .unwrap();
        store
            .put_idem(&a, IdemOp::Stripe, "evt_1", rec(99, 0))
            .unwrap();
        // A fresh claim of k1 at 100 s goes to the generation of its time (it must live its
        // own retention) and leaves the old one; putting the old record back (a replay)
        // returns it to its own generation: a replay does not extend its life.
        let old = store
            .swap_idem(&a, IdemOp::Consume, "k1", rec(11, 100_000))
            .unwrap();
        assert_eq!(old, Some(rec(1, 10_000)));
        assert_eq!(get(&store, IdemOp::Consume, "k1"), Some(rec(11, 100_000)));
        let claimed = store
            .swap_idem(&a, IdemOp::Consume, "k1", rec(1, 10_000))
            .unwrap();
        assert_eq!(claimed, Some(rec(11, 100_000)));
        assert_eq!(get(&store, IdemOp::Consume, "k1"), Some(rec(1, 10_000)));
        // A claim that stays (k2 claimed again at 70 s, not put back) lives in the new one.
        store
            .put_idem(&a, IdemOp::Consume, "k2", rec(12, 70_000))
            .unwrap();
        // Nothing is dropped before its generation's end.
        assert_eq!(store.expire_idem(59_999).unwrap(), (0, 0));
        assert_eq!(store.expire_idem(60_000).unwrap(), (1, 5), "k0, k1, k3..k5");
        assert_eq!(get(&store, IdemOp::Consume, "k4"), None);
        assert_eq!(get(&store, IdemOp::Consume, "k1"), None);
        assert_eq!(get(&store, IdemOp::Consume, "k2"), Some(rec(12, 70_000)));
        assert_eq!(get(&store, IdemOp::Consume, "k6"), Some(rec(6, 60_000)));
        assert!(get(&store, IdemOp::Topup, "cs_1").is_some());
        assert!(get(&store, IdemOp::Stripe, "evt_1").is_some());
        // A record for an expired time (a recovery rewriting an old entry) is not kept.
        store
            .put_idem(&a, IdemOp::Consume, "late", rec(50, 30_000))
            .unwrap();
        assert_eq!(get(&store, IdemOp::Consume, "late"), None);
        // Generations survive a reopen.
        store.barrier().await.unwrap();
        store.close().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_eq!(get(&store, IdemOp::Consume, "k9"), Some(rec(9, 90_000)));
        assert_eq!(store.expire_idem(120_000).unwrap(), (1, 5), "k2, k6..k9");
        assert_eq!(get(&store, IdemOp::Consume, "k9"), None);
        assert_eq!(store.inner.idem.len(), 2, "only the permanent ones");
        store.close().unwrap();
    }

    fn billable(meter: &str, value: u64, at_ms: i64) -> OutboxItem {
        OutboxItem {
            meter: meter.into(),
            value,
            at_ms,
            attempts: 0,
            next_at_ms: at_ms,
            last_error: None,
        }
    }

    /// The O(1) gauges agree with a full count of the trees.
    #[track_caller]
    fn gauges_match(store: &Store) {
        let counted = (
            store.inner.outbox.len() as u64,
            store.inner.dead.len() as u64,
        );
        assert_eq!(store.outbox_gauges(), counted);
    }

    fn queued_seqs(store: &Store) -> Vec<(u64, Option<u64>)> {
        gauges_match(store);
        store
            .outbox_items(false, None, 100)
            .unwrap()
            .into_iter()
            .map(|(_, s, r)| (s, r.batch.map(|b| b.last_seq)))
            .collect()
    }

    #[tokio::test]
    async fn a_batch_replaces_its_members_atomically_and_recovery_never_queues_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = AccountId::parse("acct").unwrap();
        for seq in 1..=4 {
            store
                .queue_outbox(&a, seq, &billable("tokens", seq * 10, 1_000), true)
                .unwrap();
        }
        store
            .queue_outbox(&a, 5, &billable("images", 7, 1_000), true)
            .unwrap();
        let (page, end) = store.outbox_page(None, 100).unwrap();
        assert!(end);
        assert_eq!(page.len(), 5);
        assert!(page.iter().all(|q| !q.record.attempted));
        // Members 1, 2 and 4 (3 belongs elsewhere, 5 is another meter).
        let members: Vec<QueuedRecord> = page
            .iter()
            .filter(|q| [1, 2, 4].contains(&q.seq))
            .cloned()
            .collect();
        let batch = billable("tokens", 70, 0);
        assert!(store.form_batch(&a, &members, batch, 60_000, 9).unwrap());
        assert_eq!(
            queued_seqs(&store),
            vec![(1, Some(4)), (3, None), (5, None)]
        );
        let (_, _, rec) = store.outbox_items(false, None, 1).unwrap().remove(0);
        assert_eq!(rec.item.value, 70);
        assert_eq!(rec.batch.as_ref().unwrap().members, 3);
        // The same members cannot form a batch twice.
        assert!(
            !store
                .form_batch(&a, &members, billable("tokens", 70, 0), 60_000, 9)
                .unwrap()
        );
        // Recovery queues every entry again: members stay merged, the others stay single.
        for seq in 1..=4 {
            store
                .queue_outbox(&a, seq, &billable("tokens", seq * 10, 1_000), false)
                .unwrap();
        }
        assert_eq!(
            queued_seqs(&store),
            vec![(1, Some(4)), (3, None), (5, None)]
        );
        assert!(store.is_batched(&a, 2).unwrap());
        assert!(!store.is_batched(&a, 3).unwrap());
        // Sent as a unit: recovery still skips every member, and nothing else is touched.
        store.mark_sent(&a, 1, 10).unwrap();
        for seq in 1..=4 {
            store
                .queue_outbox(&a, seq, &billable("tokens", seq * 10, 1_000), false)
                .unwrap();
        }
        assert_eq!(queued_seqs(&store), vec![(3, None), (5, None)]);
        // A recovery that raced with the batch re-inserted a member: it is found and dropped.
        store
            .queue_outbox(&a, 2, &billable("tokens", 20, 1_000), true)
            .unwrap();
        let (page, _) = store.outbox_page(Some(&(a.clone(), 2)), 1).unwrap();
        assert_eq!(page[0].seq, 2);
        assert!(store.is_batched(&a, 2).unwrap());
        assert!(store.drop_queued(&page[0]).unwrap());
        assert_eq!(queued_seqs(&store), vec![(3, None), (5, None)]);
        store.barrier().await.unwrap();
        store.close().unwrap();
    }

    #[tokio::test]
    async fn dead_batches_revive_as_the_same_batch_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::parse("acct").unwrap();
        {
            let store = open(dir.path());
            for seq in [3, 8] {
                store
                    .queue_outbox(&a, seq, &billable("tokens", 5, 1_000), true)
                    .unwrap();
            }
            let (page, _) = store.outbox_page(None, 10).unwrap();
            assert!(
                store
                    .form_batch(&a, &page, billable("tokens", 10, 0), 60_000, 1)
                    .unwrap()
            );
            let (_, _, mut rec) = store.outbox_items(false, None, 1).unwrap().remove(0);
            rec.attempted = true;
            rec.item.last_error = Some("refused".into());
            store.mark_dead(&a, 3, &rec).unwrap();
            assert_eq!(store.outbox_counts(), (0, 1, 0));
            gauges_match(&store);
            store.barrier().await.unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        gauges_match(&store);
        assert!(store.revive(&a, 3, 50).unwrap());
        gauges_match(&store);
        let (_, seq, rec) = store.outbox_items(false, None, 10).unwrap().remove(0);
        assert_eq!(seq, 3);
        assert_eq!(rec.batch.unwrap().last_seq, 8);
        assert!(rec.attempted, "a revived batch keeps its identifier");
        assert_eq!(
            rec.item.next_at_ms, 0,
            "the batch's own time, earlier than 50"
        );
        // Recovery cannot split it up again.
        store
            .queue_outbox(&a, 8, &billable("tokens", 5, 1_000), false)
            .unwrap();
        assert_eq!(store.outbox_counts().0, 1);
        gauges_match(&store);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn pruning_keeps_what_recovery_could_still_need() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = AccountId::parse("acct").unwrap();
        for seq in 1..=3 {
            store
                .queue_outbox(&a, seq, &billable("tokens", 1, 0), true)
                .unwrap();
            store.mark_sent(&a, seq, 100).unwrap();
        }
        // Old enough, but no snapshot covers the entries: recovery could replay them.
        let (plan, next) = store
            .prune_candidates(&PruneCursor::default(), 1_000, 100)
            .unwrap();
        assert!(plan.is_empty());
        assert!(!next.at_start(), "the cursor moved past what it read");
        let (plan, next) = store.prune_candidates(&next, 1_000, 100).unwrap();
        assert!(plan.is_empty());
        assert!(next.at_start(), "wrapped around");
        assert_eq!(store.prune(&plan).unwrap(), (0, 0));
        assert_eq!(store.outbox_counts().2, 3);
        store.close().unwrap();
    }

    /// A dead letter of usage older than the cutoff goes once the snapshot covers its entry
    /// (Stripe refuses meter events that old); a younger one stays.
    #[tokio::test]
    async fn old_dead_letters_are_pruned_once_covered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = AccountId::parse("acct").unwrap();
        for (seq, at_ms) in [(1, 100), (2, 5_000)] {
            store
                .queue_outbox(&a, seq, &billable("tokens", 1, at_ms), true)
                .unwrap();
            let (_, _, rec) = store.outbox_items(false, None, 1).unwrap().remove(0);
            store.mark_dead(&a, seq, &rec).unwrap();
        }
        let cutoff = 1_000;
        let (plan, _) = store
            .prune_candidates(&PruneCursor::default(), cutoff, 100)
            .unwrap();
        assert!(plan.is_empty(), "no snapshot covers them yet");
        store
            .put_snapshot(
                &a,
                &AccountSnapshot {
                    profile: match upserted(1).kind {
                        EntryKind::AccountUpserted(p) => p,
                        _ => unreachable!(),
                    },
                    balances: Balances::new(crate::model::Period::calendar_month(0)),
                    billing: Default::default(),
                    last_seq: 2,
                },
            )
            .unwrap();
        let (plan, _) = store
            .prune_candidates(&PruneCursor::default(), cutoff, 100)
            .unwrap();
        store.barrier().await.unwrap();
        assert_eq!(store.prune(&plan).unwrap(), (1, 1));
        let left: Vec<u64> = store
            .outbox_items(true, None, 10)
            .unwrap()
            .into_iter()
            .map(|(_, s, _)| s)
            .collect();
        assert_eq!(left, vec![2]);
        gauges_match(&store);
        store.close().unwrap();
    }

    /// sled writes a large value to a blob file of its own, which it never syncs: the
    /// flusher syncs it (and the `blobs` directory) before answering a commit.
    #[tokio::test]
    async fn large_values_reach_disk_through_synced_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let before = store.stats().blobs_synced.load(Ordering::Relaxed);
        // A webhook body near the 1 MiB a delivery may have: far past sled's blob threshold.
        let body = vec![b'x'; 600 * 1024];
        let rec = WebhookRecord {
            id: "evt_big".into(),
            event_type: "invoice.paid".into(),
            created_s: 1,
            received_ms: 1,
            source: EventSource::Webhook,
            thin: false,
            status: WebhookStatus::Pending,
            attempts: 0,
            next_at_ms: 0,
            last_error: None,
            outcome: None,
            settled_ms: None,
        };
        assert!(store.log_event(&rec, &body).unwrap());
        store.barrier().await.unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert!(blobs >= 1, "sled wrote the body to a blob");
        assert!(
            store.stats().blobs_synced.load(Ordering::Relaxed) > before,
            "the blob was synced before the commit answered"
        );
        assert_eq!(
            store.event_body("evt_big").unwrap().unwrap().len(),
            body.len()
        );
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled_open(dir.path());
            let meta = db.open_tree("meta").unwrap();
            meta.insert(b"format", &(FORMAT_VERSION + 1).to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Flush,
            cache_capacity_bytes: 1 << 20,
        })
        .unwrap_err();
        assert!(matches!(err, StoreError::NewerFormat { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("format {}", FORMAT_VERSION + 1))
                && msg.contains(&format!("format {FORMAT_VERSION}")),
            "names both versions: {msg}"
        );
    }

    fn upserted(seq: u64) -> LedgerEntry {
        LedgerEntry {
            seq,
            at_ms: 5,
            kind: EntryKind::AccountUpserted(crate::ledger::AccountProfile {
                plan: "free".into(),
                seats: 1,
                email: None,
                stripe_customer_id: None,
                metadata: Vec::new(),
                created_at_ms: 5,
                status: Default::default(),
                status_since_ms: 5,
                overrides: Default::default(),
                spend_cap: None,
            }),
        }
    }

    fn format_of(dir: &std::path::Path) -> u32 {
        let db = sled_open(dir);
        let v = db
            .open_tree("meta")
            .unwrap()
            .get(b"format")
            .unwrap()
            .unwrap();
        codec::decode_format(&v).unwrap()
    }

    #[tokio::test]
    async fn every_identifier_of_a_long_account_resolves_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let long = AccountId::parse(&format!("org.{}", "x".repeat(100))).unwrap();
        let short = AccountId::parse("acme").unwrap();
        s.append_entry(&long, &upserted(1)).unwrap();
        s.append_entry(&short, &upserted(1)).unwrap();
        for ident in [
            crate::identifier::entry(&long, u64::MAX),
            crate::identifier::batch(&long, 7, 9),
            crate::identifier::entry(&short, 3),
        ] {
            let p = crate::identifier::parse(&ident).unwrap();
            let owner = s.identifier_owner(&p.owner).unwrap();
            let expect = if ident.starts_with("acme") {
                &short
            } else {
                &long
            };
            assert_eq!(owner.as_ref(), Some(expect), "{ident}");
        }
        // A hash nobody indexed is no account; neither is an invalid id.
        let stranger = crate::identifier::hashed(&AccountId::parse(&"y".repeat(90)).unwrap());
        let resolved = s.identifier_owner(&stranger).unwrap();
        assert_eq!(
            resolved.as_ref().map(AccountId::as_str),
            Some(stranger.as_str()),
            "an unindexed hash is read as a plain id, which names no account"
        );
        assert_eq!(s.identifier_owner("not valid!").unwrap(), None);
    }

    #[tokio::test]
    async fn a_format_1_data_dir_is_migrated_once_and_keeps_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let long = AccountId::parse(&"L".repeat(100)).unwrap();
        let short = AccountId::parse("acme").unwrap();
        // What release 7 left: format 1, records, no hash index.
        {
            let s = open(dir.path());
            s.append_entry(&long, &upserted(1)).unwrap();
            s.append_entry(&long, &entry(2)).unwrap();
            s.append_entry(&short, &upserted(1)).unwrap();
            s.close().unwrap();
        }
        {
            let db = sled_open(dir.path());
            db.drop_tree(HASHED_IDS).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(b"format", &1u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        assert_eq!(format_of(dir.path()), 1);
        for _ in 0..2 {
            // The second open finds format 2 and migrates nothing.
            let s = open(dir.path());
            let hash = crate::identifier::hashed(&long);
            assert_eq!(s.identifier_owner(&hash).unwrap(), Some(long.clone()));
            assert_eq!(s.read_entry(&long, 2).unwrap(), Some(entry(2)));
            assert_eq!(s.read_entry(&short, 1).unwrap(), Some(upserted(1)));
            assert_eq!(s.inner.hashed_ids.len(), 1, "only ids that may be hashed");
            s.close().unwrap();
            drop(s);
            assert_eq!(format_of(dir.path()), FORMAT_VERSION);
        }
    }

    #[tokio::test]
    async fn a_format_2_data_dir_moves_its_idempotency_records_into_generations() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::parse("acct").unwrap();
        let consume = codec::idem_key(&a, IdemOp::Consume, "k");
        let topup = codec::idem_key(&a, IdemOp::Topup, "k");
        // What release 8 left: format 2, every idempotency record in `idem`, alerts queued.
        {
            let s = open(dir.path());
            s.append_entry(&a, &upserted(1)).unwrap();
            s.close().unwrap();
        }
        {
            let db = sled_open(dir.path());
            let idem = db.open_tree("idem").unwrap();
            for (k, at_ms) in [(&consume, 100), (&topup, 200)] {
                let v = codec::encode_idem(IdemRecord { seq: 1, at_ms }).unwrap();
                idem.insert(k.as_slice(), v).unwrap();
            }
            db.open_tree("notify").unwrap().insert(b"x", b"y").unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(b"format", &2u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        assert_eq!(format_of(dir.path()), 2);
        let s = open(dir.path());
        assert_eq!(s.inner.idem.len(), 1, "only the top-up stays in `idem`");
        assert!(s.inner.notify.is_empty());
        assert_eq!(
            s.get_idem(&a, IdemOp::Consume, "k").unwrap(),
            Some(IdemRecord { seq: 1, at_ms: 100 })
        );
        assert_eq!(s.expire_idem(DEFAULT_GENERATION_MS).unwrap(), (1, 1));
        assert!(s.get_idem(&a, IdemOp::Topup, "k").unwrap().is_some());
        assert!(s.get_idem(&a, IdemOp::Consume, "k").unwrap().is_none());
        s.close().unwrap();
        drop(s);
        assert_eq!(format_of(dir.path()), FORMAT_VERSION);
    }

    #[tokio::test]
    async fn data_without_a_format_stamp_is_refused_and_a_new_dir_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.close().unwrap();
        }
        assert_eq!(format_of(dir.path()), FORMAT_VERSION);
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled_open(dir.path());
            db.open_tree("ledger").unwrap().insert(b"x", b"y").unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Flush,
            cache_capacity_bytes: 1 << 20,
        })
        .unwrap_err();
        assert!(err.to_string().contains("no format version"), "{err}");
    }
}
