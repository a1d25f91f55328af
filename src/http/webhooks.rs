//! Stripe webhooks: the receiving endpoint, the admin routes of the event log, and the
//! account reads Stripe's events fill (invoices, transactions).
//!
//! `POST /webhooks/stripe` takes no API key: the `Stripe-Signature` is the authentication. It
//! verifies the signature over the raw bytes, writes the event to the durable log and answers
//! only once that write is on disk. Parsing and applying happen later, in the webhook actor,
//! so a correctly signed event of a shape meterd does not know is still kept and answered 200
//! (never a redelivery loop), and the answer time is the durable write alone.

use std::sync::Arc;

use poem::http::StatusCode;
use poem::web::Data;
use poem::{Body, IntoResponse, Request, Response, handler};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};

use meterd_actors::account::Accounts;
use meterd_actors::billing::{InvoiceSummary, Transaction, head};
use meterd_actors::model::{Clock, format_rfc3339};
use meterd_actors::signature::{SignatureError, precheck, verify};
use meterd_actors::store::{EventSource, StoreReader, WebhookRecord, WebhookStatus};
use meterd_actors::webhook::Webhooks;

use super::auth::{ApiKeyAuth, FailedAuth};
use super::error::{ApiError, account_id};
use super::views::unix_s;

/// What the receiving endpoint needs (installed as request data).
pub struct Receiver {
    pub webhooks: Webhooks,
    /// Signing secrets; several during a rotation. Empty: the endpoint answers 503.
    pub secrets: Vec<String>,
    pub tolerance_s: u64,
    pub max_body_bytes: usize,
    pub clock: Clock,
}

#[derive(serde::Serialize)]
struct Received {
    received: bool,
    duplicate: bool,
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(body)
}

/// `POST /webhooks/stripe`.
#[handler]
pub async fn receive(req: &Request, body: Body, rx: Data<&Arc<Receiver>>) -> Response {
    match receive_inner(req, body, &rx).await {
        Ok(r) => json(StatusCode::OK, &r),
        Err(e) => e.into_response(),
    }
}

async fn receive_inner(req: &Request, body: Body, rx: &Receiver) -> Result<Received, ApiError> {
    if rx.secrets.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhook_not_configured",
            "no webhook signing secret is configured (see [webhooks] secret_env); the event was not accepted",
        ));
    }
    // A peer that sent too many wrongly signed deliveries waits, like a wrong API key.
    FailedAuth::admit(req)?;
    let header = req
        .headers()
        .get("stripe-signature")
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let now_ms = rx.clock.now_ms();
    let refused = |e: SignatureError| {
        tracing::warn!(code = e.code(), "stripe webhook refused");
        ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
    };
    // Everything that can be judged without the body is judged before it is read.
    precheck(header, now_ms.div_euclid(1000), rx.tolerance_s).map_err(refused)?;
    let limit = rx.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("webhook body is larger than {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = super::body::read_limited(req, body, limit)
        .await
        .map_err(|e| match e {
            super::body::ReadError::TooLarge => too_large(),
            super::body::ReadError::Other(e) => e,
        })?;
    verify(
        header,
        &bytes,
        &rx.secrets,
        now_ms.div_euclid(1000),
        rx.tolerance_s,
    )
    .map_err(|e| {
        if e == SignatureError::NoMatch {
            FailedAuth::count(req);
        }
        refused(e)
    })?;
    let h = head(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_event",
            format!("signed, but not a Stripe event: {e}"),
        )
    })?;
    let rec = WebhookRecord {
        id: h.id.clone(),
        event_type: h.event_type.clone(),
        created_s: h.created_s,
        received_ms: now_ms,
        source: EventSource::Webhook,
        thin: h.thin,
        status: WebhookStatus::Pending,
        attempts: 0,
        next_at_ms: now_ms,
        last_error: None,
        outcome: None,
        settled_ms: None,
    };
    let not_stored = |e: String| {
        tracing::error!(request_id = super::request_id::current().as_deref(), event = %h.id, error = %e, "stripe webhook not stored");
        ApiError::unavailable("the event could not be stored; Stripe will retry")
    };
    let new = rx.webhooks.intake(&rec, &bytes).await.map_err(not_stored)?;
    tracing::info!(event = %h.id, event_type = %h.event_type, duplicate = !new, "stripe webhook received");
    Ok(Received {
        received: true,
        duplicate: !new,
    })
}

