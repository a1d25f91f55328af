//! Interpretation of Stripe events: a verified event's JSON (tolerant of fields and types it
//! does not know) becomes a [`StripeChange`] and the account it concerns ([`Target`]).

use super::*;

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer};

/// Stripe's own fields of an event, read without trusting the rest of its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHead {
    pub id: String,
    pub event_type: String,
    /// Unix seconds (a v2 event's RFC 3339 time, converted).
    pub created_s: i64,
    /// A v2 thin event: only a reference; the full event must be fetched.
    pub thin: bool,
}

/// Reads the id, type and time of an event from its raw JSON.
pub fn head(raw: &[u8]) -> Result<EventHead, String> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| format!("not JSON: {e}"))?;
    head_of(&v)
}

pub fn head_of(v: &Value) -> Result<EventHead, String> {
    let h: Head = lax(v);
    let named = |s: Option<String>| s.filter(|s| !s.is_empty() && s.len() <= 255);
    let id = named(h.id).ok_or("the event has no `id`")?;
    let event_type = named(h.event_type).ok_or("the event has no `type`")?;
    let thin = h.object.as_deref() == Some("v2.core.event");
    let created_s = match h.created {
        Some(Created::Number(n)) => n.as_i64().ok_or("`created` is not an integer")?,
        Some(Created::Time(s)) => parse_rfc3339(&s).ok_or("`created` is not an RFC 3339 time")?,
        None => return Err("the event has no `created`".into()),
    };
    Ok(EventHead {
        id,
        event_type,
        created_s,
        thin,
    })
}

/// Stripe's RFC 3339 `created` as unix seconds: [`crate::model::parse_rfc3339`] (the one
/// parser), floored to the second.
pub(crate) fn parse_rfc3339(s: &str) -> Option<i64> {
    crate::model::parse_rfc3339(s).map(|ms| ms.div_euclid(1000))
}

/// Which account an event concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Named by the event (`client_reference_id` or `metadata.meterd_account_id`), with the
    /// customer if the event has one.
    Account(AccountId, Option<String>),
    /// Only the Stripe customer is known: look up the account linked to it.
    Customer(String),
    /// A payment (payment intent): the account whose top-up it paid, if meterd credited one.
    Payment(String),
    /// Meter events of these accounts, named by their outbox identifiers.
    Identifiers(Vec<ReportedEvent>),
    /// No account: acknowledged and ignored.
    None,
}

/// A meter event a Stripe error report names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedEvent {
    /// The account id, or its hash (see [`crate::identifier`]): the store resolves it.
    pub owner: String,
    /// The ledger entry (the first of an aggregated range).
    pub seq: u64,
    pub code: String,
    pub identifier: String,
}

/// What an event asks of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeChange {
    /// Checkout completed a subscription: link the customer (and subscription).
    Linked {
        customer: Option<String>,
        subscription: Option<String>,
    },
    /// Checkout paid a credit top-up.
    TopUp {
        session_id: String,
        /// meterd's id of the session (`metadata.topup_id`): its pending record.
        topup_id: Option<String>,
        package: Option<String>,
        credits: Option<u64>,
        amount: i64,
        currency: String,
        /// The payment that paid it: a refund or dispute names it.
        payment_intent: Option<String>,
    },
    Subscription {
        info: SubscriptionInfo,
        deleted: bool,
        rank: u8,
    },
    TrialWillEnd {
        subscription: String,
        trial_end_s: Option<i64>,
    },
    Invoice {
        summary: InvoiceSummary,
        /// `Some(true)`: paid; `Some(false)`: a payment failed; `None`: a summary only.
        payment: Option<bool>,
    },
    Customer {
        email: Option<String>,
        delinquent: bool,
        default_payment_method: Option<String>,
    },
    PaymentMethod {
        id: String,
        attached: bool,
    },
    Features(Vec<String>),
    /// Money returned on a charge (`amount`: the charge's refunded total so far).
    Refund {
        charge: String,
        amount: i64,
        currency: String,
        reference: Option<String>,
    },
    /// A payment was disputed (`open`), or its dispute closed (`status` `won`, `lost`, …).
    Dispute {
        id: String,
        payment_intent: String,
        amount: i64,
        currency: String,
        open: bool,
        status: String,
    },
    MeterErrors {
        meter: Option<String>,
        /// `(error code, sample count)`.
        codes: Vec<(String, u64)>,
    },
    /// Nothing to do.
    Ignore(String),
}

