//! Fuzzing (issue 11), as proptests (cargo-fuzz needs a nightly toolchain these machines do
//! not have): Stripe's event interpretation and the `Stripe-Signature` parser never panic,
//! whatever arrives. Events are real Stripe payloads (`tests/fixtures/stripe/events/`) with
//! random values put at random places, and arbitrary JSON; signatures are arbitrary headers
//! and mutations of a valid one.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256 per property); the long-run figures
//! are in BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use meterd_actors::billing::{PriceMap, head, interpret};
use meterd_actors::signature::{precheck, verify};
use proptest::prelude::*;
use proptest::test_runner::FailurePersistence;

mod common;
use serde_json::Value;

const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/fuzz.txt");

fn regressions() -> proptest::test_runner::FileFailurePersistence {
    common::regressions(REGRESSIONS)
}

fn config() -> ProptestConfig {
    common::config(REGRESSIONS, 256, true)
}

#[test]
fn the_regression_file_is_read() {
    let seeds = regressions().load_persisted_failures2(Some(file!()));
    assert!(!seeds.is_empty(), "no seed read from {REGRESSIONS}");
}

/// The real events, parsed.
fn events() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stripe/events");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            if v.get("type").is_some() {
                out.push(v);
            }
        }
    }
    assert!(out.len() >= 15, "{} events", out.len());
    out
}

fn prices() -> PriceMap {
    let mut p = PriceMap::default();
    p.plans.insert("price_pro".into(), "pro".into());
    p.metered.insert("price_tokens".into());
    p
}

/// A hostile JSON value.
fn nasty() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        Just(Value::String("x".repeat(10_000))),
        Just(Value::String("cus_".into())),
        Just(Value::String("victim".into())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Puts `v` at a path chosen by `picks` (one pick per level), descending into objects and
/// arrays while they last.
fn put_at(cur: &mut Value, picks: &[usize], v: Value) {
    let Some((pick, rest)) = picks.split_first() else {
        *cur = v;
        return;
    };
    let child = match cur {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(pick % m.len()).cloned().unwrap();
            m.get_mut(&key)
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            a.get_mut(pick % n)
        }
        _ => None,
    };
    match child {
        Some(c) => put_at(c, rest, v),
        None => *cur = v,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn real_events_with_hostile_values_never_panic(
        which in any::<usize>(),
        edits in proptest::collection::vec(
            (proptest::collection::vec(any::<usize>(), 1..6), nasty()),
            1..6,
        ),
    ) {
        let all = events();
        let mut ev = all[which % all.len()].clone();
        for (picks, v) in edits {
            put_at(&mut ev, &picks, v);
        }
        let _ = interpret(&ev, &prices());
        let bytes = serde_json::to_vec(&ev).unwrap();
        let _ = head(&bytes);
    }

    #[test]
    fn arbitrary_json_and_bytes_never_panic(v in nasty(), raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = interpret(&v, &prices());
        let _ = head(&raw);
        let _ = head(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn arbitrary_signature_headers_never_panic(
        header in ".{0,200}",
        body in proptest::collection::vec(any::<u8>(), 0..64),
        now in any::<i64>(),
        tolerance in any::<u64>(),
    ) {
        let secrets = ["whsec_test_0123456789abcdef"];
        let _ = precheck(Some(&header), now, tolerance);
        let _ = verify(Some(&header), &body, &secrets, now, tolerance);
    }

    #[test]
    fn mutated_signature_headers_never_panic(
        t in any::<i64>(),
        cut in any::<usize>(),
        insert in "[,=tv0-9a-f ]{0,20}",
        at in any::<usize>(),
    ) {
        let valid = format!("t={t},v1={},v0=abc", "ab".repeat(32));
        let mut h: String = valid.chars().take(cut % (valid.len() + 1)).collect();
        let pos = at % (h.len() + 1);
        h.insert_str(pos, &insert);
        let _ = precheck(Some(&h), 1_700_000_000, 300);
        let _ = verify(Some(&h), b"{}", &["whsec_x_0123456789abcdef"], 1_700_000_000, 300);
    }
}
