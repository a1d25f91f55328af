//! Property tests: random sequences of consumes, grants, adjustments, top-ups, reservations,
//! settlements, clock moves and restarts against the account actors, checked after every step
//! against a small model kept alongside and against the ledger itself.
//!
//! Invariants checked after every step, for every account:
//! - no call fails with `Storage`, `Unavailable` or `Timeout`, and every answer is the one the
//!   model predicts from the view before the step (allowed/denied, conflict, replay, ...);
//! - credits are conserved: granted − adjusted = what is left in grants + spent (consumes and
//!   commits) + held by open reservations + expired, both in the view and in the ledger;
//! - no unit is counted twice: `used` is the sum of allowed consumes and commits of the current
//!   period, and `used + reserved ≤ included` under a hard cap;
//! - a replay answers with the original entry, `replayed = true`, and writes nothing; a dry-run
//!   check decides as the consume would and writes nothing either;
//! - after a restart the view is the same and `verify_store` finds no problem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use meterd_actors::account::{
    AccountDeps, AccountError, AccountSettings, AccountView, Accounts, ConsumeCmd, ConsumeReply,
    CreditCmd, CreditReply, GrantInput, ReserveCmd, ReserveReply, SettleReply, TopUpCmd, UpsertCmd,
};
use meterd_actors::ledger::{
    AccountFold, Balances, CreditCategory, EntryKind, Grant, GrantTerms, LedgerEntry, SettleRecord,
};
use meterd_actors::model::{
    AccountId, Catalog, Clock, CreditPackage, IdempotencyKey, MeterRule, Overage, Period, Plan,
    PlanKind, days_from_civil,
};
use meterd_actors::model::{DenyCode, Outcome};
use meterd_actors::pricing::PriceModel;
use meterd_actors::store::{Store, StoreConfig, SyncMode};
use meterd_actors::verify::verify_store;
use proptest::prelude::*;
use proptest::test_runner::FailurePersistence;

mod common;

const METER: &str = "tokens";
const MINUTE: i64 = 60_000;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(format!("{}: {:?} != {:?}", format!($($arg)+), l, r));
        }
    }};
}

// ---- catalog ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanSel {
    Block,
    Credits1,
    Credits2,
    Bill,
    Unlimited,
}

const PLANS: [PlanSel; 5] = [
    PlanSel::Block,
    PlanSel::Credits1,
    PlanSel::Credits2,
    PlanSel::Bill,
    PlanSel::Unlimited,
];

impl PlanSel {
    fn name(self) -> &'static str {
        match self {
            PlanSel::Block => "block",
            PlanSel::Credits1 => "credits1",
            PlanSel::Credits2 => "credits2",
            PlanSel::Bill => "bill",
            PlanSel::Unlimited => "unlimited",
        }
    }

    fn rule(self) -> MeterRule {
        let (included, overage, price) = match self {
            PlanSel::Block => (100, Overage::Block, None),
            PlanSel::Credits1 => (
                10,
                Overage::Credits {
                    credits_per_unit: 1,
                },
                None,
            ),
            PlanSel::Credits2 => (
                10,
                Overage::Credits {
                    credits_per_unit: 2,
                },
                None,
            ),
            PlanSel::Bill => (20, Overage::Bill, Some(PriceModel::per_unit("1").unwrap())),
            PlanSel::Unlimited => (0, Overage::Unlimited, None),
        };
        MeterRule {
            included,
            overage,
            price,
        }
    }
}

/// Top-up packages: the one normally bought, and another one to provoke conflicts.
const PACKAGE: (&str, u64) = ("pack50", 50);
const OTHER_PACKAGE: (&str, u64) = ("pack20", 20);

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.meters.insert(METER.into(), String::new());
    for p in PLANS {
        let kind = match p {
            PlanSel::Credits1 | PlanSel::Credits2 => PlanKind::Prepaid,
            PlanSel::Bill => PlanKind::Metered,
            _ => PlanKind::Free,
        };
        c.plans.insert(
            p.name().into(),
            Plan {
                name: p.name().into(),
                kind,
                currency: "usd".into(),
                base_price: 0,
                seat_price: 0,
                min_seats: 0,
                features: vec![],
                meters: BTreeMap::from([(METER.to_string(), p.rule())]),
                alert_thresholds: vec![50, 80, 95, 100],
                low_credit_threshold: Some(20),
                spend_cap: None,
                monthly_credits: 0,
                monthly_credits_rollover_cap: None,
            },
        );
    }
    for (name, credits) in [PACKAGE, OTHER_PACKAGE] {
        c.credit_packages.push(CreditPackage {
            name: name.into(),
            credits,
            price: 100,
            currency: "usd".into(),
        });
    }
    c
}

