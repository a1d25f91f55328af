//! The account as reads see it: balances, entitlements, cost and projection.

use super::*;

impl AccountState {
    pub(super) fn view(&self) -> Result<AccountView, AccountError> {
        let profile = self
            .fold
            .profile
            .clone()
            .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))?;
        let plan = self.catalog_plan(&profile)?;
        let balances = self
            .balances_at(self.deps.clock.now_ms())
            .ok_or_else(|| AccountError::UnknownAccount(self.id.clone()))?;
        let now = self.deps.clock.now_ms();
        let access = self.access_at(&profile, now);
        let credits = balances.live_credits(now);
        let mut meters = Vec::new();
        let mut meter_entitlements = BTreeMap::new();
        for (name, rule) in &effective_rules(plan, &profile) {
            meter_entitlements.insert(
                name.clone(),
                meter_entitlement(Some(rule), &balances, credits, profile.status, access, name),
            );
            let usage = balances.usage(name);
            let limit = meter_limit(rule, usage, credits);
            meters.push(MeterView {
                meter: name.clone(),
                used: usage.used,
                reserved: usage.reserved,
                included: rule.included,
                billable: usage.billable,
                limit,
                remaining: limit.map(|l| l.saturating_sub(usage.occupied())),
                overage: match rule.overage {
                    crate::model::Overage::Block => "block",
                    crate::model::Overage::Credits { .. } => "credits",
                    crate::model::Overage::Bill => "bill",
                    crate::model::Overage::Unlimited => "unlimited",
                },
            });
        }
        let cost = current_cost(plan, &profile, &balances).map_err(|e| e.to_string());
        let (projected_usage, suggested_plan) = match &cost {
            Ok(c) => {
                let usage: u64 = c.meters.values().map(|m| m.amount).sum();
                let elapsed = now - balances.period.start_ms;
                let length = balances.period.end_ms - balances.period.start_ms;
                (
                    projected(usage, elapsed, length),
                    suggested_plan(&self.deps.catalog, plan, c),
                )
            }
            Err(_) => (0, None),
        };
        Ok(AccountView {
            id: self.id.clone(),
            cost,
            projected_usage,
            suggested_plan,
            access,
            meter_entitlements,
            plan: plan.clone(),
            grants: balances.grants.clone(),
            alerts: balances.alerts.clone(),
            as_of_ms: now,
            billing: self.fold.billing.clone(),
            plan_kind: plan.kind.as_str(),
            features: plan.features.clone(),
            period: balances.period,
            meters,
            credits,
            credit_debt: balances.credit_debt,
            open_disputes: balances.disputes.iter().cloned().collect(),
            last_seq: self.fold.last_seq,
            profile,
        })
    }
}
