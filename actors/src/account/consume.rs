//! Consume and its dry run (`check`): validate, decide, record, queue billable usage.

use super::*;

/// The ledger record of a consume decision (a check builds the same, unwritten).
pub(super) fn consume_record(
    cmd: ConsumeCmd,
    digest: [u8; 32],
    d: ConsumeDecision,
    alerts: Vec<crate::model::Alert>,
) -> ConsumeRecord {
    ConsumeRecord {
        meter: cmd.meter,
        quantity: cmd.quantity,
        idempotency_key: cmd.idempotency_key.as_str().to_owned(),
        digest,
        metadata: cmd.metadata.into_iter().collect(),
        outcome: d.outcome,
        billable: d.billable,
        credits_spent: d.credits_spent,
        burns: d.burns,
        included: d.included,
        limit: d.limit,
        used_after: d.used_after,
        billable_after: d.billable_after,
        credits_after: d.credits_after,
        alerts,
    }
}

/// The answer to a consume whose key is taken by entry `prev`: that entry's decision if it is
/// the same request (`digest`), else an idempotency conflict.
fn replay_of(prev: LedgerEntry, digest: [u8; 32]) -> Result<ConsumeReply, AccountError> {
    match prev.kind {
        EntryKind::Consume(rec) if rec.digest == digest => Ok(ConsumeReply {
            seq: Some(prev.seq),
            record: rec,
            replayed: true,
        }),
        _ => Err(AccountError::IdempotencyConflict { seq: prev.seq }),
    }
}

/// What an account's spend cap says about a projected usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spend {
    /// No cap applies: none is set, or the meter is not priced.
    Uncapped,
    /// The projected usage spend (minor units) and the cap in force.
    Priced(u64, SpendCap),
    /// A cap applies but the spend cannot be computed (it overflows: units past `u64`, or a
    /// price times a quantity past what fits). A blocking cap refuses: it fails closed.
    Unpriceable(SpendCap),
}

impl Spend {
    /// A blocking cap refuses this usage.
    pub(super) fn blocks(self) -> bool {
        match self {
            Spend::Uncapped => false,
            Spend::Priced(spent, cap) => cap.action == SpendCapAction::Block && spent > cap.amount,
            Spend::Unpriceable(cap) => cap.action == SpendCapAction::Block,
        }
    }

    /// The spend and cap for the spend-cap alerts (none when it cannot be priced).
    pub(super) fn priced(self) -> Option<(u64, SpendCap)> {
        match self {
            Spend::Priced(spent, cap) => Some((spent, cap)),
            _ => None,
        }
    }
}

impl AccountState {
    /// The spend cap's view of `meter` reaching `units` (`None`: the units themselves
    /// overflowed), every other meter counted with its held units.
    pub(super) fn spend_with(
        &self,
        plan: &Plan,
        profile: &AccountProfile,
        rule: &crate::model::MeterRule,
        balances: &Balances,
        meter: &str,
        units: Option<u64>,
    ) -> Spend {
        let Some(cap) = effective_spend_cap(plan, profile) else {
            return Spend::Uncapped;
        };
        if rule.price.is_none() {
            return Spend::Uncapped;
        }
        let Some(units) = units else {
            tracing::warn!(account = %self.id, meter, "usage past u64 under a spend cap: refused");
            return Spend::Unpriceable(cap);
        };
        match usage_cost_with(plan, profile, balances, meter, units) {
            Ok(spent) => Spend::Priced(spent, cap),
            Err(e) => {
                tracing::warn!(account = %self.id, error = %e, "cannot price usage for the spend cap: a blocking cap refuses");
                Spend::Unpriceable(cap)
            }
        }
    }

    /// Would `units` of `meter` (`None`: past `u64`) pass a blocking spend cap? A meter the
    /// plan lacks is refused elsewhere (`meter_not_in_plan`).
    pub(super) fn over_blocking_cap(
        &self,
        profile: &AccountProfile,
        balances: &Balances,
        meter: &str,
        units: Option<u64>,
    ) -> bool {
        let Some(plan) = self.deps.catalog.plans.get(&profile.plan) else {
            return false;
        };
        let Some(rule) = effective_rule(plan, profile, meter) else {
            return false;
        };
        self.spend_with(plan, profile, &rule, balances, meter, units)
            .blocks()
    }

    /// The whole decision on a consume at `now` over `balances`: access, allowance and
    /// credits (`decide_consume`), then the spend cap, and the alerts an allowed consume
    /// raises. Consume and its dry run (`check`) both call this, so they cannot differ.
    pub(super) fn decide_full(
        &self,
        profile: &AccountProfile,
        balances: &Balances,
        meter: &str,
        quantity: u64,
        now: i64,
    ) -> (ConsumeDecision, Vec<crate::model::Alert>) {
        let plan = self.deps.catalog.plans.get(&profile.plan);
        let rule = plan.and_then(|p| effective_rule(p, profile, meter));
        let active = self.access_at(profile, now) != Access::Denied;
        let d = decide_consume(balances, meter, rule.as_ref(), quantity, active, now);
        let (Some(rule), Some(plan), Outcome::Allowed) = (rule.as_ref(), plan, d.outcome) else {
            return (d, Vec::new());
        };
        // Held units count as spend to come, so holds cannot slip past the cap.
        let reserved = balances.usage(meter).reserved;
        let spend = self.spend_with(
            plan,
            profile,
            rule,
            balances,
            meter,
            d.used_after.checked_add(reserved),
        );
        if spend.blocks() {
            let usage = balances.usage(meter);
            let d = ConsumeDecision {
                outcome: Outcome::Denied(DenyCode::SpendCapReached),
                billable: 0,
                credits_spent: 0,
                burns: Vec::new(),
                used_after: usage.used,
                billable_after: usage.billable,
                credits_after: balances.live_credits(now),
                ..d
            };
            return (d, Vec::new());
        }
        let alerts = alerts_for(
            plan,
            rule,
            balances,
            meter,
            d.used_after,
            d.credits_after,
            spend.priced(),
        );
        (d, alerts)
    }

