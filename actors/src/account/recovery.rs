//! Recovery and the write helpers every handler shares: rebuild from snapshot plus ledger tail,
//! append an entry, snapshot, and reply after the group commit.

use super::*;

/// Rebuilds an account from its snapshot plus the ledger entries after it, and repairs the
/// derived idempotency index for those entries (it may have been lost in a crash).
pub(super) fn recover(store: &Store, id: &AccountId) -> Result<(AccountFold, u64), StoreError> {
    let mut fold = AccountFold::default();
    let mut snapshot_seq = 0;
    if let Some(s) = store.get_snapshot(id)? {
        snapshot_seq = s.last_seq;
        let mut balances = s.balances;
        // Snapshots of older releases kept spent grants.
        balances.prune_spent_grants();
        fold = AccountFold {
            profile: Some(s.profile),
            balances: Some(balances),
            billing: s.billing,
            last_seq: s.last_seq,
        };
    }
    loop {
        let batch = store.entries_after(id, fold.last_seq, 1024)?;
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            fold.apply(e).map_err(|err| corrupt(id, err))?;
            queue_billable(store, id, e, false)?;
            if let Some((op, key)) = idem_of(&e.kind) {
                let rec = IdemRecord {
                    seq: e.seq,
                    at_ms: e.at_ms,
                };
                store.put_idem(id, op, &key, rec)?;
            }
        }
    }
    // The customer index is written before the entry that links a customer; a crash in
    // between, or data from before the index existed, is repaired here. A customer the index
    // gives to another account (two accounts sharing one, written by an earlier release) is
    // left to that account and reported by `verify`: never re-linked back and forth.
    if let Some(c) = fold
        .profile
        .as_ref()
        .and_then(|p| p.stripe_customer_id.as_ref())
    {
        match store.customer_account(c)? {
            None => store.link_customer(c, id)?,
            Some(owner) if &owner != id => {
                tracing::warn!(account = %id, customer = %c, owner = %owner, "this account's Stripe customer is linked to another account; fix one of them (PUT stripe_customer_id)");
            }
            Some(_) => {}
        }
    }
    Ok((fold, snapshot_seq))
}

/// Queues a billable entry (the `bill` overage of a consume or a commit) for Stripe. Derived
/// from the entry alone, so recovery can queue again what a crash lost; the store skips what
/// was already sent or dead-lettered.
pub(super) fn queue_billable(
    store: &Store,
    id: &AccountId,
    e: &LedgerEntry,
    fresh: bool,
) -> Result<(), StoreError> {
    let Some((meter, value)) = e.billable() else {
        return Ok(());
    };
    store.queue_outbox(
        id,
        e.seq,
        &crate::store::OutboxItem {
            meter: meter.to_owned(),
            value,
            at_ms: e.at_ms,
            attempts: 0,
            next_at_ms: e.at_ms,
            last_error: None,
        },
        fresh,
    )
}

pub(super) fn corrupt(id: &AccountId, err: FoldError) -> StoreError {
    StoreError::Corrupt {
        tree: "ledger",
        detail: format!("account {id}: {err}"),
    }
}

impl AccountState {
    pub(super) fn append(
        &mut self,
        kind: EntryKind,
        at_ms: i64,
    ) -> Result<LedgerEntry, StoreError> {
        // Index a newly linked Stripe customer before the entry (webhooks find accounts by it),
        // and free the one it replaces.
        if let EntryKind::AccountUpserted(p) = &kind {
            let old = self
                .fold
                .profile
                .as_ref()
                .and_then(|x| x.stripe_customer_id.as_ref());
            if old != p.stripe_customer_id.as_ref() {
                if let Some(c) = &p.stripe_customer_id {
                    self.deps.store.link_customer(c, &self.id)?;
                }
                if let Some(o) = old {
                    self.deps.store.unlink_customer(o, &self.id)?;
                }
            }
        }
        let entry = LedgerEntry {
            seq: self.fold.last_seq + 1,
            at_ms,
            kind,
        };
        // Fold first: an entry that does not follow is a bug and must never reach disk. On
        // any error the handler fails the actor, which discards this in-memory state and
        // restarts from the store, so no rollback is needed here.
        self.fold.apply(&entry).map_err(|e| corrupt(&self.id, e))?;
        self.deps.store.append_entry(&self.id, &entry)?;
        crate::store::failpoint("append:after-ledger", self.id.as_str())?;
        // Billable usage is queued right behind its entry, before anything else (a snapshot
        // may follow, and recovery replays only entries after the snapshot).
        queue_billable(&self.deps.store, &self.id, &entry, true)?;
        Ok(entry)
    }

    pub(super) fn after_write(&mut self) -> Result<(), StoreError> {
        if self.fold.last_seq - self.snapshot_seq >= self.deps.settings.snapshot_every {
            self.write_snapshot()?;
        }
        Ok(())
    }

    pub(super) fn write_snapshot(&mut self) -> Result<(), StoreError> {
        if let (Some(profile), Some(balances)) = (&self.fold.profile, &self.fold.balances) {
            self.deps.store.put_snapshot(
                &self.id,
                &AccountSnapshot {
                    profile: profile.clone(),
                    balances: balances.clone(),
                    billing: self.fold.billing.clone(),
                    last_seq: self.fold.last_seq,
                },
            )?;
            self.snapshot_seq = self.fold.last_seq;
        }
        Ok(())
    }

    /// Sends `r` once everything this actor wrote so far is durable.
    pub(super) fn reply_after_commit<T: Send + 'static>(
        &self,
        reply: RpcReplyPort<Result<T, AccountError>>,
        r: Result<T, AccountError>,
    ) {
        self.deps.store.commit(move |c| {
            let out = match c {
                Ok(()) => r,
                Err(e) => Err(e.into()),
            };
            let _ = reply.send(out);
        });
    }

    pub(super) fn catalog_plan(&self, profile: &AccountProfile) -> Result<&Plan, AccountError> {
        self.deps.catalog.plans.get(&profile.plan).ok_or_else(|| {
            AccountError::Storage(format!(
                "account {} is on plan `{}`, which is no longer configured",
                self.id, profile.plan
            ))
        })
    }

    pub(super) fn access_at(&self, profile: &AccountProfile, now: i64) -> Access {
        let grace =
            i64::try_from(self.deps.settings.past_due_grace.as_millis()).unwrap_or(i64::MAX);
        access(profile.status, profile.status_since_ms, now, grace)
    }
}
