//! `POST /v1/consume/batch`: many consumes, on one or many accounts, in one request.
//!
//! Every item is an ordinary consume with its own idempotency key, decided by its account's
//! actor exactly as `POST /v1/accounts/{id}/consume` would decide it. The batch adds no
//! atomicity: each item succeeds, is denied or fails on its own, and the batch answers 200
//! with one result per item whenever the batch itself is well-formed. A client can always
//! retry a whole batch: items decided before come back `replayed`.
//!
//! Items are grouped by account. The items of one account are sent one after another in their
//! original order (so a cap is reached by the earliest items); different accounts are served
//! concurrently, one task per account.

use std::collections::BTreeMap;

use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use serde::Deserialize;

use meterd_actors::account::{AccountError, Accounts, ConsumeCmd, ConsumeReply};
use meterd_actors::ledger::ConsumeRecord;
use meterd_actors::model::{AccountId, IdempotencyKey, Metadata};
use meterd_actors::model::{DenyCode, Outcome};

use super::auth::ApiKeyAuth;
use super::body::LargeJsonBody;
use super::error::ApiError;
use super::views::{CreditsView, MeterState, consume_result};

/// The most items one batch may hold.
pub const MAX_BATCH_ITEMS: usize = 1000;

#[derive(Tags)]
enum BatchTags {
    /// Many consumes in one request.
    Batch,
}

pub struct BatchApi {
    pub accounts: Accounts,
}

/// `POST /v1/consume/batch`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// 1 to 1,000 consumes, answered in this order. The request body size limit
    /// (`server.max_batch_body_bytes`, 256 KiB by default) may allow fewer.
    #[oai(validator(min_items = 1, max_items = 1000))]
    pub items: Vec<BatchItemBody>,
}

/// One consume of a batch.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItemBody {
    /// The account to charge.
    pub account_id: String,
    /// A meter declared in the config, such as `tokens`.
    pub meter: String,
    /// A positive integer, at most 2^53. Out of range: this item is `invalid`.
    pub quantity: u64,
    /// Required for every item: 1-255 visible ASCII characters, scoped to the account. A
    /// retried item with the same key (and the same meter, quantity and metadata) is
    /// `replayed`; the same key with a different request is `invalid` with code
    /// `idempotency_conflict`.
    pub idempotency_key: String,
    /// String values only; at most 20 entries.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// What happened to one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum BatchItemStatus {
    /// Allowed and durably recorded now.
    Allowed,
    /// Denied (`code` says why) and durably recorded now.
    Denied,
    /// The idempotency key was decided before: this is that first decision (see `allowed`).
    Replayed,
    /// The item was refused before any decision: `invalid_request`, `unknown_account` or
    /// `idempotency_conflict`. Nothing was recorded; fix the item before retrying it.
    Invalid,
    /// The account could not answer (`unavailable`: storage failure or timeout). The item
    /// may or may not have been recorded: retry it with the same idempotency key. The
    /// account's later items in the batch are then not sent, and are `error` too.
    Error,
}

/// The result of one item.
#[derive(Debug, Object)]
pub struct BatchItemResult {
    /// Position of the item in the request, from 0.
    pub index: u32,
    /// The item's `account_id`, as sent.
    pub account_id: String,
    pub status: BatchItemStatus,
    /// The decision, for `allowed`, `denied` and `replayed` (the original decision).
    #[oai(skip_serializing_if_is_none)]
    pub allowed: Option<bool>,
    /// The ledger entry that records the decision (`allowed`, `denied`, `replayed`).
    #[oai(skip_serializing_if_is_none)]
    pub ledger_seq: Option<u64>,
    /// A denial code (`cap_reached`, `insufficient_credits`, `meter_not_in_plan`,
    /// `subscription_inactive`) or an error code (`invalid_request`, `unknown_account`,
    /// `idempotency_conflict`, `unavailable`).
    #[oai(skip_serializing_if_is_none)]
    pub code: Option<String>,
    /// For humans, with `code`.
    #[oai(skip_serializing_if_is_none)]
    pub message: Option<String>,
    /// The meter's state at decision time (`allowed`, `denied`, `replayed`).
    #[oai(skip_serializing_if_is_none)]
    pub meter: Option<MeterState>,
    /// The credit balance after the decision and the credits it spent.
    #[oai(skip_serializing_if_is_none)]
    pub credits: Option<CreditsView>,
}

