//! `[reconciler]`: when meterd compares its billable usage with Stripe's meter summaries, how
//! fast it reads, and when drift raises an alert.

use std::time::Duration;

use meterd_actors::model::Catalog;

use super::raw::RawReconciler;
use super::{Invalid, invalid};

/// The reconciler (`[reconciler]`).
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub lag: Duration,
    pub reads_per_second: u32,
    pub alert_percent: u32,
    pub money_meters: Vec<String>,
    pub keep_ok: Duration,
    /// The state pass re-reads an account's subscription when it looks inconsistent or
    /// its last Stripe event is older than this (`None`: `state_stale_days = 0`, no pass).
    pub state_stale: Option<Duration>,
}

/// Stripe's read limit in live mode is 100 requests a second (25 in test mode), shared with
/// every other read of the account: meterd never asks for more than this.
pub const MAX_READS_PER_SECOND: u32 = 100;

pub(super) fn build(r: &RawReconciler, catalog: &Catalog) -> Result<ReconcilerConfig, Invalid> {
    if r.interval_s == 0 || r.interval_s > 7 * 86_400 {
        return Err(invalid(
            "reconciler.interval_s",
            "must be between 1 and 604800 (a week)",
        ));
    }
    if r.lag_s > 7 * 86_400 {
        return Err(invalid(
            "reconciler.lag_s",
            "must be at most 604800 (a week): Stripe accepts meter events for 35 days",
        ));
    }
    if r.reads_per_second == 0 || r.reads_per_second > MAX_READS_PER_SECOND {
        return Err(invalid(
            "reconciler.reads_per_second",
            format!(
                "must be between 1 and {MAX_READS_PER_SECOND} (Stripe's read rate limit in live mode)"
            ),
        ));
    }
    if r.alert_percent > 100 {
        return Err(invalid("reconciler.alert_percent", "must be 0 to 100"));
    }
    if r.keep_ok_days == 0 || r.keep_ok_days > 40 {
        return Err(invalid(
            "reconciler.keep_ok_days",
            "must be between 1 and 40",
        ));
    }
    if r.state_stale_days > 366 {
        return Err(invalid(
            "reconciler.state_stale_days",
            "must be 0 (no state pass) to 366",
        ));
    }
    for m in &r.money_meters {
        if !catalog.meters.contains_key(m.as_str()) {
            return Err(invalid(
                "reconciler.money_meters",
                format!("`{m}` is not a meter of [meters]"),
            ));
        }
    }
    Ok(ReconcilerConfig {
        enabled: r.enabled,
        interval: Duration::from_secs(r.interval_s),
        lag: Duration::from_secs(r.lag_s),
        reads_per_second: r.reads_per_second,
        alert_percent: r.alert_percent,
        money_meters: r.money_meters.clone(),
        keep_ok: Duration::from_secs(r.keep_ok_days * 86_400),
        state_stale: (r.state_stale_days > 0)
            .then(|| Duration::from_secs(r.state_stale_days * 86_400)),
    })
}
