//! `lattice agent`: a worker agent holding a stream to an orchestrator.

use std::path::PathBuf;

use clap::Args;
use lattice_observability::telemetry::{self, TelemetryConfig};

use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Orchestrator gRPC URL(s), tried in turn on reconnect (comma-separated).
    #[arg(
        long,
        env = "LATTICE_ORCHESTRATOR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8001"
    )]
    pub orchestrator: Vec<String>,
    /// Capabilities this worker serves (tasks are routed by capability).
    #[arg(long, env = "LATTICE_CAPABILITY", value_delimiter = ',', required = true)]
    pub capability: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "LATTICE_MAX_IN_FLIGHT", default_value_t = 16)]
    pub max_in_flight: u32,
    /// Name in logs and frames; defaults to agent-<pid>.
    #[arg(long, env = "LATTICE_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Tenant the agent acts for.
    #[arg(long, env = "LATTICE_TENANT", default_value = "default")]
    pub tenant: String,
    /// Credential the server requires: a JWT or API key with the agent scope (or
    /// the legacy --agent-token).
    #[arg(long, env = "LATTICE_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Log filter, in tracing's EnvFilter syntax. Text logs carry events only, so
    /// directives scoped to a span (`[grpc.request]=debug`) take effect with
    /// `--log-format json`.
    #[arg(long, env = "LATTICE_LOG", default_value = "info")]
    pub log: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

pub async fn run(args: AgentArgs) -> Result<(), Failure> {
    let _telemetry = telemetry::init(&TelemetryConfig {
        filter: args.log.clone(),
        json_logs: false,
        otlp_endpoint: None,
        service_name: "lattice-agent".into(),
        sample_ratio: 1.0,
        route_sample_ratios: Vec::new(),
    })
    .map_err(|e| Failure::Usage(e.to_string()))?;
    if args.max_in_flight == 0 {
        return Err(Failure::Usage("--max-in-flight must be at least 1".into()));
    }
    let client = lattice_agent::client::ClientConfig {
        endpoints: args.orchestrator.clone(),
        tls: args.tls.build(&args.orchestrator)?,
        agent_id: args
            .agent_id
            .clone()
            .unwrap_or_else(|| format!("agent-{}", std::process::id())),
        tenant: args.tenant.clone(),
        capabilities: args.capability.clone(),
        max_in_flight: args.max_in_flight,
        auth_token: args.token.clone(),
        // The gateway checks the tenant a stream names against its credential.
        metadata: vec![("x-tenant-id".into(), args.tenant.clone())],
        ..lattice_agent::client::ClientConfig::default()
    };
    println!(
        "lattice agent capabilities={} orchestrator={}",
        args.capability.join(","),
        args.orchestrator.join(",")
    );
    lattice_agent::worker::run(
        lattice_agent::worker::WorkerConfig { client },
        lattice_server::shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// How an agent reaches a TLS orchestrator port (`https://` URLs).
#[derive(Args, Debug, Clone)]
pub struct ClientTlsArgs {
    /// PEM CA certificates the orchestrator's certificate must chain to; needed for
    /// https:// orchestrator URLs.
    #[arg(long, env = "LATTICE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain, for a port with mutual TLS.
    #[arg(
        long = "tls-client-cert",
        env = "LATTICE_TLS_CLIENT_CERT",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(
        long = "tls-client-key",
        env = "LATTICE_TLS_CLIENT_KEY",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
    /// Name the orchestrator's certificate must carry, when it is not the URL's host.
    #[arg(long, env = "LATTICE_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ClientTlsArgs {
    pub fn build(&self, endpoints: &[String]) -> Result<Option<lattice_agent::client::ClientTls>, Failure> {
        let https = endpoints.iter().any(|e| e.starts_with("https://"));
        let Some(ca) = &self.tls_ca else {
            if https {
                return Err(Failure::Usage("an https:// orchestrator needs --tls-ca".into()));
            }
            return Ok(None);
        };
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| Failure::Usage(format!("{}: {e}", p.display())));
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(lattice_agent::client::ClientTls {
            ca_pem: read(ca)?,
            identity,
            domain: self.tls_domain.clone(),
        }))
    }
}
