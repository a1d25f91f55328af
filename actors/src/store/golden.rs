//! Golden bytes: every record kind the store writes, as committed bytes that every later build
//! must decode to the same value (`actors/tests/golden/records.txt`).
//!
//! Each sample is a domain value built here, deterministically. The test decodes the committed
//! bytes of every sample and compares them with the value; records of the current version must
//! also encode to exactly those bytes. A sample without committed bytes fails the test, unless
//! `GOLDEN_BLESS=1`, which appends the missing lines and never rewrites an existing one: a
//! committed line is changed only by hand, and only for a record kind never released.

use std::collections::BTreeMap;

use super::codec::{
    self, StoredOutbox, StoredSnapshot, dec, decode_entry, decode_idem, decode_mark,
    decode_notification, decode_outbox, decode_snapshot, enc, encode_entry, encode_idem,
    encode_mark, encode_notification, encode_outbox,
};
use super::events::{EventSource, MeterErrorRecord, WebhookRecord, WebhookStatus};
use super::records::{Freeze, v1};
use super::{AccountSnapshot, IdemRecord, OutboxBatch, OutboxItem, OutboxRecord};
use crate::billing::{
    BillingFact, BillingState, InvoiceSummary, PaymentMethodState, StripeOutcome, StripeRecord,
    SubItem, SubscriptionInfo, Transaction, TransactionKind,
};
use crate::ledger::{
    AccountProfile, Balances, ClawbackRecord, ConsumeRecord, CreditCategory, CreditRecord,
    EntryKind, FiredAlert, Grant, GrantTerms, Hold, HoldRecord, LedgerEntry, MeterUsage,
    SettleRecord,
};
use crate::model::{Alert, AlertKind, DenyCode, Outcome};
use crate::model::{MeterOverride, OverageOverride, SubscriptionStatus};
use crate::model::{Period, SpendCap, SpendCapAction};

const GOLDEN: &str = include_str!("../../tests/golden/records.txt");
const GOLDEN_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/records.txt");

type Check = Box<dyn Fn(&[u8]) -> Result<(), String>>;

/// One sample: its name, its value, and its encoding in its record version (for versions
/// only earlier releases wrote, by the frozen types).
struct Sample {
    name: String,
    /// Decodes the committed bytes and says whether they are this sample's value.
    check: Check,
    written: Option<Vec<u8>>,
}

fn sample<T: PartialEq + std::fmt::Debug + 'static>(
    name: &str,
    value: T,
    decode: impl Fn(&[u8]) -> Result<T, super::StoreError> + 'static,
    written: Option<Vec<u8>>,
) -> Sample {
    Sample {
        name: name.to_owned(),
        check: Box::new(move |b| match decode(b) {
            Ok(v) if v == value => Ok(()),
            Ok(v) => Err(format!("decodes to {v:?}, expected {value:?}")),
            Err(e) => Err(format!("does not decode: {e}")),
        }),
        written,
    }
}

fn period(start_ms: i64) -> Period {
    Period {
        start_ms,
        end_ms: start_ms + 2_592_000_000,
    }
}

fn alert(kind: AlertKind) -> Alert {
    Alert {
        kind,
        meter: "tokens".into(),
        threshold: 80,
        value: 81,
        limit: 100,
    }
}

fn terms() -> GrantTerms {
    GrantTerms {
        priority: 2,
        effective_at_ms: 1_790_000_000_000,
        expires_at_ms: Some(1_800_000_000_000),
        category: CreditCategory::Promotional,
        external_id: Some("cs_test_1".into()),
        package: Some("credits_10000".into()),
    }
}

fn profile() -> AccountProfile {
    AccountProfile {
        plan: "team".into(),
        seats: 3,
        email: Some("ops@acme.test".into()),
        stripe_customer_id: Some("cus_FKNrXbjePvoq7c".into()),
        metadata: vec![("region".into(), "eu".into())],
        created_at_ms: 1_790_000_000_000,
        status: SubscriptionStatus::PastDue,
        status_since_ms: 1_790_000_100_000,
        overrides: BTreeMap::from([
            (
                "tokens".into(),
                MeterOverride {
                    included: Some(5_000),
                    overage: Some(OverageOverride::Credits {
                        credits_per_unit: 3,
                    }),
                },
            ),
            (
                "seats".into(),
                MeterOverride {
                    included: None,
                    overage: Some(OverageOverride::Unlimited),
                },
            ),
        ]),
        spend_cap: Some(SpendCap {
            amount: 10_000,
            action: SpendCapAction::Notify,
        }),
    }
}

