//! Billing periods: exact boundaries, lazy rollover as a ledger entry, periods set by admin
//! (and their successors), and monthly credit grants with their rollover policy.

use meterd_actors::model::Clock;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, APP_KEY, TestDaemon};

const DAY: i64 = 86_400_000;
/// 2026-03-10T00:00:00Z and 2026-04-01T00:00:00Z.
const T0: i64 = 1_773_100_800_000;
const APRIL: i64 = 1_775_001_600_000;

async fn used(d: &TestDaemon, id: &str) -> (u64, Value) {
    let a = d.client.get_account(id).await;
    (
        a.body["meters"]["tokens"]["used"].as_u64().unwrap(),
        a.body["period"].clone(),
    )
}

#[tokio::test]
async fn a_consume_at_the_boundary_counts_in_the_new_period() {
    let clock = Clock::manual(APRIL - 1);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("b", json!({"plan": "free"})).await;
    assert_eq!(
        d.client.consume("b", 100, "last-ms-of-march").await.status,
        200
    );
    assert_eq!(d.client.consume("b", 1, "still-march").await.status, 429);
    clock.set_ms(APRIL);
    // Reads already show April, without writing anything.
    let before = d.client.ledger("b").await.len();
    let (u, period) = used(&d, "b").await;
    assert_eq!(
        (u, period["start"].as_str().unwrap()),
        (0, "2026-04-01T00:00:00.000Z")
    );
    assert_eq!(d.client.ledger("b").await.len(), before);
    assert_eq!(
        d.client.consume("b", 1, "first-ms-of-april").await.status,
        200
    );
    let ledger = d.client.ledger("b").await;
    let kinds: Vec<&str> = ledger.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "account_upserted",
            "consume",
            "consume",
            "period_rolled",
            "consume"
        ]
    );
    assert_eq!(ledger[3]["period_start"], "2026-04-01T00:00:00.000Z");
    assert_eq!(used(&d, "b").await.0, 1);
    d.stop().await;
}

#[tokio::test]
async fn an_admin_set_period_resets_counters_and_repeats_its_shape() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("s", json!({"plan": "free"})).await;
    d.client.consume("s", 30, "k1").await;
    clock.set_ms(T0 + 10 * DAY); // March 20
    // Same start (March 1), later end: nothing resets.
    let r = d
        .client
        .put_account(
            "s",
            json!({"period": {"start": "2026-03-01T00:00:00Z", "end": "2026-03-25T00:00:00Z"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(used(&d, "s").await.0, 30);
    // A Stripe-style period starting on the 15th: a new period, counters reset.
    let r = d
        .client
        .put_account(
            "s",
            json!({"period": {"start": "2026-03-15T00:00:00Z", "end": "2026-04-15T00:00:00Z"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["period"]["end"], "2026-04-15T00:00:00.000Z");
    assert_eq!(used(&d, "s").await.0, 0);
    assert_eq!(d.client.consume("s", 100, "k2").await.status, 200);
    // The next period keeps the anchor: April 15 to May 15.
    clock.set_ms(T0 + 36 * DAY); // April 15
    let (u, period) = used(&d, "s").await;
    assert_eq!(u, 0);
    assert_eq!(period["start"], "2026-04-15T00:00:00.000Z");
    assert_eq!(period["end"], "2026-05-15T00:00:00.000Z");
    let kinds: Vec<String> = d
        .client
        .ledger("s")
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(kinds.contains(&"period_adjusted".to_owned()));
    // Refused: not containing now, reversed, or starting before the current period. A
    // refusal changes nothing: not the plan sent with it, not even the rollover that is due.
    let before = d.client.ledger("s").await.len();
    for (start, end) in [
        ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
        ("2026-04-20T00:00:00Z", "2026-04-10T00:00:00Z"),
        ("2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z"),
        ("yesterday", "2026-05-01T00:00:00Z"),
    ] {
        let r = d
            .client
            .put_account(
                "s",
                json!({"plan": "pro", "period": {"start": start, "end": end}}),
            )
            .await;
        assert_eq!(r.status, 400, "{start}..{end}: {:?}", r.body);
    }
    assert_eq!(d.client.ledger("s").await.len(), before);
    assert_eq!(d.client.get_account("s").await.body["plan"], "free");
    d.stop().await;
}

fn with_monthly(c: &mut meterd::config::Config, cap: Option<u64>) {
    let p = c.catalog.plans.get_mut("prepaid").unwrap();
    p.monthly_credits = 100;
    p.monthly_credits_rollover_cap = cap;
}

async fn balance(d: &TestDaemon, id: &str) -> u64 {
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}/credits"),
            Some(APP_KEY),
            None,
        )
        .await;
    r.body["balance"].as_u64().unwrap()
}

#[tokio::test]
async fn monthly_credits_expire_at_the_period_end_without_rollover() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(
        tempfile::tempdir().unwrap(),
        |c| with_monthly(c, None),
        clock.clone(),
    )
    .await;
    d.client.put_account("m", json!({"plan": "prepaid"})).await;
    assert_eq!(balance(&d, "m").await, 100);
    assert_eq!(d.client.consume("m", 30, "k1").await.status, 200);
    clock.set_ms(APRIL + 1);
    // Reads show the new period's grant before any write records it.
    let before = d.client.ledger("m").await.len();
    assert_eq!(balance(&d, "m").await, 100);
    assert_eq!(d.client.ledger("m").await.len(), before);
    assert_eq!(d.client.consume("m", 1, "k2").await.status, 200);
    assert_eq!(balance(&d, "m").await, 99, "70 expired, 100 new, 1 spent");
    let ledger = d.client.ledger("m").await;
    let expired: Vec<&Value> = ledger
        .iter()
        .filter(|e| e["kind"] == "credit_expired")
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["credits_delta"], -70);
    d.stop().await;
}

#[tokio::test]
async fn monthly_credits_carry_over_up_to_the_cap() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(
        tempfile::tempdir().unwrap(),
        |c| with_monthly(c, Some(50)),
        clock.clone(),
    )
    .await;
    d.client.put_account("m", json!({"plan": "prepaid"})).await;
    // Paid credits are never trimmed by the monthly cap.
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/accounts/m/topups",
            Some(ADMIN_KEY),
            Some(json!({"package": "credits_500", "external_id": "cs_1"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(d.client.consume("m", 30, "k1").await.status, 200);
    // Monthly credits burn first (priority 10): 70 monthly + 500 paid left.
    assert_eq!(balance(&d, "m").await, 570);
    clock.set_ms(APRIL + 1);
    assert_eq!(
        balance(&d, "m").await,
        650,
        "read before the write: 50 + 100 + 500"
    );
    assert_eq!(d.client.consume("m", 1, "k2").await.status, 200);
    // 70 monthly carried, trimmed to 50; +100 new; 1 spent; 500 paid untouched.
    assert_eq!(balance(&d, "m").await, 649);
    d.stop().await;
}
