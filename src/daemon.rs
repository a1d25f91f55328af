//! Startup order and ordered, bounded shutdown.
//!
//! Start: open the store → load API keys → spawn the actors → serve on the given listener →
//! tell systemd `READY=1`. Stop (the `shutdown` future resolves): stop accepting and finish
//! in-flight requests (bounded by `server.shutdown_timeout_s`) → drain every account actor →
//! final flush → return. Shutdown is an argument, so tests control it.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use meterd_actors::account::{AccountDeps, Accounts};
use meterd_actors::billing::PriceMap;
use meterd_actors::janitor::{self, JanitorArgs};
use meterd_actors::model::Clock;
use meterd_actors::outbox::{Outbox, OutboxArgs, OutboxSettings};
use meterd_actors::store::{Store, StoreConfig};
use meterd_actors::stripe::StripeHttp;
use meterd_actors::supervisor::{Components, Health, Restart, Supervisor, SupervisorArgs};
use meterd_actors::webhook::{WebhookArgs, WebhookSettings, Webhooks};
use poem::Server;
use poem::listener::TcpAcceptor;

use crate::config::Config;
use crate::http::auth::{ApiKeys, Scope};

/// Secrets, read from the environment by `main` (tests pass them directly).
#[derive(Clone, Default)]
pub struct Secrets {
    pub admin_key: Option<String>,
    pub app_key: Option<String>,
    /// `None`: offline (no Stripe key).
    pub stripe_key: Option<String>,
    /// Webhook signing secrets (several during a rotation); empty: webhooks are refused.
    pub webhook_secrets: Vec<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets([redacted])")
    }
}

/// Shortest API key accepted from the environment.
pub const MIN_KEY_LEN: usize = 16;

impl Secrets {
    /// Reads the variables the config names. A set but too short key is an error: a weak
    /// key must not be accepted silently.
    pub fn from_env(config: &Config) -> anyhow::Result<Secrets> {
        let read = |var: &str| -> anyhow::Result<Option<String>> {
            match std::env::var(var) {
                Ok(v) if v.is_empty() => Ok(None),
                Ok(v) if v.len() < MIN_KEY_LEN => anyhow::bail!(
                    "environment variable {var} holds a key shorter than {MIN_KEY_LEN} characters"
                ),
                Ok(v) => Ok(Some(v)),
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(e) => anyhow::bail!("environment variable {var}: {e}"),
            }
        };
        let stripe_key = match std::env::var(&config.stripe.secret_key_env) {
            Ok(v) if v.is_empty() => None,
            Ok(v) if v.starts_with("sk_") || v.starts_with("rk_") => Some(v),
            Ok(_) => anyhow::bail!(
                "environment variable {} does not hold a Stripe secret key (sk_... or rk_...)",
                config.stripe.secret_key_env
            ),
            Err(_) => None,
        };
        let var = &config.webhooks.secret_env;
        let webhook_secrets = match std::env::var(var) {
            Ok(v) => parse_webhook_secrets(&v)
                .map_err(|e| anyhow::anyhow!("environment variable {var}: {e}"))?,
            Err(_) => Vec::new(),
        };
        Ok(Secrets {
            admin_key: read(&config.admin_key_env)?,
            app_key: read(&config.app_key_env)?,
            stripe_key,
            webhook_secrets,
        })
    }
}

/// Splits a comma-separated list of webhook signing secrets (`whsec_…`).
pub fn parse_webhook_secrets(v: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !s.starts_with("whsec_") || s.len() < 16 {
            return Err(
                "holds a value that is not a Stripe webhook signing secret (whsec_...)".into(),
            );
        }
        out.push(s.to_owned());
    }
    Ok(out)
}

/// Where the admin key came from.
pub fn admin_key_file(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.key")
}

