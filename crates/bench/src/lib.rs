//! The benchmarks the `lattice` binary runs: [`serving`] (`lattice bench`: the raw
//! engine, `lattice serve` over HTTP and gRPC, and the Python peers, in one run) and
//! [`agents`] (`lattice bench-agents`: the agent plane against a bare gRPC echo).
//!
//! The binary parses the flags into each module's `Options` and calls its `run`;
//! latency percentiles everywhere are [`lattice_stats::quantile`].

pub mod agents;
pub mod serving;

/// How a benchmark run failed, which decides the binary's exit code.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad options: nothing was measured.
    #[error("{0}")]
    Usage(String),
    /// The run itself failed (a server did not start, a report was not written).
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

impl From<lattice_agent::store::StoreError> for BenchError {
    fn from(e: lattice_agent::store::StoreError) -> Self {
        BenchError::Runtime(e.into())
    }
}
