//! Per-API-key rate limits: one token bucket per key, sized by its scope's `[rate_limits]`.
//!
//! Runs in front of the routes. A request whose `Authorization: Bearer` names a valid key is
//! charged one token from that key's bucket; over the limit it gets 429 `rate_limited` with a
//! `Retry-After` header before any route runs, so a limited request changes nothing. Requests
//! without a valid key pass untouched (the route answers 401), as do the health checks, the
//! OpenAPI document and the docs. A scope without limits costs nothing beyond one lookup.
//!
//! Buckets are keyed by the SHA-256 digest of the key, never the key, and only digests of
//! valid keys are ever stored, so the map is as small as the key set. Arithmetic is integer:
//! a bucket holds nanotokens (10⁹ per request) and refills `requests_per_second` of them per
//! elapsed nanosecond of a monotonic clock (`tokio::time::Instant`, so tests may pause time).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use poem::http::{StatusCode, header};
use poem::{Endpoint, IntoResponse, Request, Response};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::auth::{ApiKeys, Scope};
use super::error::ApiError;
use crate::config::{RateLimit, RateLimits};

/// One request, in nanotokens.
const NANO: u64 = 1_000_000_000;

/// Paths that are never limited, whatever key they carry.
fn exempt(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/openapi.json" | "/docs") || path.starts_with("/docs/")
}

/// Wraps the route tree with the rate limiter.
pub fn wrap<E: Endpoint + 'static>(ep: E, limits: RateLimits) -> impl Endpoint + 'static {
    RateLimited {
        inner: ep,
        limiter: Arc::new(Limiter::new(limits)),
    }
}

struct RateLimited<E> {
    inner: E,
    limiter: Arc<Limiter>,
}

impl<E: Endpoint> Endpoint for RateLimited<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        match self.limiter.check(&req) {
            Some(Ok(denied)) => return Ok(denied.into_response()),
            Some(Err(digest)) => req.set_data(ExtraCharge {
                limiter: self.limiter.clone(),
                digest,
            }),
            None => {}
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

/// Lets a route charge more than one token for a request that does more than one request's
/// work (a batch of `n` items costs `n`).
#[derive(Clone)]
pub struct ExtraCharge {
    limiter: Arc<Limiter>,
    digest: [u8; 32],
}

/// Charges `extra` more tokens to the request's key, if it is rate limited. A request that
/// cannot afford them is refused as a whole with 429 `rate_limited`.
pub fn charge_extra(req: &Request, extra: u64) -> Result<(), ApiError> {
    let Some(c) = req.data::<ExtraCharge>() else {
        return Ok(());
    };
    let mut known = c.limiter.lock();
    let Some(k) = known.get_mut(&c.digest) else {
        return Ok(());
    };
    match c.limiter.charge(k, Instant::now(), extra) {
        Some(denied) => Err(denied.into()),
        None => Ok(()),
    }
}

/// The token bucket of one key.
#[derive(Debug)]
struct Bucket {
    nanotokens: u64,
    last: Instant,
}

impl Bucket {
    fn full(limit: RateLimit, now: Instant) -> Bucket {
        Bucket {
            nanotokens: capacity(limit),
            last: now,
        }
    }

