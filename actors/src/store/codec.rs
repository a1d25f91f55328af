//! Versioned bincode 2 records and sortable keys.
//!
//! Every stored value is an enum whose variant is its record version, over the frozen types of
//! [`super::records`] (never a domain type), so a later build reads old records and refuses
//! records it does not know. Integer key parts are big-endian so sled's byte order is numeric
//! order.

use bincode::{Decode, Encode};

use super::records::{Freeze, v1};
use super::{AccountSnapshot, IdemOp, IdemRecord, StoreError};
use crate::ledger::LedgerEntry;
use crate::model::{AccountId, UnixMs};

/// A `ledger` value.
#[derive(Debug, Encode, Decode)]
pub enum StoredEntry {
    V1(v1::LedgerEntry),
}

/// An `accounts` value.
#[derive(Debug, Encode, Decode)]
pub enum StoredSnapshot {
    /// Release 6: before accounts held Stripe billing state (read back with an empty one: no
    /// build before V2 wrote `Stripe` entries).
    V1(Box<v1::SnapshotV1>),
    V2(Box<v1::AccountSnapshot>),
    /// Issue 12: V2 and the balances' credit debt, clawbacks and open disputes.
    V3 {
        snapshot: Box<v1::AccountSnapshot>,
        extra: v1::BalancesExtra,
    },
}

/// A `notify` value.
#[derive(Debug, Encode, Decode)]
pub enum StoredNotification {
    V1 {
        account: String,
        seq: u64,
        alert: v1::Alert,
    },
}

/// Nothing writes `notify` until a notifier drains it; the golden tests keep the shape.
#[cfg(test)]
pub(super) fn encode_notification(
    account: &str,
    seq: u64,
    alert: &crate::model::Alert,
) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredNotification::V1 {
            account: account.to_owned(),
            seq,
            alert: Freeze::freeze(alert),
        },
        "notify",
    )
}

pub(super) fn decode_notification(
    bytes: &[u8],
) -> Result<(String, u64, crate::model::Alert), StoreError> {
    match dec::<StoredNotification>(bytes, "notify")? {
        StoredNotification::V1 {
            account,
            seq,
            alert,
        } => Ok((account, seq, alert.thaw())),
    }
}

/// A billable ledger entry on its way to Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// An `outbox` or `dead` value.
#[derive(Debug, Encode, Decode)]
pub enum StoredOutbox {
    /// Release 6, before aggregation. Decoded as attempted (the build that wrote it may have
    /// sent it), so it is never merged into a batch.
    V1(v1::OutboxItem),
    V2 {
        item: v1::OutboxItem,
        batch: Option<v1::OutboxBatch>,
        attempted: bool,
    },
}

pub(super) fn encode_outbox(r: &OutboxRecord) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredOutbox::V2 {
            item: Freeze::freeze(&r.item),
            batch: Freeze::freeze(&r.batch),
            attempted: r.attempted,
        },
        "outbox",
    )
}

/// Encodes a just-queued entry (never sent, not a batch).
pub(super) fn encode_fresh_outbox(item: &OutboxItem) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredOutbox::V2 {
            item: Freeze::freeze(item),
            batch: None,
            attempted: false,
        },
        "outbox",
    )
}

