//! Pacing and retention: the Stripe call rate limit and pruning old `sent` records (the retry
//! backoff is [`crate::model::backoff`]).

use super::*;

impl OutboxState {
    /// Spaces call starts to stay under `calls_per_second` on average. Slots advance from the
    /// scheduled time, not from when a sleep woke (timers overshoot), and up to `concurrency`
    /// starts may go back to back.
    pub(super) async fn pace(&mut self) {
        let per = self.args.settings.calls_per_second.max(1);
        let gap = Duration::from_secs(1) / per;
        let burst = gap * u32::try_from(self.args.settings.concurrency.max(1)).unwrap_or(1);
        let now = tokio::time::Instant::now();
        let slot = match self.last_call {
            // Never let unused slots pile up beyond one burst.
            Some(next) => next.max(now.checked_sub(burst).unwrap_or(now)),
            None => now,
        };
        if slot > now {
            tokio::time::sleep_until(slot).await;
        }
        self.last_call = Some(slot + gap);
    }

    /// One bounded step of pruning `sent` records and `batched` marks older than
    /// [`SENT_RETENTION_MS`] whose entries the account's snapshot covers (recovery replays only
    /// entries after it, so nothing could queue them again). The snapshots read are made
    /// durable (a barrier) before anything is deleted. Runs every 50 polls while a pass is
    /// under way, then rests 500 polls.
    pub(super) async fn prune_step(&mut self) -> Result<(), ActorProcessingErr> {
        let now_i = tokio::time::Instant::now();
        if now_i < self.next_prune {
            return Ok(());
        }
        let cutoff = self.args.clock.now_ms() - SENT_RETENTION_MS;
        let (plan, next) =
            self.args
                .store
                .prune_candidates(&self.prune_cursor, cutoff, PRUNE_PAGE)?;
        if !plan.is_empty() {
            self.args.store.barrier().await?;
            let n = self.args.store.prune(&plan)?;
            self.stats.pruned_total += n as u64;
            tracing::debug!(pruned = n, "outbox: old sent records pruned");
        }
        let rest = if next.at_start() { 500 } else { 50 };
        self.next_prune = now_i + self.args.settings.poll * rest;
        self.prune_cursor = next;
        Ok(())
    }
}