/// The admin key from the environment, or else from `<data_dir>/admin.key`, generated with
/// mode 0600 on first start. Logs the file's path, never the key.
fn load_keys(config: &Config, secrets: &Secrets) -> anyhow::Result<ApiKeys> {
    let mut keys = ApiKeys::default();
    match &secrets.admin_key {
        Some(k) => keys.add(k, Scope::Admin),
        None => {
            let path = admin_key_file(&config.data_dir);
            let key = read_or_create_key_file(&path)?;
            tracing::info!(
                file = %path.display(),
                "{} is not set; using the generated admin key stored in this file",
                config.admin_key_env
            );
            keys.add(&key, Scope::Admin);
        }
    }
    match &secrets.app_key {
        Some(k) => keys.add(k, Scope::App),
        None => tracing::warn!(
            "{} is not set: no app-scoped key exists, only the admin key can call the API",
            config.app_key_env
        ),
    }
    Ok(keys)
}

fn read_or_create_key_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "admin key file is readable by group or others; chmod 600 it");
            }
            let key = s.trim().to_owned();
            anyhow::ensure!(
                key.len() >= MIN_KEY_LEN,
                "admin key file {} holds a key shorter than {MIN_KEY_LEN} characters",
                path.display()
            );
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let key = format!("mtd_admin_{}", hex::encode(raw));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            writeln!(f, "{key}")?;
            f.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Start-up checks against Stripe: it answers, and every meter some plan bills has an active
/// Stripe meter with the configured `event_name`. Returns the problems, each naming the
/// config key to fix.
pub async fn stripe_self_check(config: &Config, client: &StripeHttp) -> Vec<String> {
    let meters = match client.active_meters().await {
        Ok(m) => m,
        Err(e) => return vec![format!("stripe.api_base: Stripe did not answer: {e}")],
    };
    let active: Vec<String> = meters.iter().map(|(_, name)| name.clone()).collect();
    let mut problems = meter_problems(config, &active);
    problems.extend(price_problems(config, client, &meters).await);
    problems
}

