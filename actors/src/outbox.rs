//! The outbox: delivers billable usage to Stripe Billing Meters, exactly once.
//!
//! Work: the derived `outbox` tree, which account actors fill from billable ledger entries at
//! append time (and recovery fills again from the ledger tail). Each item becomes one meter
//! event whose `identifier` and `Idempotency-Key` derive only from the account and the ledger
//! sequence number, so a resend after any failure is recognised by Stripe. An item leaves the
//! queue only after Stripe's 200 echoing the identifier, or Stripe's "already exists" answer
//! for it (delivered earlier); a permanent error, too many attempts or an event older than
//! Stripe's 35-day window move it to the dead letters.
//!
//! It reads items, then waits for a group-commit barrier before sending: only durable entries
//! are ever billed. Up to `concurrency` events are in flight at once (each start paced).
//! Retries back off exponentially with full jitter and honour `Retry-After`;
//! a circuit breaker stops calls after consecutive failures and probes again after a cooldown;
//! calls are spaced to stay under `calls_per_second`. Without a Stripe key it is offline:
//! items wait. It never touches the ledger or account state.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::account::Accounts;
use crate::model::{AccountId, Clock};
use crate::store::{OutboxItem, Store};
use crate::stripe::{Disposition, StripeHttp};

/// Stripe accepts meter events up to 35 days old; keep a margin.
const MAX_AGE_MS: i64 = 34 * 24 * 3_600_000;

pub enum OutboxMsg {
    /// Deliver what is due (scheduled by the actor itself).
    Tick,
    Stats(RpcReplyPort<OutboxStats>),
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// `None`: offline (no Stripe key); items wait.
    pub client: Option<StripeHttp>,
    /// Meter name → the Stripe meter's `event_name` (default: the meter name).
    pub event_names: BTreeMap<String, String>,
    pub poll: Duration,
    pub batch: usize,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub calls_per_second: u32,
    /// Meter events in flight at once.
    pub concurrency: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub online: bool,
    pub queued: usize,
    pub dead: usize,
    pub sent: usize,
    pub breaker_open: bool,
    pub delivered_total: u64,
    pub already_total: u64,
    pub failed_total: u64,
    pub dead_total: u64,
    pub waiting_customer: u64,
    pub calls_total: u64,
}

pub struct OutboxArgs {
    pub store: Store,
    pub accounts: Accounts,
    pub clock: Clock,
    pub settings: OutboxSettings,
}

pub struct OutboxState {
    args: OutboxArgs,
    consecutive_failures: u32,
    breaker_open_until: Option<i64>,
    /// The next free call slot.
    last_call: Option<tokio::time::Instant>,
    stats: OutboxStats,
}

pub struct OutboxActor;

