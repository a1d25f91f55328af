//! Stripe webhook benchmark: verified + durably logged deliveries per second at
//! `POST /webhooks/stripe`, the answer latency, how fast the webhook actor applies the logged
//! events to the account, and the cost of duplicate deliveries.
//!
//! Run with `cargo bench --bench webhooks` (release profile). Environment:
//! - `WEBHOOKS_EVENTS`: distinct deliveries to send (default 20000).
//! - `WEBHOOKS_CONNS`: keep-alive connections, one request in flight on each (default 32).
//! - `WEBHOOKS_DUPLICATES`: deliveries re-sent in the duplicate phase (default 5000).
//! - `WEBHOOKS_APPLY_TIMEOUT_S`: longest wait for the log to have 0 pending (default 300).
//! - `WEBHOOKS_CONFIG`: the daemon's config file (default: the repository's config.toml).
//!
//! 1. It starts the release `meterd` (`serve --config config.toml --listen 127.0.0.1:0
//!    --data-dir <fresh tempdir>`, so `sync = "fdatasync"`) with a signing secret in
//!    `STRIPE_WEBHOOK_SECRET` and no Stripe key (offline: no backfill, no Stripe calls).
//! 2. It creates `acct_acme` on `free` and links it to Stripe customer `cus_FKNrXbjePvoq7c`
//!    (the customer of the shared event payloads). Not timed.
//! 3. Main phase: `WEBHOOKS_EVENTS` distinct deliveries over `WEBHOOKS_CONNS` connections. The
//!    bodies are real events from `tests/fixtures/stripe/events/` (round robin over four types) with
//!    the top-level `id` rewritten to be unique, re-serialised (pretty, like Stripe), and
//!    signed at send time (`t` = now) over the exact bytes sent. A 200 must say
//!    `{"received":true,"duplicate":false}`; anything else is an error.
//! 4. Apply: from the last answer, `GET /v1/admin/webhooks?limit=1` every 200 ms until the
//!    log has 0 pending (each poll counts the whole log, so it costs the daemon a little).
//! 5. Duplicate phase: `WEBHOOKS_DUPLICATES` of the same deliveries (spread over the log),
//!    re-signed with a new `t`, as Stripe's retries are; every answer must be 200
//!    `duplicate:true`, and the log must not grow.
//! 6. SIGTERM; the daemon must exit 0.
//!
//! Latency is per request, from send to the end of the response body (hdrhistogram, µs).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::float_arithmetic
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sha2::Sha256;
use tokio::net::TcpStream;

const ADMIN_KEY: &str = "webhooks-admin-key-0123456789";
const APP_KEY: &str = "webhooks-app-key-0123456789ab";
const SECRET: &str = "whsec_bench_meterd_0123456789abcdef";
const ACCOUNT: &str = "acct_acme";
const CUSTOMER: &str = "cus_FKNrXbjePvoq7c";
/// Real payloads (all of customer `cus_FKNrXbjePvoq7c`), sent round robin.
const EVENT_FILES: [&str; 4] = [
    "customer.updated.json",
    "invoice.paid.json",
    "payment_method.attached.json",
    "customer.subscription.updated.seat_change.json",
];
const POLL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

