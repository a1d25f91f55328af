//! Alerts (usage thresholds, spend cap, low credits) fire once per period, come back in the
//! consume answer and replay with it, are listed per period; spend caps block or notify.

use meterd_actors::model::Clock;
use serde_json::{Value, json};

use crate::support::{APP_KEY, Resp, TestDaemon};

/// 2026-03-10T00:00:00Z, and 2026-04-01T00:00:00Z.
const T0: i64 = 1_773_100_800_000;
const APRIL: i64 = 1_775_001_600_000;

fn alerts(r: &Resp) -> Vec<(String, u64)> {
    r.body["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap().to_owned(),
                a["threshold"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn usage(ts: &[u64]) -> Vec<(String, u64)> {
    ts.iter().map(|t| ("usage".to_owned(), *t)).collect()
}

async fn listed(d: &TestDaemon, id: &str) -> Vec<Value> {
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}/alerts"),
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["alerts"].as_array().unwrap().clone()
}

#[tokio::test]
async fn usage_alerts_fire_once_per_period_and_replay_with_the_consume() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("f", json!({"plan": "free"})).await;
    assert_eq!(alerts(&d.client.consume("f", 49, "k1").await), usage(&[]));
    assert_eq!(alerts(&d.client.consume("f", 1, "k2").await), usage(&[50]));
    assert_eq!(alerts(&d.client.consume("f", 29, "k3").await), usage(&[]));
    let jump = d.client.consume("f", 21, "k4").await;
    assert_eq!(alerts(&jump), usage(&[80, 95, 100]));
    let replay = d.client.consume("f", 21, "k4").await;
    assert!(replay.replayed());
    assert_eq!(alerts(&replay), usage(&[80, 95, 100]));
    let list = listed(&d, "f").await;
    assert_eq!(list.len(), 4);
    assert_eq!(list[0]["threshold"], 50);
    assert_eq!(list[0]["meter"], "tokens");
    assert_eq!(list[0]["value"], 50);
    assert_eq!(list[0]["limit"], 100);
    assert_eq!(list[3]["ledger_seq"], jump.body["ledger_seq"]);
    // A new period starts without alerts; they fire again.
    clock.set_ms(APRIL);
    assert!(listed(&d, "f").await.is_empty());
    assert_eq!(alerts(&d.client.consume("f", 50, "k5").await), usage(&[50]));
    d.stop().await;
}

#[tokio::test]
async fn a_blocking_spend_cap_denies_past_it_and_a_notify_cap_only_alerts() {
    let d = TestDaemon::start().await;
    let r = d
        .client
        .put_account(
            "b",
            json!({"plan": "payg", "spend_cap": {"amount": 1000, "action": "block"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["spend_cap"]["amount"], 1000);
    // 10 tokens at $0.50 = $5.00: half the cap.
    let a = d.client.consume("b", 10, "k1").await;
    assert_eq!(alerts(&a), vec![("spend".to_owned(), 50)]);
    let a = d.client.consume("b", 10, "k2").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        alerts(&a),
        vec![
            ("spend".to_owned(), 80),
            ("spend".to_owned(), 95),
            ("spend".to_owned(), 100)
        ]
    );
    let denied = d.client.consume("b", 1, "k3").await;
    assert_eq!(denied.status, 402, "{:?}", denied.body);
    assert_eq!(denied.code(), "spend_cap_reached");
    assert!(denied.body["error"]["ledger_seq"].as_u64().is_some());
    assert_eq!(d.client.get_account("b").await.body["cost"]["usage"], 1000);
    // Raising the cap lets consumption continue; a recorded denial still replays as one.
    d.client
        .put_account(
            "b",
            json!({"spend_cap": {"amount": 2000, "action": "block"}}),
        )
        .await;
    assert_eq!(d.client.consume("b", 1, "k4").await.status, 200);
    assert_eq!(d.client.consume("b", 1, "k3").await.status, 402);
    // Notify: never blocks.
    d.client
        .put_account(
            "n",
            json!({"plan": "payg", "spend_cap": {"amount": 100, "action": "notify"}}),
        )
        .await;
    let a = d.client.consume("n", 10, "k1").await;
    assert_eq!(a.status, 200);
    assert_eq!(alerts(&a).len(), 4);
    assert_eq!(d.client.consume("n", 10, "k2").await.status, 200);
    // Bad caps are refused.
    let bad = d
        .client
        .put_account("n", json!({"spend_cap": {"amount": 5, "action": "warn"}}))
        .await;
    assert_eq!(bad.status, 400);
    d.stop().await;
}

#[tokio::test]
async fn low_credit_alert_fires_when_the_balance_drops_below_the_threshold() {
    let d = TestDaemon::start().await;
    d.client.put_account("p", json!({"plan": "prepaid"})).await;
    d.client.credit("p", 150, "g").await;
    assert!(alerts(&d.client.consume("p", 50, "k1").await).is_empty());
    let a = d.client.consume("p", 1, "k2").await;
    assert_eq!(alerts(&a), vec![("low_credits".to_owned(), 100)]);
    assert_eq!(a.body["alerts"][0]["value"], 99);
    assert!(alerts(&d.client.consume("p", 1, "k3").await).is_empty());
    d.stop().await;
}

/// Held units count as spend to come: reservations and commits cannot slip past a blocking
/// spend cap.
#[tokio::test]
async fn reservations_cannot_pass_a_blocking_spend_cap() {
    let d = TestDaemon::start().await;
    d.client
        .put_account(
            "h",
            json!({"plan": "payg", "spend_cap": {"amount": 1000, "action": "block"}}),
        )
        .await;
    let post = |path: String, body: Value| {
        let c = d.client.clone();
        async move {
            c.send(reqwest::Method::POST, &path, Some(APP_KEY), Some(body))
                .await
        }
    };
    // $0.50 per token: the cap is 20 tokens. Hold 15.
    let r = post(
        "/v1/accounts/h/reservations".into(),
        json!({"meter": "tokens", "quantity": 15, "idempotency_key": "r1"}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let rid = r.body["reservation_id"].as_str().unwrap().to_owned();
    let c = d.client.consume("h", 6, "k1").await;
    assert_eq!((c.status, c.code()), (402, "spend_cap_reached"));
    let r2 = post(
        "/v1/accounts/h/reservations".into(),
        json!({"meter": "tokens", "quantity": 6, "idempotency_key": "r2"}),
    )
    .await;
    assert_eq!((r2.status, r2.code()), (402, "spend_cap_reached"));
    let over = post(
        format!("/v1/reservations/{rid}/commit"),
        json!({"quantity": 21}),
    )
    .await;
    assert_eq!((over.status, over.code()), (402, "spend_cap_reached"));
    let ok = post(
        format!("/v1/reservations/{rid}/commit"),
        json!({"quantity": 20}),
    )
    .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(d.client.get_account("h").await.body["cost"]["usage"], 1000);
    assert_eq!(d.client.consume("h", 1, "k2").await.status, 402);
    d.stop().await;
}