/// The meter event identifier (and idempotency key) of ledger entry `seq` of `account`: at
/// most 100 characters, derived from nothing else.
pub fn identifier(account: &AccountId, seq: u64) -> String {
    let plain = format!("{account}:{seq}");
    if plain.len() <= 100 {
        return plain;
    }
    let h = Sha256::digest(account.as_str().as_bytes());
    format!("h{}:{seq}", &hex::encode(h)[..40])
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^attempts)]`.
pub fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    let cap = base
        .saturating_mul(1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX))
        .min(max);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

impl Actor for OutboxActor {
    type Msg = OutboxMsg;
    type State = OutboxState;
    type Arguments = OutboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<OutboxMsg>,
        args: OutboxArgs,
    ) -> Result<OutboxState, ActorProcessingErr> {
        let _ = myself.cast(OutboxMsg::Tick);
        let online = args.settings.client.is_some();
        Ok(OutboxState {
            args,
            consecutive_failures: 0,
            breaker_open_until: None,
            last_call: None,
            stats: OutboxStats {
                online,
                ..OutboxStats::default()
            },
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<OutboxMsg>,
        msg: OutboxMsg,
        state: &mut OutboxState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            OutboxMsg::Tick => {
                state.tick().await?;
                myself.send_after(state.args.settings.poll, || OutboxMsg::Tick);
            }
            OutboxMsg::Stats(reply) => {
                let (queued, dead, sent) = state.args.store.outbox_counts();
                let mut s = state.stats;
                s.queued = queued;
                s.dead = dead;
                s.sent = sent;
                s.breaker_open = state.breaker_open_until.is_some();
                let _ = reply.send(s);
            }
        }
        Ok(())
    }
}

impl OutboxState {
    async fn tick(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(client) = self.args.settings.client.clone() else {
            return Ok(());
        };
        let now = self.args.clock.now_ms();
        // Breaker: open until the cooldown is over, then half-open: one probe.
        let half_open = match self.breaker_open_until {
            Some(until) if now < until => return Ok(()),
            Some(_) => true,
            None => false,
        };
        let items = self
            .args
            .store
            .outbox_items(false, None, self.args.settings.batch)?;
        if items.is_empty() {
            return Ok(());
        }
        // Only durable entries are billed: everything read above is on disk after this.
        self.args.store.barrier().await?;
        let mut customers: HashMap<AccountId, Option<String>> = HashMap::new();
        // What can be sent now, with its customer and event name.
        let mut ready = Vec::new();
        for (account, seq, mut item) in items {
            if item.next_at_ms > now {
                continue;
            }
            if half_open && !ready.is_empty() {
                break;
            }
            if item.at_ms < now - MAX_AGE_MS {
                item.last_error = Some("too_old: older than Stripe's 35-day window".into());
                self.args.store.mark_dead(&account, seq, &item)?;
                self.stats.dead_total += 1;
                tracing::warn!(account = %account, seq, "billable usage too old for Stripe: dead-lettered for reconciliation");
                continue;
            }
            let customer = match customers.get(&account) {
                Some(c) => c.clone(),
                None => {
                    let c = self
                        .args
                        .accounts
                        .get(&account)
                        .await
                        .ok()
                        .and_then(|v| v.profile.stripe_customer_id);
                    customers.insert(account.clone(), c.clone());
                    c
                }
            };
            let Some(customer) = customer else {
                self.stats.waiting_customer += 1;
                item.last_error = Some("waiting for the account's stripe_customer_id".into());
                // Look again after the longest backoff (at most 30 s).
                let wait = self.args.settings.max_backoff.min(Duration::from_secs(30));
                item.next_at_ms = now + i64::try_from(wait.as_millis()).unwrap_or(30_000);
                self.args.store.update_outbox(&account, seq, &item)?;
                continue;
            };
            let event_name = self
                .args
                .settings
                .event_names
                .get(&item.meter)
                .cloned()
                .unwrap_or_else(|| item.meter.clone());
            ready.push((account, seq, item, customer, event_name));
        }
        // Send up to `concurrency` at a time, each start paced; settle the results in order.
        let width = self.args.settings.concurrency.max(1);
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            let chunk: Vec<_> = ready.by_ref().take(width).collect();
            let mut sends = tokio::task::JoinSet::new();
            for (i, (account, seq, item, customer, event_name)) in chunk.iter().enumerate() {
                self.pace().await;
                self.stats.calls_total += 1;
                let client = client.clone();
                let id = identifier(account, *seq);
                let (customer, event_name) = (customer.clone(), event_name.clone());
                let (value, ts) = (item.value, item.at_ms / 1000);
                sends.spawn(async move {
                    let r = client
                        .send_meter_event(&event_name, &customer, value, ts, &id)
                        .await;
                    (i, r)
                });
            }
            let mut results: Vec<Option<Result<(), crate::stripe::StripeCallError>>> =
                (0..chunk.len()).map(|_| None).collect();
            while let Some(joined) = sends.join_next().await {
                if let Ok((i, r)) = joined
                    && let Some(slot) = results.get_mut(i)
                {
                    *slot = Some(r);
                }
            }
            let mut opened = false;
            for ((account, seq, item, _, _), result) in chunk.into_iter().zip(results) {
                // A send task that did not finish counts as a network failure: retried.
                let result = result.unwrap_or_else(|| {
                    Err(crate::stripe::StripeCallError::Network(
                        "send task failed".into(),
                    ))
                });
                opened |= self.settle(&account, seq, item, result, now, half_open)?;
            }
            if opened {
                break;
            }
        }
        Ok(())
    }

    /// Records the outcome of one send. Returns true if the breaker opened.
    fn settle(
        &mut self,
        account: &AccountId,
        seq: u64,
        mut item: OutboxItem,
        result: Result<(), crate::stripe::StripeCallError>,
        now: i64,
        half_open: bool,
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
                tracing::warn!(account = %account, seq, error = %reason, "meter event refused by Stripe: dead-lettered");
                item.last_error = Some(reason);
                self.args.store.mark_dead(account, seq, &item)?;
                self.stats.dead_total += 1;
            }
            Some(Disposition::Retry { after }) => {
                let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
                self.stats.failed_total += 1;
                item.attempts += 1;
                item.last_error = Some(reason.clone());
                if item.attempts >= self.args.settings.max_attempts {
                    item.last_error = Some(format!("max_attempts: {reason}"));
                    self.args.store.mark_dead(account, seq, &item)?;
                    self.stats.dead_total += 1;
                } else {
                    let wait = backoff(
                        item.attempts,
                        self.args.settings.base_backoff,
                        self.args.settings.max_backoff,
                    )
                    .max(after.unwrap_or_default());
                    item.next_at_ms = now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                    self.args.store.update_outbox(account, seq, &item)?;
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

    /// Spaces call starts to stay under `calls_per_second` on average. Slots advance from the
    /// scheduled time, not from when a sleep woke (timers overshoot), and up to `concurrency`
    /// starts may go back to back.
    async fn pace(&mut self) {
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
}

/// The handle to the outbox.
#[derive(Clone)]
pub struct Outbox {
    actor: ActorRef<OutboxMsg>,
}

impl Outbox {
    pub async fn spawn(
        args: OutboxArgs,
    ) -> Result<(Outbox, ractor::concurrency::JoinHandle<()>), String> {
        let (actor, handle) = Actor::spawn(None, OutboxActor, args)
            .await
            .map_err(|e| e.to_string())?;
        Ok((Outbox { actor }, handle))
    }

    pub async fn stats(&self) -> Option<OutboxStats> {
        match self
            .actor
            .call(OutboxMsg::Stats, Some(Duration::from_secs(30)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(s)) => Some(s),
            _ => None,
        }
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_derive_from_account_and_seq_and_fit_stripe() {
        let a = AccountId::parse("team_42").unwrap();
        assert_eq!(identifier(&a, 7), "team_42:7");
        let long = AccountId::parse(&"x".repeat(128)).unwrap();
        let id = identifier(&long, u64::MAX);
        assert!(id.len() <= 100, "{}", id.len());
        assert_eq!(id, identifier(&long, u64::MAX), "deterministic");
        assert_ne!(identifier(&long, 1), identifier(&long, 2));
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempts in 0..40 {
            let cap = base
                .saturating_mul(1u32.checked_shl(attempts.min(30)).unwrap_or(u32::MAX))
                .min(max);
            for _ in 0..20 {
                assert!(backoff(attempts, base, max) <= cap);
            }
        }
        assert!(backoff(50, base, max) <= max);
    }
}
