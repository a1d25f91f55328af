//! Stripe over HTTP: async-stripe's typed requests, sent by a client of our own.
//!
//! async-stripe's own client makes one attempt per idempotent request, opens a connection per
//! request and drops the response headers. The outbox needs the status, `Retry-After` and
//! `Stripe-Should-Retry` to decide what to do next, so [`StripeHttp`] implements the request
//! crates' `StripeClient` trait over a pooled reqwest client (rustls with ring). The typed
//! request builders stay the source of truth for paths and form encoding. This module never
//! retries: the outbox owns retries, always with the same deterministic key. It never logs a
//! secret or a request body.

use std::time::Duration;

use bytes::Bytes;
use stripe_client_core::{
    CustomizedStripeRequest, RequestStrategy, StripeClient, StripeClientErr, StripeMethod,
    StripeRequest,
};

/// Why a call to Stripe did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeCallError {
    #[error("stripe answered {status}: {message}")]
    Api {
        status: u16,
        code: Option<String>,
        message: String,
        /// `Stripe-Should-Retry`, when Stripe said.
        should_retry: Option<bool>,
        /// `Retry-After`, when Stripe said.
        retry_after: Option<Duration>,
    },
    #[error("cannot reach stripe: {0}")]
    Network(String),
    #[error("stripe did not answer in time")]
    Timeout,
    #[error("unexpected answer from stripe: {0}")]
    Decode(String),
}

impl StripeClientErr for StripeCallError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        StripeCallError::Decode(msg.to_string())
    }
}

/// What the outbox should do after a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Stripe already has this event (a repeated identifier): count it as sent.
    AlreadyDelivered,
    /// Try again later (no sooner than `after`, if Stripe said).
    Retry { after: Option<Duration> },
    /// Retrying cannot help: dead-letter it with the reason.
    Permanent,
}

impl StripeCallError {
    /// On the meter event stream: the session token was refused (401: expired, Stripe's
    /// `billing_meter_event_session_expired`, or unknown). Create a new session and send
    /// again; not a failure of the events.
    pub fn is_session_expired(&self) -> bool {
        matches!(self, StripeCallError::Api { status: 401, .. })
    }

    pub fn disposition(&self) -> Disposition {
        match self {
            StripeCallError::Network(_) | StripeCallError::Timeout | StripeCallError::Decode(_) => {
                Disposition::Retry { after: None }
            }
            StripeCallError::Api {
                status,
                code,
                message,
                should_retry,
                retry_after,
            } => {
                let exists = code.as_deref() == Some("resource_already_exists")
                    || message.contains("already exists with identifier");
                if *status == 400 && exists {
                    return Disposition::AlreadyDelivered;
                }
                let retry = Disposition::Retry {
                    after: *retry_after,
                };
                match should_retry {
                    Some(true) => retry,
                    Some(false) => Disposition::Permanent,
                    None if matches!(status, 409 | 424 | 429) || *status >= 500 => retry,
                    None => Disposition::Permanent,
                }
            }
        }
    }
}

/// A pooled HTTP client for Stripe's API at `base` (with a trailing slash).
#[derive(Clone)]
pub struct StripeHttp {
    http: reqwest::Client,
    base: String,
    secret: String,
    /// The meter event stream's host (`https://meter-events.stripe.com/`), with a trailing
    /// slash.
    stream_base: String,
}

/// Stripe's meter event stream host.
pub const DEFAULT_STREAM_BASE: &str = "https://meter-events.stripe.com/";

/// At most this many events per meter event stream request (Stripe's limit).
pub const STREAM_MAX_EVENTS: usize = 100;

/// A meter event session: a token for the meter event stream, valid until `expires_at_s`.
#[derive(Clone, PartialEq, Eq)]
pub struct MeterEventSession {
    pub token: String,
    /// `created`, in unix seconds.
    pub created_s: i64,
    /// `expires_at`, in unix seconds.
    pub expires_at_s: i64,
}

impl std::fmt::Debug for MeterEventSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MeterEventSession([redacted], {}..{})",
            self.created_s, self.expires_at_s
        )
    }
}

/// One event of a meter event stream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    pub event_name: String,
    pub identifier: String,
    pub customer: String,
    pub value: u64,
    pub timestamp_ms: i64,
}

impl std::fmt::Debug for StripeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StripeHttp({}, [redacted])", self.base)
    }
}

