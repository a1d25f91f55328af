//! The webhook event log and the Stripe customer index.

use super::codec::{dec, enc, ledger_key, split_ledger_key};
use super::records::{Freeze, v1};
use super::{Store, StoreError};
use crate::model::{AccountId, UnixMs};

/// Where an event in the log is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookStatus {
    /// Waiting to be applied (first time or after a failure, at `next_at_ms`).
    Pending,
    /// Applied to its account(s) (possibly as stale: see `outcome`).
    Applied,
    /// Nothing to do (a type meterd does not handle, or no account concerned).
    Ignored,
    /// Gave up after `max_attempts` or on a permanent error; an admin may replay it.
    Failed,
}

impl WebhookStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookStatus::Pending => "pending",
            WebhookStatus::Applied => "applied",
            WebhookStatus::Ignored => "ignored",
            WebhookStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            WebhookStatus::Pending,
            WebhookStatus::Applied,
            WebhookStatus::Ignored,
            WebhookStatus::Failed,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// How an event reached the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    Webhook,
    /// Listed from Stripe's events API by a backfill.
    Backfill,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Webhook => "webhook",
            EventSource::Backfill => "backfill",
        }
    }
}

/// One Stripe event in the log (its body is stored apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub id: String,
    pub event_type: String,
    /// The event's `created`, unix seconds.
    pub created_s: i64,
    pub received_ms: UnixMs,
    pub source: EventSource,
    /// A v2 thin event (the full event is fetched before applying).
    pub thin: bool,
    pub status: WebhookStatus,
    pub attempts: u32,
    pub next_at_ms: UnixMs,
    pub last_error: Option<String>,
    /// What applying it did, per account: `account: applied|stale|ignored (reason)`.
    pub outcome: Option<String>,
    pub settled_ms: Option<UnixMs>,
}

/// A meter event Stripe reported invalid after accepting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterErrorRecord {
    /// Stripe's error code (`meter_event_customer_not_found`, ...).
    pub code: String,
    /// The identifier Stripe named.
    pub identifier: String,
    /// The report (event id) that named it.
    pub event_id: String,
    pub reported_ms: UnixMs,
}

/// How long a pending top-up is kept: Checkout Sessions expire within a day, and a delayed
/// payment method (a bank debit) completes within about two weeks; Stripe's events list covers
/// 30 days.
pub const TOPUP_RETENTION: std::time::Duration = std::time::Duration::from_secs(40 * 86_400);

/// A top-up Checkout Session meterd created: what its completion must match to be credited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTopUp {
    pub account: String,
    pub package: String,
    /// Minor units of `currency`: the package's price.
    pub amount: u64,
    pub currency: String,
    pub customer: String,
    pub created_ms: UnixMs,
}

/// A `topups` value.
#[derive(Debug, bincode::Encode, bincode::Decode)]
enum StoredPendingTopUp {
    V1(v1::PendingTopUp),
}

pub(super) fn encode_pending_topup(r: &PendingTopUp) -> Result<Vec<u8>, StoreError> {
    enc(&StoredPendingTopUp::V1(Freeze::freeze(r)), "topups")
}

pub(super) fn decode_pending_topup(b: &[u8]) -> Result<PendingTopUp, StoreError> {
    match dec::<StoredPendingTopUp>(b, "topups")? {
        StoredPendingTopUp::V1(r) => Ok(r.thaw()),
    }
}

/// A top-up credited, under the payment (payment intent) that paid it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpPayment {
    pub account: String,
    /// The Checkout Session: the top-up grant's `external_id`.
    pub session_id: String,
    pub package: String,
    pub credits: u64,
    /// Minor units of `currency` paid.
    pub amount: u64,
    pub currency: String,
}

/// A `payments` value.
#[derive(Debug, bincode::Encode, bincode::Decode)]
enum StoredPayment {
    V1(v1::TopUpPayment),
}

pub(super) fn encode_payment(r: &TopUpPayment) -> Result<Vec<u8>, StoreError> {
    enc(&StoredPayment::V1(Freeze::freeze(r)), "payments")
}

pub(super) fn decode_payment(b: &[u8]) -> Result<TopUpPayment, StoreError> {
    match dec::<StoredPayment>(b, "payments")? {
        StoredPayment::V1(r) => Ok(r.thaw()),
    }
}

/// A `meter_errors` value.
#[derive(Debug, bincode::Encode, bincode::Decode)]
enum StoredMeterError {
    V1(v1::MeterErrorRecord),
}

/// A `webhooks` value.
#[derive(Debug, bincode::Encode, bincode::Decode)]
enum StoredWebhook {
    V1(v1::WebhookRecord),
}

