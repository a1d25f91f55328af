//! Stripe Checkout and the customer portal for an account (admin scope).
//!
//! Each route gets or creates the account's Stripe customer (stored on the account through
//! `Accounts::upsert`), then asks Stripe for a Checkout Session or a portal session and
//! returns its URL. Offline (no Stripe key) they answer 503 `stripe_offline`; a failed Stripe
//! call is 502 `stripe_error` with Stripe's message. Checkout is limited per account
//! ([`CHECKOUT_PER_MINUTE`]) by an in-memory token bucket (`governor`): a guard against
//! runaway callers, not account state.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use poem::http::StatusCode;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use serde::Deserialize;

use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use meterd_actors::account::{Accounts, UpsertCmd};
use meterd_actors::model::{AccountId, Catalog, PlanKind, TokioClock};
use meterd_actors::store::PendingTopUp;
use meterd_actors::stripe::{
    CheckoutLine, CheckoutMode, CheckoutRequest, StripeCallError, StripeHttp,
};

use super::auth::ApiKeyAuth;
use super::body::JsonBody;
use super::error::{ApiError, account_id};
use super::ratelimit::{KeyedLimiter, retry_after_s};
use crate::config::StripeConfig;

/// Checkout sessions an account may create per minute: a burst of 5, then one every 12 s.
pub const CHECKOUT_PER_MINUTE: NonZeroU32 = NonZeroU32::MIN.saturating_add(4);
/// Accounts whose checkout bucket is kept before the full (idle) ones are dropped.
const CHECKOUT_KEYS_KEPT: usize = 10_000;

#[derive(Tags)]
enum BillingTags {
    /// Stripe Checkout and the customer portal.
    Billing,
}

pub struct BillingApi {
    pub accounts: Accounts,
    /// `None`: offline (no Stripe key).
    pub stripe: Option<StripeHttp>,
    pub config: Arc<StripeConfig>,
    pub catalog: Arc<Catalog>,
    /// The checkout bucket of each account.
    pub checkouts: KeyedLimiter<String>,
}

impl BillingApi {
    pub fn new(
        accounts: Accounts,
        stripe: Option<StripeHttp>,
        config: Arc<StripeConfig>,
        catalog: Arc<Catalog>,
    ) -> BillingApi {
        BillingApi {
            accounts,
            stripe,
            config,
            catalog,
            checkouts: RateLimiter::hashmap_with_clock(
                Quota::per_minute(CHECKOUT_PER_MINUTE),
                TokioClock,
            ),
        }
    }
}

/// `POST /v1/accounts/{id}/checkout`.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// `subscription` (needs `plan`) or `topup` (needs `package`).
    pub kind: String,
    /// A configured plan with a `stripe_price`.
    pub plan: Option<String>,
    /// Seats, for a seat plan (default: the account's seats); at least the plan's `min_seats`.
    pub seats: Option<u32>,
    /// A configured credit package.
    pub package: Option<String>,
}

#[derive(Debug, Object)]
pub struct CheckoutResult {
    /// Send the customer here.
    pub url: String,
    pub session_id: String,
}

#[derive(Debug, Object)]
pub struct PortalResult {
    /// Send the customer here.
    pub url: String,
}

#[derive(ApiResponse)]
pub enum CheckoutResponse {
    /// The Checkout Session was created.
    #[oai(status = 201)]
    Created(Json<CheckoutResult>),
}

#[derive(ApiResponse)]
pub enum PortalResponse {
    /// The portal session was created.
    #[oai(status = 201)]
    Created(Json<PortalResult>),
}

fn stripe_error(e: StripeCallError) -> ApiError {
    let message = match e {
        StripeCallError::Api {
            status, message, ..
        } => format!("Stripe answered {status}: {message}"),
        other => other.to_string(),
    };
    ApiError::new(StatusCode::BAD_GATEWAY, "stripe_error", message)
}

fn not_configured(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "stripe_not_configured",
        format!("Stripe Checkout is not configured: set `{key}` in the config file"),
    )
}

fn random_hex() -> Result<String, ApiError> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("no randomness: {e}"),
        )
    })?;
    Ok(hex::encode(raw))
}

/// A validated checkout request, before the customer is known.
struct PlannedCheckout {
    mode: CheckoutMode,
    lines: Vec<CheckoutLine>,
    metadata: Vec<(String, String)>,
    trial_period_days: Option<u32>,
}

