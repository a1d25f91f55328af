//! `POST /v1/consume/batch`: per-item decisions across accounts, whole-batch retries,
//! idempotency conflicts, the item-count limits, per-account ordering and authentication.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, APP_KEY, Client, Resp, TestDaemon};

const BATCH: &str = "/v1/consume/batch";

async fn batch(c: &Client, key: Option<&str>, items: &[Value]) -> Resp {
    c.send(Method::POST, BATCH, key, Some(json!({ "items": items })))
        .await
}

fn item(account: &str, meter: &str, quantity: u64, key: &str) -> Value {
    json!({"account_id": account, "meter": meter, "quantity": quantity, "idempotency_key": key})
}

fn tokens(account: &str, quantity: u64, key: &str) -> Value {
    item(account, "tokens", quantity, key)
}

async fn create(c: &Client, id: &str, plan: &str) {
    let r = c.put_account(id, json!({ "plan": plan })).await;
    assert_eq!(r.status, 201, "create {id}: {:?}", r.body);
}

/// The result items of a 200 batch answer, checked to be in request order.
fn results(r: &Resp, n: usize) -> Vec<Value> {
    assert_eq!(r.status, 200, "{:?}", r.body);
    let items = r.body["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), n, "{:?}", r.body);
    for (i, it) in items.iter().enumerate() {
        assert_eq!(it["index"], i, "results are in request order: {it}");
    }
    items
}

fn summary(r: &Resp) -> (u64, u64, u64, u64, u64) {
    let s = &r.body["summary"];
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("summary.{k}: {s}"));
    (
        n("allowed"),
        n("denied"),
        n("replayed"),
        n("invalid"),
        n("errors"),
    )
}

fn used(acct: &Resp) -> u64 {
    assert_eq!(acct.status, 200, "{:?}", acct.body);
    acct.body["meters"]["tokens"]["used"].as_u64().unwrap()
}

