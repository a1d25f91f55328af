//! The reconciler against the fake Stripe with injected drift: Stripe missing events (lost, or
//! rejected by an error report), Stripe holding an extra event, Stripe late, a repair whose
//! answer is lost across a restart, and many accounts paced under the read limit.

use std::time::Duration;

use meterd_actors::model::Clock;
use serde_json::{Value, json};

use crate::support::fake_stripe::{DEFAULT_EVENT_NAME, Failure, FakeStripe, SECRET_KEY};
use crate::support::signer::sign;
use crate::support::{ADMIN_KEY, Resp, TestDaemon, WEBHOOK_SECRET, eventually, secrets};

const HOUR_MS: i64 = 3_600_000;

/// Ten minutes into the current hour (real time, so the fake's 24 h rules agree).
fn hour_start() -> i64 {
    let now = Clock::System.now_ms();
    now - now.rem_euclid(HOUR_MS) + 10 * 60_000
}

async fn start(dir: tempfile::TempDir, fake: &FakeStripe, clock: &Clock) -> TestDaemon {
    start_with(dir, fake, clock, |_| {}).await
}

async fn start_with(
    dir: tempfile::TempDir,
    fake: &FakeStripe,
    clock: &Clock,
    tweak: impl FnOnce(&mut meterd::config::Config),
) -> TestDaemon {
    let base = fake.base_url();
    let mut s = secrets();
    s.stripe_key = Some(SECRET_KEY.into());
    TestDaemon::start_full(
        dir,
        move |c| {
            c.stripe.api_base = base;
            c.stripe.poll = Duration::from_millis(20);
            c.stripe.base_backoff = Duration::from_millis(10);
            c.stripe.max_backoff = Duration::from_millis(100);
            c.stripe.timeout = Duration::from_secs(2);
            c.stripe.calls_per_second = 1000;
            c.reconciler.reads_per_second = 100;
            tweak(c);
        },
        clock.clone(),
        s,
    )
    .await
}