impl StripeHttp {
    pub fn new(base: &str, secret: &str, timeout: Duration) -> Result<StripeHttp, String> {
        let base = if base.ends_with('/') {
            base.to_owned()
        } else {
            format!("{base}/")
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(8)
            .user_agent(concat!("meterd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(StripeHttp {
            http,
            base,
            secret: secret.to_owned(),
            stream_base: DEFAULT_STREAM_BASE.to_owned(),
        })
    }

    /// The same client, sending meter event streams to `base` (a trailing slash is added).
    pub fn with_stream_base(mut self, base: &str) -> StripeHttp {
        self.stream_base = if base.ends_with('/') {
            base.to_owned()
        } else {
            format!("{base}/")
        };
        self
    }

    /// Creates a meter event session (`POST v2/billing/meter_event_session`, with the secret
    /// key): the token the meter event stream takes, valid about 15 minutes.
    pub async fn create_meter_event_session(&self) -> Result<MeterEventSession, StripeCallError> {
        let r = self
            .http
            .post(format!("{}v2/billing/meter_event_session", self.base))
            .bearer_auth(&self.secret)
            .header("Stripe-Version", stripe_shared::version::VERSION.as_str())
            .header("Content-Type", "application/json")
            .body("{}");
        let bytes = send(r).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            StripeCallError::Decode(format!("POST v2/billing/meter_event_session: {e}"))
        })?;
        let token = v["authentication_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                StripeCallError::Decode(
                    "the meter event session has no authentication_token".into(),
                )
            })?;
        let time = |k: &str| {
            v[k].as_str()
                .and_then(crate::billing::parse_rfc3339)
                .ok_or_else(|| {
                    StripeCallError::Decode(format!(
                        "the meter event session's `{k}` is not an RFC 3339 time"
                    ))
                })
        };
        Ok(MeterEventSession {
            token: token.to_owned(),
            created_s: time("created")?,
            expires_at_s: time("expires_at")?,
        })
    }

    /// Sends up to [`STREAM_MAX_EVENTS`] meter events in one request to the meter event stream
    /// (`POST v2/billing/meter_event_stream`, authenticated by a session token). Stripe
    /// answers 200 once it has accepted them (processing, and the identifier dedup, happen on
    /// its side); an expired session is a 401 that [`StripeCallError::is_session_expired`]
    /// recognises.
    pub async fn send_meter_event_stream(
        &self,
        token: &str,
        events: &[StreamEvent],
    ) -> Result<(), StripeCallError> {
        if events.is_empty() || events.len() > STREAM_MAX_EVENTS {
            return Err(StripeCallError::Decode(format!(
                "a meter event stream request carries 1 to {STREAM_MAX_EVENTS} events, not {}",
                events.len()
            )));
        }
        let events: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "event_name": e.event_name,
                    "identifier": e.identifier,
                    "payload": {
                        "stripe_customer_id": e.customer,
                        "value": e.value.to_string(),
                    },
                    "timestamp": crate::model::format_rfc3339(e.timestamp_ms),
                })
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "events": events }))
            .map_err(|e| StripeCallError::Decode(e.to_string()))?;
        let r = self
            .http
            .post(format!("{}v2/billing/meter_event_stream", self.stream_base))
            .bearer_auth(token)
            .header("Stripe-Version", stripe_shared::version::VERSION.as_str())
            .header("Content-Type", "application/json")
            .body(body);
        send(r).await.map(|_| ())
    }

    /// GETs `path` (relative to the API base: `v2/core/events/evt_…`, `v1/subscriptions/sub_…`)
    /// as untyped JSON: for endpoints async-stripe lacks (v2) and for objects meterd reads
    /// tolerantly (a field or type it does not know must never make an event unprocessable).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, StripeCallError> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.secret)
            .header("Stripe-Version", stripe_shared::version::VERSION.as_str());
        let bytes = send(r).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| StripeCallError::deserialize_err(format!("GET {path}: {e}")))
    }

    /// One page of the events Stripe failed to deliver, created at or after `since_s`, of
    /// `types`, newest first: `(events, has_more)`.
    pub async fn undelivered_events(
        &self,
        since_s: i64,
        types: &[&str],
        starting_after: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, bool), StripeCallError> {
        let mut q =
            format!("v1/events?created%5Bgte%5D={since_s}&delivery_success=false&limit=100");
        for t in types {
            q.push_str("&types%5B%5D=");
            q.push_str(t);
        }
        if let Some(a) = starting_after {
            q.push_str("&starting_after=");
            q.push_str(a);
        }
        let v = self.get_json(&q).await?;
        let data = v["data"].as_array().cloned().unwrap_or_default();
        Ok((data, v["has_more"].as_bool().unwrap_or(false)))
    }

    /// Sends a Billing Meter event. `identifier` is also the idempotency key. Success means
    /// Stripe answered 200 with a meter event echoing `identifier`.
    pub async fn send_meter_event(
        &self,
        event_name: &str,
        customer: &str,
        value: u64,
        timestamp_s: i64,
        identifier: &str,
    ) -> Result<(), StripeCallError> {
        use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
        let payload = std::collections::HashMap::from([
            ("stripe_customer_id".to_owned(), customer.to_owned()),
            ("value".to_owned(), value.to_string()),
        ]);
        let key = stripe_client_core::IdempotencyKey::new(identifier)
            .map_err(|e| StripeCallError::Decode(e.to_string()))?;
        let ev = CreateBillingMeterEvent::new(event_name, payload)
            .identifier(identifier)
            .timestamp(timestamp_s)
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(self)
            .await?;
        if ev.identifier != identifier {
            return Err(StripeCallError::Decode(format!(
                "the meter event echoes identifier `{}`, not `{identifier}`",
                ev.identifier
            )));
        }
        Ok(())
    }
}

