//! Per-API-key rate limits: 429 `rate_limited` with `Retry-After`, per-scope buckets,
//! exemptions, no effect of a limited request, and refill. Loops are bounded; timing bounds
//! are generous (a slow machine may only refill more, never less).

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, APP_KEY, Client, Resp, TestDaemon, eventually};
use meterd::config::RateLimit;

fn limit(requests_per_second: u64, burst: u64) -> Option<RateLimit> {
    Some(RateLimit {
        requests_per_second,
        burst,
    })
}

async fn get(c: &Client, path: &str, key: Option<&str>) -> Resp {
    c.send(Method::GET, path, key, None).await
}

fn retry_after(r: &Resp) -> u64 {
    r.headers
        .get("retry-after")
        .expect("429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds")
}

fn assert_rate_limited(r: &Resp) {
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.code(), "rate_limited", "{:?}", r.body);
    assert!(retry_after(r) >= 1);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(!msg.contains(APP_KEY) && !msg.contains(ADMIN_KEY), "{msg}");
}

/// Sends `GET path` with `key` until a 429 comes (at most `bound` tries); returns it.
async fn until_limited(c: &Client, path: &str, key: &str, bound: usize) -> Resp {
    for _ in 0..bound {
        let r = get(c, path, Some(key)).await;
        if r.status == 429 {
            return r;
        }
    }
    panic!("no 429 within {bound} requests");
}

/// Consume entries in an account's ledger, read with the (unlimited) admin key.
async fn consume_entries(c: &Client, id: &str) -> Vec<Value> {
    let r = get(
        c,
        &format!("/v1/accounts/{id}/ledger?after_seq=0&limit=1000"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "consume")
        .cloned()
        .collect()
}

#[tokio::test]
async fn app_key_over_its_burst_gets_429_and_other_scopes_and_health_are_not_limited() {
    let d = TestDaemon::start_with(|c| c.rate_limits.app = limit(1, 5)).await;
    let c = &d.client;
    // The full bucket allows the burst (404: no such account, but not limited).
    for i in 0..5 {
        let r = get(c, "/v1/accounts/nobody", Some(APP_KEY)).await;
        assert_ne!(r.status, 429, "request {i}: {:?}", r.body);
    }
    // The sixth is refused (on a very slow machine a token may have come back: allow a few).
    let r = until_limited(c, "/v1/accounts/nobody", APP_KEY, 10).await;
    assert_rate_limited(&r);
    // 1 request per second: the next token is at most 1 s away.
    assert_eq!(retry_after(&r), 1);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("app") && msg.contains('1'), "{msg}");

    // The admin scope has no limit configured; its key has a bucket of its own anyway.
    for i in 0..30 {
        let r = get(c, "/v1/accounts/nobody", Some(ADMIN_KEY)).await;
        assert_eq!(r.status, 404, "admin request {i}: {:?}", r.body);
    }
    // Health checks and the document are never limited, even when sent with the limited key.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        for _ in 0..10 {
            let r = get(c, path, Some(APP_KEY)).await;
            assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        }
    }
    // Missing or invalid keys are not charged here: the route answers 401.
    for _ in 0..10 {
        assert_eq!(get(c, "/v1/accounts/nobody", None).await.status, 401);
        let r = get(c, "/v1/accounts/nobody", Some("not-a-key-0123456789")).await;
        assert_eq!(r.status, 401, "{:?}", r.body);
    }
    // The app key is still limited (its bucket stayed empty).
    let r = until_limited(c, "/v1/accounts/nobody", APP_KEY, 10).await;
    assert_rate_limited(&r);
    d.stop().await;
}

