//! Account routes: create/update, read, consume, check, credits, ledger.
//!
//! Each route validates its input, then makes exactly one call on [`Accounts`]; it never
//! touches account state itself.

use poem::http::StatusCode;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, OpenApi, Tags};

use meterd_actors::account::{
    Accounts, ConsumeCmd, ConsumeReply, CreditCmd, GrantInput, ReserveCmd, TopUpCmd, UpsertCmd,
};
use meterd_actors::ledger::{ConsumeRecord, CreditCategory};
use meterd_actors::model::{DenyCode, Outcome};
use meterd_actors::model::{IdempotencyKey, Metadata, SpendCap, SpendCapAction};
use meterd_actors::model::{MeterOverride, OverageOverride, SubscriptionStatus};
use meterd_actors::model::{format_rfc3339, parse_rfc3339};
use meterd_actors::store::StoreReader;

use super::auth::ApiKeyAuth;
use super::body::JsonBody;
use super::error::{ApiError, account_id};
use super::views::*;

#[derive(Tags)]
enum ApiTags {
    /// Accounts, consumption, credits and the ledger.
    Accounts,
}

pub struct AccountsApi {
    pub accounts: Accounts,
    pub store: StoreReader,
}

#[derive(ApiResponse)]
pub enum PutAccountResponse {
    /// The account was created.
    #[oai(status = 201)]
    Created(Json<AccountResult>),
    /// The account was updated (or already had this profile).
    #[oai(status = 200)]
    Ok(Json<AccountResult>),
}

#[derive(ApiResponse)]
pub enum ConsumeResponse {
    /// Allowed and durably recorded.
    #[oai(status = 200)]
    Ok(
        Json<ConsumeResult>,
        /// `true` when this repeats the first answer to an idempotency key.
        #[oai(header = "Idempotent-Replayed")]
        Option<String>,
    ),
}

#[derive(ApiResponse)]
pub enum CreditResponse {
    #[oai(status = 200)]
    Ok(
        Json<CreditResult>,
        #[oai(header = "Idempotent-Replayed")] Option<String>,
    ),
}

#[derive(ApiResponse)]
pub enum LedgerResponse {
    #[oai(status = 200)]
    Json(Json<LedgerPage>),
    /// `format=csv`: a header row, then one row per entry. A cell a spreadsheet would read as a
    /// formula (`=`, `+`, `-`, `@`, tab or CR first; not a plain number such as `-5`) starts
    /// with `'`.
    #[oai(status = 200, content_type = "text/csv; charset=utf-8")]
    Csv(PlainText<String>),
}

#[derive(ApiResponse)]
pub enum ReserveResponse {
    /// The capacity is held.
    #[oai(status = 201)]
    Created(
        Json<ReservationResult>,
        #[oai(header = "Idempotent-Replayed")] Option<String>,
    ),
}

#[derive(ApiResponse)]
pub enum SettleResponse {
    #[oai(status = 200)]
    Ok(
        Json<SettleResult>,
        #[oai(header = "Idempotent-Replayed")] Option<String>,
    ),
}

impl AccountsApi {
    async fn settle(&self, rid: &str, quantity: Option<u64>) -> Result<SettleResponse, ApiError> {
        let (account, seq) = parse_reservation_id(rid).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_reservation",
                format!("no reservation `{rid}`"),
            )
        })?;
        let id = account_id(&account)?;
        let reply = self.accounts.settle(&id, seq, quantity).await?;
        let r = &reply.record;
        Ok(SettleResponse::Ok(
            Json(SettleResult {
                reservation_id: reservation_id(id.as_str(), r.rid),
                status: if r.committed.is_some() {
                    "committed"
                } else {
                    "released"
                }
                .into(),
                quantity: r.committed,
                ledger_seq: reply.seq,
                meter: MeterState {
                    name: r.meter.clone(),
                    used: r.used_after,
                    reserved: Some(r.reserved_after),
                    included: 0,
                    limit: None,
                    remaining: None,
                    billable: r.billable_after,
                },
                credits: CreditsView {
                    balance: r.credits_after,
                    spent: None,
                    debt: None,
                    blocked: None,
                },
                alerts: r.alerts.iter().map(|a| alert_view(a, None)).collect(),
            }),
            replayed_header(reply.replayed),
        ))
    }
}

