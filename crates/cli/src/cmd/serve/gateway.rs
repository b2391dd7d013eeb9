//! Flags of the gateway (authentication, tenant limits, canary policy, audit log).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::Args;
use lattice_server::{
    audit::{self, AuditConfig, SinkConfig},
    auth::AuthConfig,
    gateway::GatewayConfig,
};

use crate::{cmd::Switch, Failure};

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Authentication of every API (JWT or API key, plus X-Tenant-ID). On by
    /// default, and then --jwt-keys or --api-keys is required; "off" is for local
    /// use only (the startup line says so).
    #[arg(long, env = "LATTICE_AUTH", value_enum, default_value_t = Switch::On)]
    pub auth: Switch,
    /// JWT verification keys: a JWKS file (JSON; oct/HS256, RSA/RS256, EC P-256/ES256)
    /// or PEM public keys. Re-read when it changes; list old and new keys during a
    /// rotation.
    #[arg(long, env = "LATTICE_JWT_KEYS")]
    pub jwt_keys: Option<PathBuf>,
    /// Static API keys, hashed (TOML `[[key]] sha256, tenant, user, scopes`).
    /// Re-read when it changes.
    #[arg(long, env = "LATTICE_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// When set, a JWT's `aud` claim must hold this value.
    #[arg(long, env = "LATTICE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Per-tenant limits and canary rules (TOML), re-read when it changes.
    #[arg(long, env = "LATTICE_GATEWAY_POLICY")]
    pub gateway_policy: Option<PathBuf>,
    /// Per-tenant token buckets (fast: burst 100, 50/s; steady: burst 200, 20/s) and
    /// concurrency cap (64), overridable in --gateway-policy.
    #[arg(long, env = "LATTICE_RATE_LIMITS", value_enum, default_value_t = Switch::On)]
    pub rate_limits: Switch,
    /// Audit log sink: a directory (JSONL per tenant and day), nats://HOST:PORT
    /// (JetStream), or "off".
    #[arg(long, env = "LATTICE_AUDIT", default_value = "lattice-state/audit")]
    pub audit: String,
    /// JetStream stream of the audit log.
    #[arg(long, env = "LATTICE_AUDIT_STREAM", default_value = "LATTICE_AUDIT")]
    pub audit_stream: String,
    /// Days audit records are kept.
    #[arg(long, env = "LATTICE_AUDIT_RETENTION_DAYS", default_value_t = 180)]
    pub audit_retention_days: u64,
    /// Milliseconds between fsyncs of the audit files (what a power loss can lose;
    /// a kill -9 loses only records not yet written).
    #[arg(long, env = "LATTICE_AUDIT_FSYNC_MS", default_value_t = 1000)]
    pub audit_fsync_ms: u64,
    /// Audit records waiting for the sink; past it, records are dropped and counted
    /// (requests never wait for the audit log).
    #[arg(long, env = "LATTICE_AUDIT_QUEUE", default_value_t = audit::DEFAULT_QUEUE)]
    pub audit_queue: usize,
    /// Address of the metrics port, when it differs from --host (e.g. a private
    /// interface).
    #[arg(long, env = "LATTICE_METRICS_HOST")]
    pub metrics_host: Option<IpAddr>,
}

impl GatewayArgs {
    pub fn build(&self) -> Result<GatewayConfig, Failure> {
        let auth = match self.auth {
            Switch::Off => None,
            Switch::On => {
                if self.jwt_keys.is_none() && self.api_keys.is_none() {
                    return Err(Failure::Usage(
                        "authentication is on by default: pass --jwt-keys and/or --api-keys, or --auth off for local use".into(),
                    ));
                }
                Some(AuthConfig {
                    jwt_keys: self.jwt_keys.clone(),
                    api_keys: self.api_keys.clone(),
                    audience: self.jwt_audience.clone(),
                })
            }
        };
        if self.audit_retention_days == 0 {
            return Err(Failure::Usage("--audit-retention-days must be at least 1".into()));
        }
        let retention = Duration::from_secs(self.audit_retention_days.saturating_mul(86_400));
        let audit = match self.audit.as_str() {
            "off" => None,
            url if url.starts_with("nats://") => Some(AuditConfig {
                sink: SinkConfig::Nats {
                    url: url.to_string(),
                    stream: self.audit_stream.clone(),
                },
                retention,
                queue: self.audit_queue,
            }),
            dir => Some(AuditConfig {
                sink: SinkConfig::File {
                    dir: PathBuf::from(dir),
                    fsync_every: Duration::from_millis(self.audit_fsync_ms.max(1)),
                },
                retention,
                queue: self.audit_queue,
            }),
        };
        Ok(GatewayConfig {
            auth,
            policy: self.gateway_policy.clone(),
            limits: self.rate_limits == Switch::On,
            audit,
        })
    }
}
