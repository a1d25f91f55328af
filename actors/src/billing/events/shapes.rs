//! The parts of Stripe's objects meterd reads, as serde structs. Tolerant by construction:
//! unknown fields are ignored, and a field that is absent, `null` or of another type reads as
//! absent ([`lenient`]), so a newer API version or an odd payload never makes an event
//! unprocessable. Only what `interpret` needs is here.

use super::*;

// The parts of Stripe's events and objects meterd reads, and only those. Every field is read
// with `lenient` (a list with `list`): absent, `null` or of another type, it is `None` or
// empty, never an error, and fields meterd does not read are ignored, so that new API versions
// read as the old ones did. What an event cannot do without is checked where it is used, with
// an error that names it.

/// `v` as a `T`, or `T::default()` when it has another type. Only a list reads from a JSON
/// array ([`list`]): serde would read a struct from one too, by position.
pub(super) fn lax<T: DeserializeOwned + Default>(v: &Value) -> T {
    if v.is_array() {
        return T::default();
    }
    T::deserialize(v).unwrap_or_default()
}

/// `deserialize_with` of every field: [`lax`].
pub(super) fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    d: D,
) -> Result<T, D::Error> {
    Value::deserialize(d).map(|v| lax(&v))
}

/// `deserialize_with` of a list: anything but an array is an empty one, and an element of
/// another type than `T` reads as an empty `T`.
pub(super) fn list<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(elements) => elements.iter().map(lax).collect(),
        _ => Vec::new(),
    })
}

/// `deserialize_with` of a part that must be there: present, even as `null`, it is `Some`.
pub(super) fn present<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    d: D,
) -> Result<Option<T>, D::Error> {
    lenient(d).map(Some)
}

/// Stripe's own fields of an event, v1 or v2.
#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Head {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(rename = "type", deserialize_with = "lenient")]
    pub(super) event_type: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) object: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) created: Option<Created>,
}

/// Unix seconds in a v1 event, an RFC 3339 time in a v2 one.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Created {
    Number(serde_json::Number),
    Time(String),
}

/// A v1 event, about an `O`.
#[derive(Default, Deserialize)]
#[serde(default, bound = "O: DeserializeOwned + Default")]
pub(super) struct Event<O> {
    #[serde(deserialize_with = "lenient")]
    pub(super) data: Data<O>,
}

#[derive(Default, Deserialize)]
#[serde(default, bound = "O: DeserializeOwned + Default")]
pub(super) struct Data<O> {
    /// Must be there; of another type than `O` (even `null`), it reads as an empty `O`.
    #[serde(deserialize_with = "present")]
    pub(super) object: Option<O>,
    /// The values the event changed.
    #[serde(deserialize_with = "lenient")]
    pub(super) previous_attributes: Previous,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Previous {
    #[serde(deserialize_with = "lenient")]
    pub(super) customer: Option<Expandable>,
}

/// A v1 event's `data.object` as an `O`, and the values the event changed.
pub(super) fn object_of<O: DeserializeOwned + Default>(
    ev: &Value,
) -> Result<(O, Previous), String> {
    let Event { data } = lax::<Event<O>>(ev);
    let object = data.object.ok_or("the event has no `data.object`")?;
    Ok((object, data.previous_attributes))
}

/// A reference to an object: its id, or the object itself when the event expands it.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Expandable<T = IdOnly> {
    Id(String),
    Object(T),
}

/// An object of which meterd reads only the id.
#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct IdOnly {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
}

/// An object a reference may expand to.
pub(super) trait HasId {
    fn id(&self) -> Option<&str>;
}

impl HasId for IdOnly {
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

/// The id of the object a reference names, if it names one.
pub(super) fn id_of<T: HasId>(reference: &Option<Expandable<T>>) -> Option<String> {
    match reference.as_ref()? {
        Expandable::Id(id) => Some(id.clone()),
        Expandable::Object(o) => o.id().map(str::to_owned),
    }
}

/// A Stripe list: `{"object": "list", "data": [...]}`.
#[derive(Default, Deserialize)]
#[serde(default, bound = "T: DeserializeOwned + Default")]
pub(super) struct List<T> {
    #[serde(deserialize_with = "list")]
    pub(super) data: Vec<T>,
}

/// The metadata meterd sets on what it creates in Stripe.
#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Metadata {
    #[serde(deserialize_with = "lenient")]
    pub(super) meterd_account_id: Option<String>,
    /// `topup` on a checkout session that buys credits.
    #[serde(rename = "type", deserialize_with = "lenient")]
    pub(super) kind: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) package: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) credits: Option<String>,
    /// The id meterd gave a top-up session (its pending record's key).
    #[serde(deserialize_with = "lenient")]
    pub(super) topup_id: Option<String>,
}

impl Metadata {
    pub(super) fn account(&self) -> Option<AccountId> {
        account(self.meterd_account_id.as_deref())
    }
}