/// Price id → the meterd plan it belongs to, and which prices are metered.
#[derive(Debug, Clone, Default)]
pub struct PriceMap {
    pub plans: BTreeMap<String, String>,
    pub metered: std::collections::BTreeSet<String>,
}

mod shapes;

use shapes::*;

fn target(account: Option<AccountId>, customer: Option<String>) -> Target {
    match (account, customer) {
        (Some(a), c) => Target::Account(a, c),
        (None, Some(c)) => Target::Customer(c),
        (None, None) => Target::None,
    }
}

/// The event types meterd acts on (others are acknowledged and ignored).
pub const HANDLED_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.trial_will_end",
    "invoice.created",
    "invoice.finalized",
    "invoice.upcoming",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "customer.updated",
    "payment_method.attached",
    "payment_method.detached",
    "entitlements.active_entitlement_summary.updated",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
    "v1.billing.meter.error_report_triggered",
];

/// Interprets a full (not thin) event. `Err` is a permanent problem with the event itself.
pub fn interpret(ev: &Value, prices: &PriceMap) -> Result<(Target, StripeChange), String> {
    let h = head_of(ev)?;
    if h.event_type == "v1.billing.meter.error_report_triggered" {
        return Ok(meter_errors(lax(ev)));
    }
    if !HANDLED_TYPES.contains(&h.event_type.as_str()) {
        return Ok((
            Target::None,
            StripeChange::Ignore(format!("event type `{}` is not handled", h.event_type)),
        ));
    }
    Ok(match h.event_type.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let (o, _) = object_of::<CheckoutSession>(ev)?;
            let customer = id_of(&o.customer);
            let account =
                account(o.client_reference_id.as_deref()).or_else(|| o.metadata.account());
            let session = o.id.ok_or("checkout session without `id`")?;
            // Paid means `paid`: not `unpaid`, and not `no_payment_required` (a 100 % coupon
            // or a zero amount pays nothing).
            let paid = o.payment_status.as_deref() == Some("paid");
            match o.mode.as_deref() {
                Some("payment") if o.metadata.kind.as_deref() == Some("topup") => {
                    if !paid {
                        (
                            target(account, customer),
                            StripeChange::Ignore(format!(
                                "top-up not paid (payment_status {})",
                                o.payment_status.as_deref().unwrap_or("missing")
                            )),
                        )
                    } else {
                        (
                            target(account, customer),
                            StripeChange::TopUp {
                                session_id: session,
                                topup_id: o.metadata.topup_id,
                                package: o.metadata.package,
                                credits: o.metadata.credits.and_then(|c| c.parse().ok()),
                                amount: o.amount_total.unwrap_or(0),
                                currency: o.currency.unwrap_or_default(),
                                payment_intent: id_of(&o.payment_intent),
                            },
                        )
                    }
                }
                Some("subscription") => (
                    target(account, customer.clone()),
                    StripeChange::Linked {
                        customer,
                        subscription: id_of(&o.subscription),
                    },
                ),
                _ => (
                    target(account, customer),
                    StripeChange::Ignore("checkout session of another kind".into()),
                ),
            }
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            let (o, _) = object_of::<Subscription>(ev)?;
            let (account, customer) = (o.metadata.account(), id_of(&o.customer));
            let info = subscription_info(o, prices)?;
            let rank = match h.event_type.as_str() {
                "customer.subscription.created" => 0,
                "customer.subscription.updated" => 1,
                _ => 2,
            };
            (
                target(account, customer),
                StripeChange::Subscription {
                    info,
                    deleted: rank == 2,
                    rank,
                },
            )
        }
        "customer.subscription.trial_will_end" => {
            let (o, _) = object_of::<Subscription>(ev)?;
            (
                target(o.metadata.account(), id_of(&o.customer)),
                StripeChange::TrialWillEnd {
                    subscription: o.id.unwrap_or_default(),
                    trial_end_s: o.trial_end,
                },
            )
        }
        "invoice.created"
        | "invoice.finalized"
        | "invoice.upcoming"
        | "invoice.paid"
        | "invoice.payment_succeeded"
        | "invoice.payment_failed" => {
            let (o, _) = object_of::<Invoice>(ev)?;
            let payment = match h.event_type.as_str() {
                "invoice.paid" | "invoice.payment_succeeded" => Some(true),
                "invoice.payment_failed" => Some(false),
                _ => None,
            };
            let account = o
                .parent
                .subscription_details
                .metadata
                .account()
                .or_else(|| o.metadata.account());
            let customer = id_of(&o.customer);
            let summary = invoice_summary(o, prices, h.created_s);
            (
                target(account, customer),
                StripeChange::Invoice { summary, payment },
            )
        }
        "customer.updated" => {
            let (o, _) = object_of::<Customer>(ev)?;
            (
                target(o.metadata.account(), o.id),
                StripeChange::Customer {
                    email: o.email,
                    delinquent: o.delinquent.unwrap_or(false),
                    default_payment_method: id_of(&o.invoice_settings.default_payment_method),
                },
            )
        }
        "payment_method.attached" | "payment_method.detached" => {
            let attached = h.event_type == "payment_method.attached";
            let (o, previous) = object_of::<PaymentMethod>(ev)?;
            // A detached method has `customer: null`; the customer is in the previous values.
            let customer = id_of(&o.customer).or_else(|| id_of(&previous.customer));
            (
                target(None, customer),
                StripeChange::PaymentMethod {
                    id: o.id.ok_or("payment method without `id`")?,
                    attached,
                },
            )
        }
        "entitlements.active_entitlement_summary.updated" => {
            let (o, _) = object_of::<EntitlementSummary>(ev)?;
            let mut features: Vec<String> = o
                .entitlements
                .data
                .into_iter()
                .filter_map(|e| e.lookup_key.or(e.feature))
                .collect();
            features.sort();
            features.dedup();
            (
                target(None, id_of(&o.customer)),
                StripeChange::Features(features),
            )
        }
        "charge.refunded" => {
            let (o, _) = object_of::<Charge>(ev)?;
            (
                target(o.metadata.account(), id_of(&o.customer)),
                StripeChange::Refund {
                    charge: o.id.ok_or("charge without `id`")?,
                    amount: o.amount_refunded.unwrap_or(0),
                    currency: o.currency.unwrap_or_default(),
                    reference: id_of(&o.payment_intent).or_else(|| id_of(&o.invoice)),
                },
            )
        }
        "charge.dispute.created" | "charge.dispute.closed" => {
            let (o, _) = object_of::<Dispute>(ev)?;
            let id = o.id.ok_or("dispute without `id`")?;
            // A dispute names its charge and payment intent, not the customer: the payment
            // finds the top-up it paid (only those are meterd's to act on).
            match id_of(&o.payment_intent) {
                None => (
                    Target::None,
                    StripeChange::Ignore(format!(
                        "dispute {id} of charge {} names no payment intent",
                        id_of(&o.charge).unwrap_or_default()
                    )),
                ),
                Some(pi) => (
                    Target::Payment(pi.clone()),
                    StripeChange::Dispute {
                        id,
                        payment_intent: pi,
                        amount: o.amount.unwrap_or(0),
                        currency: o.currency.unwrap_or_default(),
                        open: h.event_type == "charge.dispute.created",
                        status: o.status.unwrap_or_default(),
                    },
                ),
            }
        }
        other => (
            Target::None,
            StripeChange::Ignore(format!("event type `{other}` is not handled")),
        ),
    })
}

