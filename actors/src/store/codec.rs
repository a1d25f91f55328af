//! Versioned bincode 2 records and sortable keys.
//!
//! Every stored value is an enum whose variant is its format version, so a later build can
//! read old records and refuse records it does not know. Integer key parts are big-endian so
//! sled's byte order is numeric order.

use bincode::{Decode, Encode};

use super::{AccountSnapshot, IdemOp, IdemRecord, StoreError};
use crate::ledger::LedgerEntry;
use crate::model::{AccountId, UnixMs};

#[derive(Debug, Encode, Decode)]
pub enum StoredEntry {
    V1(LedgerEntry),
}

/// Encodes exactly like [`StoredEntry`] without cloning the entry.
#[derive(Encode)]
enum StoredEntryRef<'a> {
    V1(&'a LedgerEntry),
}

#[derive(Encode)]
enum StoredSnapshotRef<'a> {
    V1(&'a AccountSnapshot),
}

#[derive(Debug, Encode, Decode)]
pub enum StoredSnapshot {
    V1(AccountSnapshot),
}

#[derive(Debug, Encode, Decode)]
pub enum StoredNotification {
    V1 {
        account: String,
        seq: u64,
        alert: crate::ledger::Alert,
    },
}

pub(super) fn encode_notification(
    account: &str,
    seq: u64,
    alert: &crate::ledger::Alert,
) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredNotification::V1 {
            account: account.to_owned(),
            seq,
            alert: alert.clone(),
        },
        "notify",
    )
}

pub(super) fn decode_notification(
    bytes: &[u8],
) -> Result<(String, u64, crate::ledger::Alert), StoreError> {
    match dec::<StoredNotification>(bytes, "notify")? {
        StoredNotification::V1 {
            account,
            seq,
            alert,
        } => Ok((account, seq, alert)),
    }
}

/// A billable ledger entry on its way to Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct OutboxItem {
    pub meter: String,
    /// Billable units.
    pub value: u64,
    /// When the usage happened (the entry's time).
    pub at_ms: UnixMs,
    pub attempts: u32,
    /// Not before this time (backoff).
    pub next_at_ms: UnixMs,
    pub last_error: Option<String>,
}

#[derive(Debug, Encode, Decode)]
pub enum StoredOutbox {
    V1(OutboxItem),
}

pub(super) fn encode_outbox(i: &OutboxItem) -> Result<Vec<u8>, StoreError> {
    enc(&StoredOutbox::V1(i.clone()), "outbox")
}

pub(super) fn decode_outbox(bytes: &[u8]) -> Result<OutboxItem, StoreError> {
    match dec::<StoredOutbox>(bytes, "outbox")? {
        StoredOutbox::V1(i) => Ok(i),
    }
}

pub(super) fn split_ledger_key(key: &[u8]) -> Result<(AccountId, u64), StoreError> {
    let sep = key
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| StoreError::Corrupt {
            tree: "outbox",
            detail: "key without separator".into(),
        })?;
    let id = std::str::from_utf8(&key[..sep])
        .ok()
        .and_then(|s| AccountId::parse(s).ok())
        .ok_or_else(|| StoreError::Corrupt {
            tree: "outbox",
            detail: "key with an invalid account id".into(),
        })?;
    Ok((id, seq_of_key(key, sep + 1)?))
}

