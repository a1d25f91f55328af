//! The HTTP API contract: input validation (every 400 leaves the account unchanged), the
//! idempotency header, API keys and scopes, routing errors, account lifecycle, dry-run checks,
//! credits, the ledger (JSON, CSV, paging) and the OpenAPI document.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, APP_KEY, Client, Resp, TestDaemon};

const MAX_QUANTITY: u64 = 1 << 53;

/// A rejected-request case: name, JSON body, extra headers.
type JsonCase<'a> = (&'a str, Value, Vec<(&'a str, &'a str)>);

/// Sends a request with arbitrary headers and a raw body (no content type unless given).
async fn raw(
    c: &Client,
    method: Method,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Resp {
    let mut req = c.http.request(method, format!("{}{path}", c.base));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    Resp::read(req.send().await.expect("request")).await
}

/// A JSON request (`application/json`) with extra headers.
async fn json_req(
    c: &Client,
    method: Method,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: &Value,
) -> Resp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    raw(c, method, path, key, &all, Some(body.to_string())).await
}

async fn consume_body(c: &Client, id: &str, body: &Value) -> Resp {
    json_req(
        c,
        Method::POST,
        &format!("/v1/accounts/{id}/consume"),
        Some(APP_KEY),
        &[],
        body,
    )
    .await
}

async fn check_body(c: &Client, id: &str, body: &Value) -> Resp {
    json_req(
        c,
        Method::POST,
        &format!("/v1/accounts/{id}/check"),
        Some(APP_KEY),
        &[],
        body,
    )
    .await
}

/// What a rejected request must leave untouched.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Snap {
    ledger_len: usize,
    last_seq: u64,
    used: u64,
    credits: u64,
    plan: String,
}

async fn snap(c: &Client, id: &str) -> Snap {
    let a = c.get_account(id).await;
    assert_eq!(a.status, 200, "GET {id}: {:?}", a.body);
    Snap {
        ledger_len: c.ledger(id).await.len(),
        last_seq: a.body["ledger_seq"].as_u64().expect("ledger_seq"),
        used: a.body["meters"]["tokens"]["used"].as_u64().expect("used"),
        credits: a.body["credits"]["balance"].as_u64().expect("balance"),
        plan: a.body["plan"].as_str().expect("plan").to_owned(),
    }
}

fn assert_error(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {:?}", r.body);
    assert_eq!(r.code(), code, "{what}: {:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: error message missing: {:?}",
        r.body
    );
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: content type {ct:?}"
    );
}

/// The reason each rejected consume case must give (a fragment of the error message), so a
/// 400 for some other reason fails the test.
fn expected_reason(what: &str) -> &'static str {
    match what {
        "unknown meter" => "unknown meter `bananas`",
        "quantity 0" | "quantity 2^53+1" => {
            "quantity must be an integer from 1 to 9007199254740992"
        }
        "quantity -1" | "quantity 1.5" | "quantity as string" | "quantity null" => "`quantity`",
        "missing quantity" => "missing field `quantity`",
        "missing meter" => "missing field `meter`",
        "missing idempotency key" => "an idempotency key is required",
        "empty idempotency key" => "must not be empty",
        "key over 255 bytes" | "header key over 255 bytes" => "longer than 255 bytes",
        "key with a space" | "key with non-ASCII" | "header key with a space" => "visible ASCII",
        "body key differs from header key" => "differs from the Idempotency-Key header",
        "metadata with 21 entries" => "more than 20 entries",
        "metadata value over 500 bytes" => "longer than 500 bytes",
        "metadata key over 40 bytes" => "1 to 40 bytes",
        "metadata non-string value" => "`metadata.n`",
        "metadata not an object" => "`metadata`",
        "unknown body field" => "unknown field `quantitty`",
        "body is an array" | "not JSON at all" => "must be a JSON object",
        "malformed JSON" => "invalid JSON body",
        "empty body" => "empty request body",
        "text/plain content type" => "content type `text/plain` is not supported",
        "form content type" => "is not supported",
        "no content type" => "missing Content-Type",
        "body over 16384 bytes" => "larger than 16384 bytes",
        other => panic!("no expected reason for case {other:?}"),
    }
}

fn assert_message(r: &Resp, fragment: &str, what: &str) {
    let m = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        m.contains(fragment),
        "{what}: message {m:?} lacks {fragment:?}"
    );
}

async fn create(c: &Client, id: &str, plan: &str) {
    let r = c.put_account(id, json!({"plan": plan})).await;
    assert_eq!(r.status, 201, "create {id}: {:?}", r.body);
}

