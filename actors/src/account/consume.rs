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

impl AccountState {
    /// The priced usage spend if `meter` reached `units`, with the spend cap in force, for a
    /// billed meter under a cap; `None` otherwise.
    pub(super) fn spend_with(
        &self,
        plan: &Plan,
        profile: &AccountProfile,
        rule: &crate::model::MeterRule,
        balances: &Balances,
        meter: &str,
        units: u64,
    ) -> Option<(u64, SpendCap)> {
        let cap = effective_spend_cap(plan, profile)?;
        rule.price.as_ref()?;
        match usage_cost_with(plan, profile, balances, meter, units) {
            Ok(spent) => Some((spent, cap)),
            Err(e) => {
                tracing::warn!(account = %self.id, error = %e, "cannot price usage for the spend cap");
                None
            }
        }
    }

    /// Would `units` of `meter` pass a blocking spend cap?
    pub(super) fn over_blocking_cap(
        &self,
        profile: &AccountProfile,
        balances: &Balances,
        meter: &str,
        units: u64,
    ) -> bool {
        let Some(plan) = self.deps.catalog.plans.get(&profile.plan) else {
            return false;
        };
        let Some(rule) = effective_rule(plan, profile, meter) else {
            return false;
        };
        matches!(
            self.spend_with(plan, profile, &rule, balances, meter, units),
            Some((spent, cap)) if cap.action == SpendCapAction::Block && spent > cap.amount
        )
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
        let plan = match self.validate_consume(&cmd) {
            Ok(p) => p.plan.clone(),
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
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
            let r = match prev.kind {
                EntryKind::Consume(rec) if rec.digest == digest => Ok(ConsumeReply {
                    seq: Some(prev.seq),
                    record: rec,
                    replayed: true,
                }),
                _ => Err(AccountError::IdempotencyConflict { seq: prev.seq }),
            };
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
        let rule = self
            .deps
            .catalog
            .plans
            .get(&plan)
            .and_then(|p| effective_rule(p, profile, &cmd.meter));
        let active = self.access_at(profile, now) != Access::Denied;
        let mut d = decide_consume(
            balances,
            &cmd.meter,
            rule.as_ref(),
            cmd.quantity,
            active,
            now,
        );
        let mut alerts = Vec::new();
        if let (Some(rule), Some(plan_def), Outcome::Allowed) =
            (rule.as_ref(), self.deps.catalog.plans.get(&plan), d.outcome)
        {
            // Held units count as spend to come, so holds cannot slip past the cap.
            let reserved = balances.usage(&cmd.meter).reserved;
            let spend = self.spend_with(
                plan_def,
                profile,
                rule,
                balances,
                &cmd.meter,
                d.used_after.saturating_add(reserved),
            );
            if let Some((spent, cap)) = spend
                && cap.action == SpendCapAction::Block
                && spent > cap.amount
            {
                let usage = balances.usage(&cmd.meter);
                d = ConsumeDecision {
                    outcome: Outcome::Denied(DenyCode::SpendCapReached),
                    billable: 0,
                    credits_spent: 0,
                    burns: Vec::new(),
                    used_after: usage.used,
                    billable_after: usage.billable,
                    credits_after: balances.live_credits(now),
                    ..d
                };
            } else {
                alerts = alerts_for(
                    plan_def,
                    rule,
                    balances,
                    &cmd.meter,
                    d.used_after,
                    d.credits_after,
                    spend,
                );
            }
        }
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

    pub(super) fn check(
        &self,
        cmd: ConsumeCmd,
        reply: RpcReplyPort<Result<ConsumeReply, AccountError>>,
    ) {
        let r = (|| {
            let profile = self.validate_consume(&cmd)?;
            let plan = self.catalog_plan(profile)?;
            let now = self.deps.clock.now_ms();
            let balances = self
                .balances_at(now)
                .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))?;
            let rule = effective_rule(plan, profile, &cmd.meter);
            let active = self.access_at(profile, now) != Access::Denied;
            let d = decide_consume(
                &balances,
                &cmd.meter,
                rule.as_ref(),
                cmd.quantity,
                active,
                now,
            );
            let digest = cmd.digest();
            Ok(ConsumeReply {
                seq: None,
                record: consume_record(cmd, digest, d, Vec::new()),
                replayed: false,
            })
        })();
        self.reply_after_commit(reply, r);
    }
}
