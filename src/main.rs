//! The `meterd` command: `serve` (default), `check-config`, `ledger verify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meterd::config::Config;
use meterd::daemon::{self, Secrets};
use meterd_actors::store::{Store, StoreConfig};

/// mimalloc: the daemon allocates many small short-lived objects per request (HTTP, JSON,
/// sled nodes); glibc malloc was 15-17% of CPU under load (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "meterd",
    version,
    about = "Self-hosted usage metering and billing daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args, Clone, Default)]
struct ConfigArg {
    /// Config file. Default: ./config.toml if present, else the embedded default.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(clap::Args, Clone, Default)]
struct ServeArgs {
    #[command(flatten)]
    cfg: ConfigArg,
    /// Listen address, overriding `server.listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Data directory, overriding `storage.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Serve(ServeArgs),
    /// Validate the config file and the environment, then exit.
    CheckConfig(ConfigArg),
    /// Ledger tools.
    Ledger {
        #[command(subcommand)]
        cmd: LedgerCmd,
    },
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Recompute every account from its ledger; exit non-zero on any difference. Run it on a
    /// stopped daemon (sled allows one process per data directory).
    Verify {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Data directory, overriding `storage.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    let config = match &arg.config {
        Some(p) => Config::load(p)?,
        None if Path::new("config.toml").exists() => Config::load(Path::new("config.toml"))?,
        None => Config::embedded(&std::env::current_dir()?)?,
    };
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::CheckConfig(cfg)) => check_config(&cfg),
        Some(Command::Ledger {
            cmd: LedgerCmd::Verify { cfg, data_dir },
        }) => verify(&cfg, data_dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meterd: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = load_config(&args.cfg)?;
    if let Some(l) = &args.listen {
        config.listen = l
            .parse()
            .with_context(|| format!("--listen `{l}` is not an address like 127.0.0.1:8787"))?;
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    meterd::telemetry::init(config.log_format, &config.log_level);
    let secrets = Secrets::from_env(&config)?;
    tracing::info!(config = %config.origin, "configuration loaded");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("meterd")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        daemon::run(config, secrets, listener, shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

#[allow(clippy::print_stdout)]
fn check_config(arg: &ConfigArg) -> anyhow::Result<ExitCode> {
    let config = load_config(arg)?;
    Secrets::from_env(&config)?;
    println!("config OK: {}", config.origin);
    println!("  listen:   {}", config.listen);
    println!("  data_dir: {}", config.data_dir.display());
    println!("  sync:     {:?}", config.sync);
    println!(
        "  meters:   {}",
        config
            .catalog
            .meters
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  plans:    {}",
        config
            .catalog
            .plans
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    for var in [&config.admin_key_env, &config.app_key_env] {
        let set = std::env::var(var).is_ok_and(|v| !v.is_empty());
        println!("  {var}: {}", if set { "set" } else { "not set" });
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)]
fn verify(arg: &ConfigArg, data_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = load_config(arg)?;
    let path = data_dir.unwrap_or(config.data_dir);
    anyhow::ensure!(
        path.join("db").exists(),
        "no store in {} (nothing to verify)",
        path.display()
    );
    let store = Store::open(&StoreConfig {
        path: path.clone(),
        sync: config.sync,
        cache_capacity_bytes: config.cache_capacity_bytes,
    })
    .with_context(|| {
        format!(
            "cannot open {} (is the daemon still running?)",
            path.display()
        )
    })?;
    let report = meterd_actors::verify::verify_store(&store)?;
    let _ = store.close();
    println!(
        "verified {} accounts, {} ledger entries",
        report.accounts, report.entries
    );
    for p in &report.problems {
        println!("MISMATCH {p}");
    }
    Ok(if report.ok() {
        println!("ledger OK");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