/// The consume entries of a ledger, by idempotency key: (seq, decision, code, quantity).
fn consumes(ledger: &[Value]) -> BTreeMap<String, (u64, String, Option<String>, u64)> {
    ledger
        .iter()
        .filter(|e| e["kind"] == "consume")
        .map(|e| {
            (
                e["idempotency_key"].as_str().unwrap().to_owned(),
                (
                    e["seq"].as_u64().unwrap(),
                    e["decision"].as_str().unwrap().to_owned(),
                    e["code"].as_str().map(str::to_owned),
                    e["quantity"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// The mixed batch of tests 1 and 2: (item, expected status, expected code).
fn mixed_items() -> Vec<(Value, &'static str, Option<&'static str>)> {
    vec![
        (tokens("b-free", 60, "f1"), "allowed", None),
        (tokens("b-pre", 3, "p1"), "allowed", None),
        (tokens("b-pro", 1000, "x1"), "allowed", None),
        (tokens("b-free", 50, "f2"), "denied", Some("cap_reached")),
        (
            tokens("b-pre", 5, "p2"),
            "denied",
            Some("insufficient_credits"),
        ),
        (
            item("b-free", "widgets", 1, "f3"),
            "invalid",
            Some("invalid_request"),
        ),
        (
            tokens("b-nobody", 1, "n1"),
            "invalid",
            Some("unknown_account"),
        ),
        (tokens("b-pro", 0, "x2"), "invalid", Some("invalid_request")),
        (tokens("b-free", 40, "f4"), "allowed", None),
        (tokens("b-pre", 2, "p3"), "allowed", None),
        (
            tokens("bad id!", 1, "z1"),
            "invalid",
            Some("invalid_request"),
        ),
        (tokens("b-pro", 1, ""), "invalid", Some("invalid_request")),
    ]
}

async fn setup_mixed(d: &TestDaemon) {
    create(&d.client, "b-free", "free").await;
    create(&d.client, "b-pre", "prepaid").await;
    create(&d.client, "b-pro", "pro").await;
    let g = d.client.credit("b-pre", 5, "grant-1").await;
    assert_eq!(g.status, 200, "{:?}", g.body);
}

/// Checks a first answer to the mixed batch against the expectations and the ledgers.
async fn check_first_answer(d: &TestDaemon, r: &Resp) {
    let cases = mixed_items();
    let got = results(r, cases.len());
    let ledgers: BTreeMap<&str, _> = [
        ("b-free", consumes(&d.client.ledger("b-free").await)),
        ("b-pre", consumes(&d.client.ledger("b-pre").await)),
        ("b-pro", consumes(&d.client.ledger("b-pro").await)),
    ]
    .into_iter()
    .collect();
    for ((sent, status, code), res) in cases.iter().zip(&got) {
        assert_eq!(res["status"], *status, "{sent} -> {res}");
        assert_eq!(res["account_id"], sent["account_id"], "{res}");
        assert_eq!(res["code"].as_str(), *code, "{sent} -> {res}");
        match *status {
            "allowed" | "denied" => {
                let allowed = *status == "allowed";
                assert_eq!(res["allowed"], allowed, "{res}");
                assert_eq!(res["meter"]["name"], "tokens", "{res}");
                assert!(res["credits"]["balance"].is_u64(), "{res}");
                // The item's ledger_seq is the ledger entry of its key, with its decision.
                let ledger = &ledgers[sent["account_id"].as_str().unwrap()];
                let (seq, decision, lcode, qty) = ledger
                    .get(sent["idempotency_key"].as_str().unwrap())
                    .unwrap_or_else(|| panic!("no ledger entry for {sent}"));
                assert_eq!(res["ledger_seq"], *seq, "{res}");
                assert_eq!(decision, if allowed { "allowed" } else { "denied" });
                assert_eq!(lcode.as_deref(), *code);
                assert_eq!(*qty, sent["quantity"].as_u64().unwrap());
            }
            _ => {
                assert!(res.get("ledger_seq").is_none(), "{res}");
                assert!(res.get("allowed").is_none(), "{res}");
                assert!(
                    res["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{res}"
                );
            }
        }
    }
    // Exactly the decided items are in the ledgers, nothing else.
    assert_eq!(
        ledgers["b-free"].keys().collect::<Vec<_>>(),
        ["f1", "f2", "f4"]
    );
    assert_eq!(
        ledgers["b-pre"].keys().collect::<Vec<_>>(),
        ["p1", "p2", "p3"]
    );
    assert_eq!(ledgers["b-pro"].keys().collect::<Vec<_>>(), ["x1"]);
    // Within an account, decisions were made in item order.
    let seq = |i: usize| got[i]["ledger_seq"].as_u64().unwrap();
    assert!(seq(0) < seq(3) && seq(3) < seq(8), "free order: {got:?}");
    assert!(seq(1) < seq(4) && seq(4) < seq(9), "prepaid order: {got:?}");
    assert_eq!(summary(r), (5, 2, 0, 5, 0), "{:?}", r.body["summary"]);
    // The accounts saw exactly the allowed items.
    assert_eq!(used(&d.client.get_account("b-free").await), 100);
    let pre = d.client.get_account("b-pre").await;
    assert_eq!(used(&pre), 5);
    assert_eq!(pre.body["credits"]["balance"], 0, "{:?}", pre.body);
    assert_eq!(got[9]["credits"]["balance"], 0, "{:?}", got[9]);
    assert_eq!(used(&d.client.get_account("b-pro").await), 1000);
}

/// Test 1: one batch over free, prepaid and pro accounts with allowed, denied and invalid
/// items; per-item results, ledger seqs, the summary and the accounts all agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_decides_each_item_like_a_single_consume() {
    let d = TestDaemon::start().await;
    setup_mixed(&d).await;
    let items: Vec<Value> = mixed_items().into_iter().map(|c| c.0).collect();
    let r = batch(&d.client, Some(APP_KEY), &items).await;
    check_first_answer(&d, &r).await;
    // An admin key may consume too.
    let r = batch(&d.client, Some(ADMIN_KEY), &[tokens("b-pro", 1, "x3")]).await;
    assert_eq!(results(&r, 1)[0]["status"], "allowed", "{:?}", r.body);
    assert_eq!(used(&d.client.get_account("b-pro").await), 1001);
    d.stop().await;
}

/// Test 2: retrying the identical batch replays every decided item (same seq, same
/// decision) and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batch_replays_decided_items_and_changes_nothing() {
    let d = TestDaemon::start().await;
    setup_mixed(&d).await;
    let cases = mixed_items();
    let items: Vec<Value> = cases.iter().map(|c| c.0.clone()).collect();
    let first = batch(&d.client, Some(APP_KEY), &items).await;
    check_first_answer(&d, &first).await;
    let first_items = results(&first, items.len());
    let lens = [
        d.client.ledger("b-free").await.len(),
        d.client.ledger("b-pre").await.len(),
        d.client.ledger("b-pro").await.len(),
    ];

    let again = batch(&d.client, Some(APP_KEY), &items).await;
    let again_items = results(&again, items.len());
    for ((a, b), (_, status, code)) in first_items.iter().zip(&again_items).zip(&cases) {
        if matches!(*status, "allowed" | "denied") {
            assert_eq!(b["status"], "replayed", "{b}");
            assert_eq!(b["ledger_seq"], a["ledger_seq"], "{a} vs {b}");
            assert!(b["ledger_seq"].is_u64(), "{b}");
            assert_eq!(b["allowed"], a["allowed"], "{a} vs {b}");
            assert_eq!(b["allowed"], *status == "allowed", "{b}");
            assert_eq!(b["code"].as_str(), *code, "{b}");
            assert_eq!(b["meter"], a["meter"], "the decision-time state replays");
        } else {
            assert_eq!(b["status"], "invalid", "{b}");
            assert_eq!(b["code"], a["code"], "{b}");
        }
    }
    assert_eq!(
        summary(&again),
        (0, 0, 7, 5, 0),
        "{:?}",
        again.body["summary"]
    );
    let lens_after = [
        d.client.ledger("b-free").await.len(),
        d.client.ledger("b-pre").await.len(),
        d.client.ledger("b-pro").await.len(),
    ];
    assert_eq!(lens, lens_after, "a replay writes nothing");
    assert_eq!(used(&d.client.get_account("b-free").await), 100);
    assert_eq!(used(&d.client.get_account("b-pre").await), 5);
    assert_eq!(used(&d.client.get_account("b-pro").await), 1000);
    d.stop().await;
}

/// Test 3: a key reused with a different quantity is `idempotency_conflict`; the other
/// items of that batch are unaffected. A key repeated inside one batch replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_key_with_another_quantity_is_a_conflict() {
    let d = TestDaemon::start().await;
    create(&d.client, "c-pro", "pro").await;
    create(&d.client, "c-other", "pro").await;
    let r = batch(
        &d.client,
        Some(APP_KEY),
        &[tokens("c-pro", 10, "k1"), tokens("c-other", 3, "o1")],
    )
    .await;
    assert_eq!(summary(&r), (2, 0, 0, 0, 0), "{:?}", r.body);
    let k1_seq = results(&r, 2)[0]["ledger_seq"].as_u64().unwrap();

    let r = batch(
        &d.client,
        Some(APP_KEY),
        &[
            tokens("c-other", 4, "o2"),
            tokens("c-pro", 11, "k1"),
            tokens("c-pro", 5, "k2"),
            tokens("c-pro", 5, "k2"),
            tokens("c-pro", 6, "k2"),
        ],
    )
    .await;
    let got = results(&r, 5);
    assert_eq!(got[0]["status"], "allowed", "{}", got[0]);
    assert_eq!(got[1]["status"], "invalid", "{}", got[1]);
    assert_eq!(got[1]["code"], "idempotency_conflict", "{}", got[1]);
    assert!(got[1].get("ledger_seq").is_none(), "{}", got[1]);
    assert_eq!(got[2]["status"], "allowed", "{}", got[2]);
    // The same key later in the same batch: the first decision replays, a different request
    // conflicts.
    assert_eq!(got[3]["status"], "replayed", "{}", got[3]);
    assert_eq!(got[3]["ledger_seq"], got[2]["ledger_seq"]);
    assert_eq!(got[3]["allowed"], true);
    assert_eq!(got[4]["code"], "idempotency_conflict", "{}", got[4]);
    assert_eq!(summary(&r), (2, 0, 1, 2, 0), "{:?}", r.body);

    // k1 still means its first decision; only the allowed quantities were used.
    let ledger = consumes(&d.client.ledger("c-pro").await);
    assert_eq!(ledger.len(), 2, "{ledger:?}");
    assert_eq!(ledger["k1"].0, k1_seq);
    assert_eq!(ledger["k1"].3, 10);
    assert_eq!(used(&d.client.get_account("c-pro").await), 15);
    assert_eq!(used(&d.client.get_account("c-other").await), 7);
    d.stop().await;
}

/// Test 4: 0 and 1,001 items are refused as a whole (nothing recorded); 1,000 items fit the
/// default batch body limit; a smaller configured limit refuses a batch that exceeds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_count_limits() {
    let d = TestDaemon::start().await;
    for id in 0..10 {
        create(&d.client, &format!("L{id}"), "pro").await;
    }
    let make = |n: usize, prefix: &str| -> Vec<Value> {
        (0..n)
            .map(|i| tokens(&format!("L{}", i % 10), 1, &format!("{prefix}{i}")))
            .collect()
    };

    let r = batch(&d.client, Some(APP_KEY), &[]).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.code(), "invalid_request");

    let r = batch(&d.client, Some(APP_KEY), &make(1001, "a")).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.code(), "invalid_request");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000"),
        "{:?}",
        r.body
    );
    for id in 0..10 {
        assert_eq!(used(&d.client.get_account(&format!("L{id}")).await), 0);
    }

    // A malformed item makes the whole batch malformed.
    let mut bad = make(3, "m");
    bad[1]["extra"] = json!(1);
    let r = batch(&d.client, Some(APP_KEY), &bad).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("items[1]"),
        "{:?}",
        r.body
    );

    let r = batch(&d.client, Some(APP_KEY), &make(1000, "b")).await;
    let got = results(&r, 1000);
    assert!(got.iter().all(|g| g["status"] == "allowed"), "{:?}", r.body);
    assert_eq!(summary(&r), (1000, 0, 0, 0, 0));
    for id in 0..10 {
        assert_eq!(used(&d.client.get_account(&format!("L{id}")).await), 100);
    }
    d.stop().await;

    // With a batch limit of 16 KiB, 200 small items fit and 300 do not.
    let d = TestDaemon::start_with(|c| c.max_batch_body_bytes = 16 * 1024).await;
    for id in 0..10 {
        create(&d.client, &format!("L{id}"), "pro").await;
    }
    let r = batch(&d.client, Some(APP_KEY), &make(200, "c")).await;
    assert_eq!(summary(&r), (200, 0, 0, 0, 0), "{:?}", r.body);
    let r = batch(&d.client, Some(APP_KEY), &make(300, "d")).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{:?}",
        r.body
    );
    let r = batch(&d.client, Some(APP_KEY), &make(1001, "e")).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let total: u64 = {
        let mut t = 0;
        for id in 0..10 {
            t += used(&d.client.get_account(&format!("L{id}")).await);
        }
        t
    };
    assert_eq!(total, 200);
    d.stop().await;
}

