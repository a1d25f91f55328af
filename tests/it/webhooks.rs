//! Stripe webhooks end to end: signatures, the durable log, and the real event payloads of
//! `tests/fixtures/stripe/events/` applied to an account, in order, shuffled, and duplicated.

use std::path::PathBuf;
use std::time::Duration;

use meterd::config::Config;
use meterd_actors::model::{AccountId, Clock};
use serde_json::{Value, json};

use crate::support::fake_stripe::FakeStripe;
use crate::support::signer::{sign, sign_multi};
use crate::support::{
    ADMIN_KEY, APP_KEY, Client, Resp, TestDaemon, WEBHOOK_SECRET, eventually, secrets,
};

const TEAM: &str = "price_17NKaQm7Yc2Hd9anf59xSqfT";
const BUSINESS: &str = "price_1VXNVQm7Yc2Hd9aGYgZ9Chhu";
const METERED: &str = "price_1NSy3Qm7Yc2Hd9aTmEEY3Wmo";
const ACCOUNT: &str = "acct_acme";
const CUSTOMER: &str = "cus_FKNrXbjePvoq7c";
/// 2027-01-10: after the whole story, so no event's period contains "now".
const AFTER_STORY_MS: i64 = 1_799_539_200_000;

fn events_dir() -> PathBuf {
    crate::support::stripe_events_dir()
}

fn event(name: &str) -> Vec<u8> {
    std::fs::read(events_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every webhook delivery of the story, in the order Stripe created them: not `_world.json`,
/// and not the v2 thin event (it needs Stripe to fetch; see `a_thin_event_is_fetched...`).
fn story() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(i64, String, Vec<u8>)> = std::fs::read_dir(events_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && !n.starts_with('_') && !n.starts_with("billing.meter."))
        .map(|n| {
            let body = event(&n);
            let v: Value = serde_json::from_slice(&body).unwrap();
            let created = v["created"].as_i64().unwrap_or_else(|| {
                meterd_actors::model::parse_rfc3339(v["created"].as_str().unwrap()).unwrap() / 1000
            });
            (created, n, body)
        })
        .collect();
    out.sort();
    assert_eq!(
        out.len(),
        17,
        "every v1 delivery of tests/fixtures/stripe/events"
    );
    out.into_iter().map(|(_, n, b)| (n, b)).collect()
}

/// The shipped config with the story's prices on team and a business plan.
fn story_config(dir: &std::path::Path) -> Config {
    let mut text = include_str!("../../config.toml").to_owned();
    let team = "# stripe_price = \"price_...\"\n# stripe_metered_price = \"price_...\"";
    assert!(text.contains(team));
    text = text.replace(
        team,
        &format!("stripe_price = \"{TEAM}\"\nstripe_metered_price = \"{METERED}\""),
    );
    text.push_str(&format!(
        "\n[plans.business]\nkind = \"seat\"\nseat_price = 4000\nmin_seats = 1\nstripe_price = \"{BUSINESS}\"\nstripe_metered_price = \"{METERED}\"\nfeatures = [\"basic\", \"sso\"]\n[plans.business.meters.tokens]\noverage = \"unlimited\"\n"
    ));
    let mut c = Config::parse(&text, "story", dir).expect("story config");
    c.data_dir = dir.to_path_buf();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.webhooks.base_backoff = Duration::from_millis(20);
    c.webhooks.max_backoff = Duration::from_millis(200);
    c.webhooks.max_attempts = 50;
    c
}

/// The story's top-up session (`metadata.topup_id`), and the victim's of the money-in tests.
const STORY_TOPUP: &str = "tu_01JB8ZQ3K7M2V5X9C4N6P8R0T2";
const VICTIM_TOPUP: &str = "tu_victim_0001";

/// Records the top-ups meterd's own checkout would have recorded before creating their
/// sessions (the story's, and the victim's of the money-in tests), in a stopped data dir.
fn seed_pending_topups(dir: &std::path::Path) {
    use meterd_actors::store::{PendingTopUp, Store, StoreConfig, SyncMode};
    use std::os::unix::fs::PermissionsExt;
    // As the daemon makes its data dir: a store open to others is refused at start.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let store = Store::open(&StoreConfig {
        path: dir.to_path_buf(),
        sync: SyncMode::Flush,
        cache_capacity_bytes: 8 << 20,
    })
    .unwrap();
    for (id, account, customer) in [
        (STORY_TOPUP, ACCOUNT, CUSTOMER),
        (VICTIM_TOPUP, "victim", "cus_victim"),
    ] {
        let rec = PendingTopUp {
            account: account.into(),
            package: "credits_5000".into(),
            amount: 5000,
            currency: "usd".into(),
            customer: customer.into(),
            created_ms: 1_761_400_000_000,
        };
        store.put_pending_topup(id, &rec).unwrap();
    }
    store.close().unwrap();
}

async fn start(clock: Clock) -> TestDaemon {
    let dir = tempfile::tempdir().unwrap();
    seed_pending_topups(dir.path());
    let path = dir.path().to_path_buf();
    TestDaemon::start_full(dir, move |c| *c = story_config(&path), clock, secrets()).await
}

async fn post(client: &Client, body: &[u8], signature: Option<&str>) -> Resp {
    let mut req = client
        .http
        .post(format!("{}/webhooks/stripe", client.base))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("stripe-signature", s);
    }
    Resp::read(req.send().await.expect("request")).await
}

/// Posts `body` signed now (by the daemon's clock) with the test secret.
async fn deliver(d: &TestDaemon, clock: &Clock, body: &[u8]) -> Resp {
    let sig = sign(body, WEBHOOK_SECRET, clock.now_ms() / 1000);
    post(&d.client, body, Some(&sig)).await
}

async fn admin(client: &Client, path: &str) -> Resp {
    client
        .send(reqwest::Method::GET, path, Some(ADMIN_KEY), None)
        .await
}

