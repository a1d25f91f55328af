//! `/readyz` with a large outbox backlog (issue 10 asks under 10 ms with a million items).
//!
//! Run: `cargo bench --bench readyz` (release). Knob: `READYZ_BACKLOG` (default 1000000).
//!
//! 1. Writes `READYZ_BACKLOG` queued billable records into a fresh data dir through the store
//!    (one account, as an offline daemon would have queued them), and closes it.
//! 2. Starts the release `meterd` on it offline (no Stripe key), timing the start (the store
//!    counts the queue once, at open).
//! 3. Sends 2,000 `GET /readyz` one after the other on one connection and prints p50, p99 and
//!    max; each must be 200 and report the whole backlog as `outbox_queued`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::float_arithmetic
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meterd_actors::model::AccountId;
use meterd_actors::store::{OutboxItem, Store, StoreConfig, SyncMode};

fn main() {
    let backlog: u64 = std::env::var("READYZ_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let started = Instant::now();
    {
        let store = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Flush,
            cache_capacity_bytes: 256 << 20,
        })
        .unwrap();
        let a = AccountId::parse("backlog").unwrap();
        for seq in 1..=backlog {
            let item = OutboxItem {
                meter: "tokens".into(),
                value: 1,
                at_ms: 1_700_000_000_000,
                attempts: 0,
                next_at_ms: 1_700_000_000_000,
                last_error: None,
            };
            store.queue_outbox(&a, seq, &item, true).unwrap();
        }
        rt.block_on(store.barrier()).unwrap();
        store.close().unwrap();
    }
    println!(
        "readyz benchmark: {backlog} queued records written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .arg("serve")
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.path())
        .env("METERD_ADMIN_KEY", "readyz-admin-key-0123456789")
        .env_remove("STRIPE_SECRET_KEY")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn meterd");
    let stdout = child.stdout.take().unwrap();
    let mut addr = None;
    for line in BufReader::new(stdout).lines().take(100) {
        if let Some(a) = line.unwrap().strip_prefix("meterd listening on ") {
            addr = Some(a.trim().to_owned());
            break;
        }
    }
    let addr = addr.expect("meterd printed its address");
    let start_secs = started.elapsed().as_secs_f64();

    let (lat, queued) = rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/readyz");
        let mut lat = Vec::with_capacity(2_000);
        let mut queued = 0;
        for _ in 0..2_000 {
            let t = Instant::now();
            let r = http.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let body: serde_json::Value = r.json().await.unwrap();
            lat.push(t.elapsed());
            queued = body["outbox_queued"].as_u64().unwrap();
        }
        (lat, queued)
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert_eq!(queued, backlog, "readyz reports the whole backlog");
    let mut sorted = lat.clone();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  daemon start on the backlog: {start_secs:.2} s (the queue is counted once, at open)"
    );
    println!(
        "  GET /readyz x 2000: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (outbox_queued {queued})",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(*sorted.last().unwrap())
    );
}
