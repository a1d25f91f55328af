//! Tests of the fake Stripe itself: spec validation, dedup, idempotency, failure injection,
//! meter event summaries and adjustments, drift injection.

use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::support::fake_stripe::{AcceptedEvent, Failure, FakeStripe, PriceKind, SECRET_KEY};

/// What the async-stripe 1.0.0-rc.10 client sent for a meter event, verbatim.
const SDK_METER_EVENT: &str = "event_name=api_tokens&identifier=acct_1:ledger:42&payload[stripe_customer_id]=cus_123&payload[value]=25&timestamp=1760000000";

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn send(
    fake: &FakeStripe,
    method: reqwest::Method,
    path_and_query: &str,
    form: Option<&str>,
    idem: Option<&str>,
) -> reqwest::Result<Resp> {
    send_with(
        &client(Duration::from_secs(10)),
        fake,
        method,
        path_and_query,
        form,
        idem,
        Some(SECRET_KEY),
    )
    .await
}

async fn send_with(
    http: &reqwest::Client,
    fake: &FakeStripe,
    method: reqwest::Method,
    path_and_query: &str,
    form: Option<&str>,
    idem: Option<&str>,
    key: Option<&str>,
) -> reqwest::Result<Resp> {
    let url = format!(
        "{}{}",
        fake.base_url(),
        path_and_query.trim_start_matches('/')
    );
    let mut req = http.request(method, url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(f) = form {
        req = req
            .header("content-type", "application/x-www-form-urlencoded")
            .body(f.to_string());
    }
    if let Some(k) = idem {
        req = req.header("idempotency-key", k);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Resp {
        status,
        headers,
        body,
    })
}

async fn post(fake: &FakeStripe, path: &str, form: &str) -> Resp {
    send(fake, reqwest::Method::POST, path, Some(form), None)
        .await
        .expect("request")
}

async fn get(fake: &FakeStripe, path: &str) -> Resp {
    send(fake, reqwest::Method::GET, path, None, None)
        .await
        .expect("request")
}

fn event_form(identifier: &str, customer: &str, value: &str, ts: i64) -> String {
    format!(
        "event_name=tokens&identifier={identifier}&payload[stripe_customer_id]={customer}&payload[value]={value}&timestamp={ts}"
    )
}

fn hdr<'a>(r: &'a Resp, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn fake_stripe_valid_meter_event_is_accepted_and_recorded() {
    let fake = FakeStripe::start().await;
    assert!(fake.base_url().starts_with("http://127.0.0.1:"));
    assert!(fake.base_url().ends_with('/'));
    let r = post(
        &fake,
        "/v1/billing/meter_events",
        &event_form("ev-1", "cus_a", "7", 1_760_000_000),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "billing.meter_event");
    assert_eq!(r.body["event_name"], "tokens");
    assert_eq!(r.body["identifier"], "ev-1");
    assert_eq!(r.body["payload"]["value"], "7");
    assert_eq!(r.body["timestamp"], 1_760_000_000);
    assert_eq!(r.body["livemode"], false);
    assert!(r.body["created"].is_i64());

    let evs = fake.meter_events();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].customer, "cus_a");
    assert_eq!(evs[0].value, "7");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/v1/billing/meter_events");
    assert_eq!(reqs[0].status, Some(200));
    assert!(
        reqs[0]
            .params
            .contains(&("payload[stripe_customer_id]".into(), "cus_a".into()))
    );
    assert_eq!(fake.count("/v1/billing/meter_events"), 1);
    assert!(fake.spec_violations().is_empty());

    // Without an identifier Stripe generates one.
    let r = post(
        &fake,
        "/v1/billing/meter_events",
        "event_name=tokens&payload[stripe_customer_id]=cus_a&payload[value]=1",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body["identifier"].as_str().unwrap().is_empty());
    assert_eq!(fake.meter_events().len(), 2);
    fake.stop().await;
}

#[tokio::test]
async fn fake_stripe_duplicate_identifier_is_rejected_and_counted_once() {
    let fake = FakeStripe::start().await;
    let form = event_form("dup-1", "cus_a", "5", 1_760_000_000);
    assert_eq!(
        post(&fake, "/v1/billing/meter_events", &form).await.status,
        200
    );
    let r = post(&fake, "/v1/billing/meter_events", &form).await;
    assert_eq!(r.status, 400);
    assert_eq!(hdr(&r, "stripe-should-retry"), Some("false"));
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert_eq!(r.body["error"]["code"], "resource_already_exists");
    assert_eq!(
        r.body["error"]["message"],
        "An event already exists with identifier dup-1."
    );
    assert_eq!(fake.meter_events().len(), 1);
    assert_eq!(fake.count("/v1/billing/meter_events"), 2);
    assert!(
        fake.spec_violations().is_empty(),
        "a duplicate is not a spec violation"
    );
}

#[tokio::test]
async fn fake_stripe_missing_required_param_is_a_spec_violation() {
    let fake = FakeStripe::start().await;
    let r = post(
        &fake,
        "/v1/billing/meter_events",
        "payload[stripe_customer_id]=cus_a&payload[value]=1",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert_eq!(r.body["error"]["param"], "event_name");
    let v = fake.spec_violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("event_name"), "{v:?}");
    assert!(fake.meter_events().is_empty());
    assert_eq!(fake.count("/v1/billing/meter_events"), 1);
}