fn idempotency_key(
    body: Option<String>,
    header: Option<String>,
) -> Result<IdempotencyKey, ApiError> {
    let raw = match (body, header) {
        (Some(b), Some(h)) if b != h => {
            return Err(ApiError::invalid(
                "idempotency_key in the body differs from the Idempotency-Key header",
            ));
        }
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => {
            return Err(ApiError::invalid(
                "an idempotency key is required: `idempotency_key` in the body or the Idempotency-Key header",
            ));
        }
    };
    IdempotencyKey::parse(&raw).map_err(|e| ApiError::invalid(e.to_string()))
}

fn replayed_header(replayed: bool) -> Option<String> {
    replayed.then(|| "true".to_owned())
}

fn consume_cmd(body: ConsumeBody, header: Option<String>) -> Result<ConsumeCmd, ApiError> {
    Ok(ConsumeCmd {
        idempotency_key: idempotency_key(body.idempotency_key, header)?,
        meter: body.meter,
        quantity: body.quantity,
        metadata: body
            .metadata
            .unwrap_or_default()
            .into_iter()
            .collect::<Metadata>(),
    })
}

/// A recorded denial becomes an error response that still carries the decision.
/// The status and message of a recorded denial: the one table for every route.
pub fn denial_status(r: &ConsumeRecord, code: DenyCode) -> (StatusCode, String) {
    match code {
        DenyCode::CapReached => (
            StatusCode::TOO_MANY_REQUESTS,
            format!("`{}` has reached its limit for this period", r.meter),
        ),
        DenyCode::InsufficientCredits => (
            StatusCode::PAYMENT_REQUIRED,
            format!(
                "not enough credits: the balance is {} credits",
                r.credits_after
            ),
        ),
        DenyCode::MeterNotInPlan => (
            StatusCode::FORBIDDEN,
            format!("the account's plan does not include `{}`", r.meter),
        ),
        DenyCode::SubscriptionInactive => (
            StatusCode::PAYMENT_REQUIRED,
            "the account's subscription is not active (canceled, unpaid, incomplete, or past due beyond the grace period)".to_owned(),
        ),
        DenyCode::SpendCapReached => (
            StatusCode::PAYMENT_REQUIRED,
            "this would pass the account's spend cap for the period".to_owned(),
        ),
    }
}

fn denial(reply: &ConsumeReply, code: DenyCode) -> ApiError {
    let r = &reply.record;
    let (status, message) = denial_status(r, code);
    let mut e = ApiError::new(status, code.as_str(), message);
    e.body.ledger_seq = reply.seq;
    e.body.meter = Some(meter_state(r));
    e.body.credits = Some(CreditsView {
        balance: r.credits_after,
        spent: Some(0),
        debt: None,
        blocked: None,
    });
    e.replayed = reply.replayed;
    e
}

