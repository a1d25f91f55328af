//! Credit grants: burn order, expiry as ledger entries, future grants, adjustments, and
//! top-ups that are credited once per external id however often they arrive.

use meterd_actors::model::{Clock, format_rfc3339};
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, APP_KEY, TestDaemon};

const HOUR_MS: i64 = 3_600_000;
/// 2026-03-10T00:00:00Z.
const T0: i64 = 1_773_100_800_000;

async fn grant(d: &TestDaemon, id: &str, body: Value) -> crate::support::Resp {
    d.client
        .send(
            reqwest::Method::POST,
            &format!("/v1/accounts/{id}/credits"),
            Some(ADMIN_KEY),
            Some(body),
        )
        .await
}

async fn grants(d: &TestDaemon, id: &str) -> (u64, Vec<Value>) {
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}/credits"),
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    (
        r.body["balance"].as_u64().unwrap(),
        r.body["grants"].as_array().unwrap().clone(),
    )
}

fn has(grants: &[Value], id: u64) -> bool {
    grants.iter().any(|g| g["id"] == id)
}

fn remaining(grants: &[Value], id: u64) -> u64 {
    grants
        .iter()
        .find(|g| g["id"] == id)
        .and_then(|g| g["remaining"].as_u64())
        .unwrap()
}

#[tokio::test]
async fn consumption_burns_grants_by_priority_then_earliest_expiry() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("p", json!({"plan": "prepaid"})).await;
    let day = format_rfc3339(T0 + 24 * HOUR_MS);
    let week = format_rfc3339(T0 + 7 * 24 * HOUR_MS);
    let a = grant(&d, "p", json!({"amount": 100, "idempotency_key": "a"})).await;
    let b = grant(
        &d,
        "p",
        json!({"amount": 50, "idempotency_key": "b", "priority": 10}),
    )
    .await;
    let c = grant(
        &d,
        "p",
        json!({"amount": 30, "idempotency_key": "c", "expires_at": week}),
    )
    .await;
    let e = grant(
        &d,
        "p",
        json!({"amount": 20, "idempotency_key": "e", "expires_at": day,
        "category": "paid", "external_id": "pi_123"}),
    )
    .await;
    let ids: Vec<u64> = [&a, &b, &c, &e]
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body["ledger_seq"].as_u64().unwrap()
        })
        .collect();
    let (total, before) = grants(&d, "p").await;
    assert_eq!(total, 200);
    let paid = before.iter().find(|g| g["id"] == ids[3]).unwrap();
    assert_eq!(paid["category"], "paid");
    assert_eq!(paid["external_id"], "pi_123");
    // 90 credits: priority 10 first (50), then the earliest expiry (20), then the next (20 of 30).
    assert_eq!(d.client.consume("p", 90, "k1").await.status, 200);
    let (balance, list) = grants(&d, "p").await;
    assert_eq!(balance, 110);
    // Used up: they leave the live state and the list (the ledger keeps them).
    assert!(!has(&list, ids[1]) && !has(&list, ids[3]), "{list:?}");
    assert_eq!(remaining(&list, ids[2]), 10);
    assert_eq!(remaining(&list, ids[0]), 100);
    d.stop().await;
}

#[tokio::test]
async fn expiry_is_a_ledger_entry_and_leaves_the_balance() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("x", json!({"plan": "prepaid"})).await;
    let r = grant(
        &d,
        "x",
        json!({"amount": 40, "idempotency_key": "g1",
        "expires_at": format_rfc3339(T0 + HOUR_MS)}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    grant(&d, "x", json!({"amount": 5, "idempotency_key": "g2"})).await;
    assert_eq!(d.client.consume("x", 10, "k1").await.status, 200);
    assert_eq!(grants(&d, "x").await.0, 35);
    // Past the expiry: reads already leave the grant out, without writing anything.
    clock.set_ms(T0 + HOUR_MS);
    assert_eq!(grants(&d, "x").await.0, 5);
    let before = d.client.ledger("x").await.len();
    assert_eq!(d.client.ledger("x").await.len(), before);
    // The next write records the expiry, then decides on what is left.
    let denied = d.client.consume("x", 6, "k2").await;
    assert_eq!(denied.status, 402, "{:?}", denied.body);
    let ledger = d.client.ledger("x").await;
    let expired: Vec<&Value> = ledger
        .iter()
        .filter(|e| e["kind"] == "credit_expired")
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["credits_delta"], -30);
    assert_eq!(expired[0]["credits_after"], 5);
    assert_eq!(d.client.consume("x", 5, "k3").await.status, 200);
    assert_eq!(grants(&d, "x").await.0, 0);
    d.stop().await;
}

