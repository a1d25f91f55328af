//! The daemon's own sections: `[server]`, `[storage]`, `[accounts]`, `[idempotency]`, `[auth]`
//! and `[log]`, one builder each. (`storage.sync`, `log.format` and the `accounts` and
//! `idempotency` settings that must be at least 1 are typed, so serde checks them: see
//! [`super::raw`].)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meterd_actors::account::AccountSettings;
use meterd_actors::store::SyncMode;
use meterd_actors::supervisor::SupervisorPolicy;

use super::raw::{
    RawAccounts, RawAuth, RawIdempotency, RawLog, RawServer, RawStorage, RawSupervisor,
};
use super::{Invalid, invalid, valid_env_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `[server]`.
pub(super) struct Server {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub shutdown_timeout: Duration,
    pub connections: crate::server::ConnectionLimits,
    pub body_read_timeout: Duration,
}

/// Most connections `server.max_connections` may allow (each is a file descriptor).
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

pub(super) fn server(raw: &RawServer) -> Result<Server, Invalid> {
    let listen: SocketAddr = raw.listen.parse().map_err(|e| {
        invalid(
            "server.listen",
            format!(
                "`{}` is not an address like 127.0.0.1:8787 ({e})",
                raw.listen
            ),
        )
    })?;
    if raw.max_batch_body_bytes < raw.max_body_bytes {
        return Err(invalid(
            "server.max_batch_body_bytes",
            "must be at least server.max_body_bytes",
        ));
    }
    if raw.max_body_bytes < 256 {
        return Err(invalid("server.max_body_bytes", "must be at least 256"));
    }
    if !(1..=MAX_CONNECTIONS_LIMIT).contains(&raw.max_connections) {
        return Err(invalid(
            "server.max_connections",
            format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
        ));
    }
    for (key, ms) in [
        ("server.header_read_timeout_ms", raw.header_read_timeout_ms),
        ("server.body_read_timeout_ms", raw.body_read_timeout_ms),
    ] {
        if !(100..=3_600_000).contains(&ms) {
            return Err(invalid(key, "must be between 100 and 3600000 (one hour)"));
        }
    }
    if !(1..=86_400).contains(&raw.idle_timeout_s) {
        return Err(invalid(
            "server.idle_timeout_s",
            "must be between 1 and 86400 (one day)",
        ));
    }
    Ok(Server {
        listen,
        max_body_bytes: raw.max_body_bytes,
        max_batch_body_bytes: raw.max_batch_body_bytes,
        shutdown_timeout: Duration::from_secs(raw.shutdown_timeout_s.max(1)),
        connections: crate::server::ConnectionLimits {
            max_connections: raw.max_connections,
            header_read_timeout: Duration::from_millis(raw.header_read_timeout_ms),
            idle_timeout: Duration::from_secs(raw.idle_timeout_s),
        },
        body_read_timeout: Duration::from_millis(raw.body_read_timeout_ms),
    })
}

/// `[storage]`; a relative `data_dir` resolves against `base`.
pub(super) struct Storage {
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    pub cache_capacity_bytes: u64,
}

pub(super) fn storage(raw: &RawStorage, base: &Path) -> Result<Storage, Invalid> {
    if raw.data_dir.is_empty() {
        return Err(invalid("storage.data_dir", "must not be empty"));
    }
    if raw.cache_capacity_mb > 1 << 20 {
        return Err(invalid(
            "storage.cache_capacity_mb",
            "must be at most 1048576 (1 TiB)",
        ));
    }
    Ok(Storage {
        // `join` keeps an absolute path as it is.
        data_dir: base.join(&raw.data_dir),
        sync: raw.sync,
        cache_capacity_bytes: raw.cache_capacity_mb.max(1) * 1024 * 1024,
    })
}

pub(super) fn accounts(raw: &RawAccounts) -> Result<AccountSettings, Invalid> {
    if raw.call_timeout_ms < 10 {
        return Err(invalid("accounts.call_timeout_ms", "must be at least 10"));
    }
    if raw.past_due_grace_hours > 87_600 {
        return Err(invalid(
            "accounts.past_due_grace_hours",
            "must be at most 87600 (ten years)",
        ));
    }
    Ok(AccountSettings {
        idle_timeout: Duration::from_secs(raw.idle_timeout_s.get()),
        snapshot_every: raw.snapshot_every.get(),
        call_timeout: Duration::from_millis(raw.call_timeout_ms),
        max_live: raw.max_live.get(),
        max_queued: raw.max_queued.get(),
        past_due_grace: Duration::from_secs(raw.past_due_grace_hours * 3600),
    })
}

/// `[supervisor]`: restart policy of the singleton actors.
pub(super) fn supervisor(raw: &RawSupervisor) -> Result<SupervisorPolicy, Invalid> {
    if raw.max_backoff_ms < raw.base_backoff_ms {
        return Err(invalid(
            "supervisor.max_backoff_ms",
            "must be at least supervisor.base_backoff_ms",
        ));
    }
    Ok(SupervisorPolicy {
        max_failures: raw.max_failures.get(),
        window: Duration::from_secs(raw.window_s.get()),
        base_backoff: Duration::from_millis(raw.base_backoff_ms.get()),
        max_backoff: Duration::from_millis(raw.max_backoff_ms.get()),
    })
}

/// `[idempotency]`.
pub(super) struct Idempotency {
    pub retention: Duration,
    pub sweep_interval: Duration,
}

pub(super) fn idempotency(raw: &RawIdempotency) -> Result<Idempotency, Invalid> {
    if raw.retention_hours < 72 {
        return Err(invalid(
            "idempotency.retention_hours",
            "must be at least 72: clients retry for up to three days",
        ));
    }
    if raw.retention_hours > 87_600 {
        return Err(invalid(
            "idempotency.retention_hours",
            "must be at most 87600 (ten years)",
        ));
    }
    Ok(Idempotency {
        retention: Duration::from_secs(raw.retention_hours * 3600),
        sweep_interval: Duration::from_secs(raw.sweep_interval_s.get()),
    })
}

/// `[auth]`: the names of two distinct environment variables.
pub(super) fn auth(raw: RawAuth) -> Result<RawAuth, Invalid> {
    for (key, var) in [
        ("auth.admin_key_env", &raw.admin_key_env),
        ("auth.app_key_env", &raw.app_key_env),
    ] {
        if !valid_env_name(var) {
            return Err(invalid(
                key,
                format!("`{var}` is not an environment variable name"),
            ));
        }
    }
    for (key, v) in [
        ("auth.failed_per_minute", raw.failed_per_minute),
        ("auth.failed_burst", raw.failed_burst),
    ] {
        if !(1..=1_000_000).contains(&v) {
            return Err(invalid(key, "must be between 1 and 1000000"));
        }
    }
    if raw.admin_key_env == raw.app_key_env {
        return Err(invalid(
            "auth.app_key_env",
            "must differ from auth.admin_key_env",
        ));
    }
    Ok(raw)
}

/// `[log]`: `level` must be a filter that tracing accepts.
pub(super) fn log(raw: RawLog) -> Result<RawLog, Invalid> {
    if tracing_subscriber::EnvFilter::try_new(&raw.level).is_err() {
        return Err(invalid(
            "log.level",
            format!("`{}` is not a log filter such as `info`", raw.level),
        ));
    }
    Ok(raw)
}
