//! Aggregation windows of the Stripe outbox against the spec-checked fake Stripe: the billable
//! entries of one account, meter and window become one meter event whose value is their sum
//! and whose identifier names the range, fixed durably before the first send, so every unit
//! reaches Stripe exactly once through failures, restarts and kill -9.

use std::collections::BTreeMap;
use std::time::Duration;

use meterd_actors::model::{Clock, format_rfc3339};
use serde_json::{Value, json};

use crate::support::fake_stripe::{AcceptedEvent, Failure, FakeStripe};
use crate::support::{ADMIN_KEY, TestDaemon, eventually};

const EVENTS: &str = "/v1/billing/meter_events";
/// 2026-03-10T00:00:00Z: mid-month, so the calendar-month period has no boundary nearby.
const DAY: i64 = 1_773_100_800_000;
const MIN: i64 = 60_000;

/// A daemon with a Stripe key, fast retries, the given clock, and a 60 s window on every meter
/// unless `tweak` says otherwise.
async fn start(
    dir: tempfile::TempDir,
    fake: &FakeStripe,
    clock: Clock,
    tweak: impl FnOnce(&mut meterd::config::Config),
) -> TestDaemon {
    let base = fake.base_url();
    let mut secrets = crate::support::secrets();
    secrets.stripe_key = Some(crate::support::fake_stripe::SECRET_KEY.into());
    TestDaemon::start_full(
        dir,
        move |c| {
            c.stripe.api_base = base;
            c.stripe.poll = Duration::from_millis(20);
            c.stripe.base_backoff = Duration::from_millis(10);
            c.stripe.max_backoff = Duration::from_millis(100);
            c.stripe.timeout = Duration::from_secs(2);
            c.stripe.calls_per_second = 1000;
            c.stripe.aggregation.default_s = 60;
            tweak(c);
        },
        clock,
        secrets,
    )
    .await
}

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

