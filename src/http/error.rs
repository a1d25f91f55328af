//! `ApiError`: the one table from failures to HTTP (status, machine-readable `code`, message).
//!
//! Every error body is `{"error":{"code":…,"message":…,…}}`. Domain errors map here by an
//! exhaustive `match`, so a new `AccountError` variant without a code does not compile. Errors
//! raised by poem itself (unknown route, bad query, failed auth) are mapped by
//! [`render_poem_error`], so clients see one format everywhere.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Object};

use meterd_actors::account::AccountError;

use super::views::{CreditsView, MeterState};

/// The body of every error response.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ErrorBody {
    /// Machine-readable: `invalid_request`, `unauthorized`, `forbidden`, `unknown_account`,
    /// `not_found`, `method_not_allowed`, `idempotency_conflict`, `cap_reached`,
    /// `insufficient_credits`, `subscription_inactive`, `spend_cap_reached`, `meter_not_in_plan`,
    /// `credit_balance_too_low`, `customer_in_use`, `request_timeout`, `rate_limited`,
    /// `unavailable`, `overloaded`, `internal`.
    pub code: String,
    /// For humans; never contains secrets or request bodies.
    pub message: String,
    /// For a recorded denial: the ledger entry that records it.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_seq: Option<u64>,
    /// For a denial: the meter's state at decision time.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meter: Option<MeterState>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsView>,
    /// The request's id (also the `X-Request-Id` response header): quote it to the operator,
    /// whose log has the details under the same id.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Box<ErrorBody>,
    /// Set on a replayed recorded denial (`Idempotent-Replayed: true`).
    pub replayed: bool,
    /// Seconds for a `Retry-After` header (rate limits).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: Box::new(ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                ledger_seq: None,
                meter: None,
                credits: None,
                request_id: None,
            }),
            replayed: false,
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 503 `unavailable`: a storage or actor failure; the client may retry.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid API key: send `Authorization: Bearer <key>`",
        )
    }

    pub fn forbidden(needed: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this route needs an API key with the `{needed}` scope"),
        )
    }
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        let msg = e.to_string();
        let (status, code) = match e {
            AccountError::UnknownAccount(_) => (StatusCode::NOT_FOUND, "unknown_account"),
            AccountError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            AccountError::IdempotencyConflict { .. } => {
                (StatusCode::CONFLICT, "idempotency_conflict")
            }
            AccountError::CreditBalanceTooLow { .. } => {
                (StatusCode::CONFLICT, "credit_balance_too_low")
            }
            AccountError::UnknownReservation { .. } => {
                (StatusCode::NOT_FOUND, "unknown_reservation")
            }
            AccountError::ReservationSettled { how, .. } => (
                StatusCode::CONFLICT,
                if how == "expired" {
                    "reservation_expired"
                } else {
                    "reservation_settled"
                },
            ),
            AccountError::CommitDenied { code } => match code {
                "insufficient_credits" => (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"),
                "spend_cap_reached" => (StatusCode::PAYMENT_REQUIRED, "spend_cap_reached"),
                _ => (StatusCode::TOO_MANY_REQUESTS, "cap_reached"),
            },
            AccountError::CustomerInUse { .. } => (StatusCode::CONFLICT, "customer_in_use"),
            AccountError::Overloaded(_) => {
                let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", msg);
                e.retry_after = Some(1);
                return e;
            }
            AccountError::Storage(_) => {
                // The storage text is for the operator, not the client.
                tracing::error!(request_id = super::request_id::current().as_deref(), error = %msg, "storage failure answered as 503");
                return ApiError::unavailable(
                    "storage is unavailable; retry with the same idempotency key",
                );
            }
            AccountError::Unavailable(_) => {
                // Which actor stopped, and why, is for the operator.
                tracing::warn!(request_id = super::request_id::current().as_deref(), error = %msg, "answered 503 unavailable");
                return ApiError::unavailable(
                    "the daemon cannot serve this right now; retry with the same idempotency key",
                );
            }
            AccountError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, msg)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.body.code, self.body.message)
    }
}

impl std::error::Error for ApiError {}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn as_response(&self) -> Response {
        self.clone().into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = *self.body;
        if error.request_id.is_none() {
            error.request_id = super::request_id::current();
        }
        let body = serde_json::to_vec(&ErrorEnvelope { error }).unwrap_or_default();
        let mut resp = Response::builder()
            .status(self.status)
            .content_type("application/json; charset=utf-8")
            .body(body);
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(
                poem::http::header::RETRY_AFTER,
                poem::http::HeaderValue::from(s),
            );
        }
        if self.replayed {
            resp.headers_mut().insert(
                "Idempotent-Replayed",
                poem::http::HeaderValue::from_static("true"),
            );
        }
        resp
    }
}

const DOCUMENTED: &[(u16, &str)] = &[
    (400, "Invalid request: `invalid_request`"),
    (401, "Missing or wrong API key: `unauthorized`"),
    (
        402,
        "Recorded denial: `insufficient_credits`, `subscription_inactive` or `spend_cap_reached`",
    ),
    (
        403,
        "Key lacks the scope (`forbidden`), or recorded denial `meter_not_in_plan`",
    ),
    (404, "`unknown_account`"),
    (
        408,
        "`request_timeout`: the request body did not arrive within `server.body_read_timeout_ms`",
    ),
    (
        409,
        "`idempotency_conflict`, `credit_balance_too_low`, `reservation_settled`, `reservation_expired` or `customer_in_use`",
    ),
    (
        429,
        "Recorded denial `cap_reached`, or `rate_limited` (see `Retry-After`; also after too many wrong keys from one address)",
    ),
    (
        503,
        "`unavailable`: storage failure or timeout; retry with the same idempotency key. `overloaded`: too many requests queued, shed at once (see `Retry-After`)",
    ),
];

impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: DOCUMENTED
                .iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(*status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: "application/json; charset=utf-8",
                        schema: ErrorEnvelope::schema_ref(),
                    }],
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        ErrorEnvelope::register(registry);
    }
}

/// Renders any error that reached the top of the route tree in the common format.
pub fn render_poem_error(err: poem::Error) -> Response {
    if let Some(api) = err.downcast_ref::<ApiError>() {
        return api.clone().into_response();
    }
    let status = err.status();
    let api = match status {
        StatusCode::NOT_FOUND => ApiError::new(status, "not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            status,
            "method_not_allowed",
            "this route does not accept that method",
        ),
        StatusCode::UNAUTHORIZED => ApiError::unauthorized(),
        s if s.is_client_error() => ApiError::invalid(err.to_string()),
        _ => {
            tracing::error!(request_id = super::request_id::current().as_deref(), status = %status, error = %err, "request failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    };
    api.into_response()
}

/// A path's account id, or 400 `invalid_request` saying what is wrong with it.
pub fn account_id(raw: &str) -> Result<meterd_actors::model::AccountId, ApiError> {
    meterd_actors::model::AccountId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shedding_is_503_overloaded_with_retry_after() {
        let e = ApiError::from(AccountError::Overloaded(100_000));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body.code, "overloaded");
        assert_eq!(e.retry_after, Some(1));
        let r = e.into_response();
        assert_eq!(r.headers()[poem::http::header::RETRY_AFTER], "1");
    }

    #[test]
    fn storage_text_never_reaches_the_client() {
        let e = ApiError::from(AccountError::Storage(
            "IO error: /var/lib/meterd/db: No space left on device".into(),
        ));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body.code, "unavailable");
        assert!(!e.body.message.contains("space"), "{}", e.body.message);
        assert!(!e.body.message.contains("/var"), "{}", e.body.message);
    }
}
