//! `meterd ledger verify`: recompute every account from its ledger and compare.
//!
//! For every account with a ledger, folds all entries from the first (each entry's recorded
//! balances must follow from the ones before), then checks that the derived snapshot, if any,
//! equals the fold at its sequence number, and that every idempotency key in the ledger that is
//! still indexed points at its entry. Read-only.

use crate::ledger::AccountFold;
use crate::model::AccountId;
use crate::store::{Store, StoreError};

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
            if let Some(s) = &snapshot
                && s.last_seq == e.seq
                && (Some(&pruned(&s.balances)) != fold.balances.as_ref()
                    || Some(&s.profile) != fold.profile.as_ref())
            {
                return Err(format!(
                    "snapshot at entry {} differs from the fold of the ledger",
                    s.last_seq
                ));
            }
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

/// A snapshot's balances as this release folds them: older releases kept spent grants.
fn pruned(b: &crate::ledger::Balances) -> crate::ledger::Balances {
    let mut b = b.clone();
    b.prune_spent_grants();
    b
}
