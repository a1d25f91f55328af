//! Idempotency expiry benchmark: how fast the janitor's `Store::expire_idem` takes expired
//! records out of the time-ordered `idem_expiry` index (the issue asks for at least 50,000
//! keys/s sustained), and what filing a record costs on the write path.
//!
//! Run: `cargo bench --bench expiry` (release). Knobs: `EXPIRY_KEYS` (default 500000),
//! `EXPIRY_PAGE` (the janitor's page, default 10000).
//!
//! 1. Writes `EXPIRY_KEYS` consume idempotency records over 1,000 accounts, at increasing
//!    times, then flushes (timed: records/s written, each with its index entry).
//! 2. Expires them all in pages, as the janitor does, while the same number of records with
//!    later times stays (so the index is twice the size expired), and flushes (timed).
//!
//! Prints both rates. Fails unless exactly the expired records are gone and the young ones
//! all stay.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::float_arithmetic
)]

use std::time::Instant;

use meterd_actors::model::AccountId;
use meterd_actors::store::{IdemOp, IdemRecord, Store, StoreConfig, SyncMode};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let keys = env("EXPIRY_KEYS", 500_000);
    let page = env("EXPIRY_PAGE", 10_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig {
        path: dir.path().to_path_buf(),
        sync: SyncMode::Fdatasync,
        cache_capacity_bytes: 256 << 20,
    })
    .unwrap();
    let accounts: Vec<AccountId> = (0..1_000)
        .map(|i| AccountId::parse(&format!("acct_{i}")).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // Old records at times 0..keys, young ones at keys.. (kept).
    let write = |from: usize, n: usize| {
        for i in from..from + n {
            let a = &accounts[i % accounts.len()];
            let rec = IdemRecord {
                seq: i as u64,
                at_ms: i as i64,
            };
            store
                .put_idem(a, IdemOp::Consume, &format!("key-{i:012}"), rec)
                .unwrap();
        }
        rt.block_on(store.barrier()).unwrap();
    };
    let started = Instant::now();
    write(0, keys);
    let wrote = started.elapsed();
    write(keys, keys);
    let started = Instant::now();
    let (mut taken, mut deleted, mut pages) = (0usize, 0usize, 0usize);
    loop {
        let (n, d) = store.expire_idem(keys as i64, page).unwrap();
        taken += n;
        deleted += d;
        pages += 1;
        if n < page {
            break;
        }
        assert!(pages <= keys / page + 2, "the expiry does not end");
    }
    rt.block_on(store.barrier()).unwrap();
    let expired = started.elapsed();
    assert_eq!((taken, deleted), (keys, keys), "every old record, once");
    for i in [0, keys / 2, keys - 1] {
        let old = &accounts[i % accounts.len()];
        let young = &accounts[(keys + i) % accounts.len()];
        let get = |a, i: usize| {
            store
                .get_idem(a, IdemOp::Consume, &format!("key-{i:012}"))
                .unwrap()
        };
        assert!(get(old, i).is_none(), "old record {i} is gone");
        assert!(
            get(young, keys + i).is_some(),
            "young record {} stays",
            keys + i
        );
    }
    assert_eq!(store.expire_idem(keys as i64, page).unwrap(), (0, 0));
    println!(
        "expiry benchmark: {keys} expired of {} idempotency records, page {page}",
        2 * keys
    );
    println!(
        "  write (record + index entry, then flush): {:>10.0} records/s",
        keys as f64 / wrote.as_secs_f64()
    );
    println!(
        "  expire (index page + CAS delete, flush):  {:>10.0} keys/s  ({pages} pages, {:.2} s)",
        keys as f64 / expired.as_secs_f64(),
        expired.as_secs_f64()
    );
    store.close().unwrap();
}