#[tokio::test]
async fn each_scope_has_its_own_limit() {
    let d = TestDaemon::start_with(|c| {
        c.rate_limits.app = limit(1, 2);
        c.rate_limits.admin = limit(1, 3);
    })
    .await;
    let c = &d.client;
    let app = until_limited(c, "/v1/accounts/nobody", APP_KEY, 10).await;
    assert_rate_limited(&app);
    // Emptying the app bucket did not touch the admin one.
    for i in 0..3 {
        let r = get(c, "/v1/accounts/nobody", Some(ADMIN_KEY)).await;
        assert_eq!(r.status, 404, "admin request {i}: {:?}", r.body);
    }
    let admin = until_limited(c, "/v1/accounts/nobody", ADMIN_KEY, 10).await;
    assert_rate_limited(&admin);
    let msg = admin.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("admin") && msg.contains("burst 3"), "{msg}");
    d.stop().await;
}

#[tokio::test]
async fn a_rate_limited_consume_changes_nothing() {
    let d = TestDaemon::start_with(|c| c.rate_limits.app = limit(1, 3)).await;
    let c = &d.client;
    assert_eq!(
        c.put_account("rl", json!({"plan": "free"})).await.status,
        201
    );
    let mut allowed = 0;
    let mut limited_key = None;
    for i in 0..20 {
        let key = format!("k{i}");
        let r = c.consume("rl", 1, &key).await;
        if r.code() == "rate_limited" {
            assert_rate_limited(&r);
            limited_key = Some(key);
            break;
        }
        assert_eq!(r.status, 200, "{:?}", r.body);
        allowed += 1;
    }
    let limited_key = limited_key.expect("a consume was rate limited within 20");
    assert!(allowed >= 3, "the burst of 3 was allowed, got {allowed}");
    let entries = consume_entries(c, "rl").await;
    assert_eq!(entries.len(), allowed, "{entries:?}");
    assert!(
        entries
            .iter()
            .all(|e| e["idempotency_key"] != limited_key.as_str()),
        "{entries:?}"
    );
    // Once a token is back, the same request is new (not a replay) and recorded once.
    let mut r = c.consume("rl", 1, &limited_key).await;
    for _ in 0..100 {
        if r.code() != "rate_limited" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = c.consume("rl", 1, &limited_key).await;
    }
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!r.replayed());
    let entries = consume_entries(c, "rl").await;
    assert_eq!(entries.len(), allowed + 1, "{entries:?}");
    d.stop().await;
}

#[tokio::test]
async fn an_empty_bucket_refills_at_the_configured_rate() {
    let d = TestDaemon::start_with(|c| c.rate_limits.app = limit(50, 1)).await;
    let c = &d.client;
    let r = until_limited(c, "/v1/accounts/nobody", APP_KEY, 100).await;
    assert_rate_limited(&r);
    // 20 ms to the next token, rounded up to whole seconds.
    assert_eq!(retry_after(&r), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Two tokens' worth have passed; poll (bounded) in case the machine is very slow.
    eventually(Duration::from_secs(2), || async {
        get(c, "/v1/accounts/nobody", Some(APP_KEY)).await.status == 404
    })
    .await;
    d.stop().await;
}

/// A batch of n items costs n requests of the key's limit, and one it cannot afford is
/// refused as a whole, before any item is decided.
#[tokio::test]
async fn a_batch_costs_one_token_per_item() {
    let d = TestDaemon::start_with(|c| c.rate_limits.app = limit(1, 10)).await;
    d.client
        .put_account("b", serde_json::json!({"plan": "pro"}))
        .await;
    let batch = |n: usize, prefix: &str| {
        let items: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                serde_json::json!({"account_id": "b", "meter": "tokens", "quantity": 1,
                    "idempotency_key": format!("{prefix}{i}")})
            })
            .collect();
        serde_json::json!({ "items": items })
    };
    let ok = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/consume/batch",
            Some(APP_KEY),
            Some(batch(6, "a")),
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    // 4 tokens left (plus a little refill): 6 more items cannot be afforded.
    let refused = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/consume/batch",
            Some(APP_KEY),
            Some(batch(6, "b")),
        )
        .await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.code(), "rate_limited");
    assert!(refused.headers.get("retry-after").is_some());
    let acct = d
        .client
        .send(
            reqwest::Method::GET,
            "/v1/accounts/b",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(
        acct.body["meters"]["tokens"]["used"], 6,
        "nothing of the refused batch"
    );
    d.stop().await;
}
