//! Stripe customers, Checkout and the customer portal against the spec-checked fake Stripe.

use serde_json::{Value, json};

use crate::support::fake_stripe::{DEFAULT_METER, Failure, FakeStripe, PriceKind, Recorded};
use crate::support::{ADMIN_KEY, APP_KEY, Resp, TestDaemon};

const SUCCESS: &str = "https://app.example.com/ok";
const CANCEL: &str = "https://app.example.com/cancel";
const RETURN: &str = "https://app.example.com/billing";

async fn start(fake: &FakeStripe) -> TestDaemon {
    fake.add_price("price_team_seat", PriceKind::Licensed);
    fake.add_price("price_tokens", PriceKind::Metered(DEFAULT_METER.into()));
    let dir = tempfile::tempdir().unwrap();
    TestDaemon::start_stripe(dir, fake, |c| {
        c.stripe.checkout_success_url = Some(SUCCESS.into());
        c.stripe.checkout_cancel_url = Some(CANCEL.into());
        c.stripe.portal_return_url = Some(RETURN.into());
        let team = c.stripe.plans.get_mut("team").unwrap();
        team.stripe_price = Some("price_team_seat".into());
        team.stripe_metered_price = Some("price_tokens".into());
        team.trial_days = Some(14);
    })
    .await
}

async fn post(d: &TestDaemon, path: &str, key: &str, body: Option<Value>) -> Resp {
    d.client
        .send(reqwest::Method::POST, path, Some(key), body)
        .await
}

async fn checkout(d: &TestDaemon, id: &str, body: Value) -> Resp {
    post(
        d,
        &format!("/v1/accounts/{id}/checkout"),
        ADMIN_KEY,
        Some(body),
    )
    .await
}

fn posts(fake: &FakeStripe, path: &str) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .collect()
}

