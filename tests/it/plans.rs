//! Plans and access: subscription statuses and their access rules, the past_due grace
//! period, entitlements, and per-account overrides on custom plans.

use std::time::Duration;

use meterd_actors::model::Clock;
use serde_json::json;

use crate::support::{APP_KEY, TestDaemon};

const HOUR_MS: i64 = 3_600_000;
/// 2026-03-10T00:00:00Z.
const T0: i64 = 1_773_100_800_000;

async fn entitlement(d: &TestDaemon, id: &str, what: &str) -> (bool, String) {
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}/entitlements/{what}"),
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    (
        r.body["allowed"].as_bool().unwrap(),
        r.body["reason"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn past_due_keeps_access_for_the_grace_period_then_denies() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(
        tempfile::tempdir().unwrap(),
        |c| c.accounts.past_due_grace = Duration::from_secs(72 * 3600),
        clock.clone(),
    )
    .await;
    d.client.put_account("a", json!({"plan": "pro"})).await;
    assert_eq!(
        entitlement(&d, "a", "premium").await,
        (true, "active".into())
    );
    let r = d
        .client
        .put_account("a", json!({"status": "past_due"}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "past_due");
    assert_eq!(r.body["access"], "grace_period");
    assert_eq!(r.body["grace_until"], "2026-03-13T00:00:00.000Z");
    assert_eq!(d.client.consume("a", 5, "in-grace").await.status, 200);
    assert_eq!(
        entitlement(&d, "a", "premium").await,
        (true, "grace_period".into())
    );
    // Setting the same status again does not restart the grace period.
    clock.set_ms(T0 + 71 * HOUR_MS);
    d.client
        .put_account("a", json!({"status": "past_due"}))
        .await;
    clock.set_ms(T0 + 72 * HOUR_MS);
    let denied = d.client.consume("a", 5, "after-grace").await;
    assert_eq!(denied.status, 402);
    assert_eq!(denied.code(), "subscription_inactive");
    assert!(
        denied.body["error"]["ledger_seq"].as_u64().is_some(),
        "a recorded denial"
    );
    assert_eq!(
        entitlement(&d, "a", "premium").await,
        (false, "subscription_inactive".into())
    );
    assert_eq!(
        entitlement(&d, "a", "tokens").await,
        (false, "subscription_inactive".into())
    );
    // Paying restores access at once; the recorded denial still replays as a denial.
    d.client.put_account("a", json!({"status": "active"})).await;
    assert_eq!(d.client.consume("a", 5, "paid").await.status, 200);
    let replay = d.client.consume("a", 5, "after-grace").await;
    assert_eq!(replay.status, 402);
    assert!(replay.replayed());
    let acct = d.client.get_account("a").await;
    assert_eq!(acct.body["meters"]["tokens"]["used"], 10);
    d.stop().await;
}

#[tokio::test]
async fn each_inactive_status_denies_and_active_ones_allow() {
    let d = TestDaemon::start().await;
    d.client.put_account("s", json!({"plan": "pro"})).await;
    for (i, (status, allowed)) in [
        ("trialing", true),
        ("canceled", false),
        ("unpaid", false),
        ("incomplete", false),
        ("active", true),
    ]
    .into_iter()
    .enumerate()
    {
        let r = d.client.put_account("s", json!({"status": status})).await;
        assert_eq!(r.status, 200, "{status}: {:?}", r.body);
        let c = d.client.consume("s", 1, &format!("k{i}")).await;
        assert_eq!(c.status == 200, allowed, "{status}: {:?}", c.body);
        if !allowed {
            assert_eq!(c.code(), "subscription_inactive");
        }
        let check = d
            .client
            .send(
                reqwest::Method::POST,
                "/v1/accounts/s/check",
                Some(APP_KEY),
                Some(json!({"meter": "tokens", "quantity": 1})),
            )
            .await;
        assert_eq!(check.body["allowed"], allowed, "{status}");
    }
    let bad = d.client.put_account("s", json!({"status": "trial"})).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("status")
    );
    d.stop().await;
}

#[tokio::test]
async fn entitlements_list_features_and_meters_with_reasons() {
    let d = TestDaemon::start().await;
    d.client.put_account("f", json!({"plan": "free"})).await;
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            "/v1/accounts/f/entitlements",
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "active");
    assert_eq!(r.body["features"]["basic"]["allowed"], true);
    assert_eq!(r.body["meters"]["tokens"]["allowed"], true);
    // A feature of another plan is not in this one.
    assert_eq!(
        entitlement(&d, "f", "analytics").await,
        (false, "not_in_plan".into())
    );
    // Using up the allowance shows on the meter (`hasTokensRemaining`).
    assert_eq!(d.client.consume("f", 100, "all").await.status, 200);
    assert_eq!(
        entitlement(&d, "f", "tokens").await,
        (false, "cap_reached".into())
    );
    // Prepaid: no credits, nothing remaining.
    d.client.put_account("p", json!({"plan": "prepaid"})).await;
    assert_eq!(
        entitlement(&d, "p", "tokens").await,
        (false, "insufficient_credits".into())
    );
    d.client.credit("p", 10, "g").await;
    assert_eq!(
        entitlement(&d, "p", "tokens").await,
        (true, "active".into())
    );
    d.stop().await;
}