async fn log(client: &Client, status: Option<&str>) -> Value {
    let q = status.map(|s| format!("?status={s}")).unwrap_or_default();
    let r = admin(client, &format!("/v1/admin/webhooks{q}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Waits until the log has nothing pending.
async fn settled(client: &Client) {
    eventually(Duration::from_secs(20), || async {
        log(client, None).await["pending"] == 0
    })
    .await;
}

/// The story's account, linked to the story's Stripe customer as meterd's own checkout would
/// have linked it before any session (top-ups are credited only to the customer's account).
async fn create_account(client: &Client) {
    let r = client
        .put_account(
            ACCOUNT,
            json!({"plan": "free", "stripe_customer_id": "cus_FKNrXbjePvoq7c"}),
        )
        .await;
    assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
}

async fn get(client: &Client, path: &str) -> Value {
    let r = client
        .send(reqwest::Method::GET, path, Some(APP_KEY), None)
        .await;
    assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    r.body
}

/// Everything Stripe's story decides about the account (not alerts, which say what was known
/// when each event arrived, nor times of application).
async fn state(client: &Client) -> Value {
    let a = get(client, &format!("/v1/accounts/{ACCOUNT}")).await;
    let mut tx = get(client, &format!("/v1/accounts/{ACCOUNT}/transactions")).await;
    for t in tx["transactions"].as_array_mut().unwrap() {
        t.as_object_mut().unwrap().remove("event_id");
    }
    let mut stripe = a["stripe"].clone();
    stripe.as_object_mut().unwrap().remove("events_applied");
    json!({
        "plan": a["plan"], "seats": a["seats"], "status": a["status"], "email": a["email"],
        "customer": a["stripe_customer_id"], "credits": a["credits"]["balance"],
        "period": a["period"], "stripe": stripe,
        "invoices": get(client, &format!("/v1/accounts/{ACCOUNT}/invoices")).await,
        "transactions": tx,
    })
}

#[tokio::test]
async fn forged_stale_malformed_and_oversized_deliveries_are_refused_and_change_nothing() {
    let clock = Clock::System;
    let d = start(clock.clone()).await;
    create_account(&d.client).await;
    let body = event("customer.subscription.created.json");
    let now = clock.now_ms() / 1000;

    let r = post(&d.client, &body, None).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "signature_missing"),
        "{:?}",
        r.body
    );

    let r = post(
        &d.client,
        &body,
        Some(&sign(&body, "whsec_someone_else_123456", now)),
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "signature_mismatch"));

    let mut tampered = body.clone();
    let at = tampered.iter().position(|b| *b == b'3').unwrap();
    tampered[at] = b'4';
    let r = post(
        &d.client,
        &tampered,
        Some(&sign(&body, WEBHOOK_SECRET, now)),
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "signature_mismatch"));

    // Signed at the event's own creation time: far outside the 300 s tolerance.
    let created = 1_790_845_203;
    let r = post(
        &d.client,
        &body,
        Some(&sign(&body, WEBHOOK_SECRET, created)),
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "signature_stale"));
    let r = post(
        &d.client,
        &body,
        Some(&sign(&body, WEBHOOK_SECRET, now + 3600)),
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "signature_stale"));

    for bad in ["t=abc,v1=00", "v1=deadbeef", "t=123", "garbage"] {
        let r = post(&d.client, &body, Some(bad)).await;
        assert_eq!((r.status, r.code()), (400, "signature_malformed"), "{bad}");
    }

    // Signed, but not a Stripe event.
    let junk = br#"{"hello":"world"}"#;
    let r = post(&d.client, junk, Some(&sign(junk, WEBHOOK_SECRET, now))).await;
    assert_eq!((r.status, r.code()), (400, "invalid_event"));

    let big = vec![b' '; 2 * 1024 * 1024];
    let r = post(&d.client, &big, Some(&sign(&big, WEBHOOK_SECRET, now))).await;
    assert_eq!((r.status, r.code()), (413, "payload_too_large"));

    let l = log(&d.client, None).await;
    assert_eq!(
        l["events"].as_array().unwrap().len(),
        0,
        "nothing logged: {l}"
    );
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["plan"], "free");
    assert!(a.get("stripe").is_none(), "{a}");
    d.stop().await;
}

#[tokio::test]
async fn without_a_secret_the_endpoint_answers_503_and_with_two_both_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = secrets();
    s.webhook_secrets.clear();
    let d = TestDaemon::start_full(dir, |_| {}, Clock::System, s).await;
    let body = event("customer.updated.json");
    let now = Clock::System.now_ms() / 1000;
    let r = post(&d.client, &body, Some(&sign(&body, WEBHOOK_SECRET, now))).await;
    assert_eq!((r.status, r.code()), (503, "webhook_not_configured"));
    let (status, ready) = d.client.get_noauth("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(ready["webhooks"], "not_configured", "{ready}");
    d.stop().await;

    // Rotation: the old and the new secret are both accepted.
    let dir = tempfile::tempdir().unwrap();
    let mut s = secrets();
    s.webhook_secrets = vec![
        "whsec_old_secret_0000000".into(),
        "whsec_new_secret_1111111".into(),
    ];
    let d = TestDaemon::start_full(dir, |_| {}, Clock::System, s).await;
    for (i, secret) in ["whsec_old_secret_0000000", "whsec_new_secret_1111111"]
        .iter()
        .enumerate()
    {
        let body =
            format!(r#"{{"id":"evt_rot_{i}","object":"event","type":"ping.test","created":1}}"#);
        let r = post(
            &d.client,
            body.as_bytes(),
            Some(&sign(body.as_bytes(), secret, now)),
        )
        .await;
        assert_eq!(r.status, 200, "{secret}: {:?}", r.body);
    }
    // Stripe's own rolling header: one v1 per secret, only the second one known here.
    let body = br#"{"id":"evt_rot_2","object":"event","type":"ping.test","created":1}"#;
    let h = sign_multi(
        body,
        &["whsec_retired_99999999", "whsec_new_secret_1111111"],
        now,
    );
    assert_eq!(post(&d.client, body, Some(&h)).await.status, 200);
    settled(&d.client).await;
    let l = log(&d.client, Some("ignored")).await;
    assert_eq!(l["events"].as_array().unwrap().len(), 3, "{l}");
    let (_, ready) = d.client.get_noauth("/readyz").await;
    assert_eq!(
        (
            ready["webhooks"].as_str(),
            ready["webhooks_pending"].as_u64()
        ),
        (Some("configured"), Some(0)),
        "{ready}"
    );
    d.stop().await;
}

#[tokio::test]
async fn the_story_in_order_applies_every_event_once() {
    let clock = Clock::manual(AFTER_STORY_MS);
    let d = start(clock.clone()).await;
    create_account(&d.client).await;
    let mut seen_seats = Vec::new();
    let mut seen_plans = Vec::new();
    for (name, body) in story() {
        let r = deliver(&d, &clock, &body).await;
        assert_eq!(r.status, 200, "{name}: {:?}", r.body);
        assert_eq!(r.body["duplicate"], false, "{name}");
        settled(&d.client).await;
        let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
        seen_seats.push(a["seats"].as_u64().unwrap());
        seen_plans.push(a["plan"].as_str().unwrap().to_owned());
    }
    // Team with 3 seats, then 5 seats, then Business, then back to free when deleted.
    assert!(seen_plans.contains(&"team".to_owned()), "{seen_plans:?}");
    assert!(
        seen_plans.contains(&"business".to_owned()),
        "{seen_plans:?}"
    );
    assert!(
        seen_seats.contains(&3) && seen_seats.contains(&5),
        "{seen_seats:?}"
    );

    let l = log(&d.client, None).await;
    assert_eq!(l["failed"], 0, "{l}");
    assert_eq!(l["pending"], 0, "{l}");
    assert_eq!(
        l["applied"].as_u64().unwrap() + l["ignored"].as_u64().unwrap(),
        17,
        "{l}"
    );
    let s = state(&d.client).await;
    assert_eq!(s["plan"], "free", "{s}");
    assert_eq!(s["status"], "active");
    assert_eq!(s["customer"], CUSTOMER);
    assert_eq!(s["email"], "billing@acme-analytics.example");
    assert_eq!(s["credits"], 5000, "the top-up credits once: {s}");
    assert_eq!(
        s["stripe"]["features"],
        json!(["api_access", "priority_support", "sso"])
    );
    assert_eq!(
        s["stripe"]["payment_methods"],
        json!(["pm_12ecyQm7Yc2Hd9aEE1udP2eD"])
    );
    assert_eq!(s["stripe"]["delinquent"], true);
    assert_eq!(s["stripe"]["subscription"]["status"], "canceled");
    let tx = s["transactions"]["transactions"].as_array().unwrap();
    let kinds: Vec<(&str, i64)> = tx
        .iter()
        .map(|t| (t["kind"].as_str().unwrap(), t["amount"].as_i64().unwrap()))
        .collect();
    assert_eq!(kinds, vec![("topup", 5000), ("payment", 6000)], "{tx:?}");
    let inv = &s["invoices"];
    let paid = inv["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "in_1uT6WQm7Yc2Hd9aWLKTIIYeP")
        .expect("the paid invoice");
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["amount_paid"], 6000);
    assert_eq!(inv["upcoming"]["metered_amount"], 25000, "{inv}");

    // Alerts: the trial's end, the failed payment, metered charges due.
    let alerts = get(&d.client, &format!("/v1/accounts/{ACCOUNT}/alerts")).await;
    let kinds: Vec<&str> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    for k in ["trial_ending", "payment_failed", "invoice_due"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    assert!(
        !kinds.contains(&"payment_method_removed"),
        "a new card was added first: {kinds:?}"
    );

    // Every event again: all duplicates, nothing changes.
    let before = state(&d.client).await;
    let ledger_before = d.client.ledger(ACCOUNT).await.len();
    for (name, body) in story() {
        let r = deliver(&d, &clock, &body).await;
        assert_eq!(
            (r.status, r.body["duplicate"].clone()),
            (200, json!(true)),
            "{name}"
        );
    }
    settled(&d.client).await;
    assert_eq!(state(&d.client).await, before);
    assert_eq!(d.client.ledger(ACCOUNT).await.len(), ledger_before);
    d.stop().await;
}

/// A small deterministic shuffle (no rand dependency in tests).
fn shuffled<T>(mut v: Vec<T>, mut seed: u64) -> Vec<T> {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = usize::try_from((seed >> 33) % (i as u64 + 1)).unwrap();
        v.swap(i, j);
    }
    v
}

#[tokio::test]
async fn the_story_shuffled_ends_in_the_same_state_as_in_order() {
    let clock = Clock::manual(AFTER_STORY_MS);
    let d = start(clock.clone()).await;
    create_account(&d.client).await;
    for (_, body) in story() {
        assert_eq!(deliver(&d, &clock, &body).await.status, 200);
    }
    settled(&d.client).await;
    let expected = state(&d.client).await;
    d.stop().await;

    for seed in [1u64, 7, 42] {
        let d = start(clock.clone()).await;
        create_account(&d.client).await;
        let order = shuffled(story(), seed);
        for (_, body) in &order {
            assert_eq!(deliver(&d, &clock, body).await.status, 200);
        }
        settled(&d.client).await;
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(state(&d.client).await, expected, "seed {seed}: {names:?}");
        d.stop().await;
    }
}

#[tokio::test]
async fn a_late_created_never_undoes_an_update_and_a_late_update_never_resurrects() {
    let clock = Clock::manual(AFTER_STORY_MS);
    let d = start(clock.clone()).await;
    create_account(&d.client).await;
    deliver(
        &d,
        &clock,
        &event("customer.subscription.updated.seat_change.json"),
    )
    .await;
    settled(&d.client).await;
    deliver(&d, &clock, &event("customer.subscription.created.json")).await;
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(
        (a["plan"].as_str(), a["seats"].as_u64()),
        (Some("team"), Some(5)),
        "{a}"
    );
    let ledger = d.client.ledger(ACCOUNT).await;
    let stale = ledger
        .iter()
        .filter(|e| e["kind"] == "stripe" && e["decision"] == "stale")
        .count();
    assert_eq!(stale, 1, "the late created is recorded as stale");

    deliver(&d, &clock, &event("customer.subscription.deleted.json")).await;
    settled(&d.client).await;
    deliver(
        &d,
        &clock,
        &event("customer.subscription.updated.plan_change.json"),
    )
    .await;
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["plan"], "free", "{a}");
    assert_eq!(a["stripe"]["subscription"]["status"], "canceled");
    d.stop().await;
}

