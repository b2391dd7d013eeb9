//! Who is calling, for which tenant, allowed to do what: one check for every API
//! (REST, gRPC inference, the repository API, agent streams, Chat and REST tasks),
//! run by the gateway layer ([`crate::gateway`]) on both ports.
//!
//! A caller presents `Authorization: Bearer <JWT>` (HS256, RS256 or ES256, verified
//! against the key file, reloaded on change) or a static API key (`x-api-key: <key>`,
//! or `Authorization: Bearer <key>` for clients that only send bearer tokens, such
//! as agents). The credential names the tenant (`tenant_id` claim), the user
//! (`user_id`, else `sub`) and the scopes (`scope`, space-separated, or `scopes`).
//! The request must also name its tenant in `X-Tenant-ID` (gRPC metadata
//! `x-tenant-id`), and the two must agree.
//!
//! Outcomes: no, bad or expired credential → 401 / UNAUTHENTICATED; no or another
//! tenant, or a missing scope → 403 / PERMISSION_DENIED.

pub mod apikeys;
pub mod jwt;

use std::{path::PathBuf, sync::Arc};

use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::watch::{load_and_watch, WatchError, Watched};

pub const TENANT_ID_HEADER: &str = "x-tenant-id";
pub const API_KEY_HEADER: &str = "x-api-key";
/// Longest tenant name accepted in `X-Tenant-ID`.
pub const MAX_TENANT_LEN: usize = 128;

/// What an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Inference, and reading model metadata, config and readiness.
    Infer,
    /// The repository API: index, load, unload.
    Admin,
    /// Agent streams, Chat, `POST /v1/agents/tasks`.
    Agent,
    /// Statistics and `/metrics` on the REST port.
    Metrics,
}

impl Scope {
    pub const NAMES: &'static str = "infer, repository, agent, metrics";

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "infer" => Some(Scope::Infer),
            "repository" | "admin" => Some(Scope::Admin),
            "agent" => Some(Scope::Agent),
            "metrics" => Some(Scope::Metrics),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Admin => "repository",
            Scope::Agent => "agent",
            Scope::Metrics => "metrics",
        }
    }
}

/// The tenant a credential is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantClaim {
    One(String),
    /// Whichever tenant `X-Tenant-ID` names: only the server's own internal key
    /// (the REST task gateway's hop to the orchestrator, made for a caller the
    /// gateway already authenticated).
    Any,
}

#[derive(Clone, Debug)]
pub struct Principal {
    pub tenant: TenantClaim,
    pub user: String,
    pub scopes: Vec<Scope>,
    /// `jwt`, `api_key` or `internal`.
    pub method: &'static str,
}

/// The caller of one request, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub user: String,
    pub method: &'static str,
}

/// Why authentication could not start: a start-up error, the server does not run.
#[derive(Debug, thiserror::Error)]
pub enum AuthStartError {
    #[error("authentication is on but no key file is given: pass --jwt-keys and/or --api-keys (or --auth off for local use)")]
    NoKeyFile,
    #[error(transparent)]
    KeyFile(#[from] WatchError),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token> or x-api-key: <key>")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("unknown API key")]
    UnknownKey,
    #[error("X-Tenant-ID (gRPC metadata x-tenant-id) is required and must be 1..=128 visible characters")]
    TenantMissing,
    #[error("X-Tenant-ID '{0}' is not the tenant of the credential")]
    TenantMismatch(String),
    #[error("the credential lacks the '{}' scope this operation needs", .0.as_str())]
    ScopeMissing(Scope),
}

impl AuthError {
    /// 403 / PERMISSION_DENIED rather than 401 / UNAUTHENTICATED.
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            AuthError::TenantMissing | AuthError::TenantMismatch(_) | AuthError::ScopeMissing(_)
        )
    }

    /// Label of `lattice_gateway_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_credential",
            AuthError::Expired => "expired",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::UnknownKey => "unknown_key",
            AuthError::TenantMissing => "no_tenant",
            AuthError::TenantMismatch(_) => "tenant_mismatch",
            AuthError::ScopeMissing(_) => "scope",
        }
    }
}

impl From<AuthError> for crate::error::ApiError {
    fn from(e: AuthError) -> Self {
        if e.is_forbidden() {
            crate::error::ApiError::Forbidden(e.to_string())
        } else {
            crate::error::ApiError::Unauthenticated(e.to_string())
        }
    }
}

/// Echoes at most 64 characters of a caller's value in a message.
pub(crate) fn clip(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Where credentials are checked against.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// JWKS (JSON) or PEM public keys; JWTs are refused without it.
    pub jwt_keys: Option<PathBuf>,
    /// Hashed static API keys (TOML); API keys are refused without it.
    pub api_keys: Option<PathBuf>,
    /// When set, a JWT's `aud` must hold it.
    pub audience: Option<String>,
}

/// Verified JWTs kept at most; past it, expired ones are dropped, then all.
const JWT_CACHE_MAX: usize = 16_384;

/// JWTs already verified, by the sha256 of the token, each until its `exp`: a
/// client sends the same token with every request, and an RS256 or ES256
/// signature check costs far more than the rest of the gateway. Valid only for the
/// key set they were verified with; a reload empties it, so a key removed in a
/// rotation stops every token it signed at once.
#[derive(Default)]
struct JwtCache {
    keys: Option<Arc<jwt::KeySet>>,
    verified: std::collections::HashMap<[u8; 32], (Principal, i64)>,
}