/// Waits (bounded) until `queued` entries are left and, if any are, the outbox's last full
/// pass found all of them waiting for their window. The outbox answers between passes, never
/// during one, and sends only queued entries (one in flight is still queued), so from then on
/// nothing is sent until the (manual) clock moves or usage is added. This is the event that
/// negative checks ("nothing more reached Stripe") wait for, instead of a fixed sleep.
async fn settled(d: &TestDaemon, queued: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o = outbox(d, "pending").await;
        if o["queued"] == queued && (queued == 0 || o["waiting_window"] == queued) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox did not settle with {queued} queued, all waiting: {o}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn payg(d: &TestDaemon, id: &str) {
    let r = d
        .client
        .put_account(
            id,
            json!({"plan": "payg", "stripe_customer_id": format!("cus_{id}")}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

/// Consumes `q` units; returns the ledger seq.
async fn consume(d: &TestDaemon, id: &str, q: u64, key: &str) -> u64 {
    let r = d.client.consume(id, q, key).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["ledger_seq"].as_u64().unwrap()
}

/// Billable units in the account's ledger.
async fn billable_units(d: &TestDaemon, id: &str) -> u64 {
    d.client
        .ledger(id)
        .await
        .iter()
        .filter_map(|e| e["billable"].as_u64())
        .sum()
}

fn sorted(events: &[AcceptedEvent]) -> Vec<(String, String, i64)> {
    let mut v: Vec<_> = events
        .iter()
        .map(|e| (e.identifier.clone(), e.value.clone(), e.timestamp))
        .collect();
    v.sort();
    v
}

/// Units Stripe has for `account` (identifiers `{account}:…`), each identifier once.
fn units_of(events: &[AcceptedEvent], account: &str) -> u64 {
    let prefix = format!("{account}:");
    events
        .iter()
        .filter(|e| e.identifier.starts_with(&prefix))
        .map(|e| e.value.parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_per_account_and_window_with_the_sum_and_the_range() {
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + 10_000);
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), |_| {}).await;
    payg(&d, "a").await;
    payg(&d, "b").await;
    // Window 1: [DAY + 1 min, DAY + 2 min).
    let w1 = DAY + MIN;
    clock.set_ms(w1 + 1_000);
    let a1 = consume(&d, "a", 2, "a1").await;
    let a2 = consume(&d, "a", 3, "a2").await;
    let b1 = consume(&d, "b", 7, "b1").await;
    clock.set_ms(w1 + 59_000);
    let a3 = consume(&d, "a", 5, "a3").await;
    let b2 = consume(&d, "b", 1, "b2").await;
    // Window 2. Window 1 has its grace second left: nothing is sent yet, and the queue says
    // when each entry will be merged.
    clock.set_ms(w1 + MIN + 500);
    let a4 = consume(&d, "a", 4, "a4").await;
    // A full pass at this (manual, now fixed) time found all six waiting: nothing is due
    // until the clock moves.
    settled(&d, 6).await;
    assert!(fake.meter_events().is_empty(), "{:?}", fake.meter_events());
    let o = outbox(&d, "pending").await;
    assert_eq!(o["queued"], 6, "{o}");
    assert_eq!(o["waiting_window"], 6, "{o}");
    let merged: Vec<(u64, String)> = o["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["ledger_seq"].as_u64().unwrap(),
                i["merged_at"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        merged.contains(&(a1, format_rfc3339(w1 + MIN + 1_000))),
        "{merged:?}"
    );
    assert!(
        merged.contains(&(a4, format_rfc3339(w1 + 2 * MIN + 1_000))),
        "{merged:?}"
    );
    // Window 1 closes: one event per account, the sum, the range, the window's start.
    clock.set_ms(w1 + MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= 2
    })
    .await;
    let ts = w1 / 1000;
    assert_eq!(
        sorted(&fake.meter_events()),
        vec![
            (format!("a:{a1}-{a3}"), "10".to_owned(), ts),
            (format!("b:{b1}-{b2}"), "8".to_owned(), ts),
        ]
    );
    assert!(a1 < a2 && a2 < a3, "the range holds a2 too");
    let events = fake.meter_events();
    assert!(events.iter().all(|e| e.event_name == "tokens"));
    let a_event = events
        .iter()
        .find(|e| e.identifier.starts_with("a:"))
        .unwrap();
    assert_eq!(a_event.customer, "cus_a");
    // Window 2 is still open: both batches are settled and a pass found a4 waiting.
    settled(&d, 1).await;
    assert_eq!(fake.meter_events().len(), 2);
    let o = outbox(&d, "pending").await;
    assert_eq!(o["batches_total"], 2, "{o}");
    assert_eq!(o["batched_entries_total"], 5, "{o}");
    // A window with a single entry sends it as the entry it is.
    clock.set_ms(w1 + 2 * MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= 3
    })
    .await;
    assert!(
        sorted(&fake.meter_events()).contains(&(
            format!("a:{a4}"),
            "4".to_owned(),
            (w1 + MIN + 500) / 1000
        )),
        "{:?}",
        fake.meter_events()
    );
    // Stripe has exactly the billable units, per account, each identifier once.
    let events = fake.meter_events();
    assert_eq!(units_of(&events, "a"), billable_units(&d, "a").await);
    assert_eq!(units_of(&events, "b"), billable_units(&d, "b").await);
    assert_eq!(units_of(&events, "a"), 14);
    // Two calls for five entries of window 1, one for window 2.
    assert_eq!(fake.count(EVENTS), 3);
    assert!(
        fake.spec_violations().is_empty(),
        "{:?}",
        fake.spec_violations()
    );
    eventually(Duration::from_secs(5), || async {
        outbox(&d, "pending").await["queued"] == 0
    })
    .await;
    // A restart (recovery queues the ledger tail again) sends nothing again.
    let dir = d.stop().await;
    let d = start(dir, &fake, clock.clone(), |_| {}).await;
    // Reading a's account runs its recovery too (b's runs with the consume).
    assert_eq!(d.client.get_account("a").await.status, 200);
    consume(&d, "b", 1, "b3").await;
    clock.set_ms(w1 + 3 * MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= 4
    })
    .await;
    settled(&d, 0).await;
    assert_eq!(fake.count(EVENTS), 4);
    let events = fake.meter_events();
    assert_eq!(units_of(&events, "a"), billable_units(&d, "a").await);
    assert_eq!(units_of(&events, "b"), billable_units(&d, "b").await);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_fixed_before_its_first_send_and_retried_as_a_unit_across_a_restart() {
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + 10_000);
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), |c| {
        c.stripe.breaker_failures = 1000;
    })
    .await;
    payg(&d, "r").await;
    let w1 = DAY + MIN;
    clock.set_ms(w1 + 1_000);
    let mut seqs = Vec::new();
    for (i, q) in [1u64, 2, 3].iter().enumerate() {
        seqs.push(consume(&d, "r", *q, &format!("k{i}")).await);
    }
    // Stripe fails while the window closes: the batch forms, is tried, and waits.
    fake.fail_for_on(EVENTS, Duration::from_secs(60), Failure::Status(500));
    clock.set_ms(w1 + MIN + 2_000);
    let batch_id = format!("r:{}-{}", seqs[0], seqs[2]);
    eventually(Duration::from_secs(10), || async {
        let o = outbox(&d, "pending").await;
        o["items"][0]["attempts"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    // Retries come due as (the manual) time passes.
    clock.set_ms(w1 + MIN + 4_000);
    eventually(Duration::from_secs(10), || async {
        let o = outbox(&d, "pending").await;
        o["items"][0]["attempts"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let o = outbox(&d, "pending").await;
    let item = &o["items"][0];
    assert_eq!(o["queued"], 1, "{o}");
    assert_eq!(item["identifier"], batch_id.as_str(), "{item}");
    assert_eq!(item["ledger_seq"], seqs[0]);
    assert_eq!(item["last_ledger_seq"], seqs[2]);
    assert_eq!(item["entries"], 3);
    assert_eq!(item["value"], 6);
    assert_eq!(item["at"], format_rfc3339(w1));
    assert!(item.get("merged_at").is_none(), "{item}");
    // A late entry of the same window (a clock that went back) never joins the fixed batch.
    clock.set_ms(w1 + 30_000);
    let late = consume(&d, "r", 10, "late").await;
    clock.set_ms(w1 + MIN + 6_000);
    // Restart with the batch unsent: recovery queues the ledger tail again.
    let dir = d.stop().await;
    fake.clear_failures();
    let d = start(dir, &fake, clock.clone(), |_| {}).await;
    // A retry tried just before the stop is due up to `max_backoff` (100 ms) later on the
    // manual clock, which does not move by itself: move it past that.
    clock.set_ms(w1 + MIN + 7_000);
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= 2
    })
    .await;
    settled(&d, 0).await;
    assert_eq!(
        sorted(&fake.meter_events()),
        vec![
            (batch_id.clone(), "6".to_owned(), w1 / 1000),
            (format!("r:{late}"), "10".to_owned(), (w1 + 30_000) / 1000),
        ]
    );
    // Every attempt of the batch carried the same value under the same identifier.
    let tries: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| {
            r.path == EVENTS
                && r.params
                    .iter()
                    .any(|(k, v)| k == "identifier" && *v == batch_id)
        })
        .map(|r| {
            r.params
                .iter()
                .find(|(k, _)| k == "payload[value]")
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert!(tries.len() >= 3, "{tries:?}");
    assert!(tries.iter().all(|v| v == "6"), "{tries:?}");
    assert_eq!(
        units_of(&fake.meter_events(), "r"),
        billable_units(&d, "r").await
    );
    assert!(fake.spec_violations().is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_with_more_entries_than_a_batch_holds_becomes_several_ranges() {
    let max_len = meterd_actors::outbox::MAX_MEMBERS;
    let max = max_len as u64;
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + MIN + 1_000);
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), |_| {}).await;
    payg(&d, "f").await;
    let n = max + 2;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let client = d.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in (t..n).step_by(8) {
                let r = client.consume("f", 1, &format!("f{i}")).await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                seqs.push(r.body["ledger_seq"].as_u64().unwrap());
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap());
    }
    seqs.sort_unstable();
    clock.set_ms(DAY + 2 * MIN + 1_000);
    eventually(Duration::from_secs(20), || async {
        units_of(&fake.meter_events(), "f") >= n
    })
    .await;
    settled(&d, 0).await;
    let first = seqs[0];
    let cut = seqs[max_len - 1];
    let next = seqs[max_len];
    let last = seqs[seqs.len() - 1];
    let ts = (DAY + MIN) / 1000;
    assert_eq!(
        sorted(&fake.meter_events()),
        vec![
            (format!("f:{first}-{cut}"), max.to_string(), ts),
            (format!("f:{next}-{last}"), "2".to_owned(), ts),
        ]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_is_split_at_a_billing_period_boundary() {
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + 10_000);
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), |_| {}).await;
    payg(&d, "p").await;
    let w1 = DAY + MIN;
    clock.set_ms(w1 + 5_000);
    let p1 = consume(&d, "p", 1, "p1").await;
    let p2 = consume(&d, "p", 2, "p2").await;
    // A new billing period begins 25 s into the window.
    clock.set_ms(w1 + 26_000);
    let r = d
        .client
        .put_account(
            "p",
            json!({"period": {"start": format_rfc3339(w1 + 25_000), "end": format_rfc3339(w1 + 25_000 + 30 * 86_400_000)}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let p3 = consume(&d, "p", 3, "p3").await;
    let p4 = consume(&d, "p", 4, "p4").await;
    clock.set_ms(w1 + MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= 2
    })
    .await;
    settled(&d, 0).await;
    // Each part lands in its own Stripe period: timestamped at the window's start and at
    // the period's start.
    assert_eq!(
        sorted(&fake.meter_events()),
        vec![
            (format!("p:{p1}-{p2}"), "3".to_owned(), w1 / 1000),
            (format!("p:{p3}-{p4}"), "7".to_owned(), (w1 + 25_000) / 1000),
        ]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_zero_sends_every_entry_at_once_and_windows_resolve_per_account() {
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + MIN + 1_000);
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), |c| {
        // Off by default; one account aggregates its tokens.
        c.stripe.aggregation.default_s = 0;
        c.stripe
            .aggregation
            .accounts
            .entry("big".into())
            .or_default()
            .insert("tokens".into(), 300);
    })
    .await;
    payg(&d, "small").await;
    payg(&d, "big").await;
    let s1 = consume(&d, "small", 2, "s1").await;
    let s2 = consume(&d, "small", 3, "s2").await;
    let g1 = consume(&d, "big", 4, "g1").await;
    let g2 = consume(&d, "big", 5, "g2").await;
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= 2
    })
    .await;
    // small's entries are settled; big's two wait for their window (the clock is fixed).
    settled(&d, 2).await;
    // Window 0: exactly as without aggregation, one event per entry, at once.
    let ts = (DAY + MIN + 1_000) / 1000;
    assert_eq!(
        sorted(&fake.meter_events()),
        vec![
            (format!("small:{s1}"), "2".to_owned(), ts),
            (format!("small:{s2}"), "3".to_owned(), ts),
        ]
    );
    let o = outbox(&d, "pending").await;
    assert_eq!(o["queued"], 2, "{o}");
    assert_eq!(o["batches_total"], 0, "{o}");
    // big's 300 s window: [DAY, DAY + 5 min).
    assert!(
        o["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["merged_at"] == format_rfc3339(DAY + 5 * MIN + 1_000)),
        "{o}"
    );
    clock.set_ms(DAY + 5 * MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        fake.meter_events().len() >= 3
    })
    .await;
    assert!(
        sorted(&fake.meter_events()).contains(&(
            format!("big:{g1}-{g2}"),
            "9".to_owned(),
            DAY / 1000
        )),
        "{:?}",
        fake.meter_events()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_batch_is_listed_with_its_range_and_retried_as_a_unit() {
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + MIN + 1_000);
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), |_| {}).await;
    payg(&d, "x").await;
    let x1 = consume(&d, "x", 2, "x1").await;
    let x2 = consume(&d, "x", 3, "x2").await;
    fake.fail_next_on(EVENTS, 1, Failure::Status(404));
    clock.set_ms(DAY + 2 * MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        outbox(&d, "dead").await["dead"] == 1
    })
    .await;
    let dead = outbox(&d, "dead").await;
    let item = &dead["items"][0];
    let batch_id = format!("x:{x1}-{x2}");
    assert_eq!(item["identifier"], batch_id.as_str(), "{item}");
    assert_eq!(item["ledger_seq"], x1);
    assert_eq!(item["last_ledger_seq"], x2);
    assert_eq!(item["entries"], 2);
    assert_eq!(item["value"], 5);
    assert!(
        item["last_error"].as_str().unwrap().contains("404"),
        "{item}"
    );
    assert_eq!(outbox(&d, "pending").await["queued"], 0);
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
    eventually(Duration::from_secs(10), || async {
        !fake.meter_events().is_empty()
    })
    .await;
    settled(&d, 0).await;
    assert_eq!(
        sorted(&fake.meter_events()),
        vec![(batch_id, "5".to_owned(), (DAY + MIN) / 1000)]
    );
    assert_eq!(outbox(&d, "dead").await["dead"], 0);
    d.stop().await;
}

