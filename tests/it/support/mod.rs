//! Shared test support: an in-process daemon on 127.0.0.1:0, the real binary as a child
//! process, a small JSON client, and bounded waiting. Every wait here has a deadline.

#![allow(dead_code)]
pub mod fake_stripe;
pub mod httpfuzz;
pub mod seed;
pub mod signer;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meterd::config::Config;
use meterd::daemon::Secrets;
use meterd_actors::model::Clock;
use serde_json::Value;
use tokio::sync::oneshot;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const APP_KEY: &str = "test-app-key-0123456789ab";
/// The webhook signing secret test daemons accept.
pub const WEBHOOK_SECRET: &str = "whsec_test_meterd_0123456789abcdef";

/// `tests/fixtures/stripe/`: Stripe's trimmed spec, fixtures and event payloads (MIT, see its
/// README). Panics when it is missing: a fixture is never silently skipped.
pub fn stripe_fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stripe");
    assert!(
        dir.join("LICENSE").is_file(),
        "{} is missing: the Stripe fixtures are part of the repository",
        dir.display()
    );
    dir
}

/// `tests/fixtures/stripe/events/`: real webhook payloads, one consistent story.
pub fn stripe_events_dir() -> PathBuf {
    stripe_fixtures_dir().join("events")
}

/// The shipped `config.toml` text with Stripe at `api_base` (a fake) and fast retries, for
/// tests that run the real binary.
pub fn shipped_config_on_fake(api_base: &str) -> String {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let ours = shipped
        .replace(
            "api_base = \"https://api.stripe.com/\"",
            &format!("api_base = \"{api_base}\""),
        )
        .replace("poll_ms = 200", "poll_ms = 20")
        .replace("base_backoff_ms = 500", "base_backoff_ms = 10")
        .replace("max_backoff_s = 600", "max_backoff_s = 1")
        .replace("calls_per_second = 25", "calls_per_second = 1000");
    assert_ne!(ours, shipped);
    ours
}

/// The shipped config with a data directory of the test's own.
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config::embedded(data_dir).expect("embedded config");
    c.data_dir = data_dir.to_path_buf();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c
}

pub fn secrets() -> Secrets {
    Secrets {
        admin_keys: vec![ADMIN_KEY.into()],
        app_keys: vec![APP_KEY.into()],
        stripe_key: None,
        webhook_secrets: vec![WEBHOOK_SECRET.into()],
    }
}

/// A daemon running inside the test process, with a shutdown it controls.
pub struct TestDaemon {
    pub addr: SocketAddr,
    pub client: Client,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestDaemon {
    pub async fn start() -> TestDaemon {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tweak, Clock::System).await
    }

    /// Starts on an existing data directory (for restart tests).
    pub async fn start_in(
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
        clock: Clock,
    ) -> TestDaemon {
        Self::start_full(dir, tweak, clock, secrets()).await
    }

    /// Starts with a Stripe key, talking to `fake`, with fast retries.
    pub async fn start_stripe(
        dir: tempfile::TempDir,
        fake: &fake_stripe::FakeStripe,
        tweak: impl FnOnce(&mut Config),
    ) -> TestDaemon {
        let base = fake.base_url();
        let mut s = secrets();
        s.stripe_key = Some(fake_stripe::SECRET_KEY.into());
        Self::start_full(
            dir,
            move |c| {
                c.stripe.api_base = base;
                c.stripe.poll = Duration::from_millis(20);
                c.stripe.base_backoff = Duration::from_millis(10);
                c.stripe.max_backoff = Duration::from_millis(100);
                c.stripe.timeout = Duration::from_secs(2);
                c.stripe.calls_per_second = 1000;
                tweak(c);
            },
            Clock::System,
            s,
        )
        .await
    }