impl BillingApi {
    fn client(&self) -> Result<&StripeHttp, ApiError> {
        self.stripe.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stripe_offline",
                format!(
                    "Stripe is offline: set the Stripe secret key in {} and restart meterd",
                    self.config.secret_key_env
                ),
            )
        })
    }

    /// The account's Stripe customer: the stored one, else a new one (stored on the account).
    async fn customer(&self, client: &StripeHttp, id: &AccountId) -> Result<String, ApiError> {
        let view = self.accounts.get(id).await?;
        if let Some(c) = view.profile.stripe_customer_id {
            return Ok(c);
        }
        let cus = client
            .create_customer(id.as_str(), view.profile.email.as_deref())
            .await
            .map_err(stripe_error)?;
        // Only if still unset: a customer linked meanwhile (a PUT, a webhook) wins, and the
        // one just created stays unused.
        let r = self
            .accounts
            .upsert(
                id,
                UpsertCmd {
                    link_customer_if_unset: Some(cus.clone()),
                    ..Default::default()
                },
            )
            .await?;
        Ok(r.view.profile.stripe_customer_id.unwrap_or(cus))
    }

    /// Counts one checkout for `id`; 429 `rate_limited` beyond [`CHECKOUT_PER_MINUTE`].
    fn admit_checkout(&self, id: &AccountId) -> Result<(), ApiError> {
        if self.checkouts.len() > CHECKOUT_KEYS_KEPT {
            self.checkouts.retain_recent();
        }
        let Err(not_until) = self.checkouts.check_key(&id.as_str().to_owned()) else {
            return Ok(());
        };
        let retry = retry_after_s(not_until.wait_time_from(TokioClock.now()));
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "checkout sessions are limited to {CHECKOUT_PER_MINUTE} per minute per account (a burst of {CHECKOUT_PER_MINUTE}, then one every 12 s); retry after {retry} s"
            ),
        );
        e.retry_after = Some(retry);
        Err(e)
    }

    /// Validates the body against the catalog; returns mode, line items, metadata and trial.
    fn plan_checkout(
        &self,
        b: &CheckoutBody,
        account_seats: u32,
    ) -> Result<PlannedCheckout, ApiError> {
        match b.kind.as_str() {
            "subscription" => {
                if b.package.is_some() {
                    return Err(ApiError::invalid(
                        "`package` belongs to kind `topup`, not `subscription`",
                    ));
                }
                let name = b
                    .plan
                    .as_deref()
                    .ok_or_else(|| ApiError::invalid("kind `subscription` needs `plan`"))?;
                let plan = self
                    .catalog
                    .plans
                    .get(name)
                    .ok_or_else(|| ApiError::invalid(format!("no plan `{name}`")))?;
                let sp = self.config.plans.get(name).cloned().unwrap_or_default();
                let price = sp.stripe_price.ok_or_else(|| {
                    ApiError::invalid(format!(
                        "plan `{name}` cannot be bought through Checkout: `plans.{name}.stripe_price` is not set"
                    ))
                })?;
                let quantity = if plan.kind == PlanKind::Seat {
                    let seats = b.seats.unwrap_or(account_seats);
                    if seats < plan.min_seats {
                        return Err(ApiError::invalid(format!(
                            "plan `{name}` needs at least {} seats, not {seats}",
                            plan.min_seats
                        )));
                    }
                    u64::from(seats)
                } else {
                    if b.seats.is_some() {
                        return Err(ApiError::invalid(format!(
                            "`seats` applies to seat plans only; `{name}` is not one"
                        )));
                    }
                    1
                };
                let mut lines = vec![CheckoutLine::Price {
                    price,
                    quantity: Some(quantity),
                }];
                if let Some(m) = sp.stripe_metered_price {
                    lines.push(CheckoutLine::Price {
                        price: m,
                        quantity: None,
                    });
                }
                let metadata = vec![
                    ("type".to_owned(), "subscription".to_owned()),
                    ("plan".to_owned(), name.to_owned()),
                ];
                Ok(PlannedCheckout {
                    mode: CheckoutMode::Subscription,
                    lines,
                    metadata,
                    trial_period_days: sp.trial_days,
                })
            }
            "topup" => {
                if b.plan.is_some() || b.seats.is_some() {
                    return Err(ApiError::invalid(
                        "`plan` and `seats` belong to kind `subscription`, not `topup`",
                    ));
                }
                let name = b
                    .package
                    .as_deref()
                    .ok_or_else(|| ApiError::invalid("kind `topup` needs `package`"))?;
                let p = self
                    .catalog
                    .credit_packages
                    .iter()
                    .find(|p| p.name == name)
                    .ok_or_else(|| ApiError::invalid(format!("no credit package `{name}`")))?;
                let unit_amount =
                    i64::try_from(p.price)
                        .ok()
                        .filter(|a| *a > 0)
                        .ok_or_else(|| {
                            ApiError::invalid(format!(
                                "credit package `{name}` has no positive price to charge"
                            ))
                        })?;
                let lines = vec![CheckoutLine::Inline {
                    currency: p.currency.clone(),
                    unit_amount,
                    product_name: format!("{} credits", p.credits),
                    quantity: 1,
                }];
                let metadata = vec![
                    ("type".to_owned(), "topup".to_owned()),
                    ("credits".to_owned(), p.credits.to_string()),
                    ("package".to_owned(), name.to_owned()),
                    ("topup_id".to_owned(), random_hex()?),
                ];
                Ok(PlannedCheckout {
                    mode: CheckoutMode::Payment,
                    lines,
                    metadata,
                    trial_period_days: None,
                })
            }
            other => Err(ApiError::invalid(format!(
                "`kind` must be subscription or topup, not `{other}`"
            ))),
        }
    }
}

