//! Property test (issue 11): a dry run (`check`) answers exactly what the consume after it
//! decides, for every denial code, over random account states and requests.
//!
//! States come from random sequences of upserts (plan, subscription status, spend cap),
//! grants, reservations on either meter, consumes and clock moves. Plans cover every way to
//! be refused: a hard allowance (`cap_reached`), credits (`insufficient_credits`), a blocking
//! spend cap on priced meters (`spend_cap_reached`, also when the price overflows), a plan
//! without the second meter (`meter_not_in_plan`), and an inactive subscription
//! (`subscription_inactive`). Quantities reach 2^53 and prices 10^12 minor units per unit, so
//! the pricing overflows; the cap must then refuse in both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use meterd_actors::account::{
    AccountDeps, AccountError, AccountSettings, Accounts, ConsumeCmd, CreditCmd, GrantInput,
    ReserveCmd, UpsertCmd,
};
use meterd_actors::model::{
    AccountId, Catalog, Clock, IdempotencyKey, MAX_QUANTITY, MeterRule, Outcome, Overage, Plan,
    PlanKind, SpendCap, SpendCapAction, SubscriptionStatus,
};
use meterd_actors::pricing::PriceModel;
use meterd_actors::store::{Store, StoreConfig, SyncMode};
use proptest::prelude::*;
use proptest::test_runner::FailurePersistence;

mod common;

const METERS: [&str; 2] = ["tokens", "images"];

/// Unit prices (minor units), from cheap to overflowing at 2^53 units.
const PRICES: [&str; 4] = ["1", "0.5", "2048", "1000000000000"];

fn plan(
    name: &str,
    kind: PlanKind,
    meters: &[(&str, MeterRule)],
    spend_cap: Option<SpendCap>,
) -> Plan {
    Plan {
        name: name.into(),
        kind,
        currency: "usd".into(),
        base_price: 0,
        seat_price: 0,
        min_seats: 0,
        features: vec![],
        meters: meters
            .iter()
            .map(|(m, r)| (m.to_string(), r.clone()))
            .collect(),
        alert_thresholds: vec![50, 80, 95, 100],
        low_credit_threshold: Some(20),
        spend_cap,
        monthly_credits: 0,
        monthly_credits_rollover_cap: None,
    }
}

fn catalog(price_tokens: &str, price_images: &str, cap: u64) -> Catalog {
    let mut c = Catalog::default();
    for m in METERS {
        c.meters.insert(m.into(), String::new());
    }
    let billed = |price: &str, included: u64| MeterRule {
        included,
        overage: Overage::Bill,
        price: Some(PriceModel::per_unit(price).unwrap()),
    };
    let block_cap = Some(SpendCap {
        amount: cap,
        action: SpendCapAction::Block,
    });
    let notify_cap = Some(SpendCap {
        amount: cap,
        action: SpendCapAction::Notify,
    });
    let plans = [
        plan(
            "capped",
            PlanKind::Metered,
            &[
                ("tokens", billed(price_tokens, 5)),
                ("images", billed(price_images, 0)),
            ],
            block_cap,
        ),
        plan(
            "notify",
            PlanKind::Metered,
            &[
                ("tokens", billed(price_tokens, 5)),
                ("images", billed(price_images, 0)),
            ],
            notify_cap,
        ),
        plan(
            "credits",
            PlanKind::Prepaid,
            &[(
                "tokens",
                MeterRule {
                    included: 10,
                    overage: Overage::Credits {
                        credits_per_unit: 3,
                    },
                    price: None,
                },
            )],
            None,
        ),
        plan(
            "block",
            PlanKind::Free,
            &[
                (
                    "tokens",
                    MeterRule {
                        included: 100,
                        overage: Overage::Block,
                        price: None,
                    },
                ),
                ("images", billed(price_images, 3)),
            ],
            block_cap,
        ),
    ];
    for p in plans {
        c.plans.insert(p.name.clone(), p);
    }
    c
}

const PLAN_NAMES: [&str; 4] = ["capped", "notify", "credits", "block"];
const STATUSES: [SubscriptionStatus; 4] = [
    SubscriptionStatus::Active,
    SubscriptionStatus::PastDue,
    SubscriptionStatus::Canceled,
    SubscriptionStatus::Unpaid,
];

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        plan: usize,
        status: Option<usize>,
        /// An account cap (0: none, not even the plan's).
        cap: Option<u64>,
    },
    Grant {
        amount: i64,
    },
    Reserve {
        meter: usize,
        q: u64,
    },
    Consume {
        meter: usize,
        q: u64,
    },
    Advance {
        secs: i64,
    },
    /// Check, then consume the same request: both must decide alike.
    Probe {
        meter: usize,
        q: u64,
    },
}