impl StripeHttp {
    /// The `event_name`s of the account's active Billing Meters (first 100).
    pub async fn active_meter_event_names(&self) -> Result<Vec<String>, StripeCallError> {
        Ok(self
            .active_meters()
            .await?
            .into_iter()
            .map(|(_, name)| name)
            .collect())
    }

    /// The account's active Billing Meters (first 100): `(id, event_name)`.
    pub async fn active_meters(&self) -> Result<Vec<(String, String)>, StripeCallError> {
        use stripe_billing::BillingMeterStatus;
        use stripe_billing::billing_meter::ListBillingMeter;
        let list = ListBillingMeter::new()
            .status(BillingMeterStatus::Active)
            .limit(100)
            .send(self)
            .await?;
        Ok(list
            .data
            .into_iter()
            .map(|m| (m.id.to_string(), m.event_name))
            .collect())
    }

    /// What meterd needs to know about a price.
    pub async fn price(&self, id: &str) -> Result<PriceInfo, StripeCallError> {
        use stripe_product::price::RetrievePrice;
        let p = RetrievePrice::new(id).send(self).await?;
        let recurring = p.recurring.as_ref();
        Ok(PriceInfo {
            active: p.active,
            recurring: recurring.is_some(),
            metered: recurring
                .is_some_and(|r| r.usage_type == stripe_shared::RecurringUsageType::Metered),
            meter: recurring.and_then(|r| r.meter.clone()),
        })
    }
}

/// The mode of a Checkout Session meterd creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutMode {
    Subscription,
    Payment,
}

/// One line item of a Checkout Session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckoutLine {
    /// An existing Stripe price; no quantity for a metered price.
    Price {
        price: String,
        quantity: Option<u64>,
    },
    /// An inline one-time price (`price_data`).
    Inline {
        currency: String,
        unit_amount: i64,
        product_name: String,
        quantity: u64,
    },
}

/// A Checkout Session to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutRequest {
    pub mode: CheckoutMode,
    pub customer: String,
    pub client_reference_id: String,
    pub success_url: String,
    pub cancel_url: String,
    pub lines: Vec<CheckoutLine>,
    pub metadata: Vec<(String, String)>,
    /// `subscription_data[trial_period_days]` (subscription mode only).
    pub trial_period_days: Option<u32>,
    /// Sent as the `Idempotency-Key`.
    pub idempotency_key: String,
}

/// A created Checkout Session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutCreated {
    pub id: String,
    pub url: String,
}

fn idempotency_key(key: &str) -> Result<stripe_client_core::IdempotencyKey, StripeCallError> {
    stripe_client_core::IdempotencyKey::new(key).map_err(|e| StripeCallError::Decode(e.to_string()))
}

