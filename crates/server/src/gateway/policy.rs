//! The gateway's live policy file (TOML), re-read on change: per-tenant limits and
//! canary rules.
//!
//! ```toml
//! [default_limits]                       # every tenant without its own entry
//! fast = { burst = 100, per_second = 50 }
//! steady = { burst = 200, per_second = 20 }
//! max_concurrent = 64
//!
//! [tenants.acme]                         # fields left out take the design defaults
//! fast = { burst = 500, per_second = 200 }
//!
//! [canary.magika]
//! split = { "1" = 85, "2" = 15 }
//! tags = { beta = ["2"], stable = ["1"] }
//! ```

use std::collections::HashMap;

use serde::Deserialize;

use crate::{
    canary::{CanaryError, CanaryRule},
    limit::{LimitError, TenantLimits},
};

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub default_limits: TenantLimits,
    #[serde(default)]
    pub tenants: HashMap<String, TenantLimits>,
    #[serde(default)]
    pub canary: HashMap<String, CanaryRule>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// `scope` is `default_limits` or `tenants.<name>`.
    #[error("{scope}: {source}")]
    Limits { scope: String, source: LimitError },
    #[error(transparent)]
    Canary(#[from] CanaryError),
}

impl Policy {
    pub fn parse(bytes: &[u8]) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(&String::from_utf8_lossy(bytes))?;
        let limits = |scope: String| move |source| PolicyError::Limits { scope, source };
        p.default_limits.validate().map_err(limits("default_limits".into()))?;
        for (t, l) in &p.tenants {
            l.validate().map_err(limits(format!("tenants.{t}")))?;
        }
        for (m, r) in &p.canary {
            r.validate(m)?;
        }
        Ok(p)
    }

    pub fn limits(&self, tenant: &str) -> &TenantLimits {
        self.tenants.get(tenant).unwrap_or(&self.default_limits)
    }

    /// The tenant as a metric label: configured tenants by name, others as `other`,
    /// so callers cannot grow the label set.
    pub fn tenant_label(&self, tenant: &str) -> String {
        if self.tenants.contains_key(tenant) {
            tenant.to_string()
        } else {
            "other".to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_defaults_fill_gaps() {
        let p = Policy::parse(
            br#"
[tenants.acme]
fast = { burst = 500, per_second = 200 }
[canary.magika]
split = { "1" = 85, "2" = 15 }
tags = { beta = ["2"] }
"#,
        )
        .unwrap();
        assert_eq!(p.limits("acme").fast.burst, 500);
        assert_eq!(p.limits("acme").steady.burst, 200);
        assert_eq!(p.limits("globex"), &TenantLimits::default());
        assert_eq!(p.tenant_label("globex"), "other");
        assert!(Policy::parse(b"[tenants.x]\nmax_concurrent = 0\n").is_err());
        assert!(Policy::parse(b"[canary.m]\nsplit = {}\n").is_err());
    }
}
