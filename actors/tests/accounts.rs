//! The account actors through their public handle, without HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meterd_actors::account::{
    AccountDeps, AccountError, AccountSettings, Accounts, ConsumeCmd, CreditCmd, UpsertCmd,
};
use meterd_actors::ledger::{ConsumeRecord, EntryKind, LedgerEntry};
use meterd_actors::model::Outcome;
use meterd_actors::model::{
    AccountId, Catalog, Clock, IdempotencyKey, MeterRule, Overage, Plan, PlanKind,
};
use meterd_actors::store::{Store, StoreConfig, SyncMode};

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.meters.insert("tokens".into(), String::new());
    let plan = |name: &str, included, overage| Plan {
        name: name.into(),
        kind: PlanKind::Free,
        currency: "usd".into(),
        base_price: 0,
        seat_price: 0,
        min_seats: 0,
        features: vec![],
        alert_thresholds: vec![50, 80, 95, 100],
        low_credit_threshold: None,
        spend_cap: None,
        monthly_credits: 0,
        monthly_credits_rollover_cap: None,
        meters: BTreeMap::from([(
            "tokens".to_string(),
            MeterRule {
                included,
                overage,
                price: None,
            },
        )]),
    };
    c.plans
        .insert("capped".into(), plan("capped", 1000, Overage::Block));
    c.plans
        .insert("open".into(), plan("open", 0, Overage::Unlimited));
    c.plans
        .insert("metered".into(), plan("metered", 0, Overage::Bill));
    let mut monthly = plan("monthly", 0, Overage::Unlimited);
    monthly.monthly_credits = 100;
    c.plans.insert("monthly".into(), monthly);
    c.plans.insert(
        "prepaid".into(),
        plan(
            "prepaid",
            0,
            Overage::Credits {
                credits_per_unit: 2,
            },
        ),
    );
    c
}

fn settings() -> AccountSettings {
    AccountSettings {
        idle_timeout: Duration::from_secs(300),
        snapshot_every: 1000,
        call_timeout: Duration::from_secs(10),
        max_live: 1000,
        past_due_grace: Duration::from_secs(72 * 3600),
        max_queued: 10_000,
    }
}

/// `Store::open` waits (bounded) for the lock a just-closed store's threads may hold.
fn open_store(dir: &std::path::Path) -> Store {
    Store::open(&StoreConfig {
        path: dir.to_path_buf(),
        sync: SyncMode::Fdatasync,
        cache_capacity_bytes: 16 << 20,
    })
    .unwrap()
}

async fn system(store: &Store, settings: AccountSettings) -> Accounts {
    system_at(store, settings, Clock::System).await
}

async fn system_at(store: &Store, settings: AccountSettings, clock: Clock) -> Accounts {
    let deps = AccountDeps {
        store: store.clone(),
        catalog: Arc::new(catalog()),
        clock,
        settings: Arc::new(settings),
    };
    Accounts::spawn(deps).await.unwrap().0
}

fn id(s: &str) -> AccountId {
    AccountId::parse(s).unwrap()
}

fn consume(q: u64, key: &str) -> ConsumeCmd {
    ConsumeCmd {
        meter: "tokens".into(),
        quantity: q,
        idempotency_key: IdempotencyKey::parse(key).unwrap(),
        metadata: BTreeMap::new(),
    }
}

async fn create(accounts: &Accounts, account: &str, plan: &str) {
    let r = accounts
        .upsert(
            &id(account),
            UpsertCmd {
                plan: Some(plan.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(r.created);
}

/// Every consume of one account goes through its one actor: under 200 concurrent callers the
/// cap holds exactly, sequence numbers are contiguous, and the flusher commits many writes per
/// flush (group commit) instead of one flush per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_actor_serializes_concurrent_consumes_with_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "hot", "capped").await;
    let flushes_before = store.stats().flushes.load(Ordering::Relaxed);
    let waiters_before = store.stats().waiters.load(Ordering::Relaxed);
    let mut tasks = Vec::new();
    for t in 0..200 {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let mut allowed = Vec::new();
            for i in 0..3 {
                let r = eat(&accounts, &id("hot"), 7, &format!("t{t}-{i}"))
                    .await
                    .unwrap();
                if r.record.outcome == Outcome::Allowed {
                    allowed.push(r.seq.unwrap());
                }
            }
            allowed
        }));
    }
    let mut allowed = Vec::new();
    for t in tasks {
        allowed.extend(t.await.unwrap());
    }
    // 1000 / 7 = 142 requests fit under the cap, never one more.
    assert_eq!(allowed.len(), 142);
    let view = accounts.get(&id("hot")).await.unwrap();
    assert_eq!(view.meters[0].used, 994);
    assert_eq!(view.last_seq, 1 + 600);
    let flushes = store.stats().flushes.load(Ordering::Relaxed) - flushes_before;
    let waiters = store.stats().waiters.load(Ordering::Relaxed) - waiters_before;
    assert!(waiters >= 601, "every reply waited for a flush ({waiters})");
    assert!(
        flushes < waiters,
        "group commit: {flushes} flushes for {waiters} acknowledgements"
    );
    let report = meterd_actors::verify::verify_store(&store).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.entries, 601);
}

