//! KEDA external scaler on the gRPC port (`externalscaler.ExternalScaler`).
//!
//! With `policy: predictive` (the default) the metric is the fleet size the
//! predictive policy chose ([`crate::scaling`], the code `lattice simulate` runs)
//! against a target of 1, so KEDA's AverageValue arithmetic asks for exactly that
//! many replicas ([`lattice_scaling::keda`]). Set the ScaledObject's
//! `advanced.horizontalPodAutoscalerConfig.behavior` scale-down stabilization to 0:
//! the policy applies its own scale-down windows.
//!
//! With `policy: demand` the metric is this replica's demand: inference requests queued or computing, for
//! the model named in the trigger metadata (`model`) or for all models. The target
//! per replica is the metadata's `targetPerReplica`, else the replica's own capacity
//! (instances x largest dynamic batch), so KEDA's AverageValue arithmetic asks for
//! ceil(demand / capacity) replicas. `activationThreshold` (default 0) decides
//! IsActive: strictly greater is active, as in KEDA's own scalers. While the server is
//! not ready (warming up or draining) it reports zero demand and inactive, so a pod
//! that cannot serve never looks idle-but-capable nor busy.

use std::{pin::Pin, time::Duration};

use futures::Stream;
use lattice_proto::externalscaler::{
    external_scaler_server::ExternalScaler, GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse,
    IsActiveResponse, MetricSpec, MetricValue, ScaledObjectRef,
};
use tonic::{Request, Response, Status};

use crate::AppState;

pub const METRIC_NAME: &str = "lattice_inference_demand";

/// How often `StreamIsActive` re-evaluates activity.
const PUSH_INTERVAL: Duration = Duration::from_millis(500);

pub struct Scaler {
    pub state: AppState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Predictive,
    Demand,
}

struct Trigger {
    policy: Policy,
    model: Option<String>,
    target: Option<f64>,
    activation: f64,
}

fn trigger(r: &ScaledObjectRef) -> Result<Trigger, Status> {
    let md = &r.scaler_metadata;
    let num = |k: &str| {
        md.get(k)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| Status::invalid_argument(format!("metadata {k}={v:?} is not a non-negative number")))
            })
            .transpose()
    };
    let target = num("targetPerReplica")?;
    if target == Some(0.0) {
        return Err(Status::invalid_argument("metadata targetPerReplica must be positive"));
    }
    let policy = match md.get("policy").map(String::as_str) {
        None | Some("predictive") => Policy::Predictive,
        Some("demand") => Policy::Demand,
        Some(other) => {
            return Err(Status::invalid_argument(format!(
                "metadata policy={other:?}: expected \"predictive\" or \"demand\""
            )))
        }
    };
    Ok(Trigger {
        policy,
        model: md.get("model").filter(|m| !m.is_empty()).cloned(),
        target,
        activation: num("activationThreshold")?.unwrap_or(0.0),
    })
}

impl Scaler {
    /// (metric, target per replica) for a trigger: the policy's fleet size against
    /// 1, or the replica's demand against its capacity.
    fn metric(&self, t: &Trigger) -> Result<(f64, f64), Status> {
        let (demand, target) = self.measure(t)?;
        Ok(match t.policy {
            Policy::Demand => (demand, target),
            Policy::Predictive => {
                let s = &self.state.scaling;
                // Before the first decision, the fleet as it is.
                let replicas = match s.desired() {
                    0 => s.fleet().max(1),
                    n => n,
                };
                (lattice_scaling::keda::metric_for(replicas, 1.0), 1.0)
            }
        })
    }

    /// (demand, target per replica) for a trigger.
    fn measure(&self, t: &Trigger) -> Result<(f64, f64), Status> {
        if let Some(m) = &t.model {
            if self.state.repo.model(m).is_err() {
                return Err(Status::not_found(format!("model '{m}' is not served here")));
            }
        }
        let (demand, capacity) = self.state.repo.load_signals(t.model.as_deref());
        let demand = if self.state.is_ready() { demand as f64 } else { 0.0 };
        Ok((demand, t.target.unwrap_or(capacity.max(1) as f64)))
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(&self, r: Request<ScaledObjectRef>) -> Result<Response<IsActiveResponse>, Status> {
        let t = trigger(r.get_ref())?;
        let (demand, _) = self.measure(&t)?;
        Ok(Response::new(IsActiveResponse {
            result: demand > t.activation,
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    /// Pushes the activity state at once and again whenever it changes, so KEDA
    /// scales from zero without waiting for its polling interval.
    async fn stream_is_active(&self, r: Request<ScaledObjectRef>) -> Result<Response<ActiveStream>, Status> {
        let t = trigger(r.get_ref())?;
        let scaler = Scaler {
            state: self.state.clone(),
        };
        scaler.measure(&t)?;
        let shutdown = self.state.shutdown.clone();
        let stream = futures::stream::unfold((scaler, t, None::<bool>), |(scaler, t, last)| async move {
            loop {
                let active = match scaler.measure(&t) {
                    Ok((demand, _)) => demand > t.activation,
                    Err(e) => return Some((Err(e), (scaler, t, last))),
                };
                if last != Some(active) {
                    return Some((Ok(IsActiveResponse { result: active }), (scaler, t, Some(active))));
                }
                tokio::time::sleep(PUSH_INTERVAL).await;
            }
        });
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(
            stream,
            shutdown.cancelled_owned(),
        ))))
    }

    async fn get_metric_spec(&self, r: Request<ScaledObjectRef>) -> Result<Response<GetMetricSpecResponse>, Status> {
        let t = trigger(r.get_ref())?;
        let (_, target) = self.metric(&t)?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: METRIC_NAME.into(),
                target_size: target.ceil() as i64,
                target_size_float: target,
            }],
        }))
    }

    async fn get_metrics(&self, r: Request<GetMetricsRequest>) -> Result<Response<GetMetricsResponse>, Status> {
        let r = r.into_inner();
        let t = trigger(&r.scaled_object_ref.unwrap_or_default())?;
        if !r.metric_name.is_empty() && r.metric_name != METRIC_NAME {
            return Err(Status::not_found(format!(
                "no metric '{}'; this scaler serves {METRIC_NAME}",
                r.metric_name
            )));
        }
        let (value, _) = self.metric(&t)?;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: METRIC_NAME.into(),
                metric_value: value.round() as i64,
                metric_value_float: value,
            }],
        }))
    }
}