#[tokio::test]
async fn consume_rejects_every_invalid_request_without_side_effects() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    let id = "val-pro";
    create(c, id, "pro").await;
    let before = snap(c, id).await;
    assert_eq!(before.ledger_len, 1);
    assert_eq!(before.used, 0);

    let meta21: serde_json::Map<String, Value> = (0..21)
        .map(|i| (format!("k{i}"), Value::String("v".into())))
        .collect();
    let meta20: serde_json::Map<String, Value> = (0..20)
        .map(|i| (format!("k{i}"), Value::String("v".into())))
        .collect();
    let long_key = "k".repeat(256);
    let ok = |k: &str| json!({"meter": "tokens", "quantity": 1, "idempotency_key": k});

    // JSON bodies that must each be refused with 400 invalid_request.
    let json_cases: Vec<JsonCase> = vec![
        (
            "unknown meter",
            json!({"meter": "bananas", "quantity": 1, "idempotency_key": "c1"}),
            vec![],
        ),
        (
            "quantity 0",
            json!({"meter": "tokens", "quantity": 0, "idempotency_key": "c2"}),
            vec![],
        ),
        (
            "quantity -1",
            json!({"meter": "tokens", "quantity": -1, "idempotency_key": "c3"}),
            vec![],
        ),
        (
            "quantity 1.5",
            json!({"meter": "tokens", "quantity": 1.5, "idempotency_key": "c4"}),
            vec![],
        ),
        (
            "quantity as string",
            json!({"meter": "tokens", "quantity": "5", "idempotency_key": "c5"}),
            vec![],
        ),
        (
            "quantity 2^53+1",
            json!({"meter": "tokens", "quantity": MAX_QUANTITY + 1, "idempotency_key": "c6"}),
            vec![],
        ),
        (
            "quantity null",
            json!({"meter": "tokens", "quantity": null, "idempotency_key": "c6n"}),
            vec![],
        ),
        (
            "missing quantity",
            json!({"meter": "tokens", "idempotency_key": "c7"}),
            vec![],
        ),
        (
            "missing meter",
            json!({"quantity": 1, "idempotency_key": "c8"}),
            vec![],
        ),
        (
            "missing idempotency key",
            json!({"meter": "tokens", "quantity": 1}),
            vec![],
        ),
        (
            "empty idempotency key",
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": ""}),
            vec![],
        ),
        ("key over 255 bytes", ok(&long_key), vec![]),
        ("key with a space", ok("has space"), vec![]),
        ("key with non-ASCII", ok("clé"), vec![]),
        (
            "header key over 255 bytes",
            json!({"meter": "tokens", "quantity": 1}),
            vec![("idempotency-key", long_key.as_str())],
        ),
        (
            "header key with a space",
            json!({"meter": "tokens", "quantity": 1}),
            vec![("idempotency-key", "has space")],
        ),
        (
            "body key differs from header key",
            ok("body-key"),
            vec![("idempotency-key", "header-key")],
        ),
        (
            "metadata with 21 entries",
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c9",
                   "metadata": Value::Object(meta21)}),
            vec![],
        ),
        (
            "metadata value over 500 bytes",
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c10",
                   "metadata": {"note": "x".repeat(501)}}),
            vec![],
        ),
        (
            "metadata key over 40 bytes",
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c10k",
                   "metadata": {"k".repeat(41): "v"}}),
            vec![],
        ),
        (
            "metadata non-string value",
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c11",
                   "metadata": {"n": 5}}),
            vec![],
        ),
        (
            "metadata not an object",
            json!({"meter": "tokens", "quantity": 1, "idempotency_key": "c11b",
                   "metadata": ["a"]}),
            vec![],
        ),
        (
            "unknown body field",
            json!({"meter": "tokens", "quantitty": 1, "quantity": 1, "idempotency_key": "c12"}),
            vec![],
        ),
        ("body is an array", json!([1, 2, 3]), vec![]),
    ];
    for (what, body, headers) in &json_cases {
        let r = json_req(
            c,
            Method::POST,
            &format!("/v1/accounts/{id}/consume"),
            Some(APP_KEY),
            headers,
            body,
        )
        .await;
        assert_error(&r, 400, "invalid_request", what);
        assert_message(&r, expected_reason(what), what);
        assert!(!r.replayed(), "{what}");
        assert_eq!(snap(c, id).await, before, "{what}: the account changed");
    }

    // Raw bodies and content types.
    let valid = ok("raw-1").to_string();
    let big = format!(
        "{{\"meter\":\"tokens\",\"quantity\":1,\"idempotency_key\":\"big\"{}}}",
        " ".repeat(20 * 1024)
    );
    let raw_cases: Vec<(&str, Option<&str>, String)> = vec![
        (
            "malformed JSON",
            Some("application/json"),
            "{\"meter\":\"tokens\",".into(),
        ),
        ("not JSON at all", Some("application/json"), "hello".into()),
        ("empty body", Some("application/json"), String::new()),
        ("text/plain content type", Some("text/plain"), valid.clone()),
        (
            "form content type",
            Some("application/x-www-form-urlencoded"),
            valid.clone(),
        ),
        ("no content type", None, valid.clone()),
        ("body over 16384 bytes", Some("application/json"), big),
    ];
    for (what, ct, body) in raw_cases {
        let headers: Vec<(&str, &str)> = ct.map(|ct| ("content-type", ct)).into_iter().collect();
        let r = raw(
            c,
            Method::POST,
            &format!("/v1/accounts/{id}/consume"),
            Some(APP_KEY),
            &headers,
            Some(body),
        )
        .await;
        assert_error(&r, 400, "invalid_request", what);
        assert_message(&r, expected_reason(what), what);
        assert_eq!(snap(c, id).await, before, "{what}: the account changed");
    }

    // Invalid account ids in the path.
    let long_id = "a".repeat(129);
    for bad in ["a%20b", "a%2Fb", "a%00b", long_id.as_str(), "caf%C3%A9"] {
        let r = consume_body(c, bad, &ok("bad-id")).await;
        assert_error(&r, 400, "invalid_request", &format!("account id {bad}"));
        assert_message(&r, "account id", bad);
        let r = c.get_account(bad).await;
        assert_error(&r, 400, "invalid_request", &format!("GET account id {bad}"));
    }
    // 128 characters is still a valid id (unknown, hence 404).
    let r = c.get_account(&"a".repeat(128)).await;
    assert_error(&r, 404, "unknown_account", "128-char id");
    assert_eq!(snap(c, id).await, before);

    // Controls: the same helpers do succeed with valid input, so the 400s above are real.
    let r = consume_body(
        c,
        id,
        &json!({"meter": "tokens", "quantity": 1, "idempotency_key": "ok-1",
                "metadata": Value::Object(meta20)}),
    )
    .await;
    assert_eq!(r.status, 200, "20 metadata entries: {:?}", r.body);
    let r = consume_body(
        c,
        id,
        &json!({"meter": "tokens", "quantity": 1, "idempotency_key": "k".repeat(255),
                "metadata": {"note": "x".repeat(500)}}),
    )
    .await;
    assert_eq!(r.status, 200, "255-byte key, 500-byte value: {:?}", r.body);
    let r = json_req(
        c,
        Method::POST,
        &format!("/v1/accounts/{id}/consume"),
        Some(APP_KEY),
        &[("idempotency-key", "same-key")],
        &ok("same-key"),
    )
    .await;
    assert_eq!(r.status, 200, "body key equal to header key: {:?}", r.body);
    let padded = format!(
        "{{\"meter\":\"tokens\",\"quantity\":1,\"idempotency_key\":\"padded\"{}}}",
        " ".repeat(15 * 1024)
    );
    let r = raw(
        c,
        Method::POST,
        &format!("/v1/accounts/{id}/consume"),
        Some(APP_KEY),
        &[("content-type", "application/json; charset=utf-8")],
        Some(padded),
    )
    .await;
    assert_eq!(r.status, 200, "15 KiB body under the limit: {:?}", r.body);
    let after = snap(c, id).await;
    assert_eq!(after.ledger_len, before.ledger_len + 4);
    assert_eq!(after.used, 4);

    // 2^53 itself is accepted on the unlimited plan.
    let r = consume_body(
        c,
        id,
        &json!({"meter": "tokens", "quantity": MAX_QUANTITY, "idempotency_key": "max"}),
    )
    .await;
    assert_eq!(r.status, 200, "2^53: {:?}", r.body);
    assert_eq!(r.body["allowed"], true);
    assert_eq!(r.body["quantity"].as_u64(), Some(MAX_QUANTITY));
    let s = snap(c, id).await;
    assert_eq!(s.used, MAX_QUANTITY + 4);
    assert_eq!(s.ledger_len, after.ledger_len + 1);

    d.stop().await;
}