async fn eat(
    accounts: &Accounts,
    account: &AccountId,
    q: u64,
    key: &str,
) -> Result<meterd_actors::account::ConsumeReply, AccountError> {
    accounts.consume(account, consume(q, key)).await
}

/// A crashed actor's callers get an error at once (not a hang), and the supervisor's next
/// actor for the account starts from sled with nothing lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_actor_restarts_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "a", "open").await;
    eat(&accounts, &id("a"), 5, "k1").await.unwrap();
    accounts.crash(&id("a")).await.unwrap();
    // Queued behind the crash: dropped with the actor, so the caller hears about it fast.
    let started = std::time::Instant::now();
    let during = eat(&accounts, &id("a"), 5, "k2").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    if let Err(e) = &during {
        assert!(matches!(e, AccountError::Unavailable(_)), "{e:?}");
    }
    // The client retries with the same key: counted once either way.
    let retry = eat(&accounts, &id("a"), 5, "k2").await.unwrap();
    assert_eq!(retry.record.outcome, Outcome::Allowed);
    let again = eat(&accounts, &id("a"), 5, "k1").await.unwrap();
    assert!(again.replayed);
    let view = accounts.get(&id("a")).await.unwrap();
    assert_eq!(view.meters[0].used, 10);
    let stats = accounts.stats().await.unwrap();
    assert_eq!(stats.failed_total, 1);
    assert!(stats.spawned_total >= 2);
}

/// With a live limit of 2 and a 20 ms idle timeout, actors stop and restart constantly while
/// 24 callers hammer 6 accounts. If two actors ever served one account at once, both would
/// write the same sequence number and acknowledged consumes would go missing from the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passivation_never_yields_two_writers_for_one_account() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(
        &store,
        AccountSettings {
            idle_timeout: Duration::from_millis(20),
            max_live: 2,
            snapshot_every: 5,
            ..settings()
        },
    )
    .await;
    for a in 0..6 {
        create(&accounts, &format!("acct{a}"), "open").await;
    }
    let mut tasks = Vec::new();
    for t in 0..24u64 {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked: Vec<(String, u64)> = Vec::new();
            for i in 0..40u64 {
                let a = format!("acct{}", (t + i * 5) % 6);
                if i % 13 == 0 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                let r = eat(&accounts, &id(&a), 1, &format!("t{t}-{i}"))
                    .await
                    .unwrap();
                acked.push((a, r.seq.unwrap()));
            }
            acked
        }));
    }
    let mut per_account: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for t in tasks {
        for (a, seq) in t.await.unwrap() {
            per_account.entry(a).or_default().push(seq);
        }
    }
    let stats = accounts.stats().await.unwrap();
    assert!(
        stats.spawned_total > 6,
        "actors were passivated and respawned: {stats:?}"
    );
    for (a, mut seqs) in per_account {
        seqs.sort_unstable();
        let n = seqs.len();
        seqs.dedup();
        assert_eq!(
            seqs.len(),
            n,
            "account {a}: two acknowledgements share a seq"
        );
        let view = accounts.get(&id(&a)).await.unwrap();
        assert_eq!(view.meters[0].used, n as u64, "account {a}");
        let ledger = store.entries_after(&id(&a), 0, 10_000).unwrap();
        let consumes = ledger
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Consume(_)))
            .count();
        assert_eq!(
            consumes, n,
            "account {a}: every acknowledged consume is in the ledger"
        );
    }
    let report = meterd_actors::verify::verify_store(&store).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