// ---- operations ----

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Consume `q`; a used key replays its first request (or, with `conflict`, sends another
    /// quantity under it).
    Consume {
        acct: usize,
        key: u8,
        q: u64,
        conflict: bool,
    },
    /// Grant credits; `effective_in_s`/`expires_in_s` are relative to now (expiry to the
    /// effective time). A used credit key replays (or conflicts).
    Grant {
        acct: usize,
        key: u8,
        amount: u64,
        priority: u32,
        effective_in_s: Option<i64>,
        expires_in_s: Option<i64>,
        conflict: bool,
    },
    /// A negative adjustment of `amount`, under the same key pool as grants.
    Adjust {
        acct: usize,
        key: u8,
        amount: u64,
        conflict: bool,
    },
    /// Top up the package under external id `ext` (`conflict`: another package, same id).
    TopUp {
        acct: usize,
        ext: u8,
        conflict: bool,
    },
    Reserve {
        acct: usize,
        key: u8,
        q: u64,
        ttl_s: i64,
        conflict: bool,
    },
    /// A dry run of consuming `q`: the same decision as a consume would make, nothing written.
    Check {
        acct: usize,
        q: u64,
    },
    /// Commit a reservation (`pick` 0: an id that is no reservation; else one of those issued,
    /// newest first) with `held * pct / 100 + extra` units (`same`: an already committed one
    /// with its own quantity again).
    Commit {
        acct: usize,
        pick: usize,
        pct: u64,
        extra: u64,
        same: bool,
    },
    Release {
        acct: usize,
        pick: usize,
    },
    Advance {
        secs: i64,
    },
    /// Jump to `secs` past the end of the current calendar month.
    NextMonth {
        secs: i64,
    },
    Restart,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let acct = 0usize..2;
    let conflict = || prop::bool::weighted(0.15);
    prop_oneof![
        6 => (acct.clone(), 0u8..6, 1u64..50, conflict())
            .prop_map(|(acct, key, q, conflict)| Op::Consume { acct, key, q, conflict }),
        3 => (
            acct.clone(),
            0u8..6,
            1u64..100,
            0u32..=100,
            prop::option::weighted(0.25, 1i64..300),
            prop::option::weighted(0.5, 60i64..600),
            conflict(),
        )
            .prop_map(|(acct, key, amount, priority, effective_in_s, expires_in_s, conflict)| {
                Op::Grant { acct, key, amount, priority, effective_in_s, expires_in_s, conflict }
            }),
        1 => (acct.clone(), 0u8..6, 1u64..100, conflict())
            .prop_map(|(acct, key, amount, conflict)| Op::Adjust { acct, key, amount, conflict }),
        1 => (acct.clone(), 0u8..4, prop::bool::weighted(0.2))
            .prop_map(|(acct, ext, conflict)| Op::TopUp { acct, ext, conflict }),
        3 => (acct.clone(), 0u8..6, 1u64..50, 60i64..=600, conflict())
            .prop_map(|(acct, key, q, ttl_s, conflict)| Op::Reserve { acct, key, q, ttl_s, conflict }),
        3 => (acct.clone(), 0usize..16, 0u64..=100, 0u64..12, any::<bool>())
            .prop_map(|(acct, pick, pct, extra, same)| Op::Commit { acct, pick, pct, extra, same }),
        1 => (acct.clone(), 0usize..16).prop_map(|(acct, pick)| Op::Release { acct, pick }),
        1 => (acct, 1u64..50).prop_map(|(acct, q)| Op::Check { acct, q }),
        3 => (0i64..=600).prop_map(|secs| Op::Advance { secs }),
        1 => (0i64..=600).prop_map(|secs| Op::NextMonth { secs }),
        1 => Just(Op::Restart),
    ]
}

// ---- the model ----

#[derive(Debug, Clone)]
enum Rid {
    Denied,
    Open { q: u64, expires_at: i64, held: u64 },
    Committed { q: u64, seq: u64, rec: SettleRecord },
    Released { seq: u64, rec: SettleRecord },
    Expired,
}

struct Model {
    id: AccountId,
    plan: PlanSel,
    consumes: HashMap<u8, (ConsumeCmd, ConsumeReply)>,
    credits: HashMap<u8, (CreditCmd, CreditReply)>,
    topups: HashMap<u8, (TopUpCmd, CreditReply)>,
    reserves: HashMap<u8, (ReserveCmd, ReserveReply)>,
    /// Every reservation id issued, in order.
    rids: Vec<u64>,
    holds: BTreeMap<u64, Rid>,
    /// Usage events: (time, units, billable units).
    usage: Vec<(i64, u64, u64)>,
    granted: u64,
    adjusted: u64,
    /// Credits that paid for consumes and commits.
    spent: u64,
    /// The view after the last step.
    view: AccountView,
}

impl Model {
    /// Open reservations at `now`: (units, credits held).
    fn open_holds(&self, now: i64) -> (u64, u64) {
        self.holds.values().fold((0, 0), |(q, c), r| match r {
            Rid::Open {
                q: hq,
                expires_at,
                held,
            } if *expires_at > now => (q + hq, c + held),
            _ => (q, c),
        })
    }

    /// Whether a reservation open at `now` holds credits of grant `id` (they may be
    /// refunded into it).
    fn holds_grant(&self, id: u64, now: i64) -> bool {
        self.reserves.values().any(|(_, r)| {
            matches!(self.holds.get(&r.seq), Some(Rid::Open { expires_at, .. }) if *expires_at > now)
                && r.record.burns.iter().any(|(g, _)| *g == id)
        })
    }

    fn pick(&self, pick: usize) -> u64 {
        // Entry 1 is the account's creation: an id that is no reservation.
        match self.rids.len() {
            0 => 1,
            _ if pick == 0 => 1,
            n => self.rids[n - 1 - pick % n],
        }
    }
}

/// The decision for `q` units given what else occupies the meter and the credits that can pay:
/// `Ok((billable, credits))` or the denial.
fn predict(rule: &MeterRule, occupied: u64, credits: u64, q: u64) -> Result<(u64, u64), DenyCode> {
    let within = rule.included.saturating_sub(occupied).min(q);
    let over = q - within;
    match rule.overage {
        Overage::Block if over > 0 => Err(DenyCode::CapReached),
        Overage::Block | Overage::Unlimited => Ok((0, 0)),
        Overage::Credits { credits_per_unit } => {
            let cost = over * credits_per_unit;
            if cost <= credits {
                Ok((0, cost))
            } else {
                Err(DenyCode::InsufficientCredits)
            }
        }
        Overage::Bill => Ok((over, 0)),
    }
}

