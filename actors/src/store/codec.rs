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
    #[cfg_attr(not(test), allow(dead_code))]
    V1(&'a SnapshotV1),
    V2(&'a AccountSnapshot),
}

/// A snapshot written before accounts held Stripe billing state (which is then empty: no
/// build before V2 wrote `Stripe` entries).
#[derive(Debug, Clone, Encode, Decode)]
pub struct SnapshotV1 {
    pub profile: crate::ledger::AccountProfile,
    pub balances: crate::ledger::Balances,
    pub last_seq: u64,
}

#[derive(Debug, Encode, Decode)]
pub enum StoredSnapshot {
    V1(Box<SnapshotV1>),
    V2(Box<AccountSnapshot>),
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

/// Several billable ledger entries of one account and meter, merged into one meter event.
/// The record's key holds the first entry's seq; the members' keys are in the `batched` tree.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct OutboxBatch {
    /// The last member's seq: the event's identifier names `first-last`.
    pub last_seq: u64,
    /// How many ledger entries were merged (the range may hold entries of other meters).
    pub members: u32,
    /// The aggregation window the batch was formed in (its `at_ms` is the window start, or a
    /// billing-period boundary inside the window).
    pub window_ms: i64,
}

/// What the `outbox` and `dead` trees hold under one key: one ledger entry, or a batch of
/// several (keyed by the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub item: OutboxItem,
    pub batch: Option<OutboxBatch>,
    /// A send was (or may have been) attempted under this record's identifier, so Stripe may
    /// have it: the record is never merged into a batch. Written durably before the first send.
    pub attempted: bool,
}

impl OutboxRecord {
    /// A ledger entry just queued: never sent, not a batch.
    pub fn fresh(item: OutboxItem) -> OutboxRecord {
        OutboxRecord {
            item,
            batch: None,
            attempted: false,
        }
    }
}

#[derive(Debug, Encode, Decode)]
pub enum StoredOutbox {
    /// Written before aggregation existed. Decoded as attempted (the build that wrote it may
    /// have sent it), so it is never merged into a batch.
    V1(OutboxItem),
    V2 {
        item: OutboxItem,
        batch: Option<OutboxBatch>,
        attempted: bool,
    },
}

/// Encodes exactly like [`StoredOutbox::V2`] without cloning.
#[derive(Encode)]
enum StoredOutboxRef<'a> {
    #[allow(dead_code)]
    V1(&'a OutboxItem),
    V2 {
        item: &'a OutboxItem,
        batch: &'a Option<OutboxBatch>,
        attempted: bool,
    },
}

pub(super) fn encode_outbox(r: &OutboxRecord) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredOutboxRef::V2 {
            item: &r.item,
            batch: &r.batch,
            attempted: r.attempted,
        },
        "outbox",
    )
}

/// Encodes a just-queued entry (never sent, not a batch) without cloning it.
pub(super) fn encode_fresh_outbox(item: &OutboxItem) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredOutboxRef::V2 {
            item,
            batch: &None,
            attempted: false,
        },
        "outbox",
    )
}

pub(super) fn decode_outbox(bytes: &[u8]) -> Result<OutboxRecord, StoreError> {
    match dec::<StoredOutbox>(bytes, "outbox")? {
        StoredOutbox::V1(item) => Ok(OutboxRecord {
            item,
            batch: None,
            attempted: true,
        }),
        StoredOutbox::V2 {
            item,
            batch,
            attempted,
        } => Ok(OutboxRecord {
            item,
            batch,
            attempted,
        }),
    }
}

/// A `batched` mark: the member's batch (its first seq) and when the batch was formed.
pub(super) fn encode_mark(first_seq: u64, at_ms: UnixMs) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&first_seq.to_be_bytes());
    v[8..].copy_from_slice(&at_ms.to_be_bytes());
    v
}

/// `(first_seq, formed_at_ms)` of a `batched` mark.
pub(super) fn decode_mark(bytes: &[u8]) -> Result<(u64, UnixMs), StoreError> {
    let arr: [u8; 16] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        tree: "batched",
        detail: "mark is not 16 bytes".into(),
    })?;
    let (a, b) = arr.split_at(8);
    let first = u64::from_be_bytes(a.try_into().unwrap_or_default());
    let at = i64::from_be_bytes(b.try_into().unwrap_or_default());
    Ok((first, at))
}

