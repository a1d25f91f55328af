//! Validate fully, then write (issue 11): every write route, sent each invalid field in turn,
//! answers a 4xx with a machine-readable `code` and a message, and changes nothing: the
//! account's view, its ledger and the outbox are byte for byte what they were.

use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, APP_KEY, Client, TestDaemon};

/// Everything a refused request could have changed, as one comparable value.
async fn state(c: &Client, ids: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for id in ids {
        let a = c.get_account(id).await;
        let ledger = c.ledger(id).await;
        let credits = c
            .send(
                reqwest::Method::GET,
                &format!("/v1/accounts/{id}/credits"),
                Some(APP_KEY),
                None,
            )
            .await;
        out.insert(
            (*id).to_owned(),
            json!({"account": a.body, "ledger": ledger, "credits": credits.body}),
        );
    }
    let outbox = c
        .send(
            reqwest::Method::GET,
            "/v1/admin/outbox",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    out.insert("outbox".into(), outbox.body);
    Value::Object(out)
}

fn many_metadata(n: usize) -> Value {
    let m: serde_json::Map<String, Value> = (0..n)
        .map(|i| (format!("k{i}"), Value::String("v".into())))
        .collect();
    Value::Object(m)
}

#[tokio::test]
async fn every_write_route_refuses_each_invalid_field_and_changes_nothing() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    assert_eq!(
        c.put_account("v", json!({"plan": "payg"})).await.status,
        201
    );
    assert_eq!(
        c.put_account("pp", json!({"plan": "prepaid"})).await.status,
        201
    );
    assert_eq!(c.credit("pp", 100, "seed").await.status, 200);
    assert_eq!(c.consume("v", 3, "seed").await.status, 200);
    let before = state(c, &["v", "pp"]).await;

    let long = "x".repeat(600);
    let put = |body: Value| ("PUT", "/v1/accounts/v".to_owned(), ADMIN_KEY, Some(body));
    let post =
        |path: &str, key: &'static str, body: Value| ("POST", path.to_owned(), key, Some(body));
    let consume = |body: Value| post("/v1/accounts/v/consume", APP_KEY, body);
    let check = |body: Value| post("/v1/accounts/v/check", APP_KEY, body);
    let credit = |body: Value| post("/v1/accounts/pp/credits", ADMIN_KEY, body);
    let reserve = |body: Value| post("/v1/accounts/pp/reservations", APP_KEY, body);
    let topup = |body: Value| post("/v1/accounts/pp/topups", ADMIN_KEY, body);
    let batch = |body: Value| post("/v1/consume/batch", APP_KEY, body);

    let cases: Vec<(&str, String, &str, Option<Value>)> = vec![
        // PUT /v1/accounts/{id}: the plan must not change whatever field is wrong.
        put(json!({"plan": "nope"})),
        put(
            json!({"plan": "pro", "period": {"start": "2020-01-01T00:00:00Z", "end": "2020-02-01T00:00:00Z"}}),
        ),
        put(json!({"plan": "pro", "period": {"start": "garbage", "end": "2027-01-01T00:00:00Z"}})),
        put(
            json!({"plan": "pro", "period": {"start": "2026-12-01T00:00:00Z", "end": "2026-11-01T00:00:00Z"}}),
        ),
        put(json!({"plan": "pro", "seats": 0})),
        put(json!({"plan": "pro", "email": long})),
        put(json!({"plan": "pro", "metadata": many_metadata(21)})),
        put(json!({"plan": "pro", "metadata": {"k": long}})),
        put(json!({"plan": "pro", "spend_cap": {"amount": 100, "action": "explode"}})),
        put(json!({"plan": "pro", "spend_cap": {"amount": -1, "action": "block"}})),
        put(json!({"plan": "pro", "status": "bogus"})),
        put(json!({"plan": "pro", "overrides": {"tokens": {"included": 5}}})),
        put(json!({"plan": "pro", "stripe_customer_id": long})),
        put(json!({"plan": "pro", "unknown_field": 1})),
        put(json!({"plan": "pro", "seats": 1e3})),
        (
            "PUT",
            "/v1/accounts/bad%20id".into(),
            ADMIN_KEY,
            Some(json!({"plan": "pro"})),
        ),
        // consume and its dry run.
        consume(json!({"meter": "nope", "quantity": 1, "idempotency_key": "c1"})),
        consume(json!({"meter": "tokens", "quantity": 0, "idempotency_key": "c1"})),
        consume(
            json!({"meter": "tokens", "quantity": 9_007_199_254_740_993u64, "idempotency_key": "c1"}),
        ),
        consume(json!({"meter": "tokens", "quantity": -1, "idempotency_key": "c1"})),
        consume(json!({"meter": "tokens", "quantity": 1.5, "idempotency_key": "c1"})),
        consume(json!({"meter": "tokens", "quantity": 1, "idempotency_key": "has space"})),
        consume(json!({"meter": "tokens", "quantity": 1, "idempotency_key": ""})),
        consume(json!({"meter": "tokens", "quantity": 1, "idempotency_key": long})),
        consume(json!({"meter": "tokens", "quantity": 1})),
        consume(
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c1", "metadata": many_metadata(21)}),
        ),
        consume(
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c1", "metadata": {"k": 1}}),
        ),
        consume(json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c1", "extra": true})),
        consume(json!(["tokens", 1, "c1"])),
        post(
            "/v1/accounts/nobody/consume",
            APP_KEY,
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c1"}),
        ),
        check(json!({"meter": "nope", "quantity": 1})),
        check(json!({"meter": "tokens", "quantity": 0})),
        // credits.
        credit(json!({"amount": 0, "reason": "r", "idempotency_key": "g1"})),
        credit(json!({"amount": i64::MIN, "reason": "r", "idempotency_key": "g1"})),
        credit(json!({"amount": 10, "reason": long, "idempotency_key": "g1"})),
        credit(json!({"amount": 10, "reason": "r", "idempotency_key": "g1", "priority": 101})),
        credit(
            json!({"amount": 10, "reason": "r", "idempotency_key": "g1", "effective_at": "soon"}),
        ),
        credit(
            json!({"amount": 10, "reason": "r", "idempotency_key": "g1", "effective_at": "2027-01-02T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}),
        ),
        credit(
            json!({"amount": 10, "reason": "r", "idempotency_key": "g1", "category": "free money"}),
        ),
        credit(json!({"amount": 10, "reason": "r", "idempotency_key": "g1", "external_id": long})),
        credit(json!({"amount": -10, "reason": "r", "idempotency_key": "g1", "priority": 5})),
        credit(json!({"amount": -1000, "reason": "r", "idempotency_key": "g2"})),
        credit(json!({"amount": i64::MAX, "reason": "r", "idempotency_key": "g3"})),
        post(
            "/v1/accounts/pp/credits",
            APP_KEY,
            json!({"amount": 10, "reason": "r", "idempotency_key": "g4"}),
        ),
        // top-ups.
        topup(json!({"package": "nope", "external_id": "x1"})),
        topup(json!({"package": "credits_500", "external_id": ""})),
        topup(json!({"package": "credits_500", "external_id": long})),
        // reservations and their settlement.
        reserve(json!({"meter": "nope", "quantity": 1, "idempotency_key": "r1"})),
        reserve(json!({"meter": "tokens", "quantity": 0, "idempotency_key": "r1"})),
        reserve(json!({"meter": "tokens", "quantity": 1, "ttl_s": 0, "idempotency_key": "r1"})),
        reserve(
            json!({"meter": "tokens", "quantity": 1, "ttl_s": 86_401, "idempotency_key": "r1"}),
        ),
        reserve(json!({"meter": "tokens", "quantity": 1})),
        post(
            "/v1/reservations/pp:999/commit",
            APP_KEY,
            json!({"quantity": 1}),
        ),
        post(
            "/v1/reservations/garbage/commit",
            APP_KEY,
            json!({"quantity": 1}),
        ),
        post(
            "/v1/reservations/pp:999/commit",
            APP_KEY,
            json!({"quantity": 9_007_199_254_740_993u64}),
        ),
        (
            "POST",
            "/v1/reservations/pp:999/release".into(),
            APP_KEY,
            None,
        ),
        // batch: a malformed batch is refused as a whole (items are checked below).
        batch(json!({"items": []})),
        batch(json!({"items": [{"account_id": "v", "meter": "tokens", "quantity": 1}]})),
        batch(json!({"items": {"account_id": "v"}})),
        batch(
            json!({"items": (0..1001).map(|i| json!({"account_id": "v", "meter": "tokens", "quantity": 1, "idempotency_key": format!("m{i}")})).collect::<Vec<_>>()}),
        ),
        // Billing without Stripe, admin retries of nothing.
        post(
            "/v1/accounts/v/checkout",
            APP_KEY,
            json!({"kind": "subscription", "plan": "nope"}),
        ),
        post(
            "/v1/accounts/v/checkout",
            APP_KEY,
            json!({"kind": "sideways"}),
        ),
        (
            "POST",
            "/v1/admin/outbox/nope/retry".into(),
            ADMIN_KEY,
            None,
        ),
        (
            "POST",
            "/v1/admin/webhooks/evt_nope/replay".into(),
            ADMIN_KEY,
            None,
        ),
    ];

    let mut failures = Vec::new();
    for (method, path, key, body) in &cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = c.send(m, path, Some(key), body.clone()).await;
        let code = r.body["error"]["code"].as_str().unwrap_or("");
        let message = r.body["error"]["message"].as_str().unwrap_or("");
        let bad = !(400..500).contains(&r.status) || code.is_empty() || message.is_empty();
        if bad {
            failures.push(format!(
                "{method} {path} {body:?}: {} {:?}",
                r.status, r.body
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "not a clear 4xx:\n{}",
        failures.join("\n")
    );

    // A batch's items are requests of their own (documented: no all-or-nothing): each
    // invalid item is refused with its code and records nothing, beside a valid item (on an
    // account outside the compared state).
    assert_eq!(
        c.put_account("bt", json!({"plan": "free"})).await.status,
        201
    );
    let ok_item =
        json!({"account_id": "bt", "meter": "tokens", "quantity": 1, "idempotency_key": "b1"});
    for bad in [
        json!({"account_id": "bad id", "meter": "tokens", "quantity": 1, "idempotency_key": "b2"}),
        json!({"account_id": "v", "meter": "tokens", "quantity": 1, "idempotency_key": ""}),
        json!({"account_id": "v", "meter": "nope", "quantity": 1, "idempotency_key": "b3"}),
        json!({"account_id": "v", "meter": "tokens", "quantity": 0, "idempotency_key": "b4"}),
        json!({"account_id": "v", "meter": "tokens", "quantity": 1, "idempotency_key": "b5", "metadata": many_metadata(21)}),
    ] {
        let r = c
            .send(
                reqwest::Method::POST,
                "/v1/consume/batch",
                Some(APP_KEY),
                Some(json!({"items": [ok_item.clone(), bad.clone()]})),
            )
            .await;
        assert_eq!(r.status, 200, "{bad}: {:?}", r.body);
        let items = r.body["items"].as_array().unwrap();
        assert!(
            matches!(items[0]["status"].as_str(), Some("allowed" | "replayed")),
            "{:?}",
            r.body
        );
        assert_eq!(items[1]["status"], "invalid", "{bad}: {:?}", r.body);
        assert_eq!(items[1]["code"], "invalid_request", "{bad}: {:?}", r.body);
    }

    let after = state(c, &["v", "pp"]).await;
    assert_eq!(before, after, "a refused request changed something");
    assert_eq!(after["v"]["account"]["plan"], "payg");
    d.stop().await;
}