/// An entry Stripe may already have under its own identifier (a send was attempted) is never
/// merged into a batch, even when aggregation is switched on across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_stripe_may_have_seen_are_never_merged_after_a_config_change() {
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + MIN + 1_000);
    let off = |c: &mut meterd::config::Config| {
        c.stripe.aggregation.default_s = 0;
        c.stripe.breaker_failures = 1000;
    };
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), off).await;
    payg(&d, "c").await;
    // Stripe takes s1 but the answer is lost; s2 fails outright.
    fake.fail_next_on(EVENTS, 1, Failure::DropAfterProcessing);
    let s1 = consume(&d, "c", 2, "s1").await;
    eventually(Duration::from_secs(10), || async {
        outbox(&d, "pending").await["failed_attempts_total"] == 1
    })
    .await;
    assert_eq!(fake.meter_events().len(), 1);
    fake.fail_for_on(EVENTS, Duration::from_secs(60), Failure::Status(500));
    let s2 = consume(&d, "c", 3, "s2").await;
    eventually(Duration::from_secs(10), || async {
        // s2 keeps failing (and retrying) under the 500s: at least one failure each.
        outbox(&d, "pending").await["failed_attempts_total"]
            .as_u64()
            .is_some_and(|n| n >= 2)
    })
    .await;
    let dir = d.stop().await;
    fake.clear_failures();
    // Aggregation on: two new entries in the same window join a batch; s1 and s2 do not.
    let d = start(dir, &fake, clock.clone(), |c| {
        c.stripe.breaker_failures = 1000;
    })
    .await;
    let s3 = consume(&d, "c", 4, "s3").await;
    let s4 = consume(&d, "c", 5, "s4").await;
    clock.set_ms(DAY + 2 * MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        outbox(&d, "pending").await["queued"] == 0
    })
    .await;
    let ts = (DAY + MIN + 1_000) / 1000;
    assert_eq!(
        sorted(&fake.meter_events()),
        vec![
            (format!("c:{s1}"), "2".to_owned(), ts),
            (format!("c:{s2}"), "3".to_owned(), ts),
            (format!("c:{s3}-{s4}"), "9".to_owned(), (DAY + MIN) / 1000),
        ]
    );
    assert_eq!(
        units_of(&fake.meter_events(), "c"),
        billable_units(&d, "c").await
    );
    d.stop().await;
}