fn sum_burns(b: &[(u64, u64)]) -> u64 {
    b.iter().map(|(_, n)| n).sum()
}

fn key(prefix: &str, k: u8) -> IdempotencyKey {
    IdempotencyKey::parse(&format!("{prefix}{k}")).unwrap()
}

/// Anything but an expected refusal is a failure of the system, not of the request.
fn fatal(e: &AccountError) -> Option<String> {
    matches!(
        e,
        AccountError::Storage(_) | AccountError::Unavailable(_) | AccountError::Timeout(_)
    )
    .then(|| format!("fatal error: {e}"))
}

fn ok<T>(r: Result<T, AccountError>) -> Result<T, String> {
    r.map_err(|e| fatal(&e).unwrap_or_else(|| format!("unexpected refusal: {e:?}")))
}

fn err<T: std::fmt::Debug>(r: Result<T, AccountError>, want: &AccountError) -> Result<(), String> {
    match r {
        Err(e) if &e == want => Ok(()),
        Err(e) => Err(fatal(&e).unwrap_or_else(|| format!("expected {want:?}, got {e:?}"))),
        Ok(v) => Err(format!("expected {want:?}, got Ok({v:?})")),
    }
}

// ---- the system under test ----

struct Harness {
    dir: tempfile::TempDir,
    /// `None` only while restarting.
    store: Option<Store>,
    accounts: Accounts,
    clock: Clock,
    settings: Arc<AccountSettings>,
}

fn try_open_store(dir: &std::path::Path) -> Result<Store, meterd_actors::store::StoreError> {
    Store::open(&StoreConfig {
        path: dir.to_path_buf(),
        sync: SyncMode::Flush,
        cache_capacity_bytes: 8 << 20,
    })
}

async fn spawn(store: &Store, clock: &Clock, settings: &Arc<AccountSettings>) -> Accounts {
    let deps = AccountDeps {
        store: store.clone(),
        catalog: Arc::new(catalog()),
        clock: clock.clone(),
        settings: settings.clone(),
    };
    Accounts::spawn(deps).await.unwrap().0
}

fn verify(store: &Store) -> Result<(), String> {
    let report = verify_store(store).map_err(|e| format!("verify_store: {e}"))?;
    ensure!(report.ok(), "verify_store: {:?}", report.problems);
    Ok(())
}

impl Harness {
    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    async fn stop(&self) -> Result<(), String> {
        self.accounts
            .shutdown(Duration::from_secs(10))
            .await
            .map_err(|e| format!("shutdown: {e}"))?;
        verify(self.store())?;
        self.store().close().map_err(|e| format!("close: {e}"))
    }

    /// Stops everything, reopens the store and the actors: every view must come back as it
    /// was.
    async fn restart(&mut self, models: &[Model]) -> Result<(), String> {
        self.stop().await?;
        // Drop the old handle before reopening. sled's background threads may hold the
        // database (and its file lock) a little longer.
        self.store = None;
        let started = std::time::Instant::now();
        let store = loop {
            match try_open_store(self.dir.path()) {
                Ok(s) => break s,
                Err(e) if started.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(format!("reopening the store: {e}")),
            }
        };
        self.accounts = spawn(&store, &self.clock, &self.settings).await;
        self.store = Some(store);
        verify(self.store())?;
        for m in models {
            let v = ok(self.accounts.get(&m.id).await)?;
            ensure!(
                v == m.view,
                "account {}: view after restart differs\nbefore: {:?}\nafter:  {:?}",
                m.id,
                m.view,
                v
            );
        }
        Ok(())
    }
}

// ---- one step ----