#[derive(Tags)]
enum WebhookTags {
    /// Stripe events: the log of received webhooks, and what they recorded on accounts.
    Webhooks,
}

pub struct WebhooksApi {
    pub store: StoreReader,
    pub webhooks: Webhooks,
    pub accounts: Accounts,
}

/// One Stripe event in the log.
#[derive(Debug, Object)]
pub struct WebhookEventView {
    pub id: String,
    #[oai(rename = "type")]
    pub event_type: String,
    /// When Stripe created the event.
    pub created: String,
    pub received_at: String,
    /// `webhook` or `backfill`.
    pub source: String,
    /// `pending`, `applied`, `ignored` or `failed`.
    pub status: String,
    pub attempts: u32,
    #[oai(skip_serializing_if_is_none)]
    pub next_attempt_at: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub last_error: Option<String>,
    /// Per account: `applied`, `stale` or `ignored`.
    #[oai(skip_serializing_if_is_none)]
    pub outcome: Option<String>,
}

#[derive(Debug, Object)]
pub struct WebhookEventsPage {
    pub pending: u64,
    pub applied: u64,
    pub ignored: u64,
    pub failed: u64,
    pub events: Vec<WebhookEventView>,
    /// Pass as `after` for the next page.
    #[oai(skip_serializing_if_is_none)]
    pub next_after: Option<String>,
}

#[derive(Debug, Object)]
pub struct ReplayView {
    pub id: String,
    pub status: String,
}

/// A meter event Stripe accepted, then reported invalid.
#[derive(Debug, Object)]
pub struct MeterErrorView {
    pub account_id: String,
    /// The ledger entry (the first of an aggregated range).
    pub ledger_seq: u64,
    pub identifier: String,
    /// Stripe's error code.
    pub code: String,
    /// The error report (event id).
    pub event_id: String,
    pub reported_at: String,
}

#[derive(Debug, Object)]
pub struct MeterErrorsPage {
    pub errors: Vec<MeterErrorView>,
}

#[derive(Debug, Object)]
pub struct BackfillView {
    /// Undelivered events Stripe listed.
    pub listed: u64,
    /// Of those, the ones the log lacked (now queued).
    pub logged: u64,
}

#[derive(Debug, Object)]
pub struct InvoiceView {
    /// Absent for the upcoming invoice (a preview).
    #[oai(skip_serializing_if_is_none)]
    pub id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub number: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub status: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub billing_reason: Option<String>,
    pub currency: String,
    /// Minor units.
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub total: i64,
    /// The part of `total` from metered prices.
    pub metered_amount: i64,
    #[oai(skip_serializing_if_is_none)]
    pub hosted_invoice_url: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub period_start: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub period_end: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub created: Option<String>,
    pub attempt_count: u64,
    #[oai(skip_serializing_if_is_none)]
    pub next_payment_attempt: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub subscription: Option<String>,
}

#[derive(Debug, Object)]
pub struct InvoicesPage {
    #[oai(skip_serializing_if_is_none)]
    pub upcoming: Option<InvoiceView>,
    /// Newest first (at most 100).
    pub invoices: Vec<InvoiceView>,
}

#[derive(Debug, Object)]
pub struct TransactionView {
    /// The invoice, checkout session or refund.
    pub id: String,
    /// `payment`, `topup` or `refund`.
    pub kind: String,
    /// Minor units.
    pub amount: i64,
    pub currency: String,
    pub at: String,
    #[oai(skip_serializing_if_is_none)]
    pub reference: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub credits: Option<u64>,
    pub event_id: String,
}