fn subscription_info(sub: Subscription, prices: &PriceMap) -> Result<SubscriptionInfo, String> {
    let id = sub.id.ok_or("subscription without `id`")?;
    let mut items = Vec::new();
    let mut period = None;
    for it in sub.items.data {
        let price = id_of(&it.price).unwrap_or_default();
        let recurring = match it.price {
            Some(Expandable::Object(p)) => p.recurring,
            _ => Recurring::default(),
        };
        let meter = recurring.meter;
        let usage_type = recurring.usage_type.unwrap_or_else(|| {
            if meter.is_some() || prices.metered.contains(&price) {
                "metered".into()
            } else {
                "licensed".into()
            }
        });
        if period.is_none()
            && let (Some(a), Some(b)) = (it.current_period_start, it.current_period_end)
        {
            period = Some((a, b));
        }
        items.push(SubItem {
            id: it.id.unwrap_or_default(),
            plan: prices.plans.get(&price).cloned(),
            quantity: it.quantity,
            price,
            usage_type,
            meter,
        });
    }
    // Older API versions keep the period on the subscription itself.
    if period.is_none()
        && let (Some(a), Some(b)) = (sub.current_period_start, sub.current_period_end)
    {
        period = Some((a, b));
    }
    let licensed = items.iter().find(|x| x.usage_type == "licensed");
    let plan = licensed
        .and_then(|x| x.plan.clone())
        .or_else(|| items.iter().find_map(|x| x.plan.clone()));
    Ok(SubscriptionInfo {
        customer: id_of(&sub.customer),
        status: sub.status.unwrap_or_else(|| "active".into()),
        plan,
        seats: licensed.and_then(|x| x.quantity),
        items,
        period,
        trial_end_s: sub.trial_end,
        cancel_at_period_end: sub.cancel_at_period_end.unwrap_or(false),
        canceled_at_s: sub.canceled_at,
        ended_at_s: sub.ended_at,
        created_s: sub.created.unwrap_or(0),
        id,
    })
}