/// How many items ended in each status.
#[derive(Debug, Default, Object)]
pub struct BatchSummary {
    pub allowed: u32,
    pub denied: u32,
    pub replayed: u32,
    pub invalid: u32,
    pub errors: u32,
}

/// The answer to a batch: one result per item, in the items' order.
#[derive(Debug, Object)]
pub struct BatchResult {
    pub items: Vec<BatchItemResult>,
    pub summary: BatchSummary,
}

fn deny_message(r: &ConsumeRecord, code: DenyCode) -> String {
    super::accounts::denial_status(r, code).1
}

/// A recorded decision (new or replayed).
fn decided(index: u32, account_id: String, reply: &ConsumeReply) -> BatchItemResult {
    let view = consume_result(reply);
    let status = match (reply.replayed, view.allowed) {
        (true, _) => BatchItemStatus::Replayed,
        (false, true) => BatchItemStatus::Allowed,
        (false, false) => BatchItemStatus::Denied,
    };
    let message = match reply.record.outcome {
        Outcome::Allowed => None,
        Outcome::Denied(code) => Some(deny_message(&reply.record, code)),
    };
    BatchItemResult {
        index,
        account_id,
        status,
        allowed: Some(view.allowed),
        ledger_seq: view.ledger_seq,
        code: view.code,
        message,
        meter: Some(view.meter),
        credits: Some(view.credits),
    }
}

/// An item refused before a decision, or one whose account did not answer. The code comes
/// from the API's one error table; a server-side failure is `error`, anything else `invalid`.
fn failed(index: u32, account_id: String, err: ApiError) -> BatchItemResult {
    let status = if err.status.is_server_error() {
        BatchItemStatus::Error
    } else {
        BatchItemStatus::Invalid
    };
    BatchItemResult {
        index,
        account_id,
        status,
        allowed: None,
        ledger_seq: None,
        code: Some(err.body.code),
        message: Some(err.body.message),
        meter: None,
        credits: None,
    }
}

/// One item that passed the checks the HTTP layer can make alone.
struct Pending {
    index: u32,
    raw_account_id: String,
    cmd: ConsumeCmd,
}

fn item_cmd(item: BatchItemBody) -> Result<ConsumeCmd, ApiError> {
    let idempotency_key = IdempotencyKey::parse(&item.idempotency_key)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(ConsumeCmd {
        idempotency_key,
        meter: item.meter,
        quantity: item.quantity,
        metadata: item
            .metadata
            .unwrap_or_default()
            .into_iter()
            .collect::<Metadata>(),
    })
}

/// Sends one account's items in order, each after the previous one was answered. After an
/// `error` (the account did not answer), the account's later items are not sent: they would
/// be decided out of order with a retry of the failed one, and would likely time out too.
async fn run_group(
    accounts: Accounts,
    id: AccountId,
    items: Vec<Pending>,
) -> Vec<(u32, BatchItemResult)> {
    let mut out = Vec::with_capacity(items.len());
    let mut failed_at: Option<u32> = None;
    for p in items {
        let result = match failed_at {
            Some(first) => failed(
                p.index,
                p.raw_account_id,
                ApiError::from(AccountError::Unavailable(format!(
                    "not sent: item {first} of this account failed first; retry with the same idempotency key"
                ))),
            ),
            None => match accounts.consume(&id, p.cmd).await {
                Ok(reply) => decided(p.index, p.raw_account_id, &reply),
                Err(e) => failed(p.index, p.raw_account_id, ApiError::from(e)),
            },
        };
        if failed_at.is_none() && result.status == BatchItemStatus::Error {
            failed_at = Some(p.index);
        }
        out.push((p.index, result));
    }
    out
}

/// For an item whose fate is unknown (its task failed): as on a timeout, retry it.
fn unknown_fate(index: u32, account_id: String) -> BatchItemResult {
    failed(
        index,
        account_id,
        ApiError::from(AccountError::Unavailable(
            "the item was not answered; retry it with the same idempotency key".into(),
        )),
    )
}

