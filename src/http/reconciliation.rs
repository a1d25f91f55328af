//! Admin routes of the reconciler: its report (`GET /v1/admin/reconciliation`) and a run on
//! demand (`POST /v1/admin/reconciliation/run`). The report is read through the read-only
//! `StoreReader`; a run is asked of the reconciler actor.

use poem::http::StatusCode;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};

use meterd_actors::model::{AccountId, UnixMs, format_rfc3339};
use meterd_actors::reconciler::Reconciler;
use meterd_actors::store::{KeyedWindow, ReconRun, ReconStatus, StoreReader};

use super::auth::ApiKeyAuth;
use super::error::ApiError;

#[derive(Tags)]
enum ReconTags {
    /// Operating meterd: reconciliation with Stripe.
    Reconciliation,
}

pub struct ReconciliationApi {
    pub store: StoreReader,
    /// `None`: disabled in the config.
    pub reconciler: Option<Reconciler>,
    pub online: bool,
}

/// One account, meter and window compared with Stripe.
#[derive(Debug, Object)]
pub struct WindowView {
    /// `rw.{start unix s}.{meter}.{account}`: the paging cursor (`starting_after`).
    pub id: String,
    pub account_id: String,
    pub meter: String,
    pub start: String,
    pub end: String,
    /// meterd's billable units with usage in the window.
    pub local: u64,
    /// Stripe's aggregated value at the last comparison.
    #[oai(skip_serializing_if_is_none)]
    pub stripe: Option<u64>,
    /// `stripe - local` at the last comparison.
    #[oai(skip_serializing_if_is_none)]
    pub drift: Option<i64>,
    /// `unchecked`, `ok`, `drift`, `repaired`, `unrepairable`.
    pub status: String,
    /// What was done, or why not.
    pub action: String,
    /// The identifier of this window's repair (one at most).
    #[oai(skip_serializing_if_is_none)]
    pub repair: Option<String>,
    /// The repair's state: `pending`, `sent`, `failed`, `cancelling`, `cancelled`.
    #[oai(skip_serializing_if_is_none)]
    pub repair_state: Option<String>,
    /// The drift was past the alert threshold.
    pub alert: bool,
    #[oai(skip_serializing_if_is_none)]
    pub checked_at: Option<String>,
    pub checks: u32,
}

/// One reconciliation run.
#[derive(Debug, Object)]
pub struct RunView {
    pub id: u64,
    /// `schedule` or `admin`.
    pub trigger: String,
    pub started_at: String,
    /// Windows ending at or before this were compared.
    pub windows_until: String,
    #[oai(skip_serializing_if_is_none)]
    pub finished_at: Option<String>,
    pub accounts: u64,
    pub windows: u64,
    pub ok: u64,
    pub drift: u64,
    pub repaired: u64,
    pub unrepairable: u64,
    /// Stripe reads (event summary pages).
    pub reads: u64,
    pub alerts: u64,
    /// The state pass (daily, and on every admin run): linked accounts checked, and those
    /// whose subscription looked inconsistent or stale and was re-read from Stripe.
    pub state_checked: u64,
    pub state_reread: u64,
}

/// The reconciliation report.
#[derive(Debug, Object)]
pub struct ReconciliationView {
    pub enabled: bool,
    /// False without a Stripe key: nothing is compared.
    pub online: bool,
    /// Accounts waiting for the next run.
    pub accounts_pending: u64,
    /// The newest runs, newest first (at most 10).
    pub runs: Vec<RunView>,
    pub windows: Vec<WindowView>,
    /// There are more windows: pass the last `id` as `starting_after`.
    pub has_more: bool,
}

#[derive(Debug, Object)]
pub struct RunStartedView {
    pub run_id: u64,
    /// False: a run was already under way (this is its id).
    pub started: bool,
}

fn ms_to_rfc(ms: UnixMs) -> String {
    format_rfc3339(ms)
}

fn window_id(w: &KeyedWindow) -> String {
    format!(
        "rw.{}.{}.{}",
        w.start_ms.div_euclid(1000),
        w.meter,
        w.account
    )
}

fn parse_window_id(id: &str) -> Option<(AccountId, String, UnixMs)> {
    let rest = id.strip_prefix("rw.")?;
    let (start, rest) = rest.split_once('.')?;
    let (meter, account) = rest.split_once('.')?;
    let start: i64 = start.parse().ok()?;
    if meter.is_empty() {
        return None;
    }
    Some((
        AccountId::parse(account).ok()?,
        meter.to_owned(),
        start.checked_mul(1000)?,
    ))
}

fn run_view(r: ReconRun) -> RunView {
    RunView {
        id: r.id,
        trigger: r.trigger,
        started_at: ms_to_rfc(r.started_ms),
        windows_until: ms_to_rfc(r.upto_ms),
        finished_at: r.finished_ms.map(ms_to_rfc),
        accounts: r.accounts,
        windows: r.windows,
        ok: r.ok,
        drift: r.drift,
        repaired: r.repaired,
        unrepairable: r.unrepairable,
        reads: r.reads,
        alerts: r.alerts,
        state_checked: r.state_checked,
        state_reread: r.state_reread,
    }
}