fn invoice_summary(inv: Invoice, prices: &PriceMap, event_created_s: i64) -> InvoiceSummary {
    let mut metered = 0i64;
    for line in &inv.lines.data {
        let price = id_of(&line.pricing.price_details.price).or_else(|| id_of(&line.price));
        if price.is_some_and(|p| prices.metered.contains(&p)) {
            metered = metered.saturating_add(line.amount.unwrap_or(0));
        }
    }
    InvoiceSummary {
        id: inv.id,
        number: inv.number,
        status: inv.status,
        billing_reason: inv.billing_reason,
        currency: inv.currency.unwrap_or_default(),
        amount_due: inv.amount_due.unwrap_or(0),
        amount_paid: inv.amount_paid.unwrap_or(0),
        amount_remaining: inv.amount_remaining.unwrap_or(0),
        total: inv.total.unwrap_or(0),
        metered_amount: metered,
        hosted_invoice_url: inv.hosted_invoice_url,
        period_start_s: inv.period_start,
        period_end_s: inv.period_end,
        created_s: inv.created,
        attempt_count: inv.attempt_count.unwrap_or(0),
        next_payment_attempt_s: inv.next_payment_attempt,
        paid_at_s: inv.status_transitions.paid_at,
        subscription: id_of(&inv.parent.subscription_details.subscription)
            .or_else(|| id_of(&inv.subscription)),
        event_created_s,
    }
}

fn meter_errors(ev: MeterErrorEvent) -> (Target, StripeChange) {
    let mut codes = Vec::new();
    let mut idents = Vec::new();
    for t in ev.data.reason.error_types {
        let code = t.code.unwrap_or_else(|| "unknown".into());
        codes.push((code.clone(), t.error_count.unwrap_or(0)));
        for e in t.sample_errors {
            if let Some(ident) = e.request.identifier
                && let Some(parsed) = crate::identifier::parse(&ident)
            {
                idents.push(ReportedEvent {
                    owner: parsed.owner,
                    seq: parsed.seq,
                    code: code.clone(),
                    identifier: ident,
                });
            }
        }
    }
    let target = if idents.is_empty() {
        Target::None
    } else {
        Target::Identifiers(idents)
    };
    (
        target,
        StripeChange::MeterErrors {
            meter: ev.related_object.id,
            codes,
        },
    )
}

