//! gRPC health per service name and server reflection in both of its dialects, so
//! stock tools (grpc-health-probe, grpcurl old and new, `grpcio-reflection`) see every
//! service the gRPC port serves.
//!
//! Inference (and the overall `""` status) follows readiness: NOT_SERVING while
//! models load and once draining starts. The other services answer from the moment
//! the port serves, and turn NOT_SERVING on drain.

use tonic_health::{server::HealthReporter, ServingStatus};
use tonic_reflection::server::{v1, v1alpha, Builder, Error};

pub const INFERENCE: &str = "inference.GRPCInferenceService";

/// Every service name of the gRPC port other than inference.
pub fn other_services(agents: bool) -> Vec<&'static str> {
    let mut names = vec![
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "externalscaler.ExternalScaler",
    ];
    if agents {
        names.extend([
            "lattice.agent.v1.AgentCoordination",
            "lattice.agent.v1.Chat",
            "lattice.agent.v1.ToolCatalog",
        ]);
    }
    names
}

/// The descriptors of everything served, advertising exactly the services served
/// (the descriptor set also holds protocols this port does not serve).
fn descriptors(agents: bool) -> Builder<'static> {
    let mut b = Builder::configure().with_service_name(INFERENCE);
    for name in other_services(agents) {
        b = b.with_service_name(name);
    }
    // Each dialect registers its own descriptor; adding the other's makes both
    // reflection services resolvable through either one.
    b.register_encoded_file_descriptor_set(lattice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

pub fn reflection_v1(agents: bool) -> Result<v1::ServerReflectionServer<impl v1::ServerReflection>, Error> {
    descriptors(agents).build_v1()
}

pub fn reflection_v1alpha(
    agents: bool,
) -> Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>, Error> {
    descriptors(agents).build_v1alpha()
}

/// The health statuses of the gRPC port.
pub struct Health {
    reporter: HealthReporter,
    others: Vec<&'static str>,
}

impl Health {
    /// Inference not serving yet, every other service serving.
    pub async fn start(reporter: HealthReporter, agents: bool) -> Health {
        let h = Health {
            reporter,
            others: other_services(agents),
        };
        h.set_ready(false).await;
        for name in &h.others {
            h.reporter.set_service_status(*name, ServingStatus::Serving).await;
        }
        h
    }

    /// Inference and the overall status follow readiness.
    pub async fn set_ready(&self, ready: bool) {
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", INFERENCE] {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Draining: every service says NOT_SERVING.
    pub async fn drain(&self) {
        self.set_ready(false).await;
        for name in &self.others {
            self.reporter.set_service_status(*name, ServingStatus::NotServing).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_reflection_dialects_build() {
        assert!(super::reflection_v1(true).is_ok());
        assert!(super::reflection_v1alpha(false).is_ok());
    }
}
