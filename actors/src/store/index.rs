//! Derived indexes rebuilt from the ledger tail: idempotency records (expired by the janitor)
//! and the notification queue.

use super::*;

impl Store {
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
