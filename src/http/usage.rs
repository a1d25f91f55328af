//! `GET /v1/accounts/{id}/usage` (to be written).

use meterd_actors::account::Accounts;
use meterd_actors::store::Store;
use poem_openapi::OpenApi;

pub struct UsageApi {
    pub accounts: Accounts,
    pub store: Store,
}

#[OpenApi]
impl UsageApi {}
