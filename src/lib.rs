//! meterd, the daemon: configuration, HTTP, authentication, startup and shutdown.
//!
//! The core (actors, store, ledger) lives in `meterd-actors`; this crate is the glue that
//! turns a config file into a running service. See ARCHITECTURE.md for the map.

pub mod config;
pub mod daemon;
pub mod http;
pub mod server;
pub mod telemetry;