fn balances() -> Balances {
    Balances {
        period: period(1_790_000_000_000),
        meters: BTreeMap::from([(
            "tokens".into(),
            MeterUsage {
                used: 120,
                billable: 20,
                reserved: 5,
            },
        )]),
        grants: BTreeMap::from([(
            4,
            Grant {
                amount: 1_000,
                remaining: 900,
                terms: terms(),
            },
        )]),
        holds: BTreeMap::from([(
            9,
            Hold {
                meter: "tokens".into(),
                quantity: 5,
                expires_at_ms: 1_790_000_900_000,
                burns: vec![(4, 5)],
            },
        )]),
        alerts: vec![FiredAlert {
            seq: 7,
            at_ms: 1_790_000_500_000,
            alert: alert(AlertKind::Usage),
        }],
        credit_debt: 0,
        clawbacks: BTreeMap::new(),
        disputes: std::collections::BTreeSet::new(),
        disputes_closed: std::collections::BTreeSet::new(),
    }
}

/// Balances with what only snapshot V3 stores: a credit debt, clawbacks and open disputes.
fn balances_v3() -> Balances {
    Balances {
        credit_debt: 40,
        clawbacks: BTreeMap::from([("pi_1".into(), 100)]),
        disputes: std::collections::BTreeSet::from(["dp_1".to_owned()]),
        disputes_closed: std::collections::BTreeSet::from(["dp_0".to_owned()]),
        ..balances()
    }
}

fn subscription() -> SubscriptionInfo {
    SubscriptionInfo {
        id: "sub_19CmkQm7Yc2Hd9a4h82vBTOD".into(),
        created_s: 1_790_845_203,
        customer: Some("cus_FKNrXbjePvoq7c".into()),
        status: "trialing".into(),
        plan: Some("team".into()),
        seats: Some(3),
        items: vec![SubItem {
            id: "si_LCauHGqPpwmDK1".into(),
            price: "price_team".into(),
            usage_type: "licensed".into(),
            quantity: Some(3),
            meter: None,
            plan: Some("team".into()),
        }],
        period: Some((1_790_845_203, 1_793_437_203)),
        trial_end_s: Some(1_792_054_803),
        cancel_at_period_end: false,
        canceled_at_s: None,
        ended_at_s: None,
    }
}

fn invoice() -> InvoiceSummary {
    InvoiceSummary {
        id: Some("in_1".into()),
        number: Some("A-0001".into()),
        status: Some("open".into()),
        billing_reason: Some("subscription_cycle".into()),
        currency: "usd".into(),
        amount_due: 6_000,
        amount_paid: 0,
        amount_remaining: 6_000,
        total: 6_000,
        metered_amount: 250,
        hosted_invoice_url: Some("https://invoice.stripe.com/i/1".into()),
        period_start_s: Some(1_790_845_203),
        period_end_s: Some(1_793_437_203),
        created_s: Some(1_792_054_803),
        attempt_count: 1,
        next_payment_attempt_s: Some(1_792_141_203),
        paid_at_s: None,
        subscription: Some("sub_19CmkQm7Yc2Hd9a4h82vBTOD".into()),
        event_created_s: 1_792_054_804,
    }
}

fn transaction(kind: TransactionKind) -> Transaction {
    Transaction {
        id: "ch_1".into(),
        kind,
        amount: -5_000,
        currency: "usd".into(),
        at_s: 1_792_054_900,
        reference: Some("cs_test_1".into()),
        credits: Some(5_000),
        event_id: "evt_1".into(),
    }
}