impl StripeHttp {
    /// Creates the Stripe customer of meterd account `account_id` (with
    /// `metadata[meterd_account_id]`) and returns its `cus_` id. The idempotency key
    /// `meterd-customer-{account_id}` makes repeated or concurrent calls create one customer.
    pub async fn create_customer(
        &self,
        account_id: &str,
        email: Option<&str>,
    ) -> Result<String, StripeCallError> {
        use stripe_core::customer::CreateCustomer;
        let key = idempotency_key(&format!("meterd-customer-{account_id}"))?;
        let metadata = std::collections::HashMap::from([(
            "meterd_account_id".to_owned(),
            account_id.to_owned(),
        )]);
        let mut req = CreateCustomer::new().metadata(metadata);
        if let Some(e) = email {
            req = req.email(e);
        }
        let c = req
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(self)
            .await?;
        Ok(c.id.as_str().to_owned())
    }

    /// Creates a Checkout Session; returns its id and URL.
    pub async fn create_checkout_session(
        &self,
        r: &CheckoutRequest,
    ) -> Result<CheckoutCreated, StripeCallError> {
        use stripe_checkout::CheckoutSessionMode;
        use stripe_checkout::checkout_session::{
            CreateCheckoutSession, CreateCheckoutSessionLineItems,
            CreateCheckoutSessionLineItemsPriceData, CreateCheckoutSessionSubscriptionData,
            ProductData,
        };
        let lines: Vec<CreateCheckoutSessionLineItems> = r
            .lines
            .iter()
            .map(|l| {
                let mut item = CreateCheckoutSessionLineItems::new();
                match l {
                    CheckoutLine::Price { price, quantity } => {
                        item.price = Some(price.clone());
                        item.quantity = *quantity;
                    }
                    CheckoutLine::Inline {
                        currency,
                        unit_amount,
                        product_name,
                        quantity,
                    } => {
                        item.price_data = Some(CreateCheckoutSessionLineItemsPriceData {
                            currency: currency.parse().unwrap_or_else(|e| match e {}),
                            product: None,
                            product_data: Some(ProductData::new(product_name.clone())),
                            recurring: None,
                            tax_behavior: None,
                            unit_amount: Some(*unit_amount),
                            unit_amount_decimal: None,
                        });
                        item.quantity = Some(*quantity);
                    }
                }
                item
            })
            .collect();
        let mut req = CreateCheckoutSession::new()
            .mode(match r.mode {
                CheckoutMode::Subscription => CheckoutSessionMode::Subscription,
                CheckoutMode::Payment => CheckoutSessionMode::Payment,
            })
            .customer(r.customer.clone())
            .client_reference_id(r.client_reference_id.clone())
            .success_url(r.success_url.clone())
            .cancel_url(r.cancel_url.clone())
            .line_items(lines)
            .metadata(
                r.metadata
                    .iter()
                    .cloned()
                    .collect::<std::collections::HashMap<_, _>>(),
            );
        if let Some(days) = r.trial_period_days {
            let mut sd = CreateCheckoutSessionSubscriptionData::new();
            sd.trial_period_days = Some(days);
            req = req.subscription_data(sd);
        }
        let s = req
            .customize()
            .request_strategy(RequestStrategy::Idempotent(idempotency_key(
                &r.idempotency_key,
            )?))
            .send(self)
            .await?;
        let url = s
            .url
            .ok_or_else(|| StripeCallError::Decode("the checkout session has no url".into()))?;
        Ok(CheckoutCreated {
            id: s.id.as_str().to_owned(),
            url,
        })
    }

    /// Creates a customer-portal session for `customer`; returns its URL.
    pub async fn create_portal_session(
        &self,
        customer: &str,
        return_url: Option<&str>,
    ) -> Result<String, StripeCallError> {
        use stripe_billing::billing_portal_session::CreateBillingPortalSession;
        let mut req = CreateBillingPortalSession::new().customer(customer);
        if let Some(u) = return_url {
            req = req.return_url(u);
        }
        Ok(req.send(self).await?.url)
    }
}

/// A price, as far as the start-up checks care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceInfo {
    pub active: bool,
    pub recurring: bool,
    /// `usage_type = metered`.
    pub metered: bool,
    /// The meter id a metered price bills.
    pub meter: Option<String>,
}

fn header_str<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

impl StripeClient for StripeHttp {
    type Err = StripeCallError;