pub(super) fn encode_webhook(r: &WebhookRecord) -> Result<Vec<u8>, StoreError> {
    enc(&StoredWebhook::V1(Freeze::freeze(r)), "webhooks")
}

pub(super) fn decode_webhook(b: &[u8]) -> Result<WebhookRecord, StoreError> {
    match dec::<StoredWebhook>(b, "webhooks")? {
        StoredWebhook::V1(r) => Ok(r.thaw()),
    }
}

pub(super) fn encode_meter_error(r: &MeterErrorRecord) -> Result<Vec<u8>, StoreError> {
    enc(&StoredMeterError::V1(Freeze::freeze(r)), "meter_errors")
}

pub(super) fn decode_meter_error(b: &[u8]) -> Result<MeterErrorRecord, StoreError> {
    match dec::<StoredMeterError>(b, "meter_errors")? {
        StoredMeterError::V1(r) => Ok(r.thaw()),
    }
}

impl Store {
    /// Adds a verified event to the log unless its id is there already. `Ok(true)`: new.
    /// The body goes first, so a logged record always has its body. Durable only after the
    /// next commit (the caller waits for a barrier before acknowledging, duplicates too).
    pub fn log_event(&self, rec: &WebhookRecord, body: &[u8]) -> Result<bool, StoreError> {
        let key = rec.id.as_bytes();
        if self.inner.webhooks.contains_key(key)? {
            return Ok(false);
        }
        self.inner.webhook_bodies.insert(key, body)?;
        let swapped = self.inner.webhooks.compare_and_swap(
            key,
            None as Option<&[u8]>,
            Some(encode_webhook(rec)?),
        )?;
        Ok(swapped.is_ok())
    }

