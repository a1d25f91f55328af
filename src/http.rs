//! The HTTP API: poem-openapi routes, the OpenAPI document, and one error format.
//!
//! This module owns request parsing, authentication and rendering. It never holds state and
//! never writes to the store: a route changes something only through an actor's handle
//! (`Accounts`, `Outbox`, `Webhooks`), and reads committed data through the read-only
//! `StoreReader` (ledger pages, usage scans, the outbox and webhook logs).

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod batch;
pub mod billing;
pub mod body;
pub mod error;
pub mod ratelimit;
pub mod usage;
pub mod views;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService, Tags};

use meterd_actors::account::Accounts;
use meterd_actors::store::StoreReader;

use self::accounts::AccountsApi;
use self::auth::ApiKeys;
use self::body::BodyLimit;

#[derive(Tags)]
enum HealthTags {
    /// Liveness and readiness (no API key needed).
    Health,
}

struct HealthApi {
    accounts: Accounts,
    store: StoreReader,
    ready: Arc<AtomicBool>,
    outbox: meterd_actors::outbox::Outbox,
    webhooks: meterd_actors::webhook::Webhooks,
    /// A webhook signing secret is configured.
    webhooks_configured: bool,
}

#[derive(Object)]
struct HealthBody {
    status: String,
    /// `online`, or `offline` (no Stripe key: billable usage waits in the outbox).
    #[oai(skip_serializing_if_is_none)]
    stripe: Option<String>,
    /// Billable entries waiting for Stripe.
    #[oai(skip_serializing_if_is_none)]
    outbox_queued: Option<u64>,
    /// `configured`, or `not_configured` (no signing secret: POST /webhooks/stripe answers 503).
    #[oai(skip_serializing_if_is_none)]
    webhooks: Option<String>,
    /// Stripe events logged but not applied yet.
    #[oai(skip_serializing_if_is_none)]
    webhooks_pending: Option<u64>,
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// The store is open, the actors answer, and the daemon is not shutting down.
    #[oai(status = 200)]
    Ready(Json<HealthBody>),
    #[oai(status = 503)]
    NotReady(Json<HealthBody>),
}

#[OpenApi(tag = "HealthTags::Health")]
impl HealthApi {
    /// Liveness: the process answers HTTP.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> Json<HealthBody> {
        Json(HealthBody {
            status: "ok".into(),
            stripe: None,
            outbox_queued: None,
            webhooks: None,
            webhooks_pending: None,
        })
    }

    /// Readiness: able to accept and durably record consumption.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> ReadyResponse {
        let not_ready = |why: &str| {
            ReadyResponse::NotReady(Json(HealthBody {
                status: why.into(),
                stripe: None,
                outbox_queued: None,
                webhooks: None,
                webhooks_pending: None,
            }))
        };
        if !self.ready.load(Ordering::Acquire) {
            return not_ready("shutting_down");
        }
        if self.store.has_failed() {
            return not_ready("storage_failed");
        }
        if self.accounts.stats().await.is_err() {
            return not_ready("actors_unavailable");
        }
        let outbox = self.outbox.stats().await;
        ReadyResponse::Ready(Json(HealthBody {
            status: "ready".into(),
            stripe: outbox.map(|s| if s.online { "online" } else { "offline" }.into()),
            outbox_queued: outbox.map(|s| s.queued as u64),
            webhooks: Some(
                if self.webhooks_configured {
                    "configured"
                } else {
                    "not_configured"
                }
                .into(),
            ),
            webhooks_pending: self.webhooks.stats().await.map(|s| s.pending as u64),
        }))
    }
}

pub struct AppDeps {
    pub outbox: meterd_actors::outbox::Outbox,
    pub accounts: Accounts,
    pub store: StoreReader,
    pub keys: ApiKeys,
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub rate_limits: crate::config::RateLimits,
    pub ready: Arc<AtomicBool>,
    /// `None`: offline (no Stripe key).
    pub stripe: Option<meterd_actors::stripe::StripeHttp>,
    pub stripe_config: Arc<crate::config::StripeConfig>,
    pub catalog: Arc<meterd_actors::model::Catalog>,
    pub webhooks: meterd_actors::webhook::Webhooks,
    pub receiver: Arc<webhooks::Receiver>,
}

/// The whole route tree: the API, `/openapi.json`, `/docs`, and the common error format.
pub fn app(deps: AppDeps) -> impl Endpoint + 'static {
    let api = OpenApiService::new(
        (
            AccountsApi {
                accounts: deps.accounts.clone(),
                store: deps.store.clone(),
            },
            batch::BatchApi {
                accounts: deps.accounts.clone(),
            },
            admin::AdminApi {
                store: deps.store.clone(),
                outbox: deps.outbox.clone(),
            },
            billing::BillingApi::new(
                deps.accounts.clone(),
                deps.stripe,
                deps.stripe_config,
                deps.catalog,
            ),
            webhooks::WebhooksApi {
                store: deps.store.clone(),
                webhooks: deps.webhooks.clone(),
                accounts: deps.accounts.clone(),
            },
            usage::UsageApi {
                accounts: deps.accounts.clone(),
                store: deps.store.clone(),
            },
            HealthApi {
                accounts: deps.accounts,
                store: deps.store,
                ready: deps.ready,
                outbox: deps.outbox.clone(),
                webhooks_configured: !deps.receiver.secrets.is_empty(),
                webhooks: deps.webhooks.clone(),
            },
        ),
        "meterd",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Usage metering and billing daemon. Authenticate with `Authorization: Bearer <key>`. \
         A key over its configured rate limit gets 429 `rate_limited` with a `Retry-After` \
         header (seconds).",
    );
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    let routes = Route::new()
        .at(
            "/webhooks/stripe",
            poem::post(webhooks::receive).data(deps.receiver),
        )
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", api);
    ratelimit::wrap(routes, deps.rate_limits)
        .data(deps.keys)
        .data(BodyLimit(deps.max_body_bytes))
        .data(body::BatchBodyLimit(deps.max_batch_body_bytes))
        .catch_all_error(|err| async move { error::render_poem_error(err) })
}
