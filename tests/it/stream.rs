//! The outbox in stream mode (`stripe.meter_events = "stream"`): Stripe's v2 meter event
//! stream, up to 100 events per request under one session token, against the fake Stripe.
//! Every billable unit still reaches Stripe exactly once by identifier: through failures, lost
//! answers, token expiry and restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::fake_stripe::{Failure, FakeStripe};
use crate::support::{ADMIN_KEY, TestDaemon, eventually};
use meterd::config::Config;
use meterd_actors::outbox::MeterEventsMode;

const STREAM: &str = "/v2/billing/meter_event_stream";
const SESSION: &str = "/v2/billing/meter_event_session";

fn stream_mode(fake: &FakeStripe) -> impl FnOnce(&mut Config) + use<> {
    let base = fake.base_url();
    move |c: &mut Config| {
        c.stripe.meter_events = MeterEventsMode::Stream;
        c.stripe.meter_events_stream_base = base;
        c.stripe.breaker_failures = 100;
        // Outages in these tests outlast 12 quick attempts (10-100 ms backoff).
        c.stripe.max_attempts = 1000;
    }
}

async fn start(dir: tempfile::TempDir, fake: &FakeStripe) -> TestDaemon {
    TestDaemon::start_stripe(dir, fake, stream_mode(fake)).await
}

async fn outbox(d: &TestDaemon) -> Value {
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            "/v1/admin/outbox?state=pending",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

async fn payg(d: &TestDaemon, id: &str) {
    let body = json!({"plan": "payg", "stripe_customer_id": format!("cus_{id}")});
    assert_eq!(d.client.put_account(id, body).await.status, 201);
}

/// `n` consumes of quantity 1..=n (cycled to 1..=9) on each account, `width` at a time.
/// Returns identifier → value as the ledger numbered them (the account is entry 1).
async fn consume_many(
    d: &TestDaemon,
    accounts: &[&str],
    n: u64,
    tag: &str,
    first_seq: u64,
) -> BTreeMap<String, String> {
    let mut expected = BTreeMap::new();
    for a in accounts {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let client = d.client.clone();
            let (a, key) = (a.to_string(), format!("{tag}-{i}"));
            tasks.spawn(async move { client.consume(&a, 1 + i % 9, &key).await.status });
        }
        for status in tasks.join_all().await {
            assert_eq!(status, 200);
        }
    }
    // Quantities by ledger sequence are not known (concurrent consumes): compare values as a
    // multiset per account, identifiers as the contiguous range.
    for a in accounts {
        for s in first_seq..first_seq + n {
            expected.insert(format!("{a}:{s}"), String::new());
        }
    }
    expected
}

/// Waits until the fake has `n` events and the queue is empty.
async fn drained(d: &TestDaemon, fake: &FakeStripe, n: usize, secs: u64) {
    eventually(Duration::from_secs(secs), || async {
        fake.meter_events().len() >= n && outbox(d).await["queued"] == 0
    })
    .await;
}

/// Every identifier exactly once, no other event, and the values per account sum as sent.
fn assert_exactly_once(
    fake: &FakeStripe,
    expected: &BTreeMap<String, String>,
    sums: &[(&str, u64)],
) {
    let events = fake.meter_events();
    let mut seen = BTreeMap::new();
    for e in &events {
        *seen.entry(e.identifier.clone()).or_insert(0usize) += 1;
    }
    assert!(seen.values().all(|c| *c == 1), "a duplicate reached Stripe");
    let got: Vec<&String> = seen.keys().collect();
    let want: Vec<&String> = expected.keys().collect();
    assert_eq!(got, want);
    for (a, sum) in sums {
        let total: u64 = events
            .iter()
            .filter(|e| e.customer == format!("cus_{a}"))
            .map(|e| e.value.parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, *sum, "units of {a}");
        assert!(
            events
                .iter()
                .filter(|e| e.identifier.starts_with(&format!("{a}:")))
                .all(|e| e.event_name == "tokens" && e.customer == format!("cus_{a}"))
        );
    }
}

fn us(n: u64) -> usize {
    usize::try_from(n).unwrap()
}

