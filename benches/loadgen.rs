//! Load generator for meterd: durable consumes per second on one hot account and on 10,000
//! accounts picked uniformly at random, next to the HTTP ceiling of a no-op poem server.
//!
//! Run with `cargo bench --bench loadgen` (release profile). Environment:
//! - `LOADGEN_CONNS`: keep-alive connections, one request in flight on each (default 64).
//! - `LOADGEN_SECS`: measured seconds per scenario, after a 2 s warm-up (default 10).
//! - `LOADGEN_WARMUP_SECS`: warm-up seconds (default 2).
//! - `LOADGEN_CLIENT_THREADS`: client runtime threads, 1 or 2 (default 1: current-thread).
//! - `LOADGEN_SCENARIOS`: comma-separated subset of `hot,uniform,noop` (default all three),
//!   plus `unknown` (not by default): `LOADGEN_UNKNOWN` (default 100000) reads of account ids
//!   that do not exist, each a 404, and the daemon's resident memory before and after.
//! - `LOADGEN_ACCOUNTS`: accounts for the uniform scenario (default 10000).
//! - `stalled` (not by default): the hot scenario again while `LOADGEN_STALLED` (default 400)
//!   hostile connections are open: half connect and send nothing, half send part of a
//!   request head and stop (closed by the header-read timeout, 10 s by default).
//! - `LOADGEN_CONFIG`: the daemon's config file (default: the repository's config.toml).
//! - `LOADGEN_BIN`: the meterd binary (default: this build's), for A/B runs.
//!
//! See BENCHMARKS.md for what the figures mean.

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
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;

const ADMIN_KEY: &str = "loadgen-admin-key-0123456789";
const APP_KEY: &str = "loadgen-app-key-0123456789ab";
const HOT_ACCOUNT: &str = "hot";
const SETUP_CONNS: usize = 32;

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

struct Settings {
    conns: usize,
    secs: u64,
    warmup_secs: u64,
    client_threads: usize,
    accounts: usize,
    scenarios: Vec<String>,
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
        let scenarios = std::env::var("LOADGEN_SCENARIOS")
            .unwrap_or_else(|_| "hot,uniform,noop".into())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>();
        for s in &scenarios {
            assert!(
                matches!(
                    s.as_str(),
                    "hot" | "uniform" | "noop" | "unknown" | "stalled"
                ),
                "unknown scenario {s:?} (hot, uniform, noop, unknown, stalled)"
            );
        }
        let s = Settings {
            conns: env_num("LOADGEN_CONNS", 64usize),
            secs: env_num("LOADGEN_SECS", 10u64),
            warmup_secs: env_num("LOADGEN_WARMUP_SECS", 2u64),
            client_threads: env_num("LOADGEN_CLIENT_THREADS", 1usize),
            accounts: env_num("LOADGEN_ACCOUNTS", 10_000usize),
            scenarios,
        };
        assert!(s.conns >= 1, "LOADGEN_CONNS must be at least 1");
        assert!(s.secs >= 1, "LOADGEN_SECS must be at least 1");
        assert!(s.accounts >= 1, "LOADGEN_ACCOUNTS must be at least 1");
        assert!(
            (1..=2).contains(&s.client_threads),
            "LOADGEN_CLIENT_THREADS must be 1 or 2"
        );
        s
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings (Linux): CPU time, peak RSS, per-thread CPU, machine CPU
// ---------------------------------------------------------------------------------------------

/// Clock ticks per second for /proc CPU times.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime in ticks, and the thread name, from a /proc/.../stat file.
fn read_stat(path: &Path) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_owned();
    let rest: Vec<&str> = s[close + 2..].split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is rest[0]; utime is field 14, stime field 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    read_stat(Path::new(&format!("/proc/{pid}/stat")))
        .map(|(_, t)| t)
        .unwrap_or(0)
}

/// CPU ticks per thread name (threads of the same name summed).
fn thread_cpu_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        if let Some((name, t)) = read_stat(&e.path().join("stat")) {
            *out.entry(name).or_insert(0) += t;
        }
    }
    out
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

/// (write_bytes, syscw) from /proc/<pid>/io, if readable.
fn proc_io(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let get = |k: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(k))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((get("write_bytes:")?, get("syscw:")?))
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------------------------