fn param<'a>(r: &'a Recorded, k: &str) -> Option<&'a str> {
    r.params
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_checkout_creates_the_customer_once_and_the_session() {
    let fake = FakeStripe::start().await;
    let d = start(&fake).await;
    let put = d
        .client
        .put_account("acme", json!({"plan": "free", "email": "ops@acme.test"}))
        .await;
    assert_eq!(put.status, 201, "{:?}", put.body);

    let r = checkout(
        &d,
        "acme",
        json!({"kind": "subscription", "plan": "team", "seats": 3}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert!(r.body["url"].as_str().unwrap().starts_with("https://"));
    assert!(
        r.body["session_id"]
            .as_str()
            .unwrap()
            .starts_with("cs_test_")
    );

    let customers = posts(&fake, "/v1/customers");
    assert_eq!(customers.len(), 1);
    assert_eq!(
        param(&customers[0], "metadata[meterd_account_id]"),
        Some("acme")
    );
    assert_eq!(param(&customers[0], "email"), Some("ops@acme.test"));
    assert_eq!(
        customers[0].idempotency_key.as_deref(),
        Some("meterd-customer-acme")
    );
    let sessions = posts(&fake, "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(param(s, "mode"), Some("subscription"));
    assert_eq!(param(s, "customer"), Some("cus_test_1"));
    assert_eq!(param(s, "client_reference_id"), Some("acme"));
    assert_eq!(param(s, "success_url"), Some(SUCCESS));
    assert_eq!(param(s, "cancel_url"), Some(CANCEL));
    assert_eq!(param(s, "line_items[0][price]"), Some("price_team_seat"));
    assert_eq!(param(s, "line_items[0][quantity]"), Some("3"));
    assert_eq!(param(s, "line_items[1][price]"), Some("price_tokens"));
    assert_eq!(param(s, "line_items[1][quantity]"), None);
    assert_eq!(param(s, "subscription_data[trial_period_days]"), Some("14"));
    assert_eq!(param(s, "metadata[meterd_account_id]"), Some("acme"));
    assert_eq!(param(s, "metadata[plan]"), Some("team"));

    let acct = d.client.get_account("acme").await;
    assert_eq!(
        acct.body["stripe_customer_id"], "cus_test_1",
        "{:?}",
        acct.body
    );

    // A second checkout reuses the customer.
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "subscription", "plan": "team", "seats": 2}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(posts(&fake, "/v1/customers").len(), 1);
    assert_eq!(fake.customers().len(), 1);
    let sessions = posts(&fake, "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 2);
    assert_eq!(param(&sessions[1], "customer"), Some("cus_test_1"));
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_answer_of_an_unexpected_shape_still_links_the_customer() {
    let fake = FakeStripe::start().await;
    // Seen from Stripe's own mock server: a `discount` without `source` (and fields newer than
    // the generated types). Stripe created the customer; meterd needs only its `id`.
    fake.set_customer_shape(json!({
        "discount": {"object": "discount", "id": "di_1", "start": 1},
        "a_field_from_the_future": {"x": [1, 2, 3]},
        "invoice_settings": "not an object"
    }));
    let d = start(&fake).await;
    let put = d.client.put_account("acme", json!({"plan": "free"})).await;
    assert_eq!(put.status, 201, "{:?}", put.body);
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "subscription", "plan": "team", "seats": 2}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(fake.customers().len(), 1);
    let acct = d.client.get_account("acme").await;
    assert_eq!(
        acct.body["stripe_customer_id"], "cus_test_1",
        "{:?}",
        acct.body
    );
    let r = post(&d, "/v1/accounts/acme/portal", ADMIN_KEY, Some(json!({}))).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_answer_without_what_meterd_needs_is_a_502_that_says_so() {
    let fake = FakeStripe::start().await;
    fake.set_customer_shape(json!({"id": null}));
    let d = start(&fake).await;
    let put = d.client.put_account("acme", json!({"plan": "free"})).await;
    assert_eq!(put.status, 201, "{:?}", put.body);
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "subscription", "plan": "team", "seats": 2}),
    )
    .await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "stripe_error");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("accepted the request") && msg.contains("POST /v1/customers"),
        "{msg}"
    );
    assert!(posts(&fake, "/v1/checkout/sessions").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_checkouts_are_400_and_call_no_stripe() {
    let fake = FakeStripe::start().await;
    let d = start(&fake).await;
    d.client.put_account("acme", json!({"plan": "free"})).await;
    let cases = [
        (
            json!({"kind": "subscription", "plan": "team", "seats": 1}),
            "at least 2 seats",
        ),
        (json!({"kind": "subscription", "plan": "gold"}), "gold"),
        (
            json!({"kind": "subscription", "plan": "pro"}),
            "plans.pro.stripe_price",
        ),
        (
            json!({"kind": "topup", "package": "credits_3"}),
            "credits_3",
        ),
        (json!({"kind": "gift"}), "kind"),
        (
            json!({"kind": "subscription", "plan": "team", "colour": 1}),
            "colour",
        ),
    ];
    for (body, needle) in cases {
        let r = checkout(&d, "acme", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert_eq!(r.code(), "invalid_request");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg} should name {needle}");
    }
    // Unknown account: 404; app key: 403.
    let r = checkout(
        &d,
        "nobody",
        json!({"kind": "subscription", "plan": "team", "seats": 2}),
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = post(
        &d,
        "/v1/accounts/acme/checkout",
        APP_KEY,
        Some(json!({"kind": "subscription", "plan": "team", "seats": 2})),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = post(&d, "/v1/accounts/nobody/portal", ADMIN_KEY, None).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(posts(&fake, "/v1/customers").is_empty());
    assert!(posts(&fake, "/v1/checkout/sessions").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topup_checkout_is_a_payment_with_inline_price() {
    let fake = FakeStripe::start().await;
    let d = start(&fake).await;
    d.client
        .put_account("acme", json!({"plan": "prepaid"}))
        .await;
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "topup", "package": "credits_500"}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let sessions = posts(&fake, "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(param(s, "mode"), Some("payment"));
    assert_eq!(
        param(s, "line_items[0][price_data][unit_amount]"),
        Some("500")
    );
    assert_eq!(param(s, "line_items[0][price_data][currency]"), Some("usd"));
    assert!(param(s, "line_items[0][price_data][product_data][name]").is_some());
    assert_eq!(param(s, "line_items[0][quantity]"), Some("1"));
    assert_eq!(param(s, "metadata[type]"), Some("topup"));
    assert_eq!(param(s, "metadata[credits]"), Some("500"));
    assert_eq!(param(s, "metadata[package]"), Some("credits_500"));
    assert_eq!(param(s, "metadata[meterd_account_id]"), Some("acme"));
    let topup_id = param(s, "metadata[topup_id]").unwrap();
    assert_eq!(topup_id.len(), 32);
    assert_eq!(param(s, "client_reference_id"), Some("acme"));
    // A second top-up gets a new topup_id.
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "topup", "package": "credits_500"}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let sessions = posts(&fake, "/v1/checkout/sessions");
    assert_ne!(param(&sessions[1], "metadata[topup_id]"), Some(topup_id));
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_session_for_the_account_customer() {
    let fake = FakeStripe::start().await;
    let d = start(&fake).await;
    d.client
        .put_account(
            "acme",
            json!({"plan": "pro", "stripe_customer_id": "cus_known"}),
        )
        .await;
    fake.add_customer("cus_known", None);
    let r = post(&d, "/v1/accounts/acme/portal", ADMIN_KEY, None).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert!(r.body["url"].as_str().unwrap().starts_with("https://"));
    let p = posts(&fake, "/v1/billing_portal/sessions");
    assert_eq!(p.len(), 1);
    assert_eq!(param(&p[0], "customer"), Some("cus_known"));
    assert_eq!(param(&p[0], "return_url"), Some(RETURN));
    // The stored customer is used: none is created.
    assert!(posts(&fake, "/v1/customers").is_empty());
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sixth_checkout_in_a_minute_is_rate_limited() {
    let fake = FakeStripe::start().await;
    let d = start(&fake).await;
    d.client.put_account("acme", json!({"plan": "free"})).await;
    d.client.put_account("other", json!({"plan": "free"})).await;
    let body = json!({"kind": "topup", "package": "credits_500"});
    for i in 0..5 {
        let r = checkout(&d, "acme", body.clone()).await;
        assert_eq!(r.status, 201, "checkout {i}: {:?}", r.body);
    }
    let r = checkout(&d, "acme", body.clone()).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.code(), "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(posts(&fake, "/v1/checkout/sessions").len(), 5);
    // Per account: another account is not limited.
    let r = checkout(&d, "other", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_and_unconfigured_answer_503() {
    let d = TestDaemon::start().await;
    d.client.put_account("acme", json!({"plan": "free"})).await;
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "topup", "package": "credits_500"}),
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.code(), "stripe_offline");
    let r = post(&d, "/v1/accounts/acme/portal", ADMIN_KEY, None).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.code(), "stripe_offline");

    // Online, but without the checkout URLs.
    let fake = FakeStripe::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_stripe(dir, &fake, |_| {}).await;
    d.client.put_account("acme", json!({"plan": "free"})).await;
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "topup", "package": "credits_500"}),
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.code(), "stripe_not_configured");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("stripe.checkout_success_url"), "{msg}");
    assert!(posts(&fake, "/v1/checkout/sessions").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_errors_are_502_with_stripes_message() {
    let fake = FakeStripe::start().await;
    let d = start(&fake).await;
    d.client.put_account("acme", json!({"plan": "free"})).await;
    fake.fail_next_on("/v1/checkout/sessions", 1, Failure::Status(400));
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "topup", "package": "credits_500"}),
    )
    .await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(r.code(), "stripe_error");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("400"), "{msg}");
    assert!(!msg.contains(fake.secret_key()), "{msg}");
    // The customer was created and kept; the next try succeeds with it.
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "topup", "package": "credits_500"}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(posts(&fake, "/v1/customers").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_stripe_does_not_know_is_a_502_naming_it() {
    let fake = FakeStripe::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The team plan names a price that was never created in Stripe.
    let d = TestDaemon::start_stripe(dir, &fake, |c| {
        c.stripe.checkout_success_url = Some(SUCCESS.into());
        c.stripe.checkout_cancel_url = Some(CANCEL.into());
        c.stripe.plans.get_mut("team").unwrap().stripe_price = Some("price_missing".into());
    })
    .await;
    let r = d
        .client
        .put_account("acct_np", json!({"plan": "free"}))
        .await;
    assert!(r.status < 300, "{:?}", r.body);
    let r = checkout(
        &d,
        "acct_np",
        json!({"kind": "subscription", "plan": "team", "seats": 2}),
    )
    .await;
    assert_eq!((r.status, r.code()), (502, "stripe_error"), "{:?}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("No such price: 'price_missing'"), "{msg}");
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    d.stop().await;
}

/// Issue 12: the top-up meterd's checkout recorded is credited when its session completes,
/// paid, for its price, to its account: end to end, from the checkout route to the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topup_made_by_checkout_is_credited_when_its_session_completes_paid() {
    let fake = FakeStripe::start().await;
    let d = start(&fake).await;
    d.client
        .put_account("acme", json!({"plan": "prepaid"}))
        .await;
    let r = checkout(
        &d,
        "acme",
        json!({"kind": "topup", "package": "credits_500"}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let session_id = r.body["session_id"].as_str().unwrap().to_owned();
    let s = &posts(&fake, "/v1/checkout/sessions")[0];
    let topup_id = param(s, "metadata[topup_id]").unwrap().to_owned();
    let customer = d.client.get_account("acme").await.body["stripe_customer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let completed = |event_id: &str, status: &str| {
        let path = crate::support::stripe_events_dir()
            .join("checkout.session.completed.payment_topup.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        v["id"] = json!(event_id);
        v["created"] = json!(meterd_actors::model::Clock::System.now_ms() / 1000);
        let o = &mut v["data"]["object"];
        o["id"] = json!(session_id);
        o["customer"] = json!(customer);
        o["client_reference_id"] = json!("acme");
        o["amount_total"] = json!(500);
        o["currency"] = json!("usd");
        o["payment_status"] = json!(status);
        o["metadata"] = json!({
            "type": "topup", "package": "credits_500", "credits": "500",
            "meterd_account_id": "acme", "topup_id": topup_id,
        });
        serde_json::to_vec(&v).unwrap()
    };
    let deliver = |body: Vec<u8>| {
        let client = d.client.clone();
        async move {
            let now = meterd_actors::model::Clock::System.now_ms() / 1000;
            let sig = crate::support::signer::sign(&body, crate::support::WEBHOOK_SECRET, now);
            let r = client
                .http
                .post(format!("{}/webhooks/stripe", client.base))
                .header("content-type", "application/json")
                .header("stripe-signature", sig)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // Not paid yet (an asynchronous payment method): nothing.
    deliver(completed("evt_pending", "unpaid")).await;
    // Paid: credited once, even when it arrives again under another event id.
    deliver(completed("evt_paid", "paid")).await;
    deliver(completed("evt_paid_again", "paid")).await;
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        let l = d
            .client
            .send(
                reqwest::Method::GET,
                "/v1/admin/webhooks",
                Some(ADMIN_KEY),
                None,
            )
            .await;
        l.body["pending"] == 0 && l.body["events"].as_array().is_some_and(|e| e.len() == 3)
    })
    .await;
    let a = d.client.get_account("acme").await;
    assert_eq!(a.body["credits"]["balance"], 500, "{:?}", a.body);
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
    d.stop().await;
}