#[tokio::test]
async fn a_topup_delivered_five_times_at_once_credits_once() {
    let clock = Clock::System;
    let d = start(clock.clone()).await;
    create_account(&d.client).await;
    let body = event("checkout.session.completed.payment_topup.json");
    let sig = sign(&body, WEBHOOK_SECRET, clock.now_ms() / 1000);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let (client, body, sig) = (d.client.clone(), body.clone(), sig.clone());
        tasks.spawn(async move { post(&client, &body, Some(&sig)).await });
    }
    let answers: Vec<Resp> = tasks.join_all().await;
    assert!(answers.iter().all(|r| r.status == 200), "all acknowledged");
    let fresh = answers
        .iter()
        .filter(|r| r.body["duplicate"] == false)
        .count();
    assert_eq!(fresh, 1, "one delivery is new, four are duplicates");
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["credits"]["balance"], 5000, "{a}");
    let tx = get(&d.client, &format!("/v1/accounts/{ACCOUNT}/transactions")).await;
    assert_eq!(tx["transactions"].as_array().unwrap().len(), 1, "{tx}");
    // The same session arriving as a new event id (Stripe resends as a new event only in a
    // backfill) still credits once: the session id is the top-up's key.
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    v["id"] = json!("evt_other_delivery_of_the_same_session");
    let again = serde_json::to_vec(&v).unwrap();
    assert_eq!(deliver(&d, &clock, &again).await.status, 200);
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["credits"]["balance"], 5000, "{a}");
    d.stop().await;
}

#[tokio::test]
async fn a_subscription_period_that_contains_now_starts_a_new_period_and_resets_usage() {
    // 2026-10-02, inside the trial period 10-01 09:00 .. 10-15 09:00 of the created event.
    let clock = Clock::manual(1_790_931_600_000);
    let d = start(clock.clone()).await;
    let r = d
        .client
        .put_account(ACCOUNT, json!({"plan": "team", "seats": 2}))
        .await;
    assert!(r.status < 300, "{:?}", r.body);
    assert_eq!(d.client.consume(ACCOUNT, 10, "k1").await.status, 200);
    let before = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(before["meters"]["tokens"]["used"], 10);
    deliver(&d, &clock, &event("customer.subscription.created.json")).await;
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["period"]["start"], "2026-10-01T09:00:00.000Z", "{a}");
    assert_eq!(a["period"]["end"], "2026-10-15T09:00:00.000Z");
    assert_eq!(
        a["meters"]["tokens"]["used"], 0,
        "a new period resets counters"
    );
    assert_eq!(
        (a["seats"].as_u64(), a["status"].as_str()),
        (Some(3), Some("trialing"))
    );
    d.stop().await;
}

