"""Generated from crates/proto/proto/lattice/agent/v1/agent.proto by
`python -m lattice_agents._generate`; do not edit."""
