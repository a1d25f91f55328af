//! Crash safety of the real binary: kill -9 under concurrent load, restart on the same data
//! directory, and check that every acknowledged consume is on disk, replays identically
//! (`Idempotent-Replayed: true`, same status, same ledger entry) and is never charged twice.
//! Every loop and every wait is bounded.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::support::seed::TestSeed;
use crate::support::{APP_KEY, BinDaemon, Client, Resp, ledger_verify};

const PRO: [&str; 4] = ["crash-pro-0", "crash-pro-1", "crash-pro-2", "crash-pro-3"];
const FREE: &str = "crash-free";
const FREE_CAP: u64 = 100;
/// Prepaid (1 credit per token) with a grant of `PREPAID_GRANT`: exercises 402 denials.
const PREPAID: &str = "crash-prepaid";
const PREPAID_GRANT: i64 = 300;
const ROUNDS: usize = 8;
const TASKS: usize = 16;
/// Upper bound of consumes per client task and round (the kill usually comes first).
const PER_TASK: usize = 400;
const JOIN_BOUND: Duration = Duration::from_secs(20);

/// One consume request, exactly as sent (a retry sends the same body again).
#[derive(Clone, Debug)]
pub(crate) struct Req {
    pub account: String,
    pub key: String,
    pub quantity: u64,
}

/// An acknowledged consume: a 200, or a recorded denial (429/402) that names its ledger entry.
#[derive(Clone, Debug)]
pub(crate) struct Ack {
    pub req: Req,
    pub status: u16,
    pub seq: u64,
    pub allowed: bool,
}

/// Sends one consume without panicking on transport errors (the daemon may be killed while
/// the request is in flight). A body that cannot be read counts as a transport error too.
pub(crate) async fn try_consume(client: &Client, req: &Req) -> Result<Resp, String> {
    let r = client
        .http
        .post(format!(
            "{}/v1/accounts/{}/consume",
            client.base, req.account
        ))
        .bearer_auth(APP_KEY)
        .timeout(Duration::from_secs(15))
        .json(&json!({"meter": "tokens", "quantity": req.quantity, "idempotency_key": req.key}))
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.map_err(|e| format!("body: {e}"))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Resp {
        status,
        body,
        headers,
    })
}

/// `Some(ack)` for an acknowledged answer, `None` for 503 `unavailable` (not acknowledged:
/// retry with the same key). Anything else is a product bug and fails the test.
pub(crate) fn classify(req: &Req, resp: &Resp) -> Option<Ack> {
    match resp.status {
        200 => {
            let seq = resp.body["ledger_seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("200 without ledger_seq for {req:?}: {}", resp.body));
            assert_eq!(
                resp.body["allowed"], true,
                "200 must be allowed: {}",
                resp.body
            );
            assert_eq!(
                resp.body["quantity"], req.quantity,
                "quantity echoed: {}",
                resp.body
            );
            Some(Ack {
                req: req.clone(),
                status: 200,
                seq,
                allowed: true,
            })
        }
        402 | 429 => {
            let seq = resp.body["error"]["ledger_seq"]
                .as_u64()
                .unwrap_or_else(|| {
                    panic!(
                        "recorded denial without ledger_seq for {req:?}: {}",
                        resp.body
                    )
                });
            Some(Ack {
                req: req.clone(),
                status: resp.status,
                seq,
                allowed: false,
            })
        }
        503 => None,
        s => panic!("unexpected status {s} for {req:?}: {}", resp.body),
    }
}

/// What one client task saw in one round.
#[derive(Default)]
struct TaskLog {
    acks: Vec<Ack>,
    /// Sent but not acknowledged: transport error (killed daemon) or 503.
    uncertain: Vec<(Req, String)>,
}

async fn client_task(
    client: Client,
    accounts: Arc<Vec<String>>,
    round: usize,
    task: usize,
    seed: u64,
) -> TaskLog {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = TaskLog::default();
    for n in 0..PER_TASK {
        // Half the traffic goes to the first account, so that its ledger crosses the
        // snapshot interval (1000 entries) during the test.
        let i = if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(0..accounts.len())
        };
        let req = Req {
            account: accounts[i].clone(),
            key: format!("crash-r{round}-t{task}-{n}"),
            quantity: rng.random_range(1..=5),
        };
        match try_consume(&client, &req).await {
            Ok(resp) => match classify(&req, &resp) {
                Some(a) => log.acks.push(a),
                None => {
                    log.uncertain
                        .push((req, format!("status {}: {}", resp.status, resp.body)));
                    break;
                }
            },
            Err(e) => {
                log.uncertain.push((req, e));
                break;
            }
        }
    }
    log
}

