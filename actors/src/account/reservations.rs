//! Reservations: hold capacity, then commit or release it (or let it expire).

use super::*;

impl AccountState {
    pub(super) fn reserve(
        &mut self,
        cmd: ReserveCmd,
        reply: RpcReplyPort<Result<ReserveReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let as_consume = ConsumeCmd {
            meter: cmd.meter.clone(),
            quantity: cmd.quantity,
            idempotency_key: cmd.idempotency_key.clone(),
            metadata: Metadata::new(),
        };
        let plan = match self.validate_consume(&as_consume) {
            Ok(p) => p.plan.clone(),
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        if !(1_000..=86_400_000).contains(&cmd.ttl_ms) {
            let _ = reply.send(Err(ValidationError::new(
                "ttl_s must be from 1 to 86400 seconds",
            )
            .into()));
            return Ok(());
        }
        let digest = cmd.digest();
        if let Some(prev) = self.find_replay(IdemOp::Reserve, cmd.idempotency_key.as_str())? {
            let r = match prev.kind {
                EntryKind::Reserved(rec) if rec.digest == digest => Ok(ReserveReply {
                    seq: prev.seq,
                    record: rec,
                    replayed: true,
                }),
                _ => Err(AccountError::IdempotencyConflict { seq: prev.seq }),
            };
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        let now = self.deps.clock.now_ms();
        self.catch_up(now)?;
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
        let usage = balances.usage(&cmd.meter);
        if d.outcome == Outcome::Allowed
            && self.over_blocking_cap(
                profile,
                balances,
                &cmd.meter,
                usage
                    .used
                    .checked_add(usage.reserved)
                    .and_then(|u| u.checked_add(cmd.quantity)),
            )
        {
            d = ConsumeDecision {
                outcome: Outcome::Denied(DenyCode::SpendCapReached),
                burns: Vec::new(),
                credits_spent: 0,
                credits_after: balances.live_credits(now),
                ..d
            };
        }
        let allowed = d.outcome == Outcome::Allowed;
        let record = HoldRecord {
            meter: cmd.meter,
            quantity: cmd.quantity,
            expires_at_ms: now.saturating_add(cmd.ttl_ms),
            idempotency_key: cmd.idempotency_key.as_str().to_owned(),
            digest,
            outcome: d.outcome,
            burns: d.burns,
            included: d.included,
            limit: d.limit,
            reserved_after: if allowed {
                usage.reserved + cmd.quantity
            } else {
                usage.reserved
            },
            used_after: usage.used,
            credits_after: d.credits_after,
        };
        let entry = self.record_keyed(
            EntryKind::Reserved(record),
            now,
            IdemOp::Reserve,
            cmd.idempotency_key.as_str(),
        )?;
        if let EntryKind::Reserved(record) = entry.kind {
            self.reply_after_commit(
                reply,
                Ok(ReserveReply {
                    seq: entry.seq,
                    record,
                    replayed: false,
                }),
            );
        }
        Ok(())
    }

    pub(super) fn settle(
        &mut self,
        rid: u64,
        quantity: Option<u64>,
        reply: RpcReplyPort<Result<SettleReply, AccountError>>,
    ) -> Result<(), StoreError> {
        if self.fold.profile.is_none() {
            let _ = reply.send(Err(AccountError::UnknownAccount(self.id.clone())));
            return Ok(());
        }
        if quantity.is_some_and(|q| q > crate::model::MAX_QUANTITY) {
            let _ = reply.send(Err(ValidationError::new(format!(
                "quantity must be an integer from 0 to {}",
                crate::model::MAX_QUANTITY
            ))
            .into()));
            return Ok(());
        }
        // Settling twice answers with the first settlement, if it was the same request.
        if let Some(prev) = self.find_replay(IdemOp::Settle, &rid.to_string())? {
            let r = match prev.kind {
                EntryKind::Settled(rec) if rec.committed == quantity && !rec.expired => {
                    Ok(SettleReply {
                        seq: prev.seq,
                        record: rec,
                        replayed: true,
                    })
                }
                EntryKind::Settled(rec) => Err(AccountError::ReservationSettled {
                    rid,
                    how: if rec.expired {
                        "expired"
                    } else if rec.committed.is_some() {
                        "committed"
                    } else {
                        "released"
                    },
                }),
                _ => Err(AccountError::UnknownReservation { rid }),
            };
            self.reply_after_commit(reply, r);
            return Ok(());
        }
        let now = self.deps.clock.now_ms();
        // Decide on the caught-up balances in memory first: a refusal writes nothing, not
        // even the lazy entries that are due (the next write records them).
        let record = match self.decide_settle(rid, quantity, now) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        self.catch_up(now)?;
        debug_assert!(
            self.fold
                .balances
                .as_ref()
                .is_some_and(|b| b.holds.contains_key(&rid)),
            "a hold decided on is still open after catch-up"
        );
        let entry = self.record_keyed(
            EntryKind::Settled(record),
            now,
            IdemOp::Settle,
            &rid.to_string(),
        )?;
        if let EntryKind::Settled(rec) = &entry.kind {
            self.log_alerts(entry.seq, &rec.alerts);
        }
        if let EntryKind::Settled(record) = entry.kind {
            self.reply_after_commit(
                reply,
                Ok(SettleReply {
                    seq: entry.seq,
                    record,
                    replayed: false,
                }),
            );
        }
        Ok(())
    }

    /// The settlement of hold `rid` with `quantity` as of `now` (lazy entries applied in
    /// memory), or why it is refused. Pure.
    fn decide_settle(
        &self,
        rid: u64,
        quantity: Option<u64>,
        now: i64,
    ) -> Result<SettleRecord, AccountError> {
        let (Some(profile), Some(balances)) = (&self.fold.profile, self.balances_at(now)) else {
            return Err(AccountError::UnknownAccount(self.id.clone()));
        };
        let Some(hold) = balances.holds.get(&rid) else {
            // A hold that is open now but due to expire was settled by the catch-up.
            let expiring = self
                .fold
                .balances
                .as_ref()
                .is_some_and(|b| b.holds.contains_key(&rid));
            return Err(if expiring {
                AccountError::ReservationSettled {
                    rid,
                    how: "expired",
                }
            } else {
                AccountError::UnknownReservation { rid }
            });
        };
        let Some(q) = quantity else {
            return decide_release(&balances, rid, false, now)
                .ok_or(AccountError::UnknownReservation { rid });
        };
        let rule = self
            .deps
            .catalog
            .plans
            .get(&profile.plan)
            .and_then(|p| effective_rule(p, profile, &hold.meter));
        // Units beyond the hold are new spend: the cap applies to them.
        let usage = balances.usage(&hold.meter);
        let others = usage.reserved.saturating_sub(hold.quantity);
        let over_cap = q > hold.quantity
            && self.over_blocking_cap(
                profile,
                &balances,
                &hold.meter,
                usage
                    .used
                    .checked_add(others)
                    .and_then(|u| u.checked_add(q)),
            );
        let mut r = match decide_commit(&balances, rid, rule.as_ref(), q, now) {
            Ok(_) if over_cap => {
                return Err(AccountError::CommitDenied {
                    code: "spend_cap_reached",
                });
            }
            Ok(r) => r,
            Err(code) => {
                let code = match code {
                    DenyCode::InsufficientCredits => "insufficient_credits",
                    _ => "cap_reached",
                };
                return Err(AccountError::CommitDenied { code });
            }
        };
        if let (Some(rule), Some(plan)) =
            (rule.as_ref(), self.deps.catalog.plans.get(&profile.plan))
        {
            let spend = self
                .spend_with(
                    plan,
                    profile,
                    rule,
                    &balances,
                    &hold.meter,
                    r.used_after.checked_add(r.reserved_after),
                )
                .priced();
            r.alerts = alerts_for(
                plan,
                rule,
                &balances,
                &hold.meter,
                r.used_after,
                r.credits_after,
                spend,
            );
        }
        Ok(r)
    }
}
