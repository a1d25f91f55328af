//! The Stripe outbox trees: `outbox`, `dead`, `sent` and `batched` (queue, dead letters,
//! delivered, merged into batches), batch formation and pruning.

use super::*;

/// A queued outbox record as the outbox actor reads it, with its stored bytes (so a batch
/// only forms from exactly what was read).
#[derive(Debug, Clone)]
pub struct QueuedRecord {
    pub account: AccountId,
    pub seq: u64,
    pub record: OutboxRecord,
    raw: sled::IVec,
}

/// Where one key is in the outbox family.
#[derive(Debug, Clone, Default)]
pub struct OutboxLocation {
    pub queued: Option<OutboxRecord>,
    pub dead: Option<OutboxRecord>,
    pub sent: bool,
    /// Merged into the batch keyed by this first seq.
    pub batch_first: Option<u64>,
}

/// Where pruning of the `sent`, `batched` and `dead` trees continues.
#[derive(Debug, Clone, Default)]
pub struct PruneCursor {
    sent: Vec<u8>,
    batched: Vec<u8>,
    dead: Vec<u8>,
}

/// Records [`Store::prune`] may delete.
#[derive(Debug, Default)]
pub struct PrunePlan {
    sent: Vec<(sled::IVec, sled::IVec)>,
    batched: Vec<(sled::IVec, sled::IVec)>,
    dead: Vec<(sled::IVec, sled::IVec)>,
}

/// What a pruned tree holds, to read the time a record is judged by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pruned {
    /// Delivery time.
    Sent,
    /// Batch formation time.
    Mark,
    /// A dead letter: the usage's own time (Stripe refuses meter events older than 35 days,
    /// so an older one can never be revived with success).
    Dead,
}

/// At open: a record in both `dead` and `outbox` was interrupted moving between them (a
/// revive, or a dead-lettering). It stays queued, so it is retried and never lost; it leaves
/// `dead`. Returns how many. One pass over `dead`, which is small.
pub(super) fn settle_dead_and_queued(
    outbox: &sled::Tree,
    dead: &sled::Tree,
) -> Result<usize, StoreError> {
    let mut n = 0;
    for item in dead.iter() {
        let (k, _) = item?;
        if outbox.contains_key(&k)? {
            dead.remove(&k)?;
            n += 1;
        }
    }
    Ok(n)
}