#[derive(Debug, Object)]
pub struct TransactionsPage {
    /// Newest first (at most 500).
    pub transactions: Vec<TransactionView>,
}

fn invoice_view(i: &InvoiceSummary) -> InvoiceView {
    InvoiceView {
        id: i.id.clone(),
        number: i.number.clone(),
        status: i.status.clone(),
        billing_reason: i.billing_reason.clone(),
        currency: i.currency.clone(),
        amount_due: i.amount_due,
        amount_paid: i.amount_paid,
        amount_remaining: i.amount_remaining,
        total: i.total,
        metered_amount: i.metered_amount,
        hosted_invoice_url: i.hosted_invoice_url.clone(),
        period_start: unix_s(i.period_start_s),
        period_end: unix_s(i.period_end_s),
        created: unix_s(i.created_s),
        attempt_count: i.attempt_count,
        next_payment_attempt: unix_s(i.next_payment_attempt_s),
        subscription: i.subscription.clone(),
    }
}

fn transaction_view(t: &Transaction) -> TransactionView {
    TransactionView {
        id: t.id.clone(),
        kind: t.kind.as_str().to_owned(),
        amount: t.amount,
        currency: t.currency.clone(),
        at: unix_s(Some(t.at_s)).unwrap_or_default(),
        reference: t.reference.clone(),
        credits: t.credits,
        event_id: t.event_id.clone(),
    }
}

fn event_view(r: WebhookRecord) -> WebhookEventView {
    WebhookEventView {
        created: unix_s(Some(r.created_s)).unwrap_or_default(),
        received_at: format_rfc3339(r.received_ms),
        source: r.source.as_str().to_owned(),
        status: r.status.as_str().to_owned(),
        attempts: r.attempts,
        next_attempt_at: (r.status == WebhookStatus::Pending).then(|| format_rfc3339(r.next_at_ms)),
        last_error: r.last_error,
        outcome: r.outcome,
        id: r.id,
        event_type: r.event_type,
    }
}