struct Settings {
    events: usize,
    conns: usize,
    duplicates: usize,
    apply_timeout: Duration,
    config: PathBuf,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let s = Settings {
            events: env_num("WEBHOOKS_EVENTS", 20_000usize),
            conns: env_num("WEBHOOKS_CONNS", 32usize),
            duplicates: env_num("WEBHOOKS_DUPLICATES", 5_000usize),
            apply_timeout: Duration::from_secs(env_num("WEBHOOKS_APPLY_TIMEOUT_S", 300u64)),
            config: std::env::var_os("WEBHOOKS_CONFIG")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")),
        };
        assert!(s.events >= 1, "WEBHOOKS_EVENTS must be at least 1");
        assert!(s.conns >= 1, "WEBHOOKS_CONNS must be at least 1");
        assert!(
            s.duplicates <= s.events,
            "WEBHOOKS_DUPLICATES must be at most WEBHOOKS_EVENTS"
        );
        s
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings (Linux): CPU time, peak RSS, machine CPU
// ---------------------------------------------------------------------------------------------

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in ticks.
fn proc_cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(close) = s.rfind(')') else { return 0 };
    let rest: Vec<&str> = s[close + 2..].split_whitespace().collect();
    let get = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// (busy, total) jiffies over all CPUs from /proc/stat.
fn machine_cpu() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn ncpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// CPU use over a window, in cores: the daemon, this process (the client), the rest.
struct CpuWindow {
    tck: f64,
    pid: u32,
    start: Instant,
    daemon0: u64,
    me0: u64,
    mach0: (u64, u64),
}

struct CpuUse {
    daemon: f64,
    client: f64,
    other: f64,
    load: String,
}

impl CpuWindow {
    fn start(pid: u32) -> CpuWindow {
        CpuWindow {
            tck: clk_tck(),
            pid,
            start: Instant::now(),
            daemon0: proc_cpu_ticks(pid),
            me0: proc_cpu_ticks(std::process::id()),
            mach0: machine_cpu(),
        }
    }

