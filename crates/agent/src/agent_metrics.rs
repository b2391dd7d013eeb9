//! The agent plane's metric set: every `lattice_agent_*`, `lattice_memory_*` and
//! `lattice_tool_*` series is declared here, once, and the orchestrator's session and
//! queue gauges are read by this set's own scrape-time collector.

use std::sync::Arc;

use lattice_observability::{
    encode::gauge_family,
    metric_set,
    metrics::{buckets, HistogramFamily, Registrar},
    MetricSet, OutcomeLabels,
};
use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

// === Labels ===

/// Agent-plane frame counter labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabels {
    /// `in` (agent to orchestrator) or `out`.
    pub direction: &'static str,
    /// The frame's body: offer, assign, result, heartbeat, ...
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabels {
    pub tool: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolNameLabels {
    pub tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemoryLabels {
    /// get, put or sync.
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabel {
    priority: u8,
}

// === Families ===

metric_set! {
    /// Every registered agent-plane family.
    pub struct AgentFamilies {
        pub agent_frames: Family<FrameLabels, Counter> = (
            "lattice_agent_frames",
            "Agent-stream frames, by direction and body",
            Family::default()
        );
        pub agent_tasks: Family<OutcomeLabels, Counter> = (
            "lattice_agent_tasks",
            "Tasks finished, by outcome",
            Family::default()
        );
        pub agent_dispatch: Histogram = (
            "lattice_agent_dispatch_seconds",
            "Time from a task's offer to its assignment to a worker",
            buckets::latency()
        );
        pub agent_task_duration: Histogram = (
            "lattice_agent_task_duration_seconds",
            "Time from a task's offer to its result",
            buckets::latency()
        );
        pub agent_resumes: Family<OutcomeLabels, Counter> = (
            "lattice_agent_hellos",
            "Agent handshakes, by outcome: fresh, resumed, or gap (session unknown)",
            Family::default()
        );
        pub agent_heartbeat_rtt: Histogram = (
            "lattice_agent_heartbeat_rtt_seconds",
            "Round trip of orchestrator heartbeats echoed by agents",
            buckets::latency()
        );
        /// Frames dropped by the receiver's dedupe, by reason (duplicate, stale).
        pub agent_dropped: Family<OutcomeLabels, Counter> = (
            "lattice_agent_frames_dropped",
            "Agent frames received again and dropped by dedupe (re-acknowledged, not re-processed), by reason",
            Family::default()
        );
        pub agent_resent: Counter = (
            "lattice_agent_frames_resent",
            "Frames resent to agents after they resumed a session",
            Counter::default()
        );
        pub agent_fenced: Counter = (
            "lattice_agent_fenced",
            "Writes refused because another replica owns the sessions they were for (this replica was paused or partitioned); each ends every stream here",
            Counter::default()
        );
        pub agent_credit_waits: Family<OutcomeLabels, Counter> = (
            "lattice_agent_credit_waits",
            "Requesters held back by their window: offers refused, or streams paused",
            Family::default()
        );
        pub memory_ops: Family<MemoryLabels, Counter> = (
            "lattice_memory_ops",
            "Memory broker operations, by op and outcome (aborted = version conflict)",
            Family::default()
        );
        pub tool_calls: Family<ToolLabels, Counter> = (
            "lattice_tool_calls",
            "Tool gateway calls, by tool and outcome (cached = answered from the idempotency cache)",
            Family::default()
        );
        pub tool_duration: HistogramFamily<ToolNameLabels> = (
            "lattice_tool_call_duration_seconds",
            "Tool gateway call duration, cache hits included",
            Family::new_with_constructor(buckets::latency)
        );
    }
}

// === AgentMetrics ===

/// What the agent plane holds right now, read at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AgentLoad {
    /// Sessions with a live stream.
    pub established: usize,
    /// Sessions kept for their agent to resume.
    pub detached: usize,
    /// Queued tasks per priority level, 0 (background) to 5 (realtime).
    pub queued: [usize; 6],
}

/// Reads the orchestrator's load; installed by the orchestrator of this process.
pub type LoadReader = Box<dyn Fn() -> AgentLoad + Send + Sync>;

/// The agent plane's metrics. Registered once per registry, through
/// `Metrics::set::<AgentMetrics>()`; its fields are the families.
pub struct AgentMetrics {
    families: AgentFamilies,
    load: Arc<Mutex<Option<LoadReader>>>,
}

impl std::ops::Deref for AgentMetrics {
    type Target = AgentFamilies;
    fn deref(&self) -> &AgentFamilies {
        &self.families
    }
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl MetricSet for AgentMetrics {
    fn register(r: &mut Registrar<'_>) -> Self {
        let families = AgentFamilies::register(r);
        let load = Arc::new(Mutex::new(None));
        r.collector(Box::new(LoadCollector(load.clone())));
        AgentMetrics { families, load }
    }
}

impl AgentMetrics {
    /// Sets where the session and queue gauges are read from (the last orchestrator
    /// made on this registry).
    pub fn read_load_from(&self, reader: LoadReader) {
        *self.load.lock() = Some(reader);
    }
}

struct LoadCollector(Arc<Mutex<Option<LoadReader>>>);

impl std::fmt::Debug for LoadCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadCollector").finish_non_exhaustive()
    }
}

impl Collector for LoadCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(a) = self.0.lock().as_ref().map(|f| f()) else {
            return Ok(());
        };
        gauge_family(
            &mut enc,
            "lattice_agent_sessions",
            "Agent sessions, by state: established (stream live) or detached (kept for resume)",
            vec![
                (StateLabel { state: "established" }, a.established as i64),
                (StateLabel { state: "detached" }, a.detached as i64),
            ],
        )?;
        gauge_family(
            &mut enc,
            "lattice_agent_queue_depth",
            "Tasks queued for a worker, by priority (0 background .. 5 realtime)",
            a.queued
                .iter()
                .enumerate()
                .map(|(p, n)| (PriorityLabel { priority: p as u8 }, *n as i64))
                .collect(),
        )
    }
}
