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
        let left: u64 = monthly.iter().map(|(_, r)| r).sum();
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

impl AccountState {
    /// Writes the period rollover entry if `now` is past the current period. Lazy: only an
    /// account that is used again rolls over.
    pub(super) fn roll_period(&mut self, now: i64) -> Result<(), StoreError> {
        let Some(b) = &self.fold.balances else {
            return Ok(());
        };
        if now >= b.period.end_ms {
            let from = b.period;
            let to = from.next_containing(now);
            self.append(EntryKind::PeriodRolled { from, to }, now)?;
            self.grant_monthly(now)?;
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
        if p.end_ms <= p.start_ms || !p.contains(now) {
            return Ok(Err(ValidationError::new(
                "period: start must be before end, and the period must contain the current time",
            )
            .into()));
        }
        if p == cur {
            return Ok(Ok(()));
        }
        if p.start_ms == cur.start_ms {
            self.append(EntryKind::PeriodAdjusted { from: cur, to: p }, now)?;
        } else if p.start_ms > cur.start_ms {
            self.append(EntryKind::PeriodRolled { from: cur, to: p }, now)?;
            self.grant_monthly(now)?;
        } else {
            return Ok(Err(ValidationError::new(
                "period: a period cannot start before the current one",
            )
            .into()));
        }
        Ok(Ok(()))
    }

    /// Writes a `CreditExpired` entry for every grant whose expiry is due at `now`. Lazy, like
    /// period rollover: only an account that is used again writes them.
    pub(super) fn expire_grants(&mut self, now: i64) -> Result<(), StoreError> {
        let due = match &self.fold.balances {
            Some(b) => b.due_expiries(now),
            None => return Ok(()),
        };
        for (grant_id, amount) in due {
            let credits_after = self
                .fold
                .balances
                .as_ref()
                .map(|b| {
                    let mut after = b.clone();
                    if let Some(g) = after.grants.get_mut(&grant_id) {
                        g.remaining = 0;
                    }
                    after.live_credits(now)
                })
                .unwrap_or(0);
            self.append(
                EntryKind::CreditExpired {
                    grant_id,
                    amount,
                    credits_after,
                },
                now,
            )?;
        }
        Ok(())
    }

    /// The balances as of `now` without writing anything: a due rollover is applied in memory.
    pub(super) fn balances_at(&self, now: i64) -> Option<Balances> {
        let b = self.fold.balances.as_ref()?;
        let mut out = b.clone();
        let mut seq = self.fold.last_seq;
        // Apply in memory what the next write will record: expired holds, the rollover and
        // the new period's monthly credits.
        let mut apply = |out: &mut Balances, kind: EntryKind| {
            seq += 1;
            out.apply(&LedgerEntry {
                seq,
                at_ms: now,
                kind,
            })
        };
        for rid in b.due_holds(now) {
            if let Some(r) = decide_release(&out, rid, true, now)
                && apply(&mut out, EntryKind::Settled(r)).is_err()
            {
                return Some(b.clone());
            }
        }
        if now >= out.period.end_ms {
            let from = out.period;
            let to = from.next_containing(now);
            if apply(&mut out, EntryKind::PeriodRolled { from, to }).is_err() {
                return Some(b.clone());
            }
            let plan = self
                .fold
                .profile
                .as_ref()
                .and_then(|p| self.deps.catalog.plans.get(&p.plan));
            if let Some(plan) = plan {
                for kind in monthly_entries(plan, &out, now) {
                    if apply(&mut out, kind).is_err() {
                        return Some(b.clone());
                    }
                }
            }
        }
        Some(out)
    }

    /// Writes a `Settled { expired }` entry for every reservation whose expiry is due.
    pub(super) fn expire_holds(&mut self, now: i64) -> Result<(), StoreError> {
        let due = match &self.fold.balances {
            Some(b) => b.due_holds(now),
            None => return Ok(()),
        };
        for rid in due {
            let Some(r) = self
                .fold
                .balances
                .as_ref()
                .and_then(|b| decide_release(b, rid, true, now))
            else {
                continue;
            };
            let entry = self.append(EntryKind::Settled(r), now)?;
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
        Ok(())
    }

    /// Everything lazy that is due at `now`: rollover, grant expiry, hold expiry.
    pub(super) fn catch_up(&mut self, now: i64) -> Result<(), StoreError> {
        self.roll_period(now)?;
        self.expire_grants(now)?;
        self.expire_holds(now)
    }
}
