//! What the orchestrator persists, as protobuf messages (compact, and a field can
//! be added without a migration).

use lattice_proto::agent::TaskResult;

/// Collection names. `{sid}` is a session id.
pub mod coll {
    pub const SESSIONS: &str = "sessions";
    pub fn outbox(sid: &str) -> String {
        format!("outbox:{sid}")
    }
    /// Tasks a requester session offered and has not yet received the result of.
    pub fn tasks(sid: &str) -> String {
        format!("tasks:{sid}")
    }
    pub const DEAD_LETTER: &str = "dead_letter";
    /// Per session, the epoch of the stream that owns it (decimal): the fence
    /// every write for the session is checked against (shared stores only).
    pub const OWNERS: &str = "owners";
    /// Per task id, the requester session holding its record (shared dispatch):
    /// a retry of the id from a new session on any replica finds the task. A
    /// hint kept beside the records; a stale entry only costs a lookup.
    pub const TASK_HOLDERS: &str = "task_holders";
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionMeta {
    #[prost(string, tag = "1")]
    pub session_id: String,
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    #[prost(string, tag = "3")]
    pub agent_id: String,
    #[prost(string, tag = "4")]
    pub tenant: String,
    #[prost(string, repeated, tag = "5")]
    pub capabilities: Vec<String>,
    #[prost(uint32, tag = "6")]
    pub max_in_flight: u32,
    /// Highest agent seq whose effects are all durable.
    #[prost(uint64, tag = "7")]
    pub in_hwm: u64,
    #[prost(int64, tag = "8")]
    pub last_active_us: i64,
    /// Highest seq given to a frame for the agent: numbering continues from here
    /// after a restart, even when every frame was acknowledged.
    #[prost(uint64, tag = "9")]
    pub out_seq: u64,
    /// The user the gateway verified on the stream (empty without one).
    #[prost(string, tag = "10")]
    pub user: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum TaskState {
    Queued = 0,
    Assigned = 1,
    Done = 2,
    /// Published to the shared queue (several replicas over Redis): any replica
    /// with a worker of its capability takes it, and its result comes back
    /// through the result stream named by `route`.
    Shared = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskRecord {
    #[prost(string, tag = "1")]
    pub task_id: String,
    /// The requester's session: results go to its outbox.
    #[prost(string, tag = "2")]
    pub requester: String,
    #[prost(string, tag = "3")]
    pub capability: String,
    #[prost(bytes = "bytes", tag = "4")]
    pub payload: bytes::Bytes,
    #[prost(uint32, tag = "5")]
    pub priority: u32,
    #[prost(int64, tag = "6")]
    pub deadline_us: i64,
    #[prost(uint32, tag = "7")]
    pub attempts: u32,
    #[prost(uint32, tag = "8")]
    pub max_attempts: u32,
    #[prost(enumeration = "TaskState", tag = "9")]
    pub state: i32,
    /// The worker session it is assigned to, while Assigned.
    #[prost(string, tag = "10")]
    pub worker: String,
    #[prost(string, tag = "11")]
    pub tenant: String,
    #[prost(string, tag = "12")]
    pub traceparent: String,
    #[prost(message, optional, tag = "13")]
    pub result: Option<TaskResult>,
    #[prost(int64, tag = "14")]
    pub offered_us: i64,
    /// The requester's user, for the audit record of the task.
    #[prost(string, tag = "15")]
    pub user: String,
    /// The requester session the task was first offered by: a replica that runs
    /// it for a requester attached elsewhere delivers the result to this
    /// session's result stream (a retake moves `requester`, never `route`).
    #[prost(string, tag = "16")]
    pub route: String,
}