    pub fn event(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        match self.inner.webhooks.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode_webhook(&v)?)),
            None => Ok(None),
        }
    }

    pub fn event_body(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .inner
            .webhook_bodies
            .get(id.as_bytes())?
            .map(|v| v.to_vec()))
    }

    /// Replaces the record of an event that is in the log.
    pub fn update_event(&self, rec: &WebhookRecord) -> Result<(), StoreError> {
        self.inner
            .webhooks
            .insert(rec.id.as_bytes(), encode_webhook(rec)?)?;
        Ok(())
    }

    /// Events in id order after `after`, optionally of one status, at most `limit`.
    pub fn events(
        &self,
        status: Option<WebhookStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<WebhookRecord>, StoreError> {
        let start: Vec<u8> = match after {
            Some(a) => {
                let mut k = a.as_bytes().to_vec();
                k.push(0);
                k
            }
            None => Vec::new(),
        };
        let mut out = Vec::new();
        for kv in self.inner.webhooks.range(start..) {
            let (k, v) = kv?;
            let Ok(r) = decode_webhook(&v) else {
                tracing::error!(key = %String::from_utf8_lossy(&k), "undecodable record in the stripe event log; skipped");
                continue;
            };
            if status.is_none_or(|s| s == r.status) {
                out.push(r);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Counts of events by status: pending, applied, ignored, failed.
    pub fn event_counts(&self) -> Result<[u64; 4], StoreError> {
        let mut c = [0u64; 4];
        for kv in self.inner.webhooks.iter() {
            let (_, v) = kv?;
            let Ok(r) = decode_webhook(&v) else { continue };
            let i = match r.status {
                WebhookStatus::Pending => 0,
                WebhookStatus::Applied => 1,
                WebhookStatus::Ignored => 2,
                WebhookStatus::Failed => 3,
            };
            c[i] += 1;
        }
        Ok(c)
    }

    /// Removes events received before `before_ms` that are no longer pending. Returns how
    /// many went.
    pub fn prune_events(&self, before_ms: UnixMs) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.inner.webhooks.iter() {
            let (k, v) = kv?;
            let r = decode_webhook(&v)?;
            if r.received_ms < before_ms && r.status != WebhookStatus::Pending {
                self.inner.webhooks.remove(&k)?;
                self.inner.webhook_bodies.remove(&k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    // ---- meter errors ----

    /// Records that Stripe reported the meter event of ledger entry `seq` (the first of a
    /// batch) invalid. A later report of the same entry replaces the earlier one.
    pub fn record_meter_error(
        &self,
        account: &AccountId,
        seq: u64,
        rec: &MeterErrorRecord,
    ) -> Result<(), StoreError> {
        self.inner
            .meter_errors
            .insert(ledger_key(account, seq), encode_meter_error(rec)?)?;
        Ok(())
    }

    /// Removes meter error reports received before `before_ms` (one pass). Returns how many
    /// went.
    pub fn prune_meter_errors(&self, before_ms: UnixMs) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.inner.meter_errors.iter() {
            let (k, v) = kv?;
            if decode_meter_error(&v)?.reported_ms < before_ms
                && self
                    .inner
                    .meter_errors
                    .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?
                    .is_ok()
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Up to `limit` reported meter events, in account and seq order.
    pub fn meter_errors(
        &self,
        limit: usize,
    ) -> Result<Vec<(AccountId, u64, MeterErrorRecord)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.meter_errors.iter().take(limit) {
            let (k, v) = kv?;
            let (a, seq) = split_ledger_key(&k)?;
            out.push((a, seq, decode_meter_error(&v)?));
        }
        Ok(out)
    }

    // ---- pending top-ups ----

    /// Records a top-up Checkout Session about to be created, under its `topup_id`.
    pub fn put_pending_topup(&self, id: &str, r: &PendingTopUp) -> Result<(), StoreError> {
        self.inner
            .topups
            .insert(id.as_bytes(), encode_pending_topup(r)?)?;
        Ok(())
    }

    /// The top-up meterd recorded under `id`, if it made one.
    pub fn pending_topup(&self, id: &str) -> Result<Option<PendingTopUp>, StoreError> {
        self.inner
            .topups
            .get(id.as_bytes())?
            .map(|v| decode_pending_topup(&v))
            .transpose()
    }

    /// Records the payment (payment intent `pi`) of a credited top-up. Idempotent: a
    /// redelivered event writes the same record.
    pub fn put_payment(&self, pi: &str, r: &TopUpPayment) -> Result<(), StoreError> {
        self.inner
            .payments
            .insert(pi.as_bytes(), encode_payment(r)?)?;
        Ok(())
    }

    /// The top-up paid by payment intent `pi`, if meterd credited one.
    pub fn payment(&self, pi: &str) -> Result<Option<TopUpPayment>, StoreError> {
        self.inner
            .payments
            .get(pi.as_bytes())?
            .map(|v| decode_payment(&v))
            .transpose()
    }

    /// Removes the pending top-ups created before `cutoff_ms` (a session completes within
    /// days; see [`TOPUP_RETENTION`]). A scan of the tree: it holds at most a few top-ups per
    /// account and is swept rarely. Returns how many went.
    pub fn prune_pending_topups(&self, cutoff_ms: UnixMs) -> Result<usize, StoreError> {
        let mut old = Vec::new();
        for kv in self.inner.topups.iter() {
            let (k, v) = kv?;
            // An unreadable record is kept (and reported by `verify` if it ever checks it).
            if decode_pending_topup(&v).is_ok_and(|r| r.created_ms < cutoff_ms) {
                old.push(k);
            }
        }
        for k in &old {
            self.inner.topups.remove(k)?;
        }
        Ok(old.len())
    }

    // ---- customers ----

    /// Records that Stripe customer `customer` belongs to `account`.
    pub fn link_customer(&self, customer: &str, account: &AccountId) -> Result<(), StoreError> {
        self.inner
            .customers
            .insert(customer.as_bytes(), account.as_str().as_bytes())?;
        Ok(())
    }

    /// Removes the link of `customer` if it is `account`'s (an account moved to another
    /// customer, or to none, frees its old one).
    pub fn unlink_customer(&self, customer: &str, account: &AccountId) -> Result<(), StoreError> {
        let _ = self.inner.customers.compare_and_swap(
            customer.as_bytes(),
            Some(account.as_str().as_bytes()),
            None as Option<&[u8]>,
        )?;
        Ok(())
    }

    /// Linked customers after `after`, in customer order: `(customer, account)`, at most
    /// `limit` (the reconciler's state pass pages through them).
    pub fn linked_customers(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, AccountId)>, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            tree: "customers",
            detail,
        };
        let range = match after {
            Some(a) => self.inner.customers.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.inner.customers.iter(),
        };
        let mut out = Vec::new();
        for kv in range.take(limit) {
            let (k, v) = kv?;
            let c = String::from_utf8(k.to_vec())
                .map_err(|_| corrupt("customer id is not UTF-8".into()))?;
            let a =
                std::str::from_utf8(&v).map_err(|_| corrupt("account id is not UTF-8".into()))?;
            out.push((c, AccountId::parse(a).map_err(|e| corrupt(e.to_string()))?));
        }
        Ok(out)
    }

    /// The account linked to Stripe customer `customer`.
    pub fn customer_account(&self, customer: &str) -> Result<Option<AccountId>, StoreError> {
        let Some(v) = self.inner.customers.get(customer.as_bytes())? else {
            return Ok(None);
        };
        let s = std::str::from_utf8(&v).map_err(|_| StoreError::Corrupt {
            tree: "customers",
            detail: "account id is not UTF-8".into(),
        })?;
        AccountId::parse(s)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                tree: "customers",
                detail: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreConfig, SyncMode};

    fn record(id: &str, received_ms: i64, status: WebhookStatus) -> WebhookRecord {
        WebhookRecord {
            id: id.into(),
            event_type: "invoice.paid".into(),
            created_s: 1,
            received_ms,
            source: EventSource::Webhook,
            thin: false,
            status,
            attempts: 0,
            next_at_ms: received_ms,
            last_error: None,
            outcome: None,
            settled_ms: None,
        }
    }

    #[tokio::test]
    async fn pending_topups_are_kept_until_pruned_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Flush,
            cache_capacity_bytes: 16 << 20,
        })
        .unwrap();
        for (id, created_ms) in [("tu_old", 10), ("tu_new", 30)] {
            let rec = PendingTopUp {
                account: "acct".into(),
                package: "credits_500".into(),
                amount: 500,
                currency: "usd".into(),
                customer: "cus_1".into(),
                created_ms,
            };
            store.put_pending_topup(id, &rec).unwrap();
        }
        assert_eq!(store.pending_topup("tu_old").unwrap().unwrap().amount, 500);
        assert_eq!(store.pending_topup("tu_nope").unwrap(), None);
        assert_eq!(store.prune_pending_topups(20).unwrap(), 1);
        assert_eq!(store.pending_topup("tu_old").unwrap(), None);
        assert!(store.pending_topup("tu_new").unwrap().is_some());
        assert_eq!(store.prune_pending_topups(20).unwrap(), 0);
    }

    #[tokio::test]
    async fn meter_error_reports_are_pruned_after_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Flush,
            cache_capacity_bytes: 16 << 20,
        })
        .unwrap();
        let a = AccountId::parse("acct").unwrap();
        for (seq, reported_ms) in [(1, 10), (2, 20), (3, 30)] {
            let rec = MeterErrorRecord {
                code: "meter_event_customer_not_found".into(),
                identifier: format!("acct:{seq}"),
                event_id: format!("evt_{seq}"),
                reported_ms,
            };
            store.record_meter_error(&a, seq, &rec).unwrap();
        }
        assert_eq!(store.prune_meter_errors(25).unwrap(), 2);
        let left: Vec<u64> = store
            .meter_errors(10)
            .unwrap()
            .into_iter()
            .map(|(_, s, _)| s)
            .collect();
        assert_eq!(left, vec![3]);
        assert_eq!(store.prune_meter_errors(25).unwrap(), 0);
    }

    #[tokio::test]
    async fn the_log_refuses_duplicate_ids_and_prunes_only_old_settled_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Flush,
            cache_capacity_bytes: 16 << 20,
        })
        .unwrap();
        let day = 86_400_000;
        assert!(
            store
                .log_event(&record("evt_old_applied", 0, WebhookStatus::Pending), b"a")
                .unwrap()
        );
        assert!(
            !store
                .log_event(
                    &record("evt_old_applied", 5, WebhookStatus::Pending),
                    b"other"
                )
                .unwrap()
        );
        assert_eq!(store.event_body("evt_old_applied").unwrap().unwrap(), b"a");
        let mut r = store.event("evt_old_applied").unwrap().unwrap();
        r.status = WebhookStatus::Applied;
        store.update_event(&r).unwrap();
        store
            .log_event(&record("evt_old_pending", 0, WebhookStatus::Pending), b"b")
            .unwrap();
        store
            .log_event(&record("evt_old_failed", 0, WebhookStatus::Failed), b"c")
            .unwrap();
        store
            .log_event(&record("evt_new", 40 * day, WebhookStatus::Applied), b"d")
            .unwrap();
        assert_eq!(store.event_counts().unwrap(), [1, 2, 0, 1]);
        // Retention 35 days at day 40: events received before day 5 go, unless pending.
        assert_eq!(store.prune_events(5 * day).unwrap(), 2);
        let left: Vec<String> = store
            .events(None, None, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(
            left,
            vec!["evt_new".to_owned(), "evt_old_pending".to_owned()]
        );
        assert!(store.event_body("evt_old_applied").unwrap().is_none());
        assert_eq!(
            store
                .events(Some(WebhookStatus::Pending), None, 10)
                .unwrap()
                .len(),
            1
        );
        // Paging: after an id.
        let page: Vec<String> = store
            .events(None, Some("evt_new"), 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(page, vec!["evt_old_pending".to_owned()]);
    }
}
