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
pub mod reconciliation;
pub mod request_id;
pub mod usage;
pub mod views;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService, Tags};

use std::collections::BTreeMap;

use meterd_actors::account::Accounts;
use meterd_actors::store::StoreReader;
use meterd_actors::supervisor::{Components, Health};

use self::accounts::AccountsApi;
use self::auth::ApiKeys;
use self::body::BodyLimit;

#[derive(Tags)]
enum HealthTags {
    /// Liveness and readiness (no API key needed).
    Health,
}

struct HealthApi {
    store: StoreReader,
    ready: Arc<AtomicBool>,
    components: Components,
    /// A Stripe key is set.
    online: bool,
    webhooks: meterd_actors::webhook::Webhooks,
    /// A webhook signing secret is configured.
    webhooks_configured: bool,
}

#[derive(Object)]
struct ComponentBody {
    /// `ok`, `degraded` (working around a failure, e.g. restarting) or `failed`.
    status: String,
    #[oai(skip_serializing_if_is_none)]
    detail: Option<String>,
    /// Restarts since the daemon started.
    restarts: u64,
}

#[derive(Object)]
struct HealthBody {
    /// `ok` (liveness); `ready`, `degraded` (ready, some component restarting),
    /// `shutting_down`, `storage_failed` or `component_failed` (readiness).
    status: String,
    /// Each component (`storage`, `directory`, `outbox`, `webhooks`, `janitor`), from memory.
    #[oai(skip_serializing_if_is_none)]
    components: Option<BTreeMap<String, ComponentBody>>,
    /// `online`, or `offline` (no Stripe key: billable usage waits in the outbox).
    #[oai(skip_serializing_if_is_none)]
    stripe: Option<String>,
    /// Billable records waiting for Stripe.
    #[oai(skip_serializing_if_is_none)]
    outbox_queued: Option<u64>,
    /// Billable records Stripe refused for good (dead letters).
    #[oai(skip_serializing_if_is_none)]
    outbox_dead: Option<u64>,
    /// `configured`, or `not_configured` (no signing secret: POST /webhooks/stripe answers 503).
    #[oai(skip_serializing_if_is_none)]
    webhooks: Option<String>,
    /// Stripe events logged but not applied yet.
    #[oai(skip_serializing_if_is_none)]
    webhooks_pending: Option<u64>,
}

impl HealthBody {
    fn status(status: &str) -> HealthBody {
        HealthBody {
            status: status.into(),
            components: None,
            stripe: None,
            outbox_queued: None,
            outbox_dead: None,
            webhooks: None,
            webhooks_pending: None,
        }
    }
}

#[derive(ApiResponse)]
enum HealthResponse {
    /// The process answers and its storage works.
    #[oai(status = 200)]
    Ok(Json<HealthBody>),
    /// A flush to disk failed: nothing can be recorded until the daemon restarts.
    #[oai(status = 503)]
    Failed(Json<HealthBody>),
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// The store works, no component has failed, and the daemon is not shutting down.
    #[oai(status = 200)]
    Ready(Json<HealthBody>),
    #[oai(status = 503)]
    NotReady(Json<HealthBody>),
}

#[OpenApi(tag = "HealthTags::Health")]
impl HealthApi {
    /// Liveness: the process answers and its storage has not failed.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> HealthResponse {
        if self.store.has_failed() {
            return HealthResponse::Failed(Json(HealthBody::status("storage_failed")));
        }
        HealthResponse::Ok(Json(HealthBody::status("ok")))
    }

    /// Readiness: able to accept and durably record consumption. Answered from memory
    /// (counters and component states kept as things happen): no actor is asked, no tree
    /// is scanned.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> ReadyResponse {
        let storage_failed = self.store.has_failed();
        if storage_failed {
            self.components.set(
                "storage",
                Health::Failed,
                Some("a flush to disk failed; restart the daemon".into()),
            );
        }
        let components: BTreeMap<String, ComponentBody> = self
            .components
            .snapshot()
            .into_iter()
            .map(|(name, c)| {
                (
                    name.to_owned(),
                    ComponentBody {
                        status: c.health.as_str().into(),
                        detail: c.detail,
                        restarts: c.restarts,
                    },
                )
            })
            .collect();
        let worst = self.components.worst();
        let status = if !self.ready.load(Ordering::Acquire) {
            "shutting_down"
        } else if storage_failed {
            "storage_failed"
        } else if worst == Health::Failed {
            "component_failed"
        } else if worst == Health::Degraded {
            "degraded"
        } else {
            "ready"
        };
        let (queued, dead) = self.store.outbox_gauges();
        let body = HealthBody {
            status: status.into(),
            components: Some(components),
            stripe: Some(if self.online { "online" } else { "offline" }.into()),
            outbox_queued: Some(queued),
            outbox_dead: Some(dead),
            webhooks: Some(
                if self.webhooks_configured {
                    "configured"
                } else {
                    "not_configured"
                }
                .into(),
            ),
            webhooks_pending: Some(self.webhooks.pending() as u64),
        };
        if matches!(status, "ready" | "degraded") {
            ReadyResponse::Ready(Json(body))
        } else {
            ReadyResponse::NotReady(Json(body))
        }
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
    /// A request body must arrive within this.
    pub body_read_timeout: std::time::Duration,
    pub failed_auth: auth::FailedAuthLimit,
    pub ready: Arc<AtomicBool>,
    /// Component health, kept by the supervisor.
    pub components: Components,
    /// A Stripe key is set.
    pub stripe_online: bool,
    /// `None`: offline (no Stripe key).
    pub stripe: Option<meterd_actors::stripe::StripeHttp>,
    pub stripe_config: Arc<crate::config::StripeConfig>,
    pub catalog: Arc<meterd_actors::model::Catalog>,
    pub webhooks: meterd_actors::webhook::Webhooks,
    /// `None`: disabled in the config.
    pub reconciler: Option<meterd_actors::reconciler::Reconciler>,
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
            reconciliation::ReconciliationApi {
                store: deps.store.clone(),
                reconciler: deps.reconciler,
                online: deps.stripe_online,
            },
            HealthApi {
                store: deps.store,
                ready: deps.ready,
                components: deps.components,
                online: deps.stripe_online,
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
    let routes = ratelimit::wrap(routes, deps.rate_limits)
        .data(deps.keys)
        .data(Arc::new(auth::FailedAuth::new(deps.failed_auth)))
        .data(body::BodyReadTimeout(deps.body_read_timeout))
        .data(BodyLimit(deps.max_body_bytes))
        .data(body::BatchBodyLimit(deps.max_batch_body_bytes))
        .catch_all_error(|err| async move { error::render_poem_error(err) });
    request_id::wrap(routes)
}
