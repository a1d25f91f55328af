//! A black-box HTTP fuzzer (issue 11): random methods, paths, query strings, headers and
//! bodies, written as raw HTTP/1.1 to a daemon on loopback. Every request is well formed at
//! the HTTP level (so it must be answered); its content is hostile. A request left without an
//! answer, or answered 5xx, is a finding. Shared by the test suite (`tests/it/fuzz.rs`, a
//! short run against the in-process daemon) and `benches/httpfuzz.rs` (a long run against the
//! release binary).

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One generated request.
#[derive(Debug, Clone)]
pub struct FuzzRequest {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

const METHODS: &[&str] = &[
    "GET", "GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE",
    "FOO",
];

const ROUTES: &[&str] = &[
    "/v1/accounts/{id}",
    "/v1/accounts/{id}/consume",
    "/v1/accounts/{id}/check",
    "/v1/accounts/{id}/credits",
    "/v1/accounts/{id}/topups",
    "/v1/accounts/{id}/reservations",
    "/v1/reservations/{rid}/commit",
    "/v1/reservations/{rid}/release",
    "/v1/consume/batch",
    "/v1/accounts/{id}/checkout",
    "/v1/accounts/{id}/portal",
    "/v1/accounts/{id}/ledger",
    "/v1/accounts/{id}/usage",
    "/v1/accounts/{id}/entitlements",
    "/v1/accounts/{id}/entitlements/{id}",
    "/v1/accounts/{id}/alerts",
    "/v1/accounts/{id}/invoices",
    "/v1/accounts/{id}/transactions",
    "/v1/admin/outbox",
    "/v1/admin/outbox/{id}/retry",
    "/v1/admin/outbox/retry-dead",
    "/v1/admin/webhooks",
    "/v1/admin/webhooks/{id}/replay",
    "/v1/admin/webhooks/backfill",
    "/v1/admin/meter-errors",
    "/v1/admin/verify",
    "/webhooks/stripe",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/{id}",
    "/v1/{id}/{id}",
];

const QUERY_KEYS: &[&str] = &[
    "limit",
    "after_seq",
    "after",
    "format",
    "from",
    "to",
    "granularity",
    "state",
    "status",
    "cursor",
];

/// A hostile string: empty, huge, unicode, control characters, numbers in disguise, paths.
fn nasty_string(rng: &mut StdRng) -> String {
    match rng.random_range(0..14) {
        0 => String::new(),
        1 => "x".repeat(rng.random_range(100..20_000)),
        2 => "ünï çødé 🦀".into(),
        3 => "\u{0}\u{1}\n\r\t".into(),
        4 => "-1".into(),
        5 => "18446744073709551616".into(),
        6 => "9007199254740993".into(),
        7 => "../../etc/passwd".into(),
        8 => "2026-13-45T99:99:99Z".into(),
        9 => "1e309".into(),
        10 => "null".into(),
        11 => "%00%ff%".into(),
        12 => ["csv", "json", "day", "hour", "pending", "failed", "dead"][rng.random_range(0..7)]
            .into(),
        _ => (0..rng.random_range(1..12))
            .map(|_| char::from(rng.random_range(b'!'..=b'~')))
            .collect(),
    }
}

fn nasty_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..16) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<u64>()),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(9_007_199_254_740_993u64),
        7 => json!(rng.random_range(-1e300..1e300)),
        8 => json!(0),
        9 => json!(1),
        10 => json!(-1),
        11 if depth < 4 => Value::Array(
            (0..rng.random_range(0..5))
                .map(|_| nasty_value(rng, depth + 1))
                .collect(),
        ),
        12 if depth < 4 => Value::Object(
            (0..rng.random_range(0..5))
                .map(|_| (field(rng), nasty_value(rng, depth + 1)))
                .collect(),
        ),
        13 => {
            // Deep nesting.
            let mut v = json!(1);
            for _ in 0..rng.random_range(10..300) {
                v = json!([v]);
            }
            v
        }
        _ => Value::String(nasty_string(rng)),
    }
}

const FIELDS: &[&str] = &[
    "plan",
    "seats",
    "email",
    "stripe_customer_id",
    "metadata",
    "spend_cap",
    "amount",
    "action",
    "period",
    "start",
    "end",
    "status",
    "overrides",
    "included",
    "overage",
    "credits_per_unit",
    "meter",
    "quantity",
    "idempotency_key",
    "reason",
    "priority",
    "effective_at",
    "expires_at",
    "category",
    "external_id",
    "package",
    "ttl_s",
    "items",
    "account_id",
    "kind",
    "id",
    "type",
    "data",
    "object",
];

fn field(rng: &mut StdRng) -> String {
    if rng.random_range(0..8) == 0 {
        nasty_string(rng)
    } else {
        FIELDS[rng.random_range(0..FIELDS.len())].into()
    }
}