/// Splits `items` over `TASKS` concurrent tasks running `f` on each item in order.
async fn concurrently<T, R, F, Fut>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = R> + Send,
{
    let mut chunks: Vec<Vec<T>> = (0..TASKS).map(|_| Vec::new()).collect();
    for (i, it) in items.into_iter().enumerate() {
        chunks[i % TASKS].push(it);
    }
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(chunk.len());
                for it in chunk {
                    out.push(f(it).await);
                }
                out
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.extend(
            tokio::time::timeout(Duration::from_secs(60), h)
                .await
                .expect("replay tasks finish within 60 s")
                .expect("replay task"),
        );
    }
    out
}

/// Every acknowledged key, sent again: the same status and ledger entry, marked replayed.
async fn check_replays(client: &Client, acks: &[Ack]) {
    let c = client.clone();
    let results = concurrently(acks.to_vec(), move |a: Ack| {
        let c = c.clone();
        async move {
            let r = try_consume(&c, &a.req).await;
            (a, r)
        }
    })
    .await;
    for (a, r) in results {
        let r = r.unwrap_or_else(|e| panic!("replay of {a:?} failed: {e}"));
        assert_eq!(
            r.status, a.status,
            "replay of {a:?} changed status: {}",
            r.body
        );
        let seq = if r.status == 200 {
            r.body["ledger_seq"].as_u64()
        } else {
            r.body["error"]["ledger_seq"].as_u64()
        };
        assert_eq!(
            seq,
            Some(a.seq),
            "replay of {a:?} names another ledger entry: {}",
            r.body
        );
        assert!(
            r.replayed(),
            "replay of {a:?} lacks `idempotent-replayed: true` (charged twice?): {:?} {}",
            r.headers,
            r.body
        );
    }
}

/// Keys whose fate was unknown at the crash, sent again: a replay or a fresh decision, both
/// acknowledged now. Returns the new acknowledgements and how many were replays.
async fn retry_uncertain(client: &Client, uncertain: Vec<(Req, String)>) -> (Vec<Ack>, usize) {
    let c = client.clone();
    let results = concurrently(uncertain, move |(req, _why): (Req, String)| {
        let c = c.clone();
        async move {
            let r = try_consume(&c, &req).await;
            (req, r)
        }
    })
    .await;
    let mut acks = Vec::new();
    let mut replays = 0;
    for (req, r) in results {
        let r = r.unwrap_or_else(|e| panic!("retry of in-flight {req:?} failed: {e}"));
        let a = classify(&req, &r).unwrap_or_else(|| {
            panic!(
                "retry of {req:?} answered 503 on an idle daemon: {}",
                r.body
            )
        });
        if r.replayed() {
            replays += 1;
        }
        acks.push(a);
    }
    (acks, replays)
}