    fn end(self) -> CpuUse {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let daemon = proc_cpu_ticks(self.pid).saturating_sub(self.daemon0) as f64 / self.tck / secs;
        let client =
            proc_cpu_ticks(std::process::id()).saturating_sub(self.me0) as f64 / self.tck / secs;
        let mach1 = machine_cpu();
        let busy = if mach1.1 > self.mach0.1 {
            (mach1.0 - self.mach0.0) as f64 / (mach1.1 - self.mach0.1) as f64
        } else {
            0.0
        };
        CpuUse {
            daemon,
            client,
            other: (busy * ncpus() - daemon - client).max(0.0),
            load: load_avg(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------------------------

/// What the daemon wrote to stderr (`RUST_LOG=warn`): counts and the first lines.
#[derive(Default)]
struct LogTally {
    warn: u64,
    error: u64,
    other: u64,
    first: Vec<String>,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<LogTally>>,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("meterd-webhooks-")
            .tempdir()
            .expect("create a temporary data dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_meterd"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path())
            .env("METERD_ADMIN_KEY", ADMIN_KEY)
            .env("METERD_APP_KEY", APP_KEY)
            .env("STRIPE_WEBHOOK_SECRET", SECRET)
            // Offline on purpose: no backfill from, and no calls to, a real Stripe account.
            .env_remove("STRIPE_SECRET_KEY")
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meterd");
        let log = Arc::new(Mutex::new(LogTally::default()));
        let stderr = child.stderr.take().unwrap();
        let tally = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                let mut t = tally.lock().unwrap();
                if line.contains(" ERROR ") {
                    t.error += 1;
                } else if line.contains(" WARN ") {
                    t.warn += 1;
                } else {
                    t.other += 1;
                }
                if t.first.len() < 8 {
                    t.first.push(line);
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stdout for the daemon's whole life so it never blocks on a pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("meterd listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        let started = Instant::now();
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(a) => break a.parse().expect("meterd printed a socket address"),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    if started.elapsed() < Duration::from_secs(30) => {}
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    let first = log.lock().unwrap().first.join("\n");
                    panic!("meterd did not start ({e:?}, {status:?}); stderr:\n{first}");
                }
            }
        };
        println!(
            "meterd pid {} listening on {addr}, data dir {}",
            child.id(),
            dir.path().display()
        );
        Daemon {
            child,
            addr,
            log,
            dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status (at most 60 s).
    fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM {pid} failed");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait for meterd") {
                return s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("meterd did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only does something on a panic path (sigterm waits for the exit).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deliveries: real payloads with a unique id, signed like Stripe does
// ---------------------------------------------------------------------------------------------

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` (as tests/it/support/signer.rs).
fn sign(body: &[u8], secret: &str, t: i64) -> String {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const PLACEHOLDER: &str = "evt_meterd_bench_placeholder_id";

/// One event re-serialised with a placeholder id, split around it: a delivery is
/// `head + id + tail`, byte for byte what re-serialising the event with that id gives
/// (checked at load), without keeping 20,000 bodies in memory.
struct Template {
    event_type: String,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Template {
    fn body(&self, id: &str) -> Bytes {
        let mut b = Vec::with_capacity(self.head.len() + id.len() + self.tail.len());
        b.extend_from_slice(&self.head);
        b.extend_from_slice(id.as_bytes());
        b.extend_from_slice(&self.tail);
        Bytes::from(b)
    }
}

fn load_templates() -> Vec<Template> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stripe/events");
    EVENT_FILES
        .iter()
        .map(|f| {
            let path = dir.join(f);
            let raw =
                std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let mut v: Value = serde_json::from_slice(&raw).expect("event JSON");
            assert!(v["id"].is_string(), "{f}: no top-level id");
            assert_eq!(
                v["data"]["object"]["customer"]
                    .as_str()
                    .or(v["data"]["object"]["id"].as_str()),
                Some(CUSTOMER),
                "{f}: not an event of {CUSTOMER}"
            );
            let event_type = v["type"].as_str().expect("event type").to_owned();
            v["id"] = Value::from(PLACEHOLDER);
            let bytes = serde_json::to_vec_pretty(&v).unwrap();
            let needle = format!("\"{PLACEHOLDER}\"");
            let text = std::str::from_utf8(&bytes).unwrap();
            assert_eq!(
                text.matches(&needle).count(),
                1,
                "{f}: placeholder not unique"
            );
            let at = text.find(&needle).unwrap() + 1;
            let t = Template {
                event_type,
                head: bytes[..at].to_vec(),
                tail: bytes[at + PLACEHOLDER.len()..].to_vec(),
            };
            v["id"] = Value::from(delivery_id(7));
            assert_eq!(
                t.body(&delivery_id(7)),
                serde_json::to_vec_pretty(&v).unwrap(),
                "{f}: splicing the id must equal re-serialising"
            );
            t
        })
        .collect()
}

fn delivery_id(i: usize) -> String {
    format!("evt_bench{i:09}")
}

// ---------------------------------------------------------------------------------------------
// The client (hyper HTTP/1.1, as in loadgen)
// ---------------------------------------------------------------------------------------------

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request on a connection: the status and the whole body.
async fn send(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

#[derive(Clone)]
struct Common {
    addr: SocketAddr,
    host: HeaderValue,
    json: HeaderValue,
    admin: HeaderValue,
}

impl Common {
    fn new(addr: SocketAddr) -> Common {
        Common {
            addr,
            host: HeaderValue::from_str(&addr.to_string()).unwrap(),
            json: HeaderValue::from_static("application/json; charset=utf-8"),
            admin: HeaderValue::from_str(&format!("Bearer {ADMIN_KEY}")).unwrap(),
        }
    }

    fn webhook(&self, body: Bytes) -> Request<Full<Bytes>> {
        let sig = sign(&body, SECRET, unix_now());
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from_static("/webhooks/stripe");
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(CONTENT_TYPE, self.json.clone());
        h.insert(
            USER_AGENT,
            HeaderValue::from_static("Stripe/1.0 (+https://stripe.com/docs/webhooks)"),
        );
        h.insert("stripe-signature", HeaderValue::from_str(&sig).unwrap());
        req
    }

    fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Request<Full<Bytes>> {
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(serde_json::to_vec(&b).unwrap()));
        let mut req = Request::new(Full::new(bytes));
        *req.method_mut() = method;
        *req.uri_mut() = Uri::try_from(path).unwrap();
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(AUTHORIZATION, self.admin.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        req
    }
}

/// One admin call on a fresh connection; panics unless it succeeds.
async fn admin_call(common: &Common, method: Method, path: &str, body: Option<Value>) -> Value {
    let mut s = connect(common.addr)
        .await
        .expect("connect for an admin call");
    let (status, bytes) = send(&mut s, common.admin(method.clone(), path, body))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(
        status.is_success(),
        "{method} {path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// The log's counts: pending, applied, ignored, failed.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    pending: u64,
    applied: u64,
    ignored: u64,
    failed: u64,
}

impl Counts {
    fn settled(&self) -> u64 {
        self.applied + self.ignored + self.failed
    }
    fn total(&self) -> u64 {
        self.pending + self.settled()
    }
}

async fn log_counts(common: &Common) -> Counts {
    let v = admin_call(common, Method::GET, "/v1/admin/webhooks?limit=1", None).await;
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no `{k}` in {v}"));
    Counts {
        pending: n("pending"),
        applied: n("applied"),
        ignored: n("ignored"),
        failed: n("failed"),
    }
}

// ---------------------------------------------------------------------------------------------
// A phase: deliveries over C connections
// ---------------------------------------------------------------------------------------------

struct PhaseResult {
    secs: f64,
    /// 200 with the expected `duplicate` flag.
    ok: u64,
    /// 200 with the other `duplicate` flag, or an unreadable body.
    wrong_flag: u64,
    /// Non-200 answers and transport errors.
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    first_error: Option<String>,
    hist: Histogram<u64>,
    cpu: CpuUse,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }
}

struct ConnResult {
    ok: u64,
    wrong_flag: u64,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    first_error: Option<String>,
    hist: Histogram<u64>,
}

async fn drive_conn(
    common: Common,
    templates: Arc<Vec<Template>>,
    order: Arc<Vec<usize>>,
    next: Arc<AtomicU64>,
    expect_duplicate: bool,
) -> ConnResult {
    let mut res = ConnResult {
        ok: 0,
        wrong_flag: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        first_error: None,
        hist: Histogram::new_with_bounds(1, 600_000_000, 3).unwrap(),
    };
    let note = |res: &mut ConnResult, msg: String| {
        res.errors += 1;
        if res.first_error.is_none() {
            res.first_error = Some(msg);
        }
    };
    let mut sender: Option<Sender> = None;
    loop {
        let k = next.fetch_add(1, Ordering::Relaxed) as usize;
        let Some(&i) = order.get(k) else { break };
        if sender.is_none() {
            match connect(common.addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    note(&mut res, format!("{}: {e}", delivery_id(i)));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let body = templates[i % templates.len()].body(&delivery_id(i));
        let req = common.webhook(body);
        let t0 = Instant::now();
        let r = send(s, req).await;
        let us = t0.elapsed().as_micros().max(1) as u64;
        match r {
            Ok((StatusCode::OK, bytes)) => {
                res.hist.saturating_record(us);
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                if v["received"] == Value::Bool(true)
                    && v["duplicate"] == Value::Bool(expect_duplicate)
                {
                    res.ok += 1;
                } else {
                    res.wrong_flag += 1;
                    if res.first_error.is_none() {
                        res.first_error = Some(format!(
                            "{}: 200 {}",
                            delivery_id(i),
                            String::from_utf8_lossy(&bytes)
                        ));
                    }
                }
            }
            Ok((status, bytes)) => {
                *res.statuses.entry(status.as_u16()).or_insert(0) += 1;
                note(
                    &mut res,
                    format!(
                        "{}: HTTP {status} {}",
                        delivery_id(i),
                        String::from_utf8_lossy(&bytes)
                    ),
                );
            }
            Err(e) => {
                note(&mut res, format!("{}: {e}", delivery_id(i)));
                sender = None;
            }
        }
    }
    res
}

async fn run_phase(
    name: &str,
    common: &Common,
    pid: u32,
    templates: &Arc<Vec<Template>>,
    order: Vec<usize>,
    conns: usize,
    expect_duplicate: bool,
) -> PhaseResult {
    println!(
        "\n== {name}: {} deliveries over {conns} connections; load average {} ==",
        order.len(),
        load_avg()
    );
    let order = Arc::new(order);
    let next = Arc::new(AtomicU64::new(0));
    let cpu = CpuWindow::start(pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns.min(order.len()).max(1) {
        tasks.push(tokio::spawn(drive_conn(
            common.clone(),
            templates.clone(),
            order.clone(),
            next.clone(),
            expect_duplicate,
        )));
    }
    let mut out = PhaseResult {
        secs: 0.0,
        ok: 0,
        wrong_flag: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        first_error: None,
        hist: Histogram::new_with_bounds(1, 600_000_000, 3).unwrap(),
        cpu: CpuUse {
            daemon: 0.0,
            client: 0.0,
            other: 0.0,
            load: String::new(),
        },
    };
    for t in tasks {
        let r = t.await.expect("client task");
        out.ok += r.ok;
        out.wrong_flag += r.wrong_flag;
        out.errors += r.errors;
        for (k, v) in r.statuses {
            *out.statuses.entry(k).or_insert(0) += v;
        }
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
        out.hist.add(&r.hist).unwrap();
    }
    out.secs = start.elapsed().as_secs_f64();
    out.cpu = cpu.end();
    println!(
        "  webhooks/s : {:.0} ({} answered 200 duplicate:{expect_duplicate} in {:.2} s)",
        out.rate(),
        out.ok,
        out.secs
    );
    println!(
        "  errors     : {} (statuses {:?}); 200 with the wrong duplicate flag: {}",
        out.errors, out.statuses, out.wrong_flag
    );
    if let Some(e) = &out.first_error {
        println!("  first error: {e}");
    }
    println!(
        "  latency ms : p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2} (of all 200s)",
        out.ms(0.50),
        out.ms(0.90),
        out.ms(0.99),
        out.max_ms()
    );
    println!(
        "  cpu        : daemon {:.0}% + client {:.0}% + other processes {:.0}% of a core ({} cores); load {}",
        out.cpu.daemon * 100.0,
        out.cpu.client * 100.0,
        out.cpu.other * 100.0,
        ncpus(),
        out.cpu.load
    );
    out
}

/// Events of one status, a few, for diagnostics.
async fn print_some(common: &Common, status: &str, n: usize) {
    let v = admin_call(
        common,
        Method::GET,
        &format!("/v1/admin/webhooks?status={status}&limit={n}"),
        None,
    )
    .await;
    for e in v["events"].as_array().cloned().unwrap_or_default() {
        println!(
            "    {} {} attempts {} last_error {} outcome {}",
            e["id"].as_str().unwrap_or("?"),
            e["type"].as_str().unwrap_or("?"),
            e["attempts"],
            e["last_error"],
            e["outcome"]
        );
    }
}

/// Every event of the log by (type, status, outcome) (not timed).
async fn outcome_table(common: &Common) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/admin/webhooks?limit=1000&after={a}"),
            None => "/v1/admin/webhooks?limit=1000".to_owned(),
        };
        let v = admin_call(common, Method::GET, &path, None).await;
        for e in v["events"].as_array().cloned().unwrap_or_default() {
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
            *out.entry((s("type"), s("status"), s("outcome")))
                .or_insert(0) += 1;
        }
        match v["next_after"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => break,
        }
    }
    out
}

/// Prints the apply figures; `Some(failure)` if the log did not drain.
fn report_apply(
    main_secs: f64,
    at_send_end: Counts,
    at_drain: Counts,
    drained: Option<f64>,
    timeout: Duration,
) -> Option<String> {
    println!("\n== apply (webhook actor) ==");
    println!(
        "  at the last answer: {} pending, {} applied, {} ignored, {} failed",
        at_send_end.pending, at_send_end.applied, at_send_end.ignored, at_send_end.failed
    );
    match drained {
        Some(drain_s) => {
            let total_s = main_secs + drain_s;
            println!(
                "  0 pending {drain_s:.2} s after the last answer ({:.2} s after the first send; poll every {} ms)",
                total_s,
                POLL.as_millis()
            );
            println!(
                "  apply rate : {:.0} events/s overall ({} settled / {total_s:.2} s); {:.0}/s while receiving, {:.0}/s draining the backlog",
                at_drain.settled() as f64 / total_s,
                at_drain.settled(),
                at_send_end.settled() as f64 / main_secs,
                at_send_end.pending as f64 / drain_s.max(1e-3),
            );
        }
        None => {
            println!(
                "  NOT DRAINED: {} still pending {} s after the last answer",
                at_drain.pending,
                timeout.as_secs()
            );
        }
    }
    println!(
        "  final: {} pending, {} applied, {} ignored, {} failed",
        at_drain.pending, at_drain.applied, at_drain.ignored, at_drain.failed
    );
    drained
        .is_none()
        .then(|| format!("{} events still pending", at_drain.pending))
}

fn main() {
    let settings = Settings::from_env();
    let templates = Arc::new(load_templates());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    println!(
        "webhooks bench: {} deliveries ({}), {} connections, {} duplicates, config {}; load average before: {}",
        settings.events,
        templates
            .iter()
            .map(|t| format!(
                "{} {} B",
                t.event_type,
                t.head.len() + t.tail.len() + delivery_id(0).len()
            ))
            .collect::<Vec<_>>()
            .join(", "),
        settings.conns,
        settings.duplicates,
        settings.config.display(),
        load_avg()
    );

    let mut daemon = Daemon::start(&settings.config);
    let common = Common::new(daemon.addr);
    let pid = daemon.pid();
    let mut failures: Vec<String> = Vec::new();

    let (main, apply, dup, counts_end) = rt.block_on(async {
        // Setup (not timed): the account, then its Stripe customer.
        let path = format!("/v1/accounts/{ACCOUNT}");
        admin_call(
            &common,
            Method::PUT,
            &path,
            Some(serde_json::json!({"plan": "free"})),
        )
        .await;
        admin_call(
            &common,
            Method::PUT,
            &path,
            Some(serde_json::json!({"plan": "free", "stripe_customer_id": CUSTOMER})),
        )
        .await;

        // Main phase.
        let order: Vec<usize> = (0..settings.events).collect();
        let main = run_phase(
            "distinct deliveries",
            &common,
            pid,
            &templates,
            order,
            settings.conns,
            false,
        )
        .await;

        // Apply: until the log has 0 pending.
        let sent_at = Instant::now();
        let drain_cpu = CpuWindow::start(pid);
        let at_send_end = log_counts(&common).await;
        let mut last = at_send_end;
        let drained = loop {
            if last.pending == 0 {
                break Some(sent_at.elapsed().as_secs_f64());
            }
            if sent_at.elapsed() > settings.apply_timeout {
                break None;
            }
            tokio::time::sleep(POLL).await;
            last = log_counts(&common).await;
        };
        let apply = (at_send_end, last, drained);
        if let Some(f) = report_apply(
            main.secs,
            at_send_end,
            last,
            drained,
            settings.apply_timeout,
        ) {
            failures.push(f);
        }
        let c = drain_cpu.end();
        println!(
            "  cpu        : daemon {:.0}% + client {:.0}% + other processes {:.0}% of a core from the last answer to 0 pending; load {}",
            c.daemon * 100.0,
            c.client * 100.0,
            c.other * 100.0,
            c.load
        );
        if last.pending > 0 {
            println!("  some pending events:");
            print_some(&common, "pending", 5).await;
        }
        if last.failed > 0 {
            println!("  some failed events:");
            print_some(&common, "failed", 5).await;
        }

        // Duplicate phase: re-send some of the same deliveries, spread over the log.
        let d = settings.duplicates;
        let order: Vec<usize> = (0..d).map(|k| k * settings.events / d.max(1)).collect();
        let dup = run_phase(
            "duplicate deliveries",
            &common,
            pid,
            &templates,
            order,
            settings.conns,
            true,
        )
        .await;
        let counts_end = log_counts(&common).await;
        (main, apply, dup, counts_end)
    });

    let (_, at_drain, drained) = apply;
    rt.block_on(async {
        println!("\n== the log by type, status and outcome (after the run, not timed) ==");
        for ((ty, st, outcome), n) in outcome_table(&common).await {
            println!("  {n:>6}  {ty:<32} {st:<8} {outcome}");
        }
    });

    let peak_rss_kb = status_kb(pid, "VmHWM:").unwrap_or(0);
    let rss_kb = status_kb(pid, "VmRSS:").unwrap_or(0);
    println!(
        "\ndaemon: peak RSS (VmHWM, since start) {:.1} MiB, RSS now {:.1} MiB",
        peak_rss_kb as f64 / 1024.0,
        rss_kb as f64 / 1024.0
    );
    let du = Command::new("du")
        .arg("-sh")
        .arg(daemon.dir.path())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    println!("data dir: {}", du.trim());
    let status = daemon.sigterm();
    println!("meterd exited after SIGTERM with {status}");
    {
        let t = daemon.log.lock().unwrap();
        println!(
            "daemon stderr (RUST_LOG=warn): {} WARN, {} ERROR, {} other lines",
            t.warn, t.error, t.other
        );
        for l in &t.first {
            println!("  | {l}");
        }
    }

    println!("\n## Summary\n");
    println!(
        "| events | conns | webhooks/s (200) | errors | p50 ms | p90 ms | p99 ms | max ms | 0 pending after last answer | apply rate (overall) | duplicates/s | dup p99 ms | daemon peak RSS | daemon CPU | other CPU | load avg |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let (drain, apply_rate) = match drained {
        Some(d) => (
            format!("{d:.2} s"),
            format!(
                "{:.0} events/s",
                at_drain.settled() as f64 / (main.secs + d)
            ),
        ),
        None => ("not drained".into(), "n/a".into()),
    };
    println!(
        "| {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {drain} | {apply_rate} | {:.0} | {:.2} | {:.1} MiB | {:.0}% | {:.0}% | {} |",
        settings.events,
        settings.conns,
        main.rate(),
        main.errors + main.wrong_flag,
        main.ms(0.50),
        main.ms(0.90),
        main.ms(0.99),
        main.max_ms(),
        dup.rate(),
        dup.ms(0.99),
        peak_rss_kb as f64 / 1024.0,
        main.cpu.daemon * 100.0,
        main.cpu.other * 100.0,
        main.cpu.load
    );
    println!("\nload average after: {}", load_avg());

    if main.errors + main.wrong_flag > 0 {
        failures.push(format!(
            "main phase: {} errors, {} wrong flags",
            main.errors, main.wrong_flag
        ));
    }
    if dup.errors + dup.wrong_flag > 0 || dup.ok != settings.duplicates as u64 {
        failures.push(format!(
            "duplicate phase: {} of {} answered duplicate:true ({} errors, {} wrong flags)",
            dup.ok, settings.duplicates, dup.errors, dup.wrong_flag
        ));
    }
    if counts_end.total() != main.ok {
        failures.push(format!(
            "the log holds {} events after the duplicate phase, {} were accepted as new",
            counts_end.total(),
            main.ok
        ));
    }
    if !status.success() {
        failures.push(format!("meterd exited with {status}"));
    }
    assert!(failures.is_empty(), "FAILED: {}", failures.join("; "));
    assert_eq!(
        dup.ok, settings.duplicates as u64,
        "every re-sent delivery must be answered duplicate:true"
    );
}