/// Test 5: items of one account are decided in request order: of 150 single units on a
/// free account (100 included), exactly the first 100 are allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_of_one_account_keep_their_order() {
    let d = TestDaemon::start().await;
    create(&d.client, "o", "free").await;
    create(&d.client, "o2", "pro").await;
    // Another account's items interleaved, served concurrently.
    let items: Vec<Value> = (0..160)
        .map(|i| {
            if i % 16 == 15 {
                tokens("o2", 1, &format!("y{i}"))
            } else {
                tokens("o", 1, &format!("k{i}"))
            }
        })
        .collect();
    let r = batch(&d.client, Some(APP_KEY), &items).await;
    let got = results(&r, 160);
    let mut on_o = 0;
    let mut last_seq = 0;
    for g in &got {
        if g["account_id"] == "o2" {
            assert_eq!(g["status"], "allowed", "{g}");
            continue;
        }
        let expect = if on_o < 100 { "allowed" } else { "denied" };
        assert_eq!(g["status"], expect, "item {on_o} of account o: {g}");
        if on_o >= 100 {
            assert_eq!(g["code"], "cap_reached", "{g}");
        }
        let seq = g["ledger_seq"].as_u64().unwrap();
        assert!(seq > last_seq, "seqs follow item order: {g}");
        last_seq = seq;
        on_o += 1;
    }
    assert_eq!(on_o, 150);
    assert_eq!(summary(&r), (110, 50, 0, 0, 0), "{:?}", r.body["summary"]);
    assert_eq!(used(&d.client.get_account("o").await), 100);
    assert_eq!(used(&d.client.get_account("o2").await), 10);
    d.stop().await;
}

