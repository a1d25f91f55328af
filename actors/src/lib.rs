//! meterd's core: the actors, the sled store, the ledger and the domain model.
//!
//! Actor map:
//! - [`account::DirectoryActor`] owns `AccountId → ActorRef` and supervises one
//!   [`account::AccountActor`] per live account.
//! - [`account::AccountActor`] is the only writer of its account's ledger.
//! - [`outbox::OutboxActor`] delivers billable usage to Stripe Billing Meters, exactly once.
//! - [`webhook::WebhookActor`] applies logged Stripe events to their accounts, in order.
//! - [`janitor::JanitorActor`] expires idempotency records after the retention period.
//! - [`reconciler::ReconcilerActor`] compares billable usage with Stripe's meter summaries
//!   and repairs what it can prove.
//! - [`supervisor::RootSupervisor`] starts the singletons above (the directory included),
//!   restarts a failed one with backoff, and reports a fault it cannot repair.
//!
//! **Architecture invariant:** this crate knows nothing of HTTP, CLIs or file formats; it
//! depends on neither poem, clap nor toml. The daemon (`meterd`) turns config into a
//! [`model::Catalog`] and HTTP requests into calls on [`account::Accounts`].

pub mod account;
pub mod billing;
#[cfg(feature = "fault-injection")]
pub mod failpoint;
pub mod identifier;
pub mod janitor;
pub mod ledger;
pub mod model;
pub mod outbox;
pub mod plan;
pub mod pricing;
pub mod reconciler;
pub mod signature;
pub mod store;
pub mod stripe;
pub mod supervisor;
pub mod verify;
pub mod webhook;