#[tokio::test]
async fn idle_actors_stop_and_come_back_with_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(
        &store,
        AccountSettings {
            idle_timeout: Duration::from_millis(50),
            ..settings()
        },
    )
    .await;
    create(&accounts, "sleepy", "capped").await;
    eat(&accounts, &id("sleepy"), 5, "k1").await.unwrap();
    let mut stopped = false;
    for _ in 0..100 {
        if accounts.stats().await.unwrap().live == 0 {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopped, "the idle actor stopped");
    let r = eat(&accounts, &id("sleepy"), 5, "k2").await.unwrap();
    assert_eq!(r.record.used_after, 10);
    let stats = accounts.stats().await.unwrap();
    assert_eq!(stats.spawned_total, 2);
}

#[tokio::test]
async fn the_live_actor_limit_evicts_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(
        &store,
        AccountSettings {
            max_live: 3,
            ..settings()
        },
    )
    .await;
    for a in 0..10 {
        create(&accounts, &format!("a{a}"), "capped").await;
        eat(&accounts, &id(&format!("a{a}")), 1, "k").await.unwrap();
    }
    let stats = accounts.stats().await.unwrap();
    assert!(stats.live <= 3, "{stats:?}");
    for a in 0..10 {
        let v = accounts.get(&id(&format!("a{a}"))).await.unwrap();
        assert_eq!(v.meters[0].used, 1);
    }
}

/// The snapshot and the idempotency index are derived: wiped, they are rebuilt from the
/// ledger, and replays still answer with the original entry.
#[tokio::test]
async fn derived_state_is_rebuilt_from_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_store(dir.path());
        let accounts = system(
            &store,
            AccountSettings {
                snapshot_every: 3,
                ..settings()
            },
        )
        .await;
        create(&accounts, "p", "prepaid").await;
        accounts
            .credit(
                &id("p"),
                CreditCmd {
                    amount: 100,
                    reason: "grant".into(),
                    idempotency_key: IdempotencyKey::parse("g1").unwrap(),
                    grant: Default::default(),
                },
            )
            .await
            .unwrap();
        for i in 0..10 {
            eat(&accounts, &id("p"), 3, &format!("k{i}")).await.unwrap();
        }
        accounts.shutdown(Duration::from_secs(5)).await.unwrap();
        store.close().unwrap();
        drop(store);
    }
    // Wipe the derived trees, as a crash between ledger write and index write could.
    {
        let db = meterd_actors::store::open_raw(dir.path()).unwrap();
        db.open_tree("idem").unwrap().clear().unwrap();
        db.open_tree("accounts").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    let view = accounts.get(&id("p")).await.unwrap();
    // 10 consumes of 3 units at 2 credits each: 60 of 100 credits spent.
    assert_eq!(view.credits, 40);
    assert_eq!(view.meters[0].used, 30);
    let replay = eat(&accounts, &id("p"), 3, "k4").await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.seq, Some(2 + 5));
    let conflict = eat(&accounts, &id("p"), 4, "k4").await.unwrap_err();
    assert_eq!(conflict, AccountError::IdempotencyConflict { seq: 7 });
    assert!(meterd_actors::verify::verify_store(&store).unwrap().ok());
}

/// `verify` notices an entry whose recorded balances do not follow from the ones before.
#[tokio::test]
async fn verify_detects_a_tampered_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "t", "capped").await;
    eat(&accounts, &id("t"), 5, "k1").await.unwrap();
    accounts.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(meterd_actors::verify::verify_store(&store).unwrap().ok());
    let mut bad = store.read_entry(&id("t"), 2).unwrap().unwrap();
    if let EntryKind::Consume(c) = &mut bad.kind {
        *c = ConsumeRecord {
            used_after: 6,
            ..c.clone()
        };
    }
    store.append_entry(&id("t"), &bad).unwrap();
    let report = meterd_actors::verify::verify_store(&store).unwrap();
    assert!(!report.ok());
    assert!(report.problems[0].contains("used"), "{:?}", report.problems);
}