pub(super) fn decode_outbox(bytes: &[u8]) -> Result<OutboxRecord, StoreError> {
    match dec::<StoredOutbox>(bytes, "outbox")? {
        StoredOutbox::V1(item) => Ok(OutboxRecord {
            item: item.thaw(),
            batch: None,
            attempted: true,
        }),
        StoredOutbox::V2 {
            item,
            batch,
            attempted,
        } => Ok(OutboxRecord {
            item: item.thaw(),
            batch: batch.thaw(),
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

/// The most bytes one record may claim while decoding. Without a limit, a corrupted length
/// prefix makes bincode allocate whatever it says (the decoder fuzzing found an abort on a
/// 10 PiB allocation); with it, such a record is `Corrupt`. The limit does not change the
/// encoding, and no record comes near it (ledger entries and snapshots are kilobytes).
const DECODE_LIMIT: usize = 64 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
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
    enc(&StoredEntry::V1(Freeze::freeze(e)), "ledger")
}

pub(super) fn decode_entry(bytes: &[u8]) -> Result<LedgerEntry, StoreError> {
    match dec::<StoredEntry>(bytes, "ledger")? {
        StoredEntry::V1(e) => Ok(e.thaw()),
    }
}

pub(super) fn encode_snapshot(s: &AccountSnapshot) -> Result<Vec<u8>, StoreError> {
    enc(
        &StoredSnapshot::V3 {
            snapshot: Box::new(v1::AccountSnapshot::freeze(s)),
            extra: v1::BalancesExtra::of(&s.balances),
        },
        "accounts",
    )
}

pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<AccountSnapshot, StoreError> {
    match dec::<StoredSnapshot>(bytes, "accounts")? {
        StoredSnapshot::V1(s) => Ok(AccountSnapshot {
            billing: Default::default(),
            profile: s.profile.thaw(),
            balances: s.balances.thaw(),
            last_seq: s.last_seq,
        }),
        StoredSnapshot::V2(s) => Ok((*s).thaw()),
        StoredSnapshot::V3 { snapshot, extra } => {
            let mut s = (*snapshot).thaw();
            extra.restore(&mut s.balances);
            Ok(s)
        }
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
    fn outbox_records_of_release_6_still_decode_and_are_never_merged() {
        let item = OutboxItem {
            meter: "tokens".into(),
            value: 9,
            at_ms: 1_700_000_000_000,
            attempts: 0,
            next_at_ms: 1_700_000_000_000,
            last_error: None,
        };
        let v1 = enc(&StoredOutbox::V1(Freeze::freeze(&item)), "outbox").unwrap();
        assert_eq!(v1[0], 0);
        let r = decode_outbox(&v1).unwrap();
        assert_eq!(r.item, item);
        assert_eq!(r.batch, None);
        assert!(
            r.attempted,
            "it may have been sent under its own identifier"
        );
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
        assert_eq!(decode_outbox(&v2).unwrap(), rec);
        assert_eq!(
            decode_outbox(&encode_fresh_outbox(&item).unwrap()).unwrap(),
            OutboxRecord::fresh(item)
        );
        let mark = encode_mark(7, -3);
        assert_eq!(decode_mark(&mark).unwrap(), (7, -3));
        assert!(decode_mark(&mark[..8]).is_err());
    }

    /// A length prefix claiming more than the limit is refused, not allocated.
    #[test]
    fn a_huge_claimed_length_is_corrupt_not_an_allocation() {
        // Variant 0 of a record holding a string, with a varint length of 2^60.
        let mut b = vec![0u8, 253];
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_entry(&b).is_err());
        assert!(decode_snapshot(&b).is_err());
        assert!(decode_outbox(&b).is_err());
    }

    #[test]
    fn big_endian_sequence_numbers_sort_as_numbers() {
        let a = AccountId::parse("x").unwrap();
        assert!(ledger_key(&a, 255) < ledger_key(&a, 256));
        assert!(ledger_key(&a, 1) < ledger_key(&a, u64::MAX));
        let k = ledger_key(&a, 0x0102_0304_0506_0708);
        assert_eq!(seq_of_key(&k, 2).unwrap(), 0x0102_0304_0506_0708);
    }

    /// Fuzzing (issue 11): no decoder panics, whatever the bytes (a torn write, a bit flip,
    /// a record of a later release): each answers a record or an error.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn decode_all(b: &[u8]) {
            let _ = decode_notification(b);
            let _ = decode_outbox(b);
            let _ = decode_mark(b);
            let _ = decode_sent_at(b);
            let _ = decode_entry(b);
            let _ = decode_snapshot(b);
            let _ = decode_idem(b);
            let _ = decode_format(b);
            let _ = crate::store::events::decode_webhook(b);
            let _ = crate::store::events::decode_meter_error(b);
            let _ = crate::store::events::decode_pending_topup(b);
            let _ = crate::store::recon::decode_recon_window(b);
            let _ = crate::store::recon::decode_repair(b);
            let _ = crate::store::recon::decode_recon_run(b);
        }

        /// Valid encodings to mutate: most random bytes fail at the version tag.
        fn samples() -> Vec<Vec<u8>> {
            let item = OutboxItem {
                meter: "tokens".into(),
                value: 9,
                at_ms: 1_700_000_000_000,
                attempts: 2,
                next_at_ms: 1_700_000_000_000,
                last_error: Some("boom".into()),
            };
            vec![
                encode_idem(IdemRecord { seq: 7, at_ms: 1 }).unwrap(),
                encode_fresh_outbox(&item).unwrap(),
                encode_outbox(&OutboxRecord {
                    item,
                    batch: Some(OutboxBatch {
                        last_seq: 12,
                        members: 4,
                        window_ms: 60_000,
                    }),
                    attempted: true,
                })
                .unwrap(),
                encode_mark(3, 4).to_vec(),
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
                decode_all(&b);
            }

            #[test]
            fn mutated_records_never_panic(
                which in 0usize..4,
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                cut in any::<usize>(),
            ) {
                let mut b = samples().swap_remove(which);
                for (at, v) in flips {
                    let n = b.len();
                    b[at % n] = v;
                }
                decode_all(&b);
                let keep = cut % (b.len() + 1);
                decode_all(&b[..keep]);
            }
        }
    }
}
