//! Per-API-key rate limits: one token bucket per key, sized by its scope's `[rate_limits]`.
//!
//! Runs in front of the routes. A request whose `Authorization: Bearer` names a valid key is
//! charged one token from that key's bucket; over the limit it gets 429 `rate_limited` with a
//! `Retry-After` header before any route runs, so a limited request changes nothing. Requests
//! without a valid key pass untouched (the route answers 401), as do the health checks, the
//! OpenAPI document and the docs. A scope without limits costs nothing beyond one lookup.
//!
//! The buckets are `governor`'s (GCRA, which is a token bucket that refills continuously): one
//! keyed limiter per limited scope, keyed by the SHA-256 digest of the key, never the key. Only
//! digests of valid keys are ever stored, so the maps are as small as the key set. Time is
//! tokio's monotonic clock ([`TokioClock`]), so tests may pause it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use meterd_actors::model::TokioClock;
use poem::http::{StatusCode, header};
use poem::{Endpoint, IntoResponse, Request, Response};
use sha2::{Digest, Sha256};

use super::auth::{ApiKeys, Scope};
use super::error::ApiError;
use crate::config::{RateLimit, RateLimits};

/// A keyed rate limiter on tokio's clock (also the checkout limit's, keyed by account).
pub type KeyedLimiter<K> =
    RateLimiter<K, HashMapStateStore<K>, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// The bucket of a [`RateLimit`]: `burst` tokens, one back every `1 / requests_per_second`.
fn quota(limit: RateLimit) -> Quota {
    // Both are 1 to 10^9 (see `RATE_LIMIT_MAX`), so they fit a `u32`.
    let n =
        |v: u64| NonZeroU32::new(u32::try_from(v).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(n(limit.requests_per_second)).allow_burst(n(limit.burst))
}

/// Whole seconds for `Retry-After` (rounded up, at least 1): after that long the request that
/// was refused fits again.
pub fn retry_after_s(wait: Duration) -> u64 {
    let up = u64::from(wait.subsec_nanos() > 0);
    wait.as_secs().saturating_add(up).max(1)
}

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
    let Some(scope) = c.limiter.scope_of(&c.digest) else {
        return Ok(());
    };
    match c.limiter.charge(scope, &c.digest, extra) {
        Some(denied) => Err(denied.into()),
        None => Ok(()),
    }
}

/// The buckets of one limited scope.
struct ScopeLimiter {
    limit: RateLimit,
    buckets: KeyedLimiter<[u8; 32]>,
}

struct Limiter {
    admin: Option<ScopeLimiter>,
    app: Option<ScopeLimiter>,
    /// The scope of each valid key seen, by digest.
    known: Mutex<HashMap<[u8; 32], Scope>>,
}

/// A refused request: its scope, the limit it hit, and the wait until it fits (`None`: it
/// never can, being larger than the burst).
struct Denied {
    scope: Scope,
    limit: RateLimit,
    wait: Option<Duration>,
}

impl Limiter {
    fn new(limits: RateLimits) -> Limiter {
        let scope = |l: Option<RateLimit>| {
            l.map(|limit| ScopeLimiter {
                limit,
                buckets: RateLimiter::hashmap_with_clock(quota(limit), TokioClock),
            })
        };
        Limiter {
            admin: scope(limits.admin),
            app: scope(limits.app),
            known: Mutex::new(HashMap::new()),
        }
    }

    fn scope_limiter(&self, scope: Scope) -> Option<&ScopeLimiter> {
        match scope {
            Scope::Admin => self.admin.as_ref(),
            Scope::App => self.app.as_ref(),
        }
    }

    fn scope_of(&self, digest: &[u8; 32]) -> Option<Scope> {
        self.lock().get(digest).copied()
    }

    /// Charges the request's key one token, if it has a valid, limited one: `Some(Ok(_))` if it
    /// is over its limit, `Some(Err(digest))` if it was charged (for later extra charges).
    fn check(&self, req: &Request) -> Option<Result<Denied, [u8; 32]>> {
        if self.admin.is_none() && self.app.is_none() {
            return None;
        }
        if exempt(req.uri().path()) {
            return None;
        }
        let token = bearer(req)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let scope = match self.scope_of(&digest) {
            Some(scope) => scope,
            None => {
                // First request with this key (or an invalid key): ask the key set.
                let scope = req.data::<ApiKeys>()?.scope_of(token)?;
                self.lock().insert(digest, scope);
                scope
            }
        };
        self.scope_limiter(scope)?;
        Some(self.charge(scope, &digest, 1).ok_or(digest))
    }