#[OpenApi(tag = "ApiTags::Accounts")]
impl AccountsApi {
    /// Create or update an account (admin).
    #[oai(path = "/v1/accounts/:id", method = "put")]
    async fn put_account(
        &self,
        auth: ApiKeyAuth,
        id: Path<String>,
        body: JsonBody<PutAccountBody>,
    ) -> Result<PutAccountResponse, ApiError> {
        auth.require_admin()?;
        let id = account_id(&id)?;
        let b = body.0;
        let status = b
            .status
            .as_deref()
            .map(SubscriptionStatus::parse)
            .transpose()
            .map_err(|e| ApiError::invalid(format!("`status`: {e}")))?;
        let overrides = match b.overrides {
            None => None,
            Some(o) => Some(
                o.into_iter()
                    .map(|(meter, ov)| {
                        let overage = ov
                            .overage
                            .as_deref()
                            .map(|s| OverageOverride::parse(s, ov.credits_per_unit))
                            .transpose()
                            .map_err(|e| ApiError::invalid(format!("`overrides.{meter}`: {e}")))?;
                        if ov.overage.is_none() && ov.credits_per_unit.is_some() {
                            return Err(ApiError::invalid(format!(
                                "`overrides.{meter}`: credits_per_unit needs overage `credits`"
                            )));
                        }
                        Ok((
                            meter,
                            MeterOverride {
                                included: ov.included,
                                overage,
                            },
                        ))
                    })
                    .collect::<Result<_, ApiError>>()?,
            ),
        };
        let cmd = UpsertCmd {
            plan: b.plan,
            seats: b.seats,
            email: b.email,
            stripe_customer_id: b.stripe_customer_id,
            link_customer_if_unset: None,
            metadata: b.metadata.map(|m| m.into_iter().collect()),
            status,
            overrides,
            period: match b.period {
                None => None,
                Some(p) => {
                    let start = parse_rfc3339(&p.start).ok_or_else(|| {
                        ApiError::invalid("`period.start` is not an RFC 3339 UTC time")
                    })?;
                    let end = parse_rfc3339(&p.end).ok_or_else(|| {
                        ApiError::invalid("`period.end` is not an RFC 3339 UTC time")
                    })?;
                    Some(meterd_actors::model::Period {
                        start_ms: start,
                        end_ms: end,
                    })
                }
            },
            spend_cap: b
                .spend_cap
                .map(|c| {
                    SpendCapAction::parse(&c.action)
                        .map(|action| SpendCap {
                            amount: c.amount,
                            action,
                        })
                        .map_err(|e| ApiError::invalid(format!("`spend_cap.action`: {e}")))
                })
                .transpose()?,
        };
        let reply = self.accounts.upsert(&id, cmd).await?;
        let view = Json(account_result(&reply.view));
        Ok(if reply.created {
            tracing::info!(account = %id, plan = %reply.view.profile.plan, "account created");
            PutAccountResponse::Created(view)
        } else {
            PutAccountResponse::Ok(view)
        })
    }

    /// Read an account: plan, period, per-meter usage and limits, credits, features.
    #[oai(path = "/v1/accounts/:id", method = "get")]
    async fn get_account(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
    ) -> Result<Json<AccountResult>, ApiError> {
        let id = account_id(&id)?;
        let view = self.accounts.get(&id).await?;
        Ok(Json(account_result(&view)))
    }

    /// Entitlements: subscription status, and per feature and meter whether the account may
    /// use it and why (`not_in_plan`, `subscription_inactive`, `grace_period`, ...).
    #[oai(path = "/v1/accounts/:id/entitlements", method = "get")]
    async fn entitlements(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
    ) -> Result<Json<EntitlementsView>, ApiError> {
        let id = account_id(&id)?;
        let view = self.accounts.get(&id).await?;
        Ok(Json(entitlements_view(&view)))
    }

    /// One feature's entitlement: `{"allowed":…,"reason":…}`.
    #[oai(path = "/v1/accounts/:id/entitlements/:feature", method = "get")]
    async fn entitlement(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
        feature: Path<String>,
    ) -> Result<Json<EntitlementView>, ApiError> {
        let id = account_id(&id)?;
        let view = self.accounts.get(&id).await?;
        // A meter name answers "can it take one more unit?"; anything else is a feature.
        let e = match view.meter_entitlements.get(feature.as_str()) {
            Some(e) if !view.features.iter().any(|f| f == feature.as_str()) => e.clone(),
            _ => view.feature(&feature),
        };
        Ok(Json(entitlement_view(&e)))
    }

    /// The alerts of the current period, oldest first (usage thresholds, spend cap, low
    /// credits). Each fires once per period per meter and threshold.
    #[oai(path = "/v1/accounts/:id/alerts", method = "get")]
    async fn alerts(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
    ) -> Result<Json<AlertsPage>, ApiError> {
        let id = account_id(&id)?;
        let view = self.accounts.get(&id).await?;
        Ok(Json(AlertsPage {
            period_start: format_rfc3339(view.period.start_ms),
            alerts: view
                .alerts
                .iter()
                .map(|f| alert_view(&f.alert, Some((f.seq, f.at_ms))))
                .collect(),
        }))
    }