#[tokio::test]
async fn idempotency_key_header_replaces_body_key_and_replays() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    create(c, "hdr", "pro").await;
    let before = snap(c, "hdr").await;
    let body = json!({"meter": "tokens", "quantity": 7});
    let path = "/v1/accounts/hdr/consume";

    let first = json_req(
        c,
        Method::POST,
        path,
        Some(APP_KEY),
        &[("Idempotency-Key", "hdr-key-1")],
        &body,
    )
    .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert!(!first.replayed());
    let seq = first.body["ledger_seq"].as_u64().expect("ledger_seq");
    assert_eq!(first.body["meter"]["used"].as_u64(), Some(7));

    let again = json_req(
        c,
        Method::POST,
        path,
        Some(APP_KEY),
        &[("Idempotency-Key", "hdr-key-1")],
        &body,
    )
    .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert!(again.replayed(), "headers: {:?}", again.headers);
    assert_eq!(again.body["ledger_seq"].as_u64(), Some(seq));
    assert_eq!(again.body["meter"]["used"].as_u64(), Some(7));

    // The header key and the body key name the same thing.
    let via_body = consume_body(
        c,
        "hdr",
        &json!({"meter": "tokens", "quantity": 7, "idempotency_key": "hdr-key-1"}),
    )
    .await;
    assert_eq!(via_body.status, 200, "{:?}", via_body.body);
    assert!(via_body.replayed());
    assert_eq!(via_body.body["ledger_seq"].as_u64(), Some(seq));

    // Same key, different quantity: a conflict, nothing recorded.
    let conflict = json_req(
        c,
        Method::POST,
        path,
        Some(APP_KEY),
        &[("Idempotency-Key", "hdr-key-1")],
        &json!({"meter": "tokens", "quantity": 8}),
    )
    .await;
    assert_error(&conflict, 409, "idempotency_conflict", "header key reuse");

    let after = snap(c, "hdr").await;
    assert_eq!(after.ledger_len, before.ledger_len + 1);
    assert_eq!(after.used, 7);
    assert_eq!(after.last_seq, seq);
    let entries = c.ledger("hdr").await;
    assert_eq!(entries.last().unwrap()["idempotency_key"], "hdr-key-1");

    d.stop().await;
}

