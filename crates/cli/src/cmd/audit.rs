//! `lattice audit`: lists audit records, filtered by tenant, time and status.

use clap::Args;
use lattice_server::audit;

use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Where the records are: the audit directory, or nats://HOST:PORT.
    #[arg(long, env = "LATTICE_AUDIT", default_value = "lattice-state/audit")]
    pub from: String,
    /// JetStream stream, with nats://.
    #[arg(long, env = "LATTICE_AUDIT_STREAM", default_value = "LATTICE_AUDIT")]
    pub stream: String,
    #[arg(long)]
    pub tenant: Option<String>,
    /// From this time on: RFC 3339 (2025-01-31T12:00:00Z), a date, or Unix ms.
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Only records with this HTTP status (gRPC records carry the mapped status).
    #[arg(long)]
    pub status: Option<u16>,
}

pub async fn run(args: AuditArgs) -> Result<(), Failure> {
    let time = |s: &Option<String>, flag: &str| -> Result<Option<u64>, Failure> {
        s.as_deref()
            .map(|v| audit::parse_time(v).ok_or_else(|| Failure::Usage(format!("{flag} '{v}': not a time"))))
            .transpose()
    };
    let (since, until) = (time(&args.since, "--since")?, time(&args.until, "--until")?);
    let records = if args.from.starts_with("nats://") {
        audit::nats::read_all(&args.from, &args.stream)
            .await
            .map_err(|e| Failure::Runtime(e.into()))?
    } else {
        audit::file::read_all(std::path::Path::new(&args.from), args.tenant.as_deref())
            .map_err(|e| Failure::Usage(format!("{}: {e}", args.from)))?
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for r in records {
        let keep = args.tenant.as_ref().is_none_or(|t| *t == r.tenant_id)
            && since.is_none_or(|s| r.ts_ms >= s)
            && until.is_none_or(|u| r.ts_ms < u)
            && args.status.is_none_or(|s| s == r.status);
        if keep {
            let line = serde_json::to_string(&r).map_err(|e| Failure::Runtime(e.into()))?;
            if writeln!(out, "{line}").is_err() {
                // stdout closed (a pipe into head): stop quietly.
                return Ok(());
            }
        }
    }
    Ok(())
}
