//! A fake Stripe API on 127.0.0.1:0 for integration tests.
//!
//! Every request is checked against Stripe's own OpenAPI spec (`tests/fixtures/stripe/
//! spec3.trimmed.json`, the paths meterd calls, their request schemas verbatim):
//! method and path, then the form body (POST) or the query (GET) with a small validator for the
//! schema features these operations use (object, properties, required, additionalProperties,
//! anyOf, array items, type, maxLength, enum). A failing request gets a Stripe-shaped 400 and is
//! recorded in [`FakeStripe::spec_violations`]. Answers are complete objects built from
//! `tests/fixtures/stripe/fixtures3.latest.json`, so a typed SDK can parse them.
//!
//! Stripe behaviour it copies: Bearer auth, meter-event `identifier` dedup for 24 h (400,
//! `Stripe-Should-Retry: false`), `Idempotency-Key` replay (same key and parameters: the saved
//! answer with `Idempotent-Replayed: true`; other parameters: 400 `idempotency_error`), and
//! injected failures that are not saved for replay. A Checkout line item's `price` must have
//! been added ([`FakeStripe::add_price`]); other references (`customer`) are not checked, and
//! meter-event timestamps are not range-checked.
//!
//! Billing meters: `GET /v1/billing/meters/{id}/event_summaries` sums the counted events of the
//! meter's event name and the customer over `[start_time, end_time)`, as one summary or, with
//! `value_grouping_window=hour` or `day` (`day` is newer than the spec, so the fake adds it to
//! the spec's enum), one per window, zero-sum windows included, newest first, paginated with
//! `limit` (1..=100, default 10) and `starting_after`/`ending_before` over ids derived from
//! (meter, customer, window), so they are the same on every call. Like Stripe it wants both
//! times aligned to the window (hour, UTC day) or, without one, to the minute, and `start_time <
//! end_time`: else a 400 naming the param, not a spec violation (the request is valid per the
//! schema). `POST /v1/billing/meter_event_adjustments` (`type=cancel`,
//! `cancel[identifier]`) cancels an accepted event of that event name within 24 h of its
//! acceptance (older, already cancelled: 400; unknown: 400 `resource_missing`); the event stays
//! in [`FakeStripe::meter_events`], marked cancelled, and no longer counts. Accepted events are
//! indexed by (event name, customer), so summaries stay cheap with many events.
//!
//! Drift for reconciliation tests: [`FakeStripe::lose_next_events`] answers the next events as
//! accepted (their identifiers deduplicated) but never counts them, as if Stripe's asynchronous
//! processing lost them ([`FakeStripe::lost_events`]); [`FakeStripe::inject_event`] adds an
//! event meterd never sent; [`FakeStripe::age_events`] moves the 24 h windows (dedup,
//! cancellation) forward; [`FakeStripe::summary_request_times`] tells when each summary request
//! arrived, to check a client's pacing.
//!
//! Objects the test registers are served as given: v1 events (`GET /v1/events`, newest first,
//! with the spec's filters and cursor pagination), subscriptions (`GET /v1/subscriptions/{id}`,
//! and the list by `customer` and `status`)
//! and v2 events (`GET /v2/core/events/{id}`; v2 is not in the spec, so that route is checked
//! by hand: Bearer auth, no query parameters, an optional well-formed `Stripe-Version`).
//!
//! The v2 meter event stream, checked by hand against the official SDK's shapes (stripe-python
//! 16.1.0, `stripe/v2/billing/_meter_event_stream_service.py`): `POST
//! /v2/billing/meter_event_session` (secret key) creates a session whose token lasts
//! [`FakeStripe::set_session_ttl`] (15 minutes by default); `POST
//! /v2/billing/meter_event_stream` (that token as Bearer, a JSON body `{"events": [...]}` of 1
//! to 100 events, each `{event_name, identifier?, payload: {string: string}, timestamp?
//! (RFC 3339)}`) records each event into the same list as v1, with the same 24 h identifier
//! dedup (a repeated identifier is dropped silently: the stream answers before it processes).
//! An unknown or expired token is a 401 `temporary_session_expired` /
//! `billing_meter_event_session_expired`; [`FakeStripe::expire_sessions`] expires all tokens.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// The only secret key the fake accepts (`Authorization: Bearer …`).
pub const SECRET_KEY: &str = "sk_test_fake_meterd";
/// The meter every fake starts with; its `event_name` is [`DEFAULT_EVENT_NAME`].
pub const DEFAULT_METER: &str = "mtr_test_tokens";
pub const DEFAULT_EVENT_NAME: &str = "tokens";
/// Stripe enforces meter-event identifier uniqueness "within a rolling 24 hour period".
const DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What an injected failure does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Answer with this status and a Stripe-shaped error (`api_error` for 5xx), with
    /// `Stripe-Should-Retry: true` for 409 and 5xx. The request is not processed.
    Status(u16),
    /// 429 with `Retry-After: retry_after_s` and code `rate_limit`. Not processed.
    RateLimited { retry_after_s: u64 },
    /// Wait this long, then process and answer normally. The request is processed even if the
    /// client gave up in the meantime (like a slow Stripe).
    Hang(Duration),
    /// Close the connection without answering. Not processed.
    Drop,
    /// Process the request (and save it for idempotent replay), then close the connection
    /// without answering: Stripe did it but the client never heard back.
    DropAfterProcessing,
}

/// The kind of a price added with [`FakeStripe::add_price`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceKind {
    /// Recurring monthly, licensed (per seat), 20.00 usd.
    Licensed,
    /// Recurring monthly, metered on the given meter id, 0.2 cents per unit.
    Metered(String),
    /// One-time, 50.00 usd.
    OneTime,
}

/// One request the fake received (idempotent replays are kept apart, see
/// [`FakeStripe::replays`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Decoded query and form pairs in the order sent, keys in bracket notation
    /// (`payload[value]`).
    pub params: Vec<(String, String)>,
    pub idempotency_key: Option<String>,
    /// The `Stripe-Version` header, if sent.
    pub stripe_version: Option<String>,
    /// The status answered; `None` when the connection was dropped.
    pub status: Option<u16>,
    /// When the request arrived.
    pub at: Instant,
}

/// A meter event Stripe accepted (deduplicated by identifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedEvent {
    pub identifier: String,
    pub event_name: String,
    /// `payload[stripe_customer_id]` ("" when absent).
    pub customer: String,
    /// `payload[value]` as sent ("" when absent).
    pub value: String,
    pub timestamp: i64,
    /// Cancelled by a meter event adjustment: still listed, no longer counted in summaries.
    pub cancelled: bool,
}

/// A running fake. Stops on [`FakeStripe::stop`] or when dropped.
pub struct FakeStripe {
    addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: watch::Sender<bool>,
    join: Option<JoinHandle<()>>,
}

