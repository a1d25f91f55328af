//! The one integration-test binary: starts the real daemon on 127.0.0.1:0 (in process, or the
//! built binary for crash and signal tests). Loopback only; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod aggregation;
mod alerts;
mod api;
mod batch;
mod checkout;
mod consume;
mod crash;
mod credits;
mod fake_stripe;
mod fuzz;
mod hostile;
mod logs;
mod outbox;
mod periods;
mod plans;
mod ratelimit;
mod reconcile;
mod reservations;
mod shutdown;
mod soak;
mod stream;
mod support;
mod upgrade;
mod usage;
mod validation;
mod webhooks;