fn quantity() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..20,
        2 => 20u64..2_000,
        1 => Just(MAX_QUANTITY),
        1 => (MAX_QUANTITY / 2)..=MAX_QUANTITY,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..PLAN_NAMES.len(), proptest::option::of(0..STATUSES.len()),
              proptest::option::of(prop_oneof![Just(0u64), 1u64..5_000, Just(u64::MAX)]))
            .prop_map(|(plan, status, cap)| Op::Upsert { plan, status, cap }),
        1 => prop_oneof![1i64..100, Just(i64::MAX)].prop_map(|amount| Op::Grant { amount }),
        2 => (0..2usize, quantity()).prop_map(|(meter, q)| Op::Reserve { meter, q }),
        2 => (0..2usize, quantity()).prop_map(|(meter, q)| Op::Consume { meter, q }),
        1 => (0i64..=86_400 * 40).prop_map(|secs| Op::Advance { secs }),
        5 => (0..2usize, quantity()).prop_map(|(meter, q)| Op::Probe { meter, q }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    price_tokens: usize,
    price_images: usize,
    cap: u64,
    plan: usize,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..PRICES.len(),
        0..PRICES.len(),
        prop_oneof![1u64..200, 200u64..100_000, Just(u64::MAX)],
        0..PLAN_NAMES.len(),
        proptest::collection::vec(op(), 1..40),
    )
        .prop_map(|(price_tokens, price_images, cap, plan, ops)| Case {
            price_tokens,
            price_images,
            cap,
            plan,
            ops,
        })
}

fn key(tag: &str, n: usize) -> IdempotencyKey {
    IdempotencyKey::parse(&format!("{tag}-{n}")).unwrap()
}

/// The answer as a comparable value: the decision and every number it carries, or the error.
fn answer(
    r: &Result<meterd_actors::account::ConsumeReply, AccountError>,
) -> Result<String, String> {
    match r {
        Ok(reply) => {
            let rec = &reply.record;
            Ok(format!(
                "{:?} billable={} credits_spent={} burns={:?} included={} limit={:?} used_after={} billable_after={} credits_after={} alerts={:?}",
                rec.outcome,
                rec.billable,
                rec.credits_spent,
                rec.burns,
                rec.included,
                rec.limit,
                rec.used_after,
                rec.billable_after,
                rec.credits_after,
                rec.alerts,
            ))
        }
        Err(e) => Err(format!("{e:?}")),
    }
}