/// Test 6: the route needs an API key.
#[tokio::test]
async fn batch_needs_an_api_key() {
    let d = TestDaemon::start().await;
    create(&d.client, "a", "pro").await;
    let r = batch(&d.client, None, &[tokens("a", 1, "k")]).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.code(), "unauthorized");
    let r = batch(
        &d.client,
        Some("not-a-key-0123456789"),
        &[tokens("a", 1, "k")],
    )
    .await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(used(&d.client.get_account("a").await), 0);
    let r = batch(&d.client, Some(APP_KEY), &[tokens("a", 1, "k")]).await;
    assert_eq!(summary(&r), (1, 0, 0, 0, 0), "{:?}", r.body);
    d.stop().await;
}

/// The route and its schemas are in the OpenAPI document.
#[tokio::test]
async fn batch_is_documented_in_openapi() {
    let d = TestDaemon::start().await;
    let (status, doc) = d.client.get_noauth("/openapi.json").await;
    assert_eq!(status, 200);
    let op = &doc["paths"]["/v1/consume/batch"]["post"];
    assert!(
        op["summary"]
            .as_str()
            .is_some_and(|s| s.contains("many accounts")),
        "{op}"
    );
    assert!(op["responses"]["200"].is_object(), "{op}");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["BatchItemStatus"]["enum"],
        json!(["allowed", "denied", "replayed", "invalid", "error"]),
        "{}",
        schemas["BatchItemStatus"]
    );
    assert_eq!(
        schemas["BatchBody"]["properties"]["items"]["maxItems"],
        1000
    );
    for s in [
        "BatchItemBody",
        "BatchItemResult",
        "BatchSummary",
        "BatchResult",
    ] {
        assert!(schemas[s].is_object(), "schema {s} is missing");
    }
    d.stop().await;
}