#[tokio::test]
async fn api_keys_and_scopes() {
    // Many wrong keys from one peer on purpose: the per-peer failure limit is not the subject.
    let d = TestDaemon::start_with(|c| c.failed_auth.burst = 1000).await;
    let c = &d.client;
    create(c, "auth", "prepaid").await;
    let r = c.credit("auth", 100, "seed").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let before = snap(c, "auth").await;
    let consume = json!({"meter": "tokens", "quantity": 1, "idempotency_key": "a1"});

    // 401: no key, a wrong key, a key under another scheme.
    let bad_auth: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no Authorization", vec![]),
        (
            "wrong bearer key",
            vec![("authorization", "Bearer not-the-key-0123456789".into())],
        ),
        (
            "admin key off by one char",
            vec![("authorization", format!("Bearer {}x", ADMIN_KEY))],
        ),
        (
            "empty bearer",
            vec![("authorization", "Bearer ".to_owned())],
        ),
        (
            "Basic scheme",
            vec![("authorization", "Basic dGVzdDp0ZXN0".into())],
        ),
        (
            "Basic scheme with the admin key",
            vec![("authorization", format!("Basic {ADMIN_KEY}"))],
        ),
        (
            "bare key without scheme",
            vec![("authorization", ADMIN_KEY.to_owned())],
        ),
    ];
    let routes: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/v1/accounts/auth", None),
        (Method::GET, "/v1/accounts/auth/ledger", None),
        (
            Method::POST,
            "/v1/accounts/auth/consume",
            Some(consume.clone()),
        ),
        (
            Method::POST,
            "/v1/accounts/auth/check",
            Some(consume.clone()),
        ),
        (
            Method::POST,
            "/v1/accounts/auth/credits",
            Some(json!({"amount": 5, "idempotency_key": "a2"})),
        ),
        (
            Method::PUT,
            "/v1/accounts/auth",
            Some(json!({"plan": "pro"})),
        ),
        (
            Method::PUT,
            "/v1/accounts/auth-new",
            Some(json!({"plan": "pro"})),
        ),
    ];
    for (what, hdrs) in &bad_auth {
        let hdrs: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for (method, path, body) in &routes {
            let r = match body {
                Some(b) => json_req(c, method.clone(), path, None, &hdrs, b).await,
                None => raw(c, method.clone(), path, None, &hdrs, None).await,
            };
            assert_error(&r, 401, "unauthorized", &format!("{what}: {method} {path}"));
        }
    }
    assert_eq!(snap(c, "auth").await, before, "a 401 changed the account");
    assert_eq!(c.get_account("auth-new").await.status, 404);

    // 403: the app key on admin routes.
    let r = c
        .send(
            Method::PUT,
            "/v1/accounts/auth",
            Some(APP_KEY),
            Some(json!({"plan": "pro"})),
        )
        .await;
    assert_error(&r, 403, "forbidden", "app key PUT existing");
    let r = c
        .send(
            Method::PUT,
            "/v1/accounts/auth-new",
            Some(APP_KEY),
            Some(json!({"plan": "pro"})),
        )
        .await;
    assert_error(&r, 403, "forbidden", "app key PUT new");
    assert_eq!(c.get_account("auth-new").await.status, 404);
    let r = c
        .send(
            Method::POST,
            "/v1/accounts/auth/credits",
            Some(APP_KEY),
            Some(json!({"amount": 1000, "reason": "free money", "idempotency_key": "steal"})),
        )
        .await;
    assert_error(&r, 403, "forbidden", "app key credits");
    assert_eq!(snap(c, "auth").await, before, "a 403 changed the account");

    // The app key may consume, check and read.
    let r = consume_body(c, "auth", &consume).await;
    assert_eq!(r.status, 200, "app consume: {:?}", r.body);
    let r = check_body(c, "auth", &consume).await;
    assert_eq!(r.status, 200, "app check: {:?}", r.body);
    assert_eq!(c.get_account("auth").await.status, 200);
    let r = c
        .send(Method::GET, "/v1/accounts/auth/ledger", Some(APP_KEY), None)
        .await;
    assert_eq!(r.status, 200, "app ledger: {:?}", r.body);
    // The admin key may do everything.
    let r = c
        .send(
            Method::POST,
            "/v1/accounts/auth/consume",
            Some(ADMIN_KEY),
            Some(json!({"meter": "tokens", "quantity": 1, "idempotency_key": "a3"})),
        )
        .await;
    assert_eq!(r.status, 200, "admin consume: {:?}", r.body);
    let r = c
        .send(Method::GET, "/v1/accounts/auth", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(r.status, 200);
    let s = snap(c, "auth").await;
    assert_eq!(s.used, 2);
    assert_eq!(s.credits, 98);

    // Health and the OpenAPI document need no key.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let (status, body) = c.get_noauth(path).await;
        assert_eq!(status, 200, "{path}: {body:?}");
    }
    assert_eq!(c.get_noauth("/healthz").await.1["status"], "ok");
    let ready = c.get_noauth("/readyz").await.1;
    assert_eq!(ready["status"], "ready");
    // Every supervised component, and storage, from memory.
    for name in ["storage", "directory", "outbox", "webhooks", "janitor"] {
        assert_eq!(ready["components"][name]["status"], "ok", "{name}: {ready}");
        assert_eq!(ready["components"][name]["restarts"], 0, "{name}: {ready}");
    }
    assert_eq!(ready["outbox_dead"], 0, "{ready}");

    d.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    create(c, "x", "free").await;
    let before = snap(c, "x").await;

    for path in [
        "/nope",
        "/v1",
        "/v1/nope",
        "/v1/accounts",
        "/v1/accounts/x/nope",
        "/v2/accounts/x",
    ] {
        for key in [Some(ADMIN_KEY), None] {
            let r = c.send(Method::GET, path, key, None).await;
            assert_error(&r, 404, "not_found", &format!("GET {path} key={key:?}"));
        }
    }

    let wrong: Vec<(Method, &str)> = vec![
        (Method::DELETE, "/v1/accounts/x"),
        (Method::POST, "/v1/accounts/x"),
        (Method::PATCH, "/v1/accounts/x"),
        (Method::GET, "/v1/accounts/x/consume"),
        (Method::PUT, "/v1/accounts/x/credits"),
        (Method::DELETE, "/v1/accounts/x/ledger"),
        (Method::POST, "/healthz"),
    ];
    for (method, path) in &wrong {
        let r = c.send(method.clone(), path, Some(ADMIN_KEY), None).await;
        assert_error(
            &r,
            405,
            "method_not_allowed",
            &format!("{method} {path} (admin key)"),
        );
    }
    let r = c.send(Method::DELETE, "/v1/accounts/x", None, None).await;
    assert_error(&r, 405, "method_not_allowed", "DELETE without key");

    assert_eq!(snap(c, "x").await, before);
    d.stop().await;
}

