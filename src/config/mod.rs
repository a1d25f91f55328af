//! Configuration: `config.toml` (raw, serde, unknown keys rejected) → validated [`Config`].
//!
//! This module owns the file format and its checks. Secrets never live in the file: it names
//! environment variables, and [`Config`] holds only those names. Relative paths resolve
//! against the folder of the config file. There is deliberately no `Default for Config`: the
//! shipped `config.toml` (embedded in the binary as [`EMBEDDED_DEFAULT`]) is the default.
//!
//! [`Config::parse`] reads the file into the serde types of `raw` (which checks types, string
//! choices and nonzero settings), then hands each section to its builder, which checks the
//! rest and names the offending key in any error:
//!
//! - `service`: `[server]`, `[storage]`, `[accounts]`, `[idempotency]`, `[supervisor]`,
//!   `[auth]`, `[log]`;
//! - `rate_limits`: `[rate_limits]`;
//! - `catalog`: `[meters]`, `[plans]` (meter rules, price models), `[[credit_packages]]`;
//! - `stripe`: `[stripe]` (meters, aggregation windows, Checkout) and each plan's Stripe keys;
//! - `webhooks`: `[webhooks]`;
//! - `reconciler`: `[reconciler]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meterd_actors::account::AccountSettings;
use meterd_actors::model::Catalog;
use meterd_actors::store::SyncMode;

mod catalog;
mod rate_limits;
mod raw;
mod reconciler;
mod service;
mod stripe;
mod webhooks;

pub use rate_limits::{RATE_LIMIT_MAX, RateLimit, RateLimits};
pub use reconciler::ReconcilerConfig;
pub use service::LogFormat;
pub use stripe::{StripeConfig, StripePlan};
pub use webhooks::WebhookConfig;

/// The shipped `config.toml`, used when no config file is given and none is found.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config {origin}: `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// `[auth] failed_per_minute` and `failed_burst`: wrong keys allowed per peer address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedAuthLimit {
    pub per_minute: u64,
    pub burst: u64,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from: a path, or "(embedded default)".
    pub origin: String,
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub shutdown_timeout: Duration,
    /// Connection cap and timeouts (`[server]`).
    pub connections: crate::server::ConnectionLimits,
    /// A request body must arrive within this (`server.body_read_timeout_ms`).
    pub body_read_timeout: Duration,
    /// Failed authentications allowed per peer address (`[auth] failed_*`).
    pub failed_auth: FailedAuthLimit,
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    pub cache_capacity_bytes: u64,
    pub accounts: AccountSettings,
    pub supervisor: meterd_actors::supervisor::SupervisorPolicy,
    pub idempotency_retention: Duration,
    pub sweep_interval: Duration,
    pub admin_key_env: String,
    pub app_key_env: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub rate_limits: RateLimits,
    pub catalog: Catalog,
    pub stripe: StripeConfig,
    pub webhooks: WebhookConfig,
    pub reconciler: ReconcilerConfig,
}

impl Config {
    /// Loads `path`, resolving relative paths against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&text, &path.display().to_string(), &base)
    }

    /// The embedded default, with relative paths against `base` (the working directory).
    pub fn embedded(base: &Path) -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, "(embedded default)", base)
    }

    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw = raw::from_toml(text, origin)?;
        Config::build(raw, origin, base).map_err(|e| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: e.key,
            message: e.message,
        })
    }

    /// Each section in turn; the first invalid setting is the error.
    fn build(raw: raw::RawConfig, origin: &str, base: &Path) -> Result<Config, Invalid> {
        let service::Server {
            listen,
            max_body_bytes,
            max_batch_body_bytes,
            shutdown_timeout,
            connections,
            body_read_timeout,
        } = service::server(&raw.server)?;
        let service::Storage {
            data_dir,
            sync,
            cache_capacity_bytes,
        } = service::storage(&raw.storage, base)?;
        let accounts = service::accounts(&raw.accounts)?;
        let idempotency = service::idempotency(&raw.idempotency)?;
        let supervisor = service::supervisor(&raw.supervisor)?;
        let auth = service::auth(raw.auth)?;
        let log = service::log(raw.log)?;
        let rate_limits = rate_limits::build(&raw.rate_limits)?;
        let catalog = catalog::build(&raw.meters, &raw.plans, &raw.credit_packages)?;
        let stripe = stripe::build(&raw.stripe, &raw.plans, &catalog)?;
        let webhooks = webhooks::build(&raw.webhooks, &stripe, &catalog)?;
        let reconciler = reconciler::build(&raw.reconciler, &catalog)?;
        Ok(Config {
            origin: origin.to_owned(),
            listen,
            max_body_bytes,
            max_batch_body_bytes,
            shutdown_timeout,
            connections,
            body_read_timeout,
            failed_auth: FailedAuthLimit {
                per_minute: auth.failed_per_minute,
                burst: auth.failed_burst,
            },
            data_dir,
            sync,
            cache_capacity_bytes,
            accounts,
            supervisor,
            idempotency_retention: idempotency.retention,
            sweep_interval: idempotency.sweep_interval,
            admin_key_env: auth.admin_key_env,
            app_key_env: auth.app_key_env,
            log_format: log.format,
            log_level: log.level,
            rate_limits,
            catalog,
            stripe,
            webhooks,
            reconciler,
        })
    }
}