impl FakeStripe {
    /// Binds 127.0.0.1:0 and serves until stopped. Loads the spec and fixtures first (panics
    /// with a clear message if they are missing).
    pub async fn start() -> FakeStripe {
        let _ = spec();
        let _ = fixture("billing.meter_event");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
        });
        inner.lock().meters.push(Meter {
            id: DEFAULT_METER.into(),
            event_name: DEFAULT_EVENT_NAME.into(),
        });
        let (shutdown, rx) = watch::channel(false);
        let join = tokio::spawn(accept_loop(listener, inner.clone(), rx));
        FakeStripe {
            addr,
            inner,
            shutdown,
            join: Some(join),
        }
    }

    /// `http://127.0.0.1:PORT/` (with the trailing slash the SDK needs).
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// Adds (or renames) a meter.
    pub fn add_meter(&self, id: &str, event_name: &str) {
        let mut st = self.inner.lock();
        st.meters.retain(|m| m.id != id);
        st.meters.push(Meter {
            id: id.into(),
            event_name: event_name.into(),
        });
    }

    pub fn add_price(&self, id: &str, kind: PriceKind) {
        let price = price_object(id, &kind);
        self.inner.lock().prices.insert(id.into(), price);
    }

    /// Customers the API creates from now on carry these top-level fields (over Stripe's own
    /// fixture): for answers shaped unlike the generated types expect.
    pub fn set_customer_shape(&self, fields: Value) {
        self.inner.lock().customer_shape = fields.as_object().cloned().unwrap_or_default();
    }

    /// A customer that exists without being created through the API.
    pub fn add_customer(&self, id: &str, email: Option<&str>) {
        let mut c = fixture("customer");
        c["id"] = json!(id);
        c["email"] = json!(email);
        c["created"] = json!(now_unix());
        let mut st = self.inner.lock();
        st.customers.retain(|(cid, _)| cid != id);
        st.customers.push((id.into(), c));
    }

    /// A v1 event (a full `event` envelope with a string `id` and an integer `created`) for
    /// `GET /v1/events`, whose webhooks all succeeded (`delivery_success=true`). Re-adding an id
    /// replaces the event in place.
    pub fn add_event(&self, event: Value) {
        self.inner.lock().put_event(event, true);
    }

    /// As [`FakeStripe::add_event`], for an event whose webhook delivery is still pending or
    /// failed: listed by `GET /v1/events?delivery_success=false`.
    pub fn add_event_undelivered(&self, event: Value) {
        self.inner.lock().put_event(event, false);
    }

    /// A v2 event (`object: v2.core.event`, string `id`) for `GET /v2/core/events/{id}`, e.g.
    /// `tests/fixtures/stripe/events/billing.meter.error_report_triggered.fetched.json`.
    pub fn add_v2_event(&self, event: Value) {
        let id = object_id(&event, "add_v2_event");
        self.inner.lock().v2_events.insert(id, event);
    }

    /// A subscription (string `id`) for `GET /v1/subscriptions/{id}` (and the list by
    /// customer), replacing one with the same id.
    pub fn put_subscription(&self, sub: Value) {
        let id = object_id(&sub, "put_subscription");
        self.inner.lock().subscriptions.insert(id, sub);
    }

    /// The next `n` requests fail.
    pub fn fail_next(&self, n: usize, failure: Failure) {
        self.push_rule(None, Some(n), None, failure);
    }

    /// The next `n` requests whose path starts with `path_prefix` fail.
    pub fn fail_next_on(&self, path_prefix: &str, n: usize, failure: Failure) {
        self.push_rule(Some(path_prefix), Some(n), None, failure);
    }

    /// Every request in the next `duration` fails.
    pub fn fail_for(&self, duration: Duration, failure: Failure) {
        self.push_rule(None, None, Some(Instant::now() + duration), failure);
    }

    /// Every request whose path starts with `path_prefix` in the next `duration` fails.
    pub fn fail_for_on(&self, path_prefix: &str, duration: Duration, failure: Failure) {
        self.push_rule(
            Some(path_prefix),
            None,
            Some(Instant::now() + duration),
            failure,
        );
    }

    /// Removes every pending injected failure.
    pub fn clear_failures(&self) {
        self.inner.lock().rules.clear();
    }

    fn push_rule(
        &self,
        prefix: Option<&str>,
        remaining: Option<usize>,
        until: Option<Instant>,
        failure: Failure,
    ) {
        self.inner.lock().rules.push(Rule {
            prefix: prefix.map(String::from),
            remaining,
            until,
            failure,
        });
    }

    /// Every request received, in order (replays excluded).
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().requests.clone()
    }

    /// Counts the requests this fake recorded, also after it stopped.
    pub fn request_counter(&self) -> impl Fn() -> usize + use<> {
        let inner = self.inner.clone();
        move || inner.lock().requests.len()
    }

    /// Requests answered from the idempotency cache.
    pub fn replays(&self) -> Vec<Recorded> {
        self.inner.lock().replays.clone()
    }

    /// How many requests (replays excluded) had exactly this path.
    pub fn count(&self, path: &str) -> usize {
        self.inner
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// How long the tokens of sessions created from now on last.
    pub fn set_session_ttl(&self, ttl: Duration) {
        self.inner.lock().session_ttl = Some(ttl);
    }

    /// Expires every meter event session token handed out so far.
    pub fn expire_sessions(&self) {
        self.inner.lock().sessions.clear();
    }

    /// The number of events of each meter event stream request answered 200, in order.
    pub fn stream_requests(&self) -> Vec<usize> {
        self.inner.lock().stream_requests.clone()
    }

    /// Accepted meter events, deduplicated, in arrival order, cancelled ones included (marked
    /// [`AcceptedEvent::cancelled`]); lost ones are in [`FakeStripe::lost_events`] instead.
    pub fn meter_events(&self) -> Vec<AcceptedEvent> {
        self.inner.lock().events.clone()
    }

    /// The identifiers cancelled by `POST /v1/billing/meter_event_adjustments`, in order.
    pub fn adjustments(&self) -> Vec<String> {
        self.inner.lock().adjustments.clone()
    }

    /// Drift: the next `n` meter events the fake would accept (v1 `POST
    /// /v1/billing/meter_events` and the v2 stream alike) are answered as accepted and their
    /// identifiers are taken for the 24 h dedup (a resend is refused as Stripe would), but they
    /// never count in summaries and cannot be cancelled: as if Stripe's asynchronous processing
    /// had lost them. They are listed by [`FakeStripe::lost_events`], not
    /// [`FakeStripe::meter_events`]. Adds to any still pending.
    pub fn lose_next_events(&self, n: usize) {
        self.inner.lock().lose_next += n;
    }

    /// The events lost to [`FakeStripe::lose_next_events`], in arrival order.
    pub fn lost_events(&self) -> Vec<AcceptedEvent> {
        self.inner.lock().lost.clone()
    }

    /// Drift healed late: the lost events now count in summaries (Stripe's processing was only
    /// late), as accepted now. Returns how many.
    pub fn restore_lost_events(&self) -> usize {
        let mut st = self.inner.lock();
        let now = st.clock();
        let lost = std::mem::take(&mut st.lost);
        let n = lost.len();
        for ev in lost {
            st.accept(ev, now, false);
        }
        n
    }

    /// Drift: an event Stripe accepted that meterd did not send, as if sent now (it counts in
    /// summaries, takes `identifier` for the dedup window and can be cancelled; never lost).
    /// Panics if `identifier` was accepted within the dedup window.
    pub fn inject_event(
        &self,
        identifier: &str,
        event_name: &str,
        customer: &str,
        value: u64,
        timestamp: i64,
    ) {
        let mut st = self.inner.lock();
        let now = st.clock();
        assert!(
            !st.seen(identifier, now),
            "fake Stripe: inject_event: identifier {identifier} was already accepted within 24 h"
        );
        st.accept(
            AcceptedEvent {
                identifier: identifier.into(),
                event_name: event_name.into(),
                customer: customer.into(),
                value: value.to_string(),
                timestamp,
                cancelled: false,
            },
            now,
            false,
        );
    }

    /// Ages every meter event accepted so far by `by`: the clock of the fake's 24 h windows
    /// (identifier dedup, cancellation) moves forward, so past 24 h an identifier may be sent
    /// again and an event can no longer be cancelled. Session tokens keep the real clock.
    pub fn age_events(&self, by: Duration) {
        self.inner.lock().skew += by;
    }

    /// When each `GET /v1/billing/meters/{id}/event_summaries` request arrived, in order
    /// (injected failures included): to check a client's pacing.
    pub fn summary_request_times(&self) -> Vec<Instant> {
        self.inner
            .lock()
            .requests
            .iter()
            .filter(|r| {
                r.method == "GET"
                    && r.path.starts_with("/v1/billing/meters/")
                    && r.path.ends_with("/event_summaries")
            })
            .map(|r| r.at)
            .collect()
    }

    /// Customers as stored (created through the API or added).
    pub fn customers(&self) -> Vec<Value> {
        self.inner
            .lock()
            .customers
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// One line per request the spec does not allow (unknown method or path, bad parameters).
    pub fn spec_violations(&self) -> Vec<String> {
        self.inner.lock().violations.clone()
    }

    /// Stops accepting and closes open connections.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(j) = self.join.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), j).await;
        }
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

// ---------------------------------------------------------------------------------------------
// Server

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            r = listener.accept() => {
                if let Ok((stream, _)) = r {
                    tokio::spawn(serve_conn(stream, inner.clone(), shutdown.clone()));
                }
            }
            _ = stop.changed() => break,
        }
    }
}