#[tokio::test]
async fn custom_plans_take_per_account_overrides_and_others_refuse_them() {
    let d = TestDaemon::start().await;
    let r = d
        .client
        .put_account(
            "ent",
            json!({"plan": "enterprise", "overrides": {"tokens": {"included": 50, "overage": "block"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["meters"]["tokens"]["limit"], 50);
    assert_eq!(d.client.consume("ent", 50, "a").await.status, 200);
    assert_eq!(d.client.consume("ent", 1, "b").await.status, 429);
    // A later update without `overrides` keeps them; an explicit one replaces them.
    d.client.put_account("ent", json!({"seats": 10})).await;
    assert_eq!(d.client.consume("ent", 1, "c").await.status, 429);
    d.client
        .put_account("ent", json!({"overrides": {"tokens": {"overage": "bill"}}}))
        .await;
    let billed = d.client.consume("ent", 5, "d").await;
    assert_eq!(billed.status, 200);
    assert_eq!(billed.body["meter"]["billable"], 5);
    // Non-custom plans refuse overrides, and nothing changes.
    let before = d.client.ledger("ent").await.len();
    let r = d
        .client
        .put_account(
            "f",
            json!({"plan": "free", "overrides": {"tokens": {"included": 9999}}}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(d.client.get_account("f").await.status, 404);
    let r = d
        .client
        .put_account("ent", json!({"overrides": {"images": {"included": 1}}}))
        .await;
    assert_eq!(r.status, 400, "unknown meter");
    let r = d
        .client
        .put_account(
            "ent",
            json!({"overrides": {"tokens": {"overage": "credits"}}}),
        )
        .await;
    assert_eq!(r.status, 400, "credits without credits_per_unit");
    assert_eq!(d.client.ledger("ent").await.len(), before);
    d.stop().await;
}

/// Seed 000's plans priced exactly, and the upgrade hint once pay-as-you-go spend passes the
/// flat plan's price.
#[tokio::test]
async fn period_cost_projection_and_upgrade_hint() {
    // Mid-period: 2026-03-16T12:00:00Z is exactly halfway through March (31 days).
    let clock = Clock::manual(T0 + 6 * 24 * HOUR_MS + 12 * HOUR_MS);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("pg", json!({"plan": "payg"})).await;
    assert_eq!(d.client.consume("pg", 37, "k1").await.status, 200);
    let a = d.client.get_account("pg").await;
    // 37 tokens at $0.50 = $18.50.
    assert_eq!(a.body["cost"]["total"], 1850, "{}", a.body);
    assert_eq!(a.body["cost"]["usage"], 1850);
    assert_eq!(a.body["cost"]["currency"], "usd");
    assert_eq!(a.body["cost"]["meters"]["tokens"]["billable_units"], 37);
    // Half the period elapsed: the usage projects to twice as much.
    assert_eq!(a.body["cost"]["projected_total"], 3700);
    assert!(a.body.get("suggested_plan").is_none(), "$18.50 < $29");
    // 59 tokens = $29.50 > Pro's $29: suggest Pro.
    assert_eq!(d.client.consume("pg", 22, "k2").await.status, 200);
    let a = d.client.get_account("pg").await;
    assert_eq!(a.body["cost"]["total"], 2950);
    assert_eq!(a.body["suggested_plan"], "pro");
    // Flat and seat plans: base fee and seats, no per-unit cost.
    d.client.put_account("pro", json!({"plan": "pro"})).await;
    d.client.consume("pro", 10_000, "k").await;
    let a = d.client.get_account("pro").await;
    assert_eq!(a.body["cost"]["total"], 2900);
    assert!(a.body.get("suggested_plan").is_none());
    d.client
        .put_account("team", json!({"plan": "team", "seats": 3}))
        .await;
    let a = d.client.get_account("team").await;
    assert_eq!(a.body["cost"]["seats"], 5700);
    assert_eq!(a.body["cost"]["total"], 5700);
    d.stop().await;
}