#[OpenApi(tag = "ReconTags::Reconciliation")]
impl ReconciliationApi {
    /// The reconciliation report: the newest runs, and the windows compared (filters:
    /// `account_id`, `status`), in account, meter and time order.
    #[oai(path = "/v1/admin/reconciliation", method = "get")]
    async fn report(
        &self,
        auth: ApiKeyAuth,
        /// Only this account's windows.
        account_id: Query<Option<String>>,
        /// `unchecked`, `ok`, `drift`, `repaired` or `unrepairable`.
        status: Query<Option<String>>,
        /// A window `id` of the previous page.
        starting_after: Query<Option<String>>,
        /// At most this many windows, 1-1000 (default 100).
        limit: Query<Option<u32>>,
    ) -> Result<Json<ReconciliationView>, ApiError> {
        auth.require_admin()?;
        let account = account_id
            .0
            .as_deref()
            .map(|a| {
                AccountId::parse(a).map_err(|e| ApiError::invalid(format!("`account_id`: {e}")))
            })
            .transpose()?;
        let status = status
            .0
            .as_deref()
            .map(|s| {
                ReconStatus::parse(s).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "`status` must be unchecked, ok, drift, repaired or unrepairable, not `{s}`"
                    ))
                })
            })
            .transpose()?;
        let after = starting_after
            .0
            .as_deref()
            .map(|s| {
                parse_window_id(s).ok_or_else(|| {
                    ApiError::invalid(format!("`starting_after`: `{s}` is not a window id"))
                })
            })
            .transpose()?;
        let limit = limit.0.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("`limit` must be from 1 to 1000"));
        }
        let store = self.store.clone();
        let (runs, windows, pending, repairs) = tokio::task::spawn_blocking(move || {
            let after = after.as_ref().map(|(a, m, s)| (a, m.as_str(), *s));
            let mut windows =
                store.recon_windows(account.as_ref(), status, after, limit as usize + 1)?;
            let runs = store.recon_runs(10)?;
            let mut repairs = Vec::new();
            windows.truncate(limit as usize + 1);
            for w in &windows {
                repairs.push(match &w.window.repair {
                    Some(id) => store.repair(id)?.map(|r| r.state.as_str().to_owned()),
                    None => None,
                });
            }
            Ok::<_, meterd_actors::store::StoreError>((
                runs,
                windows,
                store.recon_dirty_count(),
                repairs,
            ))
        })
        .await
        .map_err(ApiError::unavailable)?
        .map_err(|e| {
            tracing::error!(error = %e, "reconciliation report: the store could not be read");
            ApiError::unavailable("the store could not be read; see the daemon's log")
        })?;
        let has_more = windows.len() > limit as usize;
        let windows = windows
            .into_iter()
            .zip(repairs)
            .take(limit as usize)
            .map(|(w, repair_state)| WindowView {
                id: window_id(&w),
                account_id: w.account.to_string(),
                meter: w.meter.clone(),
                start: ms_to_rfc(w.start_ms),
                end: ms_to_rfc(w.start_ms + i64::from(w.window.window_s) * 1000),
                local: w.window.local,
                stripe: w.window.stripe,
                drift: w.window.stripe.map(|s| {
                    i64::try_from(i128::from(s) - i128::from(w.window.local)).unwrap_or(i64::MAX)
                }),
                status: w.window.status.as_str().to_owned(),
                action: w.window.action,
                repair: w.window.repair,
                repair_state,
                alert: w.window.alert,
                checked_at: w.window.checked_ms.map(ms_to_rfc),
                checks: w.window.checks,
            })
            .collect();
        Ok(Json(ReconciliationView {
            enabled: self.reconciler.is_some(),
            online: self.online,
            accounts_pending: pending as u64,
            runs: runs.into_iter().map(run_view).collect(),
            windows,
            has_more,
        }))
    }

    /// Start a reconciliation run now (or name the one under way).
    #[oai(path = "/v1/admin/reconciliation/run", method = "post")]
    async fn run(&self, auth: ApiKeyAuth) -> Result<Json<RunStartedView>, ApiError> {
        auth.require_admin()?;
        let Some(r) = &self.reconciler else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "reconciler_disabled",
                "the reconciler is disabled ([reconciler] enabled = false)",
            ));
        };
        if !self.online {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "offline",
                "meterd runs offline (no Stripe key): there is nothing to reconcile with",
            ));
        }
        let (run_id, started) = r.run_now().await.map_err(ApiError::unavailable)?;
        tracing::info!(run_id, started, "reconciliation run requested");
        Ok(Json(RunStartedView { run_id, started }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_ids_round_trip() {
        let w = KeyedWindow {
            account: AccountId::parse("team.4:2").unwrap(),
            meter: "api_calls".into(),
            start_ms: 7_200_000,
            window: meterd_actors::store::ReconWindow::new(3_600),
        };
        let id = window_id(&w);
        assert_eq!(id, "rw.7200.api_calls.team.4:2");
        assert_eq!(
            parse_window_id(&id),
            Some((w.account.clone(), "api_calls".into(), 7_200_000))
        );
        assert_eq!(parse_window_id("rw.x.api.t"), None);
        assert_eq!(parse_window_id("rw.1..t"), None);
    }
}