/// `verify` notices a gap in the sequence numbers.
#[tokio::test]
async fn verify_detects_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "g", "open").await;
    eat(&accounts, &id("g"), 5, "k1").await.unwrap();
    accounts.shutdown(Duration::from_secs(5)).await.unwrap();
    let entry = store.read_entry(&id("g"), 2).unwrap().unwrap();
    store
        .append_entry(&id("g"), &LedgerEntry { seq: 4, ..entry })
        .unwrap();
    let report = meterd_actors::verify::verify_store(&store).unwrap();
    assert!(!report.ok());
    assert!(
        report.problems[0].contains("expected sequence number 3"),
        "{:?}",
        report.problems
    );
}

/// Alerts are queued for outgoing notification in the store, in time order.
#[tokio::test]
async fn fired_alerts_are_recorded_in_the_ledger_and_nothing_is_queued_unread() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "q", "capped").await;
    let r = eat(&accounts, &id("q"), 600, "k1").await.unwrap();
    assert_eq!(r.record.alerts.len(), 1);
    eat(&accounts, &id("q"), 400, "k2").await.unwrap();
    accounts.shutdown(Duration::from_secs(5)).await.unwrap();
    let fired: Vec<(u64, u64)> = store
        .entries_after(&id("q"), 0, 100)
        .unwrap()
        .into_iter()
        .flat_map(|e| match e.kind {
            EntryKind::Consume(c) => c.alerts.iter().map(|a| (e.seq, a.threshold)).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(fired, vec![(2, 50), (3, 80), (3, 95), (3, 100)]);
    // No notifier drains a queue yet, so none is written (it would only grow).
    assert!(store.queued_alerts(100).unwrap().is_empty());
    // Not after a recovery either, which replays the ledger tail.
    let accounts = system(&store, settings()).await;
    accounts.get(&id("q")).await.unwrap();
    assert!(store.queued_alerts(100).unwrap().is_empty());
}

/// An idempotency record can dangle: it is claimed just before its entry is written, and a
/// crash can fall in between. A dangling record is not a replay, even once another kind of
/// entry takes that sequence number.
#[tokio::test]
async fn a_dangling_idempotency_record_is_not_a_replay() {
    use meterd_actors::store::{IdemOp, IdemRecord};
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "d", "open").await;
    // Entry 2 will be a credit grant; a stale claim says key "k" answered at 2.
    store
        .put_idem(
            &id("d"),
            IdemOp::Consume,
            "k",
            IdemRecord { seq: 2, at_ms: 0 },
        )
        .unwrap();
    store
        .put_idem(
            &id("d"),
            IdemOp::Consume,
            "future",
            IdemRecord { seq: 99, at_ms: 0 },
        )
        .unwrap();
    accounts
        .credit(
            &id("d"),
            CreditCmd {
                amount: 5,
                reason: String::new(),
                idempotency_key: IdempotencyKey::parse("g").unwrap(),
                grant: Default::default(),
            },
        )
        .await
        .unwrap();
    for key in ["k", "future"] {
        let r = eat(&accounts, &id("d"), 1, key).await.unwrap();
        assert!(!r.replayed, "{key}");
        let again = eat(&accounts, &id("d"), 1, key).await.unwrap();
        assert!(again.replayed, "{key}");
        assert_eq!(again.seq, r.seq);
    }
    assert_eq!(accounts.get(&id("d")).await.unwrap().meters[0].used, 2);
    accounts.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(meterd_actors::verify::verify_store(&store).unwrap().ok());
}

/// Checkout links the customer it created only if none was linked meanwhile.
#[tokio::test]
async fn a_conditional_customer_link_never_overwrites_one_set_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "a", "capped").await;
    let link = |c: &str| UpsertCmd {
        link_customer_if_unset: Some(c.into()),
        ..Default::default()
    };
    let r = accounts.upsert(&id("a"), link("cus_first")).await.unwrap();
    assert_eq!(
        r.view.profile.stripe_customer_id.as_deref(),
        Some("cus_first")
    );
    let r = accounts.upsert(&id("a"), link("cus_second")).await.unwrap();
    assert_eq!(
        r.view.profile.stripe_customer_id.as_deref(),
        Some("cus_first")
    );
    // An explicit set still replaces it.
    let set = UpsertCmd {
        stripe_customer_id: Some("cus_admin".into()),
        ..Default::default()
    };
    let r = accounts.upsert(&id("a"), set).await.unwrap();
    assert_eq!(
        r.view.profile.stripe_customer_id.as_deref(),
        Some("cus_admin")
    );
    assert_eq!(store.customer_account("cus_admin").unwrap(), Some(id("a")));
}

