//! Consumption under concurrency, idempotency across restarts, and the live-actor limit.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use crate::support::TestDaemon;

/// Sum of allowed consume quantities in a ledger, and the seqs of all consume entries.
fn ledger_totals(ledger: &[serde_json::Value]) -> (u64, usize, usize) {
    let mut allowed = 0;
    let mut allowed_n = 0;
    let mut denied_n = 0;
    let mut keys = HashSet::new();
    for e in ledger.iter().filter(|e| e["kind"] == "consume") {
        assert!(
            keys.insert(e["idempotency_key"].as_str().unwrap().to_owned()),
            "idempotency key recorded twice: {e}"
        );
        match e["decision"].as_str().unwrap() {
            "allowed" => {
                allowed += e["quantity"].as_u64().unwrap();
                allowed_n += 1;
            }
            _ => denied_n += 1,
        }
    }
    // Sequence numbers are 1..=n with no gap.
    for (i, e) in ledger.iter().enumerate() {
        assert_eq!(e["seq"].as_u64().unwrap(), i as u64 + 1);
    }
    (allowed, allowed_n, denied_n)
}

/// 256 concurrent clients on one `free` account: exactly the 100 included units are allowed,
/// every other request is a 429, the ledger agrees, and nothing is a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn free_account_allows_exactly_the_included_units_under_256_clients() {
    let d = TestDaemon::start().await;
    assert_eq!(
        d.client
            .put_account("hot", json!({"plan": "free"}))
            .await
            .status,
        201
    );
    let mut tasks = Vec::new();
    for c in 0..256 {
        let client = d.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..2 {
                let r = client.consume("hot", 1, &format!("c{c}-{i}")).await;
                statuses.push((r.status, r.code().to_owned()));
            }
            statuses
        }));
    }
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        for (status, code) in t.await.unwrap() {
            if status == 429 {
                assert_eq!(code, "cap_reached");
            }
            *by_status.entry(status).or_default() += 1;
        }
    }
    assert_eq!(by_status.get(&200), Some(&100), "{by_status:?}");
    assert_eq!(by_status.get(&429), Some(&412), "{by_status:?}");
    assert_eq!(by_status.len(), 2, "only 200 and 429: {by_status:?}");
    let acct = d.client.get_account("hot").await;
    assert_eq!(acct.body["meters"]["tokens"]["used"], 100);
    assert_eq!(acct.body["meters"]["tokens"]["remaining"], 0);
    let ledger = d.client.ledger("hot").await;
    let (allowed, allowed_n, denied_n) = ledger_totals(&ledger);
    assert_eq!((allowed, allowed_n, denied_n), (100, 100, 412));
    d.stop().await;
}