fn summarize(items: &[BatchItemResult]) -> BatchSummary {
    let mut s = BatchSummary::default();
    for i in items {
        let n = match i.status {
            BatchItemStatus::Allowed => &mut s.allowed,
            BatchItemStatus::Denied => &mut s.denied,
            BatchItemStatus::Replayed => &mut s.replayed,
            BatchItemStatus::Invalid => &mut s.invalid,
            BatchItemStatus::Error => &mut s.errors,
        };
        *n += 1;
    }
    s
}

#[OpenApi(tag = "BatchTags::Batch")]
impl BatchApi {
    /// Consume on many accounts in one request (app or admin key).
    ///
    /// Each item is an independent, idempotent consume with its own `idempotency_key`,
    /// decided as `POST /v1/accounts/{id}/consume` would decide it; there is no all-or-nothing.
    /// The answer is 200 with one result per item, in order, whenever the batch is
    /// well-formed (1 to 1,000 items, within the body size limit): `allowed`, `denied`,
    /// `replayed` (decided by an earlier request: the original decision), `invalid` (refused,
    /// nothing recorded) or `error` (`unavailable`: retry). Retrying a whole batch is always
    /// safe. Items of one account are decided in their order; accounts run concurrently.
    #[oai(path = "/v1/consume/batch", method = "post")]
    async fn consume_batch(
        &self,
        req: &poem::Request,
        _auth: ApiKeyAuth,
        body: LargeJsonBody<BatchBody>,
    ) -> Result<Json<BatchResult>, ApiError> {
        let items = body.0.items;
        if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
            return Err(ApiError::invalid(format!(
                "`items` must hold 1 to {MAX_BATCH_ITEMS} items, not {}",
                items.len()
            )));
        }
        // A batch of n items costs n requests of the key's rate limit (the first was charged
        // on the way in). Refused as a whole, before any item is decided.
        let extra = u64::try_from(items.len()).unwrap_or(u64::MAX) - 1;
        super::ratelimit::charge_extra(req, extra)?;
        let raw_ids: Vec<String> = items.iter().map(|i| i.account_id.clone()).collect();
        let mut results: Vec<Option<BatchItemResult>> = Vec::with_capacity(items.len());
        results.resize_with(items.len(), || None);
        let mut put = |index: u32, result: BatchItemResult| {
            if let Some(slot) = results.get_mut(index as usize) {
                *slot = Some(result);
            }
        };
        // Group by account, keeping each account's items in request order.
        let mut groups: BTreeMap<AccountId, Vec<Pending>> = BTreeMap::new();
        for (index, item) in (0u32..).zip(items) {
            let raw_account_id = item.account_id.clone();
            let checked = AccountId::parse(&item.account_id)
                .map_err(|e| ApiError::invalid(e.to_string()))
                .and_then(|id| Ok((id, item_cmd(item)?)));
            match checked {
                Ok((id, cmd)) => groups.entry(id).or_default().push(Pending {
                    index,
                    raw_account_id,
                    cmd,
                }),
                Err(e) => put(index, failed(index, raw_account_id, e)),
            }
        }
        // One task per account. Dropping the request aborts the tasks; items already sent
        // are decided all the same and replay on a retry.
        let mut tasks = tokio::task::JoinSet::new();
        for (id, group) in groups {
            tasks.spawn(run_group(self.accounts.clone(), id, group));
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(group) => {
                    for (index, result) in group {
                        put(index, result);
                    }
                }
                // A panicking task is a bug; its items stay unanswered and are reported
                // below as `error`, like a timeout.
                Err(e) => tracing::error!(error = %e, "batch consume task failed"),
            }
        }
        let items: Vec<BatchItemResult> = results
            .into_iter()
            .zip(0u32..)
            .zip(raw_ids)
            .map(|((r, index), raw_id)| r.unwrap_or_else(|| unknown_fate(index, raw_id)))
            .collect();
        let summary = summarize(&items);
        Ok(Json(BatchResult { items, summary }))
    }
}
