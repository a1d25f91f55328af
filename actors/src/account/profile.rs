//! Account creation and profile changes (plan, seats, status, overrides, period).

use super::*;

impl AccountState {
    pub(super) fn upsert(
        &mut self,
        cmd: UpsertCmd,
        reply: RpcReplyPort<Result<UpsertReply, AccountError>>,
    ) -> Result<(), StoreError> {
        let now = self.deps.clock.now_ms();
        let created = self.fold.profile.is_none();
        let cmd_period = cmd.period;
        let next = match self.merge_profile(cmd, now) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let period = cmd_period;
        // A Stripe customer belongs to one account at most.
        if let Some(c) = &next.stripe_customer_id
            && self
                .fold
                .profile
                .as_ref()
                .and_then(|p| p.stripe_customer_id.as_ref())
                != Some(c)
        {
            match self.customer_owner_elsewhere(c) {
                Ok(None) => {}
                Ok(Some(account)) => {
                    let _ = reply.send(Err(AccountError::CustomerInUse {
                        customer: c.clone(),
                        account,
                    }));
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        // Refuse a bad period before anything is written (the profile change included).
        if let Some(p) = period {
            let cur = match self.balances_at(now) {
                Some(b) => b.period,
                None => Period::calendar_month(now),
            };
            if let Err(e) = super::lifecycle::check_period(p, cur, now) {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        }
        if !created {
            self.catch_up(now)?;
        }
        if self.fold.profile.as_ref() != Some(&next) {
            self.append(EntryKind::AccountUpserted(next), now)?;
            if created {
                crate::store::failpoint("upsert:after-create", self.id.as_str())?;
                self.grant_monthly(now)?;
            }
        }
        if let Some(p) = period
            && let Err(e) = self.set_period(p, now)?
        {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        if created {
            // A new account gets its snapshot at once so later recoveries start from it.
            self.write_snapshot()?;
        } else {
            self.after_write()?;
        }
        let r = self.view().map(|view| UpsertReply { created, view });
        self.reply_after_commit(reply, r);
        Ok(())
    }

    /// The other account Stripe customer `c` is linked to, if any.
    pub(super) fn customer_owner_elsewhere(
        &self,
        c: &str,
    ) -> Result<Option<AccountId>, StoreError> {
        Ok(self
            .deps
            .store
            .customer_account(c)?
            .filter(|a| a != &self.id))
    }

    pub(super) fn merge_profile(
        &self,
        cmd: UpsertCmd,
        now: i64,
    ) -> Result<AccountProfile, AccountError> {
        let current = self.fold.profile.as_ref();
        let plan_name = match (&cmd.plan, current) {
            (Some(p), _) => p.clone(),
            (None, Some(c)) => c.plan.clone(),
            (None, None) => {
                return Err(ValidationError::new("`plan` is required to create an account").into());
            }
        };
        let Some(plan) = self.deps.catalog.plans.get(&plan_name) else {
            let known: Vec<&str> = self.deps.catalog.plans.keys().map(String::as_str).collect();
            return Err(ValidationError::new(format!(
                "unknown plan `{plan_name}`; configured plans: {}",
                known.join(", ")
            ))
            .into());
        };
        let seats = cmd
            .seats
            .or(current.map(|c| c.seats))
            .unwrap_or(plan.min_seats.max(1));
        if seats == 0 || seats < plan.min_seats {
            return Err(ValidationError::new(format!(
                "plan `{plan_name}` needs at least {} seat(s); got {seats}",
                plan.min_seats.max(1)
            ))
            .into());
        }
        let metadata = match cmd.metadata {
            Some(m) => {
                validate_metadata(&m)?;
                m.into_iter().collect()
            }
            None => current.map(|c| c.metadata.clone()).unwrap_or_default(),
        };
        let check_len = |name: &str, v: &Option<String>| match v {
            Some(s) if s.len() > 256 => Err(ValidationError::new(format!(
                "`{name}` is longer than 256 bytes"
            ))),
            _ => Ok(()),
        };
        check_len("email", &cmd.email)?;
        check_len("stripe_customer_id", &cmd.stripe_customer_id)?;
        check_len("stripe_customer_id", &cmd.link_customer_if_unset)?;
        let (status, status_since_ms) = match (cmd.status, current) {
            (Some(s), Some(c)) if s == c.status => (s, c.status_since_ms),
            (Some(s), _) => (s, now),
            (None, Some(c)) => (c.status, c.status_since_ms),
            (None, None) => (SubscriptionStatus::Active, now),
        };
        let overrides = match cmd.overrides {
            Some(o) => {
                if plan.kind != PlanKind::Custom && !o.is_empty() {
                    return Err(ValidationError::new(format!(
                        "plan `{plan_name}` is not a custom plan; only custom plans take overrides"
                    ))
                    .into());
                }
                if let Some(m) = o
                    .keys()
                    .find(|m| !self.deps.catalog.meters.contains_key(*m))
                {
                    return Err(
                        ValidationError::new(format!("overrides: unknown meter `{m}`")).into(),
                    );
                }
                o
            }
            None if plan.kind == PlanKind::Custom => {
                current.map(|c| c.overrides.clone()).unwrap_or_default()
            }
            // Leaving a custom plan drops its overrides.
            None => BTreeMap::new(),
        };
        Ok(AccountProfile {
            spend_cap: cmd.spend_cap.or(current.and_then(|c| c.spend_cap)),
            status,
            status_since_ms,
            overrides,
            plan: plan_name,
            seats,
            email: cmd.email.or_else(|| current.and_then(|c| c.email.clone())),
            stripe_customer_id: cmd
                .stripe_customer_id
                .or_else(|| current.and_then(|c| c.stripe_customer_id.clone()))
                .or(cmd.link_customer_if_unset),
            metadata,
            created_at_ms: current.map(|c| c.created_at_ms).unwrap_or(now),
        })
    }
}