/// The webhook actor is supervised: after it fails, a new one rebuilds its queue from the log
/// and applies what was logged meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_webhook_actor_is_restarted_and_applies_the_log() {
    use meterd_actors::store::{EventSource, WebhookRecord, WebhookStatus};
    use meterd_actors::supervisor::{
        Components, Health, Restart, Supervisor, SupervisorArgs, SupervisorPolicy,
    };
    use meterd_actors::webhook::{WebhookArgs, WebhookSettings, Webhooks};
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "acct_w", "capped").await;
    let (supervisor, supervisor_handle) = Supervisor::spawn(SupervisorArgs {
        policy: SupervisorPolicy {
            max_failures: 1,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
        },
        components: Components::default(),
    })
    .await
    .unwrap();
    let (webhooks, start) = Webhooks::prepare(WebhookArgs {
        store: store.clone(),
        accounts: accounts.clone(),
        clock: Clock::System,
        settings: WebhookSettings {
            client: None,
            prices: Default::default(),
            fallback_plan: "capped".into(),
            money: Default::default(),
            max_attempts: 5,
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            retention: Duration::from_secs(35 * 86_400),
            refetch: false,
            poll: Duration::from_millis(20),
            backfill_on_start: false,
            backfill_days: 30,
        },
    });
    supervisor
        .start("webhooks", Restart::WithBackoff, start)
        .await
        .unwrap();
    let log = |n: u32| {
        let id = format!("evt_w{n}");
        let body = format!(
            r#"{{"id":"{id}","object":"event","type":"customer.updated","created":{n},"data":{{"object":{{"id":"cus_w","object":"customer","email":"w{n}@example.com","metadata":{{"meterd_account_id":"acct_w"}}}}}}}}"#
        );
        let rec = WebhookRecord {
            id: id.clone(),
            event_type: "customer.updated".into(),
            created_s: i64::from(n),
            received_ms: Clock::System.now_ms(),
            source: EventSource::Webhook,
            thin: false,
            status: WebhookStatus::Pending,
            attempts: 0,
            next_at_ms: 0,
            last_error: None,
            outcome: None,
            settled_ms: None,
        };
        assert!(store.log_event(&rec, body.as_bytes()).unwrap());
        id
    };
    let applied = |id: String| {
        let store = store.clone();
        async move {
            for _ in 0..500 {
                if store.event(&id).unwrap().unwrap().status == WebhookStatus::Applied {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };
    let first = log(1);
    webhooks.logged(&first, 1);
    assert!(applied(first).await);
    webhooks.crash();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Logged while no actor runs (the announcement is lost): the restarted one finds it.
    let second = log(2);
    webhooks.logged(&second, 2);
    assert!(applied(second).await, "applied after the restart");
    let view = accounts.get(&id("acct_w")).await.unwrap();
    assert_eq!(view.profile.email.as_deref(), Some("w2@example.com"));
    let c = supervisor.components().snapshot()["webhooks"].clone();
    assert_eq!((c.health, c.restarts), (Health::Ok, 1), "{c:?}");
    // A second failure within the window is over the budget of one: fatal, not restarted.
    webhooks.crash();
    let reason = tokio::time::timeout(Duration::from_secs(10), supervisor.fatal())
        .await
        .expect("the fault is reported");
    assert!(reason.starts_with("webhooks failed"), "{reason}");
    let c = supervisor.components().snapshot()["webhooks"].clone();
    assert_eq!((c.health, c.restarts), (Health::Failed, 1), "{c:?}");
    assert_eq!(supervisor.components().worst(), Health::Failed);
    supervisor.stop();
    tokio::time::timeout(Duration::from_secs(10), supervisor_handle)
        .await
        .expect("the supervisor ends after stop")
        .unwrap();
}

/// An unknown id costs one key lookup: every kind of request gets `UnknownAccount` and no
/// actor is spawned (so unknown ids cannot fill memory or evict live accounts).
#[tokio::test]
async fn unknown_accounts_spawn_no_actor() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    create(&accounts, "known", "capped").await;
    let before = accounts.stats().await.unwrap();
    for i in 0..2_000 {
        let who = id(&format!("nobody-{i}"));
        let unknown = AccountError::UnknownAccount(who.clone());
        assert_eq!(accounts.get(&who).await.err(), Some(unknown.clone()));
        assert_eq!(
            eat(&accounts, &who, 1, "k").await.err(),
            Some(unknown.clone())
        );
        assert_eq!(
            accounts.settle(&who, 1, None).await.err(),
            Some(unknown.clone())
        );
    }
    let after = accounts.stats().await.unwrap();
    assert_eq!(after.spawned_total, before.spawned_total, "{after:?}");
    assert_eq!(after.live, 1);
    assert_eq!(accounts.queued(), 0);
    // The known account is served as before; creating a new one still works.
    eat(&accounts, &id("known"), 1, "k").await.unwrap();
    create(&accounts, "nobody-0", "capped").await;
    eat(&accounts, &id("nobody-0"), 1, "k").await.unwrap();
}

/// Beyond `max_queued` waiting requests a call fails at once with `Overloaded`; the queued
/// ones are served, and every ticket comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_queued_are_shed_and_tickets_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(
        &store,
        AccountSettings {
            max_queued: 4,
            ..settings()
        },
    )
    .await;
    create(&accounts, "busy", "open").await;
    create(&accounts, "other", "open").await;
    // The stall holds one ticket while it runs; three consumes queue behind it. It is long,
    // so that a loaded machine still sees the queue full (the test does not wait for it: the
    // waiting consumes are answered when it ends).
    accounts.stall(&id("busy"), Duration::from_secs(3)).unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let a = accounts.clone();
            tokio::spawn(async move { eat(&a, &id("busy"), 1, &format!("q{i}")).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_millis(2500);
    while accounts.queued() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "queued stays at {}",
            accounts.queued()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Full: shed at once, for any account, without waiting: the queue is still full after.
    assert_eq!(
        eat(&accounts, &id("other"), 1, "shed").await.err(),
        Some(AccountError::Overloaded(4))
    );
    assert_eq!(accounts.queued(), 4, "the shed call waited for the stall");
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().record.outcome, Outcome::Allowed);
    }
    let mut spins = 0;
    while accounts.queued() > 0 {
        spins += 1;
        assert!(spins < 400, "tickets not returned: {}", accounts.queued());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The shed request wrote nothing: its key is still free.
    let r = eat(&accounts, &id("other"), 1, "shed").await.unwrap();
    assert!(!r.replayed);
    assert_eq!(r.record.used_after, 1);
}