    /// Consume units of a meter: atomic, durable before the answer, idempotent by key.
    ///
    /// Denials (429 `cap_reached`, 402 `insufficient_credits`, 403 `meter_not_in_plan`) are
    /// recorded decisions too and replay identically.
    #[oai(path = "/v1/accounts/:id/consume", method = "post")]
    async fn consume(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
        #[oai(name = "Idempotency-Key")] idem: Header<Option<String>>,
        body: JsonBody<ConsumeBody>,
    ) -> Result<ConsumeResponse, ApiError> {
        let id = account_id(&id)?;
        let cmd = consume_cmd(body.0, idem.0)?;
        let reply = self.accounts.consume(&id, cmd).await?;
        match reply.record.outcome {
            Outcome::Allowed => Ok(ConsumeResponse::Ok(
                Json(consume_result(&reply)),
                replayed_header(reply.replayed),
            )),
            Outcome::Denied(code) => Err(denial(&reply, code)),
        }
    }

    /// Dry run of a consume: the same decision, nothing changes. Always 200 for a valid
    /// request; `allowed` and `code` give the answer.
    #[oai(path = "/v1/accounts/:id/check", method = "post")]
    async fn check(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
        #[oai(name = "Idempotency-Key")] idem: Header<Option<String>>,
        body: JsonBody<ConsumeBody>,
    ) -> Result<Json<ConsumeResult>, ApiError> {
        let id = account_id(&id)?;
        let mut b = body.0;
        // A check records nothing, so a key is optional. With one, a key already used
        // answers as a consume with it would (replayed, or a conflict).
        let made_up = b.idempotency_key.is_none() && idem.0.is_none();
        if made_up {
            b.idempotency_key = Some("check".into());
        }
        let mut cmd = consume_cmd(b, idem.0)?;
        if made_up {
            cmd.idempotency_key = meterd_actors::model::IdempotencyKey::dry_run();
        }
        let reply = self.accounts.check(&id, cmd).await?;
        Ok(Json(consume_result(&reply)))
    }

