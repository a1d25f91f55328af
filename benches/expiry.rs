//! Idempotency expiry benchmark: how fast the janitor's `Store::expire_idem` gets rid of
//! expired records (the issue asks for at least 50,000 keys/s sustained), and what writing
//! and looking up a record costs with several generations alive.
//!
//! Run: `cargo bench --bench expiry` (release). Knob: `EXPIRY_KEYS` (default 500000).
//!
//! 1. Generations of one hour. Writes `EXPIRY_KEYS` consume idempotency records over 1,000
//!    accounts at times in the first hour, as many in the second hour, and flushes (timed:
//!    records/s written).
//! 2. Looks up 100,000 keys that exist in the older generation and 100,000 that exist
//!    nowhere (a new consume's lookup), timed.
//! 3. Expires the first hour (one generation dropped whole) and flushes (timed: keys/s).
//!
//! Fails unless exactly the old records are gone and the young ones all stay.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_precision_loss,
    clippy::float_arithmetic
)]

use std::time::Instant;

use meterd_actors::model::AccountId;
use meterd_actors::store::{IdemOp, IdemRecord, Store, StoreConfig, SyncMode};

const HOUR: i64 = 3_600_000;

fn main() {
    let keys: usize = std::env::var("EXPIRY_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig {
        path: dir.path().to_path_buf(),
        sync: SyncMode::Fdatasync,
        cache_capacity_bytes: 256 << 20,
    })
    .unwrap();
    store.set_idem_generation(HOUR);
    let accounts: Vec<AccountId> = (0..1_000)
        .map(|i| AccountId::parse(&format!("acct_{i}")).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let key = |i: usize| format!("key-{i:012}");
    let account = |i: usize| &accounts[i % accounts.len()];
    // Record i of 2 * keys: the first half in the first hour, the rest in the second.
    let at = |i: usize| (i / keys) as i64 * HOUR + (i % keys) as i64 % HOUR;
    let started = Instant::now();
    for i in 0..2 * keys {
        let rec = IdemRecord {
            seq: i as u64,
            at_ms: at(i),
        };
        store
            .put_idem(account(i), IdemOp::Consume, &key(i), rec)
            .unwrap();
    }
    rt.block_on(store.barrier()).unwrap();
    let wrote = started.elapsed();

    let lookups = 100_000.min(keys);
    let started = Instant::now();
    for i in 0..lookups {
        assert!(
            store
                .get_idem(account(i), IdemOp::Consume, &key(i))
                .unwrap()
                .is_some()
        );
    }
    let hits = started.elapsed();
    let started = Instant::now();
    for i in 0..lookups {
        let j = 2 * keys + i;
        assert!(
            store
                .get_idem(account(j), IdemOp::Consume, &key(j))
                .unwrap()
                .is_none()
        );
    }
    let misses = started.elapsed();

    let started = Instant::now();
    let (generations, records) = store.expire_idem(HOUR).unwrap();
    rt.block_on(store.barrier()).unwrap();
    let expired = started.elapsed();
    assert_eq!((generations, records), (1, keys), "the first hour, whole");
    for i in [0, keys / 2, keys - 1] {
        let get = |i| {
            store
                .get_idem(account(i), IdemOp::Consume, &key(i))
                .unwrap()
        };
        assert!(get(i).is_none(), "old record {i} is gone");
        assert!(get(keys + i).is_some(), "young record {} stays", keys + i);
    }
    assert_eq!(store.expire_idem(HOUR).unwrap(), (0, 0));
    println!(
        "expiry benchmark: {} idempotency records in two one-hour generations",
        2 * keys
    );
    println!(
        "  write (then flush):              {:>12.0} records/s",
        (2 * keys) as f64 / wrote.as_secs_f64()
    );
    println!(
        "  lookup, found in the older one:  {:>12.2} µs",
        hits.as_secs_f64() * 1e6 / lookups as f64
    );
    println!(
        "  lookup, new key (in none):       {:>12.2} µs",
        misses.as_secs_f64() * 1e6 / lookups as f64
    );
    println!(
        "  expire (drop generation, flush): {:>12.0} keys/s  ({keys} keys in {:.3} s)",
        keys as f64 / expired.as_secs_f64(),
        expired.as_secs_f64()
    );
    store.close().unwrap();
}