#[tokio::test]
async fn a_failing_event_retries_without_blocking_others_and_can_be_replayed() {
    let clock = Clock::System;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let d = TestDaemon::start_full(
        dir,
        move |c| {
            *c = story_config(&path);
            c.webhooks.max_attempts = 3;
        },
        clock.clone(),
        secrets(),
    )
    .await;
    // No account is linked to the customer yet: the event fails after 3 attempts.
    let paid = event("payment_method.attached.json");
    assert_eq!(deliver(&d, &clock, &paid).await.status, 200);
    // Meanwhile another account's event applies.
    let r = d.client.put_account(ACCOUNT, json!({"plan": "free"})).await;
    assert!(r.status < 300);
    let r = d
        .client
        .put_account("acct_other", json!({"plan": "free"}))
        .await;
    assert!(r.status < 300);
    let mut v: Value =
        serde_json::from_slice(&event("checkout.session.completed.subscription.json")).unwrap();
    v["data"]["object"]["client_reference_id"] = json!("acct_other");
    v["data"]["object"]["customer"] = json!("cus_other");
    let other = serde_json::to_vec(&v).unwrap();
    assert_eq!(deliver(&d, &clock, &other).await.status, 200);
    eventually(Duration::from_secs(20), || async {
        log(&d.client, Some("failed")).await["events"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    let failed = log(&d.client, Some("failed")).await;
    let f = &failed["events"][0];
    let paid_id: Value = serde_json::from_slice(&paid).unwrap();
    assert_eq!(f["id"], paid_id["id"]);
    assert_eq!(f["attempts"], 3, "{f}");
    assert!(
        f["last_error"]
            .as_str()
            .unwrap()
            .contains("no account is linked"),
        "{f}"
    );
    let a = get(&d.client, "/v1/accounts/acct_other").await;
    assert_eq!(
        a["stripe_customer_id"], "cus_other",
        "the other event applied"
    );

    // Link the customer, replay: applied.
    let r = d
        .client
        .put_account(ACCOUNT, json!({"stripe_customer_id": CUSTOMER}))
        .await;
    assert!(r.status < 300, "{:?}", r.body);
    let id = f["id"].as_str().unwrap().to_owned();
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            &format!("/v1/admin/webhooks/{id}/replay"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(
        a["stripe"]["payment_methods"],
        json!(["pm_12ecyQm7Yc2Hd9aEE1udP2eD"]),
        "{a}"
    );
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/admin/webhooks/evt_nope/replay",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            "/v1/admin/webhooks",
            Some(APP_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 403, "admin only");
    d.stop().await;
}

#[tokio::test]
async fn logged_events_survive_a_restart_and_are_applied_after_it() {
    let clock = Clock::System;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let d = TestDaemon::start_full(
        dir,
        move |c| *c = story_config(&path),
        clock.clone(),
        secrets(),
    )
    .await;
    // Customer not linked: the event stays pending (retrying) across the restart.
    let body = event("customer.updated.json");
    assert_eq!(deliver(&d, &clock, &body).await.status, 200);
    let dir = d.stop().await;
    let path = dir.path().to_path_buf();
    let d = TestDaemon::start_full(
        dir,
        move |c| *c = story_config(&path),
        clock.clone(),
        secrets(),
    )
    .await;
    let r = d
        .client
        .put_account(
            ACCOUNT,
            json!({"plan": "free", "stripe_customer_id": CUSTOMER}),
        )
        .await;
    assert!(r.status < 300, "{:?}", r.body);
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["email"], "billing@acme-analytics.example", "{a}");
    // A redelivery after the restart is a duplicate.
    let r = deliver(&d, &clock, &body).await;
    assert_eq!(r.body["duplicate"], true);
    d.stop().await;
}

/// The story's config on a daemon already pointed at a fake Stripe (keeps its Stripe
/// settings).
fn story_on_fake(c: &mut Config) {
    let keep = c.stripe.clone();
    *c = story_config(&c.data_dir.clone());
    c.stripe.api_base = keep.api_base;
    c.stripe.poll = keep.poll;
    c.stripe.timeout = keep.timeout;
    c.stripe.base_backoff = keep.base_backoff;
    c.stripe.max_backoff = keep.max_backoff;
    c.stripe.calls_per_second = keep.calls_per_second;
}

#[tokio::test]
async fn a_thin_event_is_fetched_from_stripe_and_alerts_the_accounts_it_names() {
    let fake = FakeStripe::start().await;
    let fetched: Value =
        serde_json::from_slice(&event("billing.meter.error_report_triggered.fetched.json"))
            .unwrap();
    fake.add_v2_event(fetched.clone());
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, story_on_fake).await;
    create_account(&d.client).await;
    let clock = Clock::System;
    let thin = event("billing.meter.error_report_triggered.json");
    let r = deliver(&d, &clock, &thin).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    settled(&d.client).await;
    let id = fetched["id"].as_str().unwrap();
    let gets: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|q| q.method == "GET" && q.path == format!("/v2/core/events/{id}"))
        .collect();
    assert_eq!(gets.len(), 1, "fetched once");
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    let applied = log(&d.client, Some("applied")).await;
    let outcome = applied["events"][0]["outcome"].as_str().unwrap().to_owned();
    // acct_acme is named by one sample; acct_gone does not exist here.
    assert!(outcome.contains("acct_acme: applied"), "{outcome}");
    assert!(outcome.contains("acct_gone: unknown account"), "{outcome}");
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["stripe"]["meter_errors"], 1, "{a}");
    // The outbox records it names are marked, for every account named.
    let r = admin(&d.client, "/v1/admin/meter-errors").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let marked: Vec<(String, u64, String)> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["account_id"].as_str().unwrap().to_owned(),
                e["ledger_seq"].as_u64().unwrap(),
                e["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        marked,
        vec![
            ("acct_acme".into(), 4410, "timestamp_too_far_in_past".into()),
            (
                "acct_gone".into(),
                731,
                "meter_event_customer_not_found".into()
            ),
            (
                "acct_gone".into(),
                732,
                "meter_event_customer_not_found".into()
            ),
        ]
    );
    let alerts = get(&d.client, &format!("/v1/accounts/{ACCOUNT}/alerts")).await;
    assert!(
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["kind"] == "meter_errors"),
        "{alerts}"
    );
    d.stop().await;
}