// ---- crash windows: a multi-key change stopped at a failpoint, as kill -9 would ----

fn verified(store: &Store) {
    let report = meterd_actors::verify::verify_store(store).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

fn kinds(store: &Store, account: &str) -> Vec<&'static str> {
    store
        .entries_after(&id(account), 0, 100)
        .unwrap()
        .iter()
        .map(|e| e.kind.name())
        .collect()
}

/// Creation, then a crash before the first monthly credits: recovery writes them.
#[tokio::test]
async fn a_creation_interrupted_before_its_monthly_credits_gets_them_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(&store, settings()).await;
    meterd_actors::failpoint::arm("upsert:after-create", "fresh");
    let r = accounts
        .upsert(
            &id("fresh"),
            UpsertCmd {
                plan: Some("monthly".into()),
                ..Default::default()
            },
        )
        .await;
    assert!(r.is_err(), "stopped at the failpoint");
    assert_eq!(kinds(&store, "fresh"), ["account_upserted"]);
    // The next actor for the account recovers and finishes the period start.
    assert_eq!(accounts.get(&id("fresh")).await.unwrap().credits, 100);
    assert_eq!(kinds(&store, "fresh"), ["account_upserted", "credit"]);
    verified(&store);
}

/// A rollover, then a crash before the new period's monthly credits: recovery writes them.
#[tokio::test]
async fn a_rollover_interrupted_before_its_monthly_credits_gets_them_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    // 2026-03-10, then 2026-04-02.
    let clock = Clock::manual(1_773_100_800_000);
    let accounts = system_at(&store, settings(), clock.clone()).await;
    create(&accounts, "roll", "monthly").await;
    eat(&accounts, &id("roll"), 5, "march").await.unwrap();
    clock.set_ms(1_775_088_000_000);
    meterd_actors::failpoint::arm("catch_up:after-rollover", "roll");
    assert!(eat(&accounts, &id("roll"), 5, "april").await.is_err());
    assert_eq!(
        kinds(&store, "roll"),
        ["account_upserted", "credit", "consume", "period_rolled"]
    );
    let v = accounts.get(&id("roll")).await.unwrap();
    assert_eq!(v.credits, 100, "April's monthly credits (March's expired)");
    assert_eq!(
        kinds(&store, "roll")[..5],
        [
            "account_upserted",
            "credit",
            "consume",
            "period_rolled",
            "credit"
        ]
    );
    // The interrupted consume was never acknowledged: its retry is a new request.
    let r = eat(&accounts, &id("roll"), 5, "april").await.unwrap();
    assert!(!r.replayed);
    verified(&store);
}

