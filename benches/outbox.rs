//! Outbox benchmark: Stripe calls per billable consume, and how fast the outbox drains a
//! backlog into a (counting) fake Stripe on 127.0.0.1, without and with aggregation windows.
//!
//! Run: `cargo bench --bench outbox` (release). Knobs: `OUTBOX_CONSUMES` (default 5000),
//! `OUTBOX_CALLS_PER_SECOND` (the daemon's `stripe.calls_per_second`, default 1000),
//! `OUTBOX_AGGREGATE_S` (comma-separated `stripe.aggregate_s` values, one run each; default
//! `0,1`: off, then one-second windows in real time), `OUTBOX_MODE` (`stripe.meter_events`:
//! `v1`, the default, or `stream`: the v2 meter event stream, up to 100 events per request).
//!
//! 1. A minimal fake Stripe (poem, its own runtime) answers `POST /v1/billing/meter_events`
//!    with a complete meter event and counts requests, distinct identifiers and the units
//!    under them.
//! 2. The release `meterd` starts with its Stripe base URL pointing there, offline-free.
//! 3. The bench consumes `OUTBOX_CONSUMES` billable units on `payg` accounts (64 concurrent
//!    clients), then measures the time until the fake has every unit.
//!
//! Prints: consumes/s while the outbox also sends, drain rate (units/s) from the start to
//! the last unit, Stripe calls per consume, duplicate deliveries (must be 0), and with
//! aggregation the batches formed. Fails unless Stripe ends with exactly the units consumed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::float_arithmetic
)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poem::web::{Data, Form};
use poem::{EndpointExt, Route, handler, post};

#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    ids: Mutex<HashSet<String>>,
    duplicates: AtomicU64,
    /// Units under distinct identifiers.
    units: AtomicU64,
}