/// Runs one operation and checks its answer. Returns the account touched and the `last_seq`
/// its view must show afterwards, if that is known.
async fn step(
    h: &mut Harness,
    models: &mut [Model],
    op: &Op,
) -> Result<Option<(usize, u64)>, String> {
    let n = models.len();
    let now = h.clock.now_ms();
    match *op {
        Op::Advance { secs } => {
            h.clock.set_ms(now + secs * 1000);
            Ok(None)
        }
        Op::NextMonth { secs } => {
            h.clock
                .set_ms(Period::calendar_month(now).end_ms + secs * 1000);
            Ok(None)
        }
        Op::Restart => {
            h.restart(models).await?;
            Ok(None)
        }
        Op::Check { acct, q } => {
            let a = acct % n;
            let m = &models[a];
            let pre = &m.view;
            let cmd = ConsumeCmd {
                meter: METER.into(),
                quantity: q,
                idempotency_key: key("check", 0),
                metadata: BTreeMap::new(),
            };
            let u = &pre.meters[0];
            let want = predict(&m.plan.rule(), u.used + u.reserved, pre.credits, q);
            let r = ok(h.accounts.check(&m.id, cmd).await)?;
            ensure_eq!(r.seq, None, "a check writes nothing");
            let outcome = want.map_or_else(Outcome::Denied, |_| Outcome::Allowed);
            ensure_eq!(r.record.outcome, outcome, "outcome of a check");
            if let Ok((billable, credits)) = want {
                ensure_eq!(r.record.billable, billable, "billable");
                ensure_eq!(r.record.credits_spent, credits, "credits spent");
            }
            Ok(Some((a, pre.last_seq)))
        }
        Op::Consume {
            acct,
            key: k,
            q,
            conflict,
        } => {
            let a = acct % n;
            let m = &mut models[a];
            let pre = m.view.clone();
            if let Some((cmd, first)) = m.consumes.get(&k) {
                let seq = first.seq.unwrap();
                if conflict {
                    let cmd = ConsumeCmd {
                        quantity: cmd.quantity + 1,
                        ..cmd.clone()
                    };
                    let r = h.accounts.consume(&m.id, cmd).await;
                    err(r, &AccountError::IdempotencyConflict { seq })?;
                } else {
                    let r = ok(h.accounts.consume(&m.id, cmd.clone()).await)?;
                    ensure!(r.replayed, "a replay is marked replayed");
                    ensure_eq!(r.seq, first.seq, "a replay answers with the first seq");
                    ensure_eq!(
                        r.record,
                        first.record,
                        "a replay answers with the first record"
                    );
                }
                return Ok(Some((a, pre.last_seq)));
            }
            let cmd = ConsumeCmd {
                meter: METER.into(),
                quantity: q,
                idempotency_key: key("k", k),
                metadata: BTreeMap::new(),
            };
            let u = &pre.meters[0];
            let want = predict(&m.plan.rule(), u.used + u.reserved, pre.credits, q);
            let r = ok(h.accounts.consume(&m.id, cmd.clone()).await)?;
            ensure!(!r.replayed, "a first request is no replay");
            let seq = r.seq.ok_or("a consume has a seq")?;
            ensure!(seq > pre.last_seq, "seq {seq} after {}", pre.last_seq);
            match want {
                Ok((billable, credits)) => {
                    ensure_eq!(r.record.outcome, Outcome::Allowed, "outcome");
                    ensure_eq!(r.record.billable, billable, "billable");
                    ensure_eq!(r.record.credits_spent, credits, "credits spent");
                    ensure_eq!(sum_burns(&r.record.burns), credits, "burns");
                    ensure_eq!(
                        r.record.credits_after,
                        pre.credits - credits,
                        "credits after"
                    );
                    ensure_eq!(r.record.used_after, u.used + q, "used after");
                    m.usage.push((now, q, billable));
                    m.spent += credits;
                }
                Err(code) => {
                    ensure_eq!(r.record.outcome, Outcome::Denied(code), "outcome");
                    ensure_eq!(r.record.used_after, u.used, "used after a denial");
                    ensure!(r.record.burns.is_empty(), "a denial burns nothing");
                }
            }
            m.consumes.insert(k, (cmd, r));
            Ok(Some((a, seq)))
        }
        Op::Grant { acct, key: k, .. } | Op::Adjust { acct, key: k, .. } => {
            let a = acct % n;
            let m = &mut models[a];
            let pre = m.view.clone();
            let conflict = match *op {
                Op::Grant { conflict, .. } | Op::Adjust { conflict, .. } => conflict,
                _ => false,
            };
            if let Some((cmd, first)) = m.credits.get(&k) {
                let expired_terms = cmd.grant.expires_at_ms.is_some_and(|e| e <= now);
                if conflict {
                    let amount = if cmd.amount > 0 {
                        cmd.amount + 1
                    } else {
                        cmd.amount - 1
                    };
                    let cmd = CreditCmd {
                        amount,
                        ..cmd.clone()
                    };
                    let r = h.accounts.credit(&m.id, cmd).await;
                    // A different request whose terms are no longer valid may be refused as
                    // invalid before its key is looked up.
                    if !(expired_terms && matches!(r, Err(AccountError::Invalid(_)))) {
                        err(r, &AccountError::IdempotencyConflict { seq: first.seq })?;
                    }
                } else {
                    let r = h.accounts.credit(&m.id, cmd.clone()).await;
                    let r = ok(r)?;
                    ensure!(r.replayed, "a replay is marked replayed");
                    ensure_eq!(r.seq, first.seq, "a replay answers with the first seq");
                    ensure_eq!(
                        r.record,
                        first.record,
                        "a replay answers with the first record"
                    );
                }
                return Ok(Some((a, pre.last_seq)));
            }
            let cmd = match *op {
                Op::Grant {
                    amount,
                    priority,
                    effective_in_s,
                    expires_in_s,
                    ..
                } => {
                    let effective = effective_in_s.map(|s| now + s * 1000);
                    CreditCmd {
                        amount: i64::try_from(amount).unwrap(),
                        reason: "grant".into(),
                        idempotency_key: key("c", k),
                        grant: GrantInput {
                            priority: Some(priority),
                            effective_at_ms: effective,
                            expires_at_ms: expires_in_s
                                .map(|s| effective.unwrap_or(now) + s * 1000),
                            category: None,
                            external_id: None,
                        },
                    }
                }
                Op::Adjust { amount, .. } => CreditCmd {
                    amount: -i64::try_from(amount).unwrap(),
                    reason: "adjust".into(),
                    idempotency_key: key("c", k),
                    grant: GrantInput::default(),
                },
                _ => unreachable!(),
            };
            let r = h.accounts.credit(&m.id, cmd.clone()).await;
            let amount = cmd.amount.unsigned_abs();
            if cmd.amount < 0 && amount > pre.credits {
                let want = AccountError::CreditBalanceTooLow {
                    balance: pre.credits,
                    amount: cmd.amount,
                };
                err(r, &want)?;
                return Ok(None);
            }
            let r = ok(r)?;
            ensure!(!r.replayed, "a first request is no replay");
            ensure!(r.seq > pre.last_seq, "seq {} after {}", r.seq, pre.last_seq);
            let after = if cmd.amount < 0 {
                m.adjusted += amount;
                pre.credits - amount
            } else {
                m.granted += amount;
                if cmd.grant.effective_at_ms.is_some() {
                    pre.credits
                } else {
                    pre.credits + amount
                }
            };
            ensure_eq!(r.record.credits_after, after, "credits after");
            let seq = r.seq;
            m.credits.insert(k, (cmd, r));
            Ok(Some((a, seq)))
        }
        Op::TopUp {
            acct,
            ext,
            conflict,
        } => {
            let a = acct % n;
            let m = &mut models[a];
            let pre = m.view.clone();
            if let Some((cmd, first)) = m.topups.get(&ext) {
                if conflict {
                    let cmd = TopUpCmd {
                        package: OTHER_PACKAGE.0.into(),
                        ..cmd.clone()
                    };
                    let r = h.accounts.top_up(&m.id, cmd).await;
                    err(r, &AccountError::IdempotencyConflict { seq: first.seq })?;
                } else {
                    let r = ok(h.accounts.top_up(&m.id, cmd.clone()).await)?;
                    ensure!(r.replayed, "a replay is marked replayed");
                    ensure_eq!(r.seq, first.seq, "a replay answers with the first seq");
                    ensure_eq!(
                        r.record,
                        first.record,
                        "a replay answers with the first record"
                    );
                }
                return Ok(Some((a, pre.last_seq)));
            }
            let cmd = TopUpCmd {
                package: PACKAGE.0.into(),
                external_id: key("pay", ext),
            };
            let r = ok(h.accounts.top_up(&m.id, cmd.clone()).await)?;
            ensure!(!r.replayed, "a first request is no replay");
            ensure!(r.seq > pre.last_seq, "seq {} after {}", r.seq, pre.last_seq);
            ensure_eq!(
                r.record.credits_after,
                pre.credits + PACKAGE.1,
                "credits after"
            );
            m.granted += PACKAGE.1;
            let seq = r.seq;
            m.topups.insert(ext, (cmd, r));
            Ok(Some((a, seq)))
        }
        Op::Reserve {
            acct,
            key: k,
            q,
            ttl_s,
            conflict,
        } => {
            let a = acct % n;
            let m = &mut models[a];
            let pre = m.view.clone();
            if let Some((cmd, first)) = m.reserves.get(&k) {
                if conflict {
                    let cmd = ReserveCmd {
                        quantity: cmd.quantity + 1,
                        ..cmd.clone()
                    };
                    let r = h.accounts.reserve(&m.id, cmd).await;
                    err(r, &AccountError::IdempotencyConflict { seq: first.seq })?;
                } else {
                    let r = ok(h.accounts.reserve(&m.id, cmd.clone()).await)?;
                    ensure!(r.replayed, "a replay is marked replayed");
                    ensure_eq!(r.seq, first.seq, "a replay answers with the first seq");
                    ensure_eq!(
                        r.record,
                        first.record,
                        "a replay answers with the first record"
                    );
                }
                return Ok(Some((a, pre.last_seq)));
            }
            let cmd = ReserveCmd {
                meter: METER.into(),
                quantity: q,
                ttl_ms: ttl_s * 1000,
                idempotency_key: key("r", k),
            };
            let u = &pre.meters[0];
            let want = predict(&m.plan.rule(), u.used + u.reserved, pre.credits, q);
            let r = ok(h.accounts.reserve(&m.id, cmd.clone()).await)?;
            ensure!(!r.replayed, "a first request is no replay");
            ensure!(r.seq > pre.last_seq, "seq {} after {}", r.seq, pre.last_seq);
            match want {
                Ok((_, credits)) => {
                    ensure_eq!(r.record.outcome, Outcome::Allowed, "outcome");
                    ensure_eq!(sum_burns(&r.record.burns), credits, "credits held");
                    ensure_eq!(r.record.reserved_after, u.reserved + q, "reserved after");
                    ensure_eq!(
                        r.record.credits_after,
                        pre.credits - credits,
                        "credits after"
                    );
                    m.holds.insert(
                        r.seq,
                        Rid::Open {
                            q,
                            expires_at: now + ttl_s * 1000,
                            held: credits,
                        },
                    );
                }
                Err(code) => {
                    ensure_eq!(r.record.outcome, Outcome::Denied(code), "outcome");
                    ensure_eq!(
                        r.record.reserved_after,
                        u.reserved,
                        "reserved after a denial"
                    );
                    m.holds.insert(r.seq, Rid::Denied);
                }
            }
            let seq = r.seq;
            m.rids.push(seq);
            m.reserves.insert(k, (cmd, r));
            Ok(Some((a, seq)))
        }
        Op::Commit { acct, pick, .. } | Op::Release { acct, pick } => {
            let a = acct % n;
            let m = &mut models[a];
            let pre = m.view.clone();
            let rid = m.pick(pick);
            let state = m.holds.get(&rid).cloned();
            let quantity = match (*op, &state) {
                (Op::Release { .. }, _) => None,
                (Op::Commit { same: true, .. }, Some(Rid::Committed { q, .. })) => Some(*q),
                (Op::Commit { pct, extra, .. }, Some(Rid::Open { q, .. })) => {
                    Some(q * pct / 100 + extra)
                }
                (Op::Commit { pct, extra, .. }, _) => Some(pct / 10 + extra),
                _ => unreachable!(),
            };
            let r = h.accounts.settle(&m.id, rid, quantity).await;
            let settled = |how| AccountError::ReservationSettled { rid, how };
            match state {
                None | Some(Rid::Denied) => {
                    err(r, &AccountError::UnknownReservation { rid })?;
                    Ok(None)
                }
                Some(Rid::Expired) => {
                    err(r, &settled("expired"))?;
                    Ok(Some((a, pre.last_seq)))
                }
                Some(Rid::Open { expires_at, .. }) if expires_at <= now => {
                    err(r, &settled("expired"))?;
                    m.holds.insert(rid, Rid::Expired);
                    Ok(None)
                }
                Some(Rid::Committed { q, seq, rec }) => {
                    if quantity == Some(q) {
                        replayed(ok(r)?, seq, &rec)?;
                    } else {
                        err(r, &settled("committed"))?;
                    }
                    Ok(Some((a, pre.last_seq)))
                }
                Some(Rid::Released { seq, rec }) => {
                    if quantity.is_none() {
                        replayed(ok(r)?, seq, &rec)?;
                    } else {
                        err(r, &settled("released"))?;
                    }
                    Ok(Some((a, pre.last_seq)))
                }
                Some(Rid::Open { q, held, .. }) => {
                    let u = &pre.meters[0];
                    let Some(actual) = quantity else {
                        let r = ok(r)?;
                        ensure!(!r.replayed, "a first release is no replay");
                        ensure_eq!(r.record.committed, None, "released");
                        ensure_eq!(sum_burns(&r.record.refunds), held, "refunds");
                        ensure_eq!(r.record.reserved_after, u.reserved - q, "reserved after");
                        let back = live_refunds(&pre, &r.record.refunds, now);
                        ensure_eq!(r.record.credits_after, pre.credits + back, "credits after");
                        let seq = r.seq;
                        m.holds.insert(rid, Rid::Released { seq, rec: r.record });
                        return Ok(Some((a, seq)));
                    };
                    let rule = m.plan.rule();
                    // The hold's own credits pay first; live credits pay the rest.
                    let occupied = u.used + u.reserved - q;
                    match predict(&rule, occupied, pre.credits + held, actual) {
                        Err(code) => {
                            let code = match code {
                                DenyCode::InsufficientCredits => "insufficient_credits",
                                _ => "cap_reached",
                            };
                            err(r, &AccountError::CommitDenied { code })?;
                            Ok(Some((a, pre.last_seq)))
                        }
                        Ok((billable, cost)) => {
                            let r = ok(r)?;
                            ensure!(!r.replayed, "a first commit is no replay");
                            ensure!(r.seq > pre.last_seq, "seq {} after {}", r.seq, pre.last_seq);
                            let kept = cost.min(held);
                            ensure_eq!(r.record.committed, Some(actual), "committed");
                            ensure_eq!(r.record.kept, kept, "kept");
                            ensure_eq!(sum_burns(&r.record.burns), cost - kept, "burns");
                            ensure_eq!(sum_burns(&r.record.refunds), held - kept, "refunds");
                            ensure_eq!(r.record.billable, billable, "billable");
                            ensure_eq!(r.record.used_after, u.used + actual, "used after");
                            ensure_eq!(r.record.reserved_after, u.reserved - q, "reserved after");
                            // Refunds into a grant that expired meanwhile are not live.
                            let back = live_refunds(&pre, &r.record.refunds, now);
                            ensure_eq!(
                                r.record.credits_after,
                                pre.credits + back - (cost - kept),
                                "credits after"
                            );
                            m.usage.push((now, actual, billable));
                            m.spent += cost;
                            let seq = r.seq;
                            m.holds.insert(
                                rid,
                                Rid::Committed {
                                    q: actual,
                                    seq,
                                    rec: r.record,
                                },
                            );
                            Ok(Some((a, seq)))
                        }
                    }
                }
            }
        }
    }
}