/// 256 concurrent clients on one `prepaid` account: exactly the granted credits are spent,
/// then 402.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepaid_account_spends_exactly_the_granted_credits_under_256_clients() {
    let d = TestDaemon::start().await;
    assert_eq!(
        d.client
            .put_account("pp", json!({"plan": "prepaid"}))
            .await
            .status,
        201
    );
    assert_eq!(d.client.credit("pp", 300, "grant-1").await.status, 200);
    let mut tasks = Vec::new();
    for c in 0..256 {
        let client = d.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..2 {
                // Quantities 1..=3 so partial affordability is exercised.
                let q = (c + i) % 3 + 1;
                let r = client.consume("pp", q, &format!("c{c}-{i}")).await;
                out.push((r.status, r.code().to_owned(), q));
            }
            out
        }));
    }
    let mut allowed_units = 0;
    let mut n402 = 0;
    for t in tasks {
        for (status, code, q) in t.await.unwrap() {
            match status {
                200 => allowed_units += q,
                402 => {
                    assert_eq!(code, "insufficient_credits");
                    n402 += 1;
                }
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert!(n402 > 0);
    let acct = d.client.get_account("pp").await;
    let balance = acct.body["credits"]["balance"].as_u64().unwrap();
    assert_eq!(allowed_units + balance, 300, "credits are conserved");
    // Every request was for at most 3 units, and requests kept coming after the first 402,
    // so the balance ends below 3.
    assert!(
        balance < 3,
        "balance {balance} left while requests were denied"
    );
    let ledger = d.client.ledger("pp").await;
    let (allowed, _, denied) = ledger_totals(&ledger);
    assert_eq!(allowed, allowed_units);
    assert_eq!(denied, n402);
    d.stop().await;
}

#[tokio::test]
async fn replay_returns_the_first_answer_and_changes_nothing() {
    let d = TestDaemon::start().await;
    d.client.put_account("a", json!({"plan": "free"})).await;
    let first = d.client.consume("a", 70, "k1").await;
    assert_eq!(first.status, 200);
    assert!(!first.replayed());
    let again = d.client.consume("a", 70, "k1").await;
    assert_eq!(again.status, 200);
    assert!(again.replayed());
    assert_eq!(
        again.body, first.body,
        "a replay is the first response again"
    );
    // A denial is a recorded decision and replays identically.
    let denied = d.client.consume("a", 40, "k2").await;
    assert_eq!(denied.status, 429);
    let denied_again = d.client.consume("a", 40, "k2").await;
    assert_eq!(denied_again.status, 429);
    assert!(denied_again.replayed());
    assert_eq!(
        denied_again.body["error"]["ledger_seq"],
        denied.body["error"]["ledger_seq"]
    );
    // Even after room appears (a plan change), the replayed denial stays a denial.
    d.client.put_account("a", json!({"plan": "pro"})).await;
    assert_eq!(d.client.consume("a", 40, "k2").await.status, 429);
    // The same key with a different body is a conflict and changes nothing.
    let conflict = d.client.consume("a", 71, "k1").await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.code(), "idempotency_conflict");
    let used = d.client.get_account("a").await.body["meters"]["tokens"]["used"].clone();
    assert_eq!(used, 70);
    // Ledger: create, k1, k2, plan change — nothing else.
    assert_eq!(d.client.ledger("a").await.len(), 4);
    d.stop().await;
}

#[tokio::test]
async fn replay_after_restart_returns_the_same_entry() {
    let d = TestDaemon::start().await;
    d.client.put_account("a", json!({"plan": "free"})).await;
    let first = d.client.consume("a", 10, "before-restart").await;
    assert_eq!(first.status, 200);
    let credit = d.client.credit("a", 50, "grant").await;
    assert_eq!(credit.status, 200);
    let dir = d.stop().await;
    let d = TestDaemon::start_in(dir, |_| {}, meterd_actors::model::Clock::System).await;
    let again = d.client.consume("a", 10, "before-restart").await;
    assert_eq!(again.status, 200);
    assert!(again.replayed());
    assert_eq!(again.body["ledger_seq"], first.body["ledger_seq"]);
    let credit_again = d.client.credit("a", 50, "grant").await;
    assert!(credit_again.replayed());
    assert_eq!(credit_again.body["ledger_seq"], credit.body["ledger_seq"]);
    let acct = d.client.get_account("a").await;
    assert_eq!(acct.body["meters"]["tokens"]["used"], 10);
    assert_eq!(acct.body["credits"]["balance"], 50);
    d.stop().await;
}

/// More accounts than the live-actor limit, used concurrently: every account stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_accounts_than_the_live_actor_limit_stay_correct() {
    let d = TestDaemon::start_with(|c| c.accounts.max_live = 8).await;
    let n_accounts = 40;
    for a in 0..n_accounts {
        assert_eq!(
            d.client
                .put_account(&format!("acct{a}"), json!({"plan": "free"}))
                .await
                .status,
            201
        );
    }
    let client = Arc::new(d.client.clone());
    let mut tasks = Vec::new();
    for c in 0..32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            for i in 0..30 {
                // Each client walks the accounts in its own order, forcing evictions.
                let a = (c * 7 + i * 3) % n_accounts;
                let r = client
                    .consume(&format!("acct{a}"), 1, &format!("c{c}-{i}"))
                    .await;
                assert!(r.status == 200 || r.status == 429, "status {}", r.status);
                if r.status == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    assert_eq!(allowed, 32 * 30, "no account reaches its cap of 100 here");
    let mut total_used = 0;
    for a in 0..n_accounts {
        let id = format!("acct{a}");
        let acct = d.client.get_account(&id).await;
        let used = acct.body["meters"]["tokens"]["used"].as_u64().unwrap();
        let (from_ledger, _, _) = ledger_totals(&d.client.ledger(&id).await);
        assert_eq!(
            used, from_ledger,
            "account {id}: snapshot equals the ledger"
        );
        total_used += used;
    }
    assert_eq!(total_used, 32 * 30);
    d.stop().await;
}

/// A key is remembered for the retention, then forgotten whole: the janitor drops the
/// generation of records that ended more than the retention ago, and the same key is a new
/// request again.
#[tokio::test]
async fn idempotency_keys_are_remembered_for_the_retention_then_forgotten() {
    use meterd_actors::model::Clock;
    const HOUR: i64 = 3_600_000;
    let t0 = 1_773_100_800_000; // 2026-03-10T00:00:00Z
    let clock = Clock::manual(t0);
    let d = TestDaemon::start_in(
        tempfile::tempdir().unwrap(),
        |c| c.sweep_interval = std::time::Duration::from_millis(50),
        clock.clone(),
    )
    .await;
    d.client.put_account("r", json!({"plan": "payg"})).await;
    let first = d.client.consume("r", 1, "once").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    // 72 hours and a generation (a third of the retention) later, minus a minute: remembered.
    clock.set_ms(t0 + 96 * HOUR - 60_000);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(d.client.consume("r", 1, "once").await.replayed());
    // Past that, the janitor forgets it (the replay above did not extend its life): the key
    // is a new request. Bounded wait; each try is a replay until then.
    clock.set_ms(t0 + 96 * HOUR);
    let mut again = None;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let r = d.client.consume("r", 1, "once").await;
        if !r.replayed() {
            again = Some(r);
            break;
        }
    }
    let again = again.expect("the key is still remembered");
    assert_eq!(again.status, 200);
    assert_ne!(again.body["ledger_seq"], first.body["ledger_seq"]);
    d.stop().await;
}
