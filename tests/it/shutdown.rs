//! Orderly stop of the real binary: SIGTERM under load and when idle exits 0 without losing an
//! acknowledged consume, the data directory verifies afterwards, and `check-config` accepts the
//! shipped config and rejects unknown keys. Every loop and every wait is bounded.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::crash::{Ack, Req, classify, try_consume};
use crate::support::seed::TestSeed;
use crate::support::{BinDaemon, Client, ledger_verify, meterd_bin};

const TASKS: usize = 16;
const PER_TASK: usize = 2000;
const SIGTERM_BOUND: Duration = Duration::from_secs(20);

async fn start(dir: PathBuf) -> BinDaemon {
    tokio::task::spawn_blocking(move || BinDaemon::start(&dir, &[]))
        .await
        .expect("start meterd")
}

async fn sigterm(d: BinDaemon) -> (ExitStatus, Duration) {
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let s = d.sigterm(SIGTERM_BOUND);
        (s, t.elapsed())
    })
    .await
    .expect("sigterm task")
}

async fn verify_ok(data: &Path) {
    let data = data.to_path_buf();
    let out = tokio::task::spawn_blocking(move || ledger_verify(&data))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ledger OK"),
        "ledger verify: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Consumes with unique keys until an error (the daemon stopping) or `PER_TASK` requests.
/// Returns the acknowledged consumes and the one request whose fate is unknown, if any.
async fn load_task(
    client: Client,
    account: String,
    task: usize,
    seed: u64,
) -> (Vec<Ack>, Option<Req>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acks = Vec::new();
    for n in 0..PER_TASK {
        let req = Req {
            account: account.clone(),
            key: format!("sd-t{task}-{n}"),
            quantity: rng.random_range(1..=5),
        };
        match try_consume(&client, &req).await {
            Ok(resp) => match classify(&req, &resp) {
                Some(a) => acks.push(a),
                None => return (acks, Some(req)),
            },
            Err(_) => return (acks, Some(req)),
        }
    }
    (acks, None)
}

/// The account's consume entries by key; fails on a key that appears twice. Also returns the
/// sum of allowed quantities in the current period.
async fn consumes_by_key(client: &Client, id: &str) -> (HashMap<String, Value>, u64) {
    let mut by_key = HashMap::new();
    let mut allowed = 0u64;
    for e in client.ledger(id).await {
        match e["kind"].as_str() {
            Some("consume") => {
                if e["decision"] == "allowed" {
                    allowed += e["quantity"].as_u64().unwrap();
                }
                let key = e["idempotency_key"].as_str().unwrap().to_owned();
                let prev = by_key.insert(key.clone(), e.clone());
                assert!(
                    prev.is_none(),
                    "{id}: key {key} appears twice: {prev:?} and {e}"
                );
            }
            Some("period_rolled") => allowed = 0,
            _ => {}
        }
    }
    (by_key, allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_zero_and_keeps_every_acknowledged_consume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let id = "sd-pro";
    let d = start(data.clone()).await;
    let r = d.client.put_account(id, json!({"plan": "pro"})).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // Replay: METERD_TEST_SEED=<seed> (printed now, and with the command if the test fails).
    let seed = TestSeed::draw(
        "shutdown::sigterm_under_load_exits_zero_and_keeps_every_acknowledged_consume",
    );
    let mut rng = seed.rng();
    let handles: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(load_task(d.client.clone(), id.to_owned(), t, rng.random())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, took) = sigterm(d).await;
    assert!(
        status.success(),
        "meterd must exit 0 on SIGTERM under load, got {status:?}"
    );
    assert_eq!(status.code(), Some(0));

    let mut acks: Vec<Ack> = Vec::new();
    let mut unknown: Vec<Req> = Vec::new();
    for h in handles {
        let (a, u) = tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("client tasks stop once the daemon is gone")
            .expect("client task");
        acks.extend(a);
        unknown.extend(u);
    }
    println!(
        "SIGTERM under load: exit after {took:?}, {} acknowledged, {} unanswered",
        acks.len(),
        unknown.len()
    );
    assert!(acks.len() > 50, "too little load: {}", acks.len());

    let d = start(data.clone()).await;
    let (by_key, allowed) = consumes_by_key(&d.client, id).await;
    for a in &acks {
        let e = by_key
            .get(&a.req.key)
            .unwrap_or_else(|| panic!("acknowledged {a:?} lost across SIGTERM"));
        assert_eq!(e["seq"].as_u64(), Some(a.seq), "{a:?}: {e}");
        assert_eq!(e["quantity"].as_u64(), Some(a.req.quantity), "{a:?}: {e}");
        assert_eq!(e["decision"], "allowed", "{a:?}: {e}");
    }
    let acc = d.client.get_account(id).await;
    assert_eq!(acc.status, 200, "{}", acc.body);
    assert_eq!(
        acc.body["meters"]["tokens"]["used"].as_u64(),
        Some(allowed),
        "`used` must equal the allowed consumes in the ledger: {}",
        acc.body
    );
    // Nothing was acknowledged that is not in the ledger, and the ledger holds nothing but
    // acknowledged consumes and the at most one unanswered request per task.
    let known: HashSet<&str> = acks
        .iter()
        .map(|a| a.req.key.as_str())
        .chain(unknown.iter().map(|r| r.key.as_str()))
        .collect();
    // An unanswered request may or may not have been recorded (its answer can be lost with
    // the connection); the client's retry with the same key settles it either way.
    for k in by_key.keys() {
        assert!(
            known.contains(k.as_str()),
            "ledger holds a key never sent: {k}"
        );
    }
    // A sample of replays after the restart: same entry, marked replayed.
    for a in acks.iter().step_by((acks.len() / 50).max(1)) {
        let r = try_consume(&d.client, &a.req).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["ledger_seq"].as_u64(), Some(a.seq), "{}", r.body);
        assert!(r.replayed(), "replay of {a:?} not marked: {:?}", r.headers);
    }

    let (status, _) = sigterm(d).await;
    assert!(status.success(), "second SIGTERM: {status:?}");
    verify_ok(&data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_idle_daemon_exits_zero_quickly_and_restart_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let id = "sd-idle";
    let d = start(data.clone()).await;
    let r = d.client.put_account(id, json!({"plan": "pro"})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let first = Req {
        account: id.to_owned(),
        key: "idle-1".into(),
        quantity: 7,
    };
    let r = try_consume(&d.client, &first).await.unwrap();
    let a = classify(&first, &r).expect("acknowledged");
    assert_eq!(a.status, 200);

    let (status, took) = sigterm(d).await;
    assert_eq!(status.code(), Some(0), "idle SIGTERM: {status:?}");
    assert!(
        took < Duration::from_secs(5),
        "an idle daemon must stop quickly, took {took:?}"
    );

    let d = start(data.clone()).await;
    let r = try_consume(&d.client, &first).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.replayed(), "replay after restart: {:?}", r.headers);
    assert_eq!(r.body["ledger_seq"].as_u64(), Some(a.seq));
    let second = Req {
        account: id.to_owned(),
        key: "idle-2".into(),
        quantity: 3,
    };
    let r = try_consume(&d.client, &second).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.replayed());
    assert_eq!(r.body["ledger_seq"].as_u64(), Some(a.seq + 1), "{}", r.body);
    let acc = d.client.get_account(id).await;
    assert_eq!(acc.body["meters"]["tokens"]["used"], 10, "{}", acc.body);
    // A new account after the restart works too.
    let r = d
        .client
        .put_account("sd-idle-2", json!({"plan": "free"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);

    let (status, took) = sigterm(d).await;
    assert_eq!(status.code(), Some(0), "second idle SIGTERM: {status:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    verify_ok(&data).await;
}

fn check_config(path: &Path) -> std::process::Output {
    crate::support::output_within(
        Command::new(meterd_bin())
            .arg("check-config")
            .arg("--config")
            .arg(path)
            .env_remove("METERD_ADMIN_KEY")
            .env_remove("METERD_APP_KEY"),
        Duration::from_secs(30),
    )
}

#[test]
fn check_config_accepts_the_shipped_config_and_names_an_unknown_key() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let out = check_config(&shipped);
    assert!(
        out.status.success(),
        "shipped config: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config OK"));

    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("\n[server]\n"));
    let bad = text.replacen("\n[server]\n", "\n[server]\nbogus_key = 1\n", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, bad).unwrap();
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "unknown key accepted: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("bogus_key"),
        "stderr must name the key: {stderr}"
    );
}

