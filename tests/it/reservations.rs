//! Reservations: holds count against caps and credits, commits settle the actual quantity,
//! releases and expiries give capacity back, settlements are idempotent, holds survive
//! restarts, and no mix of holds and consumes under concurrency overspends.

use meterd_actors::model::Clock;
use serde_json::{Value, json};

use crate::support::{APP_KEY, Client, Resp, TestDaemon};

/// 2026-03-10T00:00:00Z.
const T0: i64 = 1_773_100_800_000;

async fn reserve(c: &Client, id: &str, q: u64, key: &str, ttl_s: u64) -> Resp {
    c.send(
        reqwest::Method::POST,
        &format!("/v1/accounts/{id}/reservations"),
        Some(APP_KEY),
        Some(json!({"meter": "tokens", "quantity": q, "idempotency_key": key, "ttl_s": ttl_s})),
    )
    .await
}

async fn commit(c: &Client, rid: &str, q: u64) -> Resp {
    c.send(
        reqwest::Method::POST,
        &format!("/v1/reservations/{rid}/commit"),
        Some(APP_KEY),
        Some(json!({"quantity": q})),
    )
    .await
}

async fn release(c: &Client, rid: &str) -> Resp {
    c.send(
        reqwest::Method::POST,
        &format!("/v1/reservations/{rid}/release"),
        Some(APP_KEY),
        None,
    )
    .await
}

fn rid(r: &Resp) -> String {
    r.body["reservation_id"].as_str().unwrap().to_owned()
}

fn tokens(a: &Resp) -> &Value {
    &a.body["meters"]["tokens"]
}

#[tokio::test]
async fn holds_count_against_the_cap_and_commit_settles_the_actual_quantity() {
    let d = TestDaemon::start().await;
    d.client.put_account("f", json!({"plan": "free"})).await;
    let r = reserve(&d.client, "f", 60, "r1", 300).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["meter"]["reserved"], 60);
    assert_eq!(r.body["meter"]["remaining"], 40);
    let a = d.client.get_account("f").await;
    assert_eq!(tokens(&a)["reserved"], 60);
    assert_eq!(tokens(&a)["remaining"], 40);
    // The hold is capacity: 41 more would overspend.
    assert_eq!(d.client.consume("f", 41, "c1").await.status, 429);
    assert_eq!(d.client.consume("f", 40, "c2").await.status, 200);
    // The actual size was 30: 30 consumed, 30 back.
    let c = commit(&d.client, &rid(&r), 30).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(c.body["status"], "committed");
    let a = d.client.get_account("f").await;
    assert_eq!(tokens(&a)["used"], 70);
    assert_eq!(tokens(&a)["reserved"], 0);
    assert_eq!(d.client.consume("f", 30, "c3").await.status, 200);
    assert_eq!(d.client.consume("f", 1, "c4").await.status, 429);
    d.stop().await;
}

#[tokio::test]
async fn a_commit_above_the_hold_needs_capacity() {
    let d = TestDaemon::start().await;
    d.client.put_account("f", json!({"plan": "free"})).await;
    d.client.consume("f", 80, "c1").await;
    let r = reserve(&d.client, "f", 10, "r1", 300).await;
    assert_eq!(r.status, 201);
    let over = commit(&d.client, &rid(&r), 21).await;
    assert_eq!(over.status, 429, "{:?}", over.body);
    assert_eq!(over.code(), "cap_reached");
    // Refused commits change nothing; the hold is still there.
    assert_eq!(tokens(&d.client.get_account("f").await)["reserved"], 10);
    let ok = commit(&d.client, &rid(&r), 20).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(tokens(&d.client.get_account("f").await)["used"], 100);
    // A denied reservation is a recorded decision.
    let denied = reserve(&d.client, "f", 1, "r2", 300).await;
    assert_eq!(denied.status, 429);
    assert!(denied.body["error"]["ledger_seq"].as_u64().is_some());
    let again = reserve(&d.client, "f", 1, "r2", 300).await;
    assert!(again.replayed());
    d.stop().await;
}

#[tokio::test]
async fn credit_holds_refund_what_the_commit_does_not_use() {
    let d = TestDaemon::start().await;
    d.client.put_account("p", json!({"plan": "prepaid"})).await;
    d.client.credit("p", 100, "g").await;
    let r1 = reserve(&d.client, "p", 40, "r1", 300).await;
    assert_eq!(r1.status, 201, "{:?}", r1.body);
    assert_eq!(r1.body["credits"]["balance"], 60);
    let r2 = reserve(&d.client, "p", 50, "r2", 300).await;
    assert_eq!(r2.body["credits"]["balance"], 10);
    assert_eq!(reserve(&d.client, "p", 11, "r3", 300).await.status, 402);
    let c = commit(&d.client, &rid(&r1), 25).await;
    assert_eq!(c.body["credits"]["balance"], 25, "{:?}", c.body);
    let rel = release(&d.client, &rid(&r2)).await;
    assert_eq!(rel.status, 200);
    assert_eq!(rel.body["status"], "released");
    assert_eq!(rel.body["credits"]["balance"], 75);
    let a = d.client.get_account("p").await;
    assert_eq!(tokens(&a)["used"], 25);
    assert_eq!(a.body["credits"]["balance"], 75);
    d.stop().await;
}

