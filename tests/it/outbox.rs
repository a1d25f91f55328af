//! The Stripe outbox against the spec-checked fake Stripe: every billable unit reaches Stripe
//! exactly once (by identifier), through restarts, failures, lost answers and offline spells.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::fake_stripe::{Failure, FakeStripe};
use crate::support::{ADMIN_KEY, TestDaemon, eventually};

async fn outbox(d: &TestDaemon, state: &str) -> Value {
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            &format!("/v1/admin/outbox?state={state}"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

async fn payg(d: &TestDaemon, id: &str, customer: Option<&str>) {
    let mut body = json!({"plan": "payg"});
    if let Some(c) = customer {
        body["stripe_customer_id"] = json!(c);
    }
    assert_eq!(d.client.put_account(id, body).await.status, 201);
}

async fn delivered(fake: &FakeStripe, n: usize) {
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_billable_consume_reaches_stripe_once() {
    let fake = FakeStripe::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_stripe(dir, &fake, |_| {}).await;
    payg(&d, "a", Some("cus_a")).await;
    d.client.put_account("flat", json!({"plan": "pro"})).await;
    for (i, q) in [2u64, 3, 5].iter().enumerate() {
        assert_eq!(
            d.client.consume("a", *q, &format!("k{i}")).await.status,
            200
        );
    }
    // Unlimited plans are not billed per unit.
    assert_eq!(d.client.consume("flat", 7, "k").await.status, 200);
    delivered(&fake, 3).await;
    let events = fake.meter_events();
    // Events are sent concurrently: compare as a set.
    let mut got: Vec<(String, String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e.identifier.clone(),
                e.event_name.clone(),
                e.customer.clone(),
                e.value.clone(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("a:2".into(), "tokens".into(), "cus_a".into(), "2".into()),
            ("a:3".into(), "tokens".into(), "cus_a".into(), "3".into()),
            ("a:4".into(), "tokens".into(), "cus_a".into(), "5".into()),
        ]
    );
    // Each request carried the identifier as its idempotency key.
    let posts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/billing/meter_events")
        .collect();
    assert!(posts.iter().all(|r| r.idempotency_key.is_some()));
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    eventually(Duration::from_secs(5), || async {
        outbox(&d, "pending").await["queued"] == 0
    })
    .await;
    let o = outbox(&d, "pending").await;
    assert_eq!(o["online"], true);
    assert_eq!(o["sent"], 3);
    // A restart sends nothing again. A new consume starts the account, whose recovery queues
    // the ledger tail again (minus what was sent); once the new unit has reached Stripe and
    // the queue is empty, nothing is left that could still be sent.
    let dir = d.stop().await;
    let d = TestDaemon::start_stripe(dir, &fake, |_| {}).await;
    let r = d.client.consume("a", 1, "k3").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let new_id = format!("a:{}", r.body["ledger_seq"].as_u64().unwrap());
    delivered(&fake, 4).await;
    eventually(Duration::from_secs(5), || async {
        outbox(&d, "pending").await["queued"] == 0
    })
    .await;
    let mut ids: Vec<String> = fake
        .meter_events()
        .into_iter()
        .map(|e| e.identifier)
        .collect();
    ids.sort();
    let mut want = vec!["a:2".to_owned(), "a:3".into(), "a:4".into(), new_id];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(fake.count("/v1/billing/meter_events"), 4);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_and_lost_answers_are_not_billed_twice() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |c| {
        c.stripe.breaker_failures = 100;
    })
    .await;
    payg(&d, "r", Some("cus_r")).await;
    fake.fail_next(3, Failure::Status(500));
    assert_eq!(d.client.consume("r", 4, "k1").await.status, 200);
    delivered(&fake, 1).await;
    // Stripe did it but the answer was lost: the resend is recognised, not billed again.
    fake.fail_next(1, Failure::DropAfterProcessing);
    assert_eq!(d.client.consume("r", 6, "k2").await.status, 200);
    fake.fail_next(1, Failure::RateLimited { retry_after_s: 1 });
    assert_eq!(d.client.consume("r", 1, "k3").await.status, 200);
    eventually(Duration::from_secs(10), || async {
        outbox(&d, "pending").await["queued"] == 0
    })
    .await;
    // Sent concurrently: compare as a set, keyed by identifier.
    let mut got: Vec<(String, String)> = fake
        .meter_events()
        .iter()
        .map(|e| (e.identifier.clone(), e.value.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("r:2".to_owned(), "4".to_owned()),
            ("r:3".to_owned(), "6".to_owned()),
            ("r:4".to_owned(), "1".to_owned()),
        ]
    );
    let o = outbox(&d, "pending").await;
    assert!(o["failed_attempts_total"].as_u64().unwrap() >= 4, "{o}");
    assert!(fake.spec_violations().is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stripe_already_has_counts_as_delivered() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |_| {}).await;
    payg(&d, "x", Some("cus_x")).await;
    // Delivered earlier, then the record of it was lost: Stripe has identifier x:2 already.
    let r = reqwest::Client::new()
        .post(format!("{}v1/billing/meter_events", fake.base_url()))
        .bearer_auth(crate::support::fake_stripe::SECRET_KEY)
        .form(&[
            ("event_name", "tokens"),
            ("identifier", "x:2"),
            ("payload[stripe_customer_id]", "cus_x"),
            ("payload[value]", "3"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(d.client.consume("x", 3, "k1").await.status, 200);
    eventually(Duration::from_secs(10), || async {
        outbox(&d, "pending").await["already_delivered_total"] == 1
    })
    .await;
    assert_eq!(fake.meter_events().len(), 1);
    assert_eq!(outbox(&d, "dead").await["dead"], 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_dead_letter_and_can_be_retried() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |_| {}).await;
    payg(&d, "p", Some("cus_p")).await;
    fake.fail_next(1, Failure::Status(404));
    assert_eq!(d.client.consume("p", 2, "k1").await.status, 200);
    eventually(Duration::from_secs(10), || async {
        outbox(&d, "dead").await["dead"] == 1
    })
    .await;
    let dead = outbox(&d, "dead").await;
    let item = &dead["items"][0];
    assert_eq!(item["account_id"], "p");
    assert!(
        item["last_error"].as_str().unwrap().contains("404"),
        "{item}"
    );
    assert!(fake.meter_events().is_empty());
    let id = item["id"].as_str().unwrap().to_owned();
    let r = d
        .client
        .send(
            reqwest::Method::POST,
            &format!("/v1/admin/outbox/{id}/retry"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    delivered(&fake, 1).await;
    assert_eq!(fake.meter_events()[0].identifier, "p:2");
    let again = d
        .client
        .send(
            reqwest::Method::POST,
            &format!("/v1/admin/outbox/{id}/retry"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(again.status, 404);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_on_an_outage_and_recovers() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |c| {
        c.stripe.breaker_failures = 2;
        c.stripe.breaker_cooldown = Duration::from_millis(300);
    })
    .await;
    payg(&d, "b", Some("cus_b")).await;
    fake.fail_for(Duration::from_millis(800), Failure::Status(503));
    assert_eq!(d.client.consume("b", 1, "k1").await.status, 200);
    eventually(Duration::from_secs(5), || async {
        outbox(&d, "pending").await["breaker_open"] == true
    })
    .await;
    delivered(&fake, 1).await;
    eventually(Duration::from_secs(5), || async {
        outbox(&d, "pending").await["breaker_open"] == false
    })
    .await;
    // While open, calls stopped: far fewer attempts than the outage would have allowed.
    let attempts = fake.count("/v1/billing/meter_events");
    assert!(attempts < 20, "{attempts} calls during a 0.8 s outage");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_usage_waits_and_a_key_sends_the_backlog() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start().await;
    payg(&d, "o", Some("cus_o")).await;
    assert_eq!(d.client.consume("o", 9, "k1").await.status, 200);
    let o = outbox(&d, "pending").await;
    assert_eq!(o["online"], false);
    assert_eq!(o["queued"], 1);
    let dir = d.stop().await;
    let d = TestDaemon::start_stripe(dir, &fake, |_| {}).await;
    delivered(&fake, 1).await;
    assert_eq!(fake.meter_events()[0].value, "9");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_a_customer_waits_visibly() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |_| {}).await;
    payg(&d, "w", None).await;
    assert_eq!(d.client.consume("w", 2, "k1").await.status, 200);
    eventually(Duration::from_secs(5), || async {
        let o = outbox(&d, "pending").await;
        o["items"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("stripe_customer_id"))
    })
    .await;
    assert!(fake.meter_events().is_empty());
    d.client
        .put_account("w", json!({"stripe_customer_id": "cus_w"}))
        .await;
    delivered(&fake, 1).await;
    assert_eq!(fake.meter_events()[0].customer, "cus_w");
    d.stop().await;
}

/// kill -9 of meterd at random moments while it sends: after restarts, every billable consume
/// that was acknowledged reaches the fake exactly once, and nothing unacknowledged is billed
/// beyond what its retry settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_send_bills_every_acknowledged_unit_exactly_once() {
    use rand::Rng;
    use std::collections::BTreeMap;

    use crate::support::BinDaemon;

    let fake = FakeStripe::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let ours = crate::support::shipped_config_on_fake(&fake.base_url());
    std::fs::write(&config, ours).unwrap();
    let data = dir.path().join("data");
    let env = [("STRIPE_SECRET_KEY", crate::support::fake_stripe::SECRET_KEY)];
    // Replay: METERD_TEST_SEED=<seed> (printed now, and with the command if the test fails).
    let seed = crate::support::seed::TestSeed::draw(
        "outbox::kill_9_mid_send_bills_every_acknowledged_unit_exactly_once",
    );
    let mut rng = seed.rng();
    // key -> (seq, quantity) of every acknowledged consume.
    let mut acked: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut unsure: Vec<(String, u64)> = Vec::new();
    for round in 0..4u64 {
        let d = BinDaemon::start_config(&config, &data, &env, true, None);
        if round == 0 {
            let r = d
                .client
                .put_account(
                    "k9",
                    json!({"plan": "payg", "stripe_customer_id": "cus_k9"}),
                )
                .await;
            assert_eq!(r.status, 201);
        }
        // Settle what the last kill left unsure: the same key either replays or decides anew.
        for (key, q) in unsure.drain(..) {
            let r = d.client.consume("k9", q, &key).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            acked.insert(key, (r.body["ledger_seq"].as_u64().unwrap(), q));
        }
        let kill_after = Duration::from_millis(rng.random_range(50..300));
        let client = d.client.clone();
        let load = tokio::spawn(async move {
            let mut done = Vec::new();
            for i in 0..2000u64 {
                let key = format!("r{round}-{i}");
                let q = i % 5 + 1;
                let sent = client
                    .http
                    .post(format!("{}/v1/accounts/k9/consume", client.base))
                    .bearer_auth(crate::support::APP_KEY)
                    .json(&json!({"meter": "tokens", "quantity": q, "idempotency_key": key}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        let body: Value = r.json().await.unwrap();
                        done.push((key, Some((body["ledger_seq"].as_u64().unwrap(), q))));
                    }
                    _ => {
                        done.push((key, None));
                        break;
                    }
                }
            }
            done
        });
        tokio::time::sleep(kill_after).await;
        tokio::task::spawn_blocking(move || d.kill9())
            .await
            .unwrap();
        let done = tokio::time::timeout(Duration::from_secs(60), load)
            .await
            .expect("the load stops once meterd is killed")
            .unwrap();
        for (key, r) in done {
            match r {
                Some(v) => {
                    acked.insert(key, v);
                }
                None => unsure.push((key.clone(), key_quantity(&key))),
            }
        }
    }
    // Final run: settle, then let the outbox drain.
    let d = BinDaemon::start_config(&config, &data, &env, true, None);
    for (key, q) in unsure.drain(..) {
        let r = d.client.consume("k9", q, &key).await;
        assert_eq!(r.status, 200);
        acked.insert(key, (r.body["ledger_seq"].as_u64().unwrap(), q));
    }
    let expected: BTreeMap<String, String> = acked
        .values()
        .map(|(seq, q)| (format!("k9:{seq}"), q.to_string()))
        .collect();
    eventually(Duration::from_secs(30), || async {
        fake.meter_events().len() >= expected.len()
    })
    .await;
    // Drained: with the queue empty (sends in flight are still queued) nothing more is sent.
    eventually(Duration::from_secs(10), || async {
        let r = d
            .client
            .send(
                reqwest::Method::GET,
                "/v1/admin/outbox?state=pending",
                Some(ADMIN_KEY),
                None,
            )
            .await;
        r.status == 200 && r.body["queued"] == 0
    })
    .await;
    let events = fake.meter_events();
    let got: BTreeMap<String, String> = events
        .iter()
        .map(|e| (e.identifier.clone(), e.value.clone()))
        .collect();
    assert_eq!(got.len(), events.len(), "an identifier accepted twice");
    assert_eq!(
        got, expected,
        "Stripe has exactly the acknowledged billable consumes"
    );
    assert!(fake.spec_violations().is_empty());
    let status = tokio::task::spawn_blocking(move || d.sigterm(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success());
}

/// The quantity the load loop used for a key (`i % 5 + 1`).
fn key_quantity(key: &str) -> u64 {
    let i: u64 = key.rsplit('-').next().unwrap().parse().unwrap();
    i % 5 + 1
}

#[tokio::test]
async fn start_up_checks_name_a_missing_stripe_meter() {
    let fake = FakeStripe::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::test_config(dir.path());
    config.stripe.api_base = fake.base_url();
    let client = meterd_actors::stripe::StripeHttp::new(
        &config.stripe.api_base,
        crate::support::fake_stripe::SECRET_KEY,
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(
        meterd::daemon::stripe_self_check(&config, &client)
            .await
            .is_empty()
    );
    config
        .stripe
        .event_names
        .insert("tokens".into(), "tokens_v2".into());
    let problems = meterd::daemon::stripe_self_check(&config, &client).await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("stripe.meters.tokens.event_name"),
        "{problems:?}"
    );
    // With strict, the daemon refuses to start.
    config.stripe.strict = true;
    let mut secrets = crate::support::secrets();
    secrets.stripe_key = Some(crate::support::fake_stripe::SECRET_KEY.into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = meterd::daemon::run(config, secrets, listener, std::future::pending());
    let r = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("start-up fails fast");
    let err = format!("{:#}", r.unwrap_err());
    assert!(err.contains("stripe.meters.tokens.event_name"), "{err}");
    // A wrong key is reported too, naming where it points.
    let bad = meterd_actors::stripe::StripeHttp::new(
        &fake.base_url(),
        "sk_test_wrong",
        Duration::from_secs(2),
    )
    .unwrap();
    let problems =
        meterd::daemon::stripe_self_check(&crate::support::test_config(dir.path()), &bad).await;
    assert!(problems[0].starts_with("stripe.api_base"), "{problems:?}");
}

#[tokio::test]
async fn readyz_says_whether_stripe_is_online() {
    let d = TestDaemon::start().await;
    let (status, body) = d.client.get_noauth("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(body["stripe"], "offline");
    assert_eq!(body["outbox_queued"], 0);
    d.stop().await;
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |_| {}).await;
    let (status, body) = d.client.get_noauth("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(body["stripe"], "online");
    d.stop().await;
}

#[tokio::test]
async fn start_up_checks_prices_of_plans() {
    use crate::support::fake_stripe::PriceKind;
    let fake = FakeStripe::start().await;
    fake.add_price("price_base", PriceKind::Licensed);
    fake.add_price("price_use", PriceKind::Metered("mtr_test_tokens".into()));
    fake.add_price("price_once", PriceKind::OneTime);
    fake.add_meter("mtr_other", "other_event");
    fake.add_price("price_other", PriceKind::Metered("mtr_other".into()));
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::test_config(dir.path());
    config.stripe.api_base = fake.base_url();
    let client = meterd_actors::stripe::StripeHttp::new(
        &config.stripe.api_base,
        crate::support::fake_stripe::SECRET_KEY,
        Duration::from_secs(2),
    )
    .unwrap();
    let set =
        |config: &mut meterd::config::Config, plan: &str, base: &str, metered: Option<&str>| {
            let p = config.stripe.plans.get_mut(plan).unwrap();
            p.stripe_price = Some(base.into());
            p.stripe_metered_price = metered.map(str::to_owned);
        };
    set(&mut config, "payg", "price_base", Some("price_use"));
    let problems = meterd::daemon::stripe_self_check(&config, &client).await;
    assert!(problems.is_empty(), "{problems:?}");
    set(&mut config, "team", "price_use", None);
    set(&mut config, "pro", "price_once", None);
    set(&mut config, "enterprise", "price_missing", None);
    set(&mut config, "payg", "price_base", Some("price_other"));
    let problems = meterd::daemon::stripe_self_check(&config, &client).await;
    let has = |key: &str, what: &str| {
        problems
            .iter()
            .any(|p| p.starts_with(key) && p.contains(what))
    };
    assert!(has("plans.team.stripe_price", "metered"), "{problems:?}");
    assert!(
        has("plans.pro.stripe_price", "not recurring"),
        "{problems:?}"
    );
    assert!(
        has("plans.enterprise.stripe_price", "cannot read"),
        "{problems:?}"
    );
    assert!(
        has("plans.payg.stripe_metered_price", "mtr_other"),
        "{problems:?}"
    );
    assert_eq!(problems.len(), 4, "{problems:?}");
}