#[tokio::test]
async fn a_future_grant_becomes_spendable_when_effective() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("f", json!({"plan": "prepaid"})).await;
    let r = grant(
        &d,
        "f",
        json!({"amount": 10, "idempotency_key": "g",
        "effective_at": format_rfc3339(T0 + HOUR_MS)}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["credits"]["balance"], 0, "not live yet");
    assert_eq!(d.client.consume("f", 1, "early").await.status, 402);
    clock.set_ms(T0 + HOUR_MS);
    assert_eq!(d.client.consume("f", 1, "on-time").await.status, 200);
    assert_eq!(grants(&d, "f").await.0, 9);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_identical_top_ups_at_once_credit_once() {
    let d = TestDaemon::start().await;
    d.client.put_account("t", json!({"plan": "prepaid"})).await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let client = d.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .send(
                    reqwest::Method::POST,
                    "/v1/accounts/t/topups",
                    Some(ADMIN_KEY),
                    Some(json!({"package": "credits_500", "external_id": "cs_test_abc"})),
                )
                .await
        }));
    }
    let mut fresh = 0;
    let mut seqs = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        if !r.replayed() {
            fresh += 1;
        }
        seqs.push(r.body["ledger_seq"].as_u64().unwrap());
    }
    assert_eq!(fresh, 1, "exactly one top-up is credited");
    seqs.dedup();
    assert_eq!(seqs.len(), 1, "every answer names the same entry");
    let (balance, list) = grants(&d, "t").await;
    assert_eq!(balance, 500);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["package"], "credits_500");
    assert_eq!(list[0]["category"], "paid");
    // The same external id for another package is a conflict; an unknown package is invalid.
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/accounts/t/topups",
            Some(ADMIN_KEY),
            Some(json!({"package": "credits_1000", "external_id": "cs_test_abc"})),
        )
        .await;
    assert_eq!(r.status, 409);
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/accounts/t/topups",
            Some(ADMIN_KEY),
            Some(json!({"package": "credits_7", "external_id": "cs_other"})),
        )
        .await;
    assert_eq!(r.status, 400);
    // App keys cannot credit.
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/accounts/t/topups",
            Some(APP_KEY),
            Some(json!({"package": "credits_500", "external_id": "cs_app"})),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(grants(&d, "t").await.0, 500);
    d.stop().await;
}

#[tokio::test]
async fn adjustments_burn_in_order_and_never_go_below_zero() {
    let d = TestDaemon::start().await;
    d.client.put_account("j", json!({"plan": "prepaid"})).await;
    let low = grant(
        &d,
        "j",
        json!({"amount": 30, "idempotency_key": "low", "priority": 90}),
    )
    .await;
    let high = grant(
        &d,
        "j",
        json!({"amount": 20, "idempotency_key": "high", "priority": 5}),
    )
    .await;
    let r = grant(
        &d,
        "j",
        json!({"amount": -25, "idempotency_key": "adj", "reason": "refund"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["credits"]["balance"], 25);
    let (_, list) = grants(&d, "j").await;
    // The priority-5 grant was used up first: it left the list.
    assert!(!has(&list, high.body["ledger_seq"].as_u64().unwrap()));
    assert_eq!(
        remaining(&list, low.body["ledger_seq"].as_u64().unwrap()),
        25
    );
    let before = d.client.ledger("j").await.len();
    let r = grant(&d, "j", json!({"amount": -26, "idempotency_key": "adj2"})).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.code(), "credit_balance_too_low");
    // Terms make no sense on an adjustment, and bad terms on a grant are refused.
    for body in [
        json!({"amount": -1, "idempotency_key": "x1", "priority": 1}),
        json!({"amount": 5, "idempotency_key": "x2", "priority": 101}),
        json!({"amount": 5, "idempotency_key": "x3", "expires_at": "2020-01-01T00:00:00Z"}),
        json!({"amount": 5, "idempotency_key": "x4", "expires_at": "tomorrow"}),
        json!({"amount": 5, "idempotency_key": "x5", "category": "gift"}),
    ] {
        let r = grant(&d, "j", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
    }
    assert_eq!(grants(&d, "j").await.0, 25);
    assert_eq!(
        d.client.ledger("j").await.len(),
        before,
        "a refusal writes nothing"
    );
    d.stop().await;
}
