//! The sled store: key spaces, versioned records, and the one group-commit flusher.
//!
//! This module owns every byte meterd writes to disk. It must never make a caller wait for a
//! flush inside an actor: [`Store::commit`] hands a callback to the flusher thread, which runs
//! it once everything inserted before the call is durable.
//!
//! Key spaces (trees):
//! - `ledger`:   `account_id 0x00 seq_be64` → [`StoredEntry`]. Append-only. The source of truth.
//! - `accounts`: `account_id` → [`StoredSnapshot`]. Derived, written lazily.
//! - `idem`:     `account_id 0x00 op key` → [`StoredIdem`]. Derived, written lazily, expired
//!   by the janitor after the retention period.
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
//! - `meta`:     `format` → the data dir's format version (see `migrate`).
//!
//! Durability: sled 0.34.7 deadlocks when several threads call `flush_async` at once (upstream
//! issues #1308, #1241) and its `flush` makes data safe from a process crash but not from a
//! power loss. So exactly one thread, the flusher, ever flushes, and in `fdatasync` mode it
//! also calls `fdatasync` on sled's log file after each flush.

mod codec;
mod events;
#[cfg(test)]
mod golden;
mod migrate;
pub mod records;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

pub use codec::{OutboxBatch, OutboxRecord};
pub use codec::{OutboxItem, StoredEntry, StoredIdem, StoredNotification, StoredSnapshot};
pub use events::{EventSource, MeterErrorRecord, WebhookRecord, WebhookStatus};

use crate::ledger::{AccountProfile, Balances, LedgerEntry};
use crate::model::{AccountId, UnixMs};

/// The data dir format this build writes and understands (older ones are migrated at open,
/// see `migrate`).
pub const FORMAT_VERSION: u32 = 2;

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

type Waiter = Box<dyn FnOnce(Result<(), CommitError>) + Send>;

enum FlushCmd {
    Wait(Waiter),
    Stop(mpsc::Sender<Result<(), CommitError>>),
}

/// Counters the flusher keeps, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub waiters: AtomicU64,
}