#[OpenApi(tag = "WebhookTags::Webhooks")]
impl WebhooksApi {
    /// The Stripe event log: counts by status, and events (optionally of one status) in id
    /// order.
    #[oai(path = "/v1/admin/webhooks", method = "get")]
    async fn list(
        &self,
        auth: ApiKeyAuth,
        /// `pending`, `applied`, `ignored` or `failed`.
        status: Query<Option<String>>,
        /// Events after this id (paging).
        after: Query<Option<String>>,
        /// 1-1000, default 100.
        limit: Query<Option<u32>>,
    ) -> Result<Json<WebhookEventsPage>, ApiError> {
        auth.require_admin()?;
        let status = match status.0.as_deref() {
            None => None,
            Some(s) => Some(WebhookStatus::parse(s).ok_or_else(|| {
                ApiError::invalid(format!(
                    "`status` must be pending, applied, ignored or failed, not `{s}`"
                ))
            })?),
        };
        let limit = limit.0.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("`limit` must be from 1 to 1000"));
        }
        let store = self.store.clone();
        let after = after.0;
        let (counts, events) = tokio::task::spawn_blocking(move || {
            Ok::<_, meterd_actors::store::StoreError>((
                store.event_counts()?,
                store.events(status, after.as_deref(), limit as usize)?,
            ))
        })
        .await
        .map_err(ApiError::unavailable)?
        .map_err(ApiError::unavailable)?;
        let next_after = (events.len() == limit as usize)
            .then(|| events.last().map(|e| e.id.clone()))
            .flatten();
        Ok(Json(WebhookEventsPage {
            pending: counts[0],
            applied: counts[1],
            ignored: counts[2],
            failed: counts[3],
            events: events.into_iter().map(event_view).collect(),
            next_after,
        }))
    }

    /// Apply a logged event again (a failed one, typically). An event already applied to an
    /// account is recognised there by its id and changes nothing.
    #[oai(path = "/v1/admin/webhooks/:event_id/replay", method = "post")]
    async fn replay(
        &self,
        auth: ApiKeyAuth,
        event_id: Path<String>,
    ) -> Result<Json<ReplayView>, ApiError> {
        auth.require_admin()?;
        let found = self
            .webhooks
            .replay(&event_id)
            .await
            .map_err(ApiError::unavailable)?;
        if !found {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no event `{}` in the log", event_id.0),
            ));
        }
        let status = self
            .store
            .event(&event_id)
            .map_err(ApiError::unavailable)?
            .map(|r| r.status.as_str().to_owned())
            .unwrap_or_default();
        tracing::info!(event = %event_id.0, "stripe event replay requested");
        Ok(Json(ReplayView {
            id: event_id.0,
            status,
        }))
    }

    /// List the events Stripe failed to deliver (last `webhooks.backfill_days` days) and
    /// queue those the log lacks. Needs a Stripe key.
    #[oai(path = "/v1/admin/webhooks/backfill", method = "post")]
    async fn backfill(&self, auth: ApiKeyAuth) -> Result<Json<BackfillView>, ApiError> {
        auth.require_admin()?;
        let r =
            self.webhooks.backfill().await.map_err(|e| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stripe_unavailable", e)
            })?;
        Ok(Json(BackfillView {
            listed: r.listed as u64,
            logged: r.logged as u64,
        }))
    }

    /// Meter events Stripe accepted but then reported invalid (from
    /// `v1.billing.meter.error_report_triggered`): these units are not billed in Stripe. Fix
    /// the cause (e.g. the customer) and reconcile.
    #[oai(path = "/v1/admin/meter-errors", method = "get")]
    async fn meter_errors(
        &self,
        auth: ApiKeyAuth,
        /// 1-1000, default 100.
        limit: Query<Option<u32>>,
    ) -> Result<Json<MeterErrorsPage>, ApiError> {
        auth.require_admin()?;
        let limit = limit.0.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("`limit` must be from 1 to 1000"));
        }
        let store = self.store.clone();
        let rows = tokio::task::spawn_blocking(move || store.meter_errors(limit as usize))
            .await
            .map_err(ApiError::unavailable)?
            .map_err(ApiError::unavailable)?;
        Ok(Json(MeterErrorsPage {
            errors: rows
                .into_iter()
                .map(|(a, seq, r)| MeterErrorView {
                    account_id: a.to_string(),
                    ledger_seq: seq,
                    identifier: r.identifier,
                    code: r.code,
                    event_id: r.event_id,
                    reported_at: format_rfc3339(r.reported_ms),
                })
                .collect(),
        }))
    }

    /// The account's Stripe invoices (newest first) and the upcoming one, as webhooks told.
    #[oai(path = "/v1/accounts/:id/invoices", method = "get")]
    async fn invoices(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
    ) -> Result<Json<InvoicesPage>, ApiError> {
        let id = account_id(&id)?;
        let view = self.accounts.get(&id).await?;
        Ok(Json(InvoicesPage {
            upcoming: view.billing.upcoming.as_ref().map(invoice_view),
            invoices: view.billing.invoices.iter().map(invoice_view).collect(),
        }))
    }

    /// The account's payments, top-ups and refunds (newest first), as webhooks told.
    #[oai(path = "/v1/accounts/:id/transactions", method = "get")]
    async fn transactions(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
    ) -> Result<Json<TransactionsPage>, ApiError> {
        let id = account_id(&id)?;
        let view = self.accounts.get(&id).await?;
        Ok(Json(TransactionsPage {
            transactions: view
                .billing
                .transactions
                .iter()
                .map(transaction_view)
                .collect(),
        }))
    }
}
