//! Request ids: every response carries `X-Request-Id`, every error body its `request_id`, and
//! every log line about a failure the same id, so an operator finds the internal details of a
//! client's error in the log without the client ever seeing them.
//!
//! A client (or a proxy in front) may send its own `X-Request-Id` (1 to 64 characters of
//! `A-Z a-z 0-9 . _ : -`); otherwise the daemon makes one: a random prefix drawn at start and
//! a counter, 16 hex digits, unique within the process and cheap (no lock, no syscall).
//!
//! The id lives in a task-local for the request's whole handling, so error rendering
//! ([`current`]) and log sites read it without being handed it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use poem::http::HeaderValue;
use poem::{Endpoint, IntoResponse, Request, Response};

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The header, in both directions.
pub const HEADER: &str = "x-request-id";

/// The id of the request being handled on this task, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

fn next_id() -> String {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        // Without randomness the prefix is 0: ids stay unique within the process.
        let _ = getrandom::fill(&mut b);
        u32::from_le_bytes(b)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix:08x}{:08x}", n & 0xffff_ffff)
}

/// A client's id, if it is one we accept.
fn acceptable(v: &str) -> bool {
    (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Wraps the whole route tree (outside the error rendering, so rendered errors see the id).
pub fn wrap<E: Endpoint + 'static>(ep: E) -> impl Endpoint<Output = Response> + 'static {
    RequestIds { inner: ep }
}

struct RequestIds<E> {
    inner: E,
}

impl<E: Endpoint> Endpoint for RequestIds<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let id = req
            .headers()
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| acceptable(v))
            .map_or_else(next_id, str::to_owned);
        let header = HeaderValue::from_str(&id).ok();
        let mut resp = REQUEST_ID
            .scope(id, async { self.inner.get_response(req).await })
            .await;
        if let Some(h) = header {
            resp.headers_mut().insert(HEADER, h);
        }
        Ok(resp.into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_ids_are_unique_and_well_formed() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(acceptable(&a));
    }

    #[test]
    fn only_plain_client_ids_are_kept() {
        assert!(acceptable("req-123_abc.def:9"));
        assert!(!acceptable(""));
        assert!(!acceptable("has space"));
        assert!(!acceptable("newline\n"));
        assert!(!acceptable(&"x".repeat(65)));
    }
}