    pub async fn start_full(
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
        clock: Clock,
        secrets: Secrets,
    ) -> TestDaemon {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(meterd::daemon::run_with_clock(
            config,
            secrets,
            listener,
            async move {
                let _ = rx.await;
            },
            clock,
        ));
        let client = Client::new(addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.get_noauth("/healthz").await.0 != 200 {
            if join.is_finished() {
                match join.await {
                    Ok(Err(e)) => panic!("the daemon did not start: {e:#}"),
                    other => panic!("the daemon stopped during start-up: {other:?}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestDaemon {
            addr,
            client,
            dir,
            stop: Some(tx),
            join: Some(join),
        }
    }

    /// Graceful stop; returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(30), j)
                .await
                .expect("daemon stops within 30 s")
                .unwrap()
                .expect("daemon exits cleanly");
        }
        self.dir
    }
}

/// A minimal JSON-over-HTTP client bound to one daemon.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    /// Status, headers, and the body as JSON (or as a string if it is not JSON).
    pub async fn read(r: reqwest::Response) -> Resp {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            body,
            headers,
        }
    }

    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        Resp::read(req.send().await.expect("request")).await
    }

    pub async fn get_noauth(&self, path: &str) -> (u16, Value) {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    pub async fn put_account(&self, id: &str, body: Value) -> Resp {
        self.send(
            reqwest::Method::PUT,
            &format!("/v1/accounts/{id}"),
            Some(ADMIN_KEY),
            Some(body),
        )
        .await
    }

    pub async fn get_account(&self, id: &str) -> Resp {
        self.send(
            reqwest::Method::GET,
            &format!("/v1/accounts/{id}"),
            Some(APP_KEY),
            None,
        )
        .await
    }

    pub async fn consume(&self, id: &str, quantity: u64, key: &str) -> Resp {
        self.send(
            reqwest::Method::POST,
            &format!("/v1/accounts/{id}/consume"),
            Some(APP_KEY),
            Some(serde_json::json!({"meter": "tokens", "quantity": quantity, "idempotency_key": key})),
        )
        .await
    }

    pub async fn credit(&self, id: &str, amount: i64, key: &str) -> Resp {
        self.send(
            reqwest::Method::POST,
            &format!("/v1/accounts/{id}/credits"),
            Some(ADMIN_KEY),
            Some(serde_json::json!({"amount": amount, "reason": "test", "idempotency_key": key})),
        )
        .await
    }

    /// Every ledger entry of an account, all pages.
    pub async fn ledger(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0u64;
        for _ in 0..10_000 {
            let r = self
                .send(
                    reqwest::Method::GET,
                    &format!("/v1/accounts/{id}/ledger?after_seq={after}&limit=1000"),
                    Some(APP_KEY),
                    None,
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let entries = r.body["entries"].as_array().cloned().unwrap_or_default();
            out.extend(entries);
            match r.body["next_after_seq"].as_u64() {
                Some(n) => after = n,
                None => return out,
            }
        }
        panic!("ledger paging did not end");
    }
}

/// Polls `check` until it holds, failing the test after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within {deadline:?}");
}

/// The built `meterd` binary, run as a child process.
pub struct BinDaemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub client: Client,
}

pub fn meterd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meterd"))
}

impl BinDaemon {
    /// Starts `meterd serve` on 127.0.0.1:0 with its data in `data_dir`, and waits for the
    /// "listening on" line (at most 30 s).
    pub fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> BinDaemon {
        Self::start_opts(data_dir, extra_env, true, None)
    }

    /// As [`BinDaemon::start`], optionally without `METERD_ADMIN_KEY`, and optionally
    /// collecting stderr (the logs) into `logs`.
    pub fn start_opts(
        data_dir: &Path,
        extra_env: &[(&str, &str)],
        admin_key: bool,
        logs: Option<std::sync::Arc<std::sync::Mutex<String>>>,
    ) -> BinDaemon {
        Self::start_config(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"),
            data_dir,
            extra_env,
            admin_key,
            logs,
        )
    }

    /// As [`BinDaemon::start_opts`], with a config file of the test's own.
    pub fn start_config(
        config: &Path,
        data_dir: &Path,
        extra_env: &[(&str, &str)],
        admin_key: bool,
        logs: Option<std::sync::Arc<std::sync::Mutex<String>>>,
    ) -> BinDaemon {
        let mut cmd = Command::new(meterd_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .env("METERD_APP_KEY", APP_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(if logs.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        if admin_key {
            cmd.env("METERD_ADMIN_KEY", ADMIN_KEY);
        } else {
            cmd.env_remove("METERD_ADMIN_KEY");
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn meterd");
        if let (Some(logs), Some(stderr)) = (logs, child.stderr.take()) {
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stderr).lines();
                while let Some(Ok(line)) = lines.next() {
                    let mut l = logs.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(a) = line.strip_prefix("meterd listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        let addr: SocketAddr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("meterd printed its address")
            .parse()
            .unwrap();
        BinDaemon {
            child,
            addr,
            client: Client::new(addr),
        }
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (at most `bound`) for the exit status.
    pub fn sigterm(mut self, bound: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > bound {
                let _ = self.child.kill();
                panic!("meterd did not exit within {bound:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BinDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `meterd ledger verify` on a stopped daemon's data directory.
pub fn ledger_verify(data_dir: &Path) -> std::process::Output {
    output_within(
        Command::new(meterd_bin())
            .args(["ledger", "verify", "--config"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
            .arg("--data-dir")
            .arg(data_dir),
        Duration::from_secs(60),
    )
}

/// As [`Command::output`], but a child still running after `bound` is killed and the test
/// fails (a command that should exit at once, e.g. a refused start, must not hang the suite).
pub fn output_within(cmd: &mut Command, bound: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("{cmd:?} still ran after {bound:?}; killed. stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}