#[tokio::test]
async fn settlements_are_idempotent_and_final() {
    let d = TestDaemon::start().await;
    d.client.put_account("f", json!({"plan": "free"})).await;
    let r = reserve(&d.client, "f", 10, "r1", 300).await;
    let again = reserve(&d.client, "f", 10, "r1", 300).await;
    assert!(again.replayed());
    assert_eq!(rid(&again), rid(&r));
    assert_eq!(reserve(&d.client, "f", 11, "r1", 300).await.status, 409);
    let c1 = commit(&d.client, &rid(&r), 7).await;
    let c2 = commit(&d.client, &rid(&r), 7).await;
    assert_eq!(c2.status, 200);
    assert!(c2.replayed());
    assert_eq!(c2.body["ledger_seq"], c1.body["ledger_seq"]);
    let c3 = commit(&d.client, &rid(&r), 8).await;
    assert_eq!(c3.status, 409);
    assert_eq!(c3.code(), "reservation_settled");
    assert_eq!(release(&d.client, &rid(&r)).await.status, 409);
    assert_eq!(tokens(&d.client.get_account("f").await)["used"], 7);
    for bad in ["rsv_999_f", "nonsense", "rsv_x_f"] {
        assert_eq!(commit(&d.client, bad, 1).await.status, 404, "{bad}");
    }
    d.stop().await;
}

#[tokio::test]
async fn expired_holds_are_released_and_recorded() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("f", json!({"plan": "free"})).await;
    let r = reserve(&d.client, "f", 90, "r1", 60).await;
    assert_eq!(r.body["expires_at"], "2026-03-10T00:01:00.000Z");
    clock.set_ms(T0 + 60_000);
    // Reads already see the capacity back; the next write records the expiry.
    assert_eq!(tokens(&d.client.get_account("f").await)["reserved"], 0);
    assert_eq!(d.client.consume("f", 100, "c1").await.status, 200);
    let ledger = d.client.ledger("f").await;
    let settled: Vec<&Value> = ledger.iter().filter(|e| e["kind"] == "settled").collect();
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0]["decision"], "expired");
    let late = commit(&d.client, &rid(&r), 1).await;
    assert_eq!(late.status, 409);
    assert_eq!(late.code(), "reservation_expired");
    d.stop().await;
}

#[tokio::test]
async fn holds_survive_a_restart() {
    let d = TestDaemon::start().await;
    d.client.put_account("f", json!({"plan": "free"})).await;
    let r = reserve(&d.client, "f", 50, "r1", 3600).await;
    let dir = d.stop().await;
    let d = TestDaemon::start_in(dir, |_| {}, Clock::System).await;
    assert_eq!(tokens(&d.client.get_account("f").await)["reserved"], 50);
    assert_eq!(d.client.consume("f", 51, "c1").await.status, 429);
    assert_eq!(commit(&d.client, &rid(&r), 50).await.status, 200);
    assert_eq!(tokens(&d.client.get_account("f").await)["used"], 50);
    d.stop().await;
}

/// 256 clients mixing reservations (committed, released or left to expire) and consumes on
/// one capped account: used never passes the cap and ends exactly at what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_and_consumes_under_256_clients_never_overspend() {
    let d = TestDaemon::start().await;
    d.client.put_account("hot", json!({"plan": "free"})).await;
    let mut tasks = Vec::new();
    for c in 0..256u64 {
        let client = d.client.clone();
        tasks.push(tokio::spawn(async move {
            if c % 2 == 0 {
                let r = client.consume("hot", 1, &format!("c{c}")).await;
                assert!(r.status == 200 || r.status == 429, "{:?}", r.body);
                u64::from(r.status == 200)
            } else {
                let r = reserve(&client, "hot", 3, &format!("r{c}"), 300).await;
                if r.status != 201 {
                    assert_eq!(r.status, 429, "{:?}", r.body);
                    return 0;
                }
                let actual = c % 4; // 1 or 3, within the hold
                if c % 8 == 7 {
                    assert_eq!(release(&client, &rid(&r)).await.status, 200);
                    0
                } else {
                    let done = commit(&client, &rid(&r), actual).await;
                    assert_eq!(done.status, 200, "{:?}", done.body);
                    actual
                }
            }
        }));
    }
    let mut acknowledged = 0;
    for t in tasks {
        acknowledged += t.await.unwrap();
    }
    let a = d.client.get_account("hot").await;
    let used = tokens(&a)["used"].as_u64().unwrap();
    assert!(used <= 100, "overspent: {used}");
    assert_eq!(used, acknowledged);
    assert_eq!(tokens(&a)["reserved"], 0);
    d.stop().await;
}

/// Consumption through reservations raises the same usage alerts as consumes.
#[tokio::test]
async fn commits_raise_usage_alerts() {
    let d = TestDaemon::start().await;
    d.client.put_account("a", json!({"plan": "free"})).await;
    let r = reserve(&d.client, "a", 90, "r1", 300).await;
    let c = commit(&d.client, &rid(&r), 85).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    let fired: Vec<u64> = c.body["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["threshold"].as_u64().unwrap())
        .collect();
    assert_eq!(fired, vec![50, 80]);
    let again = commit(&d.client, &rid(&r), 85).await;
    assert!(again.replayed());
    assert_eq!(again.body["alerts"], c.body["alerts"]);
    // They count as fired: a consume past 80 % does not raise them again.
    let k = d.client.consume("a", 10, "k1").await;
    let more: Vec<u64> = k.body["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["threshold"].as_u64().unwrap())
        .collect();
    assert_eq!(more, vec![95]);
    d.stop().await;
}