/// The time in a `sent` record (8 bytes, big-endian ms).
pub(super) fn decode_sent_at(bytes: &[u8]) -> Result<UnixMs, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        tree: "sent",
        detail: "delivery time is not 8 bytes".into(),
    })?;
    Ok(i64::from_be_bytes(arr))
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

pub(super) fn enc<T: Encode>(v: &T, tree: &'static str) -> Result<Vec<u8>, StoreError> {
    bincode::encode_to_vec(v, config()).map_err(|e| StoreError::Corrupt {
        tree,
        detail: e.to_string(),
    })
}

pub(super) fn dec<T: Decode<()>>(bytes: &[u8], tree: &'static str) -> Result<T, StoreError> {
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
    enc(&StoredSnapshotRef::V2(s), "accounts")
}

pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<AccountSnapshot, StoreError> {
    match dec::<StoredSnapshot>(bytes, "accounts")? {
        StoredSnapshot::V1(s) => Ok(AccountSnapshot {
            billing: Default::default(),
            profile: s.profile,
            balances: s.balances,
            last_seq: s.last_seq,
        }),
        StoredSnapshot::V2(s) => Ok(*s),
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
    fn a_snapshot_written_before_billing_state_reads_back_with_an_empty_one() {
        use crate::ledger::{AccountProfile, Balances};
        use crate::model::Period;
        use crate::plan::SubscriptionStatus;
        let v1 = SnapshotV1 {
            profile: AccountProfile {
                plan: "free".into(),
                seats: 1,
                email: None,
                stripe_customer_id: Some("cus_1".into()),
                metadata: Vec::new(),
                created_at_ms: 1,
                status: SubscriptionStatus::Active,
                status_since_ms: 1,
                overrides: Default::default(),
                spend_cap: None,
            },
            balances: Balances::new(Period {
                start_ms: 0,
                end_ms: 10,
            }),
            last_seq: 9,
        };
        let old = enc(&StoredSnapshotRef::V1(&v1), "accounts").unwrap();
        assert_eq!(old[0], 0, "V1 is variant 0");
        let s = decode_snapshot(&old).unwrap();
        assert_eq!((s.last_seq, s.profile.plan.as_str()), (9, "free"));
        assert_eq!(s.billing, Default::default());
        let new = encode_snapshot(&s).unwrap();
        assert_eq!(new[0], 1, "written as V2");
        assert_eq!(decode_snapshot(&new).unwrap(), s);
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
    fn outbox_records_of_the_first_format_still_decode_and_are_never_merged() {
        let item = OutboxItem {
            meter: "tokens".into(),
            value: 9,
            at_ms: 1_700_000_000_000,
            attempts: 0,
            next_at_ms: 1_700_000_000_000,
            last_error: None,
        };
        // What the build before aggregation wrote.
        let v1 = bincode::encode_to_vec(StoredOutbox::V1(item.clone()), config()).unwrap();
        assert_eq!(v1[0], 0);
        let r = decode_outbox(&v1).unwrap();
        assert_eq!(r.item, item);
        assert_eq!(r.batch, None);
        assert!(
            r.attempted,
            "it may have been sent under its own identifier"
        );
        // New records are V2, written by reference exactly as the owned enum.
        let rec = OutboxRecord {
            item: item.clone(),
            batch: Some(OutboxBatch {
                last_seq: 12,
                members: 4,
                window_ms: 60_000,
            }),
            attempted: false,
        };
        let v2 = encode_outbox(&rec).unwrap();
        assert_eq!(v2[0], 1, "V2 is variant 1");
        let owned = bincode::encode_to_vec(
            StoredOutbox::V2 {
                item: rec.item.clone(),
                batch: rec.batch.clone(),
                attempted: false,
            },
            config(),
        )
        .unwrap();
        assert_eq!(v2, owned);
        assert_eq!(decode_outbox(&v2).unwrap(), rec);
        assert_eq!(
            decode_outbox(&encode_fresh_outbox(&item).unwrap()).unwrap(),
            OutboxRecord::fresh(item)
        );
        let mark = encode_mark(7, -3);
        assert_eq!(decode_mark(&mark).unwrap(), (7, -3));
        assert!(decode_mark(&mark[..8]).is_err());
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