async fn start(dir: PathBuf) -> BinDaemon {
    tokio::task::spawn_blocking(move || BinDaemon::start(&dir, &[]))
        .await
        .expect("start meterd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_under_load_loses_no_acknowledged_consume_and_charges_nothing_twice() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    // Replay: METERD_TEST_SEED=<seed> (printed now, and with the command if the test fails).
    let seed = TestSeed::draw(
        "crash::kill9_under_load_loses_no_acknowledged_consume_and_charges_nothing_twice",
    );
    let mut rng = seed.rng();
    let accounts: Arc<Vec<String>> = Arc::new(
        PRO.iter()
            .map(|s| (*s).to_owned())
            .chain([FREE.to_owned(), PREPAID.to_owned()])
            .collect(),
    );

    let mut acks: Vec<Ack> = Vec::new();
    let mut uncertain: Vec<(Req, String)> = Vec::new();
    let mut total_uncertain = 0usize;
    let mut total_retry_replays = 0usize;

    for round in 0..ROUNDS {
        let d = start(data.clone()).await;
        if round == 0 {
            for id in PRO {
                let r = d.client.put_account(id, json!({"plan": "pro"})).await;
                assert_eq!(r.status, 201, "{}", r.body);
            }
            let r = d.client.put_account(FREE, json!({"plan": "free"})).await;
            assert_eq!(r.status, 201, "{}", r.body);
            let r = d
                .client
                .put_account(PREPAID, json!({"plan": "prepaid"}))
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
            let r = d.client.credit(PREPAID, PREPAID_GRANT, "grant-1").await;
            assert_eq!(r.status, 200, "{}", r.body);
        } else {
            check_replays(&d.client, &acks).await;
            let (new, replays) = retry_uncertain(&d.client, std::mem::take(&mut uncertain)).await;
            total_retry_replays += replays;
            acks.extend(new);
        }

        let handles: Vec<_> = (0..TASKS)
            .map(|task| {
                tokio::spawn(client_task(
                    d.client.clone(),
                    accounts.clone(),
                    round,
                    task,
                    rng.random(),
                ))
            })
            .collect();
        let delay = rng.random_range(50..=400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        d.kill9();

        let (mut n_acks, mut n_uncertain) = (0, 0);
        for h in handles {
            let log = tokio::time::timeout(JOIN_BOUND, h)
                .await
                .expect("client tasks stop after the kill")
                .expect("client task");
            n_acks += log.acks.len();
            n_uncertain += log.uncertain.len();
            acks.extend(log.acks);
            uncertain.extend(log.uncertain);
        }
        total_uncertain += n_uncertain;
        println!(
            "round {round}: killed after {delay} ms, {n_acks} acknowledged, {n_uncertain} in flight"
        );
    }
    assert!(
        acks.len() > 100,
        "too little load to mean anything: {}",
        acks.len()
    );

    // Final restart: replays, then the ledgers against everything acknowledged.
    let d = start(data.clone()).await;
    check_replays(&d.client, &acks).await;
    let (new, replays) = retry_uncertain(&d.client, std::mem::take(&mut uncertain)).await;
    total_retry_replays += replays;
    acks.extend(new);
    // Drive the capped accounts to their limits, so every run records both denials whatever
    // the kills' timing left (a slow machine may send few requests before each kill).
    for (id, denial) in [(FREE, 429), (PREPAID, 402)] {
        for n in 0..2_000 {
            let req = Req {
                account: id.to_owned(),
                key: format!("crash-final-{id}-{n}"),
                quantity: 5,
            };
            let resp = try_consume(&d.client, &req).await.expect("daemon is up");
            let ack = classify(&req, &resp).expect("no 503 without a kill");
            let done = ack.status == denial;
            acks.push(ack);
            if done {
                break;
            }
        }
    }

    let mut seen_keys: HashSet<String> = HashSet::new();
    let mut by_account: HashMap<String, HashMap<String, Value>> = HashMap::new();
    for id in accounts.iter() {
        let entries = d.client.ledger(id).await;
        let mut keyed: HashMap<String, Value> = HashMap::new();
        let mut allowed_sum = 0u64;
        let mut credits: i64 = 0;
        for (i, e) in entries.iter().enumerate() {
            credits += e["credits_delta"].as_i64().unwrap_or(0);
            if let Some(after) = e["credits_after"].as_i64() {
                assert_eq!(
                    after, credits,
                    "{id}: credits_after follows the deltas: {e}"
                );
            }
            assert_eq!(
                e["seq"].as_u64(),
                Some(i as u64 + 1),
                "{id}: ledger seqs are 1..n without gaps: {e}"
            );
            match e["kind"].as_str() {
                Some("consume") => {
                    let key = e["idempotency_key"].as_str().unwrap().to_owned();
                    assert!(
                        seen_keys.insert(key.clone()),
                        "{id}: idempotency key {key} appears twice in the ledgers: {e}"
                    );
                    if e["decision"] == "allowed" {
                        allowed_sum += e["quantity"].as_u64().unwrap();
                    }
                    keyed.insert(key, e.clone());
                }
                // A new calendar month resets usage (only if the test straddles one).
                Some("period_rolled") => allowed_sum = 0,
                _ => {}
            }
        }
        let acc = d.client.get_account(id).await;
        assert_eq!(acc.status, 200, "{}", acc.body);
        let used = acc.body["meters"]["tokens"]["used"].as_u64().unwrap();
        assert_eq!(
            used, allowed_sum,
            "{id}: `used` must equal the allowed consumes in the ledger"
        );
        assert_eq!(
            acc.body["credits"]["balance"].as_i64(),
            Some(credits),
            "{id}: credit balance must equal the sum of the ledger's deltas: {}",
            acc.body
        );
        if id == FREE {
            assert!(used <= FREE_CAP, "{id}: used {used} exceeds the hard cap");
        }
        if id == PREPAID {
            assert_eq!(
                i64::try_from(used).unwrap(),
                PREPAID_GRANT - credits,
                "{id}: every allowed token costs one credit"
            );
        }
        println!("{id}: {} ledger entries, used {used}", entries.len());
        by_account.insert(id.clone(), keyed);
    }
    for a in &acks {
        let e = by_account[&a.req.account]
            .get(&a.req.key)
            .unwrap_or_else(|| panic!("acknowledged {a:?} is missing from the ledger"));
        assert_eq!(e["seq"].as_u64(), Some(a.seq), "{a:?}: {e}");
        assert_eq!(e["quantity"].as_u64(), Some(a.req.quantity), "{a:?}: {e}");
        let decision = if a.allowed { "allowed" } else { "denied" };
        assert_eq!(e["decision"], decision, "{a:?}: {e}");
    }
    let denials = acks.iter().filter(|a| !a.allowed).count();
    println!(
        "{} acknowledged ({denials} denials), {total_uncertain} in flight at kills \
         ({total_retry_replays} of them replayed on retry), {} ledger keys",
        acks.len(),
        seen_keys.len()
    );
    for (status, what) in [
        (429, "the free account never hit its cap"),
        (402, "the prepaid account never ran out"),
    ] {
        assert!(acks.iter().any(|a| a.status == status), "{what}");
    }

    let status = tokio::task::spawn_blocking(move || d.sigterm(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "meterd exited with {status:?} on SIGTERM");
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
    println!("crash test took {:?}", t0.elapsed());
}