#[handler]
fn meter_event(
    Form(form): Form<Vec<(String, String)>>,
    counts: Data<&Arc<Counts>>,
) -> poem::web::Json<serde_json::Value> {
    counts.calls.fetch_add(1, Ordering::Relaxed);
    let get = |k: &str| {
        form.iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let id = get("identifier");
    if counts.ids.lock().unwrap().insert(id.clone()) {
        let units = get("payload[value]").parse::<u64>().unwrap_or(0);
        counts.units.fetch_add(units, Ordering::Relaxed);
    } else {
        counts.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    poem::web::Json(serde_json::json!({
        "object": "billing.meter_event",
        "created": 1_700_000_000,
        "event_name": get("event_name"),
        "identifier": id,
        "livemode": false,
        "payload": {
            "stripe_customer_id": get("payload[stripe_customer_id]"),
            "value": get("payload[value]"),
        },
        "timestamp": get("timestamp").parse::<i64>().unwrap_or(0),
    }))
}

/// `POST /v2/billing/meter_event_session`: a token valid 15 minutes.
#[handler]
fn session(counts: Data<&Arc<Counts>>) -> poem::web::Json<serde_json::Value> {
    counts.calls.fetch_add(1, Ordering::Relaxed);
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    poem::web::Json(serde_json::json!({
        "id": "mes_bench", "object": "v2.billing.meter_event_session",
        "authentication_token": "mes_token_bench",
        "created": meterd_actors::model::format_rfc3339(now),
        "expires_at": meterd_actors::model::format_rfc3339(now + 15 * 60_000),
        "livemode": false,
    }))
}

/// `POST /v2/billing/meter_event_stream`: up to 100 events, counted like v1's.
#[handler]
fn stream(
    poem::web::Json(body): poem::web::Json<serde_json::Value>,
    counts: Data<&Arc<Counts>>,
) -> poem::web::Json<serde_json::Value> {
    counts.calls.fetch_add(1, Ordering::Relaxed);
    let events = body["events"].as_array().cloned().unwrap_or_default();
    assert!(
        events.len() <= 100,
        "{} events in one request",
        events.len()
    );
    for e in events {
        let id = e["identifier"].as_str().unwrap_or_default().to_owned();
        if counts.ids.lock().unwrap().insert(id) {
            let units = e["payload"]["value"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            counts.units.fetch_add(units, Ordering::Relaxed);
        } else {
            counts.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    poem::web::Json(serde_json::json!({}))
}

/// `GET /v1/billing/meters`: one active meter for `tokens`, from Stripe's own fixture.
#[handler]
fn meters() -> poem::web::Json<serde_json::Value> {
    // Embedded, so a missing fixture fails the build instead of degrading the answer.
    const FIXTURES: &str = include_str!("../tests/fixtures/stripe/fixtures3.latest.json");
    let fixtures: serde_json::Value =
        serde_json::from_str(FIXTURES).expect("fixtures3.latest.json is JSON");
    let mut meter = fixtures["resources"]["billing.meter"].clone();
    assert!(
        meter.is_object(),
        "fixtures3.latest.json has a billing.meter"
    );
    meter["event_name"] = serde_json::json!("tokens");
    meter["status"] = serde_json::json!("active");
    poem::web::Json(serde_json::json!({
        "object": "list", "data": [meter], "has_more": false, "url": "/v1/billing/meters"
    }))
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One run's figures.
struct Row {
    aggregate_s: u64,
    consumes_per_s: f64,
    drained_s: f64,
    calls: u64,
    dups: u64,
    batches: u64,
    batched_entries: u64,
}

fn main() {
    let consumes = env_num("OUTBOX_CONSUMES", 5000);
    let cps = env_num("OUTBOX_CALLS_PER_SECOND", 1000);
    let windows: Vec<u64> = std::env::var("OUTBOX_AGGREGATE_S")
        .unwrap_or_else(|_| "0,1".into())
        .split(',')
        .map(|w| {
            w.trim()
                .parse()
                .expect("OUTBOX_AGGREGATE_S: seconds, comma-separated")
        })
        .collect();
    let mode = std::env::var("OUTBOX_MODE").unwrap_or_else(|_| "v1".into());
    assert!(
        mode == "v1" || mode == "stream",
        "OUTBOX_MODE: v1 or stream"
    );
    let rows: Vec<Row> = windows
        .into_iter()
        .map(|w| run(consumes, cps, w, &mode))
        .collect();
    println!("## Outbox benchmark");
    println!();
    println!(
        "| billable consumes | stripe.meter_events | stripe.aggregate_s | consumes/s (outbox sending meanwhile) | time to last unit at Stripe | drain rate | Stripe calls per consume | batches (entries) | duplicate deliveries | calls_per_second |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {consumes} | {mode} | {} | {:.0} | {:.2} s | {:.0} units/s | {:.3} | {} ({}) | {} | {cps} |",
            r.aggregate_s,
            r.consumes_per_s,
            r.drained_s,
            consumes as f64 / r.drained_s,
            r.calls as f64 / consumes as f64,
            r.batches,
            r.batched_entries,
            r.dups,
        );
    }
}

/// Starts a fake and a daemon with `stripe.aggregate_s = aggregate_s`, consumes, and waits
/// until Stripe has every unit.
fn run(consumes: u64, cps: u64, aggregate_s: u64, mode: &str) -> Row {
    let counts = Arc::new(Counts::default());

    // The fake, on its own runtime.
    let fake_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fake_addr = fake_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Route::new()
            .at("/v1/billing/meter_events", post(meter_event))
            .at("/v1/billing/meters", poem::get(meters))
            .at("/v2/billing/meter_event_session", post(session))
            .at("/v2/billing/meter_event_stream", post(stream))
            .data(counts.clone());
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
        tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
        addr
    });

    // The daemon, configured to send there.
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("config.toml")).unwrap();
    let config = shipped
        .replace(
            "api_base = \"https://api.stripe.com/\"",
            &format!("api_base = \"http://{fake_addr}/\""),
        )
        .replace(
            "calls_per_second = 25",
            &format!("calls_per_second = {cps}"),
        )
        .replace("poll_ms = 200", "poll_ms = 10")
        .replace("batch = 100", "batch = 1000")
        .replace("aggregate_s = 0", &format!("aggregate_s = {aggregate_s}"))
        .replace(
            "meter_events = \"v1\"",
            &format!("meter_events = \"{mode}\""),
        )
        .replace(
            "meter_events_stream_base = \"https://meter-events.stripe.com/\"",
            &format!("meter_events_stream_base = \"http://{fake_addr}/\""),
        );
    assert!(config.contains(&format!("meter_events = \"{mode}\"")));
    assert!(config.contains(&format!("aggregate_s = {aggregate_s}")));
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("METERD_ADMIN_KEY", ADMIN)
        .env("METERD_APP_KEY", "bench-app-key-0123456789ab")
        .env("STRIPE_SECRET_KEY", "sk_test_bench")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut addr = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("meterd listening on ") {
            addr = a.trim().to_owned();
            break;
        }
    }
    assert!(!addr.is_empty(), "meterd did not start");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (consumed_s, drained_s, batches, batched_entries) = rt.block_on(async {
        let http = reqwest::Client::new();
        let base = format!("http://{addr}");
        let accounts = 64u64;
        for a in 0..accounts {
            let r = http
                .put(format!("{base}/v1/accounts/b{a}"))
                .bearer_auth(ADMIN)
                .json(
                    &serde_json::json!({"plan": "payg", "stripe_customer_id": format!("cus_{a}")}),
                )
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for a in 0..accounts {
            let http = http.clone();
            let base = base.clone();
            let per = consumes / accounts + u64::from(a < consumes % accounts);
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    let r = http
                        .post(format!("{base}/v1/accounts/b{a}/consume"))
                        .bearer_auth("bench-app-key-0123456789ab")
                        .json(&serde_json::json!({"meter": "tokens", "quantity": 1,
                            "idempotency_key": format!("k{i}")}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let consumed = started.elapsed();
        // Bounded wait for the outbox to drain: every unit at Stripe.
        let deadline = Instant::now() + Duration::from_secs(600);
        while counts.units.load(Ordering::Relaxed) < consumes {
            assert!(Instant::now() < deadline, "outbox did not drain in 600 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drained = started.elapsed();
        let o: serde_json::Value = http
            .get(format!("{base}/v1/admin/outbox"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            consumed.as_secs_f64(),
            drained.as_secs_f64(),
            o["batches_total"].as_u64().unwrap_or(0),
            o["batched_entries_total"].as_u64().unwrap_or(0),
        )
    });
    // Nothing more arrives: Stripe has exactly the units consumed.
    std::thread::sleep(Duration::from_millis(300));
    let calls = counts.calls.load(Ordering::Relaxed);
    let dups = counts.duplicates.load(Ordering::Relaxed);
    let units = counts.units.load(Ordering::Relaxed);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert_eq!(dups, 0, "duplicate deliveries");
    assert_eq!(units, consumes, "Stripe has exactly the units consumed");
    assert!(status.success(), "daemon exit: {status}");
    drop(fake_rt);
    Row {
        aggregate_s,
        consumes_per_s: consumes as f64 / consumed_s,
        drained_s,
        calls,
        dups,
        batches,
        batched_entries,
    }
}

const ADMIN: &str = "bench-admin-key-0123456789";
