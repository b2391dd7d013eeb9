//! Generated wire types. Nothing here is hand-written except this file: the `.proto`
//! sources in `proto/` are the contract, compiled by `build.rs` with protox.

pub mod codec;

/// `inference.GRPCInferenceService`: Open Inference Protocol v2, Triton dialect.
pub mod inference {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("inference");
}

/// `externalscaler.ExternalScaler`: KEDA's external scaler contract.
pub mod externalscaler {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("externalscaler");
}

/// `google.rpc.Status`, the in-band error of agent streams.
pub mod google {
    pub mod rpc {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("google.rpc");
    }
}

/// `lattice.agent.v1`: agent coordination streams, memory, tools and chat.
pub mod lattice {
    pub mod agent {
        pub mod v1 {
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("lattice.agent.v1");
        }
    }
    pub mod bench {
        pub mod v1 {
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("lattice.bench.v1");
        }
    }
}

pub use self::lattice::agent::v1 as agent;

/// `lattice.bench.v1.Echo`: the raw bidi echo the agent benchmark compares against.
pub mod bench {
    #![allow(clippy::all, clippy::pedantic)]
    pub use super::lattice::bench::v1::*;
}

/// Encoded `FileDescriptorSet` of every proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");