/// Every plan's `stripe_price` is an active, recurring, licensed price; its
/// `stripe_metered_price` is metered on an active meter recording one of the plan's billed
/// meters.
async fn price_problems(
    config: &Config,
    client: &StripeHttp,
    meters: &[(String, String)],
) -> Vec<String> {
    let mut problems = Vec::new();
    for (plan, sp) in &config.stripe.plans {
        if let Some(id) = &sp.stripe_price {
            let key = format!("plans.{plan}.stripe_price");
            match client.price(id).await {
                Err(e) => problems.push(format!("{key}: cannot read price `{id}`: {e}")),
                Ok(p) if !p.active => problems.push(format!("{key}: price `{id}` is not active")),
                Ok(p) if !p.recurring => {
                    problems.push(format!("{key}: price `{id}` is not recurring"))
                }
                Ok(p) if p.metered => problems.push(format!(
                    "{key}: price `{id}` is metered; the base price must be licensed"
                )),
                Ok(_) => {}
            }
        }
        if let Some(id) = &sp.stripe_metered_price {
            let key = format!("plans.{plan}.stripe_metered_price");
            let billed: Vec<&str> = config
                .catalog
                .plans
                .get(plan)
                .map(|p| {
                    p.meters
                        .iter()
                        .filter(|(_, r)| r.overage == meterd_actors::model::Overage::Bill)
                        .map(|(m, _)| config.stripe.event_name(m))
                        .collect()
                })
                .unwrap_or_default();
            match client.price(id).await {
                Err(e) => problems.push(format!("{key}: cannot read price `{id}`: {e}")),
                Ok(p) if !p.active => problems.push(format!("{key}: price `{id}` is not active")),
                Ok(p) if !p.metered => {
                    problems.push(format!("{key}: price `{id}` is not a metered price"))
                }
                Ok(p) => {
                    let event = p.meter.as_deref().and_then(|m| {
                        meters
                            .iter()
                            .find(|(mid, _)| mid == m)
                            .map(|(_, e)| e.as_str())
                    });
                    if !event.is_some_and(|e| billed.contains(&e)) {
                        problems.push(format!(
                            "{key}: price `{id}` is metered on {}, not on an active meter recording {}",
                            p.meter.as_deref().unwrap_or("no meter"),
                            billed.join(", ")
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// Every meter some plan bills has an active Stripe meter with its `event_name`.
fn meter_problems(config: &Config, active: &[String]) -> Vec<String> {
    let mut billed: Vec<&String> = config
        .catalog
        .plans
        .values()
        .flat_map(|p| p.meters.iter())
        .filter(|(_, r)| r.overage == meterd_actors::model::Overage::Bill)
        .map(|(m, _)| m)
        .collect();
    billed.sort();
    billed.dedup();
    billed
        .into_iter()
        .filter_map(|meter| {
            let name = config.stripe.event_name(meter);
            (!active.iter().any(|a| a == name)).then(|| {
                format!(
                    "stripe.meters.{meter}.event_name: Stripe has no active meter with event_name `{name}`"
                )
            })
        })
        .collect()
}

/// Stripe price → meterd plan, from the plans' `stripe_price` and `stripe_metered_price`.
fn price_map(config: &Config) -> PriceMap {
    let mut m = PriceMap::default();
    for (plan, sp) in &config.stripe.plans {
        if let Some(p) = &sp.stripe_price {
            m.plans.insert(p.clone(), plan.clone());
        }
        if let Some(p) = &sp.stripe_metered_price {
            // Shared metered prices name the first plan; the licensed item decides anyway.
            m.plans.entry(p.clone()).or_insert_with(|| plan.clone());
            m.metered.insert(p.clone());
        }
    }
    m
}

/// Runs the daemon on `listener` until `shutdown` resolves, then stops in order.
pub async fn run(
    config: Config,
    secrets: Secrets,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with_clock(config, secrets, listener, shutdown, Clock::System).await
}

pub async fn run_with_clock(
    config: Config,
    secrets: Secrets,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
) -> anyhow::Result<()> {
    let store_cfg = StoreConfig {
        path: config.data_dir.clone(),
        sync: config.sync,
        cache_capacity_bytes: config.cache_capacity_bytes,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&store_cfg))
        .await?
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        sync = ?config.sync,
        "store open"
    );
    if config.sync == meterd_actors::store::SyncMode::Flush {
        tracing::warn!(
            "storage.sync = \"flush\": acknowledged consumption survives a process crash but NOT a power loss or kernel crash; use \"fdatasync\" for full durability"
        );
    }
    let keys = load_keys(&config, &secrets)?;
    let clock_for_outbox = clock.clone();
    let clock_for_webhooks = clock.clone();
    let deps = AccountDeps {
        store: store.clone(),
        catalog: Arc::new(config.catalog.clone()),
        clock: clock.clone(),
        settings: Arc::new(config.accounts.clone()),
    };
    // One supervision tree: every singleton below is started by the root supervisor.
    let components = Components::default();
    components.set("storage", Health::Ok, None);
    let (supervisor, supervisor_handle) = Supervisor::spawn(SupervisorArgs {
        policy: config.supervisor.clone(),
        components: components.clone(),
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the supervisor: {e}"))?;
    // Generations of a third of the retention: a lookup asks about four, a record lives
    // between the retention and a third more.
    store.set_idem_generation(
        i64::try_from(config.idempotency_retention.as_millis() / 3).unwrap_or(i64::MAX),
    );
    let (accounts, start) = Accounts::prepare(deps);
    supervisor
        .start("directory", Restart::Never, start)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the account directory: {e}"))?;
    let (janitor, start) = janitor::prepare(JanitorArgs {
        store: store.clone(),
        clock,
        retention: config.idempotency_retention,
        interval: config.sweep_interval,
    });
    supervisor
        .start("janitor", Restart::WithBackoff, start)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the janitor: {e}"))?;

    let client = match &secrets.stripe_key {
        Some(key) => {
            let c = StripeHttp::new(&config.stripe.api_base, key, config.stripe.timeout)
                .map_err(|e| anyhow::anyhow!("cannot build the Stripe client: {e}"))?
                .with_stream_base(&config.stripe.meter_events_stream_base);
            tracing::info!(api_base = %config.stripe.api_base, meter_events = ?config.stripe.meter_events, "Stripe: online; billable usage is sent to Billing Meters");
            let problems = stripe_self_check(&config, &c).await;
            for p in &problems {
                tracing::error!(problem = %p, "Stripe self-check failed");
            }
            if config.stripe.strict && !problems.is_empty() {
                anyhow::bail!(
                    "Stripe self-check failed (stripe.strict = true): {}",
                    problems.join("; ")
                );
            }
            Some(c)
        }
        None => {
            tracing::warn!(
                "Stripe: offline ({} is not set); everything local works, and billable usage waits in the outbox until a key is set and meterd restarts",
                config.stripe.secret_key_env
            );
            None
        }
    };
    let stripe_for_http = client.clone();
    let s = &config.stripe;
    let stripe_online = client.is_some();
    let (outbox, start) = Outbox::prepare(OutboxArgs {
        store: store.clone(),
        accounts: accounts.clone(),
        clock: clock_for_outbox,
        settings: OutboxSettings {
            client,
            event_names: s.event_names.clone(),
            poll: s.poll,
            batch: s.batch,
            max_attempts: s.max_attempts,
            base_backoff: s.base_backoff,
            max_backoff: s.max_backoff,
            calls_per_second: s.calls_per_second,
            concurrency: s.concurrency,
            breaker_failures: s.breaker_failures,
            breaker_cooldown: s.breaker_cooldown,
            aggregation: s.aggregation.clone(),
            meter_events: s.meter_events,
        },
    });
    supervisor
        .start("outbox", Restart::WithBackoff, start)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the outbox: {e}"))?;

    let w = &config.webhooks;
    if secrets.webhook_secrets.is_empty() {
        if config.stripe.strict {
            anyhow::bail!(
                "no Stripe webhook signing secret: {} is not set (stripe.strict = true refuses to start without one)",
                w.secret_env
            );
        }
        tracing::warn!(
            "Stripe webhooks are NOT received: {} is not set, so POST /webhooks/stripe answers 503 and Stripe's events (subscriptions, payments, top-ups) do not reach meterd",
            w.secret_env
        );
    }
    let (webhooks, start) = Webhooks::prepare(WebhookArgs {
        store: store.clone(),
        accounts: accounts.clone(),
        clock: clock_for_webhooks.clone(),
        settings: WebhookSettings {
            client: stripe_for_http.clone(),
            prices: price_map(&config),
            fallback_plan: w.fallback_plan.clone(),
            max_attempts: w.max_attempts,
            base_backoff: w.base_backoff,
            max_backoff: w.max_backoff,
            retention: w.retention,
            refetch: config.stripe.refetch_on_webhook,
            poll: Duration::from_millis(200),
            backfill_on_start: w.backfill_on_start,
            backfill_days: w.backfill_days,
        },
    });
    supervisor
        .start("webhooks", Restart::WithBackoff, start)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the webhook actor: {e}"))?;
    let receiver = Arc::new(crate::http::webhooks::Receiver {
        webhooks: webhooks.clone(),
        secrets: secrets.webhook_secrets.clone(),
        tolerance_s: w.tolerance_s,
        max_body_bytes: w.max_body_bytes,
        clock: clock_for_webhooks,
    });

    let ready = Arc::new(AtomicBool::new(true));
    let app = crate::http::app(crate::http::AppDeps {
        accounts: accounts.clone(),
        store: store.reader(),
        keys,
        max_body_bytes: config.max_body_bytes,
        max_batch_body_bytes: config.max_batch_body_bytes,
        rate_limits: config.rate_limits,
        ready: ready.clone(),
        components: components.clone(),
        stripe_online,
        outbox: outbox.clone(),
        stripe: stripe_for_http,
        stripe_config: Arc::new(config.stripe.clone()),
        catalog: Arc::new(config.catalog.clone()),
        webhooks: webhooks.clone(),
        receiver,
    });
    let addr = listener.local_addr()?;
    let acceptor = TcpAcceptor::from_tokio(listener)?;
    tracing::info!(addr = %addr, "meterd ready");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    // One machine-readable line on stdout once ready: scripts and tests read the bound port
    // here (the equivalent of READY=1 without systemd).
    #[allow(clippy::print_stdout)]
    {
        println!("meterd listening on {addr}");
    }

    let watchdog = spawn_watchdog(store.clone(), accounts.clone());
    // Stop on the caller's signal, or on a fault the supervisor cannot repair (a component
    // failing too often, the directory failing) or a failed flush: then exit non-zero so
    // systemd restarts the process.
    let fault: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let stop = {
        let (supervisor, store, fault) = (supervisor.clone(), store.clone(), fault.clone());
        async move {
            let reason = tokio::select! {
                () = shutdown => return,
                r = supervisor.fatal() => r,
                r = storage_failure(store) => r,
            };
            tracing::error!(reason = %reason, "stopping after a fault");
            *fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        }
    };
    let served = Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app, stop, Some(config.shutdown_timeout))
        .await;
    ready.store(false, Ordering::Release);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("HTTP stopped; draining account actors");
    if let Some(w) = watchdog {
        w.abort();
    }

    // In order, and none restarted meanwhile.
    supervisor.stopping().await;
    let bound = config.shutdown_timeout;
    webhooks.stop_and_wait(bound).await;
    outbox.stop_and_wait(bound).await;
    let drained = accounts.shutdown(bound).await;
    if let Some(j) = janitor.get() {
        let _ = j.stop_and_wait(None, Some(bound)).await;
    }
    supervisor.stop();
    let _ = supervisor_handle.await;
    let closed = tokio::task::spawn_blocking(move || store.close()).await?;
    served.context("HTTP server failed")?;
    let fault = fault.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(reason) = fault {
        anyhow::bail!("meterd stopped after a fault: {reason}");
    }
    drained.map_err(|e| anyhow::anyhow!("account actors did not stop cleanly: {e}"))?;
    closed.map_err(|e| anyhow::anyhow!("final flush failed: {e}"))?;
    tracing::info!("meterd stopped");
    Ok(())
}

/// Resolves once a flush to disk has failed (checked twice a second).
async fn storage_failure(store: Store) -> String {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if store.has_failed() {
            return "a flush to disk failed: the store refuses every write until a restart".into();
        }
    }
}

/// The watchdog interval systemd asks for, as `sd_watchdog_enabled(3)` reads it:
/// `WATCHDOG_USEC`, unless `WATCHDOG_PID` is set and names another process.
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then_some(usec)
}

/// Under systemd with `WatchdogSec=`: sends `WATCHDOG=1` at half the interval, but only
/// while the flusher completes a flush and the account directory answers, each within a
/// second. A wedged daemon stops pinging and systemd restarts it.
fn spawn_watchdog(store: Store, accounts: Accounts) -> Option<tokio::task::JoinHandle<()>> {
    let usec = watchdog_usec()?;
    let every = Duration::from_micros(usec / 2);
    tracing::info!(
        every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let limit = Duration::from_secs(1);
            let flushed = matches!(
                tokio::time::timeout(limit, store.barrier()).await,
                Ok(Ok(()))
            );
            let directory = matches!(
                tokio::time::timeout(limit, accounts.stats()).await,
                Ok(Ok(_))
            );
            if flushed && directory {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(flushed, directory, "watchdog: not pinging systemd");
            }
        }
    }))
}