fn billing() -> BillingState {
    BillingState {
        subscription: Some(subscription()),
        subscription_version: (1_790_845_203, 2),
        ended_subscriptions: vec!["sub_old".into()],
        customer_version: 1_790_845_300,
        delinquent: true,
        default_payment_method: Some("pm_2".into()),
        payment_methods: vec![PaymentMethodState {
            id: "pm_2".into(),
            attached: true,
            at_s: 1_790_845_301,
        }],
        features: vec!["api_access".into(), "sso".into()],
        features_version: 1_790_845_302,
        payment_version: 1_790_845_303,
        invoices: vec![invoice()],
        upcoming: Some(InvoiceSummary {
            id: None,
            ..invoice()
        }),
        transactions: vec![transaction(TransactionKind::TopUp)],
        meter_errors: 2,
        events_applied: 11,
    }
}

fn stripe(fact: BillingFact, outcome: StripeOutcome) -> EntryKind {
    EntryKind::Stripe(Box::new(StripeRecord {
        event_id: "evt_1".into(),
        event_type: "invoice.paid".into(),
        created_s: 1_792_054_804,
        outcome,
        fact,
        alerts: vec![alert(AlertKind::PaymentFailed)],
    }))
}

/// Every ledger entry kind, every variant of the enums inside them.
fn entry_kinds() -> Vec<(&'static str, EntryKind)> {
    let consume = |outcome| {
        EntryKind::Consume(ConsumeRecord {
            meter: "tokens".into(),
            quantity: 25,
            idempotency_key: "req-1".into(),
            digest: [7; 32],
            metadata: vec![("route".into(), "/chat".into())],
            outcome,
            billable: 5,
            credits_spent: 15,
            burns: vec![(4, 15)],
            included: 100,
            limit: Some(150),
            used_after: 120,
            billable_after: 20,
            credits_after: 885,
            alerts: vec![alert(AlertKind::Usage), alert(AlertKind::Spend)],
        })
    };
    vec![
        ("upserted", EntryKind::AccountUpserted(profile())),
        (
            "period_rolled",
            EntryKind::PeriodRolled {
                from: period(0),
                to: period(2_592_000_000),
            },
        ),
        (
            "period_adjusted",
            EntryKind::PeriodAdjusted {
                from: period(0),
                to: period(-86_400_000),
            },
        ),
        ("consume_allowed", consume(Outcome::Allowed)),
        (
            "consume_cap",
            consume(Outcome::Denied(DenyCode::CapReached)),
        ),
        (
            "consume_credits",
            consume(Outcome::Denied(DenyCode::InsufficientCredits)),
        ),
        (
            "consume_meter",
            consume(Outcome::Denied(DenyCode::MeterNotInPlan)),
        ),
        (
            "consume_inactive",
            consume(Outcome::Denied(DenyCode::SubscriptionInactive)),
        ),
        (
            "consume_spend",
            consume(Outcome::Denied(DenyCode::SpendCapReached)),
        ),
        (
            "credit_grant",
            EntryKind::Credit(CreditRecord {
                amount: 1_000,
                reason: "welcome".into(),
                idempotency_key: "grant-1".into(),
                digest: [9; 32],
                grant: Some(terms()),
                burns: vec![],
                credits_after: 1_000,
            }),
        ),
        (
            "credit_adjustment",
            EntryKind::Credit(CreditRecord {
                amount: -50,
                reason: "correction".into(),
                idempotency_key: "adj-1".into(),
                digest: [1; 32],
                grant: None,
                burns: vec![(4, 50)],
                credits_after: 950,
            }),
        ),
        (
            "reserved",
            EntryKind::Reserved(HoldRecord {
                meter: "tokens".into(),
                quantity: 5,
                expires_at_ms: 1_790_000_900_000,
                idempotency_key: "hold-1".into(),
                digest: [3; 32],
                outcome: Outcome::Allowed,
                burns: vec![(4, 5)],
                included: 100,
                limit: None,
                reserved_after: 5,
                used_after: 120,
                credits_after: 880,
            }),
        ),
        (
            "settled",
            EntryKind::Settled(SettleRecord {
                rid: 9,
                meter: "tokens".into(),
                committed: Some(3),
                expired: false,
                billable: 1,
                kept: 3,
                refunds: vec![(4, 2)],
                burns: vec![(4, 3)],
                used_after: 123,
                reserved_after: 0,
                billable_after: 21,
                credits_after: 882,
                alerts: vec![alert(AlertKind::LowCredits)],
            }),
        ),
        (
            "credit_expired",
            EntryKind::CreditExpired {
                grant_id: 4,
                amount: 882,
                credits_after: 0,
            },
        ),
        (
            "stripe_none",
            stripe(BillingFact::None, StripeOutcome::Ignored("unknown".into())),
        ),
        (
            "stripe_subscription",
            stripe(
                BillingFact::Subscription {
                    info: subscription(),
                    deleted: false,
                    rank: 2,
                    current: true,
                },
                StripeOutcome::Applied,
            ),
        ),
        (
            "stripe_invoice",
            stripe(
                BillingFact::Invoice {
                    summary: invoice(),
                    payment: Some(false),
                },
                StripeOutcome::Stale("older".into()),
            ),
        ),
        (
            "stripe_transaction",
            stripe(
                BillingFact::Transaction(transaction(TransactionKind::Refund)),
                StripeOutcome::Applied,
            ),
        ),
        (
            "stripe_paid",
            stripe(
                BillingFact::Paid {
                    summary: invoice(),
                    transaction: transaction(TransactionKind::Payment),
                },
                StripeOutcome::Applied,
            ),
        ),
        (
            "stripe_customer",
            stripe(
                BillingFact::Customer {
                    email: Some("billing@acme.test".into()),
                    delinquent: true,
                    default_payment_method: None,
                },
                StripeOutcome::Applied,
            ),
        ),
        (
            "stripe_payment_method",
            stripe(
                BillingFact::PaymentMethod {
                    id: "pm_1".into(),
                    attached: false,
                },
                StripeOutcome::Applied,
            ),
        ),
        (
            "stripe_features",
            stripe(
                BillingFact::Features(vec!["api_access".into()]),
                StripeOutcome::Applied,
            ),
        ),
        (
            "stripe_meter_errors",
            stripe(
                BillingFact::MeterErrors { count: 3 },
                StripeOutcome::Applied,
            ),
        ),
        (
            "stripe_refused",
            EntryKind::Stripe(Box::new(StripeRecord {
                event_id: "evt_2".into(),
                event_type: "checkout.session.completed".into(),
                created_s: 1_792_054_805,
                outcome: StripeOutcome::Ignored("refused: not_ours: cs_1".into()),
                fact: BillingFact::None,
                alerts: vec![
                    alert(AlertKind::MoneyRefused),
                    alert(AlertKind::CreditsClawedBack),
                    alert(AlertKind::Dispute),
                ],
            })),
        ),
        (
            "stripe_dispute",
            stripe(
                BillingFact::Dispute {
                    id: "dp_1".into(),
                    payment: "pi_1".into(),
                    amount: 5_000,
                    currency: "usd".into(),
                    open: true,
                    won: false,
                    suspends: true,
                },
                StripeOutcome::Applied,
            ),
        ),
        (
            "clawback",
            EntryKind::Clawback(ClawbackRecord {
                reference: "pi_1".into(),
                owed: 100,
                burns: vec![(4, 60)],
                debt_added: 40,
                forgiven: 0,
                debt_paid: 0,
                credits_after: 840,
                debt_after: 40,
            }),
        ),
    ]
}