#[tokio::test]
async fn an_error_report_naming_a_hashed_identifier_reaches_its_long_account() {
    let fake = FakeStripe::start().await;
    // An account id too long for `{account}:{seq}` in Stripe's 100 characters: meterd sends
    // `h{40 hex}:{seq}` for it, and the report names that.
    let long = format!("org.example.{}", "w".repeat(100));
    let hashed = meterd_actors::identifier::hashed(&AccountId::parse(&long).unwrap());
    let mut fetched: Value =
        serde_json::from_slice(&event("billing.meter.error_report_triggered.fetched.json"))
            .unwrap();
    fetched["id"] = json!("evt_test_hashed_1");
    fetched["data"]["reason"]["error_types"] = json!([{
        "code": "meter_event_customer_not_found",
        "error_count": 2,
        "sample_errors": [
            {"error_message": "No customer.", "request": {"identifier": format!("{hashed}:7")}},
            {"error_message": "No customer.", "request": {"identifier": format!("{hashed}:9-12")}}
        ]
    }]);
    fake.add_v2_event(fetched.clone());
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, story_on_fake).await;
    let r = d.client.put_account(&long, json!({"plan": "free"})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let mut thin: Value =
        serde_json::from_slice(&event("billing.meter.error_report_triggered.json")).unwrap();
    thin["id"] = json!("evt_test_hashed_1");
    let body = serde_json::to_vec(&thin).unwrap();
    let r = deliver(&d, &Clock::System, &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    settled(&d.client).await;
    let applied = log(&d.client, Some("applied")).await;
    let outcome = applied["events"][0]["outcome"].as_str().unwrap().to_owned();
    assert!(outcome.contains(&format!("{long}: applied")), "{outcome}");
    let r = admin(&d.client, "/v1/admin/meter-errors").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let marked: Vec<(String, u64)> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["account_id"].as_str().unwrap().to_owned(),
                e["ledger_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(marked, vec![(long.clone(), 7), (long.clone(), 9)]);
    let a = get(&d.client, &format!("/v1/accounts/{long}")).await;
    assert_eq!(a["stripe"]["meter_errors"], 2, "{a}");
    d.stop().await;
}

#[tokio::test]
async fn backfill_at_start_and_on_demand_logs_the_undelivered_events_the_log_lacks() {
    let fake = FakeStripe::start().await;
    let now_s = Clock::System.now_ms() / 1000;
    let mut sub: Value =
        serde_json::from_slice(&event("customer.subscription.created.json")).unwrap();
    sub["created"] = json!(now_s - 3600);
    let mut topup: Value =
        serde_json::from_slice(&event("checkout.session.completed.payment_topup.json")).unwrap();
    topup["created"] = json!(now_s - 7200);
    fake.add_event_undelivered(sub.clone());
    fake.add_event_undelivered(topup);
    // Older than the 30 days, or delivered: not listed, not logged.
    let mut old: Value = serde_json::from_slice(&event("invoice.paid.json")).unwrap();
    old["created"] = json!(now_s - 40 * 86_400);
    fake.add_event_undelivered(old);
    let mut ok: Value = serde_json::from_slice(&event("customer.updated.json")).unwrap();
    ok["created"] = json!(now_s - 60);
    fake.add_event(ok);

    // The account exists before meterd starts, so the backfilled events can apply at once.
    let dir = tempfile::tempdir().unwrap();
    seed_pending_topups(dir.path());
    let d = TestDaemon::start_in(dir, |_| {}, Clock::System).await;
    create_account(&d.client).await;
    let dir = d.stop().await;
    let d = TestDaemon::start_stripe(dir, &fake, story_on_fake).await;
    eventually(Duration::from_secs(20), || async {
        let l = log(&d.client, None).await;
        l["applied"] == 2 && l["pending"] == 0
    })
    .await;
    let l = log(&d.client, None).await;
    assert!(
        l["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["source"] == "backfill"),
        "{l}"
    );
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(
        a["credits"]["balance"], 5000,
        "the missed top-up applied: {a}"
    );
    assert_eq!(a["plan"], "team", "{a}");

    // Stripe's late delivery of a backfilled event is a duplicate; a second backfill logs
    // nothing new.
    let body = serde_json::to_vec(&sub).unwrap();
    let r = deliver(&d, &Clock::System, &body).await;
    assert_eq!((r.status, r.body["duplicate"].clone()), (200, json!(true)));
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            "/v1/admin/webhooks/backfill",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (r.body["listed"].as_u64(), r.body["logged"].as_u64()),
        (Some(2), Some(0))
    );
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    d.stop().await;
}

#[tokio::test]
async fn with_refetch_the_subscription_is_read_from_stripe_before_it_is_applied() {
    let fake = FakeStripe::start().await;
    let ev: Value =
        serde_json::from_slice(&event("customer.subscription.updated.seat_change.json")).unwrap();
    // Stripe's current state is newer than the event: 7 seats.
    let mut fresh = ev["data"]["object"].clone();
    fresh["items"]["data"][0]["quantity"] = json!(7);
    fake.put_subscription(fresh);
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |c| {
        story_on_fake(c);
        c.stripe.refetch_on_webhook = true;
    })
    .await;
    create_account(&d.client).await;
    let body = serde_json::to_vec(&ev).unwrap();
    assert_eq!(deliver(&d, &Clock::System, &body).await.status, 200);
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(
        a["seats"], 7,
        "the fresh read wins over the event's snapshot: {a}"
    );
    let sub = ev["data"]["object"]["id"].as_str().unwrap();
    assert!(
        fake.requests()
            .iter()
            .any(|q| q.method == "GET" && q.path == format!("/v1/subscriptions/{sub}")),
        "refetched"
    );
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    d.stop().await;
}

#[tokio::test]
async fn an_event_about_an_older_subscription_never_takes_the_account_from_a_newer_one() {
    let clock = Clock::manual(AFTER_STORY_MS);
    let d = start(clock.clone()).await;
    create_account(&d.client).await;
    // B: a newer subscription on the business price.
    let mut b: Value =
        serde_json::from_slice(&event("customer.subscription.created.json")).unwrap();
    b["id"] = json!("evt_sub_b_created");
    b["created"] = json!(1_791_000_000);
    b["data"]["object"]["id"] = json!("sub_B");
    b["data"]["object"]["created"] = json!(1_791_000_000);
    b["data"]["object"]["status"] = json!("active");
    b["data"]["object"]["items"]["data"][0]["price"]["id"] = json!(BUSINESS);
    deliver(&d, &clock, &serde_json::to_vec(&b).unwrap()).await;
    settled(&d.client).await;
    // A (created earlier) is updated later, then deleted: neither moves the account.
    deliver(
        &d,
        &clock,
        &event("customer.subscription.updated.seat_change.json"),
    )
    .await;
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(
        (a["plan"].as_str(), a["seats"].as_u64()),
        (Some("business"), Some(3)),
        "{a}"
    );
    deliver(&d, &clock, &event("customer.subscription.deleted.json")).await;
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["plan"], "business", "B is still live: {a}");
    assert_eq!(a["stripe"]["subscription"]["id"], "sub_B");
    assert_eq!(
        a["stripe"]["ended_subscriptions"],
        json!(["sub_19CmkQm7Yc2Hd9a4h82vBTOD"])
    );
    // Now B ends: the account falls back.
    let mut bd: Value =
        serde_json::from_slice(&event("customer.subscription.deleted.json")).unwrap();
    bd["id"] = json!("evt_sub_b_deleted");
    bd["data"]["object"]["id"] = json!("sub_B");
    deliver(&d, &clock, &serde_json::to_vec(&bd).unwrap()).await;
    settled(&d.client).await;
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["plan"], "free", "{a}");
    d.stop().await;
}

fn charge_refunded(event_id: &str, created: i64, refunded: i64) -> Vec<u8> {
    let fixtures = crate::support::stripe_fixtures_dir().join("fixtures3.latest.json");
    let f: Value = serde_json::from_slice(&std::fs::read(fixtures).unwrap()).unwrap();
    let mut charge = f["resources"]["charge"].clone();
    charge["customer"] = json!(CUSTOMER);
    charge["amount"] = json!(6000);
    charge["amount_refunded"] = json!(refunded);
    charge["refunded"] = json!(refunded == 6000);
    charge["payment_intent"] = json!("pi_test_refund");
    serde_json::to_vec(&json!({
        "id": event_id, "object": "event", "api_version": "2026-09-30.endive",
        "created": created, "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": "charge.refunded", "data": {"object": charge}
    }))
    .unwrap()
}