    fn execute(
        &self,
        req: CustomizedStripeRequest,
    ) -> impl std::future::Future<Output = Result<Bytes, StripeCallError>> + Send {
        let (rb, over) = req.into_pieces();
        let mut url = format!("{}v1{}", self.base, rb.path);
        if let Some(q) = rb.query.as_deref().filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        let method = match rb.method {
            StripeMethod::Get => reqwest::Method::GET,
            StripeMethod::Post => reqwest::Method::POST,
            StripeMethod::Delete => reqwest::Method::DELETE,
        };
        let mut r = self
            .http
            .request(method, url)
            .bearer_auth(&self.secret)
            .header("Stripe-Version", stripe_shared::version::VERSION.as_str());
        if let Some(RequestStrategy::Idempotent(k)) = &over.request_strategy {
            r = r.header("Idempotency-Key", k.as_str());
        }
        if let Some(t) = over.timeout {
            r = r.timeout(t);
        }
        if let Some(body) = rb.body {
            r = r
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body);
        }
        send(r)
    }
}

/// Sends a request and maps Stripe's answer: the body of a 2xx, else a classified error.
async fn send(r: reqwest::RequestBuilder) -> Result<Bytes, StripeCallError> {
    let net = |e: reqwest::Error| {
        if e.is_timeout() {
            StripeCallError::Timeout
        } else {
            StripeCallError::Network(e.to_string())
        }
    };
    let resp = r.send().await.map_err(net)?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.map_err(net)?;
    if (200..300).contains(&status) {
        return Ok(bytes);
    }
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let err = &body["error"];
    Err(StripeCallError::Api {
        status,
        code: err["code"].as_str().map(str::to_owned),
        message: err["message"].as_str().unwrap_or("(no message)").to_owned(),
        should_retry: header_str(&headers, "stripe-should-retry").map(|v| v == "true"),
        retry_after: header_str(&headers, "retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: Option<&str>, message: &str, retry: Option<bool>) -> StripeCallError {
        StripeCallError::Api {
            status,
            code: code.map(str::to_owned),
            message: message.into(),
            should_retry: retry,
            retry_after: None,
        }
    }

    #[test]
    fn a_refused_session_token_is_recognised() {
        let expired = api(
            401,
            Some("billing_meter_event_session_expired"),
            "expired",
            None,
        );
        assert!(expired.is_session_expired());
        assert!(api(401, None, "unknown token", None).is_session_expired());
        assert!(!api(400, None, "bad", None).is_session_expired());
        assert!(!api(500, None, "boom", None).is_session_expired());
        assert!(!StripeCallError::Timeout.is_session_expired());
    }

    #[tokio::test]
    async fn a_stream_request_carries_1_to_100_events() {
        let c = StripeHttp::new("http://127.0.0.1:9/", "sk", Duration::from_secs(1))
            .unwrap()
            .with_stream_base("http://127.0.0.1:9");
        assert_eq!(c.stream_base, "http://127.0.0.1:9/");
        let ev = StreamEvent {
            event_name: "tokens".into(),
            identifier: "a:1".into(),
            customer: "cus_a".into(),
            value: 1,
            timestamp_ms: 0,
        };
        for n in [0, STREAM_MAX_EVENTS + 1] {
            let events = vec![ev.clone(); n];
            assert!(matches!(
                c.send_meter_event_stream("t", &events).await,
                Err(StripeCallError::Decode(_))
            ));
        }
    }

    #[test]
    fn errors_are_classified_for_the_outbox() {
        let dup = api(
            400,
            None,
            "An event already exists with identifier a:1.",
            Some(false),
        );
        assert_eq!(dup.disposition(), Disposition::AlreadyDelivered);
        assert_eq!(
            api(500, None, "boom", None).disposition(),
            Disposition::Retry { after: None }
        );
        assert_eq!(
            api(429, Some("rate_limit"), "slow down", None).disposition(),
            Disposition::Retry { after: None }
        );
        assert_eq!(
            api(400, Some("parameter_missing"), "x", None).disposition(),
            Disposition::Permanent
        );
        assert_eq!(
            api(404, None, "no such customer", None).disposition(),
            Disposition::Permanent
        );
        assert_eq!(
            api(401, None, "bad key", None).disposition(),
            Disposition::Permanent
        );
        // Stripe-Should-Retry wins over the status.
        assert_eq!(
            api(400, None, "x", Some(true)).disposition(),
            Disposition::Retry { after: None }
        );
        assert_eq!(
            api(503, None, "x", Some(false)).disposition(),
            Disposition::Permanent
        );
        assert_eq!(
            StripeCallError::Timeout.disposition(),
            Disposition::Retry { after: None }
        );
    }
}
