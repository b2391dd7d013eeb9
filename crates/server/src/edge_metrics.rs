//! The edge's metric set: requests by protocol, route and status, the gateway's
//! refusals and the audit log's outcomes. Every name is declared here, once.

use std::borrow::Cow;

use lattice_observability::{
    metric_set,
    metrics::{buckets, ExemplarHistogramFamily},
    OutcomeLabels,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

// === Labels ===

/// Edge request labels. Values are borrowed where they are static (protocol, common
/// methods), so recording a request allocates at most its route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `http` or `grpc`.
    pub protocol: Cow<'static, str>,
    /// HTTP method, or the gRPC method name.
    pub method: Cow<'static, str>,
    /// HTTP status, or the gRPC status code number.
    pub status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub protocol: Cow<'static, str>,
    pub route: Cow<'static, str>,
    pub method: Cow<'static, str>,
}

/// Gateway refusal labels: the tenant (a configured one, else `other`) and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub tenant: String,
    pub reason: &'static str,
}

// === Families ===

metric_set! {
    /// The edge's families; registered once per registry through
    /// `Metrics::set::<EdgeMetrics>()`.
    pub struct EdgeMetrics {
        pub http_requests: Family<RequestLabels, Counter> = (
            "http_requests",
            "Requests served, by protocol, method and status code",
            Family::default()
        );
        pub http_request_duration: ExemplarHistogramFamily<RouteLabels> = (
            "http_request_duration_seconds",
            "Request duration at the edge, by protocol, route and method",
            Family::new_with_constructor(buckets::latency_with_exemplars)
        );
        pub gateway_refusals: Family<RefusalLabels, Counter> = (
            "lattice_gateway_refusals",
            "Requests the gateway refused, by tenant (configured ones, else other) and reason (no_credential, expired, invalid_token, unknown_key, no_tenant, tenant_mismatch, scope, rate_fast, rate_steady, concurrency)",
            Family::default()
        );
        audit_records: Family<OutcomeLabels, Counter> = (
            "lattice_audit_records",
            "Audit records by outcome: written, dropped (queue full; the request was not held) or failed (sink error)",
            Family::default()
        );
    }
}

impl EdgeMetrics {
    /// The audit log's outcome counters.
    pub fn audit_counters(&self) -> AuditCounters {
        AuditCounters(self.audit_records.clone())
    }
}

/// What became of audit records: written, dropped (queue full) or failed (sink error).
#[derive(Clone, Debug)]
pub struct AuditCounters(Family<OutcomeLabels, Counter>);

impl AuditCounters {
    pub fn written(&self, n: u64) {
        self.0.get_or_create(&OutcomeLabels { outcome: "written" }).inc_by(n);
    }

    pub fn dropped(&self) {
        self.0.get_or_create(&OutcomeLabels { outcome: "dropped" }).inc();
    }

    pub fn failed(&self, n: u64) {
        self.0.get_or_create(&OutcomeLabels { outcome: "failed" }).inc_by(n);
    }

    pub fn get(&self, outcome: &'static str) -> u64 {
        self.0.get_or_create(&OutcomeLabels { outcome }).get()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use lattice_observability::Metrics;

    use super::*;

    /// No two sets declare the same family, and every family of every set the
    /// server registers is declared in the registry.
    #[test]
    fn every_family_is_declared_once() {
        let m = Metrics::new();
        crate::register_metric_sets(&m);
        let declared = m.declared_series();
        let mut seen = BTreeSet::new();
        let tables = EdgeMetrics::FAMILIES
            .iter()
            .chain(lattice_inference::model_metrics::ModelFamilies::FAMILIES)
            .chain(lattice_agent::agent_metrics::AgentFamilies::FAMILIES);
        for (name, _) in tables {
            assert!(seen.insert(*name), "{name} is declared twice");
            assert!(
                ["", "_total", "_count"]
                    .iter()
                    .any(|s| declared.contains(&format!("{name}{s}"))),
                "{name} is not registered"
            );
        }
    }
}