async fn run(case: Case) -> Result<BTreeMap<String, usize>, String> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig {
        path: dir.path().to_path_buf(),
        sync: SyncMode::Flush,
        cache_capacity_bytes: 8 << 20,
    })
    .unwrap();
    let now = Arc::new(AtomicI64::new(1_796_083_200_000)); // 2026-12-01
    let deps = AccountDeps {
        store: store.clone(),
        catalog: Arc::new(catalog(
            PRICES[case.price_tokens],
            PRICES[case.price_images],
            case.cap,
        )),
        clock: Clock::Manual(now.clone()),
        settings: Arc::new(AccountSettings {
            idle_timeout: std::time::Duration::from_secs(300),
            snapshot_every: 7,
            call_timeout: std::time::Duration::from_secs(10),
            max_live: 16,
            max_queued: 10_000,
            past_due_grace: std::time::Duration::from_secs(72 * 3600),
        }),
    };
    let (accounts, _) = Accounts::spawn(deps).await.unwrap();
    let accounts: Accounts = accounts;
    let id = AccountId::parse("acct").unwrap();
    accounts
        .upsert(
            &id,
            UpsertCmd {
                plan: Some(PLAN_NAMES[case.plan].into()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("create: {e}"))?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, op) in case.ops.iter().enumerate() {
        match op {
            Op::Upsert { plan, status, cap } => {
                let _ = accounts
                    .upsert(
                        &id,
                        UpsertCmd {
                            plan: Some(PLAN_NAMES[*plan].into()),
                            status: status.map(|s| STATUSES[s]),
                            spend_cap: cap.map(|amount| SpendCap {
                                amount,
                                action: SpendCapAction::Block,
                            }),
                            ..Default::default()
                        },
                    )
                    .await;
            }
            Op::Grant { amount } => {
                let _ = accounts
                    .credit(
                        &id,
                        CreditCmd {
                            amount: *amount,
                            reason: "test".into(),
                            idempotency_key: key("grant", i),
                            grant: GrantInput::default(),
                        },
                    )
                    .await;
            }
            Op::Reserve { meter, q } => {
                let _ = accounts
                    .reserve(
                        &id,
                        ReserveCmd {
                            meter: METERS[*meter].into(),
                            quantity: *q,
                            ttl_ms: 3_600_000,
                            idempotency_key: key("reserve", i),
                        },
                    )
                    .await;
            }
            Op::Consume { meter, q } => {
                let _ = accounts
                    .consume(
                        &id,
                        ConsumeCmd {
                            meter: METERS[*meter].into(),
                            quantity: *q,
                            idempotency_key: key("consume", i),
                            metadata: BTreeMap::new(),
                        },
                    )
                    .await;
            }
            Op::Advance { secs } => {
                now.fetch_add(secs * 1000, Ordering::SeqCst);
            }
            Op::Probe { meter, q } => {
                let cmd = ConsumeCmd {
                    meter: METERS[*meter].into(),
                    quantity: *q,
                    idempotency_key: key("probe", i),
                    metadata: BTreeMap::new(),
                };
                let checked = accounts.check(&id, cmd.clone()).await;
                let consumed = accounts.consume(&id, cmd).await;
                let (c, d) = (answer(&checked), answer(&consumed));
                if c != d {
                    return Err(format!(
                        "step {i} {op:?}: check and consume differ\ncheck:   {c:?}\nconsume: {d:?}"
                    ));
                }
                let label = match &consumed {
                    Ok(r) => match r.record.outcome {
                        Outcome::Allowed => "allowed".to_owned(),
                        Outcome::Denied(code) => format!("{code:?}"),
                    },
                    Err(e) => format!("error {e}"),
                };
                *seen.entry(label).or_default() += 1;
                // A check with the consume's own key answers its recorded decision.
                if let Ok(r) = &consumed {
                    let again = accounts
                        .check(
                            &id,
                            ConsumeCmd {
                                meter: METERS[*meter].into(),
                                quantity: *q,
                                idempotency_key: key("probe", i),
                                metadata: BTreeMap::new(),
                            },
                        )
                        .await
                        .map_err(|e| format!("step {i}: check with a used key: {e}"))?;
                    if !again.replayed || again.seq != r.seq {
                        return Err(format!(
                            "step {i}: a check with a used key does not replay: {again:?}"
                        ));
                    }
                }
            }
        }
    }
    accounts
        .shutdown(std::time::Duration::from_secs(10))
        .await
        .map_err(|e| format!("shutdown: {e}"))?;
    drop(accounts);
    store.close().map_err(|e| format!("close: {e}"))?;
    Ok(seen)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Failing cases are saved here (see the file's header for replaying one).
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/check_consume.txt"
);

fn regressions() -> proptest::test_runner::FileFailurePersistence {
    common::regressions(REGRESSIONS)
}

fn config() -> ProptestConfig {
    common::config(REGRESSIONS, 48, true)
}

/// The saved cases are read: the file holds a canary seed, so an empty answer means the path
/// is wrong.
#[test]
fn the_regression_file_is_read() {
    let seeds = regressions().load_persisted_failures2(Some(file!()));
    assert!(!seeds.is_empty(), "no seed read from {REGRESSIONS}");
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn check_decides_exactly_as_the_consume_after_it(c in case()) {
        let rt = runtime();
        let r = rt.block_on(run(c));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// The property above is only as good as the states it reaches: over a fixed set of
/// generated cases, every denial code occurs.
#[test]
fn the_generated_states_reach_every_denial_code() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let rt = runtime();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..60 {
        let c = case().new_tree(&mut runner).unwrap().current();
        for (k, n) in rt.block_on(run(c)).unwrap() {
            *seen.entry(k).or_default() += n;
        }
    }
    for code in [
        "allowed",
        "CapReached",
        "InsufficientCredits",
        "SpendCapReached",
        "MeterNotInPlan",
        "SubscriptionInactive",
    ] {
        assert!(seen.contains_key(code), "{code} never occurred: {seen:?}");
    }
}

/// A usage the cap cannot price (2^53 units at 10^12 minor units each does not fit a u64) is
/// refused by a blocking cap, in the check and the consume alike: the cap fails closed. A
/// notify cap lets it through (it only alerts), and without a cap the overflow is the
/// allowance's business.
#[test]
fn an_unpriceable_usage_is_refused_by_a_blocking_cap() {
    let rt = runtime();
    for (plan, cap, expect) in [
        ("capped", 1_000, "SpendCapReached"),
        ("capped", u64::MAX, "SpendCapReached"),
        ("notify", 1_000, "allowed"),
    ] {
        let c = Case {
            price_tokens: 3,
            price_images: 0,
            cap,
            plan: PLAN_NAMES.iter().position(|p| *p == plan).unwrap(),
            ops: vec![Op::Probe {
                meter: 0,
                q: MAX_QUANTITY,
            }],
        };
        let seen = rt.block_on(run(c)).unwrap();
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            vec![expect],
            "{plan}, cap {cap}: {seen:?}"
        );
    }
}