/// Stripe's subscription status as meterd's (which decides access).
pub fn status_of(stripe: &str) -> SubscriptionStatus {
    match stripe {
        "active" => SubscriptionStatus::Active,
        "trialing" => SubscriptionStatus::Trialing,
        "past_due" => SubscriptionStatus::PastDue,
        "canceled" => SubscriptionStatus::Canceled,
        "unpaid" | "paused" => SubscriptionStatus::Unpaid,
        // incomplete, incomplete_expired, and anything new: no access until Stripe says more.
        _ => SubscriptionStatus::Incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of the repository's Stripe story (`tests/fixtures/stripe/events/`).
    fn story(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/stripe/events")
            .join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap()
    }

    fn prices() -> PriceMap {
        let mut p = PriceMap::default();
        p.plans
            .insert("price_17NKaQm7Yc2Hd9anf59xSqfT".into(), "team".into());
        p.plans
            .insert("price_1VXNVQm7Yc2Hd9aGYgZ9Chhu".into(), "business".into());
        p.plans
            .insert("price_1NSy3Qm7Yc2Hd9aTmEEY3Wmo".into(), "team".into());
        p.metered.insert("price_1NSy3Qm7Yc2Hd9aTmEEY3Wmo".into());
        p
    }

    #[test]
    fn the_real_payloads_interpret_to_their_changes() {
        let acme = AccountId::parse("acct_acme").unwrap();
        let cus = "cus_FKNrXbjePvoq7c".to_owned();
        let p = prices();
        let (t, c) = interpret(&story("customer.subscription.created.json"), &p).unwrap();
        assert_eq!(t, Target::Account(acme.clone(), Some(cus.clone())));
        let StripeChange::Subscription {
            info,
            deleted,
            rank,
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(
            (info.plan.as_deref(), info.seats, deleted, rank),
            (Some("team"), Some(3), false, 0)
        );
        assert_eq!(info.status, "trialing");
        assert_eq!(info.period, Some((1_790_845_200, 1_792_054_800)));
        assert_eq!(
            info.items
                .iter()
                .filter(|i| i.usage_type == "metered")
                .count(),
            1
        );

        let (_, c) =
            interpret(&story("customer.subscription.updated.plan_change.json"), &p).unwrap();
        assert!(
            matches!(c, StripeChange::Subscription { ref info, .. } if info.plan.as_deref() == Some("business") && info.seats == Some(5)),
            "{c:?}"
        );

        let (t, c) =
            interpret(&story("checkout.session.completed.payment_topup.json"), &p).unwrap();
        assert_eq!(t, Target::Account(acme.clone(), Some(cus.clone())));
        assert!(
            matches!(
                c,
                StripeChange::TopUp {
                    credits: Some(5000),
                    amount: 5000,
                    payment_intent: Some(ref pi),
                    ..
                } if pi == "pi_1An1OQm7Yc2Hd9adc97aANGy"
            ),
            "{c:?}"
        );

        let (_, c) = interpret(&story("invoice.upcoming.json"), &p).unwrap();
        let StripeChange::Invoice {
            summary,
            payment: None,
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!((summary.id, summary.metered_amount), (None, 25_000));

        let (_, c) = interpret(&story("invoice.paid.json"), &p).unwrap();
        assert!(
            matches!(c, StripeChange::Invoice { payment: Some(true), ref summary } if summary.paid_at_s == Some(1_792_137_609)),
            "{c:?}"
        );

        let (t, c) = interpret(&story("payment_method.detached.json"), &p).unwrap();
        assert_eq!(
            t,
            Target::Customer(cus.clone()),
            "the customer comes from previous_attributes"
        );
        assert!(matches!(
            c,
            StripeChange::PaymentMethod {
                attached: false,
                ..
            }
        ));

        let (t, c) = interpret(
            &story("entitlements.active_entitlement_summary.updated.json"),
            &p,
        )
        .unwrap();
        assert_eq!(t, Target::Customer(cus.clone()));
        assert_eq!(
            c,
            StripeChange::Features(vec![
                "api_access".into(),
                "priority_support".into(),
                "sso".into()
            ])
        );

        let (t, c) = interpret(
            &story("billing.meter.error_report_triggered.fetched.json"),
            &p,
        )
        .unwrap();
        let Target::Identifiers(ids) = t else {
            panic!("{t:?}")
        };
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().any(|r| r.owner == acme.as_str()
            && r.seq == 4410
            && r.code == "timestamp_too_far_in_past"
            && r.identifier == "acct_acme:4410"));
        assert!(matches!(c, StripeChange::MeterErrors { ref codes, .. } if codes.len() == 2));

        let unknown = serde_json::json!({"id":"evt_x","type":"charge.dispute.funds_withdrawn","created":1,"object":"event"});
        assert!(matches!(
            interpret(&unknown, &p).unwrap(),
            (Target::None, StripeChange::Ignore(_))
        ));
    }

    #[test]
    fn heads_read_v1_and_v2_events() {
        let v1 =
            head(br#"{"id":"evt_1","type":"invoice.paid","created":17,"object":"event"}"#).unwrap();
        assert_eq!(
            (v1.id.as_str(), v1.created_s, v1.thin),
            ("evt_1", 17, false)
        );
        let v2 = head(
            br#"{"id":"evt_2","object":"v2.core.event","type":"v1.billing.meter.error_report_triggered","created":"1970-01-01T00:01:00.000Z"}"#,
        )
        .unwrap();
        assert_eq!((v2.created_s, v2.thin), (60, true));
        assert!(head(b"{}").is_err());
        assert!(head(b"not json").is_err());
        assert!(head(br#"{"id":"","type":"x","created":1}"#).is_err());
    }

    /// `ev` with the part at the JSON pointer `at` set to `to` (JSON), or removed (`None`).
    fn edit(ev: &Value, at: &str, to: Option<&str>) -> Value {
        let mut ev = ev.clone();
        let (parent, key) = at.rsplit_once('/').unwrap();
        let Some(Value::Object(parent)) = ev.pointer_mut(parent) else {
            panic!("no object holds {at}")
        };
        match to {
            Some(json) => parent.insert(key.to_owned(), serde_json::from_str(json).unwrap()),
            None => parent.remove(key),
        };
        ev
    }

    const SUB: &str = "customer.subscription.created.json";
    const INVOICE: &str = "invoice.paid.json";
    const UPCOMING: &str = "invoice.upcoming.json";
    const CUSTOMER: &str = "customer.updated.json";
    const TOPUP: &str = "checkout.session.completed.payment_topup.json";
    const ENTITLEMENTS: &str = "entitlements.active_entitlement_summary.updated.json";
    const METER_ERRORS: &str = "billing.meter.error_report_triggered.fetched.json";

    /// There is no refund in the story.
    fn charge_refunded() -> Value {
        serde_json::json!({
            "id": "evt_1", "object": "event", "type": "charge.refunded", "created": 5,
            "data": {"object": {
                "id": "ch_1", "object": "charge", "customer": {"id": "cus_x", "object": "customer"},
                "metadata": {"meterd_account_id": "acct_acme"}, "amount_refunded": 300,
                "currency": "eur", "payment_intent": null, "invoice": "in_1"
            }}
        })
    }

    /// Stripe's dispute fixture, as `charge.dispute.<kind>` on payment intent `pi`.
    fn dispute(kind: &str, pi: Value, status: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/stripe/fixtures3.latest.json");
        let f: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let mut d = f["resources"]["dispute"].clone();
        d["payment_intent"] = pi;
        d["status"] = serde_json::json!(status);
        serde_json::json!({
            "id": "evt_d", "object": "event", "type": format!("charge.dispute.{kind}"),
            "created": 5, "data": {"object": d}
        })
    }

    #[test]
    fn a_dispute_names_its_payment_and_one_without_a_payment_intent_is_ignored() {
        let p = prices();
        let (t, c) = interpret(
            &dispute("created", serde_json::json!("pi_1"), "needs_response"),
            &p,
        )
        .unwrap();
        assert_eq!(t, Target::Payment("pi_1".into()));
        assert_eq!(
            c,
            StripeChange::Dispute {
                id: "dp_1Pgc71B7WZ01zgkWMevJiAUx".into(),
                payment_intent: "pi_1".into(),
                amount: 1000,
                currency: "usd".into(),
                open: true,
                status: "needs_response".into(),
            }
        );
        let expanded = serde_json::json!({"id": "pi_2", "object": "payment_intent"});
        let (t, c) = interpret(&dispute("closed", expanded, "lost"), &p).unwrap();
        assert_eq!(t, Target::Payment("pi_2".into()));
        assert!(
            matches!(c, StripeChange::Dispute { open: false, ref status, .. } if status == "lost"),
            "{c:?}"
        );
        let (t, c) = interpret(&dispute("created", Value::Null, "needs_response"), &p).unwrap();
        assert_eq!(t, Target::None);
        assert!(matches!(c, StripeChange::Ignore(_)), "{c:?}");
        // Other dispute events are acknowledged and ignored.
        let (t, _) = interpret(&dispute("updated", serde_json::json!("pi_1"), "won"), &p).unwrap();
        assert_eq!(t, Target::None);
    }

    /// The events of the story.
    fn story_names() -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/stripe/events");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('_'))
            .collect();
        names.sort();
        names
    }

    /// The JSON pointers of every member of every object in `v`.
    fn members(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter().filter(|(k, _)| !k.contains(['/', '~'])) {
                    out.push(format!("{at}/{k}"));
                    members(x, &format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    members(x, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn unknown_fields_and_api_versions_are_ignored() {
        let p = prices();
        let unknown = r#"{"new": [1, null, {"deeper": true}]}"#;
        for name in story_names() {
            let ev = story(&name);
            let mut newer = edit(&ev, "/api_version", Some(r#""2099-01-01.future""#));
            for at in [
                "",
                "/data",
                "/data/object",
                "/data/object/metadata",
                "/data/object/items/data/0",
                "/data/object/items/data/0/price",
                "/data/object/lines/data/0",
                "/data/object/parent/subscription_details",
                "/data/reason/error_types/0/sample_errors/0/request",
                "/related_object",
            ] {
                if ev.pointer(at).is_some_and(Value::is_object) {
                    newer = edit(&newer, &format!("{at}/zz_unknown"), Some(unknown));
                }
            }
            assert_eq!(interpret(&newer, &p), interpret(&ev, &p), "{name}");
        }
        let ev = charge_refunded();
        let newer = edit(
            &ev,
            "/data/object/refunds",
            Some(r#"{"data": [{"id": "re_1"}]}"#),
        );
        assert_eq!(interpret(&newer, &p), interpret(&ev, &p));
    }

    #[test]
    fn null_where_an_object_is_expected_reads_as_absent() {
        let p = prices();
        for (name, at) in [
            (SUB, "/data/object/metadata"),
            (SUB, "/data/object/items"),
            (SUB, "/data/object/items/data/1/price"),
            (SUB, "/data/object/items/data/1/price/recurring"),
            (INVOICE, "/data/object/parent"),
            (INVOICE, "/data/object/parent/subscription_details"),
            (INVOICE, "/data/object/status_transitions"),
            (UPCOMING, "/data/object/lines"),
            (UPCOMING, "/data/object/lines/data/5/pricing"),
            (CUSTOMER, "/data/object/invoice_settings"),
            (TOPUP, "/data/object/metadata"),
            (TOPUP, "/data/object/customer"),
            ("payment_method.detached.json", "/data/previous_attributes"),
            (ENTITLEMENTS, "/data/object/entitlements"),
            (METER_ERRORS, "/data/reason"),
            (METER_ERRORS, "/related_object"),
        ] {
            let ev = story(name);
            assert!(ev.pointer(at).is_some(), "{name} has {at}");
            let null = interpret(&edit(&ev, at, Some("null")), &p);
            assert!(null.is_ok(), "{name} {at}: {null:?}");
            assert_eq!(null, interpret(&edit(&ev, at, None), &p), "{name} {at}");
            assert_ne!(null, interpret(&ev, &p), "{name} {at} is read");
        }

        // A subscription without metadata names only its customer.
        let ev = edit(&story(SUB), "/data/object/metadata", Some("null"));
        let (t, _) = interpret(&ev, &p).unwrap();
        assert_eq!(t, Target::Customer("cus_FKNrXbjePvoq7c".into()));

        // `data.object` must be there, but there, of any type, it is an object without fields.
        let ev = edit(&story(INVOICE), "/data/object", Some("null"));
        let (t, c) = interpret(&ev, &p).unwrap();
        assert_eq!(t, Target::None);
        assert!(
            matches!(c, StripeChange::Invoice { payment: Some(true), ref summary } if summary.id.is_none() && summary.amount_paid == 0),
            "{c:?}"
        );
        for object in ["null", "5", r#"["sub_1"]"#] {
            let ev = edit(&story(SUB), "/data/object", Some(object));
            assert_eq!(interpret(&ev, &p), Err("subscription without `id`".into()));
        }
    }

    /// Any part of the story's events, `null` or of a type no part has (a fraction), reads as if
    /// it were not there: no field of the structs above fails its object.
    #[test]
    fn every_part_of_the_story_of_another_type_reads_as_absent() {
        let p = prices();
        for name in story_names() {
            let ev = story(&name);
            let mut parts = Vec::new();
            members(&ev, "", &mut parts);
            for at in parts {
                if at == "/data/object" || at == "/created" {
                    continue; // Read (and tested) apart.
                }
                let absent = interpret(&edit(&ev, &at, None), &p);
                for wrong in ["null", "1.5"] {
                    let read = interpret(&edit(&ev, &at, Some(wrong)), &p);
                    assert_eq!(read, absent, "{name} {at}: {wrong}");
                }
            }
        }
    }

    #[test]
    fn an_optional_field_of_another_type_reads_as_absent() {
        let p = prices();
        for (name, at, wrong) in [
            (SUB, "/data/object/customer", "42"),
            (SUB, "/data/object/metadata", r#"["acct_acme"]"#),
            (
                SUB,
                "/data/object/metadata/meterd_account_id",
                r#"{"id": "acct_acme"}"#,
            ),
            (SUB, "/data/object/items", r#"[{"object": "list"}]"#),
            (SUB, "/data/object/items/data", r#"{"0": {}}"#),
            (SUB, "/data/object/items/data/0/quantity", r#""3""#),
            (SUB, "/data/object/items/data/0/quantity", "3.0"),
            (SUB, "/data/object/items/data/0/price", "7"),
            (
                SUB,
                "/data/object/items/data/1/price/recurring/meter",
                "true",
            ),
            (SUB, "/data/object/trial_end", r#""soon""#),
            (SUB, "/data/object/status", r#"{"active": true}"#),
            (SUB, "/data/object/created", "18446744073709551615"),
            (INVOICE, "/data/object/amount_paid", "60.5"),
            (INVOICE, "/data/object/attempt_count", "-1"),
            (
                INVOICE,
                "/data/object/status_transitions/paid_at",
                r#""now""#,
            ),
            (
                INVOICE,
                "/data/object/parent/subscription_details/subscription",
                r#"["sub_1"]"#,
            ),
            (UPCOMING, "/data/object/lines/data", r#""six lines""#),
            (CUSTOMER, "/data/object/email", "false"),
            (CUSTOMER, "/data/object/delinquent", r#""true""#),
            (
                CUSTOMER,
                "/data/object/invoice_settings/default_payment_method",
                r#"{"id": 5}"#,
            ),
            (TOPUP, "/data/object/amount_total", r#""5000""#),
            (TOPUP, "/data/object/metadata/credits", "5000"),
            (TOPUP, "/data/object/mode", "1"),
            (ENTITLEMENTS, "/data/object/entitlements/data", "3"),
            (
                METER_ERRORS,
                "/data/reason/error_types/0/sample_errors",
                r#""many""#,
            ),
            (METER_ERRORS, "/data/reason/error_types/1/error_count", "-1"),
            (METER_ERRORS, "/related_object", r#""mtr_x""#),
        ] {
            let ev = story(name);
            assert!(ev.pointer(at).is_some(), "{name} has {at}");
            let wrong = interpret(&edit(&ev, at, Some(wrong)), &p);
            assert!(wrong.is_ok(), "{name} {at}: {wrong:?}");
            assert_eq!(wrong, interpret(&edit(&ev, at, None), &p), "{name} {at}");
            assert_ne!(wrong, interpret(&ev, &p), "{name} {at} is read");
        }

        // An element of a list that is not an object has nothing to read.
        let entitlements = r#"[{"lookup_key": "sso"}, 5, null, {"lookup_key": 6, "feature": "f"}]"#;
        let ev = edit(
            &story(ENTITLEMENTS),
            "/data/object/entitlements/data",
            Some(entitlements),
        );
        let (_, c) = interpret(&ev, &p).unwrap();
        assert_eq!(c, StripeChange::Features(vec!["f".into(), "sso".into()]));
    }

    #[test]
    fn a_missing_required_part_is_the_error_naming_it() {
        let p = prices();
        for (ev, at, error) in [
            (story(SUB), "/data/object/id", "subscription without `id`"),
            (
                story(TOPUP),
                "/data/object/id",
                "checkout session without `id`",
            ),
            (
                story("payment_method.attached.json"),
                "/data/object/id",
                "payment method without `id`",
            ),
            (charge_refunded(), "/data/object/id", "charge without `id`"),
            (
                story(INVOICE),
                "/data/object",
                "the event has no `data.object`",
            ),
            (story(CUSTOMER), "/data", "the event has no `data.object`"),
            (story(INVOICE), "/id", "the event has no `id`"),
            (story(INVOICE), "/type", "the event has no `type`"),
            (story(INVOICE), "/created", "the event has no `created`"),
        ] {
            let error = Err(error.to_owned());
            assert_eq!(interpret(&edit(&ev, at, None), &p), error, "{at} removed");
            if at == "/data/object" {
                continue; // There, of any type, it is an object without fields (above).
            }
            // Of another type, it is missing as well.
            for wrong in ["null", "true", r#"["x"]"#, r#"{"id": "x"}"#] {
                assert_eq!(
                    interpret(&edit(&ev, at, Some(wrong)), &p),
                    error,
                    "{at}: {wrong}"
                );
            }
        }
        for (created, error) in [
            ("1.5", "`created` is not an integer"),
            ("18446744073709551615", "`created` is not an integer"),
            (r#""yesterday""#, "`created` is not an RFC 3339 time"),
            (r#"{"seconds": 5}"#, "the event has no `created`"),
        ] {
            let ev = edit(&story(INVOICE), "/created", Some(created));
            assert_eq!(interpret(&ev, &p), Err(error.into()), "{created}");
        }
        let ev = edit(&story(INVOICE), "/id", Some(r#""""#));
        assert_eq!(interpret(&ev, &p), Err("the event has no `id`".into()));
        let array = head(br#"["evt_1", "invoice.paid", 1]"#);
        assert_eq!(array, Err("the event has no `id`".into()));
    }
}
