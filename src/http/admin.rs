//! Admin routes of the Stripe outbox (its state, its pending and dead items, and retries) and
//! `GET /v1/admin/verify` (`ledger verify` against the live store, read-only).
//!
//! They read the outbox trees through the read-only `StoreReader` and move dead letters back
//! through the outbox actor (`Outbox::revive`); they never touch account state or the ledger.

use poem::http::StatusCode;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};

use meterd_actors::model::{AccountId, format_rfc3339};
use meterd_actors::outbox::Outbox;
use meterd_actors::store::StoreReader;

use super::auth::ApiKeyAuth;
use super::error::ApiError;

#[derive(Tags)]
enum AdminTags {
    /// Operating meterd: the Stripe outbox.
    Admin,
}

pub struct AdminApi {
    pub store: StoreReader,
    pub outbox: Outbox,
}

/// The result of `ledger verify` run against the live store.
#[derive(Debug, Object)]
pub struct VerifyView {
    pub ok: bool,
    pub accounts: u64,
    pub entries: u64,
    /// At most 100; a write in flight may show as a transient problem: verify again before
    /// acting on one.
    pub problems: Vec<String>,
    pub problems_total: u64,
}

/// One billable ledger entry, or a batch of them (aggregation), on its way to Stripe.
#[derive(Debug, Object)]
pub struct OutboxItemView {
    /// `ob_{seq}_{account_id}`: pass to `/v1/admin/outbox/{id}/retry`.
    pub id: String,
    pub account_id: String,
    /// The ledger entry; of a batch, its first entry.
    pub ledger_seq: u64,
    /// A batch: its last ledger entry (the range may hold entries of other meters).
    #[oai(skip_serializing_if_is_none)]
    pub last_ledger_seq: Option<u64>,
    /// A batch: how many ledger entries it merges.
    #[oai(skip_serializing_if_is_none)]
    pub entries: Option<u32>,
    /// The meter event's `identifier` (and idempotency key): `{account}:{seq}`, or
    /// `{account}:{first}-{last}` for a batch.
    pub identifier: String,
    pub meter: String,
    /// Billable units (of a batch: the sum).
    pub value: u64,
    /// When the usage happened (the event's timestamp; of a batch: its window's start).
    pub at: String,
    /// An entry waiting for its aggregation window: when it is merged into its batch.
    #[oai(skip_serializing_if_is_none)]
    pub merged_at: Option<String>,
    pub attempts: u32,
    pub next_attempt_at: String,
    #[oai(skip_serializing_if_is_none)]
    pub last_error: Option<String>,
}

/// The outbox's state and (some of) its items.
#[derive(Debug, Object)]
pub struct OutboxView {
    /// False without a Stripe key: billable usage waits.
    pub online: bool,
    pub breaker_open: bool,
    pub queued: u64,
    pub dead: u64,
    pub sent: u64,
    pub delivered_total: u64,
    /// Answered "already exists": delivered earlier.
    pub already_delivered_total: u64,
    pub failed_attempts_total: u64,
    pub dead_total: u64,
    pub calls_total: u64,
    /// Queued entries waiting for their aggregation window (as of the last full pass).
    pub waiting_window: u64,
    /// Batches formed by aggregation, and the ledger entries merged into them.
    pub batches_total: u64,
    pub batched_entries_total: u64,
    /// Entries recovery queued again after they had joined a batch (dropped, never sent).
    pub requeued_members_dropped: u64,
    /// Old `sent` records and batch marks pruned (kept 40 days).
    pub pruned_total: u64,
    /// Stream mode (`stripe.meter_events = "stream"`): meter event sessions created and
    /// meter event stream requests sent (each carries up to 100 events).
    pub sessions_total: u64,
    pub stream_requests_total: u64,
    pub items: Vec<OutboxItemView>,
}

#[derive(Debug, Object)]
pub struct RevivedView {
    pub revived: u64,
}

fn item_id(account: &AccountId, seq: u64) -> String {
    format!("ob_{seq}_{account}")
}

fn parse_item_id(id: &str) -> Option<(AccountId, u64)> {
    let rest = id.strip_prefix("ob_")?;
    let (seq, account) = rest.split_once('_')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((AccountId::parse(account).ok()?, seq.parse().ok()?))
}

