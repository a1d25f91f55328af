//! Pacing and retention: the Stripe call rate limit and pruning old `sent` records (the retry
//! backoff is [`crate::model::backoff`]).

use std::num::NonZeroU32;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::*;
use crate::model::TokioClock;

/// The pacing of Stripe call starts: a `governor` limiter (GCRA) of `calls_per_second`, with a
/// burst of `concurrency`.
pub(super) type Pacer =
    RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

fn pacer(settings: &OutboxSettings) -> Pacer {
    pacer_on(settings.calls_per_second, settings.concurrency, TokioClock)
}

fn pacer_on<C: Clock>(
    calls_per_second: u32,
    concurrency: usize,
    clock: C,
) -> RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>> {
    let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    let burst = nonzero(u32::try_from(concurrency).unwrap_or(u32::MAX));
    let quota = Quota::per_second(nonzero(calls_per_second)).allow_burst(burst);
    let pacer = RateLimiter::direct_with_clock(quota, clock);
    // Made at the first call with its burst spent: that call goes at once, the next ones are
    // spaced; bursts come only from slots left unused since.
    if let Some(spent) = NonZeroU32::new(burst.get() - 1) {
        let _ = pacer.check_n(spent);
    }
    pacer
}

impl OutboxState {
    /// Spaces call starts to stay under `calls_per_second` on average: slots `1 /
    /// calls_per_second` apart, and up to `concurrency` starts may go back to back on slots
    /// left unused (never more: unused slots do not pile up beyond one burst). A sleep that
    /// overshoots its slot (timers do) delays later slots only by what exceeds `concurrency - 1`
    /// slots, so with a concurrency of 1 each overshoot is lost, never gained.
    pub(super) async fn pace(&mut self) {
        let settings = &self.args.settings;
        let pacer = self.pacer.get_or_insert_with(|| pacer(settings));
        while let Err(not_until) = pacer.check() {
            let slot = tokio::time::Instant::from_std(not_until.earliest_possible());
            tokio::time::sleep_until(slot).await;
        }
    }

    /// One bounded step of pruning `sent` records, `batched` marks and dead letters older than
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
            let (n, dead) = self.args.store.prune(&plan)?;
            self.stats.pruned_total += n as u64;
            tracing::debug!(pruned = n, "outbox: old sent records pruned");
            if dead > 0 {
                tracing::warn!(
                    dead,
                    "outbox: dead letters of usage older than the retention pruned (Stripe refuses meter events that old; the ledger keeps the entries)"
                );
            }
        }
        let rest = if next.at_start() { 500 } else { 50 };
        self.next_prune = now_i + self.args.settings.poll * rest;
        self.prune_cursor = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;
    use governor::nanos::Nanos;

    use super::*;

    /// The starts `pacer_on` allows at the clock's time, and the wait until the next one.
    fn starts(
        p: &RateLimiter<NotKeyed, InMemoryState, FakeRelativeClock, NoOpMiddleware<Nanos>>,
        clock: &FakeRelativeClock,
    ) -> (usize, Duration) {
        let mut n = 0;
        loop {
            match p.check() {
                Ok(()) => n += 1,
                Err(not_until) => return (n, not_until.wait_time_from(clock.now())),
            }
        }
    }

    #[test]
    fn call_starts_are_spaced_with_a_burst_of_concurrency_after_a_pause() {
        let clock = FakeRelativeClock::default();
        // 25 calls per second: a slot every 40 ms; 8 at once after a pause.
        let p = pacer_on(25, 8, clock.clone());
        let gap = Duration::from_millis(40);
        // The first call goes at once, the next is one slot later.
        assert_eq!(starts(&p, &clock), (1, gap));
        // Each slot allows one start, exactly one gap apart (waking late by less than the
        // burst's slack loses nothing).
        for _ in 0..5 {
            clock.advance(gap);
            assert_eq!(starts(&p, &clock), (1, gap));
        }
        clock.advance(gap + Duration::from_millis(30));
        assert_eq!(starts(&p, &clock), (1, Duration::from_millis(10)));
        // After a pause, `concurrency` starts back to back, never more.
        clock.advance(Duration::from_secs(3600));
        assert_eq!(starts(&p, &clock), (8, gap));
        // Partly unused slots: 3 slots' worth.
        clock.advance(3 * gap);
        assert_eq!(starts(&p, &clock), (3, gap));
    }

    #[test]
    fn pacing_of_one_call_at_a_time_and_extreme_settings() {
        let clock = FakeRelativeClock::default();
        let p = pacer_on(1, 1, clock.clone());
        assert_eq!(starts(&p, &clock), (1, Duration::from_secs(1)));
        clock.advance(Duration::from_secs(3600));
        assert_eq!(starts(&p, &clock), (1, Duration::from_secs(1)));
        // Zero settings act as 1; huge ones do not overflow.
        let p = pacer_on(0, 0, clock.clone());
        assert_eq!(starts(&p, &clock), (1, Duration::from_secs(1)));
        let p = pacer_on(u32::MAX, usize::MAX, clock.clone());
        assert_eq!(p.check(), Ok(()));
    }
}