struct Daemon {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let config = std::env::var_os("LOADGEN_CONFIG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"));
        // A fresh directory under $TMPDIR; BENCHMARKS.md notes which disk that is.
        let dir = tempfile::Builder::new()
            .prefix("meterd-loadgen-")
            .tempdir()
            .expect("create a temporary data dir");
        // `LOADGEN_BIN`: another meterd binary (an A/B against an earlier commit's build).
        let bin = std::env::var_os("LOADGEN_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_meterd").into());
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path())
            .env("METERD_ADMIN_KEY", ADMIN_KEY)
            .env("METERD_APP_KEY", APP_KEY)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn meterd");
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
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed without the line: the daemon is exiting (its stderr,
                    // inherited, says why).
                    let status = child.wait();
                    panic!("meterd exited before listening: {status:?}");
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("meterd did not print its address within 30 s");
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
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status (at most 60 s).
    fn sigterm(mut self) -> std::process::ExitStatus {
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
        // Only reached on a panic path (sigterm consumes self and waits).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The no-op server: the HTTP ceiling
// ---------------------------------------------------------------------------------------------

#[poem::handler]
fn noop_consume(body: poem::web::Json<serde_json::Value>) -> poem::web::Json<serde_json::Value> {
    let _ = body;
    poem::web::Json(serde_json::json!({"allowed": true, "remaining": null}))
}

struct NoopServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NoopServer {
    fn start() -> NoopServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("noop-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("noop-worker")
                    .enable_all()
                    .build()
                    .expect("noop runtime");
                rt.block_on(async move {
                    use poem::listener::{Acceptor, Listener};
                    let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
                        .into_acceptor()
                        .await
                        .expect("bind the no-op server");
                    let addr = acceptor
                        .local_addr()
                        .first()
                        .and_then(|a| a.as_socket_addr().copied())
                        .expect("no-op server address");
                    addr_tx.send(addr).unwrap();
                    let app =
                        poem::Route::new().at("/v1/accounts/:id/consume", poem::post(noop_consume));
                    poem::Server::new_with_acceptor(acceptor)
                        .run_with_graceful_shutdown(
                            app,
                            async move {
                                let _ = stop_rx.await;
                            },
                            Some(Duration::from_secs(5)),
                        )
                        .await
                        .expect("no-op server");
                });
            })
            .expect("spawn the no-op server thread");
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no-op server started");
        NoopServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client
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

/// One request on a connection; returns the status after reading the whole body.
async fn send(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<StatusCode, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?;
    Ok(status)
}

/// Headers shared by every request of a run, built once.
#[derive(Clone)]
struct Common {
    host: HeaderValue,
    auth: HeaderValue,
    json: HeaderValue,
}

impl Common {
    fn new(addr: SocketAddr, key: &str) -> Common {
        Common {
            host: HeaderValue::from_str(&addr.to_string()).unwrap(),
            auth: HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
            json: HeaderValue::from_static("application/json"),
        }
    }

    fn request(&self, method: Method, uri: Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(AUTHORIZATION, self.auth.clone());
        h.insert(CONTENT_TYPE, self.json.clone());
        req
    }
}

fn consume_uri(account: &str) -> Uri {
    Uri::try_from(format!("/v1/accounts/{account}/consume")).unwrap()
}

fn account_id(i: usize) -> String {
    format!("acct-{i:05}")
}

/// Creates accounts on the `pro` plan with `SETUP_CONNS` concurrent connections.
async fn create_accounts(addr: SocketAddr, ids: Arc<Vec<String>>) {
    let common = Common::new(addr, ADMIN_KEY);
    let body = Bytes::from_static(br#"{"plan":"pro"}"#);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SETUP_CONNS.min(ids.len()) {
        let (common, body, next, ids) = (common.clone(), body.clone(), next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await.expect("connect for setup");
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(id) = ids.get(i) else { break };
                let uri = Uri::try_from(format!("/v1/accounts/{id}")).unwrap();
                let req = common.request(Method::PUT, uri, body.clone());
                let status = send(&mut sender, req).await.expect("create account");
                assert_eq!(status, StatusCode::CREATED, "PUT /v1/accounts/{id}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("setup task");
    }
}

/// `n` reads of ids that name no account, on `SETUP_CONNS` connections: each must be a 404.
/// Prints the rate and the daemon's resident memory (VmRSS) before and after.
async fn unknown_ids(addr: SocketAddr, pid: u32, n: usize) {
    let common = Common::new(addr, APP_KEY);
    let rss = || status_kb(pid, "VmRSS:").unwrap_or(0);
    let before = rss();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..SETUP_CONNS {
        let (common, next) = (common.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await.expect("connect");
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let uri = Uri::try_from(format!("/v1/accounts/nobody-{i:07}")).unwrap();
                let req = common.request(Method::GET, uri, Bytes::new());
                let status = send(&mut sender, req).await.expect("GET");
                assert_eq!(status, StatusCode::NOT_FOUND, "an unknown id is a 404");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss();
    println!(
        "
unknown ids: {n} reads, all 404, {:.0} req/s; daemon RSS {:.1} MiB before, {:.1} MiB after ({:+.1} MiB)",
        n as f64 / secs,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after as f64 - before as f64) / 1024.0
    );
}

/// Which account each request goes to.
#[derive(Clone)]
enum Target {
    One(Uri),
    Uniform(Arc<Vec<Uri>>),
}

/// Per-connection results.
struct ConnResult {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    first_error: Option<String>,
}

#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    until: Instant,
}

async fn drive_conn(
    conn_no: usize,
    addr: SocketAddr,
    common: Common,
    target: Target,
    tag: &'static str,
    window: Window,
) -> ConnResult {
    let mut res = ConnResult {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        ok: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        first_error: None,
    };
    let mut rng = StdRng::seed_from_u64(0x5eed ^ conn_no as u64);
    let mut sender = None;
    let mut seq: u64 = 0;
    let note = |res: &mut ConnResult, msg: String| {
        res.errors += 1;
        if res.first_error.is_none() {
            res.first_error = Some(msg);
        }
    };
    loop {
        if Instant::now() >= window.until {
            break;
        }
        if sender.is_none() {
            match connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    note(&mut res, e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        seq += 1;
        let body = Bytes::from(format!(
            r#"{{"meter":"tokens","quantity":1,"idempotency_key":"{tag}-{conn_no}-{seq}"}}"#
        ));
        let uri = match &target {
            Target::One(u) => u.clone(),
            Target::Uniform(all) => all[rng.random_range(0..all.len())].clone(),
        };
        let req = common.request(Method::POST, uri, body);
        let t0 = Instant::now();
        let r = send(s, req).await;
        let t1 = Instant::now();
        match r {
            Ok(StatusCode::OK) => {
                if t1 >= window.measure_from && t1 < window.until {
                    res.ok += 1;
                    let us = (t1 - t0).as_micros().max(1) as u64;
                    res.hist.saturating_record(us);
                }
            }
            Ok(status) => {
                *res.statuses.entry(status.as_u16()).or_insert(0) += 1;
                note(&mut res, format!("HTTP {status}"));
            }
            Err(e) => {
                note(&mut res, e);
                sender = None;
            }
        }
    }
    res
}

struct Outcome {
    name: &'static str,
    conns: usize,
    secs: f64,
    ok: u64,
    errors: u64,
    hist: Histogram<u64>,
    daemon: Option<DaemonUsage>,
    client_cpu: f64,
    /// The daemon's CPU, or the no-op server threads' CPU, in cores.
    server_cpu: f64,
    /// Busy share of all CPUs of the machine over the window, 0 to 1.
    machine_cpu: f64,
    load: String,
}

struct DaemonUsage {
    peak_rss_kb: u64,
    threads: Vec<(String, f64)>,
    write_mb_s: Option<f64>,
    write_calls_s: Option<f64>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    /// CPU (in cores) used by everything on the machine except this server and this client.
    fn other_cpu(&self) -> f64 {
        (self.machine_cpu * ncpus() - self.server_cpu - self.client_cpu).max(0.0)
    }
}

fn ncpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

async fn run_scenario(
    name: &'static str,
    addr: SocketAddr,
    daemon_pid: Option<u32>,
    common: Common,
    target: Target,
    settings: &Settings,
) -> Outcome {
    let tck = clk_tck();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(settings.warmup_secs);
    let window = Window {
        measure_from,
        until: measure_from + Duration::from_secs(settings.secs),
    };
    println!(
        "\n== {name}: {} connections, {} s warm-up, {} s measured ==",
        settings.conns, settings.warmup_secs, settings.secs
    );
    let mut tasks = Vec::new();
    for c in 0..settings.conns {
        tasks.push(tokio::spawn(drive_conn(
            c,
            addr,
            common.clone(),
            target.clone(),
            name,
            window,
        )));
    }
    // Resource readings over the measured window. This process holds the client and, in the
    // noop scenario, the no-op server (threads named `noop-*`), told apart by thread name.
    let me = std::process::id();
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = daemon_pid.map(proc_cpu_ticks);
    let threads0 = daemon_pid.map(thread_cpu_ticks);
    let io0 = daemon_pid.and_then(proc_io);
    let self0 = thread_cpu_ticks(me);
    let mach0 = machine_cpu();
    let t0 = Instant::now();
    tokio::time::sleep_until(window.until.into()).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = daemon_pid.map(proc_cpu_ticks);
    let threads1 = daemon_pid.map(thread_cpu_ticks);
    let io1 = daemon_pid.and_then(proc_io);
    let self1 = thread_cpu_ticks(me);
    let mach1 = machine_cpu();
    let load = load_avg();
    let share = |noop_threads: bool| -> f64 {
        let ticks: u64 = self1
            .iter()
            .filter(|(n, _)| n.starts_with("noop-") == noop_threads)
            .map(|(n, t)| t.saturating_sub(self0.get(n).copied().unwrap_or(0)))
            .sum();
        ticks as f64 / tck / elapsed
    };
    let (client_cpu, noop_cpu) = (share(false), share(true));

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut statuses = BTreeMap::<u16, u64>::new();
    let mut first_error = None;
    for t in tasks {
        let r = t.await.expect("client task");
        hist.add(&r.hist).unwrap();
        ok += r.ok;
        errors += r.errors;
        for (k, v) in r.statuses {
            *statuses.entry(k).or_insert(0) += v;
        }
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }

    let daemon = daemon_pid.map(|pid| {
        let (th0, th1) = (threads0.unwrap_or_default(), threads1.unwrap_or_default());
        let mut threads: Vec<(String, f64)> = th1
            .iter()
            .map(|(n, t)| {
                let before = th0.get(n).copied().unwrap_or(0);
                (n.clone(), t.saturating_sub(before) as f64 / tck / elapsed)
            })
            .filter(|(_, c)| *c > 0.0)
            .collect();
        threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (write_mb_s, write_calls_s) = match (io0, io1) {
            (Some((b0, c0)), Some((b1, c1))) => (
                Some((b1 - b0) as f64 / 1e6 / elapsed),
                Some((c1 - c0) as f64 / elapsed),
            ),
            _ => (None, None),
        };
        DaemonUsage {
            peak_rss_kb: status_kb(pid, "VmHWM:").unwrap_or(0),
            threads,
            write_mb_s,
            write_calls_s,
        }
    });
    let out = Outcome {
        name,
        conns: settings.conns,
        secs: elapsed,
        ok,
        errors,
        hist,
        daemon,
        client_cpu,
        server_cpu: match daemon_pid {
            Some(_) => cpu1.unwrap_or(0).saturating_sub(cpu0.unwrap_or(0)) as f64 / tck / elapsed,
            None => noop_cpu,
        },
        machine_cpu: if mach1.1 > mach0.1 {
            (mach1.0 - mach0.0) as f64 / (mach1.1 - mach0.1) as f64
        } else {
            0.0
        },
        load,
    };
    print_outcome(&out);
    if errors > 0 {
        println!(
            "  ERRORS: {errors} (statuses {statuses:?}); first: {}",
            first_error.unwrap_or_default()
        );
    }
    out
}

fn print_outcome(o: &Outcome) {
    println!(
        "  requests/s : {:.0} ({} ok in {:.2} s)",
        o.rate(),
        o.ok,
        o.secs
    );
    println!("  errors     : {}", o.errors);
    println!(
        "  latency µs : p50 {}  p99 {}  p99.9 {}  max {}",
        o.hist.value_at_quantile(0.50),
        o.hist.value_at_quantile(0.99),
        o.hist.value_at_quantile(0.999),
        o.hist.max()
    );
    println!(
        "  cpu        : server {:.0}% + client {:.0}% + other processes {:.0}% of a core; machine {:.0}% busy ({} cores); load {}",
        o.server_cpu * 100.0,
        o.client_cpu * 100.0,
        o.other_cpu() * 100.0,
        o.machine_cpu * 100.0,
        ncpus(),
        o.load
    );
    if let Some(d) = &o.daemon {
        println!(
            "  daemon     : peak RSS (VmHWM, since start) {:.1} MiB",
            d.peak_rss_kb as f64 / 1024.0
        );
        if let (Some(mb), Some(calls)) = (d.write_mb_s, d.write_calls_s) {
            println!("  daemon io  : {mb:.1} MB/s written, {calls:.0} write syscalls/s");
        }
        let parts: Vec<String> = d
            .threads
            .iter()
            .take(12)
            .map(|(n, c)| format!("{n} {:.0}%", c * 100.0))
            .collect();
        println!("  threads    : {}", parts.join(", "));
    }
}

fn print_table(outcomes: &[Outcome]) {
    println!("\n## Summary\n");
    println!(
        "| scenario | conns | req/s | errors | p50 µs | p99 µs | p99.9 µs | server CPU | daemon peak RSS | client CPU | other CPU | load avg |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for o in outcomes {
        let rss = match &o.daemon {
            Some(d) => format!("{:.1} MiB", d.peak_rss_kb as f64 / 1024.0),
            None => "n/a".into(),
        };
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.0}% | {} | {:.0}% | {:.0}% | {} |",
            o.name,
            o.conns,
            o.rate(),
            o.errors,
            o.hist.value_at_quantile(0.50),
            o.hist.value_at_quantile(0.99),
            o.hist.value_at_quantile(0.999),
            o.server_cpu * 100.0,
            rss,
            o.client_cpu * 100.0,
            o.other_cpu() * 100.0,
            o.load
        );
    }
}

fn main() {
    let settings = Settings::from_env();
    let rt = if settings.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.client_threads)
            .enable_all()
            .build()
    }
    .expect("client runtime");
    println!(
        "loadgen: {} connections, {} s warm-up + {} s per scenario, {} client thread(s), {} accounts; load average before: {}",
        settings.conns,
        settings.warmup_secs,
        settings.secs,
        settings.client_threads,
        settings.accounts,
        load_avg()
    );

    let mut outcomes = Vec::new();
    let need_daemon = settings.wants("hot")
        || settings.wants("uniform")
        || settings.wants("unknown")
        || settings.wants("stalled");
    if need_daemon {
        let daemon = Daemon::start();
        let addr = daemon.addr;
        let pid = daemon.pid();
        rt.block_on(async {
            create_accounts(addr, Arc::new(vec![HOT_ACCOUNT.to_owned()])).await;
            if settings.wants("unknown") {
                unknown_ids(addr, pid, env_num("LOADGEN_UNKNOWN", 100_000usize)).await;
            }
            let common = Common::new(addr, APP_KEY);
            if settings.wants("hot") {
                let target = Target::One(consume_uri(HOT_ACCOUNT));
                outcomes.push(
                    run_scenario("hot", addr, Some(pid), common.clone(), target, &settings).await,
                );
            }
            if settings.wants("stalled") {
                use tokio::io::AsyncWriteExt;
                let n = env_num("LOADGEN_STALLED", 400usize);
                let mut stalled = Vec::with_capacity(n);
                for i in 0..n {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    if i % 2 == 1 {
                        s.write_all(b"POST /v1/accounts/hot/consume HTTP/1.1\r\nHost: x\r\nAuthor")
                            .await
                            .unwrap();
                    }
                    stalled.push(s);
                }
                println!("\nstalled: {n} hostile connections open");
                let target = Target::One(consume_uri(HOT_ACCOUNT));
                outcomes.push(
                    run_scenario(
                        "stalled",
                        addr,
                        Some(pid),
                        common.clone(),
                        target,
                        &settings,
                    )
                    .await,
                );
                drop(stalled);
            }
            if settings.wants("uniform") {
                let setup = Instant::now();
                let ids: Vec<String> = (0..settings.accounts).map(account_id).collect();
                let uris: Vec<Uri> = ids.iter().map(|id| consume_uri(id)).collect();
                create_accounts(addr, Arc::new(ids)).await;
                println!(
                    "\ncreated {} accounts in {:.1} s (not timed)",
                    settings.accounts,
                    setup.elapsed().as_secs_f64()
                );
                let target = Target::Uniform(Arc::new(uris));
                outcomes.push(
                    run_scenario("uniform", addr, Some(pid), common, target, &settings).await,
                );
            }
        });
        let status = daemon.sigterm();
        println!("\nmeterd exited after SIGTERM with {status}");
        assert!(status.success(), "meterd must exit 0 after SIGTERM");
    }
    if settings.wants("noop") {
        let server = NoopServer::start();
        let addr = server.addr;
        rt.block_on(async {
            let common = Common::new(addr, APP_KEY);
            let target = Target::One(consume_uri(HOT_ACCOUNT));
            outcomes.push(run_scenario("noop", addr, None, common, target, &settings).await);
        });
        server.stop();
    }
    print_table(&outcomes);
    println!("\nload average after: {}", load_avg());
    let errors: u64 = outcomes.iter().map(|o| o.errors).sum();
    assert_eq!(errors, 0, "every request must succeed");
}