struct Inner {
    ledger: sled::Tree,
    accounts: sled::Tree,
    idem: sled::Tree,
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

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
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
        let (flush_tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(FlushStats::default());
        let flusher = {
            let db = db.clone();
            let failed = failed.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("meterd-flusher".into())
                .spawn(move || flusher_loop(db, sync_file, rx, failed, stats))
                .map_err(|source| StoreError::Io {
                    path: cfg.path.clone(),
                    source,
                })?
        };
        Ok(Store {
            inner: Arc::new(Inner {
                ledger: db.open_tree("ledger")?,
                accounts: db.open_tree("accounts")?,
                idem: db.open_tree("idem")?,
                notify: db.open_tree("notify")?,
                outbox: db.open_tree("outbox")?,
                sent: db.open_tree("sent")?,
                dead: db.open_tree("dead")?,
                batched: db.open_tree("batched")?,
                webhooks: db.open_tree("webhooks")?,
                webhook_bodies: db.open_tree("webhook_bodies")?,
                customers: db.open_tree("customers")?,
                meter_errors: db.open_tree("meter_errors")?,
                hashed_ids: db.open_tree(HASHED_IDS)?,
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

    /// Appends a ledger entry. An account's creation (its first entry) also indexes its hashed
    /// identifier when it may need one, in the same commit.
    pub fn append_entry(&self, account: &AccountId, entry: &LedgerEntry) -> Result<(), StoreError> {
        let bytes = codec::encode_entry(entry)?;
        if matches!(entry.kind, crate::ledger::EntryKind::AccountUpserted(_))
            && crate::identifier::may_be_hashed(account)
        {
            self.inner.hashed_ids.insert(
                crate::identifier::hashed(account),
                account.as_str().as_bytes(),
            )?;
        }
        self.inner
            .ledger
            .insert(codec::ledger_key(account, entry.seq), bytes)?;
        Ok(())
    }

    /// The account an identifier's owner part names (see [`crate::identifier::parse`]): the
    /// account whose hash it is, else the account id it spells. `None`: no account (an
    /// invalid id, or a hash meterd never indexed).
    pub fn identifier_owner(&self, owner: &str) -> Result<Option<AccountId>, StoreError> {
        if crate::identifier::looks_hashed(owner)
            && let Some(a) = migrate::account_of_hashed(&self.inner.hashed_ids, owner)?
        {
            return Ok(Some(a));
        }
        Ok(AccountId::parse(owner).ok())
    }

    pub fn read_entry(
        &self,
        account: &AccountId,
        seq: u64,
    ) -> Result<Option<LedgerEntry>, StoreError> {
        match self.inner.ledger.get(codec::ledger_key(account, seq))? {
            Some(v) => Ok(Some(codec::decode_entry(&v)?)),
            None => Ok(None),
        }
    }

    /// The highest sequence number in the account's ledger, if it has any entry.
    pub fn last_seq(&self, account: &AccountId) -> Result<Option<u64>, StoreError> {
        let upper = codec::ledger_key(account, u64::MAX);
        let prefix = codec::account_prefix(account);
        if let Some(v) = self.inner.ledger.get(&upper)? {
            let e = codec::decode_entry(&v)?;
            return Ok(Some(e.seq));
        }
        match self.inner.ledger.get_lt(&upper)? {
            Some((k, _)) if k.starts_with(&prefix) => codec::seq_of_key(&k, prefix.len()).map(Some),
            _ => Ok(None),
        }
    }

    /// Entries with `seq > after_seq`, oldest first, at most `limit` of them.
    pub fn entries_after(
        &self,
        account: &AccountId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let from = codec::ledger_key(account, start);
        let to = codec::ledger_key(account, u64::MAX);
        let mut out = Vec::new();
        for item in self.inner.ledger.range(from..=to).take(limit) {
            let (_, v) = item?;
            out.push(codec::decode_entry(&v)?);
        }
        Ok(out)
    }

    /// Every account that has a ledger, in key order, for verification.
    pub fn ledger_accounts(&self) -> impl Iterator<Item = Result<AccountId, StoreError>> + '_ {
        let mut next_from: Option<Vec<u8>> = Some(Vec::new());
        std::iter::from_fn(move || {
            let from = next_from.take()?;
            let item = self.inner.ledger.range(from..).next()?;
            let r = item.map_err(StoreError::from).and_then(|(k, _)| {
                let sep = k
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "ledger",
                        detail: "key without separator".into(),
                    })?;
                let id = std::str::from_utf8(&k[..sep])
                    .ok()
                    .and_then(|s| AccountId::parse(s).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        tree: "ledger",
                        detail: "key with an invalid account id".into(),
                    })?;
                // The smallest key after every key of this account: the id followed by 0x01.
                let mut after = k[..sep].to_vec();
                after.push(1);
                next_from = Some(after);
                Ok(id)
            });
            Some(r)
        })
    }

    // ---- snapshots ----

    pub fn put_snapshot(
        &self,
        account: &AccountId,
        snap: &AccountSnapshot,
    ) -> Result<(), StoreError> {
        self.inner
            .accounts
            .insert(account.as_str().as_bytes(), codec::encode_snapshot(snap)?)?;
        Ok(())
    }

    pub fn get_snapshot(&self, account: &AccountId) -> Result<Option<AccountSnapshot>, StoreError> {
        match self.inner.accounts.get(account.as_str().as_bytes())? {
            Some(v) => Ok(Some(codec::decode_snapshot(&v)?)),
            None => Ok(None),
        }
    }

    // ---- Stripe outbox ----

    /// Queues billable entry `seq` for Stripe. A `fresh` entry (just appended) is inserted
    /// directly: the outbox only ever sends or merges durable entries, so a fresh seq cannot
    /// have been sent or batched. Otherwise (recovery) it is skipped if already queued, sent,
    /// dead, or merged into a batch (pending, sent or dead alike: its `batched` mark stays).
    /// A recovery racing with the batch that takes the entry can still insert it just after
    /// the batch removed it; the outbox deletes such a marked single instead of sending it
    /// ([`Store::is_batched`]).
    pub fn queue_outbox(
        &self,
        account: &AccountId,
        seq: u64,
        item: &OutboxItem,
        fresh: bool,
    ) -> Result<(), StoreError> {
        let key = codec::ledger_key(account, seq);
        let value = codec::encode_fresh_outbox(item)?;
        if fresh {
            self.inner.outbox.insert(&key, value)?;
            return Ok(());
        }
        if self.inner.sent.contains_key(&key)?
            || self.inner.dead.contains_key(&key)?
            || self.inner.batched.contains_key(&key)?
        {
            return Ok(());
        }
        let _ = self
            .inner
            .outbox
            .compare_and_swap(&key, None as Option<&[u8]>, Some(value))?;
        Ok(())
    }

    /// Up to `limit` queued (or dead) records, oldest key first, starting after `after`
    /// (exclusive).
    #[allow(clippy::type_complexity)]
    pub fn outbox_items(
        &self,
        dead: bool,
        after: Option<(AccountId, u64)>,
        limit: usize,
    ) -> Result<Vec<(AccountId, u64, OutboxRecord)>, StoreError> {
        let tree = if dead {
            &self.inner.dead
        } else {
            &self.inner.outbox
        };
        let from = match &after {
            Some((a, s)) => {
                let mut k = codec::ledger_key(a, *s);
                k.push(0);
                k
            }
            None => Vec::new(),
        };
        let mut out = Vec::new();
        for item in tree.range(from..).take(limit) {
            let (k, v) = item?;
            let (a, s) = codec::split_ledger_key(&k)?;
            out.push((a, s, codec::decode_outbox(&v)?));
        }
        Ok(out)
    }

    /// One page of the queue for the outbox actor: up to `limit` records from `from`
    /// (inclusive; `None`: the start), with their stored bytes for [`Store::form_batch`].
    /// The bool is true when the end of the queue was reached.
    pub fn outbox_page(
        &self,
        from: Option<&(AccountId, u64)>,
        limit: usize,
    ) -> Result<(Vec<QueuedRecord>, bool), StoreError> {
        let from = match from {
            Some((a, s)) => codec::ledger_key(a, *s),
            None => Vec::new(),
        };
        let mut out = Vec::new();
        let mut iter = self.inner.outbox.range(from..);
        for item in iter.by_ref().take(limit) {
            let (k, v) = item?;
            let (account, seq) = codec::split_ledger_key(&k)?;
            out.push(QueuedRecord {
                account,
                seq,
                record: codec::decode_outbox(&v)?,
                raw: v,
            });
        }
        let end = out.len() < limit || iter.next().is_none();
        Ok((out, end))
    }

    /// Updates a queued record (a failed attempt, a wait, the attempted flag).
    pub fn update_outbox(
        &self,
        account: &AccountId,
        seq: u64,
        record: &OutboxRecord,
    ) -> Result<(), StoreError> {
        self.inner.outbox.insert(
            codec::ledger_key(account, seq),
            codec::encode_outbox(record)?,
        )?;
        Ok(())
    }

    /// Marks a queued record (an entry or a whole batch) delivered: it leaves the queue for
    /// good.
    pub fn mark_sent(
        &self,
        account: &AccountId,
        seq: u64,
        at_ms: UnixMs,
    ) -> Result<(), StoreError> {
        let key = codec::ledger_key(account, seq);
        self.inner.sent.insert(&key, &at_ms.to_be_bytes())?;
        self.inner.outbox.remove(&key)?;
        Ok(())
    }

    /// Moves a queued record (an entry or a whole batch) to the dead letters, with the reason
    /// in `last_error`.
    pub fn mark_dead(
        &self,
        account: &AccountId,
        seq: u64,
        record: &OutboxRecord,
    ) -> Result<(), StoreError> {
        let key = codec::ledger_key(account, seq);
        self.inner
            .dead
            .insert(&key, codec::encode_outbox(record)?)?;
        self.inner.outbox.remove(&key)?;
        Ok(())
    }

    /// Moves a dead letter back to the queue, due now (a batch stays the same batch, under
    /// the same identifier). Due at `now` or the usage's own time, whichever is earlier, so it
    /// is due at once even if the caller's clock runs ahead of the outbox's. False if there is
    /// no such dead letter.
    pub fn revive(&self, account: &AccountId, seq: u64, now: UnixMs) -> Result<bool, StoreError> {
        let key = codec::ledger_key(account, seq);
        let Some(v) = self.inner.dead.remove(&key)? else {
            return Ok(false);
        };
        let mut record = codec::decode_outbox(&v)?;
        record.item.attempts = 0;
        record.item.next_at_ms = now.min(record.item.at_ms);
        self.inner
            .outbox
            .insert(&key, codec::encode_outbox(&record)?)?;
        Ok(true)
    }

    /// (queued, dead, sent) counts: records, so a batch counts once.
    pub fn outbox_counts(&self) -> (usize, usize, usize) {
        (
            self.inner.outbox.len(),
            self.inner.dead.len(),
            self.inner.sent.len(),
        )
    }

    /// Merges queued entries (`members`, in seq order, at least two, all of `account`) into
    /// one batch record keyed by the first, in one atomic sled transaction: each member is
    /// removed and marked in `batched`, and the batch record is inserted. Nothing happens
    /// (false) if a member changed or is already marked since it was read. The caller makes
    /// the members durable before (a barrier) and the batch durable before sending it.
    ///
    /// sled runs a transaction under its global write lock, so it is atomic with respect to
    /// every other operation; the first transaction switches sled to taking that lock's read
    /// side on every operation, for the rest of the process (only when aggregation is used).
    pub fn form_batch(
        &self,
        account: &AccountId,
        members: &[QueuedRecord],
        item: OutboxItem,
        window_ms: i64,
        now: UnixMs,
    ) -> Result<bool, StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let (Some(first), Some(last)) = (members.first(), members.last()) else {
            return Ok(false);
        };
        let record = OutboxRecord {
            item,
            batch: Some(OutboxBatch {
                last_seq: last.seq,
                members: u32::try_from(members.len()).unwrap_or(u32::MAX),
                window_ms,
            }),
            attempted: false,
        };
        let value = codec::encode_outbox(&record)?;
        let first_key = codec::ledger_key(account, first.seq);
        let mark = codec::encode_mark(first.seq, now);
        let keys: Vec<(Vec<u8>, &sled::IVec)> = members
            .iter()
            .map(|m| (codec::ledger_key(account, m.seq), &m.raw))
            .collect();
        let r: Result<(), TransactionError<()>> = (&self.inner.outbox, &self.inner.batched)
            .transaction(|(o, b)| {
                for (key, raw) in &keys {
                    if o.get(key)?.as_ref() != Some(*raw) || b.get(key)?.is_some() {
                        return Err(ConflictableTransactionError::Abort(()));
                    }
                    o.remove(key.as_slice())?;
                    b.insert(key.as_slice(), &mark[..])?;
                }
                o.insert(first_key.as_slice(), value.as_slice())?;
                Ok(())
            });
        match r {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// True if entry `seq` was merged into a batch: a queued single with this key is a
    /// re-queued member (recovery raced with the batch) and must never be sent.
    pub fn is_batched(&self, account: &AccountId, seq: u64) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .batched
            .contains_key(codec::ledger_key(account, seq))?)
    }