#[derive(Debug, Encode, Decode)]
pub enum StoredIdem {
    V1 { seq: u64, at_ms: UnixMs },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

fn enc<T: Encode>(v: &T, tree: &'static str) -> Result<Vec<u8>, StoreError> {
    bincode::encode_to_vec(v, config()).map_err(|e| StoreError::Corrupt {
        tree,
        detail: e.to_string(),
    })
}

fn dec<T: Decode<()>>(bytes: &[u8], tree: &'static str) -> Result<T, StoreError> {
    let (v, used) =
        bincode::decode_from_slice(bytes, config()).map_err(|e| StoreError::Corrupt {
            tree,
            detail: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(StoreError::Corrupt {
            tree,
            detail: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(v)
}

pub(super) fn encode_entry(e: &LedgerEntry) -> Result<Vec<u8>, StoreError> {
    enc(&StoredEntryRef::V1(e), "ledger")
}

pub(super) fn decode_entry(bytes: &[u8]) -> Result<LedgerEntry, StoreError> {
    match dec::<StoredEntry>(bytes, "ledger")? {
        StoredEntry::V1(e) => Ok(e),
    }
}

pub(super) fn encode_snapshot(s: &AccountSnapshot) -> Result<Vec<u8>, StoreError> {
    enc(&StoredSnapshotRef::V1(s), "accounts")
}

pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<AccountSnapshot, StoreError> {
    match dec::<StoredSnapshot>(bytes, "accounts")? {
        StoredSnapshot::V1(s) => Ok(s),
    }
}

pub(super) fn encode_idem(r: IdemRecord) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredIdem::V1 {
            seq: r.seq,
            at_ms: r.at_ms,
        },
        "idem",
    )
}

pub(super) fn decode_idem(bytes: &[u8]) -> Result<IdemRecord, StoreError> {
    match dec::<StoredIdem>(bytes, "idem")? {
        StoredIdem::V1 { seq, at_ms } => Ok(IdemRecord { seq, at_ms }),
    }
}

pub(super) fn decode_format(bytes: &[u8]) -> Result<u32, StoreError> {
    let arr: [u8; 4] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        tree: "meta",
        detail: "format version is not 4 bytes".into(),
    })?;
    Ok(u32::from_be_bytes(arr))
}

/// `account_id 0x00`: the prefix of all of one account's keys.
pub(super) fn account_prefix(account: &AccountId) -> Vec<u8> {
    let mut k = Vec::with_capacity(account.as_str().len() + 9);
    k.extend_from_slice(account.as_str().as_bytes());
    k.push(0);
    k
}

pub(super) fn ledger_key(account: &AccountId, seq: u64) -> Vec<u8> {
    let mut k = account_prefix(account);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn seq_of_key(key: &[u8], prefix_len: usize) -> Result<u64, StoreError> {
    let tail: [u8; 8] = key
        .get(prefix_len..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt {
            tree: "ledger",
            detail: "key without an 8-byte sequence number".into(),
        })?;
    Ok(u64::from_be_bytes(tail))
}

pub(super) fn idem_key(account: &AccountId, op: IdemOp, key: &str) -> Vec<u8> {
    let mut k = account_prefix(account);
    k.push(op as u8);
    k.extend_from_slice(key.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_starts_with_its_version_tag() {
        let bytes = encode_idem(IdemRecord { seq: 7, at_ms: 1 }).unwrap();
        assert_eq!(bytes[0], 0, "V1 is variant 0");
        assert_eq!(
            decode_idem(&bytes).unwrap(),
            IdemRecord { seq: 7, at_ms: 1 }
        );
        let mut unknown = bytes.clone();
        unknown[0] = 1;
        assert!(decode_idem(&unknown).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(decode_idem(&trailing).is_err());
    }

    #[test]
    fn borrowed_and_owned_encodings_are_identical() {
        use crate::ledger::{EntryKind, LedgerEntry};
        use crate::model::Period;
        let e = LedgerEntry {
            seq: 3,
            at_ms: 4,
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
        };
        let owned = bincode::encode_to_vec(StoredEntry::V1(e.clone()), config()).unwrap();
        assert_eq!(encode_entry(&e).unwrap(), owned);
        assert_eq!(decode_entry(&owned).unwrap(), e);
    }

    #[test]
    fn big_endian_sequence_numbers_sort_as_numbers() {
        let a = AccountId::parse("x").unwrap();
        assert!(ledger_key(&a, 255) < ledger_key(&a, 256));
        assert!(ledger_key(&a, 1) < ledger_key(&a, u64::MAX));
        let k = ledger_key(&a, 0x0102_0304_0506_0708);
        assert_eq!(seq_of_key(&k, 2).unwrap(), 0x0102_0304_0506_0708);
    }
}
