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
use meterd_actors::reconciler::{Reconciler, ReconcilerArgs, ReconcilerSettings};
use meterd_actors::store::{Store, StoreConfig};
use meterd_actors::stripe::StripeHttp;
use meterd_actors::supervisor::{Components, Health, Restart, Supervisor, SupervisorArgs};
use meterd_actors::webhook::{WebhookArgs, WebhookSettings, Webhooks};

use crate::config::Config;
use crate::http::auth::{ApiKeys, Scope};

/// Secrets, read from the environment by `main` (tests pass them directly).
#[derive(Clone, Default)]
pub struct Secrets {
    /// Admin keys (several during a rotation); empty: the generated `admin.key` is used.
    pub admin_keys: Vec<String>,
    /// App keys (several during a rotation); empty: no app-scoped key exists.
    pub app_keys: Vec<String>,
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

/// Splits a comma-separated list of API keys; each must be at least [`MIN_KEY_LEN`] long.
pub fn parse_api_keys(v: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for k in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if k.len() < MIN_KEY_LEN {
            return Err(format!(
                "holds a key shorter than {MIN_KEY_LEN} characters (several keys are separated by commas)"
            ));
        }
        if !out.iter().any(|o| o == k) {
            out.push(k.to_owned());
        }
    }
    Ok(out)
}

