//! API keys and their scopes.
//!
//! Keys are held only as SHA-256 digests and compared in constant time (`subtle`). Every route
//! but the health checks, the OpenAPI document and the Stripe webhook (signed instead) needs a
//! key; the scope
//! check happens in the route, so a key of too small a scope gets 403, not 401.

use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Consume, check and reads.
    App,
}

#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<([u8; 32], Scope)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys([redacted; {}])", self.keys.len())
    }
}

impl ApiKeys {
    pub fn add(&mut self, key: &str, scope: Scope) {
        self.keys
            .push((Sha256::digest(key.as_bytes()).into(), scope));
    }

    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Check every key, in constant time per key (`subtle`), so timing reveals nothing.
        let mut found = None;
        for (k, scope) in &self.keys {
            if bool::from(k[..].ct_eq(&digest[..])) && found.is_none() {
                found = Some(*scope);
            }
        }
        found
    }
}

/// `Authorization: Bearer <key>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_key")]
pub struct ApiKeyAuth(pub Scope);

async fn check_key(req: &Request, bearer: Bearer) -> poem::Result<Scope> {
    req.data::<ApiKeys>()
        .and_then(|keys| keys.scope_of(&bearer.token))
        .ok_or_else(|| ApiError::unauthorized().into())
}

impl ApiKeyAuth {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.0 {
            Scope::Admin => Ok(()),
            Scope::App => Err(ApiError::forbidden("admin")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_their_scope_only() {
        let mut keys = ApiKeys::default();
        keys.add("admin-secret-key-0123", Scope::Admin);
        keys.add("app-secret-key-456789", Scope::App);
        assert_eq!(keys.scope_of("admin-secret-key-0123"), Some(Scope::Admin));
        assert_eq!(keys.scope_of("app-secret-key-456789"), Some(Scope::App));
        assert_eq!(keys.scope_of("admin-secret-key-012"), None);
        assert_eq!(keys.scope_of(""), None);
        assert!(!format!("{keys:?}").contains("secret"));
    }
}
