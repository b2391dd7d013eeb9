//! Flags of the scaling signals `lattice serve` publishes: the predictive policy the
//! KEDA external scaler serves, and the pod-deletion-cost annotation.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::{cmd::Switch, Failure};

/// The predictive scaling policy the KEDA external scaler serves (the one
/// `lattice simulate --policy lattice` runs).
#[derive(Args, Debug, Clone)]
pub struct ScalingArgs {
    /// Where replicas share their per-second arrivals and queue depth, so every
    /// replica's scaler answers for the whole fleet: redis://HOST:PORT. Unset, the
    /// fleet is this replica alone.
    #[arg(long, env = "LATTICE_SCALING_STORE")]
    pub scaling_store: Option<String>,
    /// Key prefix in the scaling store.
    #[arg(long, env = "LATTICE_SCALING_PREFIX", default_value = "lattice")]
    pub scaling_prefix: String,
    /// Requests per second one replica completes; measured (instances over the mean
    /// compute time per item) when unset.
    #[arg(long, env = "LATTICE_SCALING_POD_CAPACITY")]
    pub scaling_pod_capacity: Option<f64>,
    /// Utilisation a replica is sized for.
    #[arg(long, env = "LATTICE_SCALING_TARGET_UTILIZATION", default_value_t = 0.7)]
    pub scaling_target_utilization: f64,
    /// Seconds from a scale-up decision to a replica that serves (start + warm-up):
    /// how far ahead the policy forecasts.
    #[arg(long, env = "LATTICE_SCALING_LEAD_TIME_SECS", default_value_t = 60)]
    pub scaling_lead_time_secs: u64,
    #[arg(long, env = "LATTICE_SCALING_MIN_REPLICAS", default_value_t = 1)]
    pub scaling_min_replicas: u32,
    #[arg(long, env = "LATTICE_SCALING_MAX_REPLICAS", default_value_t = 50)]
    pub scaling_max_replicas: u32,
    /// TOML file with the policy's constants: `[predictive]` (fast_tau_s, slow_tau_s,
    /// max_projected_growth, drain_horizon_s, deep_surplus, deep_window_s,
    /// shallow_window_s) and `[guard]` (low_load, window_s, hold_s). Defaults as
    /// documented in crates/scaling.
    #[arg(long, env = "LATTICE_SCALING_CONFIG")]
    pub scaling_config: Option<PathBuf>,
}

impl ScalingArgs {
    pub fn policy(&self) -> Result<lattice_scaling::PolicyConfig, Failure> {
        let Some(path) = &self.scaling_config else {
            return Ok(lattice_scaling::PolicyConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--scaling-config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Failure::Usage(format!("--scaling-config {}: {e}", path.display())))
    }

    pub fn build(
        &self,
        policy: lattice_scaling::PredictiveConfig,
        replica: String,
    ) -> Result<lattice_server::scaling::ScalingConfig, Failure> {
        if self.scaling_min_replicas > self.scaling_max_replicas {
            return Err(Failure::Usage(
                "--scaling-min-replicas is above --scaling-max-replicas".into(),
            ));
        }
        if !(self.scaling_target_utilization > 0.0 && self.scaling_target_utilization <= 1.0) {
            return Err(Failure::Usage("--scaling-target-utilization must be in (0, 1]".into()));
        }
        Ok(lattice_server::scaling::ScalingConfig {
            policy,
            pod_capacity: self.scaling_pod_capacity.filter(|c| c.is_finite() && *c > 0.0),
            target_utilization: self.scaling_target_utilization,
            lead_time_s: self.scaling_lead_time_secs,
            min_replicas: self.scaling_min_replicas,
            max_replicas: self.scaling_max_replicas,
            store: self.scaling_store.clone(),
            prefix: self.scaling_prefix.clone(),
            replica,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct PodCostArgs {
    /// Keep this pod's controller.kubernetes.io/pod-deletion-cost annotation equal to
    /// the scale-in guard (idle replicas are removed first on scale-in). Needs RBAC
    /// `patch` on pods (deploy/k8s/base/rbac.yaml).
    #[arg(long, env = "LATTICE_POD_DELETION_COST", value_enum, default_value_t = Switch::Off)]
    pub pod_deletion_cost: Switch,
    /// Kubernetes API, reached through a `kubectl proxy` sidecar that holds the
    /// service-account credentials and the cluster CA (deploy/k8s/base/deployment.yaml).
    #[arg(long, env = "LATTICE_KUBE_API", default_value = "http://127.0.0.1:8011")]
    pub kube_api: String,
    /// This pod's name (the Downward API's metadata.name).
    #[arg(long, env = "LATTICE_POD_NAME")]
    pub pod_name: Option<String>,
    /// This pod's namespace (the Downward API's metadata.namespace).
    #[arg(long, env = "LATTICE_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Bearer token file sent with each patch, for an API endpoint that wants one
    /// (the proxy sidecar does not).
    #[arg(long, env = "LATTICE_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// Seconds between checks of the cost (a patch is sent only when it changed).
    #[arg(long, env = "LATTICE_POD_DELETION_COST_INTERVAL_SECS", default_value_t = 15)]
    pub pod_deletion_cost_interval_secs: u64,
}

impl PodCostArgs {
    pub fn build(&self) -> Result<Option<(lattice_server::podcost::PodCostConfig, reqwest::Client)>, Failure> {
        if self.pod_deletion_cost == Switch::Off {
            return Ok(None);
        }
        let (Some(pod), Some(namespace)) = (self.pod_name.clone(), self.pod_namespace.clone()) else {
            return Err(Failure::Usage(
                "--pod-deletion-cost on needs --pod-name and --pod-namespace (the Downward API)".into(),
            ));
        };
        if !self.kube_api.starts_with("http://") {
            return Err(Failure::Usage(
                "--kube-api must be http:// (a kubectl proxy sidecar terminates TLS to the API server)".into(),
            ));
        }
        let token = match &self.kube_token_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| Failure::Usage(format!("--kube-token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
            None => String::new(),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Failure::Usage(format!("kubernetes client: {e}")))?;
        Ok(Some((
            lattice_server::podcost::PodCostConfig {
                api: self.kube_api.clone(),
                namespace,
                pod,
                token,
                interval: Duration::from_secs(self.pod_deletion_cost_interval_secs.max(1)),
            },
            http,
        )))
    }
}