impl Secrets {
    /// Reads the variables the config names. A set but too short key is an error: a weak
    /// key must not be accepted silently.
    pub fn from_env(config: &Config) -> anyhow::Result<Secrets> {
        let read = |var: &str| -> anyhow::Result<Vec<String>> {
            match std::env::var(var) {
                Ok(v) => parse_api_keys(&v)
                    .map_err(|e| anyhow::anyhow!("environment variable {var} {e}")),
                Err(std::env::VarError::NotPresent) => Ok(Vec::new()),
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
            admin_keys: read(&config.admin_key_env)?,
            app_keys: read(&config.app_key_env)?,
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

/// The admin keys from the environment, or else the one in `<data_dir>/admin.key`, generated
/// with mode 0600 on first start; and the app keys. Logs the file's path, never a key. An
/// admin key that is also an app key is an error: the app would have admin rights.
fn load_keys(config: &Config, secrets: &Secrets) -> anyhow::Result<ApiKeys> {
    let mut keys = ApiKeys::default();
    let admin: Vec<String> = if secrets.admin_keys.is_empty() {
        let path = admin_key_file(&config.data_dir);
        let key = read_or_create_key_file(&path)?;
        tracing::info!(
            file = %path.display(),
            "{} is not set; using the generated admin key stored in this file",
            config.admin_key_env
        );
        vec![key]
    } else {
        secrets.admin_keys.clone()
    };
    // The error names the variables, never the key.
    if secrets.app_keys.iter().any(|k| admin.contains(k)) {
        anyhow::bail!(
            "a key in {} is also an admin key ({}{}): an app would have admin rights; give apps a key of their own",
            config.app_key_env,
            config.admin_key_env,
            if secrets.admin_keys.is_empty() {
                ", from admin.key"
            } else {
                ""
            }
        );
    }
    for k in &admin {
        keys.add(k, Scope::Admin);
    }
    for k in &secrets.app_keys {
        keys.add(k, Scope::App);
    }
    if secrets.app_keys.is_empty() {
        tracing::warn!(
            "{} is not set: no app-scoped key exists, only the admin key can call the API",
            config.app_key_env
        );
    }
    if admin.len() > 1 || secrets.app_keys.len() > 1 {
        tracing::info!(
            admin_keys = admin.len(),
            app_keys = secrets.app_keys.len(),
            "several keys per scope (a rotation in progress?)"
        );
    }
    Ok(keys)
}

/// Creates the data directory with mode 0700, or checks an existing one. A directory that
/// holds a store and is open to group or others is an error (its ledgers, emails and webhook
/// bodies would be readable by other local users); one without a store yet (a fresh clone's
/// `data/`) is tightened to 0700.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
            // The umask may have narrowed it further, never widened it; make it exact.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
        Ok(m) if !m.is_dir() => anyhow::bail!(
            "storage.data_dir {} exists and is not a directory",
            dir.display()
        ),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 == 0 {
                return Ok(());
            }
            let holds_store = dir.join("conf").exists() || dir.join("db").exists();
            if holds_store {
                anyhow::bail!(
                    "the data directory {} has mode {mode:03o}: group or others can read its ledgers; run `chmod 700 {}` (under systemd, set StateDirectoryMode=0700) and start again",
                    dir.display(),
                    dir.display()
                );
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| {
                    format!(
                        "the data directory {} has mode {mode:03o} and cannot be narrowed to 0700; run `chmod 700 {}`",
                        dir.display(),
                        dir.display()
                    )
                })?;
            tracing::info!(data_dir = %dir.display(), "data directory narrowed to mode 0700 (it held no store yet)");
            Ok(())
        }
    }
}

fn read_or_create_key_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            anyhow::ensure!(
                mode & 0o077 == 0,
                "the admin key file {} has mode {mode:03o}: group or others can read the admin key; run `chmod 600 {}` (and rotate the key if others may have read it) and start again",
                path.display(),
                path.display()
            );
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
    prepare_data_dir(&config.data_dir)?;
    let keys = load_keys(&config, &secrets)?;
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
    let clock_for_outbox = clock.clone();
    let clock_for_webhooks = clock.clone();
    let clock_for_reconciler = clock.clone();
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
            money: w.money,
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
    let r = &config.reconciler;
    let reconciler = if r.enabled {
        let (reconciler, start) = Reconciler::prepare(ReconcilerArgs {
            store: store.clone(),
            accounts: accounts.clone(),
            clock: clock_for_reconciler,
            settings: ReconcilerSettings {
                client: stripe_for_http.clone(),
                event_names: config.stripe.event_names.clone(),
                aggregation: config.stripe.aggregation.clone(),
                interval: r.interval,
                lag: r.lag,
                reads_per_second: r.reads_per_second,
                alert_percent: r.alert_percent,
                money_meters: r.money_meters.clone(),
                keep_ok: r.keep_ok,
                state_stale: r.state_stale,
                prices: price_map(&config),
                fallback_plan: config.webhooks.fallback_plan.clone(),
                money: config.webhooks.money,
            },
        });
        supervisor
            .start("reconciler", Restart::WithBackoff, start)
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the reconciler: {e}"))?;
        Some(reconciler)
    } else {
        tracing::warn!(
            "reconciler: disabled ([reconciler] enabled = false); drift between meterd and Stripe is not looked for"
        );
        None
    };
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
        body_read_timeout: config.body_read_timeout,
        failed_auth: config.failed_auth,
        ready: ready.clone(),
        components: components.clone(),
        stripe_online,
        outbox: outbox.clone(),
        stripe: stripe_for_http,
        stripe_config: Arc::new(config.stripe.clone()),
        catalog: Arc::new(config.catalog.clone()),
        webhooks: webhooks.clone(),
        reconciler: reconciler.clone(),
        receiver,
    });
    let addr = listener.local_addr()?;
    warn_if_few_descriptors(config.connections.max_connections);
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
    let served = crate::server::serve(
        listener,
        app,
        config.connections,
        stop,
        config.shutdown_timeout,
    )
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
    if let Some(r) = &reconciler {
        r.stop_and_wait(bound).await;
    }
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

/// Warns when the soft file-descriptor limit cannot hold `server.max_connections` plus the
/// store's own files: past it, new connections wait for descriptors instead of the cap.
fn warn_if_few_descriptors(max_connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < max_connections.saturating_add(128)
    {
        tracing::warn!(
            open_files_limit = soft,
            max_connections,
            "the open-files limit is close to server.max_connections; raise it (ulimit -n, or LimitNOFILE under systemd) or lower server.max_connections"
        );
    }
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