    pub(super) fn validate_consume(
        &self,
        cmd: &ConsumeCmd,
    ) -> Result<&AccountProfile, AccountError> {
        if !self.deps.catalog.meters.contains_key(&cmd.meter) {
            return Err(ValidationError::new(format!("unknown meter `{}`", cmd.meter)).into());
        }
        if cmd.quantity == 0 || cmd.quantity > crate::model::MAX_QUANTITY {
            return Err(ValidationError::new(format!(
                "quantity must be an integer from 1 to {}",
                crate::model::MAX_QUANTITY
            ))
            .into());
        }
        validate_metadata(&cmd.metadata)?;
        self.fold
            .profile
            .as_ref()
            .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))
    }

    /// Logs the alerts entry `seq` raised. They are recorded in the entry itself; nothing is
    /// queued elsewhere until a notifier drains such a queue.
    pub(super) fn log_alerts(&self, seq: u64, alerts: &[crate::model::Alert]) {
        for a in alerts {
            tracing::info!(account = %self.id, seq, kind = a.kind.as_str(), meter = %a.meter, threshold = a.threshold, "alert");
        }
    }

    pub(super) fn consume(
        &mut self,
        cmd: ConsumeCmd,
        reply: RpcReplyPort<Result<ConsumeReply, AccountError>>,
    ) -> Result<(), StoreError> {
        if let Err(e) = self.validate_consume(&cmd) {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        let digest = cmd.digest();
        let now = self.deps.clock.now_ms();
        // One tree operation for the common case, a new key: claim the key for the entry about
        // to be written. If it was taken, put the old record back and answer as before. The
        // replay check comes before any lazy catch-up, so a replay writes nothing at all.
        let key = cmd.idempotency_key.as_str();
        let claim = IdemRecord {
            seq: self.fold.last_seq + 1,
            at_ms: now,
        };
        if let Some(old) = self
            .deps
            .store
            .swap_idem(&self.id, IdemOp::Consume, key, claim)?
            && let Some(prev) = self.entry_for_key(old.seq, IdemOp::Consume, key)?
        {
            self.deps
                .store
                .put_idem(&self.id, IdemOp::Consume, key, old)?;
            let r = replay_of(prev, digest);
            // The first answer may not be durable yet: a replay waits for the same flush.
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        self.catch_up(now)?;
        let claim = if self.fold.last_seq + 1 == claim.seq {
            claim
        } else {
            // Catch-up wrote entries: move the claim to the consume's real seq.
            let moved = IdemRecord {
                seq: self.fold.last_seq + 1,
                at_ms: now,
            };
            self.deps
                .store
                .put_idem(&self.id, IdemOp::Consume, key, moved)?;
            moved
        };
        let (Some(profile), Some(balances)) = (&self.fold.profile, &self.fold.balances) else {
            return Ok(());
        };
        let (d, alerts) = self.decide_full(profile, balances, &cmd.meter, cmd.quantity, now);
        let record = consume_record(cmd, digest, d, alerts);
        let entry = self.append(EntryKind::Consume(record), now)?;
        if let EntryKind::Consume(rec) = &entry.kind {
            self.log_alerts(entry.seq, &rec.alerts);
        }
        debug_assert_eq!(entry.seq, claim.seq);
        self.after_write()?;
        let EntryKind::Consume(record) = entry.kind else {
            return Ok(());
        };
        self.reply_after_commit(
            reply,
            Ok(ConsumeReply {
                seq: Some(entry.seq),
                record,
                replayed: false,
            }),
        );
        Ok(())
    }

    /// The dry run of a consume: the answer `consume` would give now, nothing written. A key
    /// already used answers as a consume with it would: the recorded decision (replayed) or
    /// an idempotency conflict.
    pub(super) fn check(
        &self,
        cmd: ConsumeCmd,
        reply: RpcReplyPort<Result<ConsumeReply, AccountError>>,
    ) {
        let r = (|| {
            let profile = self.validate_consume(&cmd)?;
            let digest = cmd.digest();
            let key = cmd.idempotency_key.as_str();
            if !cmd.idempotency_key.is_dry_run()
                && let Some(old) = self.deps.store.get_idem(&self.id, IdemOp::Consume, key)?
                && let Some(prev) = self.entry_for_key(old.seq, IdemOp::Consume, key)?
            {
                return replay_of(prev, digest);
            }
            let now = self.deps.clock.now_ms();
            // The balances a consume would decide on after its catch-up; a fold error fails
            // a consume too.
            let balances = match self.due_at(now) {
                Ok((_, Some(b))) => b,
                Ok((_, None)) => return Err(AccountError::UnknownAccount(self.id.clone())),
                Err(e) => return Err(AccountError::Storage(corrupt(&self.id, e).to_string())),
            };
            let (d, alerts) = self.decide_full(profile, &balances, &cmd.meter, cmd.quantity, now);
            Ok(ConsumeReply {
                seq: None,
                record: consume_record(cmd, digest, d, alerts),
                replayed: false,
            })
        })();
        self.reply_after_commit(reply, r);
    }
}