pub(super) fn account(id: Option<&str>) -> Option<AccountId> {
    id.and_then(|a| AccountId::parse(a).ok())
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct CheckoutSession {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) customer: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) client_reference_id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) metadata: Metadata,
    #[serde(deserialize_with = "lenient")]
    pub(super) mode: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) payment_status: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) amount_total: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) currency: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) subscription: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) payment_intent: Option<Expandable>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Subscription {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) customer: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) metadata: Metadata,
    #[serde(deserialize_with = "lenient")]
    pub(super) status: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) items: List<SubscriptionItem>,
    /// Older API versions keep the period on the subscription, newer ones on its items.
    #[serde(deserialize_with = "lenient")]
    pub(super) current_period_start: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) current_period_end: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) trial_end: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) cancel_at_period_end: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub(super) canceled_at: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) ended_at: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) created: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct SubscriptionItem {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) price: Option<Expandable<Price>>,
    #[serde(deserialize_with = "lenient")]
    pub(super) quantity: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) current_period_start: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) current_period_end: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Price {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) recurring: Recurring,
}

impl HasId for Price {
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Recurring {
    #[serde(deserialize_with = "lenient")]
    pub(super) meter: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) usage_type: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Invoice {
    /// `None` for an upcoming invoice.
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) customer: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) metadata: Metadata,
    /// Where newer API versions put the subscription.
    #[serde(deserialize_with = "lenient")]
    pub(super) parent: InvoiceParent,
    /// Where older API versions put it.
    #[serde(deserialize_with = "lenient")]
    pub(super) subscription: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) lines: List<InvoiceLine>,
    #[serde(deserialize_with = "lenient")]
    pub(super) number: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) status: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) billing_reason: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) currency: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) amount_due: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) amount_paid: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) amount_remaining: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) total: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) hosted_invoice_url: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) period_start: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) period_end: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) created: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) attempt_count: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) next_payment_attempt: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) status_transitions: StatusTransitions,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceParent {
    #[serde(deserialize_with = "lenient")]
    pub(super) subscription_details: SubscriptionDetails,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct SubscriptionDetails {
    /// The subscription's metadata.
    #[serde(deserialize_with = "lenient")]
    pub(super) metadata: Metadata,
    #[serde(deserialize_with = "lenient")]
    pub(super) subscription: Option<Expandable>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct StatusTransitions {
    #[serde(deserialize_with = "lenient")]
    pub(super) paid_at: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceLine {
    #[serde(deserialize_with = "lenient")]
    pub(super) amount: Option<i64>,
    /// Where newer API versions put the price.
    #[serde(deserialize_with = "lenient")]
    pub(super) pricing: LinePricing,
    /// Where older API versions put it.
    #[serde(deserialize_with = "lenient")]
    pub(super) price: Option<Expandable>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct LinePricing {
    #[serde(deserialize_with = "lenient")]
    pub(super) price_details: PriceDetails,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct PriceDetails {
    #[serde(deserialize_with = "lenient")]
    pub(super) price: Option<Expandable>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Customer {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) metadata: Metadata,
    #[serde(deserialize_with = "lenient")]
    pub(super) email: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) delinquent: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub(super) invoice_settings: InvoiceSettings,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceSettings {
    #[serde(deserialize_with = "lenient")]
    pub(super) default_payment_method: Option<Expandable>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct PaymentMethod {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    /// `null` once detached (the event's `previous_attributes` name it then).
    #[serde(deserialize_with = "lenient")]
    pub(super) customer: Option<Expandable>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct EntitlementSummary {
    #[serde(deserialize_with = "lenient")]
    pub(super) customer: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) entitlements: List<Entitlement>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Entitlement {
    #[serde(deserialize_with = "lenient")]
    pub(super) lookup_key: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) feature: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Charge {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) customer: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) metadata: Metadata,
    #[serde(deserialize_with = "lenient")]
    pub(super) amount_refunded: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) currency: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) payment_intent: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) invoice: Option<Expandable>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct Dispute {
    #[serde(deserialize_with = "lenient")]
    pub(super) id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) charge: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) payment_intent: Option<Expandable>,
    #[serde(deserialize_with = "lenient")]
    pub(super) amount: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub(super) currency: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) status: Option<String>,
}

/// A v2 `v1.billing.meter.error_report_triggered` event (fetched in full).
#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct MeterErrorEvent {
    #[serde(deserialize_with = "lenient")]
    pub(super) data: MeterErrorData,
    /// The meter.
    #[serde(deserialize_with = "lenient")]
    pub(super) related_object: IdOnly,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct MeterErrorData {
    #[serde(deserialize_with = "lenient")]
    pub(super) reason: MeterErrorReason,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct MeterErrorReason {
    #[serde(deserialize_with = "list")]
    pub(super) error_types: Vec<MeterErrorType>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct MeterErrorType {
    #[serde(deserialize_with = "lenient")]
    pub(super) code: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub(super) error_count: Option<u64>,
    #[serde(deserialize_with = "list")]
    pub(super) sample_errors: Vec<MeterErrorSample>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct MeterErrorSample {
    #[serde(deserialize_with = "lenient")]
    pub(super) request: MeterEventRequest,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct MeterEventRequest {
    /// The meter event's identifier (see [`crate::identifier`]).
    #[serde(deserialize_with = "lenient")]
    pub(super) identifier: Option<String>,
}