/// A plausible body with hostile values in it.
fn body(rng: &mut StdRng) -> Vec<u8> {
    let plausible = json!({
        "plan": "payg", "meter": "tokens", "quantity": 3, "idempotency_key": "k1",
        "amount": 10, "reason": "r", "package": "credits_500", "external_id": "x",
        "ttl_s": 60, "kind": "subscription",
        "items": [{"account_id": "fz", "meter": "tokens", "quantity": 1, "idempotency_key": "b"}],
        "spend_cap": {"amount": 100, "action": "block"},
        "period": {"start": "2026-12-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"},
    });
    match rng.random_range(0..6) {
        0 => (0..rng.random_range(0..512))
            .map(|_| rng.random())
            .collect(),
        1 => nasty_value(rng, 0).to_string().into_bytes(),
        2 => Vec::new(),
        _ => {
            let mut v = plausible;
            let obj = v.as_object_mut().unwrap();
            let keys: Vec<String> = obj.keys().cloned().collect();
            // Keep a random subset of the fields, replace some, add unknown ones.
            for k in keys {
                match rng.random_range(0..5) {
                    0 => {
                        obj.remove(&k);
                    }
                    1 => {
                        obj.insert(k, nasty_value(rng, 0));
                    }
                    _ => {}
                }
            }
            if rng.random_range(0..4) == 0 {
                obj.insert(field(rng), nasty_value(rng, 0));
            }
            let mut text = v.to_string().into_bytes();
            if rng.random_range(0..8) == 0 && !text.is_empty() {
                let cut = rng.random_range(0..text.len());
                text.truncate(cut);
            }
            text
        }
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn id(rng: &mut StdRng) -> String {
    match rng.random_range(0..4) {
        0 => "fz".into(),
        1 => "fz:7".into(),
        _ => percent_encode(&nasty_string(rng)),
    }
}

/// A random request; `keys` are the admin and app keys (sent right, wrong, or not at all).
pub fn request(rng: &mut StdRng, keys: (&str, &str), webhook_signature: &str) -> FuzzRequest {
    let route = ROUTES[rng.random_range(0..ROUTES.len())];
    // Mostly the route's own method (to reach its handler), sometimes any.
    let natural = if route == "/v1/accounts/{id}" {
        if rng.random() { "PUT" } else { "GET" }
    } else if [
        "consume",
        "check",
        "credits",
        "topups",
        "reservations",
        "commit",
        "release",
        "batch",
        "checkout",
        "portal",
        "retry",
        "replay",
        "backfill",
        "webhooks/stripe",
    ]
    .iter()
    .any(|w| route.ends_with(w))
    {
        "POST"
    } else {
        "GET"
    };
    let method = if rng.random_range(0..4) == 0 {
        METHODS[rng.random_range(0..METHODS.len())]
    } else {
        natural
    }
    .to_owned();
    let mut target = String::new();
    let mut rest = route;
    while let Some(i) = rest.find('{') {
        target.push_str(&rest[..i]);
        let end = rest[i..].find('}').map_or(rest.len(), |e| i + e + 1);
        target.push_str(&id(rng));
        rest = &rest[end..];
    }
    target.push_str(rest);
    if rng.random_range(0..3) == 0 {
        let q: Vec<String> = (0..rng.random_range(1..4))
            .map(|_| {
                format!(
                    "{}={}",
                    QUERY_KEYS[rng.random_range(0..QUERY_KEYS.len())],
                    percent_encode(&nasty_string(rng))
                )
            })
            .collect();
        target.push('?');
        target.push_str(&q.join("&"));
    }
    let mut headers = Vec::new();
    match rng.random_range(0..5) {
        0 => headers.push(("Authorization".into(), format!("Bearer {}", keys.0))),
        1 | 2 => headers.push(("Authorization".into(), format!("Bearer {}", keys.1))),
        3 => headers.push(("Authorization".into(), "Bearer wrong-key-0123456789".into())),
        _ => {}
    }
    let content_types = [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/vnd.api+json",
        "multipart/form-data; boundary=x",
    ];
    if rng.random_range(0..6) != 0 {
        headers.push((
            "Content-Type".into(),
            content_types[rng.random_range(0..content_types.len())].into(),
        ));
    }
    if rng.random_range(0..4) == 0 {
        headers.push(("Idempotency-Key".into(), printable(rng)));
    }
    if rng.random_range(0..4) == 0 {
        headers.push(("X-Request-Id".into(), printable(rng)));
    }
    if target.starts_with("/webhooks") || rng.random_range(0..8) == 0 {
        let sig = match rng.random_range(0..3) {
            0 => webhook_signature.to_owned(),
            1 => printable(rng),
            _ => format!("t={},v1={}", rng.random::<i64>(), "ab".repeat(32)),
        };
        headers.push(("Stripe-Signature".into(), sig));
    }
    let body = if matches!(method.as_str(), "GET" | "HEAD") && rng.random_range(0..4) != 0 {
        Vec::new()
    } else {
        body(rng)
    };
    FuzzRequest {
        method,
        target,
        headers,
        body,
    }
}

/// Visible ASCII (a header value HTTP allows), sometimes long.
fn printable(rng: &mut StdRng) -> String {
    let n = if rng.random_range(0..10) == 0 {
        rng.random_range(100..4000)
    } else {
        rng.random_range(0..40)
    };
    (0..n)
        .map(|_| char::from(rng.random_range(b' '..=b'~')))
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The answer's status and error `code` (if any), or `None` if the connection closed without
/// one (a finding).
pub async fn send(
    addr: SocketAddr,
    r: &FuzzRequest,
) -> std::io::Result<Option<(u16, Option<String>)>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!("{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\n", r.method, r.target);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    s.write_all(head.as_bytes()).await?;
    // The server may answer (and close) before reading the whole body.
    let _ = s.write_all(&r.body).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Err(_) => return Ok(None),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > 64 * 1024 {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    let Some(status) = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
    else {
        return Ok(None);
    };
    let code = text.split_once("\r\n\r\n").and_then(|(_, body)| {
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
    });
    Ok(Some((status, code)))
}

/// 5xx answers that describe the daemon's setup, not the request (documented: no Stripe key,
/// no webhook secret): not findings.
pub fn setup_answer(status: u16, code: Option<&str>) -> bool {
    status == 503
        && matches!(
            code,
            Some(
                "stripe_offline"
                    | "stripe_not_configured"
                    | "stripe_unavailable"
                    | "webhook_not_configured"
            )
        )
}
