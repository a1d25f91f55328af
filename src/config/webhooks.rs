//! `[webhooks]`: receiving Stripe's events, the event log and applying events; also that each
//! licensed Stripe price belongs to one plan, so a subscription event names its plan.
//! (`webhooks.max_attempts` is typed nonzero, so serde checks it: see [`super::raw`].)

use std::collections::BTreeMap;
use std::time::Duration;

use meterd_actors::account::MoneyPolicy;
use meterd_actors::model::Catalog;

use super::raw::RawWebhooks;
use super::stripe::StripeConfig;
use super::{Invalid, invalid, valid_env_name};

/// Stripe webhooks (`[webhooks]`): receiving, the event log, applying.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Environment variable with the signing secret(s), comma-separated during a rotation.
    pub secret_env: String,
    pub tolerance_s: u64,
    pub max_body_bytes: usize,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Event ids (and payloads of settled events) are kept at least this long.
    pub retention: Duration,
    /// The plan an account falls back to when its subscription ends.
    pub fallback_plan: String,
    pub backfill_on_start: bool,
    pub backfill_days: u64,
    /// What a refund of a top-up does with credits already spent, and whether an open
    /// dispute suspends credit use.
    pub money: MoneyPolicy,
}

/// `[webhooks]`, on the plans of `catalog` and their Stripe prices in `stripe`.
pub(super) fn build(
    w: &RawWebhooks,
    stripe: &StripeConfig,
    catalog: &Catalog,
) -> Result<WebhookConfig, Invalid> {
    if !valid_env_name(&w.secret_env) {
        return Err(invalid(
            "webhooks.secret_env",
            "not an environment variable name",
        ));
    }
    if !(1..=3600).contains(&w.tolerance_s) {
        return Err(invalid(
            "webhooks.tolerance_s",
            "must be from 1 to 3600 seconds",
        ));
    }
    if !(1024..=16 * 1024 * 1024).contains(&w.max_body_bytes) {
        return Err(invalid(
            "webhooks.max_body_bytes",
            "must be from 1024 to 16777216",
        ));
    }
    if !(30..=3650).contains(&w.retention_days) {
        return Err(invalid(
            "webhooks.retention_days",
            "must be between 30 (Stripe retries for 3 days; its events list covers 30) and 3650",
        ));
    }
    if !(1..=30).contains(&w.backfill_days) {
        return Err(invalid(
            "webhooks.backfill_days",
            "must be from 1 to 30 (Stripe lists events of the last 30 days)",
        ));
    }
    if !catalog.plans.contains_key(&w.fallback_plan) {
        return Err(invalid(
            "webhooks.fallback_plan",
            format!("no plan `{}` is declared under [plans]", w.fallback_plan),
        ));
    }
    let refund_debt = match w.refund_policy.as_str() {
        "negative_balance" => true,
        "forgive" => false,
        _ => {
            return Err(invalid(
                "webhooks.refund_policy",
                "must be \"negative_balance\" (spent credits of a refunded top-up become a debt that blocks credit use until covered) or \"forgive\" (only unspent credits are taken back)",
            ));
        }
    };
    // A licensed price must mean one plan, or a subscription webhook could not name its
    // plan. (Plans may share a metered price: the licensed item decides.)
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (plan, sp) in &stripe.plans {
        if let Some(price) = &sp.stripe_price
            && let Some(other) = seen.insert(price, plan)
        {
            return Err(invalid(
                format!("plans.{plan}.stripe_price"),
                format!("price `{price}` is also the stripe_price of plan `{other}`"),
            ));
        }
    }
    for (plan, sp) in &stripe.plans {
        if let Some(price) = &sp.stripe_metered_price
            && let Some(other) = seen.get(price.as_str())
        {
            return Err(invalid(
                format!("plans.{plan}.stripe_metered_price"),
                format!("price `{price}` is the licensed stripe_price of plan `{other}`"),
            ));
        }
    }
    Ok(WebhookConfig {
        secret_env: w.secret_env.clone(),
        tolerance_s: w.tolerance_s,
        max_body_bytes: w.max_body_bytes,
        max_attempts: w.max_attempts.get(),
        base_backoff: Duration::from_millis(w.base_backoff_ms.max(1)),
        max_backoff: Duration::from_secs(w.max_backoff_s.max(1)),
        retention: Duration::from_secs(w.retention_days * 86_400),
        fallback_plan: w.fallback_plan.clone(),
        backfill_on_start: w.backfill_on_start,
        backfill_days: w.backfill_days,
        money: MoneyPolicy {
            refund_debt,
            dispute_suspends: w.dispute_suspends_credits,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::EMBEDDED_DEFAULT;
    use crate::config::tests::{assert_edits_name_keys, parse};

    #[test]
    fn webhook_settings_default_and_bad_ones_name_their_key() {
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.webhooks.secret_env, "STRIPE_WEBHOOK_SECRET");
        assert_eq!(c.webhooks.tolerance_s, 300);
        assert_eq!(c.webhooks.fallback_plan, "free");
        assert_eq!(c.webhooks.retention, Duration::from_secs(35 * 86_400));
        assert!(!c.stripe.refetch_on_webhook);
        assert!(c.webhooks.money.refund_debt && c.webhooks.money.dispute_suspends);
        let forgiving = EMBEDDED_DEFAULT
            .replacen(
                "refund_policy = \"negative_balance\"",
                "refund_policy = \"forgive\"",
                1,
            )
            .replacen(
                "dispute_suspends_credits = true",
                "dispute_suspends_credits = false",
                1,
            );
        let c = parse(&forgiving).unwrap();
        assert!(!c.webhooks.money.refund_debt && !c.webhooks.money.dispute_suspends);
        let cases = [
            (
                "refund_policy = \"negative_balance\"",
                "refund_policy = \"ignore\"",
                "webhooks.refund_policy",
            ),
            (
                "tolerance_s = 300",
                "tolerance_s = 0",
                "webhooks.tolerance_s",
            ),
            (
                "retention_days = 35",
                "retention_days = 7",
                "webhooks.retention_days",
            ),
            (
                "backfill_days = 30",
                "backfill_days = 90",
                "webhooks.backfill_days",
            ),
            (
                "fallback_plan = \"free\"",
                "fallback_plan = \"gratis\"",
                "webhooks.fallback_plan",
            ),
            (
                "secret_env = \"STRIPE_WEBHOOK_SECRET\"",
                "secret_env = \"not a var\"",
                "webhooks.secret_env",
            ),
            (
                "max_body_bytes = 1048576",
                "max_body_bytes = 10",
                "webhooks.max_body_bytes",
            ),
            (
                "backfill_days = 30",
                "backfill_days = 30\nsecret = \"whsec_x\"",
                "secret",
            ),
        ];
        assert_edits_name_keys(&cases);
        // One licensed price cannot belong to two plans; plans may share a metered price.
        let two = EMBEDDED_DEFAULT
            .replacen(
                "# stripe_price = \"price_...\"",
                "stripe_price = \"price_1Team\"\nstripe_metered_price = \"price_1Meter\"",
                1,
            )
            .replacen(
                "[plans.enterprise]",
                "[plans.enterprise]\nstripe_price = \"price_1Team\"",
                1,
            );
        let err = parse(&two).unwrap_err().to_string();
        assert!(err.contains("plans.team.stripe_price"), "{err}");
        let shared = EMBEDDED_DEFAULT
            .replacen(
                "# stripe_price = \"price_...\"",
                "stripe_price = \"price_1Team\"\nstripe_metered_price = \"price_1Meter\"",
                1,
            )
            .replacen(
                "[plans.enterprise]",
                "[plans.enterprise]\nstripe_price = \"price_1Ent\"\nstripe_metered_price = \"price_1Meter\"",
                1,
            );
        assert!(parse(&shared).is_ok());
    }
}
