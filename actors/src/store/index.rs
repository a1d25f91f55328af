//! The read side of the `notify` queue (nothing writes it until a notifier drains it).

use super::*;

impl Store {
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
}