/// The part of `refunds` that goes back into grants live at `now` (effective, not expired).
fn live_refunds(pre: &AccountView, refunds: &[(u64, u64)], now: i64) -> u64 {
    refunds
        .iter()
        .filter(|(id, _)| {
            pre.grants.get(id).is_some_and(|g| {
                g.terms.effective_at_ms <= now && g.terms.expires_at_ms.is_none_or(|e| now < e)
            })
        })
        .map(|(_, n)| n)
        .sum()
}

fn replayed(r: SettleReply, seq: u64, rec: &SettleRecord) -> Result<(), String> {
    ensure!(r.replayed, "a replayed settlement is marked replayed");
    ensure_eq!(
        r.seq,
        seq,
        "a replayed settlement answers with the first seq"
    );
    ensure_eq!(
        &r.record,
        rec,
        "a replayed settlement answers with the first record"
    );
    Ok(())
}

// ---- the invariants ----

/// Checks one account's fresh view and its whole ledger against the model.
fn check_account(
    m: &Model,
    v: &AccountView,
    ledger: &[LedgerEntry],
    now: i64,
) -> Result<(), String> {
    // The ledger: contiguous, folds, no key or reservation settled twice, credits conserved.
    let mut fold = AccountFold::default();
    let (mut granted, mut adjusted, mut spent, mut expired) = (0u64, 0u64, 0u64, 0u64);
    let mut consume_keys = HashSet::new();
    let mut reserve_keys = HashSet::new();
    let mut settled = HashSet::new();
    for e in ledger {
        fold.apply(e)
            .map_err(|err| format!("ledger does not fold: {err}"))?;
        match &e.kind {
            EntryKind::Consume(c) => {
                ensure!(
                    consume_keys.insert(c.idempotency_key.clone()),
                    "consume key {} is in the ledger twice",
                    c.idempotency_key
                );
                if c.outcome == Outcome::Allowed {
                    spent += c.credits_spent;
                }
            }
            EntryKind::Reserved(r) => {
                ensure!(
                    reserve_keys.insert(r.idempotency_key.clone()),
                    "reserve key {} is in the ledger twice",
                    r.idempotency_key
                );
            }
            EntryKind::Credit(c) if c.amount > 0 => granted += c.amount.unsigned_abs(),
            EntryKind::Credit(c) => adjusted += c.amount.unsigned_abs(),
            EntryKind::Settled(s) => {
                ensure!(settled.insert(s.rid), "reservation {} settled twice", s.rid);
                if s.committed.is_some() {
                    spent += s.kept + sum_burns(&s.burns);
                }
            }
            EntryKind::CreditExpired { amount, .. } => expired += amount,
            _ => {}
        }
    }
    ensure_eq!(
        fold.last_seq,
        v.last_seq,
        "the view's last_seq is the ledger's"
    );
    let b: &Balances = fold.balances.as_ref().ok_or("the account exists")?;
    let left: u64 = b.grants.values().map(|g| g.remaining).sum();
    let held: u64 = b.holds.values().map(|h| sum_burns(&h.burns)).sum();
    ensure_eq!(
        i128::from(granted) - i128::from(adjusted),
        i128::from(left + spent + held + expired),
        "ledger: granted - adjusted = left + spent + held + expired"
    );
    ensure_eq!(
        granted,
        m.granted,
        "credits granted (ledger vs. acknowledged)"
    );
    ensure_eq!(
        adjusted,
        m.adjusted,
        "credits adjusted (ledger vs. acknowledged)"
    );
    ensure_eq!(spent, m.spent, "credits spent (ledger vs. acknowledged)");

    // The view.
    let period = Period::calendar_month(now);
    ensure_eq!(v.period, period, "the view is of the current month");
    let (used, billable) = m
        .usage
        .iter()
        .filter(|(at, ..)| period.contains(*at))
        .fold((0, 0), |(u, b), (_, q, bq)| (u + q, b + bq));
    let (reserved, held_open) = m.open_holds(now);
    ensure_eq!(v.meters.len(), 1, "one meter");
    let u = &v.meters[0];
    ensure_eq!(
        u.used,
        used,
        "used = allowed consumes + commits this period"
    );
    ensure_eq!(u.billable, billable, "billable");
    ensure_eq!(u.reserved, reserved, "reserved = open holds");
    if m.plan == PlanSel::Block {
        ensure!(
            u.used + u.reserved <= u.included,
            "cap: used {} + reserved {} > included {}",
            u.used,
            u.reserved,
            u.included
        );
    }
    let live: u64 = v
        .grants
        .values()
        .filter(|g| g.live_at(now))
        .map(|g| g.remaining)
        .sum();
    ensure_eq!(v.credits, live, "credits = live grants");
    // Spent and expired grants leave the live state, unless an open hold may refund into
    // them; every grant with something left is there.
    for (id, g) in &v.grants {
        ensure!(
            g.remaining > 0 || m.holds_grant(*id, now),
            "grant {id} is spent but still in the view: {g:?}"
        );
    }
    let left: u64 = v.grants.values().map(|g| g.remaining).sum();
    // The view shows the expiries that are due as the next write will record them.
    let due: u64 = b.due_expiries(now).iter().map(|(_, r)| r).sum();
    ensure_eq!(
        i128::from(m.granted) - i128::from(m.adjusted),
        i128::from(left + m.spent + held_open + expired + due),
        "view: granted - adjusted = left + spent + held + expired"
    );
    if fold
        .balances
        .as_ref()
        .is_some_and(|b| b.period.contains(now))
    {
        ensure_eq!(b.usage(METER).used, u.used, "used: fold vs. view");
    }
    Ok(())
}