/// An invalid setting, found by a section builder: its full key and what is wrong.
#[derive(Debug)]
struct Invalid {
    key: String,
    message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Whether `var` can name an environment variable: `A-Z a-z 0-9 _`, at least one.
fn valid_env_name(var: &str) -> bool {
    !var.is_empty() && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterd_actors::model::Overage;

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/meterd"))
    }

    /// Each `(from, to, key)`: the embedded default with `from` replaced by `to` is refused
    /// with an error that names `key`.
    pub(super) fn assert_edits_name_keys(cases: &[(&str, &str, &str)]) {
        for (from, to, key) in cases {
            assert!(EMBEDDED_DEFAULT.contains(from), "default lacks {from}");
            let err = parse(&EMBEDDED_DEFAULT.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn the_shipped_default_is_valid_and_carries_the_seed_plans() {
        let c = Config::embedded(Path::new("/srv")).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.data_dir, PathBuf::from("/srv/data"));
        assert_eq!(c.sync, SyncMode::Fdatasync);
        for plan in ["free", "payg", "pro", "team", "enterprise", "prepaid"] {
            assert!(c.catalog.plans.contains_key(plan), "missing plan {plan}");
        }
        let free = &c.catalog.plans["free"].meters["tokens"];
        assert_eq!(free.included, 100);
        assert_eq!(free.overage, Overage::Block);
        assert_eq!(
            c.catalog.plans["prepaid"].meters["tokens"].overage,
            Overage::Credits {
                credits_per_unit: 1
            }
        );
        assert_eq!(c.catalog.plans["team"].min_seats, 2);
        assert_eq!(c.catalog.plans["team"].seat_price, 1900);
        assert_eq!(c.catalog.plans["pro"].base_price, 2900);
        let credits: Vec<u64> = c
            .catalog
            .credit_packages
            .iter()
            .map(|p| p.credits)
            .collect();
        assert_eq!(credits, vec![500, 1000, 5000, 10000]);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let text = EMBEDDED_DEFAULT.replace("[server]", "[server]\nlisten_port = 1");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
        let text = EMBEDDED_DEFAULT.replace("included = 100", "included = 100\nincluded_typo = 3");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("included_typo"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (
                "sync = \"fdatasync\"",
                "sync = \"sometimes\"",
                "storage.sync",
            ),
            (
                "listen = \"127.0.0.1:8787\"",
                "listen = \"localhost\"",
                "server.listen",
            ),
            (
                "retention_hours = 72",
                "retention_hours = 1",
                "idempotency.retention_hours",
            ),
            (
                "overage = \"block\"",
                "overage = \"explode\"",
                "plans.free.meters.tokens.overage",
            ),
        ];
        assert_edits_name_keys(&cases);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/meterd/data"));
        let abs =
            EMBEDDED_DEFAULT.replacen("data_dir = \"data\"", "data_dir = \"/var/lib/meterd\"", 1);
        assert_eq!(
            parse(&abs).unwrap().data_dir,
            PathBuf::from("/var/lib/meterd")
        );
    }
}
