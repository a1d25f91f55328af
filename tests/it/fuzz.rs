//! Fuzzing the daemon from outside (issue 11): a short black-box HTTP run against the daemon
//! (random methods, paths, query strings, headers and bodies; see `support/httpfuzz.rs`), and
//! the config parser on mutated and arbitrary text. Neither may panic; no request may go
//! unanswered or get a 5xx. The seed is printed, and `FUZZ_SEED` replays it; `FUZZ_REQUESTS`
//! makes a longer run (the release-binary run is `benches/httpfuzz.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::httpfuzz;
use crate::support::{ADMIN_KEY, APP_KEY, TestDaemon, WEBHOOK_SECRET};

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_http_requests_get_no_5xx_and_always_an_answer() {
    let seed = seed();
    println!("http fuzz seed {seed} (FUZZ_SEED={seed} replays it)");
    let n: usize = std::env::var("FUZZ_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let d = TestDaemon::start_with(|c| c.failed_auth.burst = 1_000_000).await;
    for id in ["fz", "fz2"] {
        d.client
            .put_account(id, serde_json::json!({"plan": "payg"}))
            .await;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let now = meterd_actors::model::Clock::System.now_ms() / 1000;
    let sig = crate::support::signer::sign(b"{}", WEBHOOK_SECRET, now);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut findings = Vec::new();
    for i in 0..n {
        let r = httpfuzz::request(&mut rng, (ADMIN_KEY, APP_KEY), &sig);
        match httpfuzz::send(d.addr, &r).await {
            Ok(Some((status, code))) => {
                *statuses.entry(status).or_default() += 1;
                if status >= 500 && !httpfuzz::setup_answer(status, code.as_deref()) {
                    findings.push(format!("#{i} {status} {code:?}: {r:?}"));
                }
            }
            Ok(None) => findings.push(format!("#{i} no answer: {r:?}")),
            Err(e) => findings.push(format!("#{i} {e}: {r:?}")),
        }
    }
    println!("http fuzz: {n} requests, statuses {statuses:?}");
    assert!(
        findings.is_empty(),
        "seed {seed}: {} findings, first: {}",
        findings.len(),
        findings
            .iter()
            .take(3)
            .map(|f| f.chars().take(600).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Still healthy, and the consume path still works.
    assert_eq!(d.client.get_noauth("/readyz").await.0, 200);
    assert_eq!(d.client.consume("fz2", 1, "after-fuzz").await.status, 200);
    // The run reached the routes, not only the 404 handler.
    assert!(statuses.keys().filter(|s| (200..300).contains(*s)).count() >= 1);
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 50,
        "{statuses:?}"
    );
    d.stop().await;
}

/// Mutations of the shipped config: lines dropped, duplicated, values replaced, the text cut.
fn mutate(rng: &mut StdRng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let values = [
        "-1",
        "0",
        "18446744073709551616",
        "9223372036854775807",
        "\"\"",
        "\"x\"",
        "1.5",
        "true",
        "[]",
        "{}",
        "\"127.0.0.1:99999\"",
        "\"/\"",
        "\"ünï\"",
        "nan",
        "inf",
    ];
    for _ in 0..rng.random_range(1..6) {
        if lines.is_empty() {
            break;
        }
        let i = rng.random_range(0..lines.len());
        match rng.random_range(0..5) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            2 => {
                if let Some((k, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{k}= {}", values[rng.random_range(0..values.len())]);
                }
            }
            3 => lines.insert(i, "[plans.x.meters.y]".into()),
            _ => {
                let l = &lines[i];
                let cut = rng.random_range(0..=l.len());
                lines[i] = l.chars().take(cut).collect();
            }
        }
    }
    lines.join("\n")
}

#[test]
fn the_config_parser_never_panics() {
    let seed = seed();
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let base = Path::new("/nonexistent-base");
    let (mut ok, mut refused) = (0, 0);
    let n: usize = std::env::var("FUZZ_CONFIGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    for _ in 0..n {
        let t = if rng.random_range(0..10) == 0 {
            (0..rng.random_range(0..200))
                .map(|_| char::from(rng.random_range(b' '..=b'~')))
                .collect()
        } else {
            mutate(&mut rng, &text)
        };
        let r = std::panic::catch_unwind(|| meterd::config::Config::parse(&t, "fuzz", base));
        match r {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => {
                refused += 1;
                // A refusal names what to fix.
                assert!(!e.to_string().is_empty());
            }
            Err(_) => panic!("seed {seed}: the config parser panicked on:\n{t}"),
        }
    }
    println!("config fuzz seed {seed}: {ok} accepted, {refused} refused");
    assert!(
        refused > 100 && ok > 100,
        "{ok} accepted, {refused} refused"
    );
}
