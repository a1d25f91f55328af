//! The outcome of a v1 send (or a stream request) for each record: sent, retried with backoff,
//! or dead-lettered.

use super::*;

impl OutboxState {
    /// Records the outcome of one send (an entry or a batch, as a unit). Returns true if the
    /// breaker opened. `call` is false for the second and later events of one stream request:
    /// one request is one call to the breaker.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(
        &mut self,
        account: &AccountId,
        seq: u64,
        mut record: OutboxRecord,
        result: Result<(), crate::stripe::StripeCallError>,
        now: i64,
        half_open: bool,
        call: bool,
    ) -> Result<bool, crate::store::StoreError> {
        let disposition = match &result {
            Ok(()) => None,
            Err(e) => Some(e.disposition()),
        };
        match disposition {
            None | Some(Disposition::AlreadyDelivered) => {
                self.args.store.mark_sent(account, seq, now)?;
                if disposition.is_some() {
                    self.stats.already_total += 1;
                } else {
                    self.stats.delivered_total += 1;
                }
                self.consecutive_failures = 0;
                self.breaker_open_until = None;
            }
            Some(Disposition::Permanent) => {
                let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(account = %account, seq, id = %record_identifier(account, seq, &record), error = %reason, "meter event refused by Stripe: dead-lettered");
                record.item.last_error = Some(reason);
                self.args.store.mark_dead(account, seq, &record)?;
                self.stats.dead_total += 1;
            }
            Some(Disposition::Retry { after }) => {
                let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
                self.stats.failed_total += 1;
                record.item.attempts += 1;
                record.item.last_error = Some(reason.clone());
                if record.item.attempts >= self.args.settings.max_attempts {
                    record.item.last_error = Some(format!("max_attempts: {reason}"));
                    self.args.store.mark_dead(account, seq, &record)?;
                    self.stats.dead_total += 1;
                } else {
                    let wait = backoff(
                        record.item.attempts,
                        self.args.settings.base_backoff,
                        self.args.settings.max_backoff,
                    )
                    .max(after.unwrap_or_default());
                    record.item.next_at_ms =
                        now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                    self.args.store.update_outbox(account, seq, &record)?;
                }
                if !call {
                    return Ok(false);
                }
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.args.settings.breaker_failures || half_open {
                    let cooldown = i64::try_from(self.args.settings.breaker_cooldown.as_millis())
                        .unwrap_or(i64::MAX / 2);
                    self.breaker_open_until = Some(now + cooldown);
                    tracing::warn!(
                        failures = self.consecutive_failures,
                        "Stripe circuit breaker open"
                    );
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}