/// A billable entry written, then a crash before its outbox item: recovery queues it, and
/// it is in exactly one place of the outbox family (verify checks that too).
#[tokio::test]
async fn a_billable_entry_interrupted_before_its_outbox_item_is_queued_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let accounts = system(
        &store,
        AccountSettings {
            snapshot_every: 1,
            ..settings()
        },
    )
    .await;
    create(&accounts, "bill", "metered").await;
    eat(&accounts, &id("bill"), 3, "k1").await.unwrap();
    meterd_actors::failpoint::arm("append:after-ledger", "bill");
    assert!(eat(&accounts, &id("bill"), 4, "k2").await.is_err());
    let seq = store
        .entries_after(&id("bill"), 0, 100)
        .unwrap()
        .last()
        .unwrap()
        .seq;
    assert!(
        store
            .outbox_location(&id("bill"), seq)
            .unwrap()
            .queued
            .is_none()
    );
    let problems = meterd_actors::verify::verify_store(&store)
        .unwrap()
        .problems;
    assert!(
        problems.iter().any(|p| p.contains("in none of outbox")),
        "verify sees the gap before recovery: {problems:?}"
    );
    accounts.get(&id("bill")).await.unwrap();
    let queued = store.outbox_location(&id("bill"), seq).unwrap().queued;
    assert_eq!(queued.map(|r| r.item.value), Some(4));
    verified(&store);
}

/// A revive interrupted between queueing and leaving `dead`: at open, the record stays
/// queued and leaves `dead` (retried, never lost, never in two places).
#[tokio::test]
async fn an_interrupted_revive_is_settled_at_open() {
    use meterd_actors::store::OutboxItem;
    let dir = tempfile::tempdir().unwrap();
    let a = id("rev");
    {
        let store = open_store(dir.path());
        let item = OutboxItem {
            meter: "tokens".into(),
            value: 7,
            at_ms: 1_000,
            attempts: 0,
            next_at_ms: 1_000,
            last_error: None,
        };
        store.queue_outbox(&a, 2, &item, true).unwrap();
        let (_, _, rec) = store.outbox_items(false, None, 1).unwrap().remove(0);
        store.mark_dead(&a, 2, &rec).unwrap();
        meterd_actors::failpoint::arm("revive:after-queue", "rev");
        assert!(store.revive(&a, 2, 5_000).is_err());
        let at = store.outbox_location(&a, 2).unwrap();
        assert!(at.queued.is_some() && at.dead.is_some(), "{at:?}");
        store.barrier().await.unwrap();
        store.close().unwrap();
    }
    let store = open_store(dir.path());
    let at = store.outbox_location(&a, 2).unwrap();
    assert!(at.queued.is_some() && at.dead.is_none(), "{at:?}");
    assert_eq!(store.outbox_counts(), (1, 0, 0));
    store.close().unwrap();
}

/// Marking sent interrupted before dequeuing: the record is in `sent` and still queued, and
/// the store says it is sent, which the outbox checks before sending anything.
#[tokio::test]
async fn an_interrupted_mark_sent_is_recognised_as_sent() {
    use meterd_actors::store::OutboxItem;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let a = id("sent");
    let item = OutboxItem {
        meter: "tokens".into(),
        value: 1,
        at_ms: 1_000,
        attempts: 0,
        next_at_ms: 1_000,
        last_error: None,
    };
    store.queue_outbox(&a, 3, &item, true).unwrap();
    assert!(!store.is_sent(&a, 3).unwrap());
    meterd_actors::failpoint::arm("mark_sent:after-sent", "sent");
    assert!(store.mark_sent(&a, 3, 2_000).is_err());
    let at = store.outbox_location(&a, 3).unwrap();
    assert!(at.sent && at.queued.is_some(), "{at:?}");
    assert!(store.is_sent(&a, 3).unwrap());
    store.close().unwrap();
}