/// Old `sent` records and batch marks are pruned once the account's snapshot covers their
/// entries; recovery then still sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_records_older_than_40_days_are_pruned_and_never_resent() {
    let fake = FakeStripe::start().await;
    let clock = Clock::manual(DAY + 10_000);
    let d = start(tempfile::tempdir().unwrap(), &fake, clock.clone(), |_| {}).await;
    payg(&d, "old").await;
    clock.set_ms(DAY + MIN + 1_000);
    for i in 0..3 {
        consume(&d, "old", 1, &format!("o{i}")).await;
    }
    clock.set_ms(DAY + 2 * MIN + 1_000);
    eventually(Duration::from_secs(10), || async {
        outbox(&d, "pending").await["sent"] == 1
    })
    .await;
    assert_eq!(fake.meter_events().len(), 1);
    // A clean stop writes the account's snapshot.
    let dir = d.stop().await;
    clock.set_ms(DAY + 41 * 86_400_000);
    let d = start(dir, &fake, clock.clone(), |_| {}).await;
    eventually(Duration::from_secs(10), || async {
        let o = outbox(&d, "pending").await;
        o["sent"] == 0 && o["pruned_total"] == 4
    })
    .await;
    // The account works on; nothing old is queued or sent again.
    consume(&d, "old", 1, "later").await;
    // The consume ran the account's recovery; a full pass since found only `later`, waiting
    // for its window (an old entry queued again would be due at once, and sent by that pass).
    settled(&d, 1).await;
    let o = outbox(&d, "pending").await;
    assert_eq!(o["queued"], 1, "{o}");
    assert_eq!(o["dead"], 0, "{o}");
    assert_eq!(fake.count(EVENTS), 1);
    d.stop().await;
}

