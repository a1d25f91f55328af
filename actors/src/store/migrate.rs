//! The data dir's format version, checked at open: older formats are migrated in place, newer
//! ones refused.
//!
//! | format | written by | what changed |
//! |---|---|---|
//! | 1 | releases up to 7 | the first format (records in [`super::records::v1`]); the `meta` key was written once and never raised |
//! | 2 | release 8 | the `hashed_ids` index maps every hashed identifier back to its account |
//! | 3 | this release | expiring idempotency records live in generations `idem@{start}-{end}` (dropped whole); `notify` (never read) emptied |
//!
//! A migration is a step `n → n+1` that is idempotent (safe to run again after a crash half-way
//! through). The new version is recorded only after the step's writes are flushed, so a crash
//! at any point leaves either the old version (the step runs again at the next open) or the new
//! one with every step's data on disk. Records themselves never need rewriting: each tree's
//! values carry their own record version and old versions decode through their conversions.

use sled::Db;

use super::{FORMAT_VERSION, StoreError, codec};
use crate::identifier;
use crate::model::AccountId;

/// The `meta` key of the format version.
const FORMAT_KEY: &[u8] = b"format";

/// Checks the data dir's format and brings it to [`FORMAT_VERSION`]. A new data dir is
/// stamped with it. `dir` only names the data dir in errors and logs.
pub(super) fn check_and_migrate(db: &Db, dir: &std::path::Path) -> Result<(), StoreError> {
    let meta = db.open_tree("meta")?;
    let Some(v) = meta.get(FORMAT_KEY)? else {
        if has_data(db)? {
            // Every build since the first stamped the format at open; data without a stamp
            // was not written by meterd.
            return Err(StoreError::Corrupt {
                tree: "meta",
                detail: format!("{} holds data but no format version", dir.display()),
            });
        }
        meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
        db.flush()?;
        return Ok(());
    };
    let found = codec::decode_format(&v)?;
    if found > FORMAT_VERSION {
        return Err(StoreError::NewerFormat { found });
    }
    if found == 0 {
        return Err(StoreError::Corrupt {
            tree: "meta",
            detail: "format version 0".into(),
        });
    }
    for from in found..FORMAT_VERSION {
        let started = std::time::Instant::now();
        let detail = match from {
            1 => index_hashed_ids(db)?,
            2 => idem_generations(db)?,
            _ => unreachable!("a migration for every format below FORMAT_VERSION"),
        };
        db.flush()?;
        meta.insert(FORMAT_KEY, &(from + 1).to_be_bytes())?;
        db.flush()?;
        tracing::info!(
            data_dir = %dir.display(),
            from,
            to = from + 1,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "data dir format migrated: {detail}"
        );
    }
    Ok(())
}

fn has_data(db: &Db) -> Result<bool, StoreError> {
    for name in ["ledger", "accounts", "outbox", "webhooks"] {
        if !db.open_tree(name)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// 1 → 2: the hash index of every account whose identifiers may be hashed. Every account has
/// a ledger (its first entry creates it), so the ledger's accounts are all of them.
fn index_hashed_ids(db: &Db) -> Result<String, StoreError> {
    let ledger = db.open_tree("ledger")?;
    let index = db.open_tree(super::HASHED_IDS)?;
    let (mut accounts, mut indexed) = (0u64, 0u64);
    let mut from: Vec<u8> = Vec::new();
    while let Some(item) = ledger.range(from.as_slice()..).next() {
        let (k, _) = item?;
        let (account, _) = codec::split_ledger_key(&k)?;
        accounts += 1;
        if identifier::may_be_hashed(&account) {
            index.insert(identifier::hashed(&account), account.as_str().as_bytes())?;
            indexed += 1;
        }
        from = codec::account_prefix(&account);
        from.pop();
        from.push(1);
    }
    Ok(format!(
        "indexed the hashed identifiers of {indexed} of {accounts} accounts"
    ))
}

/// 2 → 3: move every expiring idempotency record from the single `idem` tree into the
/// generation of its time (the janitor then drops whole generations), and empty the `notify`
/// queue, which nothing ever read (alerts stay in their ledger entries). Idempotent: a record
/// is written to its generation before it leaves `idem`.
fn idem_generations(db: &Db) -> Result<String, StoreError> {
    let notify = db.open_tree("notify")?;
    let dropped = notify.len();
    notify.clear()?;
    let idem = db.open_tree("idem")?;
    let mut gens = super::idem::Generations::open(db)?;
    let (mut records, mut moved) = (0u64, 0u64);
    for item in idem.iter() {
        let (k, v) = item?;
        records += 1;
        // `account 0x00 op key`: account ids never contain 0x00.
        let op = k
            .iter()
            .position(|b| *b == 0)
            .and_then(|i| k.get(i + 1))
            .copied();
        let kept =
            op == Some(super::IdemOp::Topup as u8) || op == Some(super::IdemOp::Stripe as u8);
        if !kept {
            gens.put(&k, &v, codec::decode_idem(&v)?.at_ms)?;
            idem.remove(&k)?;
            moved += 1;
        }
    }
    let linked = index_customers(db)?;
    Ok(format!(
        "moved {moved} of {records} idempotency records into generations; dropped {dropped} unread notifications; indexed {linked} Stripe customers"
    ))
}

/// Every account's Stripe customer (its latest `AccountUpserted` names it) maps back to it in
/// `customers`: releases before the index linked customers only from then on. An existing
/// link is left as it is.
fn index_customers(db: &Db) -> Result<u64, StoreError> {
    let ledger = db.open_tree("ledger")?;
    let customers = db.open_tree("customers")?;
    let mut latest: std::collections::BTreeMap<AccountId, String> = Default::default();
    for item in ledger.iter() {
        let (k, v) = item?;
        if let crate::ledger::EntryKind::AccountUpserted(p) = codec::decode_entry(&v)?.kind {
            let (account, _) = codec::split_ledger_key(&k)?;
            match p.stripe_customer_id {
                Some(c) => latest.insert(account, c),
                None => latest.remove(&account),
            };
        }
    }
    let mut linked = 0;
    for (account, customer) in latest {
        if customers
            .compare_and_swap(
                customer.as_bytes(),
                None as Option<&[u8]>,
                Some(account.as_str().as_bytes()),
            )?
            .is_ok()
        {
            linked += 1;
        }
    }
    Ok(linked)
}

/// The account whose hashed id is `hash`, from the index.
pub(super) fn account_of_hashed(
    index: &sled::Tree,
    hash: &str,
) -> Result<Option<AccountId>, StoreError> {
    let Some(v) = index.get(hash.as_bytes())? else {
        return Ok(None);
    };
    std::str::from_utf8(&v)
        .ok()
        .and_then(|s| AccountId::parse(s).ok())
        .map(Some)
        .ok_or_else(|| StoreError::Corrupt {
            tree: super::HASHED_IDS,
            detail: "an invalid account id".into(),
        })
}
