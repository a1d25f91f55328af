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
        let k = codec::idem_key(account, op, key);
        self.index_expiry(op, &k, rec.at_ms)?;
        self.inner.idem.insert(k, codec::encode_idem(rec)?)?;
        Ok(())
    }

    /// Files an idempotency record under its time in `idem_expiry`, unless it is kept for
    /// good (top-ups and Stripe events).
    fn index_expiry(&self, op: IdemOp, idem_key: &[u8], at_ms: UnixMs) -> Result<(), StoreError> {
        if !op.expires() {
            return Ok(());
        }
        self.inner
            .idem_expiry
            .insert(codec::expiry_key(at_ms, idem_key), &[] as &[u8])?;
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
        let k = codec::idem_key(account, op, key);
        self.index_expiry(op, &k, rec.at_ms)?;
        match self.inner.idem.insert(k, codec::encode_idem(rec)?)? {
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

    /// Expires idempotency records written before `cutoff_ms`, oldest first, taking up to
    /// `max` entries of the time-ordered `idem_expiry` index (never a scan of `idem`).
    /// Returns (index entries taken, records deleted); fewer than `max` taken means nothing
    /// older is left. A record rewritten meanwhile with a later time stays (its newer index
    /// entry expires it later); the delete is a compare-and-swap on the exact value read.
    pub fn expire_idem(&self, cutoff_ms: UnixMs, max: usize) -> Result<(usize, usize), StoreError> {
        let end = codec::expiry_key(cutoff_ms, &[]);
        let mut taken = sled::Batch::default();
        let (mut n, mut deleted) = (0, 0);
        for item in self.inner.idem_expiry.range(..end).take(max) {
            let (k, _) = item?;
            let idem_key = codec::expiry_target(&k)?;
            if let Some(v) = self.inner.idem.get(idem_key)?
                && codec::decode_idem(&v)?.at_ms < cutoff_ms
                && self
                    .inner
                    .idem
                    .compare_and_swap(idem_key, Some(&v), None as Option<&[u8]>)?
                    .is_ok()
            {
                deleted += 1;
            }
            taken.remove(k);
            n += 1;
        }
        self.inner.idem_expiry.apply_batch(taken)?;
        Ok((n, deleted))
    }
}