/// The sum of quantities `1 + i % 9` for `i` in `0..n`.
fn units(n: u64) -> u64 {
    (0..n).map(|i| 1 + i % 9).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_sends_every_consume_once_in_requests_of_at_most_100() {
    let fake = FakeStripe::start().await;
    let d = start(tempfile::tempdir().unwrap(), &fake).await;
    payg(&d, "a").await;
    payg(&d, "b").await;
    d.client.put_account("flat", json!({"plan": "pro"})).await;
    // Unlimited plans are not billed per unit.
    assert_eq!(d.client.consume("flat", 7, "k").await.status, 200);
    let n = 300;
    let expected = consume_many(&d, &["a", "b"], n, "k", 2).await;
    drained(&d, &fake, 2 * us(n), 20).await;
    assert_exactly_once(&fake, &expected, &[("a", units(n)), ("b", units(n))]);
    let sizes = fake.stream_requests();
    assert!(sizes.iter().all(|s| (1..=100).contains(s)), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 2 * us(n));
    // Nothing went the v1 way; one session served the whole run.
    assert_eq!(fake.count("/v1/billing/meter_events"), 0);
    assert_eq!(fake.count(SESSION), 1);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    let o = outbox(&d).await;
    assert_eq!(o["sent"], 2 * n);
    assert_eq!(o["delivered_total"], 2 * n);
    assert_eq!(o["dead"], 0);
    assert_eq!(o["sessions_total"], 1);
    assert_eq!(o["stream_requests_total"], sizes.len());
    // A restart sends nothing again. A new consume on each account starts it, and its
    // recovery queues the ledger tail again (minus what was sent); once the two new units
    // have reached Stripe and the queue is empty, nothing is left that could still be sent.
    let dir = d.stop().await;
    let d = start(dir, &fake).await;
    let mut fresh = Vec::new();
    for a in ["a", "b"] {
        let r = d.client.consume(a, 1, "after-restart").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        fresh.push(format!("{a}:{}", r.body["ledger_seq"].as_u64().unwrap()));
    }
    drained(&d, &fake, 2 * us(n) + 2, 20).await;
    let mut expected = expected;
    for id in fresh {
        expected.insert(id, String::new());
    }
    assert_exactly_once(
        &fake,
        &expected,
        &[("a", units(n) + 1), ("b", units(n) + 1)],
    );
    let later = fake.stream_requests();
    assert_eq!(later[..sizes.len()], sizes[..]);
    assert_eq!(
        later[sizes.len()..].iter().sum::<usize>(),
        2,
        "only the two new events were sent: {later:?}"
    );
    assert_eq!(fake.count(STREAM), later.len());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_makes_about_one_call_per_hundred_consumes_under_load() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |c| {
        stream_mode(&fake)(c);
        // A slower poll lets a tick find a full request's worth of due entries.
        c.stripe.poll = Duration::from_millis(250);
        // 2,000 requests at once open as many connections: past the default cap, idle ones
        // would be closed under the client's feet (see hostile.rs); not this test's subject.
        c.connections.max_connections = 4096;
    })
    .await;
    payg(&d, "load").await;
    let n = 2000;
    let expected = consume_many(&d, &["load"], n, "l", 2).await;
    drained(&d, &fake, us(n), 30).await;
    assert_exactly_once(&fake, &expected, &[("load", units(n))]);
    let calls = fake.count(STREAM) + fake.count(SESSION);
    let per_consume = calls as f64 / n as f64;
    println!(
        "stream mode: {n} consumes, {} stream requests, {} sessions: {per_consume:.4} calls per consume",
        fake.count(STREAM),
        fake.count(SESSION)
    );
    // ≈ 1/100 when requests are full; allow partly filled ones at the edges of ticks.
    assert!(per_consume <= 0.05, "{per_consume}");
    assert!(fake.stream_requests().iter().all(|s| *s <= 100));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_survives_an_outage_lost_answers_and_a_restart() {
    let fake = FakeStripe::start().await;
    let d = start(tempfile::tempdir().unwrap(), &fake).await;
    payg(&d, "o").await;
    // An outage: every stream request is a 500 for a while.
    fake.fail_for_on(STREAM, Duration::from_millis(800), Failure::Status(500));
    let mut expected = consume_many(&d, &["o"], 150, "x", 2).await;
    // Stopped while (perhaps) still failing: the backlog survives the restart.
    let dir = d.stop().await;
    let failed_before = fake
        .requests()
        .iter()
        .filter(|r| r.path == STREAM && r.status == Some(500))
        .count();
    let d = start(dir, &fake).await;
    // Answers lost after Stripe processed them: the resend is deduplicated by identifier.
    fake.fail_next_on(STREAM, 2, Failure::DropAfterProcessing);
    expected.extend(consume_many(&d, &["o"], 150, "y", 152).await);
    drained(&d, &fake, 300, 20).await;
    assert_exactly_once(&fake, &expected, &[("o", 2 * units(150))]);
    assert!(failed_before >= 1, "the outage was seen");
    assert!(fake.stream_requests().iter().all(|s| *s <= 100));
    let o = outbox(&d).await;
    assert_eq!(o["dead"], 0);
    assert_eq!(o["sent"], 300);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_refreshed_and_nothing_is_lost_or_doubled() {
    let fake = FakeStripe::start().await;
    // Short sessions: replaced ahead of their expiry (a quarter of the lifetime before it).
    fake.set_session_ttl(Duration::from_secs(2));
    let d = start(tempfile::tempdir().unwrap(), &fake).await;
    payg(&d, "t").await;
    let mut expected = consume_many(&d, &["t"], 120, "a", 2).await;
    drained(&d, &fake, 120, 20).await;
    // Expired under the outbox's feet: the next request is a 401, a new session follows, and
    // the same events go again with the new token.
    fake.expire_sessions();
    expected.extend(consume_many(&d, &["t"], 120, "b", 122).await);
    drained(&d, &fake, 240, 20).await;
    let refused = fake
        .requests()
        .iter()
        .filter(|r| r.path == STREAM && r.status == Some(401))
        .count();
    assert!(refused >= 1, "the expired token was used once");
    // Past the lifetime: replaced before it expires (no further 401).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    expected.extend(consume_many(&d, &["t"], 120, "c", 242).await);
    drained(&d, &fake, 360, 20).await;
    assert_exactly_once(&fake, &expected, &[("t", 3 * units(120))]);
    let refused_after = fake
        .requests()
        .iter()
        .filter(|r| r.path == STREAM && r.status == Some(401))
        .count();
    assert_eq!(
        refused_after, refused,
        "a token was refreshed ahead of its expiry"
    );
    assert!(fake.count(SESSION) >= 3, "{}", fake.count(SESSION));
    let o = outbox(&d).await;
    // A refused token is not a failure of the events.
    assert_eq!(o["failed_attempts_total"], 0, "{o}");
    assert_eq!(o["dead"], 0);
    assert_eq!(o["sent"], 360);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_stream_checks_the_sdk_shape_and_the_token() {
    let fake = FakeStripe::start().await;
    let http = reqwest::Client::new();
    let post = |path: &str, token: &str, body: Value| {
        http.post(format!("{}{}", fake.base_url(), &path[1..]))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    // A stream request needs a session token, not the secret key.
    let ev = json!({"event_name": "tokens", "identifier": "z:1",
        "payload": {"stripe_customer_id": "cus_z", "value": "3"},
        "timestamp": "2026-11-21T09:00:00.000Z"});
    let r = post(
        STREAM,
        crate::support::fake_stripe::SECRET_KEY,
        json!({"events": [ev]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "billing_meter_event_session_expired");
    let s: Value = post(SESSION, crate::support::fake_stripe::SECRET_KEY, json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["object"], "v2.billing.meter_event_session");
    let token = s["authentication_token"].as_str().unwrap().to_owned();
    assert!(meterd_actors::model::parse_rfc3339(s["expires_at"].as_str().unwrap()).is_some());
    // The session endpoint takes the secret key only.
    assert_eq!(
        post(SESSION, &token, json!({})).await.unwrap().status(),
        401
    );
    let bad = [
        json!({"events": [ev], "extra": 1}),
        json!({"events": []}),
        json!({"events": vec![ev.clone(); 101]}),
        json!({"events": [{"event_name": "tokens", "payload": {"value": "1"}}]}),
        json!({"events": [{"event_name": "tokens", "payload": {"stripe_customer_id": "c", "value": 1}}]}),
        json!({"events": [{"event_name": "tokens", "payload": {"stripe_customer_id": "c", "value": "1"}, "timestamp": 1}]}),
        json!({"events": [{"event_name": "tokens", "payload": {"stripe_customer_id": "c", "value": "1"}, "other": "x"}]}),
        json!({"events": [{"payload": {"stripe_customer_id": "c", "value": "1"}}]}),
    ];
    for b in bad {
        let r = post(STREAM, &token, b.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{b}");
    }
    assert_eq!(fake.spec_violations().len(), 8);
    // Good: recorded once, a repeat of the identifier is dropped by the dedup.
    for _ in 0..2 {
        let r = post(STREAM, &token, json!({"events": [ev]})).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let events = fake.meter_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].identifier, "z:1");
    assert_eq!(events[0].value, "3");
    assert_eq!(events[0].customer, "cus_z");
    assert_eq!(
        events[0].timestamp,
        meterd_actors::model::parse_rfc3339("2026-11-21T09:00:00Z").unwrap() / 1000
    );
    fake.expire_sessions();
    let r = post(STREAM, &token, json!({"events": [ev]})).await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_counts_a_failed_stream_request_as_one_call() {
    let fake = FakeStripe::start().await;
    let d = TestDaemon::start_stripe(tempfile::tempdir().unwrap(), &fake, |c| {
        stream_mode(&fake)(c);
        c.stripe.breaker_failures = 3;
        c.stripe.breaker_cooldown = Duration::from_secs(2);
    })
    .await;
    payg(&d, "br").await;
    fake.fail_for_on(STREAM, Duration::from_millis(1500), Failure::Status(500));
    let expected = consume_many(&d, &["br"], 250, "k", 2).await;
    eventually(Duration::from_secs(5), || async {
        outbox(&d).await["breaker_open"] == true
    })
    .await;
    // After the cooldown a probe succeeds and the rest follows, exactly once.
    drained(&d, &fake, 250, 20).await;
    // Open after 3 failed requests (not 3 failed events, nor one per event as in v1): at most
    // the failures before the opening one plus one group of `concurrency` (8) requests. The
    // outage (1.5 s) ends before the cooldown (2 s) that began after it, so every 500 of the
    // whole run came before the opening or with it: none while the breaker was open.
    let failed = fake
        .requests()
        .iter()
        .filter(|r| r.path == STREAM && r.status == Some(500))
        .count();
    assert!((3..=2 + 8).contains(&failed), "{failed}");
    assert_exactly_once(&fake, &expected, &[("br", units(250))]);
    let o = outbox(&d).await;
    assert_eq!(o["dead"], 0);
    assert_eq!(o["breaker_open"], false);
    d.stop().await;
}