pub struct Authenticator {
    jwt_cache: parking_lot::Mutex<JwtCache>,
    jwt: Option<Arc<Watched<jwt::KeySet>>>,
    api_keys: Option<Arc<Watched<apikeys::ApiKeys>>>,
    audience: Option<String>,
    /// The server's own key: random per process, never written anywhere.
    internal_key: String,
    internal: apikeys::ApiKeys,
}

impl Authenticator {
    /// Loads the key files (an error is a start-up error) and re-reads them until
    /// `stop`.
    pub fn start(cfg: &AuthConfig, stop: CancellationToken) -> Result<Authenticator, AuthStartError> {
        if cfg.jwt_keys.is_none() && cfg.api_keys.is_none() {
            return Err(AuthStartError::NoKeyFile);
        }
        let jwt = cfg
            .jwt_keys
            .as_ref()
            .map(|p| load_and_watch(p, jwt::KeySet::parse, stop.clone()))
            .transpose()?;
        let api_keys = cfg
            .api_keys
            .as_ref()
            .map(|p| load_and_watch(p, apikeys::ApiKeys::parse, stop.clone()))
            .transpose()?;
        let internal_key = format!(
            "lattice-internal-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let internal = apikeys::ApiKeys::from_entries([(
            apikeys::sha256(internal_key.as_bytes()),
            Principal {
                tenant: TenantClaim::Any,
                user: "lattice-task-gateway".into(),
                scopes: vec![Scope::Agent],
                method: "internal",
            },
        )]);
        Ok(Authenticator {
            jwt_cache: parking_lot::Mutex::default(),
            jwt,
            api_keys,
            audience: cfg.audience.clone(),
            internal_key,
            internal,
        })
    }

    /// The credential of the server's own hops (REST tasks to the orchestrator).
    pub fn internal_key(&self) -> &str {
        &self.internal_key
    }

    /// Checks the credential and tenant of a request, and that it holds `scope`.
    pub fn check(&self, headers: &HeaderMap, scope: Option<Scope>) -> Result<Identity, AuthError> {
        let principal = self.principal(headers)?;
        let tenant = tenant_header(headers).ok_or(AuthError::TenantMissing)?;
        match &principal.tenant {
            TenantClaim::One(t) if t != tenant => return Err(AuthError::TenantMismatch(clip(tenant))),
            _ => {}
        }
        if let Some(scope) = scope {
            if !principal.scopes.contains(&scope) {
                return Err(AuthError::ScopeMissing(scope));
            }
        }
        Ok(Identity {
            tenant: tenant.to_string(),
            user: principal.user,
            method: principal.method,
        })
    }

    fn principal(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                    .map(str::trim)
                    .ok_or_else(|| AuthError::Invalid("Authorization must be 'Bearer <token>'".into()))
            })
            .transpose()?;
        let api_key = headers
            .get(API_KEY_HEADER)
            .map(|v| v.to_str().map_err(|_| AuthError::UnknownKey))
            .transpose()?;
        match (bearer, api_key) {
            (Some(token), _) if token.bytes().filter(|b| *b == b'.').count() == 2 => self.verify_jwt(token),
            (Some(key), _) | (None, Some(key)) => self.lookup_key(key),
            (None, None) => Err(AuthError::Missing),
        }
    }

    fn verify_jwt(&self, token: &str) -> Result<Principal, AuthError> {
        let keys = self
            .jwt
            .as_ref()
            .ok_or_else(|| AuthError::Invalid("this server accepts API keys only (no --jwt-keys)".into()))?
            .get();
        let hash = apikeys::sha256(token.as_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        {
            let mut cache = self.jwt_cache.lock();
            if !cache.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, &keys)) {
                cache.verified.clear();
                cache.keys = Some(keys.clone());
            }
            if let Some((p, exp)) = cache.verified.get(&hash) {
                if now < *exp {
                    return Ok(p.clone());
                }
            }
        }
        let claims = keys.verify(token, self.audience.as_deref())?;
        let principal = Self::jwt_principal(&claims)?;
        if let Some(exp) = claims.exp {
            let mut cache = self.jwt_cache.lock();
            if cache.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, &keys)) {
                if cache.verified.len() >= JWT_CACHE_MAX {
                    cache.verified.retain(|_, (_, e)| now < *e);
                    if cache.verified.len() >= JWT_CACHE_MAX {
                        cache.verified.clear();
                    }
                }
                cache.verified.insert(hash, (principal.clone(), exp));
            }
        }
        Ok(principal)
    }

    fn jwt_principal(claims: &jwt::Claims) -> Result<Principal, AuthError> {
        let tenant = claims
            .tenant_id
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::Invalid("the token has no tenant_id claim".into()))?;
        Ok(Principal {
            tenant: TenantClaim::One(tenant),
            user: claims
                .user_id
                .clone()
                .or_else(|| claims.sub.clone())
                .unwrap_or_default(),
            scopes: claims.scopes(),
            method: "jwt",
        })
    }

    fn lookup_key(&self, key: &str) -> Result<Principal, AuthError> {
        if let Some(p) = self.internal.lookup(key) {
            return Ok(p.clone());
        }
        let keys = self.api_keys.as_ref().ok_or(AuthError::UnknownKey)?.get();
        keys.lookup(key).cloned().ok_or(AuthError::UnknownKey)
    }
}

/// The tenant a request names: `x-tenant-id`, 1..=128 visible ASCII characters.
pub fn tenant_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(TENANT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty() && t.len() <= MAX_TENANT_LEN && t.bytes().all(|b| b.is_ascii_graphic()))
}
