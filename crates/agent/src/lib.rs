//! The agent plane.
pub mod agent_metrics;
pub mod chat;
pub mod client;
pub mod lanes;
pub mod mcp;
pub mod memory;
pub mod orchestrator;
pub mod records;
pub mod session;
pub mod store;
pub mod tools;
pub mod wire;
pub mod worker;
