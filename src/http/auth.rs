//! API keys and their scopes.
//!
//! Keys are held only as SHA-256 digests and compared in constant time (`subtle`). Every route
//! but the health checks, the OpenAPI document and the Stripe webhook (signed instead) needs a
//! key; the scope
//! check happens in the route, so a key of too small a scope gets 403, not 401.
//!
//! Each scope may have several keys (a comma-separated list in its environment variable), so a
//! key is rotated by adding the new one, moving the apps over, then removing the old one.
//!
//! Wrong keys are rate limited per peer address ([`FailedAuth`]): past `[auth] failed_burst`
//! failures, a peer gets 429 `rate_limited` for every key it presents, right or wrong, until
//! its budget refills at `failed_per_minute`. (Refusing only wrong keys would tell a guesser
//! which guess was right.) IPv6 peers count per /64, the block one host usually has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use poem::Request;
use poem::http::StatusCode;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Consume, check and reads.
    App,
}

#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<([u8; 32], Scope)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys([redacted; {}])", self.keys.len())
    }
}

impl ApiKeys {
    pub fn add(&mut self, key: &str, scope: Scope) {
        self.keys
            .push((Sha256::digest(key.as_bytes()).into(), scope));
    }

    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Check every key, in constant time per key (`subtle`), so timing reveals nothing.
        let mut found = None;
        for (k, scope) in &self.keys {
            if bool::from(k[..].ct_eq(&digest[..])) && found.is_none() {
                found = Some(*scope);
            }
        }
        found
    }
}

/// `Authorization: Bearer <key>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_key")]
pub struct ApiKeyAuth(pub Scope);

async fn check_key(req: &Request, bearer: Bearer) -> poem::Result<Scope> {
    FailedAuth::admit(req)?;
    match req
        .data::<ApiKeys>()
        .and_then(|keys| keys.scope_of(&bearer.token))
    {
        Some(scope) => Ok(scope),
        None => {
            FailedAuth::count(req);
            Err(ApiError::unauthorized().into())
        }
    }
}

/// The peer's address, if the request came over TCP.
pub fn peer_ip(req: &Request) -> Option<IpAddr> {
    req.remote_addr().as_socket_addr().map(|a| a.ip())
}

pub use crate::config::FailedAuthLimit;

/// Peers tracked at most; past it, peers whose budget is full again are forgotten, and if
/// none is, the oldest half is (an attacker with that many addresses is not slowed by a
/// per-address limit anyway).
const MAX_PEERS: usize = 100_000;

/// Failed authentications per peer: a GCRA token bucket per address (IPv6: per /64), kept by
/// hand because the check must be able to look without spending (`governor` cannot).
pub struct FailedAuth {
    /// One token back every `interval`.
    interval: Duration,
    burst: u32,
    /// Per peer, the theoretical arrival time: the bucket is full when it is in the past.
    peers: Mutex<HashMap<IpAddr, tokio::time::Instant>>,
    /// Some peer has a record: the common case (none) costs one atomic load.
    any: AtomicBool,
}