    /// Grant (positive) or adjust (negative, never below zero) credits (admin). Idempotent.
    #[oai(path = "/v1/accounts/:id/credits", method = "post")]
    async fn credits(
        &self,
        auth: ApiKeyAuth,
        id: Path<String>,
        #[oai(name = "Idempotency-Key")] idem: Header<Option<String>>,
        body: JsonBody<CreditBody>,
    ) -> Result<CreditResponse, ApiError> {
        auth.require_admin()?;
        let id = account_id(&id)?;
        let b = body.0;
        let time = |name: &str, v: Option<String>| -> Result<Option<i64>, ApiError> {
            v.map(|s| {
                parse_rfc3339(&s).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "`{name}`: `{s}` is not an RFC 3339 UTC time such as 2026-12-01T00:00:00Z"
                    ))
                })
            })
            .transpose()
        };
        let category = match b.category.as_deref() {
            None => None,
            Some("paid") => Some(CreditCategory::Paid),
            Some("promotional") => Some(CreditCategory::Promotional),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "`category`: `{other}` is not one of: paid, promotional"
                )));
            }
        };
        let cmd = CreditCmd {
            idempotency_key: idempotency_key(b.idempotency_key, idem.0)?,
            amount: b.amount,
            reason: b.reason,
            grant: GrantInput {
                priority: b.priority,
                effective_at_ms: time("effective_at", b.effective_at)?,
                expires_at_ms: time("expires_at", b.expires_at)?,
                category,
                external_id: b.external_id,
            },
        };
        let reply = self.accounts.credit(&id, cmd).await?;
        if !reply.replayed {
            tracing::info!(account = %id, amount = reply.record.amount, seq = reply.seq, "credits changed");
        }
        Ok(CreditResponse::Ok(
            Json(credit_result(&reply)),
            replayed_header(reply.replayed),
        ))
    }

    /// Hold capacity (allowance, credits, cap) for work whose size is known only at the end,
    /// such as streamed LLM output. Idempotent by key; a denial is recorded like a consume's.
    #[oai(path = "/v1/accounts/:id/reservations", method = "post")]
    async fn reserve(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
        #[oai(name = "Idempotency-Key")] idem: Header<Option<String>>,
        body: JsonBody<ReserveBody>,
    ) -> Result<ReserveResponse, ApiError> {
        let id = account_id(&id)?;
        let b = body.0;
        let ttl_s = b.ttl_s.unwrap_or(300);
        if !(1..=86_400).contains(&ttl_s) {
            return Err(ApiError::invalid("`ttl_s` must be from 1 to 86400"));
        }
        let cmd = ReserveCmd {
            idempotency_key: idempotency_key(b.idempotency_key, idem.0)?,
            meter: b.meter,
            quantity: b.quantity,
            ttl_ms: i64::try_from(ttl_s).unwrap_or(86_400) * 1000,
        };
        let reply = self.accounts.reserve(&id, cmd).await?;
        let r = &reply.record;
        let state = MeterState {
            name: r.meter.clone(),
            used: r.used_after,
            reserved: Some(r.reserved_after),
            included: r.included,
            limit: r.limit,
            remaining: r
                .limit
                .map(|l| l.saturating_sub(r.used_after.saturating_add(r.reserved_after))),
            billable: 0,
        };
        let credits = CreditsView {
            balance: r.credits_after,
            spent: None,
            debt: None,
            blocked: None,
        };
        match r.outcome {
            Outcome::Allowed => Ok(ReserveResponse::Created(
                Json(ReservationResult {
                    reservation_id: reservation_id(id.as_str(), reply.seq),
                    account_id: id.to_string(),
                    quantity: r.quantity,
                    expires_at: format_rfc3339(r.expires_at_ms),
                    ledger_seq: reply.seq,
                    meter: state,
                    credits,
                }),
                replayed_header(reply.replayed),
            )),
            Outcome::Denied(code) => {
                let fake = ConsumeReply {
                    seq: Some(reply.seq),
                    record: ConsumeRecord {
                        meter: r.meter.clone(),
                        quantity: r.quantity,
                        idempotency_key: r.idempotency_key.clone(),
                        digest: r.digest,
                        metadata: Vec::new(),
                        outcome: r.outcome,
                        billable: 0,
                        credits_spent: 0,
                        burns: Vec::new(),
                        included: r.included,
                        limit: r.limit,
                        used_after: r.used_after,
                        billable_after: 0,
                        credits_after: r.credits_after,
                        alerts: Vec::new(),
                    },
                    replayed: reply.replayed,
                };
                let mut e = denial(&fake, code);
                e.body.meter = Some(state);
                Err(e)
            }
        }
    }

    /// Commit a reservation with the actual quantity: the hold is released and the actual
    /// quantity consumed in one durable step (above the hold only if capacity allows).
    /// Repeating the same commit answers with the first one.
    #[oai(path = "/v1/reservations/:rid/commit", method = "post")]
    async fn commit_reservation(
        &self,
        _auth: ApiKeyAuth,
        rid: Path<String>,
        body: JsonBody<CommitBody>,
    ) -> Result<SettleResponse, ApiError> {
        self.settle(&rid, Some(body.0.quantity)).await
    }

    /// Release a reservation: everything it held goes back.
    #[oai(path = "/v1/reservations/:rid/release", method = "post")]
    async fn release_reservation(
        &self,
        _auth: ApiKeyAuth,
        rid: Path<String>,
    ) -> Result<SettleResponse, ApiError> {
        self.settle(&rid, None).await
    }

    /// Credit a top-up package (admin), once per `external_id` however often it arrives.
    #[oai(path = "/v1/accounts/:id/topups", method = "post")]
    async fn top_up(
        &self,
        auth: ApiKeyAuth,
        id: Path<String>,
        body: JsonBody<TopUpBody>,
    ) -> Result<CreditResponse, ApiError> {
        auth.require_admin()?;
        let id = account_id(&id)?;
        let b = body.0;
        let external_id = IdempotencyKey::parse(&b.external_id)
            .map_err(|e| ApiError::invalid(format!("`external_id`: {e}")))?;
        let reply = self
            .accounts
            .top_up(
                &id,
                TopUpCmd {
                    package: b.package,
                    external_id,
                },
            )
            .await?;
        if !reply.replayed {
            tracing::info!(account = %id, amount = reply.record.amount, seq = reply.seq, "top-up credited");
        }
        Ok(CreditResponse::Ok(
            Json(credit_result(&reply)),
            replayed_header(reply.replayed),
        ))
    }

    /// The account's credit grants and live balance.
    #[oai(path = "/v1/accounts/:id/credits", method = "get")]
    async fn list_credits(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
    ) -> Result<Json<CreditsPage>, ApiError> {
        let id = account_id(&id)?;
        let view = self.accounts.get(&id).await?;
        let at = view.as_of_ms;
        let mut grants: Vec<(u64, &meterd_actors::ledger::Grant)> =
            view.grants.iter().map(|(k, g)| (*k, g)).collect();
        grants.sort_by_key(|(id, g)| {
            (
                !g.live_at(at),
                g.terms.priority,
                g.terms.expires_at_ms.unwrap_or(i64::MAX),
                *id,
            )
        });
        Ok(Json(CreditsPage {
            balance: view.credits,
            debt: view.credit_debt,
            blocked: view.credits_blocked().map(str::to_owned),
            open_disputes: view.open_disputes.clone(),
            grants: grants
                .into_iter()
                .map(|(gid, g)| GrantView {
                    id: gid,
                    amount: g.amount,
                    remaining: g.remaining,
                    priority: g.terms.priority,
                    effective_at: format_rfc3339(g.terms.effective_at_ms),
                    expires_at: g.terms.expires_at_ms.map(format_rfc3339),
                    category: g.terms.category.as_str().into(),
                    external_id: g.terms.external_id.clone(),
                    package: g.terms.package.clone(),
                    live: g.live_at(at),
                })
                .collect(),
        }))
    }

    /// The account's ledger, oldest first. `format=csv` returns CSV.
    #[oai(path = "/v1/accounts/:id/ledger", method = "get")]
    async fn ledger(
        &self,
        _auth: ApiKeyAuth,
        id: Path<String>,
        /// Return entries after this sequence number (default 0: from the start).
        after_seq: Query<Option<u64>>,
        /// At most this many entries, 1-1000 (default 100).
        limit: Query<Option<u32>>,
        /// `json` (default) or `csv`.
        format: Query<Option<String>>,
    ) -> Result<LedgerResponse, ApiError> {
        let id = account_id(&id)?;
        let limit = limit.0.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("`limit` must be from 1 to 1000"));
        }
        let csv = match format.0.as_deref() {
            None | Some("json") => false,
            Some("csv") => true,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "`format` must be json or csv, not `{other}`"
                )));
            }
        };
        // Existence and durability: the actor answers only after a flush, so every entry up
        // to `durable` is on disk. Later entries are left for the next read.
        let durable = self.accounts.get(&id).await?.last_seq;
        let after = after_seq.0.unwrap_or(0);
        let store = self.store.clone();
        let entries =
            tokio::task::spawn_blocking(move || store.entries_after(&id, after, limit as usize))
                .await
                .map_err(|e| {
                    ApiError::from(meterd_actors::account::AccountError::Unavailable(
                        e.to_string(),
                    ))
                })?
                .map_err(|e| ApiError::from(meterd_actors::account::AccountError::from(e)))?;
        let views: Vec<LedgerEntryView> = entries
            .iter()
            .filter(|e| e.seq <= durable)
            .map(ledger_entry_view)
            .collect();
        if csv {
            return Ok(LedgerResponse::Csv(PlainText(ledger_csv(&views)?)));
        }
        let next_after_seq = (views.len() == limit as usize)
            .then(|| views.last().map(|v| v.seq))
            .flatten();
        Ok(LedgerResponse::Json(Json(LedgerPage {
            entries: views,
            next_after_seq,
        })))
    }
}