/// kill -9 of the real binary after a batch formed but before Stripe took it, and again while
/// a batch is in flight with its answer lost: Stripe ends up with every acknowledged billable
/// unit exactly once (one-second windows, real time).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_between_batching_and_sending_bills_every_unit_exactly_once() {
    use crate::support::BinDaemon;

    let fake = FakeStripe::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let ours = crate::support::shipped_config_on_fake(&fake.base_url())
        .replace("breaker_failures = 5", "breaker_failures = 1000")
        // The outage of round 1 must not dead-letter anything.
        .replace("max_attempts = 12", "max_attempts = 1000")
        .replace("aggregate_s = 0", "aggregate_s = 1");
    assert!(ours.contains("aggregate_s = 1"));
    std::fs::write(&config, ours).unwrap();
    let data = dir.path().join("data");
    let env = [("STRIPE_SECRET_KEY", crate::support::fake_stripe::SECRET_KEY)];
    // seq -> quantity of every acknowledged consume.
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let load = |d: &BinDaemon, round: u64| {
        let client = d.client.clone();
        async move {
            let mut out = Vec::new();
            for i in 0..40u64 {
                let q = i % 4 + 1;
                let r = client.consume("k9", q, &format!("r{round}-{i}")).await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                out.push((r.body["ledger_seq"].as_u64().unwrap(), q));
                // Spread over more than one window.
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            out
        }
    };
    let admin = |d: &BinDaemon| {
        let client = d.client.clone();
        async move {
            let r = client
                .send(
                    reqwest::Method::GET,
                    "/v1/admin/outbox?state=pending",
                    Some(ADMIN_KEY),
                    None,
                )
                .await;
            r.body
        }
    };

    // Round 1: Stripe is down. Batches form and fail; kill -9 with them unsent.
    fake.fail_for_on(EVENTS, Duration::from_secs(600), Failure::Status(500));
    let d = BinDaemon::start_config(&config, &data, &env, true, None);
    let r = d
        .client
        .put_account(
            "k9",
            json!({"plan": "payg", "stripe_customer_id": "cus_k9"}),
        )
        .await;
    assert_eq!(r.status, 201);
    acked.extend(load(&d, 1).await);
    eventually(Duration::from_secs(15), || async {
        let o = admin(&d).await;
        o["batches_total"].as_u64().unwrap_or(0) >= 2
            && o["items"].as_array().is_some_and(|items| {
                items
                    .iter()
                    .any(|i| i["entries"].as_u64().is_some() && i["attempts"].as_u64() >= Some(1))
            })
    })
    .await;
    assert!(fake.meter_events().is_empty());
    tokio::task::spawn_blocking(move || d.kill9())
        .await
        .unwrap();

    // Round 2: Stripe is back but loses the answer to the first event it takes; kill -9 as
    // soon as Stripe has something (sends are in flight).
    fake.clear_failures();
    fake.fail_next_on(EVENTS, 1, Failure::DropAfterProcessing);
    let d = BinDaemon::start_config(&config, &data, &env, true, None);
    acked.extend(load(&d, 2).await);
    eventually(Duration::from_secs(15), || async {
        !fake.meter_events().is_empty()
    })
    .await;
    tokio::task::spawn_blocking(move || d.kill9())
        .await
        .unwrap();

    // Round 3: everything drains.
    let d = BinDaemon::start_config(&config, &data, &env, true, None);
    acked.extend(load(&d, 3).await);
    let total: u64 = acked.values().sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while units_of(&fake.meter_events(), "k9") < total {
        if std::time::Instant::now() > deadline {
            let o = admin(&d).await;
            let dead = d
                .client
                .send(
                    reqwest::Method::GET,
                    "/v1/admin/outbox?state=dead",
                    Some(ADMIN_KEY),
                    None,
                )
                .await
                .body;
            panic!(
                "Stripe has {} of {total} units; outbox {o}; dead {dead}; events {:?}; acked {acked:?}",
                units_of(&fake.meter_events(), "k9"),
                sorted(&fake.meter_events())
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing is left behind (a re-queued member would be stuck or sent twice), and with the
    // queue empty nothing more is sent.
    eventually(Duration::from_secs(10), || async {
        admin(&d).await["queued"] == 0
    })
    .await;
    let events = fake.meter_events();
    let mut by_id = BTreeMap::new();
    for e in &events {
        assert!(
            by_id.insert(e.identifier.clone(), e).is_none(),
            "identifier {} accepted twice",
            e.identifier
        );
    }
    // Every acknowledged entry lies in exactly one event's range, and each event's value is
    // the sum of the entries in its range.
    let mut covered: BTreeMap<u64, &str> = BTreeMap::new();
    let mut merged = 0;
    for (id, e) in &by_id {
        let range = id.strip_prefix("k9:").unwrap();
        let (first, last) = match range.split_once('-') {
            Some((f, l)) => {
                merged += 1;
                (f.parse::<u64>().unwrap(), l.parse::<u64>().unwrap())
            }
            None => {
                let s = range.parse::<u64>().unwrap();
                (s, s)
            }
        };
        let mut sum = 0;
        for (seq, q) in acked.range(first..=last) {
            assert!(
                covered.insert(*seq, id).is_none(),
                "entry {seq} is in two events"
            );
            sum += q;
        }
        assert_eq!(e.value, sum.to_string(), "value of {id}");
    }
    assert_eq!(
        covered.keys().copied().collect::<Vec<_>>(),
        acked.keys().copied().collect::<Vec<_>>(),
        "every acknowledged entry reached Stripe"
    );
    assert_eq!(units_of(&events, "k9"), total);
    assert!(
        merged >= 3,
        "{merged} batches among {} events",
        events.len()
    );
    assert!(
        events.len() * 4 < acked.len(),
        "{} events for {} entries",
        events.len(),
        acked.len()
    );
    assert!(fake.spec_violations().is_empty());
    let status = tokio::task::spawn_blocking(move || d.sigterm(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success());
}