impl FailedAuth {
    pub fn new(limit: FailedAuthLimit) -> FailedAuth {
        let per_minute = limit.per_minute.clamp(1, 60_000_000);
        FailedAuth {
            interval: Duration::from_micros(60_000_000 / per_minute),
            burst: u32::try_from(limit.burst.max(1)).unwrap_or(u32::MAX),
            peers: Mutex::new(HashMap::new()),
            any: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, tokio::time::Instant>> {
        // A map of times: no invariant a panic could break.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How far ahead a peer's arrival time may be and still allow an attempt.
    fn tolerance(&self) -> Duration {
        self.interval.saturating_mul(self.burst.saturating_sub(1))
    }

    /// The wait before `ip` may try again, if it used up its failures.
    pub fn limited(&self, ip: IpAddr, now: tokio::time::Instant) -> Option<Duration> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let tat = *self.lock().get(&bucket(ip))?;
        let allowed_from = tat.checked_sub(self.tolerance())?;
        (allowed_from > now).then(|| allowed_from - now)
    }

    /// Counts one failure of `ip`.
    pub fn record(&self, ip: IpAddr, now: tokio::time::Instant) {
        let mut peers = self.lock();
        if peers.len() >= MAX_PEERS {
            peers.retain(|_, tat| *tat > now);
            if peers.len() >= MAX_PEERS {
                let mut tats: Vec<_> = peers.values().copied().collect();
                tats.sort_unstable();
                let median = tats[tats.len() / 2];
                peers.retain(|_, tat| *tat > median);
            }
        }
        let tat = peers.entry(bucket(ip)).or_insert(now);
        *tat = (*tat).max(now) + self.interval;
        self.any.store(true, Ordering::Release);
    }

    /// Before checking a request's credential: 429 if its peer used up its failures (the
    /// limiter installed as request data; none installed, nothing limited).
    pub fn admit(req: &Request) -> Result<(), ApiError> {
        if let (Some(f), Some(ip)) = (req.data::<Arc<FailedAuth>>(), peer_ip(req))
            && let Some(wait) = f.limited(ip, tokio::time::Instant::now())
        {
            return Err(FailedAuth::refusal(wait));
        }
        Ok(())
    }

    /// Counts a failed credential against the request's peer.
    pub fn count(req: &Request) {
        if let (Some(f), Some(ip)) = (req.data::<Arc<FailedAuth>>(), peer_ip(req)) {
            f.record(ip, tokio::time::Instant::now());
        }
    }

    /// 429 `rate_limited`, with `Retry-After`.
    pub fn refusal(wait: Duration) -> ApiError {
        let retry = super::ratelimit::retry_after_s(wait);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many failed authentications from this address; retry after {retry} s with a valid key"
            ),
        );
        e.retry_after = Some(retry);
        e
    }
}

/// The unit an address is limited as: itself (IPv4), or its /64 (IPv6).
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl ApiKeyAuth {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.0 {
            Scope::Admin => Ok(()),
            Scope::App => Err(ApiError::forbidden("admin")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_their_scope_only() {
        let mut keys = ApiKeys::default();
        keys.add("admin-secret-key-0123", Scope::Admin);
        keys.add("app-secret-key-456789", Scope::App);
        assert_eq!(keys.scope_of("admin-secret-key-0123"), Some(Scope::Admin));
        assert_eq!(keys.scope_of("app-secret-key-456789"), Some(Scope::App));
        assert_eq!(keys.scope_of("admin-secret-key-012"), None);
        assert_eq!(keys.scope_of(""), None);
        assert!(!format!("{keys:?}").contains("secret"));
    }

    #[test]
    fn a_scope_may_have_several_keys() {
        let mut keys = ApiKeys::default();
        keys.add("app-old-key-0123456789", Scope::App);
        keys.add("app-new-key-0123456789", Scope::App);
        assert_eq!(keys.scope_of("app-old-key-0123456789"), Some(Scope::App));
        assert_eq!(keys.scope_of("app-new-key-0123456789"), Some(Scope::App));
    }

    fn limiter() -> FailedAuth {
        FailedAuth::new(FailedAuthLimit {
            per_minute: 30,
            burst: 3,
        })
    }

    #[test]
    fn a_peer_is_limited_after_its_burst_of_failures_then_refills() {
        let f = limiter();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(f.limited(ip, t0), None);
            f.record(ip, t0);
        }
        // Three failures at once: the fourth attempt waits one interval (2 s at 30/min).
        assert_eq!(f.limited(ip, t0), Some(Duration::from_secs(2)));
        assert_eq!(f.limited(other, t0), None);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(f.limited(ip, later), None);
        f.record(ip, later);
        assert!(f.limited(ip, later).is_some());
    }

    #[test]
    fn ipv6_peers_count_per_slash_64() {
        let f = limiter();
        let t0 = tokio::time::Instant::now();
        for i in 0..3u16 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i + 1));
            f.record(ip, t0);
        }
        let same_64: IpAddr = "2001:db8:0:1::ffff".parse().unwrap();
        let next_64: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        assert!(f.limited(same_64, t0).is_some());
        assert_eq!(f.limited(next_64, t0), None);
    }

    #[test]
    fn the_peer_table_stays_bounded() {
        let f = limiter();
        let t0 = tokio::time::Instant::now();
        for i in 0..(u32::try_from(MAX_PEERS).unwrap() + 10) {
            f.record(IpAddr::V4(std::net::Ipv4Addr::from(i)), t0);
        }
        assert!(f.lock().len() <= MAX_PEERS);
    }
}