async fn refresh(h: &Harness, m: &mut Model) -> Result<(), String> {
    let v = ok(h.accounts.get(&m.id).await)?;
    let ledger = h
        .store()
        .entries_after(&m.id, 0, 100_000)
        .map_err(|e| format!("ledger: {e}"))?;
    check_account(m, &v, &ledger, h.clock.now_ms())
        .map_err(|e| format!("account {}: {e}", m.id))?;
    m.view = v;
    Ok(())
}

struct Case {
    plans: Vec<PlanSel>,
    snapshot_every: u64,
    max_live: usize,
    ops: Vec<Op>,
}

async fn run(case: Case) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let start = days_from_civil(2026, 1, 31) * 86_400_000 + 23 * 60 * MINUTE;
    let clock = Clock::manual(start);
    let settings = Arc::new(AccountSettings {
        idle_timeout: Duration::from_secs(300),
        snapshot_every: case.snapshot_every,
        call_timeout: Duration::from_secs(10),
        max_live: case.max_live,
        max_queued: 10_000,
        past_due_grace: Duration::from_secs(72 * 3600),
    });
    let store = try_open_store(dir.path()).unwrap();
    let accounts = spawn(&store, &clock, &settings).await;
    let mut h = Harness {
        dir,
        store: Some(store),
        accounts,
        clock,
        settings,
    };
    let mut models = Vec::new();
    for (i, plan) in case.plans.iter().enumerate() {
        let id = AccountId::parse(&format!("acct{i}")).unwrap();
        let cmd = UpsertCmd {
            plan: Some(plan.name().into()),
            ..Default::default()
        };
        let r = ok(h.accounts.upsert(&id, cmd).await)?;
        ensure!(r.created, "account created");
        models.push(Model {
            id,
            plan: *plan,
            consumes: HashMap::new(),
            credits: HashMap::new(),
            topups: HashMap::new(),
            reserves: HashMap::new(),
            rids: Vec::new(),
            holds: BTreeMap::new(),
            usage: Vec::new(),
            granted: 0,
            adjusted: 0,
            spent: 0,
            view: r.view,
        });
    }
    for (i, op) in case.ops.iter().enumerate() {
        let at = |e: String| format!("step {i} {op:?}: {e}");
        let expect = step(&mut h, &mut models, op).await.map_err(at)?;
        for (a, m) in models.iter_mut().enumerate() {
            refresh(&h, m).await.map_err(at)?;
            if let Some((touched, last_seq)) = expect
                && touched == a
            {
                ensure!(
                    m.view.last_seq == last_seq,
                    "{}",
                    at(format!(
                        "account {}: last_seq is {}, expected {last_seq}",
                        m.id, m.view.last_seq
                    ))
                );
            }
        }
    }
    h.restart(&models)
        .await
        .map_err(|e| format!("final restart: {e}"))?;
    h.stop().await
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(prop::sample::select(PLANS.to_vec()), 1..=2),
        prop::sample::select(vec![1u64, 3, 1000]),
        prop::sample::select(vec![1usize, 8]),
        prop::collection::vec(op_strategy(), 1..60),
    )
        .prop_map(|(plans, snapshot_every, max_live, ops)| Case {
            plans,
            snapshot_every,
            max_live,
            ops,
        })
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "plans {:?}, snapshot_every {}, max_live {}, {} ops:",
            self.plans,
            self.snapshot_every,
            self.max_live,
            self.ops.len()
        )?;
        for (i, op) in self.ops.iter().enumerate() {
            writeln!(f, "  {i}: {op:?}")?;
        }
        Ok(())
    }
}

