//! `JsonBody<T>`: a request body documented by `T`'s OpenAPI schema and parsed by serde.
//!
//! poem-openapi's own `Json<T>` reports a missing or mistyped field without naming it. This
//! extractor checks the content type, reads at most `max_body_bytes`, rejects unknown fields
//! (`T` uses `deny_unknown_fields`) and names the offending field in every message, all as
//! 400 `invalid_request`.

use std::marker::PhantomData;

use poem::{Request, RequestBody};
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The body size limit, installed as request data by the daemon.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// The usual request body.
pub type JsonBody<T> = Body<T, Regular>;

const CONTENT_TYPE: &str = "application/json";

fn is_json(content_type: &str) -> bool {
    matches!(content_type.parse::<mime::Mime>(), Ok(m) if m.type_() == "application"
        && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json")))
}

/// The body size limit of the batch route, installed as request data by the daemon.
#[derive(Debug, Clone, Copy)]
pub struct BatchBodyLimit(pub usize);

/// The batch route's body, with its larger size limit ([`BatchBodyLimit`]).
pub type LargeJsonBody<T> = Body<T, Batch>;

fn json_request_meta<T: Type>() -> Option<MetaRequest> {
    Some(MetaRequest {
        description: None,
        content: vec![MetaMediaType {
            content_type: CONTENT_TYPE,
            schema: T::schema_ref(),
        }],
        required: true,
    })
}

/// How long a request body may take to arrive (`server.body_read_timeout_ms`), installed as
/// request data by the daemon.
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub std::time::Duration);

/// Why a body could not be read.
pub enum ReadError {
    /// Over the limit (each route answers this its own way).
    TooLarge,
    /// Timed out (408 `request_timeout`) or broken (400).
    Other(ApiError),
}

/// Reads at most `limit` bytes of `body` within the request's [`BodyReadTimeout`] (10 s if none
/// is installed): a client that trickles its body does not hold a connection forever.
pub async fn read_limited(
    request: &Request,
    body: poem::Body,
    limit: usize,
) -> Result<bytes::Bytes, ReadError> {
    let timeout = request
        .data::<BodyReadTimeout>()
        .map(|t| t.0)
        .unwrap_or(std::time::Duration::from_secs(10));
    match tokio::time::timeout(timeout, body.into_bytes_limit(limit)).await {
        Err(_elapsed) => Err(ReadError::Other(ApiError::new(
            poem::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        ))),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(poem::error::ReadBodyError::PayloadTooLarge)) => Err(ReadError::TooLarge),
        Ok(Err(other)) => Err(ReadError::Other(ApiError::invalid(format!(
            "cannot read request body: {other}"
        )))),
    }
}

/// Content type check, size-limited read, object check, field-named serde errors.
async fn read_json<T: DeserializeOwned>(
    request: &Request,
    body: &mut RequestBody,
    limit: usize,
) -> poem::Result<T> {
    match request.content_type() {
        Some(ct) if is_json(ct) => {}
        Some(ct) => {
            return Err(ApiError::invalid(format!(
                "content type `{ct}` is not supported: send application/json"
            ))
            .into());
        }
        None => {
            return Err(ApiError::invalid("missing Content-Type: send application/json").into());
        }
    }
    let bytes = read_limited(request, body.take()?, limit)
        .await
        .map_err(|e| match e {
            ReadError::TooLarge => {
                ApiError::invalid(format!("request body is larger than {limit} bytes"))
            }
            ReadError::Other(e) => e,
        })?;
    // serde would read a JSON array positionally into a struct; only objects are bodies.
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => return Err(ApiError::invalid("empty request body: send a JSON object").into()),
        Some(_) => return Err(ApiError::invalid("the request body must be a JSON object").into()),
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path == "?" {
            ApiError::invalid(format!("invalid JSON body: {inner}")).into()
        } else {
            ApiError::invalid(format!("`{path}`: {inner}")).into()
        }
    })
}

/// Where a body's size limit comes from.
pub trait BodyLimitKind: Send + Sync + 'static {
    fn limit(request: &Request) -> usize;
}

/// `server.max_body_bytes` ([`BodyLimit`]).
pub struct Regular;
/// `server.max_batch_body_bytes` ([`BatchBodyLimit`]).
pub struct Batch;

impl BodyLimitKind for Regular {
    fn limit(request: &Request) -> usize {
        request
            .data::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(16 * 1024)
    }
}

impl BodyLimitKind for Batch {
    fn limit(request: &Request) -> usize {
        request
            .data::<BatchBodyLimit>()
            .map(|l| l.0)
            .unwrap_or(256 * 1024)
    }
}

/// A JSON body of type `T` under the size limit of `L`.
pub struct Body<T, L>(pub T, PhantomData<L>);

impl<'a, T: Type + DeserializeOwned + Send, L: BodyLimitKind> ApiExtractor<'a> for Body<T, L> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        json_request_meta::<T>()
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _opts: ExtractParamOptions<()>,
    ) -> poem::Result<Self> {
        read_json(request, body, L::limit(request))
            .await
            .map(|v| Body(v, PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }
}