    /// Takes `n` tokens from the key's bucket (all or none); `Some` if it cannot.
    fn charge(&self, scope: Scope, digest: &[u8; 32], n: u64) -> Option<Denied> {
        let s = self.scope_limiter(scope)?;
        let n = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX))?;
        let wait = match s.buckets.check_key_n(digest, n) {
            Ok(Ok(())) => return None,
            Ok(Err(not_until)) => Some(not_until.wait_time_from(TokioClock.now())),
            Err(_insufficient_capacity) => None,
        };
        Some(Denied {
            scope,
            limit: s.limit,
            wait,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Scope>> {
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

impl From<Denied> for ApiError {
    fn from(d: Denied) -> ApiError {
        let scope = match d.scope {
            Scope::Admin => "admin",
            Scope::App => "app",
        };
        let (rps, burst) = (d.limit.requests_per_second, d.limit.burst);
        let Some(wait) = d.wait else {
            // No wait helps: say so rather than promise a time after which it fails again.
            tracing::debug!(scope, "request larger than its rate limit's burst");
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this request costs more than this `{scope}` key's burst of {burst} requests ({rps} requests per second): it can never be afforded at once; split it"
                ),
            );
        };
        let retry = retry_after_s(wait);
        tracing::debug!(scope, retry_after_s = retry, "request rate limited");
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "rate limit exceeded for this `{scope}` key: {rps} requests per second, burst {burst}; retry after {retry} s"
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
    use governor::clock::FakeRelativeClock;
    use governor::nanos::Nanos;
    use governor::state::{InMemoryState, NotKeyed};

    use super::*;

    fn limit(requests_per_second: u64, burst: u64) -> RateLimit {
        RateLimit {
            requests_per_second,
            burst,
        }
    }

    type TestBucket =
        RateLimiter<NotKeyed, InMemoryState, FakeRelativeClock, NoOpMiddleware<Nanos>>;

    /// A bucket of `l` on a clock the test moves.
    fn bucket(l: RateLimit) -> (FakeRelativeClock, TestBucket) {
        let clock = FakeRelativeClock::default();
        let b = RateLimiter::direct_with_clock(quota(l), clock.clone());
        (clock, b)
    }

    /// Takes `n` tokens, or gives the wait until they are there (`None`: never).
    fn take(clock: &FakeRelativeClock, b: &TestBucket, n: u32) -> Result<(), Option<Duration>> {
        match b.check_n(NonZeroU32::new(n).unwrap()) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(clock.now()))),
            Err(_) => Err(None),
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let l = limit(2, 3);
        let (clock, b) = bucket(l);
        for _ in 0..3 {
            assert_eq!(take(&clock, &b, 1), Ok(()));
        }
        // Empty: the next token is half a second away.
        assert_eq!(take(&clock, &b, 1), Err(Some(Duration::from_millis(500))));
        clock.advance(Duration::from_millis(499));
        assert_eq!(take(&clock, &b, 1), Err(Some(Duration::from_millis(1))));
        clock.advance(Duration::from_millis(1));
        assert_eq!(take(&clock, &b, 1), Ok(()));
        // A long pause refills to the burst, no further.
        clock.advance(Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(take(&clock, &b, 1), Ok(()));
        }
        assert!(take(&clock, &b, 1).is_err());
    }

    #[test]
    fn several_tokens_are_taken_all_or_none() {
        let l = limit(1, 10);
        let (clock, b) = bucket(l);
        assert_eq!(take(&clock, &b, 6), Ok(()));
        // 4 left: 6 more are 2 s away, and nothing was taken by asking.
        assert_eq!(take(&clock, &b, 6), Err(Some(Duration::from_secs(2))));
        assert_eq!(take(&clock, &b, 4), Ok(()));
        assert_eq!(take(&clock, &b, 1), Err(Some(Duration::from_secs(1))));
        // More than the burst can never be taken.
        assert_eq!(take(&clock, &b, 11), Err(None));
        clock.advance(Duration::from_secs(3600));
        assert_eq!(take(&clock, &b, 11), Err(None));
        assert_eq!(take(&clock, &b, 10), Ok(()));
    }

    #[test]
    fn extreme_limits_do_not_overflow() {
        let max = crate::config::RATE_LIMIT_MAX;
        let l = limit(max, max);
        let (clock, b) = bucket(l);
        assert_eq!(take(&clock, &b, 1), Ok(()));
        clock.advance(Duration::from_secs(10 * 365 * 24 * 3600));
        assert_eq!(take(&clock, &b, 1), Ok(()));
        assert_eq!(take(&clock, &b, u32::try_from(max).unwrap() - 1), Ok(()));
        assert_eq!(take(&clock, &b, 1), Err(Some(Duration::from_nanos(1))));
        let l = limit(1, 1);
        let (clock, b) = bucket(l);
        assert_eq!(take(&clock, &b, 1), Ok(()));
        assert_eq!(take(&clock, &b, 1), Err(Some(Duration::from_secs(1))));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_s(Duration::ZERO), 1);
        assert_eq!(retry_after_s(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_s(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_s(Duration::from_nanos(1_000_000_001)), 2);
        assert_eq!(retry_after_s(Duration::from_millis(59_500)), 60);
        let d = |wait| Denied {
            scope: Scope::App,
            limit: limit(1, 1),
            wait,
        };
        let resp = d(Some(Duration::from_nanos(1_000_000_001))).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers().get(header::RETRY_AFTER),
            Some(&poem::http::HeaderValue::from_static("2"))
        );
        // Larger than the burst: refused with no promise of a time.
        let resp = d(None).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers().get(header::RETRY_AFTER), None);
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