/// `meterd ledger verify` exits 1 and names the account when a ledger entry does not follow
/// from the ones before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_verify_exits_non_zero_on_a_tampered_ledger() {
    use meterd_actors::ledger::EntryKind;
    use meterd_actors::model::AccountId;
    use meterd_actors::store::{Store, StoreConfig, SyncMode};
    let dir = tempfile::tempdir().unwrap();
    let d = crate::support::BinDaemon::start(dir.path(), &[]);
    d.client
        .put_account("tamper", serde_json::json!({"plan": "free"}))
        .await;
    assert_eq!(d.client.consume("tamper", 5, "k1").await.status, 200);
    let status = tokio::task::spawn_blocking(move || d.sigterm(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success());
    let ok = crate::support::ledger_verify(dir.path());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    {
        let store = Store::open(&StoreConfig {
            path: dir.path().to_path_buf(),
            sync: SyncMode::Fdatasync,
            cache_capacity_bytes: 1 << 20,
        })
        .unwrap();
        let id = AccountId::parse("tamper").unwrap();
        let mut e = store.read_entry(&id, 2).unwrap().unwrap();
        if let EntryKind::Consume(c) = &mut e.kind {
            c.used_after = 50;
        }
        store.append_entry(&id, &e).unwrap();
        store.barrier().await.unwrap();
        store.close().unwrap();
    }
    let bad = crate::support::ledger_verify(dir.path());
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(out.contains("MISMATCH account tamper"), "{out}");
}

