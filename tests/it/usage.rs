//! `GET /v1/accounts/{id}/usage`: bucketed series, cost to date, the previous period and the
//! change against it, CSV, and validation. Time is a manual clock.

use meterd_actors::model::Clock;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, APP_KEY, Resp, TestDaemon};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// 2026-03-10T00:00:00Z.
const T0: i64 = 1_773_100_800_000;
/// 2026-02-10T00:00:00Z.
const FEB10: i64 = T0 - 28 * DAY_MS;

async fn usage(d: &TestDaemon, id: &str, query: &str) -> Resp {
    d.client
        .send(
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}/usage{query}"),
            Some(APP_KEY),
            None,
        )
        .await
}

async fn usage_ok(d: &TestDaemon, id: &str, query: &str) -> Value {
    let r = usage(d, id, query).await;
    assert_eq!(r.status, 200, "{query}: {:?}", r.body);
    r.body
}

/// The `units` of each bucket of a meter's series.
fn units(body: &Value, meter: &str) -> Vec<u64> {
    body["meters"][meter]["series"]
        .as_array()
        .unwrap_or_else(|| panic!("no series for {meter}: {body}"))
        .iter()
        .map(|b| b["units"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn series_by_day_and_hour_cost_and_csv() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    assert_eq!(
        d.client
            .put_account("u1", json!({"plan": "payg"}))
            .await
            .status,
        201
    );
    assert_eq!(
        d.client
            .put_account("f1", json!({"plan": "free"}))
            .await
            .status,
        201
    );
    // Mar 10: 3 + 2 at 01:xx, 4 at 05:00; Mar 11: 10; Mar 12: nothing; Mar 13: 7.
    for (at, qty, key) in [
        (T0 + HOUR_MS, 3, "k1"),
        (T0 + HOUR_MS + HOUR_MS / 2, 2, "k2"),
        (T0 + 5 * HOUR_MS, 4, "k3"),
        (T0 + DAY_MS + 2 * HOUR_MS, 10, "k4"),
        (T0 + 3 * DAY_MS + 23 * HOUR_MS, 7, "k5"),
    ] {
        clock.set_ms(at);
        let r = d.client.consume("u1", qty, key).await;
        assert_eq!(r.status, 200, "{key}: {:?}", r.body);
    }
    // The free plan caps at 100: the second consume is a recorded denial.
    clock.set_ms(T0 + 2 * HOUR_MS);
    assert_eq!(d.client.consume("f1", 60, "f-ok").await.status, 200);
    let denied = d.client.consume("f1", 50, "f-denied").await;
    assert_eq!(denied.status, 429, "{:?}", denied.body);
    assert!(
        d.client
            .ledger("f1")
            .await
            .iter()
            .any(|e| e["decision"] == "denied"),
        "the denial is in the ledger"
    );
    clock.set_ms(T0 + 3 * DAY_MS + 23 * HOUR_MS + HOUR_MS / 2);

    // Defaults: the current period so far, by day.
    let b = usage_ok(&d, "u1", "").await;
    assert_eq!(b["account_id"], "u1");
    assert_eq!(b["from"], "2026-03-01T00:00:00.000Z");
    // The default end is just after now, so everything recorded so far counts.
    assert_eq!(b["to"], "2026-03-13T23:30:00.001Z");
    assert_eq!(b["granularity"], "day");
    assert_eq!(b["currency"], "usd");
    let mut expected = vec![0u64; 13];
    expected[9] = 9;
    expected[10] = 10;
    expected[12] = 7;
    assert_eq!(units(&b, "tokens"), expected, "{b}");
    assert_eq!(b["meters"]["tokens"]["total"], 26);
    let series = b["meters"]["tokens"]["series"].as_array().unwrap();
    assert_eq!(series[0]["start"], "2026-03-01T00:00:00.000Z");
    assert_eq!(series[12]["start"], "2026-03-13T00:00:00.000Z");
    // payg includes nothing and bills the overage: every unit is billable.
    assert_eq!(series[9]["billable"], 9);
    // $0.50 per token.
    assert_eq!(b["cost_to_date"], 26 * 50);
    let acct = d.client.get_account("u1").await;
    assert_eq!(acct.body["cost"]["total"], 26 * 50);
    assert_eq!(b["projected_cost"], acct.body["cost"]["projected_total"]);
    // Created this period: no previous period; change is against zero.
    assert!(b.get("previous_period").is_none(), "{b}");
    assert_eq!(b["change"]["tokens"], json!({"units": 26, "percent": null}));

    // An explicit range: every day appears, zeros included, and the total is the sum.
    let q = "?from=2026-03-09T00:00:00Z&to=2026-03-14T00:00:00Z";
    let b = usage_ok(&d, "u1", q).await;
    assert_eq!(units(&b, "tokens"), vec![0, 9, 10, 0, 7]);
    assert_eq!(b["meters"]["tokens"]["total"], 26);
    assert_eq!(b["to"], "2026-03-14T00:00:00.000Z");

    // A range that starts mid-day counts only what is inside it, in aligned buckets.
    let b = usage_ok(
        &d,
        "u1",
        "?from=2026-03-10T02:00:00Z&to=2026-03-11T00:00:00Z",
    )
    .await;
    assert_eq!(units(&b, "tokens"), vec![4]);
    assert_eq!(
        b["meters"]["tokens"]["series"][0]["start"],
        "2026-03-10T00:00:00.000Z"
    );

    // By hour, one day: units land in their hours.
    let b = usage_ok(
        &d,
        "u1",
        "?from=2026-03-10T00:00:00Z&to=2026-03-11T00:00:00Z&granularity=hour",
    )
    .await;
    assert_eq!(b["granularity"], "hour");
    let mut hours = vec![0u64; 24];
    hours[1] = 5;
    hours[5] = 4;
    assert_eq!(units(&b, "tokens"), hours);
    assert_eq!(b["meters"]["tokens"]["total"], 9);
    assert_eq!(
        b["meters"]["tokens"]["series"][5]["start"],
        "2026-03-10T05:00:00.000Z"
    );

    // The denial consumed nothing.
    let b = usage_ok(&d, "f1", "").await;
    assert_eq!(b["meters"]["tokens"]["total"], 60, "{b}");
    assert_eq!(units(&b, "tokens")[9], 60);
    assert_eq!(b["cost_to_date"], 0);

    // CSV: the header and one row per bucket per meter; the admin key works too.
    let r = d
        .client
        .send(
            reqwest::Method::GET,
            &format!("/v1/accounts/u1/usage{q}&format=csv"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let ct = r.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/csv"), "{ct}");
    let text = r.body.as_str().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            "meter,start,units,billable",
            "tokens,2026-03-09T00:00:00.000Z,0,0",
            "tokens,2026-03-10T00:00:00.000Z,9,9",
            "tokens,2026-03-11T00:00:00.000Z,10,10",
            "tokens,2026-03-12T00:00:00.000Z,0,0",
            "tokens,2026-03-13T00:00:00.000Z,7,7",
        ]
    );
    d.stop().await;
}

#[tokio::test]
async fn previous_period_and_change() {
    let clock = Clock::manual(FEB10);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("p", json!({"plan": "payg"})).await;
    clock.set_ms(FEB10 + HOUR_MS);
    assert_eq!(d.client.consume("p", 40, "feb-1").await.status, 200);
    clock.set_ms(FEB10 + 10 * DAY_MS);
    assert_eq!(d.client.consume("p", 20, "feb-2").await.status, 200);
    let b = usage_ok(&d, "p", "").await;
    assert!(b.get("previous_period").is_none(), "{b}");
    assert_eq!(b["meters"]["tokens"]["total"], 60);

    // March 5, before any consume: the rollover is not written yet, February is still the
    // previous period.
    let mar5 = T0 - 5 * DAY_MS;
    clock.set_ms(mar5);
    let b = usage_ok(&d, "p", "").await;
    assert_eq!(
        b["previous_period"]["start"], "2026-02-01T00:00:00.000Z",
        "{b}"
    );
    assert_eq!(b["previous_period"]["units"]["tokens"], 60);
    assert_eq!(
        b["change"]["tokens"],
        json!({"units": -60, "percent": -100})
    );
    assert_eq!(b["cost_to_date"], 0);

    // A consume in March rolls the period over (a ledger entry).
    clock.set_ms(mar5 + HOUR_MS);
    assert_eq!(d.client.consume("p", 16, "mar-1").await.status, 200);
    assert!(
        d.client
            .ledger("p")
            .await
            .iter()
            .any(|e| e["kind"] == "period_rolled"),
        "the rollover is recorded"
    );
    clock.set_ms(mar5 + 2 * HOUR_MS);
    let b = usage_ok(&d, "p", "").await;
    assert_eq!(b["from"], "2026-03-01T00:00:00.000Z");
    assert_eq!(b["meters"]["tokens"]["total"], 16);
    assert_eq!(units(&b, "tokens"), vec![0, 0, 0, 0, 16]);
    assert_eq!(b["cost_to_date"], 16 * 50);
    assert_eq!(
        b["previous_period"],
        json!({
            "start": "2026-02-01T00:00:00.000Z",
            "end": "2026-03-01T00:00:00.000Z",
            "units": {"tokens": 60},
            "cost": 60 * 50,
        })
    );
    // (16 - 60) × 100 / 60 = -73.3: rounded toward zero.
    assert_eq!(b["change"]["tokens"], json!({"units": -44, "percent": -73}));

    // A range across both periods.
    let b = usage_ok(
        &d,
        "p",
        "?from=2026-02-01T00:00:00Z&to=2026-03-06T00:00:00Z",
    )
    .await;
    let u = units(&b, "tokens");
    assert_eq!(u.len(), 33);
    assert_eq!((u[9], u[19], u[32]), (40, 20, 16));
    assert_eq!(b["meters"]["tokens"]["total"], 76);
    d.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused() {
    let clock = Clock::manual(T0);
    let d = TestDaemon::start_in(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    d.client.put_account("v", json!({"plan": "payg"})).await;
    for (query, names) in [
        (
            "?from=2026-03-05T00:00:00Z&to=2026-03-05T00:00:00Z",
            "`from`",
        ),
        (
            "?from=2026-03-06T00:00:00Z&to=2026-03-05T00:00:00Z",
            "`from`",
        ),
        ("?granularity=week", "`granularity`"),
        (
            "?from=2026-03-01T00:00:00Z&to=2026-04-05T00:00:00Z&granularity=hour",
            "744",
        ),
        ("?from=2025-01-01T00:00:00Z&to=2026-03-01T00:00:00Z", "366"),
        ("?from=2026-13-01T00:00:00Z", "`from`"),
        ("?to=yesterday", "`to`"),
        ("?format=xml", "`format`"),
    ] {
        let r = usage(&d, "v", query).await;
        assert_eq!(r.status, 400, "{query}: {:?}", r.body);
        assert_eq!(r.code(), "invalid_request", "{query}");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(names), "{query}: {msg}");
    }
    // The limits themselves are allowed.
    usage_ok(
        &d,
        "v",
        "?from=2026-03-01T00:00:00Z&to=2026-04-01T00:00:00Z&granularity=hour",
    )
    .await;
    usage_ok(
        &d,
        "v",
        "?from=2025-03-01T00:00:00Z&to=2026-03-01T00:00:00Z",
    )
    .await;

    let r = usage(&d, "nobody", "").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "unknown_account");
    let r = d
        .client
        .send(reqwest::Method::GET, "/v1/accounts/v/usage", None, None)
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "unauthorized");
    d.stop().await;
}