async fn serve_conn(
    stream: tokio::net::TcpStream,
    inner: Arc<Inner>,
    mut shutdown: watch::Receiver<bool>,
) {
    let kill = Arc::new(Notify::new());
    let svc = {
        let kill = kill.clone();
        service_fn(move |req: Request<Incoming>| {
            let inner = inner.clone();
            let kill = kill.clone();
            async move {
                // In its own task, so a hung request is still processed after the client left.
                match tokio::spawn(handle(inner, req)).await {
                    Ok(Outcome::Respond(r)) => Ok::<_, Infallible>(r),
                    _ => {
                        kill.notify_one();
                        std::future::pending().await
                    }
                }
            }
        })
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    // Dropping the connection future closes the socket without an answer.
    tokio::select! {
        _ = conn => {}
        _ = kill.notified() => {}
        _ = shutdown.changed() => {}
    }
}

enum Outcome {
    Respond(Response<Full<Bytes>>),
    Drop,
}

#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body,
            headers: Vec::new(),
        }
    }

    fn error(status: u16, kind: &str, message: &str) -> Reply {
        Reply {
            status,
            body: json!({"error": {"type": kind, "message": message}}),
            headers: Vec::new(),
        }
    }

    fn invalid(status: u16, message: &str, param: Option<&str>, code: Option<&str>) -> Reply {
        let mut r = Reply::error(status, "invalid_request_error", message);
        if let Some(p) = param {
            r.body["error"]["param"] = json!(p);
        }
        if let Some(c) = code {
            r.body["error"]["code"] = json!(c);
            r.body["error"]["doc_url"] = json!(format!(
                "https://stripe.com/docs/error-codes/{}",
                c.replace('_', "-")
            ));
        }
        r
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    fn into_response(self, request_id: u64, idem: Option<&str>) -> Response<Full<Bytes>> {
        let body = serde_json::to_vec_pretty(&self.body).unwrap_or_default();
        let mut b = Response::builder()
            .status(StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json")
            .header("request-id", format!("req_fake_{request_id}"));
        if let Some(k) = idem {
            b = b.header("idempotency-key", k);
        }
        for (k, v) in self.headers {
            b = b.header(k, v);
        }
        b.body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Outcome {
    let at = Instant::now();
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let headers = req.headers().clone();
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Outcome::Drop;
    };
    let idem = header(&headers, "idempotency-key");
    let version = header(&headers, "stripe-version");
    let parsed = parse_params(&method, &query, &body);
    let mut rec = Recorded {
        method: method.clone(),
        path: path.clone(),
        params: parsed.clone().unwrap_or_default(),
        idempotency_key: idem.clone(),
        stripe_version: version.clone(),
        status: None,
        at,
    };

    let failure = inner.lock().take_failure(&path);
    let mut drop_after = false;
    match failure {
        Some(Failure::Drop) => {
            inner.lock().requests.push(rec);
            return Outcome::Drop;
        }
        Some(Failure::Status(code)) => {
            let retry = code == 409 || code >= 500;
            let kind = if code >= 500 {
                "api_error"
            } else {
                "invalid_request_error"
            };
            let msg = format!(
                "An unknown error occurred while processing this request (fake Stripe: injected {code})."
            );
            let reply = Reply::error(code, kind, &msg)
                .header("stripe-should-retry", if retry { "true" } else { "false" });
            return inner.respond(rec, reply, idem.as_deref());
        }
        Some(Failure::RateLimited { retry_after_s }) => {
            let reply = Reply::invalid(
                429,
                "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
                None,
                Some("rate_limit"),
            )
            .header("retry-after", retry_after_s.to_string());
            return inner.respond(rec, reply, idem.as_deref());
        }
        Some(Failure::Hang(d)) => tokio::time::sleep(d).await,
        Some(Failure::DropAfterProcessing) => drop_after = true,
        None => {}
    }

    let (reply, replayed) = if path.starts_with("/v2/billing/meter_event_") {
        (
            inner.lock().meter_event_v2(&method, &path, &body, &headers),
            false,
        )
    } else {
        inner.lock().process(&method, &path, parsed, &headers)
    };
    if drop_after {
        rec.status = None;
        let mut st = inner.lock();
        if replayed {
            st.replays.push(rec);
        } else {
            st.requests.push(rec);
        }
        return Outcome::Drop;
    }
    rec.status = Some(reply.status);
    let id = {
        let mut st = inner.lock();
        if replayed {
            st.replays.push(rec);
        } else {
            st.requests.push(rec);
        }
        st.next_id()
    };
    let reply = if replayed {
        reply.header("idempotent-replayed", "true")
    } else {
        reply
    };
    Outcome::Respond(reply.into_response(id, idem.as_deref()))
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// Query pairs, then (for POST) form-body pairs.
fn parse_params(method: &str, query: &str, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut pairs = parse_pairs(query)?;
    if method == "POST" {
        let text = std::str::from_utf8(body).map_err(|_| "The body is not UTF-8.".to_string())?;
        pairs.extend(parse_pairs(text)?);
    }
    Ok(pairs)
}

fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => return Err(format!("Invalid percent-encoding in `{s}`.")),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` does not decode to UTF-8."))
}

// ---------------------------------------------------------------------------------------------
// State

struct Inner {
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn respond(&self, mut rec: Recorded, reply: Reply, idem: Option<&str>) -> Outcome {
        rec.status = Some(reply.status);
        let id = {
            let mut st = self.lock();
            st.requests.push(rec);
            st.next_id()
        };
        Outcome::Respond(reply.into_response(id, idem))
    }
}

struct Meter {
    id: String,
    event_name: String,
}

struct Rule {
    prefix: Option<String>,
    remaining: Option<usize>,
    until: Option<Instant>,
    failure: Failure,
}

struct Cached {
    method: String,
    path: String,
    params: Vec<(String, String)>,
    reply: Reply,
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    replays: Vec<Recorded>,
    violations: Vec<String>,
    events: Vec<AcceptedEvent>,
    /// When each of `events` was accepted, on the fake's clock ([`State::clock`]).
    accepted_at: Vec<Instant>,
    /// The events that count in summaries (accepted, not cancelled), by (event name,
    /// customer), sorted by (timestamp, index in `events`): a summary window is a slice.
    usage: HashMap<(String, String), Vec<Usage>>,
    /// Identifier → index in `events` of the latest event accepted with it.
    by_identifier: HashMap<String, usize>,
    /// Events answered as accepted but lost ([`FakeStripe::lose_next_events`]).
    lost: Vec<AcceptedEvent>,
    /// How many of the next accepted events are lost.
    lose_next: usize,
    /// Identifiers cancelled by meter event adjustments, in order.
    adjustments: Vec<String>,
    /// How far the fake's clock for its 24 h windows runs ahead of the real one
    /// ([`FakeStripe::age_events`]).
    skew: Duration,
    identifiers: HashMap<String, Instant>,
    /// When `identifiers` was last swept of entries past the dedup window (at most once a
    /// second: a sweep per event made a long run quadratic).
    identifiers_swept: Option<Instant>,
    idempotency: HashMap<String, Cached>,
    meters: Vec<Meter>,
    prices: HashMap<String, Value>,
    customers: Vec<(String, Value)>,
    /// Top-level fields set on every customer the API creates ([`FakeStripe::set_customer_shape`]).
    customer_shape: Map<String, Value>,
    /// v1 events for `GET /v1/events`, in the order added.
    v1_events: Vec<StoredEvent>,
    v2_events: HashMap<String, Value>,
    subscriptions: HashMap<String, Value>,
    rules: Vec<Rule>,
    counter: u64,
    /// Meter event session token → when it expires.
    sessions: HashMap<String, Instant>,
    /// Lifetime of new sessions (default 15 minutes).
    session_ttl: Option<Duration>,
    /// Events per accepted stream request.
    stream_requests: Vec<usize>,
}

/// One counted meter event in [`State::usage`].
#[derive(Clone, Copy)]
struct Usage {
    timestamp: i64,
    /// `payload[value]` as a number (0 when it is not a finite one).
    value: f64,
    /// Index in `State::events`.
    event: usize,
}

impl Usage {
    fn key(&self) -> (i64, usize) {
        (self.timestamp, self.event)
    }
}

struct StoredEvent {
    id: String,
    created: i64,
    /// Order of addition: among events created in the same second, the later one is newer.
    seq: u64,
    delivered: bool,
    event: Value,
}

impl StoredEvent {
    /// Newest first: larger keys come first in a list.
    fn key(&self) -> (i64, u64) {
        (self.created, self.seq)
    }
}

type Params = Vec<(String, Node)>;

impl State {
    /// Forgets identifiers past the dedup window; an identifier's own age is checked on
    /// lookup too, so sweeping only once a second changes no answer.
    fn sweep_identifiers(&mut self, now: Instant) {
        if self
            .identifiers_swept
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.identifiers
                .retain(|_, seen| now.duration_since(*seen) < DEDUP_WINDOW);
            self.identifiers_swept = Some(now);
        }
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// Now on the clock of the 24 h windows (identifier dedup, cancellation): the real clock
    /// moved forward by [`FakeStripe::age_events`].
    fn clock(&self) -> Instant {
        Instant::now() + self.skew
    }

    /// Whether `identifier` was accepted within the dedup window before `now`.
    fn seen(&self, identifier: &str, now: Instant) -> bool {
        self.identifiers
            .get(identifier)
            .is_some_and(|seen| now.duration_since(*seen) < DEDUP_WINDOW)
    }

    /// Records an accepted event (its identifier is taken for the dedup window), the one place
    /// `events` grows. `may_be_lost`: sent by a client, so [`FakeStripe::lose_next_events`]
    /// applies.
    fn accept(&mut self, ev: AcceptedEvent, now: Instant, may_be_lost: bool) {
        self.identifiers.insert(ev.identifier.clone(), now);
        if may_be_lost && self.lose_next > 0 {
            self.lose_next -= 1;
            self.lost.push(ev);
            return;
        }
        let index = self.events.len();
        let u = Usage {
            timestamp: ev.timestamp,
            value: ev
                .value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .unwrap_or(0.0),
            event: index,
        };
        let list = self
            .usage
            .entry((ev.event_name.clone(), ev.customer.clone()))
            .or_default();
        let at = list.partition_point(|x| x.key() < u.key());
        list.insert(at, u);
        self.by_identifier.insert(ev.identifier.clone(), index);
        self.accepted_at.push(now);
        self.events.push(ev);
    }

    /// Marks `events[index]` cancelled and takes it out of `usage`, the one place an event
    /// stops counting.
    fn cancel(&mut self, index: usize) {
        let ev = &mut self.events[index];
        ev.cancelled = true;
        let key = (ev.timestamp, index);
        if let Some(list) = self
            .usage
            .get_mut(&(ev.event_name.clone(), ev.customer.clone()))
        {
            let at = list.partition_point(|x| x.key() < key);
            if list.get(at).is_some_and(|u| u.key() == key) {
                list.remove(at);
            }
        }
    }

    fn take_failure(&mut self, path: &str) -> Option<Failure> {
        let now = Instant::now();
        self.rules
            .retain(|r| r.remaining != Some(0) && r.until.is_none_or(|u| now < u));
        let rule = self
            .rules
            .iter_mut()
            .find(|r| r.prefix.as_deref().is_none_or(|p| path.starts_with(p)))?;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        Some(rule.failure.clone())
    }

    fn violation(&mut self, method: &str, path: &str, reply: Reply) -> Reply {
        let e = &reply.body["error"];
        let param = e["param"]
            .as_str()
            .map(|p| format!(" (param {p})"))
            .unwrap_or_default();
        self.violations.push(format!(
            "{method} {path}: {}{param}",
            e["message"].as_str().unwrap_or("")
        ));
        reply
    }

    /// Auth, parsing, spec validation, idempotency, then the endpoint. Returns the reply and
    /// whether it is an idempotent replay.
    fn process(
        &mut self,
        method: &str,
        path: &str,
        parsed: Result<Vec<(String, String)>, String>,
        headers: &HeaderMap,
    ) -> (Reply, bool) {
        let content_type = header(headers, "content-type");
        let content_type = content_type.as_deref();
        let auth = header(headers, "authorization");
        let idem = header(headers, "idempotency-key");
        let idem = idem.as_deref();
        let version = header(headers, "stripe-version");
        let version = version.as_deref();
        match auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")) {
            Some(SECRET_KEY) => {}
            None => {
                let msg = "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.";
                return (Reply::invalid(401, msg, None, None), false);
            }
            Some(other) => {
                let shown: String = other.chars().take(8).collect();
                let msg = format!("Invalid API Key provided: {shown}****");
                return (Reply::invalid(401, &msg, None, None), false);
            }
        }
        let unrecognized = format!(
            "Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/."
        );
        if path.starts_with("/v2/") {
            return (self.v2(method, path, parsed, version, &unrecognized), false);
        }
        let (template, op, path_params) = match match_operation(method, path) {
            Ok(found) => found,
            Err(why) => {
                self.violations.push(format!("{method} {path}: {why}"));
                return (Reply::invalid(404, &unrecognized, None, None), false);
            }
        };
        let pairs = match parsed {
            Ok(p) => p,
            Err(msg) => {
                let r = Reply::invalid(400, &msg, None, None);
                return (self.violation(method, path, r), false);
            }
        };
        if method == "POST"
            && !pairs.is_empty()
            && !content_type.is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
        {
            let msg = format!(
                "Invalid request: the body must be application/x-www-form-urlencoded, not {}.",
                content_type.unwrap_or("(none)")
            );
            let r = Reply::invalid(400, &msg, None, None);
            return (self.violation(method, path, r), false);
        }
        let tree = match build_tree(&pairs).and_then(|t| {
            validate_operation(method, op, &t, &path_params)?;
            Ok(t)
        }) {
            Ok(t) => t,
            Err(e) => {
                let r = Reply::invalid(400, &e.message, e.param.as_deref(), None);
                return (self.violation(method, path, r), false);
            }
        };

        let idem = idem.filter(|_| method == "POST");
        if let Some(key) = idem
            && let Some(c) = self.idempotency.get(key)
        {
            let mut sorted = pairs.clone();
            sorted.sort();
            if c.method == method && c.path == path && c.params == sorted {
                return (c.reply.clone(), true);
            }
            let msg = format!(
                "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
            );
            return (Reply::error(400, "idempotency_error", &msg), false);
        }

        let p = |name: &str| {
            path_params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        let reply = match (method, template.as_str()) {
            ("POST", "/v1/billing/meter_events") => self.create_meter_event(&tree),
            ("GET", "/v1/billing/meters") => self.list_meters(&tree),
            ("GET", "/v1/billing/meters/{id}") => self.get_meter(p("id")),
            ("GET", "/v1/billing/meters/{id}/event_summaries") => {
                self.event_summaries(method, path, p("id"), &tree)
            }
            ("POST", "/v1/billing/meter_event_adjustments") => {
                self.create_adjustment(method, path, &tree)
            }
            ("POST", "/v1/customers") => self.create_customer(&tree),
            ("GET", "/v1/customers/{customer}") => self.get_customer(p("customer")),
            ("POST", "/v1/checkout/sessions") => self.create_checkout_session(&tree),
            ("POST", "/v1/billing_portal/sessions") => self.create_portal_session(&tree),
            ("GET", "/v1/prices/{price}") => self.get_price(p("price")),
            ("GET", "/v1/events") => self.list_events(method, path, &tree),
            ("GET", "/v1/subscriptions") => self.list_subscriptions(&tree),
            ("GET", "/v1/subscriptions/{subscription_exposed_id}") => {
                self.get_subscription(p("subscription_exposed_id"))
            }
            _ => Reply::invalid(404, &unrecognized, None, None),
        };
        if let Some(key) = idem {
            let mut sorted = pairs;
            sorted.sort();
            self.idempotency.insert(
                key.to_string(),
                Cached {
                    method: method.into(),
                    path: path.into(),
                    params: sorted,
                    reply: reply.clone(),
                },
            );
        }
        (reply, false)
    }

    // ----- endpoints -------------------------------------------------------------------------

    fn create_meter_event(&mut self, t: &Params) -> Reply {
        let now = now_unix();
        let event_name = leaf(t, "event_name").unwrap_or("").to_string();
        let identifier = match leaf(t, "identifier") {
            Some(i) => i.to_string(),
            None => format!("fake_mev_{}_{:016x}", self.next_id(), rand::random::<u64>()),
        };
        let payload = get(t, "payload").map(to_json).unwrap_or_else(|| json!({}));
        let payload = if payload.is_object() {
            payload
        } else {
            json!({})
        };
        let timestamp = leaf(t, "timestamp")
            .and_then(|s| s.parse().ok())
            .unwrap_or(now);

        let at = self.clock();
        self.sweep_identifiers(at);
        if self.seen(&identifier, at) {
            let msg = format!("An event already exists with identifier {identifier}.");
            return Reply::invalid(
                400,
                &msg,
                Some("identifier"),
                Some("resource_already_exists"),
            )
            .header("stripe-should-retry", "false");
        }
        let field = |k: &str| payload[k].as_str().unwrap_or("").to_string();
        let accepted = AcceptedEvent {
            identifier: identifier.clone(),
            event_name: event_name.clone(),
            customer: field("stripe_customer_id"),
            value: field("value"),
            timestamp,
            cancelled: false,
        };
        self.accept(accepted, at, true);

        let mut ev = fixture("billing.meter_event");
        ev["created"] = json!(now);
        ev["event_name"] = json!(event_name);
        ev["identifier"] = json!(identifier);
        ev["livemode"] = json!(false);
        ev["payload"] = payload;
        ev["timestamp"] = json!(timestamp);
        Reply::ok(ev)
    }

    fn meter_object(m: &Meter) -> Value {
        let mut o = fixture("billing.meter");
        o["id"] = json!(m.id);
        o["event_name"] = json!(m.event_name);
        o["display_name"] = json!(m.event_name);
        o["livemode"] = json!(false);
        o["status"] = json!("active");
        o["customer_mapping"] = json!({"event_payload_key": "stripe_customer_id", "type": "by_id"});
        o["value_settings"] = json!({"event_payload_key": "value"});
        o["default_aggregation"] = json!({"formula": "sum"});
        o
    }

    fn list_meters(&self, t: &Params) -> Reply {
        let status = leaf(t, "status");
        let limit = leaf(t, "limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(10);
        let all: Vec<Value> = self
            .meters
            .iter()
            .filter(|_| status.is_none_or(|s| s == "active"))
            .map(Self::meter_object)
            .collect();
        let has_more = all.len() > limit;
        let data: Vec<Value> = all.into_iter().take(limit).collect();
        Reply::ok(list(data, has_more, "/v1/billing/meters"))
    }

    fn get_meter(&self, id: &str) -> Reply {
        match self.meters.iter().find(|m| m.id == id) {
            Some(m) => Reply::ok(Self::meter_object(m)),
            None => missing("billing meter", id),
        }
    }

    /// `GET /v1/billing/meters/{id}/event_summaries`. Like Stripe: `start_time` and `end_time`
    /// aligned to the window (hour, UTC day) or, without `value_grouping_window`, to the minute,
    /// and `start_time < end_time`, else a 400 naming the param (the request is valid per the
    /// spec, so not a violation). Without a window, one summary for the range; with one, every
    /// window of the range, those summing to 0 too. Newest window first, cursor-paginated
    /// (ids derived from meter, customer and window, so they are the same on every call). The
    /// prose rules of the spec (limit 1..=100, one cursor) count as spec violations.
    fn event_summaries(&mut self, method: &str, path: &str, id: &str, t: &Params) -> Reply {
        let Some(meter) = self.meters.iter().find(|m| m.id == id) else {
            return missing("billing meter", id);
        };
        let (meter_id, event_name) = (meter.id.clone(), meter.event_name.clone());
        let bad = |msg: &str, param: &str| Reply::invalid(400, msg, Some(param), None);
        let limit = match leaf(t, "limit").map(str::parse::<i64>) {
            None => 10,
            Some(Ok(n)) if (1..=100).contains(&n) => n,
            Some(_) => {
                let r = bad(
                    "Invalid limit: must be an integer between 1 and 100",
                    "limit",
                );
                return self.violation(method, path, r);
            }
        };
        let after = leaf(t, "starting_after");
        let before = leaf(t, "ending_before");
        if after.is_some() && before.is_some() {
            let r = bad(
                "You may only specify one of these parameters: starting_after, ending_before.",
                "ending_before",
            );
            return self.violation(method, path, r);
        }
        let customer = leaf(t, "customer").unwrap_or("");
        let int = |k: &str| leaf(t, k).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        let (start, end) = (int("start_time"), int("end_time"));
        let (window, unit) = match leaf(t, "value_grouping_window") {
            Some("hour") => (Some(3600), "hour"),
            Some("day") => (Some(86_400), "day (00:00 UTC)"),
            _ => (None, "minute"),
        };
        let align = window.unwrap_or(60);
        for (param, v) in [("start_time", start), ("end_time", end)] {
            if v.rem_euclid(align) != 0 {
                let msg = format!("Invalid {param}: {v} must be aligned to {unit} boundaries.");
                return bad(&msg, param);
            }
        }
        if start >= end {
            let msg = format!("start_time ({start}) must be before end_time ({end}).");
            return bad(&msg, "start_time");
        }

        // Window k (0 = newest) of n.
        let n = window.map_or(1, |w| (end - start) / w);
        let bounds = |k: i64| match window {
            Some(w) => (end - (k + 1) * w, end - k * w),
            None => (start, end),
        };
        let seed = summary_seed(&meter_id, customer);
        let cursor = |cid: &str| {
            let hash = cid
                .strip_prefix(SUMMARY_ID_PREFIX)
                .and_then(|h| u64::from_str_radix(h, 16).ok())?;
            (0..n).find(|&k| summary_hash(seed, bounds(k)) == hash)
        };
        let (first, last, has_more) = match (after, before) {
            (Some(cid), _) => match cursor(cid) {
                Some(k) => {
                    let rest = n - (k + 1);
                    (k + 1, k + 1 + rest.min(limit), rest > limit)
                }
                None => {
                    return cursor_missing("billing meter event summary", cid, "starting_after");
                }
            },
            (_, Some(cid)) => match cursor(cid) {
                Some(k) => ((k - limit).max(0), k, k > limit),
                None => return cursor_missing("billing meter event summary", cid, "ending_before"),
            },
            _ => (0, n.min(limit), n > limit),
        };
        let counted = self
            .usage
            .get(&(event_name, customer.to_string()))
            .map_or(&[][..], Vec::as_slice);
        let data: Vec<Value> = (first..last)
            .map(|k| {
                let (s, e) = bounds(k);
                let from = counted.partition_point(|u| u.timestamp < s);
                let to = counted.partition_point(|u| u.timestamp < e);
                let mut o = fixture("billing.meter_event_summary");
                o["id"] = json!(summary_id(seed, (s, e)));
                o["aggregated_value"] = json!(sum_values(&counted[from..to]));
                o["start_time"] = json!(s);
                o["end_time"] = json!(e);
                o["livemode"] = json!(false);
                o["meter"] = json!(meter_id);
                o
            })
            .collect();
        Reply::ok(list(
            data,
            has_more,
            &format!("/v1/billing/meters/{meter_id}/event_summaries"),
        ))
    }

    /// `POST /v1/billing/meter_event_adjustments` (`type=cancel`, the only type): cancels the
    /// accepted event with `event_name` and `cancel[identifier]`, as Stripe does only within
    /// 24 h of receiving it. An unknown identifier (or one of another event name, or a lost
    /// event) is a 400 `resource_missing`; a cancelled or older event a plain 400; a missing
    /// `cancel[identifier]` (required in prose only) a 400 that counts as a spec violation.
    fn create_adjustment(&mut self, method: &str, path: &str, t: &Params) -> Reply {
        let param = "cancel[identifier]";
        let event_name = leaf(t, "event_name").unwrap_or("").to_string();
        let identifier = match get(t, "cancel") {
            Some(Node::Map(c)) => leaf(c, "identifier").unwrap_or(""),
            _ => "",
        }
        .to_string();
        if identifier.is_empty() {
            let msg = format!("Missing required param: {param}.");
            let r = Reply::invalid(400, &msg, Some(param), None);
            return self.violation(method, path, r);
        }
        let Some(&index) = self
            .by_identifier
            .get(&identifier)
            .filter(|&&i| self.events[i].event_name == event_name)
        else {
            let msg =
                format!("No such billing meter event: '{identifier}' (event_name {event_name})");
            return Reply::invalid(400, &msg, Some(param), Some("resource_missing"));
        };
        if self.events[index].cancelled {
            let msg = format!("The meter event '{identifier}' has already been cancelled.");
            return Reply::invalid(400, &msg, Some(param), None);
        }
        if self.clock().duration_since(self.accepted_at[index]) >= DEDUP_WINDOW {
            let msg = format!(
                "The meter event '{identifier}' cannot be cancelled: events can only be cancelled within 24 hours of Stripe receiving them."
            );
            return Reply::invalid(400, &msg, Some(param), None);
        }
        self.cancel(index);
        self.adjustments.push(identifier.clone());
        let mut a = fixture("billing.meter_event_adjustment");
        a["event_name"] = json!(event_name);
        a["type"] = json!("cancel");
        a["cancel"] = json!({"identifier": identifier});
        a["status"] = json!("pending");
        a["livemode"] = json!(false);
        Reply::ok(a)
    }

    fn create_customer(&mut self, t: &Params) -> Reply {
        let n = self
            .customers
            .iter()
            .filter(|(id, _)| id.starts_with("cus_test_"))
            .count()
            + 1;
        let id = format!("cus_test_{n}");
        let mut c = fixture("customer");
        c["id"] = json!(id);
        c["created"] = json!(now_unix());
        for (k, v) in &self.customer_shape {
            c[k.as_str()] = v.clone();
        }
        for k in ["email", "name", "description", "phone"] {
            if let Some(v) = leaf(t, k).filter(|v| !v.is_empty()) {
                c[k] = json!(v);
            }
        }
        c["metadata"] = metadata(t);
        self.customers.push((id, c.clone()));
        Reply::ok(c)
    }

    fn get_customer(&self, id: &str) -> Reply {
        match self.customers.iter().find(|(cid, _)| cid == id) {
            Some((_, c)) => Reply::ok(c.clone()),
            None => missing("customer", id),
        }
    }

    fn create_checkout_session(&mut self, t: &Params) -> Reply {
        // Like Stripe: a line item's price must exist (400 resource_missing naming it).
        if let Some(Node::Map(items)) = get(t, "line_items") {
            for (i, item) in items {
                if let Node::Map(fields) = item
                    && let Some(price) = leaf(fields, "price")
                    && !self.prices.contains_key(price)
                {
                    return Reply::invalid(
                        400,
                        &format!("No such price: '{price}'"),
                        Some(&format!("line_items[{i}][price]")),
                        Some("resource_missing"),
                    );
                }
            }
        }
        let now = now_unix();
        let id = format!("cs_test_fake{}", self.next_id());
        let mode = leaf(t, "mode").unwrap_or("payment");
        let mut s = fixture("checkout.session");
        s["id"] = json!(id);
        s["created"] = json!(now);
        s["expires_at"] = json!(now + 86_400);
        s["livemode"] = json!(false);
        s["mode"] = json!(mode);
        s["status"] = json!("open");
        s["payment_status"] = json!("unpaid");
        s["payment_intent"] = Value::Null;
        s["shipping_cost"] = Value::Null;
        s["url"] = json!(format!("https://checkout.stripe.com/c/pay/{id}"));
        for k in [
            "customer",
            "customer_email",
            "client_reference_id",
            "success_url",
            "cancel_url",
        ] {
            s[k] = leaf(t, k).map_or(Value::Null, |v| json!(v));
        }
        s["metadata"] = metadata(t);
        Reply::ok(s)
    }

    fn create_portal_session(&mut self, t: &Params) -> Reply {
        let id = format!("bps_test_fake{}", self.next_id());
        let mut s = fixture("billing_portal.session");
        s["id"] = json!(id);
        s["created"] = json!(now_unix());
        s["livemode"] = json!(false);
        s["customer"] = json!(leaf(t, "customer").unwrap_or(""));
        s["return_url"] = leaf(t, "return_url").map_or(Value::Null, |v| json!(v));
        s["configuration"] = json!(leaf(t, "configuration").unwrap_or("bpc_test_default"));
        s["flow"] = Value::Null;
        s["url"] = json!(format!("https://billing.stripe.com/p/session/test_{id}"));
        Reply::ok(s)
    }

    fn get_price(&self, id: &str) -> Reply {
        match self.prices.get(id) {
            Some(p) => Reply::ok(p.clone()),
            None => missing("price", id),
        }
    }

    fn get_subscription(&self, id: &str) -> Reply {
        match self.subscriptions.get(id) {
            Some(s) => Reply::ok(s.clone()),
            None => missing("subscription", id),
        }
    }

    /// `GET /v1/subscriptions`: by `customer`, `status` (`all` or one status; default: all but
    /// `canceled`), newest first, at most `limit` (no paging: a test customer has a few).
    fn list_subscriptions(&self, t: &Params) -> Reply {
        let customer = leaf(t, "customer");
        let status = leaf(t, "status");
        let limit = leaf(t, "limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(10);
        let mut subs: Vec<Value> = self
            .subscriptions
            .values()
            .filter(|s| customer.is_none_or(|c| s["customer"].as_str() == Some(c)))
            .filter(|s| match status {
                Some("all") => true,
                Some(st) => s["status"].as_str() == Some(st),
                None => s["status"].as_str() != Some("canceled"),
            })
            .cloned()
            .collect();
        subs.sort_by_key(|s| std::cmp::Reverse(s["created"].as_i64().unwrap_or(0)));
        let has_more = subs.len() > limit;
        subs.truncate(limit);
        Reply::ok(list(subs, has_more, "/v1/subscriptions"))
    }

    fn put_event(&mut self, event: Value, delivered: bool) {
        let id = object_id(&event, "add_event");
        let created = event["created"].as_i64().unwrap_or_else(|| {
            panic!("fake Stripe: add_event needs an integer `created` (event {id})")
        });
        if let Some(e) = self.v1_events.iter_mut().find(|e| e.id == id) {
            e.created = created;
            e.delivered = delivered;
            e.event = event;
            return;
        }
        let seq = self.next_id();
        self.v1_events.push(StoredEvent {
            id,
            created,
            seq,
            delivered,
            event,
        });
    }

    /// `GET /v1/events`. The query already passed the spec's schemas; the rules the spec only
    /// states in prose (limit 1..=100, `type` or `types` but not both, at most 20 `types`, one
    /// cursor) are checked here and count as spec violations too.
    fn list_events(&mut self, method: &str, path: &str, t: &Params) -> Reply {
        let bad = |msg: &str, param: &str| Reply::invalid(400, msg, Some(param), None);
        let limit = match leaf(t, "limit").map(str::parse::<usize>) {
            None => 10,
            Some(Ok(n)) if (1..=100).contains(&n) => n,
            Some(_) => {
                let r = bad(
                    "Invalid limit: must be an integer between 1 and 100",
                    "limit",
                );
                return self.violation(method, path, r);
            }
        };
        let types: Option<Vec<String>> = match get(t, "types") {
            Some(Node::Map(items)) => Some(
                items
                    .iter()
                    .filter_map(|(_, n)| match n {
                        Node::Leaf(v) => Some(v.clone()),
                        Node::Map(_) => None,
                    })
                    .collect(),
            ),
            Some(Node::Leaf(_)) | None => None,
        };
        let single = leaf(t, "type");
        if types.is_some() && single.is_some() {
            let r = bad(
                "You may pass either `type` or `types`, but not both.",
                "types",
            );
            return self.violation(method, path, r);
        }
        if types.as_ref().is_some_and(|ts| ts.len() > 20) {
            let r = bad(
                "Invalid types: must contain at most 20 event types",
                "types",
            );
            return self.violation(method, path, r);
        }
        let after = leaf(t, "starting_after");
        let before = leaf(t, "ending_before");
        if after.is_some() && before.is_some() {
            let r = bad(
                "You may only specify one of these parameters: starting_after, ending_before.",
                "ending_before",
            );
            return self.violation(method, path, r);
        }
        let created_ok: Box<dyn Fn(i64) -> bool> = match get(t, "created") {
            Some(Node::Leaf(v)) if !v.is_empty() => {
                let at = v.parse::<i64>().unwrap_or(i64::MIN);
                Box::new(move |c| c == at)
            }
            Some(Node::Map(range)) => {
                let b = |k: &str| leaf(range, k).and_then(|v| v.parse::<i64>().ok());
                let (gt, gte, lt, lte) = (b("gt"), b("gte"), b("lt"), b("lte"));
                Box::new(move |c| {
                    gt.is_none_or(|x| c > x)
                        && gte.is_none_or(|x| c >= x)
                        && lt.is_none_or(|x| c < x)
                        && lte.is_none_or(|x| c <= x)
                })
            }
            _ => Box::new(|_| true),
        };
        let delivery = leaf(t, "delivery_success").map(|v| v == "true");

        // Cursors are objects of the whole list, whether or not they pass the filters.
        let cursor = |id: &str| {
            self.v1_events
                .iter()
                .find(|e| e.id == id)
                .map(StoredEvent::key)
        };
        let (after_key, before_key) = match (after, before) {
            (Some(id), _) => match cursor(id) {
                Some(k) => (Some(k), None),
                None => return cursor_missing("event", id, "starting_after"),
            },
            (_, Some(id)) => match cursor(id) {
                Some(k) => (None, Some(k)),
                None => return cursor_missing("event", id, "ending_before"),
            },
            _ => (None, None),
        };

        let mut all: Vec<&StoredEvent> = self
            .v1_events
            .iter()
            .filter(|e| created_ok(e.created))
            .filter(|e| delivery.is_none_or(|d| e.delivered == d))
            .filter(|e| {
                let ty = e.event["type"].as_str().unwrap_or("");
                match (&types, single) {
                    (Some(ts), _) => ts.iter().any(|x| x == ty),
                    (None, Some(pattern)) => wildcard(pattern, ty),
                    (None, None) => true,
                }
            })
            .collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.key()));
        let (page, has_more): (Vec<&StoredEvent>, bool) = match (after_key, before_key) {
            (_, Some(k)) => {
                // The `limit` events just newer than the cursor, still newest first.
                let newer: Vec<&StoredEvent> = all.into_iter().filter(|e| e.key() > k).collect();
                let skip = newer.len().saturating_sub(limit);
                (newer[skip..].to_vec(), skip > 0)
            }
            (Some(k), None) => {
                let older: Vec<&StoredEvent> = all.into_iter().filter(|e| e.key() < k).collect();
                let more = older.len() > limit;
                (older.into_iter().take(limit).collect(), more)
            }
            (None, None) => {
                let more = all.len() > limit;
                (all.into_iter().take(limit).collect(), more)
            }
        };
        let data = page.into_iter().map(|e| e.event.clone()).collect();
        Reply::ok(list(data, has_more, "/v1/events"))
    }

    /// `POST /v2/billing/meter_event_session` and `POST /v2/billing/meter_event_stream`.
    fn meter_event_v2(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &HeaderMap,
    ) -> Reply {
        let bearer = header(headers, "authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned));
        let unrecognized = format!("Unrecognized request URL ({method}: {path}).");
        match (method, path) {
            ("POST", "/v2/billing/meter_event_session") => {
                if bearer.as_deref() != Some(SECRET_KEY) {
                    return Reply::invalid(401, "Invalid API Key provided.", None, None);
                }
                let parsed: Result<Value, _> = if body.is_empty() {
                    Ok(json!({}))
                } else {
                    serde_json::from_slice(body)
                };
                match parsed {
                    Ok(Value::Object(m)) if m.is_empty() => {}
                    Ok(Value::Object(m)) => {
                        let k = m.keys().next().cloned().unwrap_or_default();
                        let r = Reply::invalid(
                            400,
                            &format!("Received unknown parameter: {k}"),
                            Some(&k),
                            None,
                        );
                        return self.violation(method, path, r);
                    }
                    _ => {
                        let r = Reply::invalid(400, "Invalid JSON body.", None, None);
                        return self.violation(method, path, r);
                    }
                }
                let ttl = self.session_ttl.unwrap_or(Duration::from_secs(15 * 60));
                let id = self.next_id();
                let token = format!("mes_token_fake_{id}_{:016x}", rand::random::<u64>());
                self.sessions.insert(token.clone(), Instant::now() + ttl);
                let created_ms = now_unix_ms();
                let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
                Reply::ok(json!({
                    "id": format!("mes_fake_{id}"),
                    "object": "v2.billing.meter_event_session",
                    "authentication_token": token,
                    "created": rfc3339(created_ms),
                    "expires_at": rfc3339(created_ms + ttl_ms),
                    "livemode": false,
                }))
            }
            ("POST", "/v2/billing/meter_event_stream") => {
                let now = Instant::now();
                self.sessions.retain(|_, until| now < *until);
                if !bearer
                    .as_deref()
                    .is_some_and(|t| self.sessions.contains_key(t))
                {
                    return Reply {
                        status: 401,
                        body: json!({"error": {
                            "type": "temporary_session_expired",
                            "code": "billing_meter_event_session_expired",
                            "message": "The meter event session has expired. Create a new one.",
                        }}),
                        headers: Vec::new(),
                    };
                }
                if !header(headers, "content-type")
                    .is_some_and(|c| c.starts_with("application/json"))
                {
                    let r = Reply::invalid(400, "The body must be application/json.", None, None);
                    return self.violation(method, path, r);
                }
                let events = match parse_stream(body) {
                    Ok(e) => e,
                    Err(e) => {
                        let r = Reply::invalid(400, &e.message, e.param.as_deref(), None);
                        return self.violation(method, path, r);
                    }
                };
                let now = self.clock();
                self.sweep_identifiers(now);
                self.stream_requests.push(events.len());
                for e in events {
                    let identifier = match e.identifier.clone() {
                        Some(i) => i,
                        None => {
                            format!("fake_mev_{}_{:016x}", self.next_id(), rand::random::<u64>())
                        }
                    };
                    if self.seen(&identifier, now) {
                        continue;
                    }
                    let accepted = AcceptedEvent {
                        identifier,
                        ..e.event
                    };
                    self.accept(accepted, now, true);
                }
                Reply::ok(json!({}))
            }
            _ => {
                self.violations.push(format!(
                    "{method} {path}: no v2 operation the fake knows matches"
                ));
                Reply::invalid(404, &unrecognized, None, None)
            }
        }
    }

    /// The v2 routes the fake serves (none of them is in the v1 spec): only
    /// `GET /v2/core/events/{id}`.
    fn v2(
        &mut self,
        method: &str,
        path: &str,
        parsed: Result<Vec<(String, String)>, String>,
        version: Option<&str>,
        unrecognized: &str,
    ) -> Reply {
        let segs: Vec<&str> = path.split('/').collect();
        let id = match (method, segs.as_slice()) {
            ("GET", ["", "v2", "core", "events", id]) if !id.is_empty() => {
                decode(id).unwrap_or_else(|_| (*id).to_string())
            }
            _ => {
                self.violations.push(format!(
                    "{method} {path}: no v2 operation the fake knows matches (it serves GET /v2/core/events/{{id}})"
                ));
                return Reply::invalid(404, unrecognized, None, None);
            }
        };
        match parsed {
            Err(msg) => {
                let r = Reply::invalid(400, &msg, None, None);
                return self.violation(method, path, r);
            }
            Ok(pairs) => {
                if let Some((k, _)) = pairs.first() {
                    let r = Reply::invalid(
                        400,
                        &format!("Received unknown parameter: {k}"),
                        Some(k),
                        None,
                    );
                    return self.violation(method, path, r);
                }
            }
        }
        if let Some(v) = version
            && !is_api_version(v)
        {
            let r = Reply::invalid(
                400,
                &format!("Invalid Stripe API version: {v}"),
                None,
                Some("invalid_api_version"),
            );
            return self.violation(method, path, r);
        }
        match self.v2_events.get(&id) {
            Some(e) => Reply::ok(e.clone()),
            None => missing("event", &id),
        }
    }
}

/// The string `id` of an object a test registers (panics with the helper's name otherwise).
fn object_id(v: &Value, helper: &str) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("fake Stripe: {helper} needs an object with a string `id`"))
        .to_string()
}

/// A cursor naming no object: Stripe answers 400 `resource_missing` (not a spec violation).
fn cursor_missing(what: &str, id: &str, param: &str) -> Reply {
    Reply::invalid(
        400,
        &format!("No such {what}: '{id}'"),
        Some(param),
        Some("resource_missing"),
    )
}

/// `type=` of `GET /v1/events`: `*` matches any run of characters (`customer.subscription.*`).
fn wildcard(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return s.is_empty(),
    };
    let Some(mut tail) = s.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for m in middle {
        match tail.find(m) {
            Some(i) => tail = &tail[i + m.len()..],
            None => return false,
        }
    }
    tail.ends_with(last)
}

/// `YYYY-MM-DD` with an optional `.name` release (`2026-10-28.endive`, `2025-06-30.preview`).
fn is_api_version(v: &str) -> bool {
    let (date, release) = match v.split_once('.') {
        Some((d, r)) => (d, Some(r)),
        None => (v, None),
    };
    let b = date.as_bytes();
    let date_ok = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    date_ok && release.is_none_or(|r| !r.is_empty() && r.bytes().all(|c| c.is_ascii_lowercase()))
}

fn missing(what: &str, id: &str) -> Reply {
    Reply::invalid(
        404,
        &format!("No such {what}: '{id}'"),
        Some("id"),
        Some("resource_missing"),
    )
}

/// The sum of `aggregated_value` (Stripe's meters here aggregate with `sum`).
#[allow(clippy::float_arithmetic)] // aggregated_value is an f64 sum, as in Stripe
fn sum_values(counted: &[Usage]) -> f64 {
    // Not `sum()`: an empty float sum is -0.0, which Stripe never answers.
    counted.iter().fold(0.0, |acc, u| acc + u.value)
}

/// FNV-1a over (meter, customer): the part of a summary id shared by a listing.
fn summary_seed(meter: &str, customer: &str) -> u64 {
    fnv(
        0xcbf2_9ce4_8422_2325,
        meter.bytes().chain([0]).chain(customer.bytes()).chain([0]),
    )
}

const SUMMARY_ID_PREFIX: &str = "mtrusg_test_";

/// `mtrusg_test_` and a hash of (meter, customer, window) in hex: the same window gets the
/// same id on every call, so a cursor from one page works on the next.
fn summary_id(seed: u64, window: (i64, i64)) -> String {
    format!("{SUMMARY_ID_PREFIX}{:016x}", summary_hash(seed, window))
}

fn summary_hash(seed: u64, (start, end): (i64, i64)) -> u64 {
    let h = fnv(
        seed,
        start.to_le_bytes().into_iter().chain(end.to_le_bytes()),
    );
    // A finalizer (splitmix64's), so ids of neighbouring windows do not look alike.
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv(seed: u64, bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn list(data: Vec<Value>, has_more: bool, url: &str) -> Value {
    json!({"object": "list", "data": data, "has_more": has_more, "url": url})
}

fn metadata(t: &Params) -> Value {
    match get(t, "metadata").map(to_json) {
        Some(Value::Object(m)) => Value::Object(m),
        _ => json!({}),
    }
}

fn price_object(id: &str, kind: &PriceKind) -> Value {
    let mut p = fixture("price");
    p["id"] = json!(id);
    p["livemode"] = json!(false);
    p["created"] = json!(now_unix());
    p["transform_quantity"] = Value::Null;
    p["custom_unit_amount"] = Value::Null;
    match kind {
        PriceKind::Licensed => {
            p["type"] = json!("recurring");
            p["recurring"] = json!({"interval": "month", "interval_count": 1, "meter": null,
                "usage_type": "licensed", "trial_period_days": null});
            p["unit_amount"] = json!(2000);
            p["unit_amount_decimal"] = json!("2000");
        }
        PriceKind::Metered(meter) => {
            p["type"] = json!("recurring");
            p["recurring"] = json!({"interval": "month", "interval_count": 1, "meter": meter,
                "usage_type": "metered", "trial_period_days": null});
            p["unit_amount"] = Value::Null;
            p["unit_amount_decimal"] = json!("0.2");
        }
        PriceKind::OneTime => {
            p["type"] = json!("one_time");
            p["recurring"] = Value::Null;
            p["unit_amount"] = json!(5000);
            p["unit_amount_decimal"] = json!("5000");
        }
    }
    p
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Stripe's v2 time format: `2026-11-21T09:36:18.123Z`.
fn rfc3339(ms: i64) -> String {
    meterd_actors::model::format_rfc3339(ms)
}

struct StreamEvent {
    identifier: Option<String>,
    event: AcceptedEvent,
}

/// A meter event stream body, as the SDK's `MeterEventStreamCreateParams` defines it: only
/// `events`, 1 to 100 of them; each has `event_name` (string, required), `payload` (an object
/// of strings, required, with `stripe_customer_id` and `value`), `identifier` (string, at most
/// 100 characters) and `timestamp` (RFC 3339), nothing else.
fn parse_stream(body: &[u8]) -> Result<Vec<StreamEvent>, ParamError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| perr(format!("Invalid JSON body: {e}"), ""))?;
    let Value::Object(top) = v else {
        return Err(perr("The body must be a JSON object.", ""));
    };
    if let Some(k) = top.keys().find(|k| *k != "events") {
        return Err(perr(format!("Received unknown parameter: {k}"), k));
    }
    let Some(Value::Array(events)) = top.get("events") else {
        return Err(perr("Missing required param: events.", "events"));
    };
    if events.is_empty() || events.len() > 100 {
        return Err(perr(
            format!("events must hold 1 to 100 events, not {}.", events.len()),
            "events",
        ));
    }
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let param = |k: &str| format!("events[{i}][{k}]");
        let Value::Object(e) = e else {
            return Err(perr(
                "Each event must be an object.",
                &format!("events[{i}]"),
            ));
        };
        if let Some(k) = e
            .keys()
            .find(|k| !["event_name", "identifier", "payload", "timestamp"].contains(&k.as_str()))
        {
            return Err(perr(
                format!("Received unknown parameter: {}", param(k)),
                &param(k),
            ));
        }
        let event_name = match e.get("event_name") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 100 => s.clone(),
            Some(_) => return Err(perr("Invalid event_name.", &param("event_name"))),
            None => {
                return Err(perr(
                    format!("Missing required param: {}.", param("event_name")),
                    &param("event_name"),
                ));
            }
        };
        let identifier = match e.get("identifier") {
            None => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 100 => Some(s.clone()),
            Some(_) => return Err(perr("Invalid identifier.", &param("identifier"))),
        };
        let Some(Value::Object(payload)) = e.get("payload") else {
            return Err(perr(
                format!("Missing or invalid param: {}.", param("payload")),
                &param("payload"),
            ));
        };
        if payload.values().any(|v| !v.is_string()) {
            return Err(perr("Payload values must be strings.", &param("payload")));
        }
        let field = |k: &str| payload.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(customer), Some(value)) = (field("stripe_customer_id"), field("value")) else {
            return Err(perr(
                "The payload needs stripe_customer_id and value.",
                &param("payload"),
            ));
        };
        let timestamp = match e.get("timestamp") {
            None => now_unix(),
            Some(Value::String(s)) => meterd_actors::model::parse_rfc3339(s)
                .map(|ms| ms.div_euclid(1000))
                .ok_or_else(|| perr(format!("Invalid timestamp: {s}"), &param("timestamp")))?,
            Some(_) => return Err(perr("Invalid timestamp.", &param("timestamp"))),
        };
        out.push(StreamEvent {
            identifier,
            event: AcceptedEvent {
                identifier: String::new(),
                event_name,
                customer,
                value,
                timestamp,
                cancelled: false,
            },
        });
    }
    Ok(out)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Spec and fixtures

/// A JSON file of `tests/fixtures/stripe/`; a missing or broken one fails the test loudly.
fn data_file(name: &str) -> Value {
    let path = crate::support::stripe_fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fake Stripe needs {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Spec {
    root: Value,
    /// Every path template, split into segments (`{x}` = a parameter).
    templates: Vec<(String, Vec<String>)>,
}

fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let mut root = data_file("spec3.trimmed.json");
        // The spec is of API version 2024-04-10, when `value_grouping_window` took only `hour`;
        // Stripe has taken `day` too since (today's API reference and SDKs list both).
        let summaries = &mut root["paths"]["/v1/billing/meters/{id}/event_summaries"]["get"];
        if let Some(params) = summaries["parameters"].as_array_mut() {
            for p in params
                .iter_mut()
                .filter(|p| p["name"] == "value_grouping_window")
            {
                p["schema"]["enum"] = json!(["day", "hour"]);
            }
        }
        let templates = root["paths"]
            .as_object()
            .map(|m| {
                m.keys()
                    .map(|k| (k.clone(), k.split('/').map(String::from).collect()))
                    .collect()
            })
            .unwrap_or_default();
        Spec { root, templates }
    })
}

/// A copy of `resources[name]` from fixtures3.latest.json.
fn fixture(name: &str) -> Value {
    static FIXTURES: OnceLock<Value> = OnceLock::new();
    let f = FIXTURES.get_or_init(|| data_file("fixtures3.latest.json"));
    let v = f["resources"][name].clone();
    assert!(
        v.is_object(),
        "fixtures3.latest.json has no resource {name}"
    );
    v
}

fn is_param(seg: &str) -> bool {
    seg.starts_with('{') && seg.ends_with('}')
}

/// (template, operation, decoded path parameters).
type Operation = (String, &'static Value, Vec<(String, String)>);

/// The spec operation for a method and concrete path: (template, operation, path params).
/// Literal segments beat parameters (`/v1/customers/search` over `/v1/customers/{customer}`).
fn match_operation(method: &str, path: &str) -> Result<Operation, String> {
    let spec = spec();
    let segs: Vec<&str> = path.split('/').collect();
    let mut candidates: Vec<(usize, &String, &Vec<String>)> = spec
        .templates
        .iter()
        .filter(|(_, t)| {
            t.len() == segs.len()
                && t.iter()
                    .zip(&segs)
                    .all(|(a, b)| if is_param(a) { !b.is_empty() } else { a == b })
        })
        .map(|(name, t)| (t.iter().filter(|s| !is_param(s)).count(), name, t))
        .collect();
    if candidates.is_empty() {
        return Err(format!(
            "no path in Stripe's spec matches {path} (tests/fixtures/stripe/spec3.trimmed.json \
             holds only the paths meterd calls: add it to trim_spec.py)"
        ));
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    let lower = method.to_ascii_lowercase();
    for (_, name, t) in candidates {
        if let Some(op) = spec.root["paths"][name.as_str()].get(&lower) {
            let params = t
                .iter()
                .zip(&segs)
                .filter(|(a, _)| is_param(a))
                .map(|(a, b)| {
                    let v = decode(b).unwrap_or_else(|_| (*b).to_string());
                    (a.trim_matches(['{', '}']).to_string(), v)
                })
                .collect();
            return Ok((name.clone(), op, params));
        }
    }
    Err(format!(
        "Stripe's spec has no {method} operation for {path}"
    ))
}

// ---------------------------------------------------------------------------------------------
// Form trees and the validator

/// A decoded parameter: `a[b][0]=v` becomes `a -> {b -> {0 -> "v"}}`.
#[derive(Debug, Clone)]
enum Node {
    Leaf(String),
    Map(Params),
}

#[derive(Debug)]
struct ParamError {
    message: String,
    param: Option<String>,
}

fn perr(message: impl Into<String>, param: &str) -> ParamError {
    ParamError {
        message: message.into(),
        param: (!param.is_empty()).then(|| param.to_string()),
    }
}

fn get<'a>(t: &'a Params, k: &str) -> Option<&'a Node> {
    t.iter().find(|(key, _)| key == k).map(|(_, n)| n)
}

fn leaf<'a>(t: &'a Params, k: &str) -> Option<&'a str> {
    match get(t, k) {
        Some(Node::Leaf(v)) => Some(v),
        _ => None,
    }
}

fn to_json(n: &Node) -> Value {
    match n {
        Node::Leaf(v) => json!(v),
        Node::Map(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect::<Map<String, Value>>(),
        ),
    }
}

fn build_tree(pairs: &[(String, String)]) -> Result<Params, ParamError> {
    let mut root = Vec::new();
    for (k, v) in pairs {
        let segs = split_key(k)?;
        insert(&mut root, &segs, v, k)?;
    }
    Ok(root)
}

/// `a[b][0]` -> `["a", "b", "0"]`; `a[]` -> `["a", ""]` (append).
fn split_key(k: &str) -> Result<Vec<String>, ParamError> {
    let bad = || perr(format!("Invalid parameter name: {k}"), k);
    let (name, mut rest) = match k.find('[') {
        Some(i) => (&k[..i], &k[i..]),
        None => (k, ""),
    };
    if name.is_empty() {
        return Err(bad());
    }
    let mut segs = vec![name.to_string()];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[').ok_or_else(bad)?;
        let end = inner.find(']').ok_or_else(bad)?;
        segs.push(inner[..end].to_string());
        rest = &inner[end + 1..];
    }
    Ok(segs)
}

fn insert(map: &mut Params, segs: &[String], value: &str, full: &str) -> Result<(), ParamError> {
    let Some((first, tail)) = segs.split_first() else {
        return Ok(());
    };
    let key = if first.is_empty() {
        if !tail.is_empty() {
            return Err(perr(format!("Invalid parameter name: {full}"), full));
        }
        map.len().to_string()
    } else {
        first.clone()
    };
    let pos = map.iter().position(|(k, _)| *k == key);
    if tail.is_empty() {
        if pos.is_some() {
            return Err(perr(format!("Duplicate parameter: {full}"), full));
        }
        map.push((key, Node::Leaf(value.to_string())));
        return Ok(());
    }
    match pos {
        Some(i) => match &mut map[i].1 {
            Node::Map(m) => insert(m, tail, value, full),
            Node::Leaf(_) => Err(perr(
                format!("Invalid parameter: {full} conflicts with a plain value for {key}"),
                full,
            )),
        },
        None => {
            let mut m = Vec::new();
            insert(&mut m, tail, value, full)?;
            map.push((key, Node::Map(m)));
            Ok(())
        }
    }
}

fn validate_operation(
    method: &str,
    op: &Value,
    tree: &Params,
    path_params: &[(String, String)],
) -> Result<(), ParamError> {
    let declared = op["parameters"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for (name, value) in path_params {
        if let Some(p) = declared
            .iter()
            .find(|p| p["in"] == "path" && p["name"] == name.as_str())
        {
            validate(&p["schema"], &Node::Leaf(value.clone()), name, false)?;
        }
    }
    if method == "POST" {
        let schema = &op["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"];
        return validate(schema, &Node::Map(tree.clone()), "", false);
    }
    for (k, node) in tree {
        let Some(p) = declared
            .iter()
            .find(|p| p["in"] == "query" && p["name"] == k.as_str())
        else {
            return Err(perr(format!("Received unknown parameter: {k}"), k));
        };
        validate(&p["schema"], node, k, false)?;
    }
    for p in declared {
        let name = p["name"].as_str().unwrap_or("");
        if p["in"] == "query" && p["required"] == true && get(tree, name).is_none() {
            return Err(perr(format!("Missing required param: {name}."), name));
        }
    }
    Ok(())
}

/// Validates one decoded value against a request-parameter schema. `name` is the parameter in
/// bracket notation ("" for the top level). `may_be_empty`: map values (`metadata[k]=`) may be
/// empty strings (they unset a key); named parameters may not, unless their enum allows "".
fn validate(schema: &Value, node: &Node, name: &str, may_be_empty: bool) -> Result<(), ParamError> {
    if let Some(branches) = schema["anyOf"].as_array() {
        let mut best: Option<ParamError> = None;
        for b in branches {
            match validate(b, node, name, may_be_empty) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Report the error of the branch shaped like the value, if any.
                    let shaped = matches!(
                        (node, b["type"].as_str()),
                        (Node::Map(_), Some("object" | "array"))
                    );
                    if best.is_none() || shaped {
                        best = Some(e);
                    }
                }
            }
        }
        return Err(best.unwrap_or_else(|| perr(format!("Invalid {name}"), name)));
    }
    let ty = schema["type"].as_str();
    match (ty, node) {
        (Some("object"), Node::Map(entries)) => validate_object(schema, entries, name),
        (Some("object"), Node::Leaf(v)) if v.is_empty() => validate_object(schema, &[], name),
        (Some("object"), Node::Leaf(_)) => Err(perr(
            format!("Invalid object: {name} must be a hash (use {name}[key]=value)"),
            name,
        )),
        (Some("array"), Node::Map(entries)) => {
            for (k, item) in entries {
                if k.parse::<usize>().is_err() {
                    return Err(perr(
                        format!("Invalid array: {name} has a non-numeric index {k}"),
                        name,
                    ));
                }
                validate(&schema["items"], item, &format!("{name}[{k}]"), false)?;
            }
            Ok(())
        }
        (Some("array"), Node::Leaf(v)) if v.is_empty() => Ok(()),
        (Some("array"), Node::Leaf(_)) => Err(perr(
            format!("Invalid array: {name} must be a list (use {name}[0]=value)"),
            name,
        )),
        (Some(t), Node::Map(_)) => Err(perr(
            format!("Invalid {t}: {name} must be a {t}, not a hash"),
            name,
        )),
        (None, Node::Map(_)) => Ok(()),
        (_, Node::Leaf(v)) => validate_scalar(schema, ty, v, name, may_be_empty),
    }
}

fn validate_object(
    schema: &Value,
    entries: &[(String, Node)],
    name: &str,
) -> Result<(), ParamError> {
    let props = schema["properties"].as_object();
    let extra = &schema["additionalProperties"];
    for (k, child) in entries {
        let child_name = if name.is_empty() {
            k.clone()
        } else {
            format!("{name}[{k}]")
        };
        if let Some(s) = props.and_then(|p| p.get(k)) {
            validate(s, child, &child_name, false)?;
        } else if extra.is_object() {
            validate(extra, child, &child_name, true)?;
        } else if *extra == Value::Bool(true) || (props.is_none() && extra.is_null()) {
            // Free-form: nothing to check.
        } else {
            // `additionalProperties: false`, or a closed set of properties: Stripe rejects
            // unknown keys at every level.
            return Err(perr(
                format!("Received unknown parameter: {child_name}"),
                &child_name,
            ));
        }
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        let r = r.as_str().unwrap_or("");
        if !entries.iter().any(|(k, _)| k == r) {
            let full = if name.is_empty() {
                r.to_string()
            } else {
                format!("{name}[{r}]")
            };
            return Err(perr(format!("Missing required param: {full}."), &full));
        }
    }
    Ok(())
}

fn validate_scalar(
    schema: &Value,
    ty: Option<&str>,
    v: &str,
    name: &str,
    may_be_empty: bool,
) -> Result<(), ParamError> {
    if let Some(allowed) = schema["enum"].as_array() {
        if allowed.iter().any(|a| a.as_str() == Some(v)) {
            return Ok(());
        }
        let names: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
        return Err(perr(
            format!("Invalid {name}: must be one of {}", names.join(", ")),
            name,
        ));
    }
    if v.is_empty() {
        if may_be_empty || ty.is_none() {
            return Ok(());
        }
        return Err(perr(
            format!(
                "You passed an empty string for '{name}'. We assume empty values are an attempt to unset a parameter; however '{name}' cannot be unset. You should remove '{name}' from your request or supply a non-empty value."
            ),
            name,
        ));
    }
    match ty {
        Some("string") => {
            if let Some(max) = schema["maxLength"].as_u64() {
                let len = u64::try_from(v.chars().count()).unwrap_or(u64::MAX);
                if len > max {
                    return Err(perr(
                        format!(
                            "Invalid string: {name} must be at most {max} characters (got {len})"
                        ),
                        name,
                    ));
                }
            }
            Ok(())
        }
        Some("integer") if v.parse::<i64>().is_err() => {
            Err(perr(format!("Invalid integer: {v}"), name))
        }
        Some("number") if !v.parse::<f64>().is_ok_and(f64::is_finite) => {
            Err(perr(format!("Invalid decimal: {v}"), name))
        }
        Some("boolean") if v != "true" && v != "false" => {
            Err(perr(format!("Invalid boolean: {v}"), name))
        }
        _ => Ok(()),
    }
}
