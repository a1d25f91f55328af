//! Per-API-key rate limits (to be written).

use poem::{Endpoint, EndpointExt};

/// Wraps the route tree with the rate limiter.
pub fn wrap<E: Endpoint + 'static>(ep: E) -> impl Endpoint + 'static {
    ep.map_to_response()
}
