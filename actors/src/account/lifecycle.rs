//! Lazy time: period rollovers, monthly credit grants, grant and hold expiry, caught up before
//! every decision (and shown by reads before the write records them).

use super::*;

/// The entries that start a period's monthly credits, given the balances just after the
/// period began: a trim of carried-over monthly credits above the rollover cap, then the
/// grant. Pure, so reads can show what the next write will record.
pub(super) fn monthly_entries(plan: &Plan, b: &Balances, now: i64) -> Vec<EntryKind> {
    let mut out = Vec::new();
    if plan.monthly_credits == 0 {
        return out;
    }
    let Ok(amount) = i64::try_from(plan.monthly_credits) else {
        return out;
    };
    let period = b.period;
    let mut credits = b.live_credits(now);
    if let Some(cap) = plan.monthly_credits_rollover_cap {
        let mut monthly: Vec<(u64, u64)> = b
            .grants
            .iter()
            .filter(|(_, g)| {
                g.live_at(now)
                    && g.terms
                        .external_id
                        .as_deref()
                        .is_some_and(|x| x.starts_with("monthly credits "))
            })
            .map(|(id, g)| (*id, g.remaining))
            .collect();
        // All grants hold at most i64::MAX together (`Balances::can_hold`): no overflow.
        let left: u64 = monthly
            .iter()
            .fold(0u64, |acc, (_, r)| acc.saturating_add(*r));
        let total = left.saturating_sub(cap);
        if total > 0 {
            monthly.sort_by_key(|(id, _)| *id);
            let mut excess = total;
            let mut burns = Vec::new();
            for (id, r) in monthly {
                let take = r.min(excess);
                if take > 0 {
                    burns.push((id, take));
                    excess -= take;
                }
            }
            credits = credits.saturating_sub(total);
            out.push(EntryKind::Credit(CreditRecord {
                amount: -i64::try_from(total).unwrap_or(i64::MAX),
                reason: format!("monthly credits above the rollover cap of {cap}"),
                idempotency_key: format!("monthly trim {}", period.start_ms),
                digest: [0; 32],
                grant: None,
                burns,
                credits_after: credits,
            }));
        }
    }
    // The grant is skipped (and logged) if all grants together could not hold it.
    let trimmed = b.live_credits(now).saturating_sub(credits);
    if !b.can_hold(plan.monthly_credits.saturating_sub(trimmed)) {
        tracing::warn!(plan = %plan.name, "monthly credits not granted: the account's grants already hold the most credits allowed");
        return out;
    }
    // Keys with spaces: no client key can collide with them.
    let key = format!("monthly credits {}", period.start_ms);
    out.push(EntryKind::Credit(CreditRecord {
        amount,
        reason: format!("monthly credits of plan {}", plan.name),
        idempotency_key: key.clone(),
        digest: [0; 32],
        grant: Some(GrantTerms {
            priority: 10,
            effective_at_ms: now,
            expires_at_ms: match plan.monthly_credits_rollover_cap {
                None => Some(period.end_ms),
                Some(_) => None,
            },
            category: CreditCategory::Promotional,
            external_id: Some(key),
            package: None,
        }),
        burns: Vec::new(),
        credits_after: credits.saturating_add(plan.monthly_credits),
    }));
    out
}

/// Whether the current period `cur` may be set to `p` at `now`: a later start begins a new
/// period, the same start moves the end; `p` must contain `now`.
pub(super) fn check_period(p: Period, cur: Period, now: i64) -> Result<(), AccountError> {
    if p.end_ms <= p.start_ms || !p.contains(now) {
        return Err(ValidationError::new(
            "period: start must be before end, and the period must contain the current time",
        )
        .into());
    }
    if p.start_ms < cur.start_ms {
        return Err(
            ValidationError::new("period: a period cannot start before the current one").into(),
        );
    }
    Ok(())
}

impl AccountState {
    /// After recovery: a crash between the start of a period (a rollover, a period set, the
    /// account's creation) and its monthly credits left the ledger ending there. Those
    /// entries are written in one handler, right after each other, and sled recovers writes
    /// in order, so the ledger's last entry tells: write what is missing.
    pub(super) fn finish_interrupted(&mut self, now: i64) -> Result<(), StoreError> {
        if self.fold.last_seq == 0 {
            return Ok(());
        }
        let Some(last) = self.deps.store.read_entry(&self.id, self.fold.last_seq)? else {
            return Ok(());
        };
        let interrupted = match &last.kind {
            EntryKind::PeriodRolled { .. } => true,
            EntryKind::AccountUpserted(_) => last.seq == 1,
            EntryKind::Credit(c) => c.idempotency_key.starts_with("monthly trim "),
            _ => false,
        };
        if interrupted {
            let before = self.fold.last_seq;
            self.grant_monthly(now)?;
            if self.fold.last_seq > before {
                tracing::warn!(account = %self.id, "monthly credits of an interrupted period start written at recovery");
            }
        }
        Ok(())
    }