#[tokio::test]
async fn refunds_are_transactions_and_a_later_refund_total_wins() {
    let clock = Clock::System;
    let d = start(clock.clone()).await;
    let r = d
        .client
        .put_account(
            ACCOUNT,
            json!({"plan": "free", "stripe_customer_id": CUSTOMER}),
        )
        .await;
    assert!(r.status < 300, "{:?}", r.body);
    // A full refund after a partial one, delivered in reverse order.
    deliver(
        &d,
        &clock,
        &charge_refunded("evt_refund_2", 1_793_000_100, 6000),
    )
    .await;
    deliver(
        &d,
        &clock,
        &charge_refunded("evt_refund_1", 1_793_000_000, 1500),
    )
    .await;
    settled(&d.client).await;
    let tx = get(&d.client, &format!("/v1/accounts/{ACCOUNT}/transactions")).await;
    let list = tx["transactions"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{tx}");
    assert_eq!(
        (list[0]["kind"].as_str(), list[0]["amount"].as_i64()),
        (Some("refund"), Some(6000)),
        "{tx}"
    );
    assert_eq!(list[0]["reference"], "pi_test_refund");
    d.stop().await;
}

/// A signed event (as from any integration or Payment Link on the same Stripe account), with
/// `edit` applied to the story's event `name`, under a fresh event id.
fn forged(name: &str, id: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&event(name)).unwrap();
    v["id"] = json!(id);
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// The outcome meterd recorded for event `id` in its log.
async fn outcome_of(client: &Client, id: &str) -> String {
    let l = log(client, None).await;
    l["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .map(|e| format!("{} {}", e["status"], e["outcome"]))
        .unwrap_or_else(|| panic!("{id} not logged: {l}"))
}

/// Issue 12: each money-in attack credits nothing and re-links nothing, and says why.
#[tokio::test]
async fn money_in_attacks_credit_nothing_and_relink_nothing() {
    let clock = Clock::System;
    let d = start(clock.clone()).await;
    let c = &d.client;
    // The victim has a customer of its own; the attacker pays as another customer.
    for (id, customer) in [("victim", "cus_victim"), ("attacker", "cus_attacker")] {
        let r = c
            .put_account(id, json!({"plan": "free", "stripe_customer_id": customer}))
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    let r = c.put_account("bare", json!({"plan": "free"})).await;
    assert_eq!(r.status, 201);
    let topup = "checkout.session.completed.payment_topup.json";
    let aim = |v: &mut Value, account: &str, customer: Value| {
        let o = &mut v["data"]["object"];
        o["client_reference_id"] = json!(account);
        o["metadata"]["meterd_account_id"] = json!(account);
        o["metadata"]["topup_id"] = json!(VICTIM_TOPUP);
        o["customer"] = customer;
        o["id"] = json!(format!("cs_forged_{account}_{}", o["amount_total"]));
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // The issue's own: nothing paid, yen, a session meterd never made, the victim named.
        (
            "evt_free",
            forged(topup, "evt_free", |v| {
                aim(v, "victim", json!("cus_attacker"));
                let o = &mut v["data"]["object"];
                o["payment_status"] = json!("no_payment_required");
                o["amount_total"] = json!(0);
                o["currency"] = json!("jpy");
                o["metadata"]["package"] = json!("credits_10000");
            }),
            "not paid",
        ),
        // Paid, but by another customer than the victim's.
        (
            "evt_other_customer",
            forged(topup, "evt_other_customer", |v| {
                aim(v, "victim", json!("cus_attacker"))
            }),
            "customer_mismatch",
        ),
        // The victim's customer, but less money than the package costs.
        (
            "evt_cheap",
            forged(topup, "evt_cheap", |v| {
                aim(v, "victim", json!("cus_victim"));
                v["data"]["object"]["amount_total"] = json!(1);
            }),
            "amount_mismatch",
        ),
        // The right amount in another currency.
        (
            "evt_yen",
            forged(topup, "evt_yen", |v| {
                aim(v, "victim", json!("cus_victim"));
                v["data"]["object"]["currency"] = json!("jpy");
            }),
            "amount_mismatch",
        ),
        // A session meterd never made (another integration, a Payment Link), for the
        // victim's own customer and the right price: still not credited.
        (
            "evt_not_ours",
            forged(topup, "evt_not_ours", |v| {
                aim(v, "victim", json!("cus_victim"));
                v["data"]["object"]["metadata"]["topup_id"] = json!("tu_someone_elses");
            }),
            "not_ours",
        ),
        // meterd's session for the victim, replayed against another account.
        (
            "evt_bare",
            forged(topup, "evt_bare", |v| aim(v, "bare", json!("cus_stranger"))),
            "not_ours",
        ),
        // meterd's session, another package claimed in its metadata.
        (
            "evt_package",
            forged(topup, "evt_package", |v| {
                aim(v, "victim", json!("cus_victim"));
                v["data"]["object"]["metadata"]["package"] = json!("credits_10000");
            }),
            "package_mismatch",
        ),
        // A subscription checkout naming the victim with the attacker's customer: no re-link.
        (
            "evt_relink",
            forged(
                "checkout.session.completed.subscription.json",
                "evt_relink",
                |v| {
                    let o = &mut v["data"]["object"];
                    o["client_reference_id"] = json!("victim");
                    o["customer"] = json!("cus_attacker");
                },
            ),
            "customer_mismatch",
        ),
        // The same for an account without a customer: the attacker's customer is taken.
        (
            "evt_take",
            forged(
                "checkout.session.completed.subscription.json",
                "evt_take",
                |v| {
                    let o = &mut v["data"]["object"];
                    o["client_reference_id"] = json!("bare");
                    o["customer"] = json!("cus_attacker");
                },
            ),
            "customer_in_use",
        ),
    ];
    for (id, body, _) in &cases {
        assert_eq!(deliver(&d, &clock, body).await.status, 200, "{id}");
    }
    settled(c).await;
    for (id, _, why) in &cases {
        let o = outcome_of(c, id).await;
        assert!(o.contains(why), "{id}: {o}");
    }
    for (id, customer) in [
        ("victim", json!("cus_victim")),
        ("attacker", json!("cus_attacker")),
        ("bare", Value::Null),
    ] {
        let a = get(c, &format!("/v1/accounts/{id}")).await;
        assert_eq!(a["credits"]["balance"], 0, "{id}: {a}");
        assert_eq!(a["stripe_customer_id"], customer, "{id}: {a}");
        assert_eq!(a["plan"], "free", "{id}: {a}");
    }
    // Each refusal raised an alert on the account it named, with its code.
    let alerts = get(c, "/v1/accounts/victim/alerts").await;
    let mut codes: Vec<String> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "money_refused")
        .map(|a| {
            let m = a["meter"].as_str().unwrap_or_default();
            m.split(' ').next().unwrap_or_default().to_owned()
        })
        .collect();
    codes.sort();
    codes.dedup();
    assert!(
        codes.contains(&"not_ours".to_owned()) && codes.contains(&"customer_mismatch".to_owned()),
        "{alerts}"
    );
    // The real top-up, the victim's customer paying the package's price: credited.
    let real = forged(topup, "evt_real", |v| aim(v, "victim", json!("cus_victim")));
    assert_eq!(deliver(&d, &clock, &real).await.status, 200);
    settled(c).await;
    let a = get(c, "/v1/accounts/victim").await;
    assert_eq!(a["credits"]["balance"], 5000, "{a}");
    d.stop().await;
}

/// Issue 12: a customer belongs to one account; moving an account to another customer frees
/// the old one.
#[tokio::test]
async fn a_customer_linked_to_one_account_cannot_be_linked_to_another() {
    let d = start(Clock::System).await;
    let c = &d.client;
    let r = c
        .put_account(
            "a",
            json!({"plan": "free", "stripe_customer_id": "cus_one"}),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = c
        .put_account(
            "b",
            json!({"plan": "free", "stripe_customer_id": "cus_one"}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (409, "customer_in_use"),
        "{:?}",
        r.body
    );
    // Nothing was created by the refusal.
    assert_eq!(c.get_account("b").await.status, 404);
    let r = c.put_account("b", json!({"plan": "free"})).await;
    assert_eq!(r.status, 201);
    let r = c
        .put_account("b", json!({"stripe_customer_id": "cus_one"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (409, "customer_in_use"),
        "{:?}",
        r.body
    );
    // `a` moves to another customer: `cus_one` is free for `b`.
    let r = c
        .put_account("a", json!({"stripe_customer_id": "cus_two"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .put_account("b", json!({"stripe_customer_id": "cus_one"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        c.get_account("b").await.body["stripe_customer_id"],
        "cus_one"
    );
    d.stop().await;
}

/// Issue 12: a subscription whose prices are no configured plan's changes nothing, nor does
/// its deletion: the account keeps the plan its real subscription gives it.
#[tokio::test]
async fn a_subscription_of_unknown_prices_and_its_deletion_change_nothing() {
    let clock = Clock::System;
    let d = start(clock.clone()).await;
    create_account(&d.client).await;
    let created = event("customer.subscription.created.json");
    assert_eq!(deliver(&d, &clock, &created).await.status, 200);
    settled(&d.client).await;
    let before = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(before["plan"], "team", "{before}");
    for (id, name) in [
        ("evt_foreign_created", "customer.subscription.created.json"),
        ("evt_foreign_deleted", "customer.subscription.deleted.json"),
    ] {
        let body = forged(name, id, |v| {
            let o = &mut v["data"]["object"];
            o["id"] = json!("sub_not_meterds");
            for item in o["items"]["data"].as_array_mut().unwrap() {
                item["price"]["id"] = json!("price_of_another_product");
                item["plan"]["id"] = json!("price_of_another_product");
            }
        });
        assert_eq!(deliver(&d, &clock, &body).await.status, 200);
    }
    settled(&d.client).await;
    for id in ["evt_foreign_created", "evt_foreign_deleted"] {
        let o = outcome_of(&d.client, id).await;
        assert!(o.contains("unknown_prices"), "{id}: {o}");
    }
    let after = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(after["plan"], before["plan"]);
    assert_eq!(after["status"], before["status"]);
    assert_eq!(
        after["stripe"]["subscription"]["id"],
        before["stripe"]["subscription"]["id"]
    );
    d.stop().await;
}

/// The story's top-up was paid by this payment intent.
const TOPUP_PAYMENT: &str = "pi_1An1OQm7Yc2Hd9adc97aANGy";

/// `charge.refunded` for the story's top-up (5000 usd paid): `refunded` in total so far.
fn topup_refunded(event_id: &str, created: i64, refunded: i64) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&charge_refunded(event_id, created, refunded))
        .expect("charge event");
    let charge = &mut v["data"]["object"];
    charge["amount"] = json!(5000);
    charge["refunded"] = json!(refunded == 5000);
    charge["payment_intent"] = json!(TOPUP_PAYMENT);
    serde_json::to_vec(&v).unwrap()
}

/// Stripe's dispute fixture as `charge.dispute.<kind>` of dispute `id` on `payment`.
fn dispute_event(event_id: &str, kind: &str, id: &str, payment: &str, status: &str) -> Vec<u8> {
    let fixtures = crate::support::stripe_fixtures_dir().join("fixtures3.latest.json");
    let f: Value = serde_json::from_slice(&std::fs::read(fixtures).unwrap()).unwrap();
    let mut d = f["resources"]["dispute"].clone();
    d["id"] = json!(id);
    d["payment_intent"] = json!(payment);
    d["amount"] = json!(5000);
    d["status"] = json!(status);
    serde_json::to_vec(&json!({
        "id": event_id, "object": "event", "api_version": "2026-09-30.endive",
        "created": Clock::System.now_ms() / 1000, "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": format!("charge.dispute.{kind}"), "data": {"object": d}
    }))
    .unwrap()
}

/// The story's account on the prepaid plan, credited the story's top-up (5000 credits).
async fn prepaid_with_topup(d: &TestDaemon, clock: &Clock) {
    let r = d
        .client
        .put_account(
            ACCOUNT,
            json!({"plan": "prepaid", "stripe_customer_id": CUSTOMER}),
        )
        .await;
    assert!(r.status < 300, "{:?}", r.body);
    deliver(
        d,
        clock,
        &event("checkout.session.completed.payment_topup.json"),
    )
    .await;
    settled(&d.client).await;
    assert_eq!(credits(&d.client).await["balance"], 5000);
}

async fn credits(client: &Client) -> Value {
    get(client, &format!("/v1/accounts/{ACCOUNT}/credits")).await
}

async fn alerts_of(client: &Client, kind: &str) -> Vec<Value> {
    let a = get(client, &format!("/v1/accounts/{ACCOUNT}/alerts")).await;
    a["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["kind"] == kind)
        .cloned()
        .collect()
}

async fn grant_credits(client: &Client, amount: i64, key: &str) -> Resp {
    client
        .send(
            reqwest::Method::POST,
            &format!("/v1/accounts/{ACCOUNT}/credits"),
            Some(ADMIN_KEY),
            Some(json!({"amount": amount, "reason": "goodwill", "idempotency_key": key})),
        )
        .await
}

/// Issue 12: a refund of a top-up takes back the refunded share of its credits; what was
/// spent becomes debt that blocks credit use until new credits pay it; refunds are
/// cumulative, so replays and late partial refunds take nothing more.
#[tokio::test]
async fn a_refunded_topup_takes_back_its_credits_and_spent_credits_become_debt() {
    let clock = Clock::System;
    let d = start(clock.clone()).await;
    prepaid_with_topup(&d, &clock).await;
    assert_eq!(d.client.consume(ACCOUNT, 3000, "spend-1").await.status, 200);
    // Half refunded: 2500 credits owed; 2000 are left to take, 500 become debt.
    deliver(
        &d,
        &clock,
        &topup_refunded("evt_rf_half", 1_793_000_100, 2500),
    )
    .await;
    settled(&d.client).await;
    let c = credits(&d.client).await;
    assert_eq!(
        (
            c["balance"].as_u64(),
            c["debt"].as_u64(),
            c["blocked"].as_str()
        ),
        (Some(0), Some(500), Some("credit_debt")),
        "{c}"
    );
    let a = get(&d.client, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(a["credits"]["debt"], 500, "{a}");
    let clawed = alerts_of(&d.client, "credits_clawed_back").await;
    assert_eq!(clawed.len(), 1, "{clawed:?}");
    assert_eq!(
        (
            clawed[0]["meter"].as_str(),
            clawed[0]["threshold"].as_u64(),
            clawed[0]["value"].as_u64(),
            clawed[0]["limit"].as_u64()
        ),
        (Some(TOPUP_PAYMENT), Some(2500), Some(2000), Some(500))
    );
    // Debt blocks credit use.
    let r = d.client.consume(ACCOUNT, 1, "spend-2").await;
    assert_eq!(
        (r.status, r.code()),
        (402, "insufficient_credits"),
        "{:?}",
        r.body
    );
    // The same refund total again (another event id), and an older smaller one that
    // arrives late: nothing more is taken.
    deliver(
        &d,
        &clock,
        &topup_refunded("evt_rf_half_again", 1_793_000_200, 2500),
    )
    .await;
    deliver(
        &d,
        &clock,
        &topup_refunded("evt_rf_early", 1_793_000_000, 1000),
    )
    .await;
    settled(&d.client).await;
    let c = credits(&d.client).await;
    assert_eq!(
        (c["balance"].as_u64(), c["debt"].as_u64()),
        (Some(0), Some(500)),
        "{c}"
    );
    // New credits pay the debt first; the rest is spendable.
    let r = grant_credits(&d.client, 800, "goodwill-1").await;
    assert!(r.status < 300, "{:?}", r.body);
    let c = credits(&d.client).await;
    assert_eq!(
        (
            c["balance"].as_u64(),
            c["debt"].as_u64(),
            c["blocked"].as_str()
        ),
        (Some(300), Some(0), None),
        "{c}"
    );
    assert_eq!(d.client.consume(ACCOUNT, 100, "spend-3").await.status, 200);
    // The rest refunded: 2500 more owed; 200 live are taken, 2300 become debt.
    deliver(
        &d,
        &clock,
        &topup_refunded("evt_rf_full", 1_793_000_300, 5000),
    )
    .await;
    settled(&d.client).await;
    let c = credits(&d.client).await;
    assert_eq!(
        (c["balance"].as_u64(), c["debt"].as_u64()),
        (Some(0), Some(2300)),
        "{c}"
    );
    // The ledger says what happened, and it verifies.
    let l = get(
        &d.client,
        &format!("/v1/accounts/{ACCOUNT}/ledger?limit=100"),
    )
    .await;
    let kinds: Vec<&str> = l["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .filter(|k| *k == "clawback")
        .collect();
    assert_eq!(kinds.len(), 3, "two refunds and one settlement: {l}");
    let v = admin(&d.client, "/v1/admin/verify").await;
    assert_eq!(v.body["ok"], true, "{:?}", v.body);
    d.stop().await;
}

/// Issue 12: `refund_policy = "forgive"` takes back only what is left; nothing is owed.
#[tokio::test]
async fn with_the_forgive_policy_a_refund_takes_back_only_unspent_credits() {
    let clock = Clock::System;
    let dir = tempfile::tempdir().unwrap();
    seed_pending_topups(dir.path());
    let path = dir.path().to_path_buf();
    let d = TestDaemon::start_full(
        dir,
        move |c| {
            *c = story_config(&path);
            c.webhooks.money.refund_debt = false;
        },
        clock.clone(),
        secrets(),
    )
    .await;
    prepaid_with_topup(&d, &clock).await;
    assert_eq!(d.client.consume(ACCOUNT, 4000, "spend-1").await.status, 200);
    deliver(
        &d,
        &clock,
        &topup_refunded("evt_rf_all", 1_793_000_100, 5000),
    )
    .await;
    settled(&d.client).await;
    let c = credits(&d.client).await;
    assert_eq!(
        (
            c["balance"].as_u64(),
            c["debt"].as_u64(),
            c["blocked"].as_str()
        ),
        (Some(0), Some(0), None),
        "{c}"
    );
    // New credits are the customer's: the forgiven part is not taken from them later.
    assert!(grant_credits(&d.client, 100, "g").await.status < 300);
    deliver(
        &d,
        &clock,
        &topup_refunded("evt_rf_all_again", 1_793_000_200, 5000),
    )
    .await;
    settled(&d.client).await;
    assert_eq!(credits(&d.client).await["balance"], 100);
    assert_eq!(d.client.consume(ACCOUNT, 100, "spend-2").await.status, 200);
    d.stop().await;
}

/// Issue 12: a dispute of a top-up raises an alert and suspends credit use until it closes;
/// won, the credits stay; lost, they go back as after a full refund. A dispute of a payment
/// that paid no top-up of meterd's changes nothing.
#[tokio::test]
async fn a_dispute_suspends_credits_until_it_closes_and_a_lost_one_takes_them_back() {
    let clock = Clock::System;
    let d = start(clock.clone()).await;
    prepaid_with_topup(&d, &clock).await;
    deliver(
        &d,
        &clock,
        &dispute_event(
            "evt_dp1_open",
            "created",
            "dp_1",
            TOPUP_PAYMENT,
            "needs_response",
        ),
    )
    .await;
    deliver(
        &d,
        &clock,
        &dispute_event(
            "evt_dp_other",
            "created",
            "dp_9",
            "pi_unknown",
            "needs_response",
        ),
    )
    .await;
    settled(&d.client).await;
    let c = credits(&d.client).await;
    assert_eq!(
        (
            c["balance"].as_u64(),
            c["blocked"].as_str(),
            &c["open_disputes"]
        ),
        (Some(5000), Some("dispute_open"), &json!(["dp_1"])),
        "{c}"
    );
    let alerts = alerts_of(&d.client, "dispute").await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        (alerts[0]["meter"].as_str(), alerts[0]["limit"].as_u64()),
        (Some("dp_1"), Some(1))
    );
    assert!(
        outcome_of(&d.client, "evt_dp_other")
            .await
            .contains("paid no top-up"),
        "{}",
        outcome_of(&d.client, "evt_dp_other").await
    );
    let r = d.client.consume(ACCOUNT, 1, "spend-1").await;
    assert_eq!(
        (r.status, r.code()),
        (402, "insufficient_credits"),
        "{:?}",
        r.body
    );
    // Won: credits are usable again, none taken. A late `created` does not reopen it.
    deliver(
        &d,
        &clock,
        &dispute_event("evt_dp1_won", "closed", "dp_1", TOPUP_PAYMENT, "won"),
    )
    .await;
    settled(&d.client).await;
    deliver(
        &d,
        &clock,
        &dispute_event(
            "evt_dp1_late",
            "created",
            "dp_1",
            TOPUP_PAYMENT,
            "needs_response",
        ),
    )
    .await;
    settled(&d.client).await;
    let c = credits(&d.client).await;
    assert_eq!(
        (c["balance"].as_u64(), c["blocked"].as_str()),
        (Some(5000), None),
        "{c}"
    );
    assert_eq!(d.client.consume(ACCOUNT, 1000, "spend-2").await.status, 200);
    // A second dispute, lost: all 5000 credits are owed; 4000 are left, 1000 become debt.
    deliver(
        &d,
        &clock,
        &dispute_event(
            "evt_dp2_open",
            "created",
            "dp_2",
            TOPUP_PAYMENT,
            "needs_response",
        ),
    )
    .await;
    deliver(
        &d,
        &clock,
        &dispute_event("evt_dp2_lost", "closed", "dp_2", TOPUP_PAYMENT, "lost"),
    )
    .await;
    settled(&d.client).await;
    let c = credits(&d.client).await;
    assert_eq!(
        (
            c["balance"].as_u64(),
            c["debt"].as_u64(),
            c["blocked"].as_str()
        ),
        (Some(0), Some(1000), Some("credit_debt")),
        "{c}"
    );
    // And a refund of the same payment after that takes nothing more.
    deliver(
        &d,
        &clock,
        &topup_refunded("evt_rf_after_loss", 1_793_000_100, 5000),
    )
    .await;
    settled(&d.client).await;
    assert_eq!(credits(&d.client).await["debt"], 1000);
    d.stop().await;
}
