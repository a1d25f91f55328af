//! `meterd ledger verify`: recompute every account from its ledger and compare.
//!
//! For every account with a ledger, folds all entries from the first (each entry's recorded
//! balances must follow from the ones before), then checks every derived tree against it:
//! - the snapshot, if any, equals the fold (balances, profile, billing) at its sequence number;
//! - every idempotency key in the ledger that is still remembered points at its entry;
//! - every billable entry is in exactly one of outbox / sent / dead, or merged (`batched`)
//!   into a batch that is, with the units it billed (unless pruned: older than the 40 days
//!   pruning keeps);
//! - the account's Stripe customer, if any, maps back to it in `customers`.
//!
//! Read-only: it can run beside a live daemon (`GET /v1/admin/verify`), where a write in
//! flight may show as a transient problem; run it again before acting on one.

use crate::ledger::{AccountFold, EntryKind, LedgerEntry};
use crate::model::AccountId;
use crate::store::{Store, StoreError, StoreReader};

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub accounts: u64,
    pub entries: u64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// [`verify_store`] through the read-only view a running daemon's routes hold.
pub fn verify_live(reader: &StoreReader) -> Result<VerifyReport, StoreError> {
    verify_store(reader.store())
}

pub fn verify_store(store: &Store) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    for id in store.ledger_accounts() {
        let id = id?;
        report.accounts += 1;
        if let Err(p) = verify_account(store, &id, &mut report) {
            report.problems.push(format!("account {id}: {p}"));
        }
    }
    Ok(report)
}

fn verify_account(store: &Store, id: &AccountId, report: &mut VerifyReport) -> Result<(), String> {
    let snapshot = store.get_snapshot(id).map_err(|e| e.to_string())?;
    let mut fold = AccountFold::default();
    loop {
        let batch = store
            .entries_after(id, fold.last_seq, 4096)
            .map_err(|e| e.to_string())?;
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            fold.apply(e).map_err(|err| err.to_string())?;
            report.entries += 1;
            let key = crate::account::idem_of(&e.kind);
            if let Some((op, key)) = key
                && let Some(rec) = store.get_idem(id, op, &key).map_err(|e| e.to_string())?
                && rec.seq != e.seq
            {
                return Err(format!(
                    "idempotency key of entry {} points at entry {}",
                    e.seq, rec.seq
                ));
            }
            check_billable(store, id, e)?;
            if let Some(s) = &snapshot
                && s.last_seq == e.seq
                && (Some(&pruned(&s.balances)) != fold.balances.as_ref()
                    || Some(&s.profile) != fold.profile.as_ref()
                    || s.billing != fold.billing)
            {
                return Err(format!(
                    "snapshot at entry {} differs from the fold of the ledger",
                    s.last_seq
                ));
            }
        }
    }
    if let Some(c) = fold
        .profile
        .as_ref()
        .and_then(|p| p.stripe_customer_id.as_ref())
    {
        let owner = store.customer_account(c).map_err(|e| e.to_string())?;
        if owner.as_ref() != Some(id) {
            return Err(format!(
                "Stripe customer {c} maps to {owner:?} in `customers`, not to this account"
            ));
        }
    }
    if let Some(s) = &snapshot
        && s.last_seq > fold.last_seq
    {
        return Err(format!(
            "snapshot claims entry {} but the ledger ends at {}",
            s.last_seq, fold.last_seq
        ));
    }
    Ok(())
}

/// Sent, batched and dead records are pruned this long after the usage (see the outbox).
const PRUNED_AFTER_MS: i64 = 40 * 86_400_000;

/// A billable entry is in exactly one place of the outbox family, with its units.
fn check_billable(store: &Store, id: &AccountId, e: &LedgerEntry) -> Result<(), String> {
    let billable = match &e.kind {
        EntryKind::Consume(c) if c.outcome == crate::model::Outcome::Allowed => c.billable,
        EntryKind::Settled(r) => r.billable,
        _ => 0,
    };
    if billable == 0 {
        return Ok(());
    }
    let at = store
        .outbox_location(id, e.seq)
        .map_err(|err| err.to_string())?;
    let batch = match at.batch_first {
        Some(first) if first != e.seq => Some(
            store
                .outbox_location(id, first)
                .map_err(|err| err.to_string())?,
        ),
        _ => None,
    };
    // A merged member is accounted for by its batch; the first member's key holds the batch.
    let (place, own) = match (&batch, at.batch_first) {
        (Some(b), _) => (b, false),
        (None, Some(_)) => (&at, false),
        (None, None) => (&at, true),
    };
    let homes = [place.queued.is_some(), place.dead.is_some(), place.sent]
        .iter()
        .filter(|x| **x)
        .count();
    let pruned = e.at_ms < crate::model::Clock::System.now_ms() - PRUNED_AFTER_MS;
    match homes {
        1 => {}
        0 if pruned => return Ok(()),
        0 => {
            return Err(format!(
                "billable entry {} ({billable} units) is in none of outbox, sent, dead",
                e.seq
            ));
        }
        _ => {
            return Err(format!(
                "billable entry {} is in {homes} of outbox, sent, dead at once",
                e.seq
            ));
        }
    }
    if own
        && let Some(r) = place.queued.as_ref().or(place.dead.as_ref())
        && r.batch.is_none()
        && r.item.value != billable
    {
        return Err(format!(
            "billable entry {} bills {billable} units, its outbox record {}",
            e.seq, r.item.value
        ));
    }
    Ok(())
}

/// A snapshot's balances as this release folds them: older releases kept spent grants.
fn pruned(b: &crate::ledger::Balances) -> crate::ledger::Balances {
    let mut b = b.clone();
    b.prune_spent_grants();
    b
}