// ---- pure: burn plans ----

fn grants_strategy() -> impl Strategy<Value = BTreeMap<u64, Grant>> {
    prop::collection::btree_map(
        1u64..50,
        (
            1u64..100,
            0u64..=100,
            0u32..5,
            0i64..20,
            prop::option::of(1i64..40),
        )
            .prop_map(|(amount, pct, priority, effective, expires)| Grant {
                amount,
                remaining: amount * pct / 100,
                terms: GrantTerms {
                    priority,
                    effective_at_ms: effective,
                    expires_at_ms: expires.map(|e| effective + e),
                    category: CreditCategory::Promotional,
                    external_id: None,
                    package: None,
                },
            }),
        0..12,
    )
}

// ---- failure persistence ----

/// Where this file's proptests save a failing case, and replay every saved case from, before
/// any new one, on each run: `actors/proptest-regressions/sequences.txt`, committed. The path
/// is absolute, so it holds whatever directory the test runs in; proptest's default
/// (`SourceParallel`) finds no `lib.rs` above a file under `tests/` and would save the file
/// beside this one under another name.
///
/// Replay a failure: keep the `cc …` line proptest appended to that file (after a CI failure,
/// whose clone is gone, add the line it printed after "add the following line" yourself) and
/// run `cargo test -p meterd-actors --test sequences`. The saved case fails first, shrinks,
/// and prints its minimal input. Commit the line with the fix, so the case runs from then on.
/// `PROPTEST_RNG_SEED=<n>` fixes the new cases of a whole run as well.
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/sequences.txt"
);