    /// Takes `n` tokens, or says how many nanoseconds until they are there.
    fn take(&mut self, limit: RateLimit, now: Instant, n: u64) -> Result<(), u64> {
        let want = NANO.saturating_mul(n);
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let refill = u64::try_from(elapsed.saturating_mul(u128::from(limit.requests_per_second)))
            .unwrap_or(u64::MAX);
        self.nanotokens = self.nanotokens.saturating_add(refill).min(capacity(limit));
        self.last = now;
        match self.nanotokens.checked_sub(want) {
            Some(rest) => {
                self.nanotokens = rest;
                Ok(())
            }
            None => Err((want - self.nanotokens).div_ceil(limit.requests_per_second.max(1))),
        }
    }
}

fn capacity(limit: RateLimit) -> u64 {
    limit.burst.saturating_mul(NANO)
}

/// What the limiter knows about one valid key.
#[derive(Debug)]
struct Known {
    scope: Scope,
    /// `None`: the key's scope is unlimited.
    bucket: Option<Bucket>,
}

struct Limiter {
    limits: RateLimits,
    known: Mutex<HashMap<[u8; 32], Known>>,
}

/// A refused request: its scope, the limit it hit, and the wait until the next token.
struct Denied {
    scope: Scope,
    limit: RateLimit,
    wait_ns: u64,
}

impl Limiter {
    fn new(limits: RateLimits) -> Limiter {
        Limiter {
            limits,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn limit_of(&self, scope: Scope) -> Option<RateLimit> {
        match scope {
            Scope::Admin => self.limits.admin,
            Scope::App => self.limits.app,
        }
    }

    /// Charges the request's key one token, if it has a valid, limited one: `Some(Ok(_))` if it
    /// is over its limit, `Some(Err(digest))` if it was charged (for later extra charges).
    fn check(&self, req: &Request) -> Option<Result<Denied, [u8; 32]>> {
        if self.limits.admin.is_none() && self.limits.app.is_none() {
            return None;
        }
        if exempt(req.uri().path()) {
            return None;
        }
        let token = bearer(req)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(known) = self.lock().get_mut(&digest) {
            return self.charged(known, now, digest);
        }
        // First request with this key (or an invalid key): ask the key set, outside the lock.
        let scope = req.data::<ApiKeys>()?.scope_of(token)?;
        let limit = self.limit_of(scope);
        let mut known = self.lock();
        let entry = known.entry(digest).or_insert_with(|| Known {
            scope,
            bucket: limit.map(|l| Bucket::full(l, now)),
        });
        self.charged(entry, now, digest)
    }

    fn charged(
        &self,
        known: &mut Known,
        now: Instant,
        digest: [u8; 32],
    ) -> Option<Result<Denied, [u8; 32]>> {
        known.bucket.as_ref()?;
        Some(self.charge(known, now, 1).ok_or(digest))
    }

    fn charge(&self, known: &mut Known, now: Instant, n: u64) -> Option<Denied> {
        let limit = self.limit_of(known.scope)?;
        let bucket = known.bucket.as_mut()?;
        let wait_ns = bucket.take(limit, now, n).err()?;
        Some(Denied {
            scope: known.scope,
            limit,
            wait_ns,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Known>> {
        // The map holds no invariant a panic could break: keep going with it.
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The key of `Authorization: Bearer <key>`, parsed as poem-openapi's bearer scheme does.
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_at_checked("Bearer".len())?;
    if !scheme.eq_ignore_ascii_case("Bearer") {
        return None;
    }
    let token = rest.strip_prefix(' ')?.trim_start();
    (!token.is_empty()).then_some(token)
}

impl Denied {
    /// Whole seconds until a token is back, at least 1.
    fn retry_after_s(&self) -> u64 {
        self.wait_ns.div_ceil(NANO).max(1)
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> ApiError {
        let retry = d.retry_after_s();
        let scope = match d.scope {
            Scope::Admin => "admin",
            Scope::App => "app",
        };
        tracing::debug!(scope, retry_after_s = retry, "request rate limited");
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "rate limit exceeded for this `{scope}` key: {} requests per second, burst {}; retry after {retry} s",
                d.limit.requests_per_second, d.limit.burst
            ),
        );
        e.retry_after = Some(retry);
        e
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limit(requests_per_second: u64, burst: u64) -> RateLimit {
        RateLimit {
            requests_per_second,
            burst,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let l = limit(2, 3);
        let t0 = Instant::now();
        let mut b = Bucket::full(l, t0);
        for _ in 0..3 {
            assert_eq!(b.take(l, t0, 1), Ok(()));
        }
        // Empty: the next token is half a second away.
        assert_eq!(b.take(l, t0, 1), Err(500_000_000));
        let t1 = t0 + Duration::from_millis(499);
        assert_eq!(b.take(l, t1, 1), Err(1_000_000));
        let t2 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(l, t2, 1), Ok(()));
        // A long pause refills to the burst, no further.
        let t3 = t2 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.take(l, t3, 1), Ok(()));
        }
        assert!(b.take(l, t3, 1).is_err());
    }

    #[test]
    fn extreme_limits_do_not_overflow() {
        let max = crate::config::RATE_LIMIT_MAX;
        let l = limit(max, max);
        let t0 = Instant::now();
        let mut b = Bucket::full(l, t0);
        assert_eq!(b.take(l, t0, 1), Ok(()));
        let later = t0 + Duration::from_secs(10 * 365 * 24 * 3600);
        assert_eq!(b.take(l, later, 1), Ok(()));
        assert_eq!(b.nanotokens, capacity(l) - NANO);
        let l = limit(1, 1);
        let mut b = Bucket::full(l, t0);
        assert_eq!(b.take(l, t0, 1), Ok(()));
        assert_eq!(b.take(l, t0, 1), Err(NANO));
    }

    #[test]
    fn retry_after_is_whole_seconds_and_at_least_one() {
        let d = |wait_ns| Denied {
            scope: Scope::App,
            limit: limit(1, 1),
            wait_ns,
        };
        assert_eq!(d(1).retry_after_s(), 1);
        assert_eq!(d(NANO).retry_after_s(), 1);
        assert_eq!(d(NANO + 1).retry_after_s(), 2);
        let resp = d(NANO + 1).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers().get(header::RETRY_AFTER),
            Some(&poem::http::HeaderValue::from_static("2"))
        );
    }

    #[test]
    fn bearer_parsing_matches_the_auth_scheme() {
        let req = |v: &str| Request::builder().header(header::AUTHORIZATION, v).finish();
        assert_eq!(bearer(&req("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&req("bearer  abc")), Some("abc"));
        assert_eq!(bearer(&req("Bearerabc")), None);
        assert_eq!(bearer(&req("Basic abc")), None);
        assert_eq!(bearer(&req("Bearer ")), None);
        assert_eq!(bearer(&Request::builder().finish()), None);
    }

    #[test]
    fn health_and_docs_are_exempt() {
        for p in [
            "/healthz",
            "/readyz",
            "/openapi.json",
            "/docs",
            "/docs/index.css",
        ] {
            assert!(exempt(p), "{p}");
        }
        for p in ["/v1/accounts/a", "/docsx", "/healthz/x"] {
            assert!(!exempt(p), "{p}");
        }
    }
}