#[tokio::test]
async fn fake_stripe_rejects_unknown_and_malformed_params() {
    let fake = FakeStripe::start().await;
    let base = "event_name=tokens&payload[stripe_customer_id]=cus_a&payload[value]=1";
    let long = "x".repeat(101);
    let cases = [
        (
            format!("{base}&customer=cus_a"),
            "customer",
            "unknown parameter",
        ),
        (
            format!("{base}&timestamp=soon"),
            "timestamp",
            "Invalid integer",
        ),
        (
            format!("{base}&identifier={long}"),
            "identifier",
            "at most 100",
        ),
        (
            format!("{base}&event_name=again"),
            "event_name",
            "Duplicate",
        ),
        (
            "event_name=tokens&payload=abc".to_string(),
            "payload",
            "Invalid object",
        ),
        (format!("{base}&identifier="), "identifier", "empty string"),
    ];
    for (i, (form, param, msg)) in cases.iter().enumerate() {
        let r = post(&fake, "/v1/billing/meter_events", form).await;
        assert_eq!(r.status, 400, "{form}: {}", r.body);
        assert_eq!(r.body["error"]["param"], *param, "{form}: {}", r.body);
        let m = r.body["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{form}: {m}");
        assert_eq!(fake.spec_violations().len(), i + 1);
    }
    // Enums and nested closed objects.
    let r = post(
        &fake,
        "/v1/checkout/sessions",
        "mode=bogus&success_url=https://x.example/ok",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "mode");
    let r = post(
        &fake,
        "/v1/checkout/sessions",
        "line_items[0][price]=price_1&line_items[0][colour]=red&mode=payment",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "line_items[0][colour]");
    // GET query parameters: unknown and missing required ones.
    let r = get(&fake, "/v1/billing/meters?color=red").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "color");
    let r = get(
        &fake,
        "/v1/billing/meters/mtr_test_tokens/event_summaries?customer=cus_a&start_time=0",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "end_time");
    // A JSON body is not what Stripe takes.
    let r = client(Duration::from_secs(10))
        .post(format!("{}v1/customers", fake.base_url()))
        .bearer_auth(SECRET_KEY)
        .json(&serde_json::json!({"email": "a@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(fake.meter_events().is_empty());
    assert!(fake.customers().is_empty());
    assert_eq!(fake.spec_violations().len(), cases.len() + 5);
}

#[tokio::test]
async fn fake_stripe_accepts_the_exact_async_stripe_body() {
    let fake = FakeStripe::start().await;
    let r = send(
        &fake,
        reqwest::Method::POST,
        "/v1/billing/meter_events",
        Some(SDK_METER_EVENT),
        Some("meterd-acct_1-ledger-42"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    let evs = fake.meter_events();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].identifier, "acct_1:ledger:42");
    assert_eq!(evs[0].event_name, "api_tokens");
    assert_eq!(evs[0].customer, "cus_123");
    assert_eq!(evs[0].value, "25");
    assert_eq!(evs[0].timestamp, 1_760_000_000);
    assert_eq!(
        fake.requests()[0].idempotency_key.as_deref(),
        Some("meterd-acct_1-ledger-42")
    );
    // The same with escaped brackets and colons, and an empty payload map (`payload=`).
    let escaped = "event_name=api_tokens&identifier=acct_1%3Aledger%3A43&payload%5Bstripe_customer_id%5D=cus_123&payload%5Bvalue%5D=25";
    assert_eq!(
        post(&fake, "/v1/billing/meter_events", escaped)
            .await
            .status,
        200
    );
    assert_eq!(fake.meter_events()[1].identifier, "acct_1:ledger:43");
    let empty = "event_name=api_tokens&identifier=e3&payload=";
    assert_eq!(
        post(&fake, "/v1/billing/meter_events", empty).await.status,
        200
    );
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_idempotency_key_replays_without_reprocessing() {
    let fake = FakeStripe::start().await;
    let form = event_form("idem-1", "cus_a", "3", 1_760_000_000);
    let path = "/v1/billing/meter_events";
    let a = send(&fake, reqwest::Method::POST, path, Some(&form), Some("k1"))
        .await
        .unwrap();
    let b = send(&fake, reqwest::Method::POST, path, Some(&form), Some("k1"))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(b.status, 200);
    assert_eq!(a.body, b.body);
    assert_eq!(hdr(&b, "idempotent-replayed"), Some("true"));
    assert_eq!(fake.meter_events().len(), 1);
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.replays().len(), 1);
    // Same key, other parameters.
    let other = event_form("idem-2", "cus_a", "3", 1_760_000_000);
    let c = send(&fake, reqwest::Method::POST, path, Some(&other), Some("k1"))
        .await
        .unwrap();
    assert_eq!(c.status, 400);
    assert_eq!(c.body["error"]["type"], "idempotency_error");
    assert_eq!(fake.meter_events().len(), 1);
}

#[tokio::test]
async fn fake_stripe_customers_create_and_get() {
    let fake = FakeStripe::start().await;
    let r = post(
        &fake,
        "/v1/customers",
        "email=a@example.com&metadata[meterd_account]=acct_1",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "customer");
    assert_eq!(r.body["id"], "cus_test_1");
    assert_eq!(r.body["email"], "a@example.com");
    assert_eq!(r.body["metadata"]["meterd_account"], "acct_1");
    assert_eq!(r.body["livemode"], false);
    let r2 = post(&fake, "/v1/customers", "name=Bob").await;
    assert_eq!(r2.body["id"], "cus_test_2");

    let g = get(&fake, "/v1/customers/cus_test_1").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, r.body);
    let g = get(&fake, "/v1/customers/cus_test_1?").await;
    assert_eq!(g.status, 200, "a trailing `?` is fine");
    let m = get(&fake, "/v1/customers/cus_nope").await;
    assert_eq!(m.status, 404);
    assert_eq!(m.body["error"]["code"], "resource_missing");
    assert_eq!(m.body["error"]["type"], "invalid_request_error");
    assert_eq!(fake.customers().len(), 2);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_checkout_portal_prices_and_meters() {
    let fake = FakeStripe::start().await;
    // A line item's price must exist, as in Stripe.
    let body = "customer=cus_123&line_items[0][price]=price_123&line_items[0][quantity]=1&mode=subscription&success_url=https://app.example.com/ok&metadata[meterd_account]=acct_1";
    let r = post(&fake, "/v1/checkout/sessions", body).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "resource_missing");
    assert_eq!(r.body["error"]["param"], "line_items[0][price]");
    fake.add_price(
        "price_123",
        crate::support::fake_stripe::PriceKind::Licensed,
    );
    let r = post(
        &fake,
        "/v1/checkout/sessions",
        "customer=cus_123&line_items[0][price]=price_123&line_items[0][quantity]=1&mode=subscription&success_url=https://app.example.com/ok&metadata[meterd_account]=acct_1",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "checkout.session");
    assert_eq!(r.body["mode"], "subscription");
    assert_eq!(r.body["customer"], "cus_123");
    assert_eq!(r.body["success_url"], "https://app.example.com/ok");
    assert!(r.body["url"].as_str().unwrap().starts_with("https://"));

    let r = post(
        &fake,
        "/v1/billing_portal/sessions",
        "customer=cus_123&return_url=https://app.example.com/account",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "billing_portal.session");
    assert_eq!(r.body["return_url"], "https://app.example.com/account");

    fake.add_price("price_seat", PriceKind::Licensed);
    fake.add_price("price_req", PriceKind::Metered("mtr_test_tokens".into()));
    let p = get(&fake, "/v1/prices/price_req").await;
    assert_eq!(p.status, 200);
    assert_eq!(p.body["object"], "price");
    assert_eq!(p.body["recurring"]["usage_type"], "metered");
    assert_eq!(p.body["recurring"]["meter"], "mtr_test_tokens");
    assert_eq!(get(&fake, "/v1/prices/price_nope").await.status, 404);

    fake.add_meter("mtr_other", "other");
    let l = get(&fake, "/v1/billing/meters?status=active&limit=10").await;
    assert_eq!(l.status, 200);
    assert_eq!(l.body["object"], "list");
    assert_eq!(l.body["data"].as_array().unwrap().len(), 2);
    let m = get(&fake, "/v1/billing/meters/mtr_test_tokens").await;
    assert_eq!(m.body["event_name"], "tokens");
    assert_eq!(m.body["object"], "billing.meter");
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_auth_and_unknown_paths() {
    let fake = FakeStripe::start().await;
    let http = client(Duration::from_secs(10));
    let path = "/v1/billing/meters";
    for key in [None, Some("sk_test_wrong")] {
        let r = send_with(&http, &fake, reqwest::Method::GET, path, None, None, key)
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
        assert!(r.body["error"]["message"].is_string());
    }
    let r = get(&fake, "/v1/nothing_here").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unrecognized request URL")
    );
    let r = send(
        &fake,
        reqwest::Method::DELETE,
        "/v1/billing/meter_events",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        fake.spec_violations().len(),
        2,
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_summaries_sum_values_in_the_window() {
    let fake = FakeStripe::start().await;
    fake.add_meter("mtr_other", "other");
    let path = "/v1/billing/meter_events";
    for (id, cus, value, ts) in [
        ("s1", "cus_a", "2.5", 960),
        ("s2", "cus_a", "3", 1_979),
        ("s3", "cus_a", "4", 1_980), // end is exclusive
        ("s4", "cus_b", "10", 1_500),
        ("s5", "cus_a", "100", 959), // before start
    ] {
        assert_eq!(
            post(&fake, path, &event_form(id, cus, value, ts))
                .await
                .status,
            200
        );
    }
    let other = "event_name=other&identifier=s6&payload[stripe_customer_id]=cus_a&payload[value]=50&timestamp=1500";
    assert_eq!(post(&fake, path, other).await.status, 200);

    let r = get(
        &fake,
        "/v1/billing/meters/mtr_test_tokens/event_summaries?customer=cus_a&end_time=1980&start_time=960",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "list");
    assert_eq!(r.body["has_more"], false);
    let d = &r.body["data"][0];
    assert_eq!(d["object"], "billing.meter_event_summary");
    assert_eq!(d["aggregated_value"].as_f64(), Some(5.5));
    assert_eq!(d["meter"], "mtr_test_tokens");
    assert_eq!(d["start_time"], 960);
    assert_eq!(d["end_time"], 1980);
    assert!(d["id"].as_str().unwrap().starts_with("mtrusg_"));

    let r = get(
        &fake,
        "/v1/billing/meters/mtr_other/event_summaries?customer=cus_a&start_time=0&end_time=3600&value_grouping_window=hour",
    )
    .await;
    assert_eq!(r.body["data"][0]["aggregated_value"].as_f64(), Some(50.0));
    let r = get(
        &fake,
        "/v1/billing/meters/mtr_nope/event_summaries?customer=cus_a&start_time=0&end_time=60",
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_injected_failures_are_seen_by_a_client_with_a_timeout() {
    let fake = FakeStripe::start().await;
    let http = client(Duration::from_secs(1));
    let path = "/v1/billing/meter_events";
    let send_ev = |id: &'static str, idem: Option<&'static str>| {
        let http = http.clone();
        let fake = &fake;
        async move {
            let form = event_form(id, "cus_a", "1", 1_760_000_000);
            send_with(
                &http,
                fake,
                reqwest::Method::POST,
                path,
                Some(&form),
                idem,
                Some(SECRET_KEY),
            )
            .await
        }
    };

    // 500, then normal again.
    fake.fail_next(1, Failure::Status(500));
    let r = send_ev("f1", None).await.unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.body["error"]["type"], "api_error");
    assert_eq!(hdr(&r, "stripe-should-retry"), Some("true"));
    assert!(
        fake.meter_events().is_empty(),
        "a failed request is not processed"
    );
    assert_eq!(send_ev("f1", None).await.unwrap().status, 200);

    // 429 with Retry-After.
    fake.fail_next(1, Failure::RateLimited { retry_after_s: 2 });
    let r = send_ev("f2", None).await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(hdr(&r, "retry-after"), Some("2"));
    assert_eq!(r.body["error"]["code"], "rate_limit");

    // A hang longer than the client's timeout: the client times out, the fake still processes.
    fake.fail_next(1, Failure::Hang(Duration::from_millis(1500)));
    let t0 = Instant::now();
    let e = send_ev("f3", None).await.err().expect("times out");
    assert!(e.is_timeout(), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fake.meter_events().iter().any(|e| e.identifier == "f3") {
        assert!(
            Instant::now() < deadline,
            "the hung request is processed late"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Drop: the connection closes without an answer, well before the timeout.
    fake.fail_next(1, Failure::Drop);
    let t0 = Instant::now();
    let e = send_ev("f4", None).await.err().expect("connection dropped");
    assert!(!e.is_timeout(), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(!fake.meter_events().iter().any(|e| e.identifier == "f4"));
    assert_eq!(fake.requests().last().unwrap().status, None);

    // Processed, then dropped: a retry with the same key is a replay.
    fake.fail_next(1, Failure::DropAfterProcessing);
    assert!(send_ev("f5", Some("key-f5")).await.is_err());
    assert!(fake.meter_events().iter().any(|e| e.identifier == "f5"));
    let r = send_ev("f5", Some("key-f5")).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(hdr(&r, "idempotent-replayed"), Some("true"));

    // Path filter: customers fail, meter events do not.
    fake.fail_next_on("/v1/customers", 1, Failure::Status(503));
    assert_eq!(send_ev("f6", None).await.unwrap().status, 200);
    let r = post(&fake, "/v1/customers", "email=x@example.com").await;
    assert_eq!(r.status, 503);

    // A time window.
    fake.fail_for(Duration::from_millis(300), Failure::Status(503));
    assert_eq!(send_ev("f7", None).await.unwrap().status, 503);
    assert_eq!(send_ev("f7", None).await.unwrap().status, 503);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(send_ev("f7", None).await.unwrap().status, 200);

    let ids: Vec<String> = fake
        .meter_events()
        .into_iter()
        .map(|e| e.identifier)
        .collect();
    assert_eq!(ids, ["f1", "f3", "f5", "f6", "f7"]);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_stop_closes_the_port() {
    let fake = FakeStripe::start().await;
    let addr = fake.addr();
    assert_eq!(get(&fake, "/v1/billing/meters").await.status, 200);
    let served = fake.request_counter();
    assert_eq!(served(), 1);
    fake.stop().await;
    // The port may already belong to another test's listener (the OS reuses freed ports), so
    // the check is that this fake serves nothing more, whoever answers.
    let http = client(Duration::from_secs(2));
    let _ = http
        .get(format!("http://{addr}/v1/billing/meters"))
        .bearer_auth(SECRET_KEY)
        .send()
        .await;
    assert_eq!(served(), 1, "a stopped fake serves nothing");
}

// ----- v1 events, subscriptions, v2 events ---------------------------------------------------

fn shared_events_dir() -> std::path::PathBuf {
    crate::support::stripe_events_dir()
}

fn shared_event(name: &str) -> Value {
    let p = shared_events_dir().join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// Every v1 `event` envelope in tests/fixtures/stripe/events, in file-name order.
fn shared_v1_events() -> Vec<Value> {
    let mut names: Vec<String> = std::fs::read_dir(shared_events_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| shared_event(n))
        .filter(|e| e["object"] == "event")
        .collect()
}

async fn get_with(fake: &FakeStripe, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = client(Duration::from_secs(10))
        .get(format!(
            "{}{}",
            fake.base_url(),
            path.trim_start_matches('/')
        ))
        .bearer_auth(SECRET_KEY);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        headers,
        body,
    }
}

fn ids(r: &Resp) -> Vec<String> {
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn fake_stripe_v2_event_fetch() {
    let fake = FakeStripe::start().await;
    let fetched = shared_event("billing.meter.error_report_triggered.fetched.json");
    let id = fetched["id"].as_str().unwrap().to_string();
    fake.add_v2_event(fetched.clone());
    let path = format!("/v2/core/events/{id}");

    let r = get_with(&fake, &path, &[("stripe-version", "2026-10-28.endive")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, fetched);
    let r = get(&fake, &path).await;
    assert_eq!(r.status, 200, "Stripe-Version is optional");
    let recs = fake.requests();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].method, "GET");
    assert_eq!(recs[0].path, path);
    assert_eq!(recs[0].status, Some(200));
    assert_eq!(recs[0].stripe_version.as_deref(), Some("2026-10-28.endive"));
    assert_eq!(recs[1].stripe_version, None);

    let r = get(&fake, "/v2/core/events/evt_test_nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert_eq!(r.body["error"]["code"], "resource_missing");
    assert!(
        fake.spec_violations().is_empty(),
        "a 404 is not a violation"
    );

    let http = client(Duration::from_secs(10));
    for key in [None, Some("sk_test_wrong")] {
        let r = send_with(&http, &fake, reqwest::Method::GET, &path, None, None, key)
            .await
            .unwrap();
        assert_eq!(r.status, 401);
    }

    // Refused and recorded as violations: a query, a malformed version, other v2 routes.
    let r = get(&fake, &format!("{path}?expand[]=data")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "expand[]");
    let r = get_with(&fake, &path, &[("stripe-version", "latest")]).await;
    assert_eq!(r.status, 400);
    let r = send(&fake, reqwest::Method::POST, &path, Some("a=b"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(get(&fake, "/v2/core/events").await.status, 404);
    assert_eq!(get(&fake, "/v2/core/events/").await.status, 404);
    let v = fake.spec_violations();
    assert_eq!(v.len(), 5, "{v:?}");
    assert!(v[0].contains("expand[]"), "{v:?}");
    assert_eq!(fake.count(&path), 7);
}

#[tokio::test]
async fn fake_stripe_subscriptions_get() {
    let fake = FakeStripe::start().await;
    let sub = shared_event("customer.subscription.created.json")["data"]["object"].clone();
    let id = sub["id"].as_str().unwrap().to_string();
    fake.put_subscription(sub.clone());
    let r = get(&fake, &format!("/v1/subscriptions/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, sub);
    let r = get(
        &fake,
        &format!("/v1/subscriptions/{id}?expand[]=latest_invoice"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // put_subscription replaces.
    let mut canceled = sub.clone();
    canceled["status"] = "canceled".into();
    fake.put_subscription(canceled);
    let r = get(&fake, &format!("/v1/subscriptions/{id}")).await;
    assert_eq!(r.body["status"], "canceled");

    let r = get(&fake, "/v1/subscriptions/sub_nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "resource_missing");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sub_nope")
    );
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    let r = get(&fake, &format!("/v1/subscriptions/{id}?colour=red")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "colour");
    assert_eq!(fake.spec_violations().len(), 1);
    assert_eq!(fake.count(&format!("/v1/subscriptions/{id}")), 4);
}

#[tokio::test]
async fn fake_stripe_v1_events_newest_first_and_paginated() {
    let fake = FakeStripe::start().await;
    let events = shared_v1_events();
    assert_eq!(events.len(), 17);
    for e in &events {
        fake.add_event(e.clone());
    }
    // Expected: newest `created` first; within a second, the one added later first
    // (invoice.paid and invoice.payment_succeeded share 1792137610).
    let mut order: Vec<(i64, usize, String)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                e["created"].as_i64().unwrap(),
                i,
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    order.sort_by_key(|a| std::cmp::Reverse((a.0, a.1)));
    let expected: Vec<String> = order.into_iter().map(|(_, _, id)| id).collect();

    let r = get(&fake, "/v1/events").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "list");
    assert_eq!(r.body["url"], "/v1/events");
    assert_eq!(r.body["has_more"], true);
    assert_eq!(ids(&r), expected[..10], "default limit 10");
    let newest = events.iter().find(|e| e["id"] == expected[0].as_str());
    assert_eq!(Some(&r.body["data"][0]), newest, "served as registered");

    let r = get(&fake, "/v1/events?limit=100").await;
    assert_eq!(ids(&r), expected);
    assert_eq!(r.body["has_more"], false);

    // Walk with starting_after.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/events?limit=5&starting_after={c}"),
            None => "/v1/events?limit=5".to_string(),
        };
        let r = get(&fake, &q).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = ids(&r);
        pages += 1;
        seen.extend(page.clone());
        if r.body["has_more"] == false {
            break;
        }
        cursor = page.last().cloned();
        assert!(pages < 10);
    }
    assert_eq!(pages, 4);
    assert_eq!(seen, expected);

    // ending_before: the page just newer than the cursor.
    let r = get(
        &fake,
        &format!("/v1/events?limit=5&ending_before={}", expected[10]),
    )
    .await;
    assert_eq!(ids(&r), expected[5..10]);
    assert_eq!(r.body["has_more"], true);
    let r = get(
        &fake,
        &format!("/v1/events?limit=5&ending_before={}", expected[3]),
    )
    .await;
    assert_eq!(ids(&r), expected[..3]);
    assert_eq!(r.body["has_more"], false);

    // A cursor naming no event: Stripe's 400, not a spec violation.
    let r = get(&fake, "/v1/events?starting_after=evt_nope").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["code"], "resource_missing");
    assert_eq!(r.body["error"]["param"], "starting_after");
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_v1_events_filters() {
    let fake = FakeStripe::start().await;
    for e in shared_v1_events() {
        if e["type"] == "invoice.payment_failed" {
            fake.add_event_undelivered(e);
        } else {
            fake.add_event(e);
        }
    }
    let types = |r: &Resp| -> Vec<String> {
        r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    };
    let created = |r: &Resp| -> Vec<i64> {
        r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["created"].as_i64().unwrap())
            .collect()
    };

    // created ranges (bounds inclusive/exclusive as named), and an exact value.
    let r = get(
        &fake,
        "/v1/events?limit=100&created[gte]=1792137600&created[lte]=1792137610",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        created(&r),
        [1792137610, 1792137610, 1792137604, 1792137602, 1792137600]
    );
    let r = get(
        &fake,
        "/v1/events?limit=100&created%5Bgt%5D=1792137600&created%5Blt%5D=1792137610",
    )
    .await;
    assert_eq!(created(&r), [1792137604, 1792137602]);
    let r = get(&fake, "/v1/events?created=1790845203").await;
    assert_eq!(types(&r), ["customer.subscription.created"]);

    // type with a wildcard, types[] (both index styles).
    let r = get(&fake, "/v1/events?limit=100&type=customer.subscription.*").await;
    let t = types(&r);
    assert_eq!(t.len(), 5, "{t:?}");
    assert!(t.iter().all(|t| t.starts_with("customer.subscription.")));
    let r = get(&fake, "/v1/events?type=invoice.paid").await;
    assert_eq!(types(&r), ["invoice.paid"]);
    let r = get(&fake, "/v1/events?type=*.updated&limit=100").await;
    assert_eq!(types(&r).len(), 4, "{:?}", types(&r));
    let r = get(
        &fake,
        "/v1/events?types[]=invoice.paid&types[]=customer.updated",
    )
    .await;
    assert_eq!(types(&r), ["invoice.paid", "customer.updated"]);
    let r = get(&fake, "/v1/events?types[0]=invoice.created").await;
    assert_eq!(types(&r), ["invoice.created"]);

    // delivery_success.
    let r = get(&fake, "/v1/events?delivery_success=false").await;
    assert_eq!(types(&r), ["invoice.payment_failed"]);
    let r = get(&fake, "/v1/events?delivery_success=true&limit=100").await;
    assert_eq!(types(&r).len(), 16);

    // Filters combine, and pagination runs over the filtered list.
    let r = get(
        &fake,
        "/v1/events?type=invoice.*&limit=2&created[lt]=1792137610",
    )
    .await;
    assert_eq!(types(&r), ["invoice.payment_failed", "invoice.finalized"]);
    assert_eq!(r.body["has_more"], true);
    let last = ids(&r)[1].clone();
    let r = get(
        &fake,
        &format!("/v1/events?type=invoice.*&limit=2&created[lt]=1792137610&starting_after={last}"),
    )
    .await;
    assert_eq!(types(&r), ["invoice.created"]);
    assert_eq!(r.body["has_more"], false);
    let r = get(&fake, "/v1/events?type=nothing.like.this").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"], serde_json::json!([]));
    assert_eq!(r.body["has_more"], false);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_v1_events_spec_violations() {
    let fake = FakeStripe::start().await;
    fake.add_event(shared_event("invoice.paid.json"));
    let cases = [
        ("colour=red", "colour"),
        ("created[since]=1", "created[since]"),
        ("created=yesterday", "created"),
        ("created[gte]=soon", "created[gte]"),
        ("limit=ten", "limit"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("delivery_success=maybe", "delivery_success"),
        ("types=invoice.paid", "types"),
        ("type=invoice.paid&types[]=invoice.paid", "types"),
        ("starting_after=a&ending_before=b", "ending_before"),
        ("type=a&type=b", "type"),
    ];
    for (i, (q, param)) in cases.iter().enumerate() {
        let r = get(&fake, &format!("/v1/events?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert_eq!(r.body["error"]["type"], "invalid_request_error", "{q}");
        assert_eq!(r.body["error"]["param"], *param, "{q}: {}", r.body);
        let v = fake.spec_violations();
        assert_eq!(v.len(), i + 1, "{q}: {v:?}");
        assert!(v[i].starts_with("GET /v1/events: "), "{v:?}");
    }
    let many: String = (0..21).map(|i| format!("types[]=t{i}&")).collect();
    let r = get(&fake, &format!("/v1/events?{many}")).await;
    assert_eq!(r.status, 400);
    assert_eq!(fake.spec_violations().len(), cases.len() + 1);
    assert_eq!(fake.count("/v1/events"), cases.len() + 1);
    assert!(fake.requests().iter().all(|r| r.status == Some(400)));
    // The boundaries are fine.
    let twenty: String = (0..20).map(|i| format!("types[]=t{i}&")).collect();
    for q in [
        "limit=1",
        "limit=100",
        "expand[]=data.object",
        twenty.as_str(),
    ] {
        let r = get(&fake, &format!("/v1/events?{q}")).await;
        assert_eq!(r.status, 200, "{q}: {}", r.body);
    }
    assert_eq!(fake.spec_violations().len(), cases.len() + 1);
}

// ----- meter event summaries, adjustments, drift ----------------------------------------------

/// 2026-01-01T00:00:00Z, a UTC day boundary.
const DAY0: i64 = 1_767_225_600;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
const ADJUSTMENTS: &str = "/v1/billing/meter_event_adjustments";

/// `GET` event summaries of the default meter with this query.
async fn summaries(fake: &FakeStripe, query: &str) -> Resp {
    get(
        fake,
        &format!("/v1/billing/meters/mtr_test_tokens/event_summaries?{query}"),
    )
    .await
}

/// The single summary of `customer` over `[start, end)`, asserting it is one.
async fn total(fake: &FakeStripe, customer: &str, start: i64, end: i64) -> f64 {
    let r = summaries(
        fake,
        &format!("customer={customer}&start_time={start}&end_time={end}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let data = r.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{}", r.body);
    data[0]["aggregated_value"].as_f64().unwrap()
}

fn field_i64(r: &Resp, k: &str) -> Vec<i64> {
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[k].as_i64().unwrap())
        .collect()
}

fn sums(r: &Resp) -> Vec<f64> {
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["aggregated_value"].as_f64().unwrap())
        .collect()
}

async fn cancel(fake: &FakeStripe, identifier: &str) -> Resp {
    post(
        fake,
        ADJUSTMENTS,
        &format!("event_name=tokens&type=cancel&cancel[identifier]={identifier}"),
    )
    .await
}

fn identifiers(events: &[AcceptedEvent]) -> Vec<&str> {
    events.iter().map(|e| e.identifier.as_str()).collect()
}

/// A v2 meter event session token.
async fn session_token(fake: &FakeStripe) -> String {
    let r = client(Duration::from_secs(10))
        .post(format!("{}v2/billing/meter_event_session", fake.base_url()))
        .bearer_auth(SECRET_KEY)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    v["authentication_token"].as_str().unwrap().to_string()
}

/// One v2 stream request of `tokens` events `(identifier, customer, value)` at
/// 2026-01-01T00:01:00Z (DAY0 + 60); returns the status.
async fn stream(fake: &FakeStripe, token: &str, events: &[(&str, &str, &str)]) -> u16 {
    let events: Vec<Value> = events
        .iter()
        .map(|(id, cus, value)| {
            serde_json::json!({"event_name": "tokens", "identifier": id,
                "payload": {"stripe_customer_id": cus, "value": value},
                "timestamp": "2026-01-01T00:01:00.000Z"})
        })
        .collect();
    client(Duration::from_secs(10))
        .post(format!("{}v2/billing/meter_event_stream", fake.base_url()))
        .bearer_auth(token)
        .json(&serde_json::json!({ "events": events }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn fake_stripe_summaries_want_aligned_times() {
    let fake = FakeStripe::start().await;
    let cases = [
        // Without a window: minutes.
        (
            format!("start_time={}&end_time={}", DAY0 + 30, DAY0 + HOUR),
            "start_time",
        ),
        (
            format!("start_time={DAY0}&end_time={}", DAY0 + 90),
            "end_time",
        ),
        // Hours.
        (
            format!(
                "start_time={}&end_time={}&value_grouping_window=hour",
                DAY0 + 60,
                DAY0 + 3 * HOUR
            ),
            "start_time",
        ),
        (
            format!(
                "start_time={DAY0}&end_time={}&value_grouping_window=hour",
                DAY0 + 3 * HOUR + 60
            ),
            "end_time",
        ),
        // UTC days: an hour boundary is not enough.
        (
            format!(
                "start_time={}&end_time={}&value_grouping_window=day",
                DAY0 + HOUR,
                DAY0 + 2 * DAY
            ),
            "start_time",
        ),
        (
            format!(
                "start_time={DAY0}&end_time={}&value_grouping_window=day",
                DAY0 + DAY + HOUR
            ),
            "end_time",
        ),
        // An empty or reversed range.
        (format!("start_time={DAY0}&end_time={DAY0}"), "start_time"),
        (
            format!(
                "start_time={}&end_time={DAY0}&value_grouping_window=hour",
                DAY0 + HOUR
            ),
            "start_time",
        ),
    ];
    for (q, param) in &cases {
        let r = summaries(&fake, &format!("customer=cus_a&{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert_eq!(r.body["error"]["type"], "invalid_request_error", "{q}");
        assert_eq!(r.body["error"]["param"], *param, "{q}: {}", r.body);
    }
    assert!(
        fake.spec_violations().is_empty(),
        "valid per the spec: {:?}",
        fake.spec_violations()
    );
    for q in [
        format!("start_time={}&end_time={}", DAY0 + 60, DAY0 + 120),
        format!(
            "start_time={}&end_time={}&value_grouping_window=hour",
            DAY0 + HOUR,
            DAY0 + 2 * HOUR
        ),
        format!(
            "start_time={DAY0}&end_time={}&value_grouping_window=day",
            DAY0 + DAY
        ),
    ] {
        let r = summaries(&fake, &format!("customer=cus_a&{q}")).await;
        assert_eq!(r.status, 200, "{q}: {}", r.body);
    }
    assert!(
        fake.spec_violations().is_empty(),
        "`day` is Stripe's too: {:?}",
        fake.spec_violations()
    );
    // A window Stripe does not know is a spec violation.
    let r = summaries(
        &fake,
        &format!(
            "customer=cus_a&start_time={DAY0}&end_time={}&value_grouping_window=week",
            DAY0 + 7 * DAY
        ),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "value_grouping_window");
    assert_eq!(fake.spec_violations().len(), 1);
}

#[tokio::test]
async fn fake_stripe_summaries_page_through_three_pages() {
    let fake = FakeStripe::start().await;
    for h in 0..25 {
        fake.inject_event(
            &format!("p{h}"),
            "tokens",
            "cus_p",
            u64::try_from(h + 1).unwrap(),
            DAY0 + h * HOUR + 5,
        );
    }
    let base = format!(
        "customer=cus_p&start_time={DAY0}&end_time={}&value_grouping_window=hour",
        DAY0 + 25 * HOUR
    );
    let all = summaries(&fake, &format!("{base}&limit=100")).await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(all.body["has_more"], false);
    let all_ids = ids(&all);
    assert_eq!(all_ids.len(), 25);
    let distinct: std::collections::HashSet<&String> = all_ids.iter().collect();
    assert_eq!(distinct.len(), 25, "{all_ids:?}");
    assert!(all_ids.iter().all(|id| id.starts_with("mtrusg_")));
    assert_eq!(
        ids(&summaries(&fake, &format!("{base}&limit=100")).await),
        all_ids,
        "ids are the same on every call"
    );
    let r = summaries(&fake, &base).await;
    assert_eq!(ids(&r), all_ids[..10], "default limit 10");

    // Three pages of 10, 10 and 5 with starting_after.
    let mut pages = Vec::new();
    let mut more = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..3 {
        let q = match &cursor {
            Some(c) => format!("{base}&limit=10&starting_after={c}"),
            None => format!("{base}&limit=10"),
        };
        let r = summaries(&fake, &q).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = ids(&r);
        cursor = page.last().cloned();
        more.push(r.body["has_more"].as_bool().unwrap());
        pages.push(page);
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    assert_eq!(more, [true, true, false]);
    assert_eq!(pages.concat(), all_ids);
    let r = summaries(
        &fake,
        &format!("{base}&limit=10&starting_after={}", all_ids[24]),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(ids(&r).is_empty());
    assert_eq!(r.body["has_more"], false);

    // ending_before: the page just newer than the cursor.
    let r = summaries(
        &fake,
        &format!("{base}&limit=10&ending_before={}", pages[2][0]),
    )
    .await;
    assert_eq!(ids(&r), pages[1]);
    assert_eq!(r.body["has_more"], true);
    let r = summaries(
        &fake,
        &format!("{base}&limit=10&ending_before={}", all_ids[3]),
    )
    .await;
    assert_eq!(ids(&r), all_ids[..3]);
    assert_eq!(r.body["has_more"], false);

    // A cursor of no summary of this listing: another customer's, or the same range ungrouped.
    fake.inject_event("q0", "tokens", "cus_q", 1, DAY0 + 5);
    let other = summaries(&fake, &base.replace("customer=cus_p", "customer=cus_q")).await;
    assert_eq!(other.status, 200);
    let ungrouped = summaries(&fake, &base.replace("&value_grouping_window=hour", "")).await;
    for (cursor, param) in [
        (ids(&other)[0].clone(), "starting_after"),
        (ids(&ungrouped)[0].clone(), "ending_before"),
        ("mtrusg_nope".to_string(), "starting_after"),
    ] {
        assert!(!all_ids.contains(&cursor));
        let r = summaries(&fake, &format!("{base}&{param}={cursor}")).await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "resource_missing");
        assert_eq!(r.body["error"]["param"], param);
    }
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    // The prose rules of the spec: limit 1..=100, one cursor.
    for (q, param) in [
        (format!("{base}&limit=0"), "limit"),
        (format!("{base}&limit=101"), "limit"),
        (
            format!(
                "{base}&starting_after={}&ending_before={}",
                all_ids[1], all_ids[0]
            ),
            "ending_before",
        ),
    ] {
        let r = summaries(&fake, &q).await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.body["error"]["param"], param, "{q}");
    }
    assert_eq!(fake.spec_violations().len(), 3);
}

#[tokio::test]
async fn fake_stripe_summaries_newest_window_first_with_empty_windows() {
    let fake = FakeStripe::start().await;
    fake.add_meter("mtr_other", "other");
    let path = "/v1/billing/meter_events";
    for (id, cus, value, ts) in [
        ("o1", "cus_a", "3", DAY0), // the first window's start is inclusive
        ("o2", "cus_a", "4", DAY0 + HOUR - 1), // still the first window
        ("o3", "cus_a", "2.5", DAY0 + 2 * HOUR), // the third window
        ("o4", "cus_a", "2.5", DAY0 + 3 * HOUR - 1),
        ("o5", "cus_a", "100", DAY0 + 4 * HOUR), // the end is exclusive
        ("o6", "cus_b", "100", DAY0 + HOUR),     // another customer
    ] {
        let r = post(&fake, path, &event_form(id, cus, value, ts)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let other = format!(
        "event_name=other&identifier=o7&payload[stripe_customer_id]=cus_a&payload[value]=100&timestamp={}",
        DAY0 + HOUR
    );
    assert_eq!(post(&fake, path, &other).await.status, 200);

    let r = summaries(
        &fake,
        &format!(
            "customer=cus_a&start_time={DAY0}&end_time={}&value_grouping_window=hour",
            DAY0 + 4 * HOUR
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let starts = field_i64(&r, "start_time");
    assert_eq!(
        starts,
        [DAY0 + 3 * HOUR, DAY0 + 2 * HOUR, DAY0 + HOUR, DAY0],
        "newest first"
    );
    let ends: Vec<i64> = starts.iter().map(|s| s + HOUR).collect();
    assert_eq!(field_i64(&r, "end_time"), ends);
    assert_eq!(sums(&r), [0.0, 5.0, 0.0, 7.0], "empty windows are listed");
    let d = &r.body["data"][0];
    assert!(d["aggregated_value"].is_number());
    assert_eq!(d["object"], "billing.meter_event_summary");
    assert_eq!(d["meter"], "mtr_test_tokens");
    assert_eq!(d["livemode"], false);
    assert_eq!(
        r.body["url"],
        "/v1/billing/meters/mtr_test_tokens/event_summaries"
    );
    assert_eq!(total(&fake, "cus_a", DAY0, DAY0 + 4 * HOUR).await, 12.0);
    assert_eq!(total(&fake, "cus_b", DAY0, DAY0 + 4 * HOUR).await, 100.0);
    assert_eq!(total(&fake, "cus_nobody", DAY0, DAY0 + 4 * HOUR).await, 0.0);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_summaries_by_utc_day() {
    let fake = FakeStripe::start().await;
    for (id, value, ts) in [
        ("d1", 1, DAY0 + 10),
        ("d2", 2, DAY0 + DAY - 1),
        ("d3", 4, DAY0 + DAY),
        ("d4", 8, DAY0 + 2 * DAY + 12 * HOUR),
        ("d5", 16, DAY0 + 3 * DAY),
    ] {
        fake.inject_event(id, "tokens", "cus_d", value, ts);
    }
    let r = summaries(
        &fake,
        &format!(
            "customer=cus_d&start_time={DAY0}&end_time={}&value_grouping_window=day",
            DAY0 + 3 * DAY
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        field_i64(&r, "start_time"),
        [DAY0 + 2 * DAY, DAY0 + DAY, DAY0]
    );
    assert_eq!(
        field_i64(&r, "end_time"),
        [DAY0 + 3 * DAY, DAY0 + 2 * DAY, DAY0 + DAY]
    );
    assert_eq!(sums(&r), [8.0, 4.0, 3.0]);
    assert_eq!(total(&fake, "cus_d", DAY0, DAY0 + 3 * DAY).await, 15.0);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_cancel_takes_an_event_out_of_the_summaries() {
    let fake = FakeStripe::start().await;
    let path = "/v1/billing/meter_events";
    for (id, value) in [("c1", "5"), ("c2", "7")] {
        let r = post(&fake, path, &event_form(id, "cus_c", value, DAY0 + 60)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(total(&fake, "cus_c", DAY0, DAY0 + HOUR).await, 12.0);

    let r = cancel(&fake, "c1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "billing.meter_event_adjustment");
    assert_eq!(r.body["event_name"], "tokens");
    assert_eq!(r.body["type"], "cancel");
    assert_eq!(r.body["cancel"], serde_json::json!({"identifier": "c1"}));
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["livemode"], false);
    assert!(r.body.get("id").is_none(), "Stripe's adjustment has no id");
    assert_eq!(total(&fake, "cus_c", DAY0, DAY0 + HOUR).await, 7.0);
    let evs = fake.meter_events();
    assert_eq!(
        identifiers(&evs),
        ["c1", "c2"],
        "a cancelled event stays listed"
    );
    assert!(evs[0].cancelled);
    assert!(!evs[1].cancelled);
    assert_eq!(fake.adjustments(), ["c1"]);

    // Through the Idempotency-Key replay like every POST: a retry is not a second cancel.
    let form = "event_name=tokens&type=cancel&cancel[identifier]=c2";
    let a = send(
        &fake,
        reqwest::Method::POST,
        ADJUSTMENTS,
        Some(form),
        Some("adj-c2"),
    )
    .await
    .unwrap();
    let b = send(
        &fake,
        reqwest::Method::POST,
        ADJUSTMENTS,
        Some(form),
        Some("adj-c2"),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(hdr(&b, "idempotent-replayed"), Some("true"));
    assert_eq!(a.body, b.body);
    assert_eq!(fake.adjustments(), ["c1", "c2"]);
    assert_eq!(total(&fake, "cus_c", DAY0, DAY0 + HOUR).await, 0.0);
    let r = summaries(
        &fake,
        &format!(
            "customer=cus_c&start_time={DAY0}&end_time={}&value_grouping_window=hour",
            DAY0 + HOUR
        ),
    )
    .await;
    assert_eq!(sums(&r), [0.0]);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_cancel_refuses_unknown_cancelled_and_old_events() {
    let fake = FakeStripe::start().await;
    let path = "/v1/billing/meter_events";
    for id in ["k1", "k2", "k3"] {
        let r = post(&fake, path, &event_form(id, "cus_k", "1", DAY0 + 60)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Unknown: no such identifier, or not of this event name.
    let r = cancel(&fake, "k_nope").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert_eq!(r.body["error"]["code"], "resource_missing");
    assert_eq!(r.body["error"]["param"], "cancel[identifier]");
    let r = post(
        &fake,
        ADJUSTMENTS,
        "event_name=other&type=cancel&cancel[identifier]=k1",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "resource_missing");

    // Twice.
    assert_eq!(cancel(&fake, "k1").await.status, 200);
    let r = cancel(&fake, "k1").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert_eq!(r.body["error"]["param"], "cancel[identifier]");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already been cancelled")
    );
    assert_eq!(fake.adjustments(), ["k1"]);

    // Within 24 h of acceptance only.
    fake.age_events(Duration::from_secs(23 * 3600));
    assert_eq!(cancel(&fake, "k2").await.status, 200, "23 h old");
    fake.age_events(Duration::from_secs(3600));
    let r = cancel(&fake, "k3").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "cancel[identifier]");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("24 hours")
    );
    assert!(!fake.meter_events()[2].cancelled);
    assert_eq!(fake.adjustments(), ["k1", "k2"]);
    assert_eq!(total(&fake, "cus_k", DAY0, DAY0 + HOUR).await, 1.0);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );

    // Malformed: no identifier (required in prose), a type Stripe does not have.
    let r = post(&fake, ADJUSTMENTS, "event_name=tokens&type=cancel").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "cancel[identifier]");
    let r = post(
        &fake,
        ADJUSTMENTS,
        "event_name=tokens&type=void&cancel[identifier]=k3",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "type");
    assert_eq!(
        fake.spec_violations().len(),
        2,
        "{:?}",
        fake.spec_violations()
    );
    assert_eq!(fake.adjustments(), ["k1", "k2"]);
}

#[tokio::test]
async fn fake_stripe_lost_events_are_accepted_deduplicated_and_never_counted() {
    let fake = FakeStripe::start().await;
    let path = "/v1/billing/meter_events";
    fake.lose_next_events(2);
    // One lost on v1, one on the v2 stream; the stream's second event is the third: counted.
    let r = post(&fake, path, &event_form("l1", "cus_l", "5", DAY0 + 60)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["identifier"], "l1");
    let token = session_token(&fake).await;
    assert_eq!(
        stream(
            &fake,
            &token,
            &[("l2", "cus_l", "7"), ("l3", "cus_l", "11")]
        )
        .await,
        200
    );
    assert_eq!(identifiers(&fake.lost_events()), ["l1", "l2"]);
    assert_eq!(identifiers(&fake.meter_events()), ["l3"]);
    assert_eq!(total(&fake, "cus_l", DAY0, DAY0 + HOUR).await, 11.0);

    // Their identifiers are taken: a resend is refused (v1) or dropped (v2).
    let r = post(&fake, path, &event_form("l1", "cus_l", "5", DAY0 + 60)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["code"], "resource_already_exists");
    assert_eq!(stream(&fake, &token, &[("l2", "cus_l", "7")]).await, 200);
    assert_eq!(total(&fake, "cus_l", DAY0, DAY0 + HOUR).await, 11.0);
    assert_eq!(fake.lost_events().len(), 2);
    // Stripe does not have them: nothing to cancel.
    let r = cancel(&fake, "l1").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["code"], "resource_missing");

    // The loss is used up: the next event counts.
    let r = post(&fake, path, &event_form("l4", "cus_l", "13", DAY0 + 60)).await;
    assert_eq!(r.status, 200);
    assert_eq!(total(&fake, "cus_l", DAY0, DAY0 + HOUR).await, 24.0);
    assert_eq!(identifiers(&fake.meter_events()), ["l3", "l4"]);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
async fn fake_stripe_injected_events_count_dedup_and_cancel() {
    let fake = FakeStripe::start().await;
    fake.add_meter("mtr_other", "other");
    fake.inject_event("i1", "tokens", "cus_i", 40, DAY0 + 120);
    fake.inject_event("i2", "other", "cus_i", 9, DAY0 + 120);
    let evs = fake.meter_events();
    assert_eq!(identifiers(&evs), ["i1", "i2"]);
    assert_eq!(evs[0].value, "40");
    assert_eq!(evs[0].customer, "cus_i");
    assert_eq!(evs[0].timestamp, DAY0 + 120);
    assert!(!evs[0].cancelled);
    assert_eq!(total(&fake, "cus_i", DAY0, DAY0 + HOUR).await, 40.0);
    let r = get(
        &fake,
        &format!(
            "/v1/billing/meters/mtr_other/event_summaries?customer=cus_i&start_time={DAY0}&end_time={}",
            DAY0 + HOUR
        ),
    )
    .await;
    assert_eq!(sums(&r), [9.0]);

    // As if sent: its identifier is taken.
    let path = "/v1/billing/meter_events";
    let r = post(&fake, path, &event_form("i1", "cus_i", "1", DAY0 + 120)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["code"], "resource_already_exists");

    // Never lost, and a pending loss waits for the next sent event.
    fake.lose_next_events(1);
    fake.inject_event("i3", "tokens", "cus_i", 2, DAY0 + 180);
    assert_eq!(total(&fake, "cus_i", DAY0, DAY0 + HOUR).await, 42.0);
    assert!(fake.lost_events().is_empty());
    assert_eq!(
        post(&fake, path, &event_form("i4", "cus_i", "1", DAY0 + 120))
            .await
            .status,
        200
    );
    assert_eq!(identifiers(&fake.lost_events()), ["i4"]);

    // Cancellable.
    assert_eq!(cancel(&fake, "i1").await.status, 200);
    assert_eq!(total(&fake, "cus_i", DAY0, DAY0 + HOUR).await, 2.0);

    // Past the dedup window the identifier may be sent again: a new event, cancellable.
    fake.age_events(Duration::from_secs(24 * 3600));
    let r = post(&fake, path, &event_form("i1", "cus_i", "30", DAY0 + 120)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(total(&fake, "cus_i", DAY0, DAY0 + HOUR).await, 32.0);
    assert_eq!(cancel(&fake, "i1").await.status, 200, "the new i1");
    assert_eq!(total(&fake, "cus_i", DAY0, DAY0 + HOUR).await, 2.0);
    assert_eq!(fake.adjustments(), ["i1", "i1"]);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
}

#[tokio::test]
#[should_panic(expected = "already accepted")]
async fn fake_stripe_inject_event_refuses_a_taken_identifier() {
    let fake = FakeStripe::start().await;
    let r = post(
        &fake,
        "/v1/billing/meter_events",
        &event_form("taken", "cus_a", "1", DAY0),
    )
    .await;
    assert_eq!(r.status, 200);
    fake.inject_event("taken", "tokens", "cus_a", 1, DAY0);
}

#[tokio::test]
async fn fake_stripe_summary_request_times() {
    let fake = FakeStripe::start().await;
    let q = format!("customer=cus_a&start_time={DAY0}&end_time={}", DAY0 + 60);
    let t0 = Instant::now();
    assert_eq!(summaries(&fake, &q).await.status, 200);
    assert_eq!(get(&fake, "/v1/billing/meters").await.status, 200);
    assert_eq!(summaries(&fake, &q).await.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t1 = Instant::now();
    // A failed request arrived too.
    fake.fail_next(1, Failure::Status(503));
    assert_eq!(summaries(&fake, &q).await.status, 503);
    let t2 = Instant::now();

    let times = fake.summary_request_times();
    assert_eq!(times.len(), 3);
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(t0 <= times[0] && times[1] < t1, "{times:?}");
    assert!(t1 <= times[2] && times[2] <= t2, "{times:?}");
    assert!(times[2].duration_since(times[1]) >= Duration::from_millis(100));
    let recs = fake.requests();
    assert_eq!(recs.len(), 4);
    assert!(t0 <= recs[1].at && recs[1].at <= times[1]);
}

#[tokio::test]
async fn fake_stripe_summaries_serve_many_events_and_calls() {
    let fake = FakeStripe::start().await;
    let customers = 20;
    let mut expected = vec![0u64; customers];
    for i in 0..20_000 {
        let c = i % customers;
        let value = u64::try_from(i % 7 + 1).unwrap();
        let ts = DAY0 + i64::try_from(i).unwrap() * 37 % (10 * DAY);
        fake.inject_event(&format!("m{i}"), "tokens", &format!("cus_{c}"), value, ts);
        // The sum of customer c over day 3 (hour 0 to 23).
        if (DAY0 + 3 * DAY..DAY0 + 4 * DAY).contains(&ts) {
            expected[c] += value;
        }
    }
    assert_eq!(fake.meter_events().len(), 20_000);
    let http = reqwest::Client::new();
    let mut day3 = vec![None; customers];
    for call in 0..2_000 {
        let c = call % customers;
        let day = i64::try_from(call / customers % 10).unwrap();
        let start = DAY0 + day * DAY;
        let q = format!(
            "/v1/billing/meters/mtr_test_tokens/event_summaries?customer=cus_{c}&start_time={start}&end_time={}&value_grouping_window=hour&limit=24",
            start + DAY
        );
        let r = send_with(
            &http,
            &fake,
            reqwest::Method::GET,
            &q,
            None,
            None,
            Some(SECRET_KEY),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["data"].as_array().unwrap().len(), 24);
        if day == 3 {
            let sum: f64 = sums(&r).into_iter().sum();
            day3[c] = Some(sum);
        }
    }
    for c in 0..customers {
        assert_eq!(day3[c], Some(expected[c] as f64), "cus_{c}");
    }
    assert_eq!(
        total(&fake, "cus_7", DAY0 + 3 * DAY, DAY0 + 4 * DAY).await,
        expected[7] as f64
    );
    assert_eq!(fake.summary_request_times().len(), 2_001);
}