fn samples() -> Vec<Sample> {
    let mut out = Vec::new();
    for (name, kind) in entry_kinds() {
        let e = LedgerEntry {
            seq: 42,
            at_ms: 1_790_000_600_000,
            kind,
        };
        let bytes = encode_entry(&e).ok();
        out.push(sample(&format!("ledger.v1.{name}"), e, decode_entry, bytes));
    }
    // Snapshots: release 6's (no billing state) and the current one.
    let old = AccountSnapshot {
        profile: profile(),
        balances: balances(),
        billing: BillingState::default(),
        last_seq: 41,
    };
    let old_bytes = enc(
        &StoredSnapshot::V1(Box::new(v1::SnapshotV1 {
            profile: Freeze::freeze(&old.profile),
            balances: Freeze::freeze(&old.balances),
            last_seq: old.last_seq,
        })),
        "accounts",
    )
    .ok();
    out.push(sample("accounts.v1", old, decode_snapshot, old_bytes));
    let snap = AccountSnapshot {
        profile: profile(),
        balances: balances(),
        billing: billing(),
        last_seq: 41,
    };
    let bytes = enc(
        &StoredSnapshot::V2(Box::new(v1::AccountSnapshot::freeze(&snap))),
        "accounts",
    )
    .ok();
    out.push(sample("accounts.v2", snap, decode_snapshot, bytes));
    let snap = AccountSnapshot {
        profile: profile(),
        balances: balances_v3(),
        billing: billing(),
        last_seq: 41,
    };
    let bytes = codec::encode_snapshot(&snap).ok();
    out.push(sample("accounts.v3", snap, decode_snapshot, bytes));
    let idem = IdemRecord {
        seq: 42,
        at_ms: 1_790_000_600_000,
    };
    let bytes = encode_idem(idem).ok();
    out.push(sample("idem.v1", idem, decode_idem, bytes));
    let note = ("acme".to_string(), 42u64, alert(AlertKind::MeterErrors));
    let bytes = encode_notification(&note.0, note.1, &note.2).ok();
    out.push(sample("notify.v1", note, decode_notification, bytes));
    let item = OutboxItem {
        meter: "tokens".into(),
        value: 25,
        at_ms: 1_790_000_600_000,
        attempts: 3,
        next_at_ms: 1_790_000_700_000,
        last_error: Some("stripe answered 500: boom".into()),
    };
    let old = enc(&StoredOutbox::V1(Freeze::freeze(&item)), "outbox").ok();
    out.push(sample(
        "outbox.v1",
        OutboxRecord {
            item: item.clone(),
            batch: None,
            attempted: true,
        },
        decode_outbox,
        old,
    ));
    let batch = OutboxRecord {
        item,
        batch: Some(OutboxBatch {
            last_seq: 60,
            members: 12,
            window_ms: 60_000,
        }),
        attempted: false,
    };
    let bytes = encode_outbox(&batch).ok();
    out.push(sample("outbox.v2", batch, decode_outbox, bytes));
    out.push(sample(
        "batched.raw",
        (42u64, 1_790_000_600_000i64),
        decode_mark,
        Some(encode_mark(42, 1_790_000_600_000).to_vec()),
    ));
    let hook = WebhookRecord {
        id: "evt_1".into(),
        event_type: "invoice.paid".into(),
        created_s: 1_792_054_804,
        received_ms: 1_792_054_805_000,
        source: EventSource::Backfill,
        thin: false,
        status: WebhookStatus::Failed,
        attempts: 4,
        next_at_ms: 1_792_054_900_000,
        last_error: Some("account acme does not exist (yet)".into()),
        outcome: Some("acme: applied".into()),
        settled_ms: Some(1_792_054_901_000),
    };
    let bytes = super::events::encode_webhook(&hook).ok();
    out.push(sample(
        "webhooks.v1",
        hook,
        super::events::decode_webhook,
        bytes,
    ));
    let err = MeterErrorRecord {
        code: "meter_event_customer_not_found".into(),
        identifier: "acme:731".into(),
        event_id: "evt_test_65YO".into(),
        reported_ms: 1_795_169_703_422,
    };
    let bytes = super::events::encode_meter_error(&err).ok();
    out.push(sample(
        "meter_errors.v1",
        err,
        super::events::decode_meter_error,
        bytes,
    ));
    let topup = super::events::PendingTopUp {
        account: "acme".into(),
        package: "credits_5000".into(),
        amount: 5000,
        currency: "usd".into(),
        customer: "cus_FKNrXbjePvoq7c".into(),
        created_ms: 1_795_169_703_422,
    };
    let bytes = super::events::encode_pending_topup(&topup).ok();
    out.push(sample(
        "topups.v1",
        topup,
        super::events::decode_pending_topup,
        bytes,
    ));
    let payment = super::events::TopUpPayment {
        account: "acme".into(),
        session_id: "cs_test_1".into(),
        package: "credits_5000".into(),
        credits: 5000,
        amount: 5000,
        currency: "usd".into(),
    };
    let bytes = super::events::encode_payment(&payment).ok();
    out.push(sample(
        "payments.v1",
        payment,
        super::events::decode_payment,
        bytes,
    ));
    let window = super::recon::ReconWindow {
        window_s: 3_600,
        local: 1_250,
        first_seq: 731,
        last_seq: 790,
        stripe: Some(1_000),
        status: super::recon::ReconStatus::Repaired,
        action: "Stripe lacked 250 units: sent again as acme:r731.".into(),
        checked_ms: Some(1_795_169_703_422),
        checks: 1,
        repair: Some("acme:r731".into()),
        alert: true,
    };
    let bytes = super::recon::encode_recon_window(&window).ok();
    out.push(sample(
        "recon.v1",
        window,
        super::recon::decode_recon_window,
        bytes,
    ));
    let repair = super::recon::Repair {
        account: "acme".into(),
        meter: "tokens".into(),
        window_start_ms: 1_795_165_200_000,
        kind: super::recon::RepairKind::Resend,
        event_name: "tokens".into(),
        customer: "cus_FKNrXbjePvoq7c".into(),
        value: 250,
        timestamp_s: 1_795_165_200,
        state: super::recon::RepairState::Sent,
        created_ms: 1_795_169_703_422,
        sent_ms: Some(1_795_169_703_900),
        last_error: None,
    };
    let bytes = super::recon::encode_repair(&repair).ok();
    out.push(sample(
        "recon_repairs.v1",
        repair,
        super::recon::decode_repair,
        bytes,
    ));
    let run = super::recon::ReconRun {
        id: 7,
        trigger: "schedule".into(),
        started_ms: 1_795_169_700_000,
        upto_ms: 1_795_166_100_000,
        after: Some("acme".into()),
        finished_ms: Some(1_795_169_703_422),
        accounts: 1,
        windows: 2,
        ok: 1,
        drift: 0,
        repaired: 1,
        unrepairable: 0,
        reads: 2,
        alerts: 1,
        state_checked: 40,
        state_reread: 2,
    };
    let bytes = super::recon::encode_recon_run(&run).ok();
    out.push(sample(
        "recon_runs.v1",
        run,
        super::recon::decode_recon_run,
        bytes,
    ));
    out
}

