//! `POST /v1/consume/batch` (to be written).

use meterd_actors::account::Accounts;
use poem_openapi::OpenApi;

pub struct BatchApi {
    pub accounts: Accounts,
}

#[OpenApi]
impl BatchApi {}