    /// At the start of a period: cap the carried-over monthly credits, then grant the plan's
    /// monthly credits (expiring at the period's end unless they may roll over).
    pub(super) fn grant_monthly(&mut self, now: i64) -> Result<(), StoreError> {
        let (Some(profile), Some(b)) = (&self.fold.profile, &self.fold.balances) else {
            return Ok(());
        };
        let Some(plan) = self.deps.catalog.plans.get(&profile.plan) else {
            return Ok(());
        };
        for kind in monthly_entries(plan, b, now) {
            self.append(kind, now)?;
        }
        Ok(())
    }

    /// Sets the current period as an admin (or, later, Stripe) says: a later start begins a
    /// new period (counters reset, monthly credits granted); the same start only moves the end.
    pub(super) fn set_period(
        &mut self,
        p: Period,
        now: i64,
    ) -> Result<Result<(), AccountError>, StoreError> {
        let Some(b) = &self.fold.balances else {
            return Ok(Ok(()));
        };
        let cur = b.period;
        if let Err(e) = check_period(p, cur, now) {
            return Ok(Err(e));
        }
        if p == cur {
            return Ok(Ok(()));
        }
        if p.start_ms == cur.start_ms {
            self.append(EntryKind::PeriodAdjusted { from: cur, to: p }, now)?;
        } else {
            self.append(EntryKind::PeriodRolled { from: cur, to: p }, now)?;
            self.grant_monthly(now)?;
        }
        Ok(Ok(()))
    }

    /// Everything lazy that is due at `now`, in the order `catch_up` writes it, and the
    /// balances just after it: the rollover and the new period's monthly credits, grant
    /// expiries, then hold expiries. Pure: reads show it and a refused request decides on it
    /// without writing anything.
    pub(super) fn due_at(&self, now: i64) -> Result<(Vec<EntryKind>, Option<Balances>), FoldError> {
        let Some(b) = self.fold.balances.as_ref() else {
            return Ok((Vec::new(), None));
        };
        let mut out = b.clone();
        let mut kinds = Vec::new();
        let mut seq = self.fold.last_seq;
        let mut apply = |out: &mut Balances, kind: EntryKind| -> Result<(), FoldError> {
            seq += 1;
            out.apply(&LedgerEntry {
                seq,
                at_ms: now,
                kind: kind.clone(),
            })?;
            kinds.push(kind);
            Ok(())
        };
        if now >= out.period.end_ms {
            let from = out.period;
            let to = from.next_containing(now);
            apply(&mut out, EntryKind::PeriodRolled { from, to })?;
            let plan = self
                .fold
                .profile
                .as_ref()
                .and_then(|p| self.deps.catalog.plans.get(&p.plan));
            if let Some(plan) = plan {
                for kind in monthly_entries(plan, &out, now) {
                    apply(&mut out, kind)?;
                }
            }
        }
        for (grant_id, amount) in out.due_expiries(now) {
            // An expired grant is not live, so the live credits stay as they are.
            let credits_after = out.live_credits(now);
            apply(
                &mut out,
                EntryKind::CreditExpired {
                    grant_id,
                    amount,
                    credits_after,
                },
            )?;
        }
        for rid in out.due_holds(now) {
            if let Some(r) = decide_release(&out, rid, true, now) {
                apply(&mut out, EntryKind::Settled(r))?;
            }
        }
        // Credit debt is paid by whatever credits are live now (monthly credits of a new
        // period, a grant that became effective).
        if let Some(c) = out.settlement(now) {
            apply(&mut out, EntryKind::Clawback(c))?;
        }
        Ok((kinds, Some(out)))
    }

    /// The balances as of `now` without writing anything (what the next write will record
    /// first is applied in memory).
    pub(super) fn balances_at(&self, now: i64) -> Option<Balances> {
        match self.due_at(now) {
            Ok((_, after)) => after,
            Err(_) => self.fold.balances.clone(),
        }
    }

    /// Writes everything lazy that is due at `now` (see [`Self::due_at`]). Called only by a
    /// request that writes its own entry too: a refusal decides on `balances_at` instead, so
    /// it changes nothing.
    pub(super) fn catch_up(&mut self, now: i64) -> Result<(), StoreError> {
        let (kinds, _) = self.due_at(now).map_err(|e| corrupt(&self.id, e))?;
        for kind in kinds {
            let expired_hold = match &kind {
                EntryKind::Settled(r) => Some(r.rid),
                _ => None,
            };
            let rolled = matches!(kind, EntryKind::PeriodRolled { .. });
            let entry = self.append(kind, now)?;
            if rolled {
                crate::store::failpoint("catch_up:after-rollover", self.id.as_str())?;
            }
            if let Some(rid) = expired_hold {
                self.deps.store.put_idem(
                    &self.id,
                    IdemOp::Settle,
                    &rid.to_string(),
                    IdemRecord {
                        seq: entry.seq,
                        at_ms: now,
                    },
                )?;
            }
        }
        Ok(())
    }
}