fn committed() -> BTreeMap<String, Vec<u8>> {
    GOLDEN
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, hex) = l.split_once(' ').expect("`name hex` lines");
            (
                name.to_owned(),
                hex::decode(hex.trim()).expect("golden bytes are hex"),
            )
        })
        .collect()
}

#[test]
fn committed_records_decode_to_their_values_and_current_ones_encode_to_them() {
    let committed = committed();
    let bless = std::env::var("GOLDEN_BLESS").is_ok_and(|v| v == "1");
    let mut missing = Vec::new();
    let mut failures = Vec::new();
    let samples = samples();
    for s in &samples {
        let Some(bytes) = committed.get(&s.name) else {
            missing.push(s);
            continue;
        };
        if let Err(e) = (s.check)(bytes) {
            failures.push(format!("{}: {e}", s.name));
        }
        if let Some(w) = &s.written
            && w != bytes
        {
            failures.push(format!(
                "{}: this build writes {}, the committed bytes are {}",
                s.name,
                hex::encode(w),
                hex::encode(bytes)
            ));
        }
    }
    for name in committed.keys() {
        if !samples.iter().any(|s| &s.name == name) {
            failures.push(format!("{name}: committed but no sample checks it"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    if missing.is_empty() {
        return;
    }
    let names: Vec<&str> = missing.iter().map(|s| s.name.as_str()).collect();
    assert!(
        bless,
        "no committed bytes for {names:?}: run with GOLDEN_BLESS=1 and commit {GOLDEN_PATH}"
    );
    let mut text = GOLDEN.to_owned();
    for s in missing {
        let w = s
            .written
            .as_ref()
            .expect("a new sample is written by this build");
        text.push_str(&format!("{} {}\n", s.name, hex::encode(w)));
    }
    std::fs::write(GOLDEN_PATH, text).expect("write the golden file");
}

#[test]
fn every_ledger_tag_and_record_version_is_covered() {
    // A new variant of a stored enum needs a sample (and so committed bytes) before it ships.
    let kinds: std::collections::BTreeSet<&str> =
        entry_kinds().iter().map(|(_, k)| k.name()).collect();
    assert_eq!(kinds.len(), 10, "{kinds:?}");
    // Bytes not of this build's version never decode as it: a version tag past the last is
    // refused, not guessed.
    let committed = committed();
    let upserted = &committed["ledger.v1.upserted"];
    let mut unknown = upserted.clone();
    unknown[0] = 1;
    assert!(decode_entry(&unknown).is_err());
    let snapshot = &committed["accounts.v3"];
    let mut unknown = snapshot.clone();
    unknown[0] = 3;
    assert!(decode_snapshot(&unknown).is_err());
    assert!(dec::<StoredOutbox>(&[2], "outbox").is_err());
}

/// Every record of the stores real releases wrote (`tests/fixtures/upgrade/*/data.kv`) decodes,
/// and encodes back to exactly its bytes in its own record version: the frozen types are the
/// shapes those builds wrote, byte for byte.
#[test]
fn records_of_released_stores_decode_and_re_encode_to_their_bytes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/upgrade");
    let mut seen = BTreeMap::<String, usize>::new();
    for release in ["release-6", "release-7"] {
        let path = root.join(release).join("data.kv");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for line in text.lines() {
            let mut f = line.split('\t');
            let (tree, _key, v) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let v = hex::decode(v).unwrap();
            let again = match tree {
                "ledger" => encode_entry(&decode_entry(&v).unwrap()).unwrap(),
                "accounts" => {
                    let s = decode_snapshot(&v).unwrap();
                    match v[0] {
                        0 => enc(
                            &StoredSnapshot::V1(Box::new(v1::SnapshotV1 {
                                profile: Freeze::freeze(&s.profile),
                                balances: Freeze::freeze(&s.balances),
                                last_seq: s.last_seq,
                            })),
                            "accounts",
                        )
                        .unwrap(),
                        1 => enc(
                            &StoredSnapshot::V2(Box::new(v1::AccountSnapshot::freeze(&s))),
                            "accounts",
                        )
                        .unwrap(),
                        _ => codec::encode_snapshot(&s).unwrap(),
                    }
                }
                "idem" => encode_idem(decode_idem(&v).unwrap()).unwrap(),
                "notify" => {
                    let (a, seq, alert) = decode_notification(&v).unwrap();
                    encode_notification(&a, seq, &alert).unwrap()
                }
                "outbox" | "dead" => {
                    let r = decode_outbox(&v).unwrap();
                    match v[0] {
                        0 => enc(&StoredOutbox::V1(Freeze::freeze(&r.item)), "outbox").unwrap(),
                        _ => encode_outbox(&r).unwrap(),
                    }
                }
                "webhooks" => {
                    super::events::encode_webhook(&super::events::decode_webhook(&v).unwrap())
                        .unwrap()
                }
                "topups" => super::events::encode_pending_topup(
                    &super::events::decode_pending_topup(&v).unwrap(),
                )
                .unwrap(),
                "meter_errors" => super::events::encode_meter_error(
                    &super::events::decode_meter_error(&v).unwrap(),
                )
                .unwrap(),
                "meta" => {
                    assert_eq!(codec::decode_format(&v).unwrap(), 1, "{release}");
                    v.clone()
                }
                "customers" => {
                    assert!(
                        crate::model::AccountId::parse(std::str::from_utf8(&v).unwrap()).is_ok()
                    );
                    v.clone()
                }
                "webhook_bodies" => {
                    serde_json::from_slice::<serde_json::Value>(&v).unwrap();
                    v.clone()
                }
                other => panic!("{release}: a tree this build does not know: {other}"),
            };
            assert_eq!(hex::encode(&again), hex::encode(&v), "{release} {tree}");
            *seen.entry(format!("{release}/{tree}")).or_default() += 1;
        }
    }
    for must in [
        "release-6/ledger",
        "release-6/accounts",
        "release-6/outbox",
        "release-7/ledger",
        "release-7/accounts",
        "release-7/outbox",
        "release-7/webhooks",
    ] {
        assert!(seen.get(must).is_some_and(|n| *n > 0), "{must}: {seen:?}");
    }
}