async fn payg(d: &TestDaemon, id: &str, customer: &str) {
    let r = d
        .client
        .put_account(id, json!({"plan": "payg", "stripe_customer_id": customer}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

async fn admin(d: &TestDaemon, method: reqwest::Method, path: &str) -> Resp {
    d.client.send(method, path, Some(ADMIN_KEY), None).await
}

/// Runs a reconciliation now and waits until it has finished; returns the report.
async fn reconcile(d: &TestDaemon) -> Value {
    // A scheduled run may have started as the clock moved: let it finish, then start ours.
    for _ in 0..3 {
        let r = admin(d, reqwest::Method::POST, "/v1/admin/reconciliation/run").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let id = r.body["run_id"].as_u64().unwrap();
        eventually(Duration::from_secs(30), || async {
            let rep = report(d, "").await;
            rep["runs"][0]["id"] == id && rep["runs"][0]["finished_at"].is_string()
        })
        .await;
        if r.body["started"] == true {
            return report(d, "").await;
        }
    }
    panic!("no run of our own started");
}

async fn report(d: &TestDaemon, query: &str) -> Value {
    let r = admin(
        d,
        reqwest::Method::GET,
        &format!("/v1/admin/reconciliation{query}"),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

fn window<'a>(rep: &'a Value, account: &str) -> &'a Value {
    let w: Vec<&Value> = rep["windows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["account_id"] == account)
        .collect();
    assert_eq!(w.len(), 1, "one window of {account}: {rep:#}");
    w[0]
}

fn accepted(fake: &FakeStripe, identifier: &str) -> Vec<String> {
    fake.meter_events()
        .into_iter()
        .filter(|e| e.identifier == identifier)
        .map(|e| e.value)
        .collect()
}

async fn delivered(d: &TestDaemon, fake: &FakeStripe, n: usize) {
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() + fake.lost_events().len() >= n
    })
    .await;
    eventually(Duration::from_secs(10), || async {
        let r = admin(d, reqwest::Method::GET, "/v1/admin/outbox").await;
        r.body["queued"] == 0
    })
    .await;
}

/// An error report (v2 thin event, fetched from the fake) naming `identifier`.
async fn report_error(d: &TestDaemon, fake: &FakeStripe, clock: &Clock, identifier: &str) {
    let dir = crate::support::stripe_events_dir();
    let mut fetched: Value = serde_json::from_slice(
        &std::fs::read(dir.join("billing.meter.error_report_triggered.fetched.json")).unwrap(),
    )
    .unwrap();
    fetched["id"] = json!("evt_test_recon_1");
    fetched["data"]["reason"]["error_types"] = json!([{
        "code": "meter_event_customer_not_found",
        "error_count": 1,
        "sample_errors": [
            {"error_message": "No customer.", "request": {"identifier": identifier}}
        ]
    }]);
    fake.add_v2_event(fetched);
    let mut thin: Value = serde_json::from_slice(
        &std::fs::read(dir.join("billing.meter.error_report_triggered.json")).unwrap(),
    )
    .unwrap();
    thin["id"] = json!("evt_test_recon_1");
    let body = serde_json::to_vec(&thin).unwrap();
    let sig = sign(&body, WEBHOOK_SECRET, clock.now_ms() / 1000);
    let r = d
        .client
        .http
        .post(format!("{}/webhooks/stripe", d.client.base))
        .header("content-type", "application/json")
        .header("stripe-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(10), || async {
        let r = admin(d, reqwest::Method::GET, "/v1/admin/meter-errors").await;
        r.body["errors"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_found_repaired_once_verified_and_what_cannot_be_proven_is_reported() {
    let fake = FakeStripe::start().await;
    let t0 = hour_start();
    let clock = Clock::manual(t0);
    let d = start(tempfile::tempdir().unwrap(), &fake, &clock).await;
    for (a, c) in [
        ("a", "cus_a"),
        ("b", "cus_b"),
        ("c", "cus_c"),
        ("e", "cus_e"),
    ] {
        payg(&d, a, c).await;
    }
    // a: Stripe loses its first event (seq 2), then gets the second.
    fake.lose_next_events(1);
    assert_eq!(d.client.consume("a", 5, "a1").await.status, 200);
    delivered(&d, &fake, 1).await;
    assert_eq!(fake.lost_events()[0].identifier, "a:2");
    for (a, q) in [("a", 7), ("b", 3), ("c", 4)] {
        assert_eq!(d.client.consume(a, q, &format!("{a}2")).await.status, 200);
    }
    delivered(&d, &fake, 4).await;
    // e: Stripe accepts, then reports the event invalid (and does not count it).
    fake.lose_next_events(1);
    assert_eq!(d.client.consume("e", 9, "e1").await.status, 200);
    delivered(&d, &fake, 5).await;
    report_error(&d, &fake, &clock, "e:2").await;
    // c: Stripe holds 10 units meterd never sent.
    fake.inject_event("c:999", DEFAULT_EVENT_NAME, "cus_c", 10, t0 / 1000 + 60);

    // Not compared before the window is an hour past its end.
    clock.set_ms(t0 + HOUR_MS);
    let rep = reconcile(&d).await;
    assert_eq!(rep["runs"][0]["windows"], 0, "{rep:#}");

    clock.set_ms(t0 + 2 * HOUR_MS);
    let rep = reconcile(&d).await;
    let a = window(&rep, "a");
    assert_eq!(
        (
            a["local"].as_u64(),
            a["stripe"].as_u64(),
            a["drift"].as_i64()
        ),
        (Some(12), Some(7), Some(-5)),
        "{a:#}"
    );
    assert_eq!(a["status"], "repaired", "{a:#}");
    assert_eq!(a["repair"], "a:r2");
    assert_eq!(a["repair_state"], "sent");
    assert_eq!(a["alert"], true, "5 of 12 is past 5 %");
    assert_eq!(accepted(&fake, "a:r2"), vec!["5".to_owned()]);
    let b = window(&rep, "b");
    assert_eq!(
        (b["status"].as_str(), b["local"].as_u64()),
        (Some("ok"), Some(3))
    );
    assert_eq!(b["alert"], false);
    let c = window(&rep, "c");
    assert_eq!(c["status"], "unrepairable", "{c:#}");
    assert_eq!(c["drift"], 10);
    assert_eq!(c["alert"], true);
    assert!(
        c["action"].as_str().unwrap().contains("nothing cancelled"),
        "{c:#}"
    );
    let e = window(&rep, "e");
    assert_eq!(e["status"], "repaired", "{e:#}");
    assert_eq!(e["repair"], "e:r2");
    assert!(
        e["action"]
            .as_str()
            .unwrap()
            .contains("e:2 meter_event_customer_not_found"),
        "the error report is named: {e:#}"
    );
    assert!(
        fake.adjustments().is_empty(),
        "nothing of ours was cancelled"
    );
    let run = &rep["runs"][0];
    assert_eq!(
        (
            run["accounts"].as_u64(),
            run["windows"].as_u64(),
            run["ok"].as_u64(),
            run["repaired"].as_u64(),
            run["unrepairable"].as_u64()
        ),
        (Some(4), Some(4), Some(1), Some(2), Some(1)),
        "{run:#}"
    );
    // Filters.
    let only = report(&d, "?status=repaired").await;
    let ids: Vec<&str> = only["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["account_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["a", "e"]);
    let only = report(&d, "?account_id=c").await;
    assert_eq!(only["windows"].as_array().unwrap().len(), 1);
    let page = report(&d, "?limit=1").await;
    assert_eq!(page["has_more"], true);
    let next = report(
        &d,
        &format!(
            "?limit=10&starting_after={}",
            page["windows"][0]["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(next["windows"][0]["account_id"], "b", "{next:#}");
    let bad = admin(
        &d,
        reqwest::Method::GET,
        "/v1/admin/reconciliation?status=fine",
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_request"));

    // The next run verifies the repairs.
    clock.set_ms(t0 + 3 * HOUR_MS);
    let rep = reconcile(&d).await;
    let a = window(&rep, "a");
    assert_eq!(a["status"], "ok", "verified: {a:#}");
    assert!(a["action"].as_str().unwrap().contains("verified"), "{a:#}");
    let e = window(&rep, "e");
    assert_eq!(e["status"], "ok", "{e:#}");
    // Never repaired twice: one event per repair identifier, and nothing more sent.
    assert_eq!(accepted(&fake, "a:r2").len(), 1);
    assert_eq!(accepted(&fake, "e:r2").len(), 1);
    // c stays reported, untouched; b and the verified windows are final.
    assert_eq!(window(&rep, "c")["status"], "unrepairable");
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_stripe_turns_out_not_to_need_is_cancelled_within_24_hours() {
    let fake = FakeStripe::start().await;
    let t0 = hour_start();
    let clock = Clock::manual(t0);
    let d = start(tempfile::tempdir().unwrap(), &fake, &clock).await;
    payg(&d, "a", "cus_a").await;
    fake.lose_next_events(1);
    assert_eq!(d.client.consume("a", 5, "a1").await.status, 200);
    assert_eq!(d.client.consume("a", 7, "a2").await.status, 200);
    delivered(&d, &fake, 2).await;
    clock.set_ms(t0 + 2 * HOUR_MS);
    let rep = reconcile(&d).await;
    assert_eq!(window(&rep, "a")["status"], "repaired");
    assert_eq!(accepted(&fake, "a:r2"), vec!["5".to_owned()]);
    // Stripe's processing was only late: the lost event counts after all, so Stripe holds
    // the repair in excess.
    assert_eq!(fake.restore_lost_events(), 1);
    clock.set_ms(t0 + 3 * HOUR_MS);
    let rep = reconcile(&d).await;
    let a = window(&rep, "a");
    assert_eq!(a["status"], "repaired", "{a:#}");
    assert_eq!(a["stripe"], 17);
    assert_eq!(a["repair_state"], "cancelled");
    assert_eq!(fake.adjustments(), vec!["a:r2".to_owned()]);
    let cancels: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/billing/meter_event_adjustments")
        .collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(
        cancels[0].idempotency_key.as_deref(),
        Some("cancel:a:r2"),
        "deterministic"
    );
    clock.set_ms(t0 + 4 * HOUR_MS);
    let rep = reconcile(&d).await;
    let a = window(&rep, "a");
    assert_eq!(
        (a["status"].as_str(), a["stripe"].as_u64()),
        (Some("ok"), Some(12))
    );
    assert_eq!(fake.adjustments().len(), 1, "cancelled once");
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_whose_answer_is_lost_is_finished_after_a_restart_and_sent_once() {
    let fake = FakeStripe::start().await;
    let t0 = hour_start();
    let clock = Clock::manual(t0);
    let d = start(tempfile::tempdir().unwrap(), &fake, &clock).await;
    payg(&d, "a", "cus_a").await;
    fake.lose_next_events(1);
    assert_eq!(d.client.consume("a", 5, "a1").await.status, 200);
    delivered(&d, &fake, 1).await;
    // Stripe takes the repair, and the answer never comes back.
    fake.fail_next_on("/v1/billing/meter_events", 1, Failure::DropAfterProcessing);
    clock.set_ms(t0 + 2 * HOUR_MS);
    let rep = reconcile(&d).await;
    let a = window(&rep, "a");
    assert_eq!(a["status"], "repaired", "{a:#}");
    assert_eq!(a["repair_state"], "pending", "{a:#}");
    assert_eq!(accepted(&fake, "a:r2").len(), 1, "Stripe has it");
    let dir = d.stop().await;
    // After the restart the pending repair is sent again under its identifier: Stripe
    // answers that it exists, and the repair is recorded as sent. Nothing is sent twice.
    let d = start(dir, &fake, &clock).await;
    clock.set_ms(t0 + 3 * HOUR_MS);
    let rep = reconcile(&d).await;
    let a = window(&rep, "a");
    assert_eq!(a["status"], "ok", "{a:#}");
    assert_eq!(a["repair_state"], "sent", "{a:#}");
    assert_eq!(accepted(&fake, "a:r2").len(), 1);
    let posts = fake
        .requests()
        .into_iter()
        .chain(fake.replays())
        .filter(|r| {
            r.path == "/v1/billing/meter_events"
                && r.params
                    .iter()
                    .any(|(k, v)| k == "identifier" && v == "a:r2")
        })
        .count();
    assert_eq!(
        posts, 2,
        "the same event (and idempotency key), sent twice, accepted once"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_accounts_are_reconciled_under_the_read_rate_limit() {
    const N: usize = 300;
    const RATE: u32 = 100;
    let fake = FakeStripe::start().await;
    let t0 = hour_start();
    let clock = Clock::manual(t0);
    let d = start_with(tempfile::tempdir().unwrap(), &fake, &clock, |c| {
        c.reconciler.reads_per_second = RATE;
    })
    .await;
    for i in 0..N {
        payg(&d, &format!("m{i:04}"), &format!("cus_m{i:04}")).await;
        assert_eq!(
            d.client
                .consume(&format!("m{i:04}"), 1 + i as u64, "k")
                .await
                .status,
            200
        );
    }
    delivered(&d, &fake, N).await;
    clock.set_ms(t0 + 2 * HOUR_MS);
    let rep = reconcile(&d).await;
    let run = &rep["runs"][0];
    assert_eq!(run["accounts"], N, "{run:#}");
    assert_eq!(run["ok"], N, "{run:#}");
    assert_eq!(run["reads"], N, "one summary page per account and meter");
    // Paced: no second holds more than the rate (plus the one slot a tick may carry).
    let times = fake.summary_request_times();
    assert_eq!(times.len(), N);
    for (i, t) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(within <= RATE as usize + 1, "{within} reads within 1 s");
    }
    let span = times.last().unwrap().duration_since(times[0]);
    assert!(
        span >= Duration::from_secs_f64((N - 1) as f64 / f64::from(RATE) * 0.9),
        "{span:?}"
    );
    d.stop().await;
}

const TEAM_PRICE: &str = "price_17NKaQm7Yc2Hd9anf59xSqfT";

/// The story's subscription as Stripe would hold it now: `id`, `customer`, `status`, the
/// team price for `seats`, and a current period that contains now.
fn stripe_subscription(id: &str, customer: &str, status: &str, seats: u64, created: i64) -> Value {
    let path = crate::support::stripe_events_dir().join("customer.subscription.created.json");
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut s = v["data"]["object"].clone();
    let now_s = Clock::System.now_ms() / 1000;
    s["id"] = json!(id);
    s["customer"] = json!(customer);
    s["status"] = json!(status);
    s["created"] = json!(created);
    s["metadata"] = json!({});
    s["trial_end"] = Value::Null;
    for item in s["items"]["data"].as_array_mut().unwrap() {
        item["current_period_start"] = json!(now_s - 86_400);
        item["current_period_end"] = json!(now_s + 29 * 86_400);
        if item["price"]["id"] == TEAM_PRICE {
            item["quantity"] = json!(seats);
        }
    }
    if status == "canceled" {
        s["ended_at"] = json!(now_s - 3_600);
        s["canceled_at"] = json!(now_s - 3_600);
    }
    s
}

/// Issue 12, "reconcile state": an account whose subscription looks inconsistent, or whose
/// last Stripe event is old, is re-read from Stripe and what Stripe holds is applied; a
/// consistent account costs no read; what cannot be resolved is reported, not guessed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_pass_rereads_inconsistent_or_quiet_accounts_from_stripe() {
    let fake = FakeStripe::start().await;
    let clock = Clock::System;
    let d = start_with(tempfile::tempdir().unwrap(), &fake, &clock, |c| {
        c.stripe.plans.get_mut("team").unwrap().stripe_price = Some(TEAM_PRICE.into());
    })
    .await;
    let now_s = clock.now_ms() / 1000;
    let put = |id: &'static str, plan: &'static str, customer: &'static str| {
        let client = d.client.clone();
        async move {
            let r = client
                .put_account(
                    id,
                    json!({"plan": plan, "stripe_customer_id": customer, "seats": 2}),
                )
                .await;
            assert!(r.status < 300, "{:?}", r.body);
        }
    };
    // On team (sold through Stripe) with no subscription known: its events were lost.
    put("acct_lost", "team", "cus_lost").await;
    fake.put_subscription(stripe_subscription(
        "sub_lost",
        "cus_lost",
        "active",
        4,
        now_s - 600,
    ));
    fake.put_subscription(stripe_subscription(
        "sub_old",
        "cus_lost",
        "canceled",
        9,
        now_s - 9_000,
    ));
    // Its subscription arrived 40 days ago and nothing since; Stripe has cancelled it.
    put("acct_quiet", "free", "cus_quiet").await;
    let path = crate::support::stripe_events_dir().join("customer.subscription.created.json");
    let mut ev: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    ev["id"] = json!("evt_quiet_created");
    ev["created"] = json!(now_s - 40 * 86_400);
    ev["data"]["object"] =
        stripe_subscription("sub_quiet", "cus_quiet", "active", 2, now_s - 40 * 86_400);
    let body = serde_json::to_vec(&ev).unwrap();
    let sig = sign(&body, WEBHOOK_SECRET, now_s);
    let r = d
        .client
        .http
        .post(format!("{}/webhooks/stripe", d.client.base))
        .header("content-type", "application/json")
        .header("stripe-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(10), || async {
        d.client.get_account("acct_quiet").await.body["plan"] == "team"
    })
    .await;
    fake.put_subscription(stripe_subscription(
        "sub_quiet",
        "cus_quiet",
        "canceled",
        2,
        now_s - 40 * 86_400,
    ));
    // Consistent: a free plan, nothing to read.
    put("acct_fine", "free", "cus_fine").await;
    // On team, but Stripe has no live subscription for it either: reported, not guessed.
    put("acct_orphan", "team", "cus_orphan").await;

    let rep = reconcile(&d).await;
    let run = &rep["runs"][0];
    assert_eq!(
        (run["state_checked"].as_u64(), run["state_reread"].as_u64()),
        (Some(4), Some(2)),
        "{run}"
    );
    let lost = d.client.get_account("acct_lost").await.body;
    assert_eq!(
        (
            lost["plan"].as_str(),
            lost["seats"].as_u64(),
            lost["status"].as_str()
        ),
        (Some("team"), Some(4), Some("active")),
        "{lost}"
    );
    assert_eq!(lost["stripe"]["subscription"]["id"], "sub_lost", "{lost}");
    let quiet = d.client.get_account("acct_quiet").await.body;
    assert_eq!(
        quiet["plan"], "free",
        "a cancelled subscription ends the plan: {quiet}"
    );
    let orphan = d.client.get_account("acct_orphan").await.body;
    assert_eq!(orphan["plan"], "team", "nothing is guessed: {orphan}");
    // Reads: the lost and orphan customers' lists, and the quiet one's subscription; none for
    // the consistent account.
    let reads: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1/subscriptions"))
        .map(|r| format!("{}?{:?}", r.path, r.params))
        .collect();
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert!(reads.iter().all(|r| !r.contains("cus_fine")), "{reads:?}");
    assert!(
        reads
            .iter()
            .any(|r| r.starts_with("/v1/subscriptions/sub_quiet")),
        "{reads:?}"
    );
    // The next pass finds the repaired accounts consistent: only the orphan is read again.
    let rep = reconcile(&d).await;
    assert_eq!(rep["runs"][0]["state_reread"], 0, "{}", rep["runs"][0]);
    let reads = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1/subscriptions"))
        .count();
    assert_eq!(reads, 4);
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
    d.stop().await;
    fake.stop().await;
}