#[tokio::test]
async fn account_lifecycle_and_unknown_accounts() {
    let d = TestDaemon::start().await;
    let c = &d.client;

    // Never-created account.
    let r = c.consume("ghost", 1, "g1").await;
    assert_error(&r, 404, "unknown_account", "consume ghost");
    let r = check_body(
        c,
        "ghost",
        &json!({"meter": "tokens", "quantity": 1, "idempotency_key": "g2"}),
    )
    .await;
    assert_error(&r, 404, "unknown_account", "check ghost");
    let r = c.get_account("ghost").await;
    assert_error(&r, 404, "unknown_account", "GET ghost");
    let r = c.credit("ghost", 10, "g3").await;
    assert_error(&r, 404, "unknown_account", "credit ghost");
    let r = c
        .send(
            Method::GET,
            "/v1/accounts/ghost/ledger",
            Some(APP_KEY),
            None,
        )
        .await;
    assert_error(&r, 404, "unknown_account", "ledger ghost");
    let r = c
        .send(
            Method::GET,
            "/v1/accounts/ghost/ledger?format=csv",
            Some(APP_KEY),
            None,
        )
        .await;
    assert_error(&r, 404, "unknown_account", "csv ledger ghost");
    assert_eq!(
        c.get_account("ghost").await.status,
        404,
        "ghost was created"
    );

    // Bad creates leave nothing behind.
    let bad_creates: Vec<(&str, Value)> = vec![
        ("unknown plan", json!({"plan": "gold"})),
        ("no plan", json!({"email": "a@example.com"})),
        ("team with 1 seat", json!({"plan": "team", "seats": 1})),
        ("team with 0 seats", json!({"plan": "team", "seats": 0})),
        ("free with 0 seats", json!({"plan": "free", "seats": 0})),
        ("negative seats", json!({"plan": "team", "seats": -2})),
        ("unknown field", json!({"plan": "free", "plann": "free"})),
        (
            "email over 256 bytes",
            json!({"plan": "free", "email": "e".repeat(257)}),
        ),
        (
            "metadata non-string",
            json!({"plan": "free", "metadata": {"a": 1}}),
        ),
    ];
    for (what, body) in &bad_creates {
        let r = c.put_account("newbie", body.clone()).await;
        assert_error(&r, 400, "invalid_request", what);
        let g = c.get_account("newbie").await;
        assert_error(&g, 404, "unknown_account", &format!("after {what}"));
    }
    let r = c.put_account("a%20b", json!({"plan": "free"})).await;
    assert_error(&r, 400, "invalid_request", "PUT bad id");

    // Team: seats default to min_seats; 2 is accepted.
    let r = c
        .put_account("team-1", json!({"plan": "team", "seats": 2}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["seats"], 2);
    assert_eq!(r.body["plan_kind"], "seat");
    let r = c.put_account("team-2", json!({"plan": "team"})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["seats"], 2);
    // Lowering an existing team account below the minimum is refused and changes nothing.
    let before = snap(c, "team-1").await;
    let r = c.put_account("team-1", json!({"seats": 1})).await;
    assert_error(&r, 400, "invalid_request", "team-1 down to 1 seat");
    assert_eq!(snap(c, "team-1").await, before);
    assert_eq!(c.get_account("team-1").await.body["seats"], 2);

    // Create, then update.
    let r = c
        .put_account("life", json!({"plan": "free", "email": "a@example.com"}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["id"], "life");
    assert_eq!(r.body["plan"], "free");
    assert_eq!(r.body["email"], "a@example.com");
    assert_eq!(r.body["meters"]["tokens"]["included"], 100);
    let s1 = snap(c, "life").await;
    assert_eq!(s1.ledger_len, 1);

    let r = c.put_account("life", json!({"plan": "pro"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["plan"], "pro");
    assert_eq!(
        r.body["email"], "a@example.com",
        "omitted fields keep their value"
    );
    let s2 = snap(c, "life").await;
    assert_eq!(s2.ledger_len, 2);
    assert_eq!(s2.plan, "pro");

    // Same profile again: 200, nothing appended.
    let r = c.put_account("life", json!({"plan": "pro"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(snap(c, "life").await, s2);

    // An unknown plan on update is refused and changes nothing.
    let r = c.put_account("life", json!({"plan": "gold"})).await;
    assert_error(&r, 400, "invalid_request", "update to unknown plan");
    assert_eq!(snap(c, "life").await, s2);

    d.stop().await;
}

#[tokio::test]
async fn check_is_a_dry_run() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    create(c, "dry", "free").await;
    let r = c.consume("dry", 90, "fill").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let before = snap(c, "dry").await;
    assert_eq!(before.used, 90);

    let r = check_body(
        c,
        "dry",
        &json!({"meter": "tokens", "quantity": 20, "idempotency_key": "chk-20"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["allowed"], false);
    assert_eq!(r.body["code"], "cap_reached");
    assert!(r.body.get("ledger_seq").is_none(), "{:?}", r.body);
    assert!(!r.replayed());

    // No key needed for a check.
    let r = check_body(c, "dry", &json!({"meter": "tokens", "quantity": 10})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["allowed"], true);
    assert!(r.body.get("code").is_none(), "{:?}", r.body);
    assert!(r.body.get("ledger_seq").is_none(), "{:?}", r.body);
    assert_eq!(r.body["meter"]["used"], 100);

    // A check validates like a consume.
    let r = check_body(c, "dry", &json!({"meter": "tokens", "quantity": 0})).await;
    assert_error(&r, 400, "invalid_request", "check quantity 0");
    let r = check_body(c, "dry", &json!({"meter": "nope", "quantity": 1})).await;
    assert_error(&r, 400, "invalid_request", "check unknown meter");

    assert_eq!(snap(c, "dry").await, before, "a check changed the account");

    // The key a check named is not taken: a consume may use it with a different request.
    let r = c.consume("dry", 5, "chk-20").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!r.replayed());
    // And a consume reaches the same decisions the checks predicted.
    let r = c.consume("dry", 20, "over").await;
    assert_error(&r, 429, "cap_reached", "consume over cap");
    let r = c.consume("dry", 5, "last").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["meter"]["used"], 100);

    d.stop().await;
}

#[tokio::test]
async fn credits_grant_replay_conflict_and_adjust() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    create(c, "cred", "prepaid").await;

    let r = c.credit("cred", 500, "grant-1").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!r.replayed());
    assert_eq!(r.body["amount"], 500);
    assert_eq!(r.body["credits"]["balance"], 500);
    let seq = r.body["ledger_seq"].as_u64().expect("ledger_seq");
    let s = snap(c, "cred").await;
    assert_eq!(s.credits, 500);
    assert_eq!(s.last_seq, seq);

    let r = c.credit("cred", 500, "grant-1").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.replayed(), "headers: {:?}", r.headers);
    assert_eq!(r.body["ledger_seq"].as_u64(), Some(seq));
    assert_eq!(r.body["credits"]["balance"], 500);
    assert_eq!(snap(c, "cred").await, s, "a replay changed the account");

    let r = c.credit("cred", 600, "grant-1").await;
    assert_error(&r, 409, "idempotency_conflict", "same key, other amount");
    assert_eq!(snap(c, "cred").await, s);

    let r = c.credit("cred", -600, "adjust-1").await;
    assert_error(&r, 409, "credit_balance_too_low", "adjust below zero");
    assert_eq!(snap(c, "cred").await, s);

    // Invalid credit requests.
    let bad: Vec<(&str, Value)> = vec![
        ("amount 0", json!({"amount": 0, "idempotency_key": "z"})),
        ("amount missing", json!({"idempotency_key": "z"})),
        ("amount 1.5", json!({"amount": 1.5, "idempotency_key": "z"})),
        (
            "amount string",
            json!({"amount": "5", "idempotency_key": "z"}),
        ),
        ("no key", json!({"amount": 5})),
        (
            "reason over 500 bytes",
            json!({"amount": 5, "reason": "r".repeat(501), "idempotency_key": "z"}),
        ),
        (
            "unknown field",
            json!({"amount": 5, "idempotency_key": "z", "amout": 5}),
        ),
    ];
    for (what, body) in &bad {
        let r = c
            .send(
                Method::POST,
                "/v1/accounts/cred/credits",
                Some(ADMIN_KEY),
                Some(body.clone()),
            )
            .await;
        assert_error(&r, 400, "invalid_request", what);
        assert_eq!(snap(c, "cred").await, s, "{what}: the account changed");
    }

    // A valid adjustment takes 100 off: 500 -> 400.
    let r = c.credit("cred", -100, "adjust-2").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["credits"]["balance"], 400);
    assert_eq!(r.body["amount"], -100);
    let s2 = snap(c, "cred").await;
    assert_eq!(s2.credits, 400);
    assert_eq!(s2.ledger_len, s.ledger_len + 1);

    // The header key works for credits too.
    let r = json_req(
        c,
        Method::POST,
        "/v1/accounts/cred/credits",
        Some(ADMIN_KEY),
        &[("idempotency-key", "hdr-grant")],
        &json!({"amount": 50, "reason": "hdr"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["credits"]["balance"], 450);

    // The ledger records every credit change once.
    let credits: Vec<Value> = c
        .ledger("cred")
        .await
        .into_iter()
        .filter(|e| e["kind"] == "credit")
        .collect();
    let deltas: Vec<i64> = credits
        .iter()
        .map(|e| e["credits_delta"].as_i64().unwrap())
        .collect();
    assert_eq!(deltas, vec![500, -100, 50]);
    assert_eq!(credits[0]["reason"], "test");

    d.stop().await;
}

#[tokio::test]
async fn ledger_formats_limits_and_paging() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    create(c, "led", "free").await;
    for (i, q) in [1u64, 2, 3, 4].iter().enumerate() {
        let r = c.consume("led", *q, &format!("led-{i}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let all = c.ledger("led").await;
    assert_eq!(all.len(), 5);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(all[0]["kind"], "account_upserted");
    assert_eq!(all[0]["plan"], "free");
    assert_eq!(all[4]["kind"], "consume");
    assert_eq!(all[4]["quantity"], 4);
    assert_eq!(all[4]["used_after"], 10);
    assert_eq!(all[4]["decision"], "allowed");
    let before = snap(c, "led").await;

    // CSV: a header row and one row per entry.
    let r = c
        .send(
            Method::GET,
            "/v1/accounts/led/ledger?format=csv",
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ct = r.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/csv"), "{ct}");
    let text = r.body.as_str().expect("CSV text");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("seq,at,kind,meter,quantity,"),
        "{text}"
    );
    assert_eq!(lines.len(), 1 + all.len(), "{text}");
    let width = lines[0].split(',').count();
    for (line, e) in lines[1..].iter().zip(&all) {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols.len(), width, "{line}");
        assert_eq!(cols[0], e["seq"].as_u64().unwrap().to_string());
        assert_eq!(cols[2], e["kind"].as_str().unwrap());
    }
    // CSV honours paging too.
    let r = c
        .send(
            Method::GET,
            &format!(
                "/v1/accounts/led/ledger?format=csv&after_seq={}&limit=2",
                seqs[1]
            ),
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = r.body.as_str().expect("CSV text");
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[0].starts_with(&format!("{},", seqs[2])), "{text}");

    // Explicit json is the default format.
    let r = c
        .send(
            Method::GET,
            "/v1/accounts/led/ledger?format=json",
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["entries"].as_array().unwrap().len(), 5);
    assert!(r.body.get("next_after_seq").is_none(), "{:?}", r.body);

    // Bad parameters.
    for q in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=abc",
        "format=xml",
        "format=CSV",
        "after_seq=-1",
        "after_seq=x",
    ] {
        let r = c
            .send(
                Method::GET,
                &format!("/v1/accounts/led/ledger?{q}"),
                Some(APP_KEY),
                None,
            )
            .await;
        assert_error(&r, 400, "invalid_request", q);
    }
    for q in ["limit=1", "limit=1000"] {
        let r = c
            .send(
                Method::GET,
                &format!("/v1/accounts/led/ledger?{q}"),
                Some(APP_KEY),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{q}: {:?}", r.body);
    }

    // Paging: oldest first, next_after_seq until the end.
    let mut got: Vec<u64> = Vec::new();
    let mut after = 0u64;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 10, "paging did not end");
        let r = c
            .send(
                Method::GET,
                &format!("/v1/accounts/led/ledger?after_seq={after}&limit=2"),
                Some(APP_KEY),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let page: Vec<u64> = r.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert!(page.len() <= 2);
        assert!(page.iter().all(|s| *s > after), "{page:?} after {after}");
        got.extend(&page);
        match r.body["next_after_seq"].as_u64() {
            Some(n) => {
                assert_eq!(Some(&n), page.last(), "next_after_seq is the last seq");
                after = n;
            }
            None => break,
        }
    }
    assert_eq!(got, seqs);
    let r = c
        .send(
            Method::GET,
            &format!("/v1/accounts/led/ledger?after_seq={}&limit=2", seqs[0]),
            Some(APP_KEY),
            None,
        )
        .await;
    let page: Vec<u64> = r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(page, seqs[1..3].to_vec());
    assert_eq!(r.body["next_after_seq"].as_u64(), Some(seqs[2]));
    let r = c
        .send(
            Method::GET,
            &format!("/v1/accounts/led/ledger?after_seq={}", seqs[4]),
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["entries"].as_array().unwrap().len(), 0);
    assert!(r.body.get("next_after_seq").is_none());

    assert_eq!(snap(c, "led").await, before, "reading changed the ledger");
    d.stop().await;
}

#[tokio::test]
async fn openapi_document_lists_routes_and_responses() {
    let d = TestDaemon::start().await;
    let (status, doc) = d.client.get_noauth("/openapi.json").await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/v1/accounts/{id}",
        "/v1/accounts/{id}/consume",
        "/v1/accounts/{id}/check",
        "/v1/accounts/{id}/credits",
        "/v1/accounts/{id}/ledger",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    let consume = &doc["paths"]["/v1/accounts/{id}/consume"]["post"];
    let responses = consume["responses"].as_object().expect("consume responses");
    for status in [
        "200", "400", "401", "402", "403", "404", "409", "429", "503",
    ] {
        assert!(
            responses.contains_key(status),
            "consume does not document {status}: {:?}",
            responses.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        consume["requestBody"]["content"]
            .get("application/json")
            .is_some(),
        "{:?}",
        consume["requestBody"]
    );
    assert!(
        doc["paths"]["/v1/accounts/{id}/credits"]
            .get("post")
            .is_some()
    );
    assert!(doc["paths"]["/v1/accounts/{id}"].get("put").is_some());
    assert!(doc["paths"]["/v1/accounts/{id}"].get("get").is_some());
    assert!(
        doc["paths"]["/v1/accounts/{id}/ledger"]
            .get("get")
            .is_some()
    );
    d.stop().await;
}

/// `ledger verify` runs against the live daemon: admin only, read-only, and clean after
/// billable traffic.
#[tokio::test]
async fn verify_runs_against_the_live_daemon() {
    let d = TestDaemon::start().await;
    let c = &d.client;
    c.put_account("v1", json!({"plan": "payg"})).await;
    c.put_account("v2", json!({"plan": "free"})).await;
    for i in 0..5 {
        assert_eq!(c.consume("v1", 10, &format!("k{i}")).await.status, 200);
        c.consume("v2", 30, &format!("k{i}")).await;
    }
    let r = c
        .send(
            reqwest::Method::GET,
            "/v1/admin/verify",
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = c
        .send(
            reqwest::Method::GET,
            "/v1/admin/verify",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["ok"], true, "{:?}", r.body);
    assert_eq!(r.body["accounts"], 2);
    assert!(r.body["entries"].as_u64().unwrap() >= 12, "{:?}", r.body);
    assert_eq!(r.body["problems_total"], 0);
    d.stop().await;
}