fn regressions() -> proptest::test_runner::FileFailurePersistence {
    common::regressions(REGRESSIONS)
}

/// `cases` new cases, after the saved ones.
fn config(cases: u32) -> ProptestConfig {
    common::config(REGRESSIONS, cases, false)
}

/// The saved cases are read from where the config says: the file holds a canary seed (a
/// passing case, see its comment), so an empty answer means the path is wrong.
#[test]
fn the_regression_file_is_read() {
    assert!(
        std::path::Path::new(REGRESSIONS).is_file(),
        "{REGRESSIONS} is missing"
    );
    let seeds = regressions().load_persisted_failures2(Some(file!()));
    assert!(!seeds.is_empty(), "no seed read from {REGRESSIONS}");
}

proptest! {
    #![proptest_config(config(48))]

    /// Random operation sequences on one or two accounts keep every invariant (see the module
    /// documentation), across restarts and month boundaries.
    #[test]
    fn operation_sequences_keep_the_invariants(case in case_strategy()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(run(case));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// A burn plan takes only from grants live at its time, never more than a grant has left,
    /// in burn order (priority, earliest expiry, oldest), fully except possibly the last one,
    /// and sums to the amount; there is one exactly when the live balance covers the amount.
    #[test]
    fn burn_plans_take_what_is_asked_from_live_grants(
        grants in grants_strategy(),
        at in 0i64..60,
        amount in 0u64..400,
    ) {
        let mut b = Balances::new(Period { start_ms: 0, end_ms: 1000 });
        b.grants = grants;
        let live = b.live_credits(at);
        let expected_live: u64 = b.grants.values().filter(|g| g.live_at(at)).map(|g| g.remaining).sum();
        prop_assert_eq!(live, expected_live);
        let plan = b.burn_plan(at, amount);
        prop_assert_eq!(plan.is_some(), amount <= live);
        let Some(plan) = plan else { return Ok(()) };
        prop_assert_eq!(sum_burns(&plan), amount);
        let order_key = |id: u64| {
            let g = &b.grants[&id];
            (g.terms.priority, g.terms.expires_at_ms.unwrap_or(i64::MAX), id)
        };
        for (i, (id, take)) in plan.iter().enumerate() {
            let g = b.grants.get(id).expect("a burn names an existing grant");
            prop_assert!(g.live_at(at), "grant {} is not live at {}", id, at);
            prop_assert!(*take > 0 && *take <= g.remaining, "grant {id}: takes {take} of {}", g.remaining);
            if i + 1 < plan.len() {
                prop_assert_eq!(*take, g.remaining, "only the last burn is partial");
                prop_assert!(order_key(*id) < order_key(plan[i + 1].0), "burn order");
            }
        }
        // Every live grant the plan skipped comes after the last one it used.
        if let Some((last, _)) = plan.last() {
            for (id, g) in &b.grants {
                if g.live_at(at) && !plan.iter().any(|(p, _)| p == id) {
                    prop_assert!(order_key(*id) > order_key(*last), "grant {} was skipped", id);
                }
            }
        }
    }
}