/// Under systemd's watchdog (`WATCHDOG_USEC` set), the daemon sends `READY=1`, then
/// `WATCHDOG=1` at half the interval while its flusher flushes and its directory answers,
/// and `STOPPING=1` on SIGTERM. The test plays systemd's notify socket.
#[tokio::test]
async fn the_systemd_watchdog_is_pinged_while_the_daemon_works() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data = dir.path().join("data");
    let path = sock_path.to_str().unwrap().to_owned();
    let d = tokio::task::spawn_blocking(move || {
        BinDaemon::start(
            &data,
            &[
                ("NOTIFY_SOCKET", path.as_str()),
                ("WATCHDOG_USEC", "400000"),
            ],
        )
    })
    .await
    .unwrap();
    let read = move |sock: UnixDatagram, want_pings: usize, want: &'static str| {
        tokio::task::spawn_blocking(move || {
            let (mut seen, mut pings) = (Vec::new(), 0);
            let mut buf = [0u8; 512];
            // Bounded: at most 50 datagrams, each within the read timeout.
            for _ in 0..50 {
                let Ok(n) = sock.recv(&mut buf) else { break };
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                pings += usize::from(msg.contains("WATCHDOG=1"));
                let done = pings >= want_pings && msg.contains(want);
                seen.push(msg);
                if done {
                    break;
                }
            }
            (sock, seen)
        })
    };
    let (sock, seen) = read(sock, 3, "WATCHDOG=1").await.unwrap();
    assert!(seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    assert!(
        seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "{seen:?}"
    );
    let stopped = tokio::task::spawn_blocking(move || d.sigterm(SIGTERM_BOUND));
    let (_, seen) = read(sock, 0, "STOPPING=1").await.unwrap();
    assert!(seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
    assert!(stopped.await.unwrap().success());
}