#[OpenApi(tag = "BillingTags::Billing")]
impl BillingApi {
    /// Creates a Stripe Checkout Session: a plan's subscription (`kind: subscription`) or a
    /// credit top-up (`kind: topup`). Creates the account's Stripe customer if it has none.
    /// 503 `stripe_offline` without a Stripe key, 503 `stripe_not_configured` without the
    /// checkout URLs, 429 `rate_limited` beyond 5 per minute per account (a burst of 5, then
    /// one every 12 s; `Retry-After` says when), 502 `stripe_error` when Stripe refuses.
    #[oai(path = "/v1/accounts/:id/checkout", method = "post")]
    async fn checkout(
        &self,
        auth: ApiKeyAuth,
        id: Path<String>,
        body: JsonBody<CheckoutBody>,
    ) -> Result<CheckoutResponse, ApiError> {
        auth.require_admin()?;
        let id = account_id(&id)?;
        let client = self.client()?;
        let success_url = self
            .config
            .checkout_success_url
            .clone()
            .ok_or_else(|| not_configured("stripe.checkout_success_url"))?;
        let cancel_url = self
            .config
            .checkout_cancel_url
            .clone()
            .ok_or_else(|| not_configured("stripe.checkout_cancel_url"))?;
        let view = self.accounts.get(&id).await?;
        let PlannedCheckout {
            mode,
            lines,
            metadata: extra,
            trial_period_days,
        } = self.plan_checkout(&body.0, view.profile.seats)?;
        self.admit_checkout(&id)?;
        let customer = self.customer(client, &id).await?;
        let mut metadata: BTreeMap<String, String> = extra.into_iter().collect();
        metadata.insert("meterd_account_id".into(), id.as_str().to_owned());
        // A top-up is recorded (durably) before its session exists: its completion is
        // credited only against this record (see `decide_stripe`).
        if let (Some(topup_id), Some(package)) = (metadata.get("topup_id"), metadata.get("package"))
            && let Some(p) = self
                .catalog
                .credit_packages
                .iter()
                .find(|p| &p.name == package)
        {
            self.accounts
                .pending_topup(
                    &id,
                    topup_id.clone(),
                    PendingTopUp {
                        account: id.as_str().to_owned(),
                        package: p.name.clone(),
                        amount: p.price,
                        currency: p.currency.clone(),
                        customer: customer.clone(),
                        created_ms: meterd_actors::model::Clock::System.now_ms(),
                    },
                )
                .await?;
        }
        let created = client
            .create_checkout_session(&CheckoutRequest {
                mode,
                customer,
                client_reference_id: id.as_str().to_owned(),
                success_url,
                cancel_url,
                lines,
                metadata: metadata.into_iter().collect(),
                trial_period_days,
                idempotency_key: format!("meterd-checkout-{}", random_hex()?),
            })
            .await
            .map_err(stripe_error)?;
        Ok(CheckoutResponse::Created(Json(CheckoutResult {
            url: created.url,
            session_id: created.id,
        })))
    }

    /// Creates a Stripe customer-portal session for the account (creating its Stripe
    /// customer if it has none). 503 `stripe_offline` without a Stripe key, 502
    /// `stripe_error` when Stripe refuses.
    #[oai(path = "/v1/accounts/:id/portal", method = "post")]
    async fn portal(&self, auth: ApiKeyAuth, id: Path<String>) -> Result<PortalResponse, ApiError> {
        auth.require_admin()?;
        let id = account_id(&id)?;
        let client = self.client()?;
        let customer = self.customer(client, &id).await?;
        let url = client
            .create_portal_session(&customer, self.config.portal_return_url.as_deref())
            .await
            .map_err(stripe_error)?;
        Ok(PortalResponse::Created(Json(PortalResult { url })))
    }
}
