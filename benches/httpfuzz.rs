//! The long black-box HTTP fuzz run (issue 11) against the release binary:
//!
//!     cargo build --release && cargo bench --bench httpfuzz -- [requests] [seed]
//!
//! Starts `target/release/meterd` on 127.0.0.1:0 with a temp data dir and the shipped config,
//! sends random methods, paths, query strings, headers and bodies (the generator of
//! `tests/it/support/httpfuzz.rs`) over raw HTTP/1.1, and reports requests, time, statuses,
//! unanswered requests, 5xx answers (other than the documented setup answers of an offline
//! daemon) and panics in the daemon's stderr. Exits non-zero on any finding.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::float_arithmetic
)]

#[path = "../tests/it/support/httpfuzz.rs"]
mod httpfuzz;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

const ADMIN_KEY: &str = "fuzz-admin-key-0123456789";
const APP_KEY: &str = "fuzz-app-key-0123456789ab";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/release/meterd");
    assert!(bin.is_file(), "build it first: cargo build --release");
    let dir = tempfile::tempdir().unwrap();
    // The shipped config, with the per-peer limit on wrong keys lifted: every request of the
    // run comes from one address, and a limited peer would only see 429s.
    let shipped = std::fs::read_to_string(root.join("config.toml")).unwrap();
    let config = shipped
        .replace("failed_per_minute = 30", "failed_per_minute = 1000000")
        .replace("failed_burst = 10", "failed_burst = 1000000");
    assert_ne!(config, shipped);
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(&bin)
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("METERD_ADMIN_KEY", ADMIN_KEY)
        .env("METERD_APP_KEY", APP_KEY)
        .env("STRIPE_WEBHOOK_SECRET", "whsec_fuzz_0123456789abcdef")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    {
        let (pipe, log) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("meterd listening on ") {
                let _ = tx.send(a.trim().to_owned());
            }
        }
    });
    let addr: std::net::SocketAddr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .parse()
        .unwrap();
    let sig = format!("t={},v1={}", 1_700_000_000, "ab".repeat(32));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let (mut unanswered, mut server_errors) = (0usize, 0usize);
    let mut first: Vec<String> = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let r = httpfuzz::request(&mut rng, (ADMIN_KEY, APP_KEY), &sig);
        match httpfuzz::send(addr, &r).await {
            Ok(Some((status, code))) => {
                *statuses.entry(status).or_default() += 1;
                if status >= 500 && !httpfuzz::setup_answer(status, code.as_deref()) {
                    server_errors += 1;
                    if first.len() < 3 {
                        first.push(format!("#{i} {status} {code:?}: {r:?}"));
                    }
                }
            }
            _ => {
                unanswered += 1;
                if first.len() < 3 {
                    first.push(format!("#{i} unanswered: {r:?}"));
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let panics = stderr.lock().unwrap().matches("panicked").count();
    println!(
        "httpfuzz: seed {seed}, {n} requests in {:.1} s ({:.0}/s); statuses {statuses:?}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "httpfuzz: unanswered {unanswered}, 5xx {server_errors}, panics {panics}, daemon alive at the end: {alive}"
    );
    for f in &first {
        println!("finding: {}", f.chars().take(800).collect::<String>());
    }
    if unanswered + server_errors + panics > 0 || !alive {
        std::process::exit(1);
    }
}