#[OpenApi(tag = "AdminTags::Admin")]
impl AdminApi {
    /// The Stripe outbox: online or offline, breaker, counters, and pending (default) or
    /// dead items.
    #[oai(path = "/v1/admin/outbox", method = "get")]
    async fn outbox(
        &self,
        auth: ApiKeyAuth,
        /// `pending` (default) or `dead`.
        state: Query<Option<String>>,
        /// At most this many items, 1-1000 (default 100).
        limit: Query<Option<u32>>,
    ) -> Result<Json<OutboxView>, ApiError> {
        auth.require_admin()?;
        let dead = match state.0.as_deref() {
            None | Some("pending") => false,
            Some("dead") => true,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "`state` must be pending or dead, not `{other}`"
                )));
            }
        };
        let limit = limit.0.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("`limit` must be from 1 to 1000"));
        }
        let stats = self
            .outbox
            .stats()
            .await
            .ok_or_else(|| ApiError::unavailable("the outbox did not answer"))?;
        let store = self.store.clone();
        let items =
            tokio::task::spawn_blocking(move || store.outbox_items(dead, None, limit as usize))
                .await
                .map_err(ApiError::unavailable)?
                .map_err(ApiError::unavailable)?;
        Ok(Json(OutboxView {
            online: stats.online,
            breaker_open: stats.breaker_open,
            queued: stats.queued as u64,
            dead: stats.dead as u64,
            sent: stats.sent as u64,
            delivered_total: stats.delivered_total,
            already_delivered_total: stats.already_total,
            failed_attempts_total: stats.failed_total,
            dead_total: stats.dead_total,
            calls_total: stats.calls_total,
            sessions_total: stats.sessions_total,
            stream_requests_total: stats.stream_requests_total,
            waiting_window: stats.waiting_window as u64,
            batches_total: stats.batches_total,
            batched_entries_total: stats.batched_entries_total,
            requeued_members_dropped: stats.requeued_members_dropped,
            pruned_total: stats.pruned_total,
            items: items
                .into_iter()
                .map(|(a, seq, r)| OutboxItemView {
                    id: item_id(&a, seq),
                    identifier: meterd_actors::outbox::record_identifier(&a, seq, &r),
                    merged_at: (!dead)
                        .then(|| self.outbox.merged_at(&a, &r))
                        .flatten()
                        .map(format_rfc3339),
                    account_id: a.to_string(),
                    ledger_seq: seq,
                    last_ledger_seq: r.batch.as_ref().map(|b| b.last_seq),
                    entries: r.batch.as_ref().map(|b| b.members),
                    meter: r.item.meter,
                    value: r.item.value,
                    at: format_rfc3339(r.item.at_ms),
                    attempts: r.item.attempts,
                    next_attempt_at: format_rfc3339(r.item.next_at_ms),
                    last_error: r.item.last_error,
                })
                .collect(),
        }))
    }

    /// Send a dead letter again (its attempts start over).
    #[oai(path = "/v1/admin/outbox/:id/retry", method = "post")]
    async fn retry(
        &self,
        auth: ApiKeyAuth,
        id: Path<String>,
    ) -> Result<Json<RevivedView>, ApiError> {
        auth.require_admin()?;
        let not_found = || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no dead letter `{}`", id.0),
            )
        };
        let (account, seq) = parse_item_id(&id).ok_or_else(not_found)?;
        let revived = self
            .outbox
            .revive(&account, seq)
            .await
            .map_err(ApiError::unavailable)?;
        if !revived {
            return Err(not_found());
        }
        Ok(Json(RevivedView { revived: 1 }))
    }

    /// Send every dead letter again (at most 10,000 per call).
    #[oai(path = "/v1/admin/outbox/retry-dead", method = "post")]
    async fn retry_dead(&self, auth: ApiKeyAuth) -> Result<Json<RevivedView>, ApiError> {
        auth.require_admin()?;
        let revived = self
            .outbox
            .revive_all()
            .await
            .map_err(ApiError::unavailable)?;
        tracing::info!(revived, "outbox dead letters revived");
        Ok(Json(RevivedView { revived }))
    }

    /// `meterd ledger verify` against the running daemon, read-only: every account refolded
    /// from its ledger and checked against its snapshot, idempotency records, outbox family
    /// and customer index. Reads every ledger: for operators, not for polling.
    #[oai(path = "/v1/admin/verify", method = "get")]
    async fn verify(&self, auth: ApiKeyAuth) -> Result<Json<VerifyView>, ApiError> {
        auth.require_admin()?;
        let store = self.store.clone();
        let report =
            tokio::task::spawn_blocking(move || meterd_actors::verify::verify_live(&store))
                .await
                .map_err(ApiError::unavailable)?
                .map_err(|e| {
                    tracing::error!(error = %e, "verify failed to read the store");
                    ApiError::unavailable("the store could not be read; see the daemon's log")
                })?;
        if !report.ok() {
            tracing::warn!(problems = report.problems.len(), "verify found problems");
        }
        Ok(Json(VerifyView {
            ok: report.ok(),
            accounts: report.accounts,
            entries: report.entries,
            problems_total: report.problems.len() as u64,
            problems: report.problems.into_iter().take(100).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_round_trip() {
        let a = AccountId::parse("team_42.x").unwrap();
        assert_eq!(parse_item_id(&item_id(&a, 17)), Some((a, 17)));
        assert_eq!(parse_item_id("ob_x_y"), None);
        assert_eq!(parse_item_id("rsv_1_a"), None);
    }
}