    /// Deletes a queued record if it still holds exactly what was read. True if deleted.
    pub fn drop_queued(&self, q: &QueuedRecord) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .outbox
            .compare_and_swap(
                codec::ledger_key(&q.account, q.seq),
                Some(&q.raw),
                None as Option<&[u8]>,
            )?
            .is_ok())
    }

    /// Reads one page (up to `max` keys of each tree, from `cursor`) of what may be pruned:
    /// `sent` records delivered before `cutoff_ms` and `batched` marks of batches formed before
    /// it, whose entry the account's snapshot covers. Recovery replays only entries after the
    /// snapshot, so such an entry can never be queued again. Make the snapshots durable (a
    /// barrier) before [`Store::prune`]: then a crash cannot bring back an older snapshot.
    pub fn prune_candidates(
        &self,
        cursor: &PruneCursor,
        cutoff_ms: UnixMs,
        max: usize,
    ) -> Result<(PrunePlan, PruneCursor), StoreError> {
        let mut plan = PrunePlan::default();
        let mut next = PruneCursor::default();
        // The snapshot's last seq of the account last looked at (keys come sorted by account).
        let mut covered: Option<(AccountId, u64)> = None;
        for (tree, from, to, out, is_mark) in [
            (
                &self.inner.sent,
                &cursor.sent,
                &mut next.sent,
                &mut plan.sent,
                false,
            ),
            (
                &self.inner.batched,
                &cursor.batched,
                &mut next.batched,
                &mut plan.batched,
                true,
            ),
        ] {
            let mut last = None;
            for item in tree.range(from.clone()..).take(max) {
                let (k, v) = item?;
                let at = if is_mark {
                    codec::decode_mark(&v)?.1
                } else {
                    codec::decode_sent_at(&v)?
                };
                last = Some(k.clone());
                if at >= cutoff_ms {
                    continue;
                }
                let (account, seq) = codec::split_ledger_key(&k)?;
                let snap = match &covered {
                    Some((a, s)) if *a == account => *s,
                    _ => {
                        let s = self.get_snapshot(&account)?.map_or(0, |s| s.last_seq);
                        covered = Some((account, s));
                        s
                    }
                };
                if seq <= snap {
                    out.push((k, v));
                }
            }
            // Continue after the last key read; wrap around at the end.
            *to = match last {
                Some(k) => {
                    let mut n = k.to_vec();
                    n.push(0);
                    n
                }
                None => Vec::new(),
            };
        }
        Ok((plan, next))
    }

    /// Deletes what [`Store::prune_candidates`] found (each only if unchanged). Returns how
    /// many records were deleted.
    pub fn prune(&self, plan: &PrunePlan) -> Result<usize, StoreError> {
        let mut n = 0;
        for (tree, records) in [
            (&self.inner.sent, &plan.sent),
            (&self.inner.batched, &plan.batched),
        ] {
            for (k, v) in records {
                if tree
                    .compare_and_swap(k, Some(v), None as Option<&[u8]>)?
                    .is_ok()
                {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Records in the `batched` tree (entries merged into batches and not yet pruned).
    pub fn batched_count(&self) -> usize {
        self.inner.batched.len()
    }

    // ---- notification queue ----

    /// Queues alert `idx` of ledger entry `seq` for outgoing notification (idempotent).
    pub fn queue_alert(
        &self,
        account: &AccountId,
        seq: u64,
        idx: u32,
        at_ms: UnixMs,
        alert: &crate::model::Alert,
    ) -> Result<(), StoreError> {
        let mut key = (at_ms.max(0) as u64).to_be_bytes().to_vec();
        key.extend_from_slice(&codec::ledger_key(account, seq));
        key.extend_from_slice(&idx.to_be_bytes());
        let value = codec::encode_notification(account.as_str(), seq, alert)?;
        self.inner.notify.insert(key, value)?;
        Ok(())
    }

    /// Queued notifications, oldest first: `(account, seq, alert)`.
    pub fn queued_alerts(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, u64, crate::model::Alert)>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.notify.iter().take(limit) {
            let (_, v) = item?;
            out.push(codec::decode_notification(&v)?);
        }
        Ok(out)
    }

    // ---- idempotency index ----

    pub fn put_idem(
        &self,
        account: &AccountId,
        op: IdemOp,
        key: &str,
        rec: IdemRecord,
    ) -> Result<(), StoreError> {
        self.inner
            .idem
            .insert(codec::idem_key(account, op, key), codec::encode_idem(rec)?)?;
        Ok(())
    }

    /// Inserts `rec` and returns the record it replaced, if any: one tree operation where a
    /// lookup followed by an insert would take two.
    pub fn swap_idem(
        &self,
        account: &AccountId,
        op: IdemOp,
        key: &str,
        rec: IdemRecord,
    ) -> Result<Option<IdemRecord>, StoreError> {
        match self
            .inner
            .idem
            .insert(codec::idem_key(account, op, key), codec::encode_idem(rec)?)?
        {
            Some(old) => Ok(Some(codec::decode_idem(&old)?)),
            None => Ok(None),
        }
    }

    pub fn get_idem(
        &self,
        account: &AccountId,
        op: IdemOp,
        key: &str,
    ) -> Result<Option<IdemRecord>, StoreError> {
        match self.inner.idem.get(codec::idem_key(account, op, key))? {
            Some(v) => Ok(Some(codec::decode_idem(&v)?)),
            None => Ok(None),
        }
    }

    /// Deletes up to `max` idempotency records created before `cutoff_ms`, scanning from
    /// `cursor`. Returns the number deleted and where to continue (`None`: wrapped around).
    /// A record rewritten meanwhile is left alone (compare-and-swap on the exact value).
    pub fn sweep_idem(
        &self,
        cursor: Option<Vec<u8>>,
        cutoff_ms: UnixMs,
        max: usize,
    ) -> Result<(usize, Option<Vec<u8>>), StoreError> {
        let from = cursor.unwrap_or_default();
        let mut deleted = 0;
        let mut last = None;
        for item in self.inner.idem.range(from..).take(max) {
            let (k, v) = item?;
            let rec = codec::decode_idem(&v)?;
            // Top-ups (a payment) and Stripe events are kept for good: Stripe, an admin
            // replay or a backfill may bring them back long after the retention period, and
            // they must still be recognised.
            let op = k
                .iter()
                .position(|b| *b == 0)
                .and_then(|i| k.get(i + 1))
                .copied();
            let permanent = op == Some(IdemOp::Topup as u8) || op == Some(IdemOp::Stripe as u8);
            if !permanent
                && rec.at_ms < cutoff_ms
                && self
                    .inner
                    .idem
                    .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?
                    .is_ok()
            {
                deleted += 1;
            }
            last = Some(k);
        }
        let next = last.map(|k| {
            let mut n = k.to_vec();
            n.push(0);
            n
        });
        Ok((deleted, next))
    }
}

/// A queued outbox record as the outbox actor reads it, with its stored bytes (so a batch
/// only forms from exactly what was read).
#[derive(Debug, Clone)]
pub struct QueuedRecord {
    pub account: AccountId,
    pub seq: u64,
    pub record: OutboxRecord,
    raw: sled::IVec,
}

/// Where pruning of the `sent` and `batched` trees continues.
#[derive(Debug, Clone, Default)]
pub struct PruneCursor {
    sent: Vec<u8>,
    batched: Vec<u8>,
}

impl PruneCursor {
    /// True when both trees wrapped around (a full pass ended).
    pub fn at_start(&self) -> bool {
        self.sent.is_empty() && self.batched.is_empty()
    }
}

/// Records [`Store::prune`] may delete.
#[derive(Debug, Default)]
pub struct PrunePlan {
    sent: Vec<(sled::IVec, sled::IVec)>,
    batched: Vec<(sled::IVec, sled::IVec)>,
}

impl PrunePlan {
    pub fn is_empty(&self) -> bool {
        self.sent.is_empty() && self.batched.is_empty()
    }
}

/// Opens sled, waiting (bounded) for the directory lock: a previous owner of the directory
/// (the process being replaced on restart, or sled's own threads of a store just closed)
/// can hold it for a moment.
fn open_db(cfg: &StoreConfig) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = sled::Config::new()
            .path(&cfg.path)
            .cache_capacity(cfg.cache_capacity_bytes)
            .flush_every_ms(Some(500))
            .open();
        match r {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

fn flusher_loop(
    db: sled::Db,
    sync_file: Option<File>,
    rx: mpsc::Receiver<FlushCmd>,
    failed: Arc<AtomicBool>,
    stats: Arc<FlushStats>,
) {
    while let Ok(first) = rx.recv() {
        let mut waiters = Vec::new();
        let mut stop = None;
        let mut push = |cmd| match cmd {
            FlushCmd::Wait(w) => waiters.push(w),
            FlushCmd::Stop(tx) => stop = Some(tx),
        };
        push(first);
        while let Ok(cmd) = rx.try_recv() {
            push(cmd);
        }
        let result = if failed.load(Ordering::Acquire) {
            Err(CommitError::FlushFailed("an earlier flush failed".into()))
        } else {
            let r = db
                .flush()
                .map_err(|e| CommitError::FlushFailed(e.to_string()))
                .and_then(|_| match &sync_file {
                    Some(f) => f
                        .sync_data()
                        .map_err(|e| CommitError::FlushFailed(e.to_string())),
                    None => Ok(()),
                });
            if let Err(e) = &r {
                tracing::error!(error = %e, "flush failed; refusing further writes");
                failed.store(true, Ordering::Release);
            }
            r
        };
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .waiters
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        for w in waiters {
            w(result.clone());
        }
        if let Some(tx) = stop {
            let _ = tx.send(result);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{EntryKind, LedgerEntry};
    use crate::model::Period;

    fn open(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.to_path_buf(),
            sync: SyncMode::Fdatasync,
            cache_capacity_bytes: 16 << 20,
        })
        .unwrap()
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
    async fn sweep_removes_only_expired_idempotency_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = AccountId::parse("acct").unwrap();
        for i in 0..10 {
            store
                .put_idem(
                    &a,
                    IdemOp::Consume,
                    &format!("k{i}"),
                    IdemRecord {
                        seq: i,
                        at_ms: i64::try_from(i).unwrap() * 100,
                    },
                )
                .unwrap();
        }
        // Old, but kept for good: a top-up and a Stripe event.
        let old = IdemRecord { seq: 99, at_ms: 0 };
        store.put_idem(&a, IdemOp::Topup, "cs_1", old).unwrap();
        store.put_idem(&a, IdemOp::Stripe, "evt_1", old).unwrap();
        let mut cursor = None;
        let mut total = 0;
        // Small pages: the sweep must continue from its cursor; bounded loop.
        for _ in 0..20 {
            let (n, next) = store.sweep_idem(cursor, 500, 3).unwrap();
            total += n;
            cursor = next;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(total, 5);
        assert!(store.get_idem(&a, IdemOp::Consume, "k4").unwrap().is_none());
        assert!(store.get_idem(&a, IdemOp::Consume, "k5").unwrap().is_some());
        assert!(store.get_idem(&a, IdemOp::Topup, "cs_1").unwrap().is_some());
        assert!(
            store
                .get_idem(&a, IdemOp::Stripe, "evt_1")
                .unwrap()
                .is_some()
        );
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

    fn queued_seqs(store: &Store) -> Vec<(u64, Option<u64>)> {
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
            store.barrier().await.unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert!(store.revive(&a, 3, 50).unwrap());
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
        assert_eq!(store.prune(&plan).unwrap(), 0);
        assert_eq!(store.outbox_counts().2, 3);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
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
        let db = sled::open(dir).unwrap();
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
            let db = sled::open(dir.path()).unwrap();
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
    async fn data_without_a_format_stamp_is_refused_and_a_new_dir_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.close().unwrap();
        }
        assert_eq!(format_of(dir.path()), FORMAT_VERSION);
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
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