impl Store {
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
            let old = self.inner.outbox.insert(&key, value)?;
            self.counted(&self.inner.queued, old.is_none(), false);
            return Ok(());
        }
        if self.inner.sent.contains_key(&key)?
            || self.inner.dead.contains_key(&key)?
            || self.inner.batched.contains_key(&key)?
        {
            return Ok(());
        }
        let swapped = self
            .inner
            .outbox
            .compare_and_swap(&key, None as Option<&[u8]>, Some(value))?
            .is_ok();
        self.counted(&self.inner.queued, swapped, false);
        Ok(())
    }

    /// Keeps a gauge: one more record if `added`, one fewer if `removed`.
    fn counted(&self, gauge: &AtomicI64, added: bool, removed: bool) {
        if added {
            gauge.fetch_add(1, Ordering::AcqRel);
        }
        if removed {
            gauge.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// (queued, dead) records, as kept since the store opened: O(1).
    pub fn outbox_gauges(&self) -> (u64, u64) {
        let read = |g: &AtomicI64| u64::try_from(g.load(Ordering::Acquire)).unwrap_or(0);
        (read(&self.inner.queued), read(&self.inner.dead_count))
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
        let old = self.inner.outbox.insert(
            codec::ledger_key(account, seq),
            codec::encode_outbox(record)?,
        )?;
        self.counted(&self.inner.queued, old.is_none(), false);
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
        // Sent first: a crash in between leaves it in both, and the outbox drops a queued
        // record that is already sent (never the other way round, which could bill twice).
        self.inner.sent.insert(&key, &at_ms.to_be_bytes())?;
        self.mark_recon_dirty(account)?;
        super::failpoint("mark_sent:after-sent", account.as_str())?;
        let old = self.inner.outbox.remove(&key)?;
        self.counted(&self.inner.queued, false, old.is_some());
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
        let was_dead = self
            .inner
            .dead
            .insert(&key, codec::encode_outbox(record)?)?;
        self.counted(&self.inner.dead_count, was_dead.is_none(), false);
        self.mark_recon_dirty(account)?;
        // A crash here leaves it in both: at open, a dead letter still queued leaves `dead`
        // (it is retried, never lost).
        super::failpoint("mark_dead:after-dead", account.as_str())?;
        let old = self.inner.outbox.remove(&key)?;
        self.counted(&self.inner.queued, false, old.is_some());
        Ok(())
    }

    /// Moves a dead letter back to the queue, due now (a batch stays the same batch, under
    /// the same identifier). Due at `now` or the usage's own time, whichever is earlier, so it
    /// is due at once even if the caller's clock runs ahead of the outbox's. False if there is
    /// no such dead letter.
    pub fn revive(&self, account: &AccountId, seq: u64, now: UnixMs) -> Result<bool, StoreError> {
        let key = codec::ledger_key(account, seq);
        let Some(v) = self.inner.dead.get(&key)? else {
            return Ok(false);
        };
        let mut record = codec::decode_outbox(&v)?;
        record.item.attempts = 0;
        record.item.next_at_ms = now.min(record.item.at_ms);
        // Queued first: a crash in between leaves it in both, and at open a dead letter
        // that is also queued leaves `dead` (it is never lost).
        let old = self
            .inner
            .outbox
            .insert(&key, codec::encode_outbox(&record)?)?;
        self.counted(&self.inner.queued, old.is_none(), false);
        super::failpoint("revive:after-queue", account.as_str())?;
        if self
            .inner
            .dead
            .compare_and_swap(&key, Some(&v), None as Option<&[u8]>)?
            .is_ok()
        {
            self.counted(&self.inner.dead_count, false, true);
        }
        Ok(true)
    }

    /// Where record key `seq` of `account` is in the outbox family (for `verify`).
    pub fn outbox_location(
        &self,
        account: &AccountId,
        seq: u64,
    ) -> Result<OutboxLocation, StoreError> {
        let key = codec::ledger_key(account, seq);
        Ok(OutboxLocation {
            queued: match self.inner.outbox.get(&key)? {
                Some(v) => Some(codec::decode_outbox(&v)?),
                None => None,
            },
            dead: match self.inner.dead.get(&key)? {
                Some(v) => Some(codec::decode_outbox(&v)?),
                None => None,
            },
            sent: self.inner.sent.contains_key(&key)?,
            batch_first: match self.inner.batched.get(&key)? {
                Some(v) => Some(codec::decode_mark(&v)?.0),
                None => None,
            },
        })
    }

    /// True if record `seq` of `account` was delivered (a queued copy is left over from a
    /// crash in [`Store::mark_sent`]).
    pub fn is_sent(&self, account: &AccountId, seq: u64) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .sent
            .contains_key(codec::ledger_key(account, seq))?)
    }

    /// (queued, dead, sent) counts: records, so a batch counts once.
    pub fn outbox_counts(&self) -> (usize, usize, usize) {
        let (queued, dead) = self.outbox_gauges();
        (
            usize::try_from(queued).unwrap_or(usize::MAX),
            usize::try_from(dead).unwrap_or(usize::MAX),
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
            Ok(()) => {
                // Every member left the queue; the batch took the first one's key.
                let merged = i64::try_from(keys.len()).unwrap_or(i64::MAX) - 1;
                self.inner.queued.fetch_sub(merged, Ordering::AcqRel);
                Ok(true)
            }
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
        let dropped = self
            .inner
            .outbox
            .compare_and_swap(
                codec::ledger_key(&q.account, q.seq),
                Some(&q.raw),
                None as Option<&[u8]>,
            )?
            .is_ok();
        self.counted(&self.inner.queued, false, dropped);
        Ok(dropped)
    }

    /// Reads one page (up to `max` keys of each tree, from `cursor`) of what may be pruned:
    /// `sent` records delivered before `cutoff_ms`, `batched` marks of batches formed before
    /// it, and dead letters of usage before it, whose entry the account's snapshot covers. Recovery replays only entries after the
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
        for (tree, from, to, out, kind) in [
            (
                &self.inner.sent,
                &cursor.sent,
                &mut next.sent,
                &mut plan.sent,
                Pruned::Sent,
            ),
            (
                &self.inner.batched,
                &cursor.batched,
                &mut next.batched,
                &mut plan.batched,
                Pruned::Mark,
            ),
            (
                &self.inner.dead,
                &cursor.dead,
                &mut next.dead,
                &mut plan.dead,
                Pruned::Dead,
            ),
        ] {
            let mut last = None;
            for item in tree.range(from.clone()..).take(max) {
                let (k, v) = item?;
                let at = match kind {
                    Pruned::Mark => codec::decode_mark(&v)?.1,
                    Pruned::Sent => codec::decode_sent_at(&v)?,
                    Pruned::Dead => codec::decode_outbox(&v)?.item.at_ms,
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
    /// many records were deleted, and how many of them were dead letters.
    pub fn prune(&self, plan: &PrunePlan) -> Result<(usize, usize), StoreError> {
        let (mut n, mut dead) = (0, 0);
        for (tree, records, is_dead) in [
            (&self.inner.sent, &plan.sent, false),
            (&self.inner.batched, &plan.batched, false),
            (&self.inner.dead, &plan.dead, true),
        ] {
            for (k, v) in records {
                if tree
                    .compare_and_swap(k, Some(v), None as Option<&[u8]>)?
                    .is_ok()
                {
                    n += 1;
                    if is_dead {
                        dead += 1;
                        self.counted(&self.inner.dead_count, false, true);
                    }
                }
            }
        }
        Ok((n, dead))
    }

    /// Records in the `batched` tree (entries merged into batches and not yet pruned).
    pub fn batched_count(&self) -> usize {
        self.inner.batched.len()
    }
}

impl PruneCursor {
    /// True when every tree wrapped around (a full pass ended).
    pub fn at_start(&self) -> bool {
        self.sent.is_empty() && self.batched.is_empty() && self.dead.is_empty()
    }
}

impl PrunePlan {
    pub fn is_empty(&self) -> bool {
        self.sent.is_empty() && self.batched.is_empty() && self.dead.is_empty()
    }
}
