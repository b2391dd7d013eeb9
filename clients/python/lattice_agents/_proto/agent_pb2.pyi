from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKGROUND: _ClassVar[Priority]
    LOW: _ClassVar[Priority]
    NORMAL: _ClassVar[Priority]
    HIGH: _ClassVar[Priority]
    URGENT: _ClassVar[Priority]
    REALTIME: _ClassVar[Priority]

class ResumeResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRESH: _ClassVar[ResumeResult]
    RESUMED: _ClassVar[ResumeResult]
    GAP: _ClassVar[ResumeResult]
BACKGROUND: Priority
LOW: Priority
NORMAL: Priority
HIGH: Priority
URGENT: Priority
REALTIME: Priority
FRESH: ResumeResult
RESUMED: ResumeResult
GAP: ResumeResult

class Envelope(_message.Message):
    __slots__ = ("msg_id", "seq_no", "ack_seq", "sent_at_us", "deadline_us", "traceparent", "idempotency_key", "correlation_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    ACK_SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_US_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    msg_id: str
    seq_no: int
    ack_seq: int
    sent_at_us: int
    deadline_us: int
    traceparent: str
    idempotency_key: str
    correlation_id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, msg_id: _Optional[str] = ..., seq_no: _Optional[int] = ..., ack_seq: _Optional[int] = ..., sent_at_us: _Optional[int] = ..., deadline_us: _Optional[int] = ..., traceparent: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., correlation_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("agent_id", "context_token", "priority", "env", "hello", "offer", "progress", "result", "cancel", "heartbeat", "credit", "memory_op", "tool_call", "ack", "goodbye", "error")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OP_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    context_token: bytes
    priority: Priority
    env: Envelope
    hello: Hello
    offer: TaskOffer
    progress: TaskProgress
    result: TaskResult
    cancel: Cancel
    heartbeat: Heartbeat
    credit: Credit
    memory_op: MemoryOp
    tool_call: ToolCall
    ack: Ack
    goodbye: Goodbye
    error: _status_pb2.Status
    def __init__(self, agent_id: _Optional[str] = ..., context_token: _Optional[bytes] = ..., priority: _Optional[_Union[Priority, str]] = ..., env: _Optional[_Union[Envelope, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., offer: _Optional[_Union[TaskOffer, _Mapping]] = ..., progress: _Optional[_Union[TaskProgress, _Mapping]] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., memory_op: _Optional[_Union[MemoryOp, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class AgentResponse(_message.Message):
    __slots__ = ("env", "welcome", "assign", "progress", "result", "cancel", "heartbeat", "credit", "memory", "tool_result", "ack", "drain", "goodbye", "error")
    ENV_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    env: Envelope
    welcome: Welcome
    assign: TaskAssign
    progress: TaskProgress
    result: TaskResult
    cancel: Cancel
    heartbeat: Heartbeat
    credit: Credit
    memory: MemoryResult
    tool_result: ToolResult
    ack: Ack
    drain: Drain
    goodbye: Goodbye
    error: _status_pb2.Status
    def __init__(self, env: _Optional[_Union[Envelope, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assign: _Optional[_Union[TaskAssign, _Mapping]] = ..., progress: _Optional[_Union[TaskProgress, _Mapping]] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., memory: _Optional[_Union[MemoryResult, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "capabilities", "max_in_flight", "tenant", "resume")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_in_flight: int
    tenant: str
    resume: Resume
    def __init__(self, protocol_version: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., max_in_flight: _Optional[int] = ..., tenant: _Optional[str] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("session_id", "epoch", "last_received_seq", "running_task_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVED_SEQ_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    last_received_seq: int
    running_task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., last_received_seq: _Optional[int] = ..., running_task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "epoch", "result", "last_received_seq", "heartbeat_interval_ms", "max_in_flight", "resume_token", "orchestrator_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVED_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ORCHESTRATOR_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    result: ResumeResult
    last_received_seq: int
    heartbeat_interval_ms: int
    max_in_flight: int
    resume_token: bytes
    orchestrator_id: str
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., result: _Optional[_Union[ResumeResult, str]] = ..., last_received_seq: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., resume_token: _Optional[bytes] = ..., orchestrator_id: _Optional[str] = ...) -> None: ...

class TaskOffer(_message.Message):
    __slots__ = ("task_id", "capability", "payload", "max_attempts")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    capability: str
    payload: bytes
    max_attempts: int
    def __init__(self, task_id: _Optional[str] = ..., capability: _Optional[str] = ..., payload: _Optional[bytes] = ..., max_attempts: _Optional[int] = ...) -> None: ...

class TaskAssign(_message.Message):
    __slots__ = ("task_id", "capability", "payload", "priority", "attempt", "tenant", "route")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    capability: str
    payload: bytes
    priority: Priority
    attempt: int
    tenant: str
    route: str
    def __init__(self, task_id: _Optional[str] = ..., capability: _Optional[str] = ..., payload: _Optional[bytes] = ..., priority: _Optional[_Union[Priority, str]] = ..., attempt: _Optional[int] = ..., tenant: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class TaskProgress(_message.Message):
    __slots__ = ("task_id", "fraction", "note", "route")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    fraction: float
    note: str
    route: str
    def __init__(self, task_id: _Optional[str] = ..., fraction: _Optional[float] = ..., note: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "output", "status", "attempts", "worker_id", "route")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    output: bytes
    status: _status_pb2.Status
    attempts: int
    worker_id: str
    route: str
    def __init__(self, task_id: _Optional[str] = ..., output: _Optional[bytes] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., attempts: _Optional[int] = ..., worker_id: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("task_id", "reason", "grace_ms")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    grace_ms: int
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ..., grace_ms: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at_us", "echo_sent_at_us", "in_flight", "load", "rtt_us")
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    ECHO_SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    RTT_US_FIELD_NUMBER: _ClassVar[int]
    sent_at_us: int
    echo_sent_at_us: int
    in_flight: int
    load: float
    rtt_us: int
    def __init__(self, sent_at_us: _Optional[int] = ..., echo_sent_at_us: _Optional[int] = ..., in_flight: _Optional[int] = ..., load: _Optional[float] = ..., rtt_us: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("max_in_flight",)
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    max_in_flight: int
    def __init__(self, max_in_flight: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemoryOp(_message.Message):
    __slots__ = ("memory_ref", "get", "put", "sync")
    MEMORY_REF_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    memory_ref: str
    get: MemoryGet
    put: MemoryPut
    sync: MemorySync
    def __init__(self, memory_ref: _Optional[str] = ..., get: _Optional[_Union[MemoryGet, _Mapping]] = ..., put: _Optional[_Union[MemoryPut, _Mapping]] = ..., sync: _Optional[_Union[MemorySync, _Mapping]] = ...) -> None: ...

class MemoryGet(_message.Message):
    __slots__ = ("block_ids",)
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MemoryPut(_message.Message):
    __slots__ = ("block_id", "value", "expected_version")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    value: bytes
    expected_version: int
    def __init__(self, block_id: _Optional[str] = ..., value: _Optional[bytes] = ..., expected_version: _Optional[int] = ...) -> None: ...

class MemorySync(_message.Message):
    __slots__ = ("since_version",)
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    since_version: int
    def __init__(self, since_version: _Optional[int] = ...) -> None: ...

class MemoryBlock(_message.Message):
    __slots__ = ("block_id", "value", "version")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    value: bytes
    version: int
    def __init__(self, block_id: _Optional[str] = ..., value: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class MemoryResult(_message.Message):
    __slots__ = ("memory_ref", "version", "blocks", "snapshot", "status")
    MEMORY_REF_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    memory_ref: str
    version: int
    blocks: _containers.RepeatedCompositeFieldContainer[MemoryBlock]
    snapshot: bool
    status: _status_pb2.Status
    def __init__(self, memory_ref: _Optional[str] = ..., version: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[MemoryBlock, _Mapping]]] = ..., snapshot: _Optional[bool] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("call_id", "tool", "arguments_json", "timeout_ms")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    tool: str
    arguments_json: str
    timeout_ms: int
    def __init__(self, call_id: _Optional[str] = ..., tool: _Optional[str] = ..., arguments_json: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("call_id", "output_json", "status", "cached")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    output_json: str
    status: _status_pb2.Status
    cached: bool
    def __init__(self, call_id: _Optional[str] = ..., output_json: _Optional[str] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reconnect_after_ms", "reason", "resume_token")
    RECONNECT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reconnect_after_ms: int
    reason: str
    resume_token: bytes
    def __init__(self, reconnect_after_ms: _Optional[int] = ..., reason: _Optional[str] = ..., resume_token: _Optional[bytes] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason", "cancel_pending")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANCEL_PENDING_FIELD_NUMBER: _ClassVar[int]
    reason: str
    cancel_pending: bool
    def __init__(self, reason: _Optional[str] = ..., cancel_pending: _Optional[bool] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("room", "sender", "text", "seq", "sent_at_us")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    room: str
    sender: str
    text: str
    seq: int
    sent_at_us: int
    def __init__(self, room: _Optional[str] = ..., sender: _Optional[str] = ..., text: _Optional[str] = ..., seq: _Optional[int] = ..., sent_at_us: _Optional[int] = ...) -> None: ...

class ListToolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ToolDescriptor(_message.Message):
    __slots__ = ("name", "description", "input_schema_json", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    input_schema_json: str
    source: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., input_schema_json: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class McpServerStatus(_message.Message):
    __slots__ = ("name", "transport", "state", "error", "tools", "connects")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    CONNECTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    transport: str
    state: str
    error: str
    tools: int
    connects: int
    def __init__(self, name: _Optional[str] = ..., transport: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., tools: _Optional[int] = ..., connects: _Optional[int] = ...) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools", "servers")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[ToolDescriptor]
    servers: _containers.RepeatedCompositeFieldContainer[McpServerStatus]
    def __init__(self, tools: _Optional[_Iterable[_Union[ToolDescriptor, _Mapping]]] = ..., servers: _Optional[_Iterable[_Union[McpServerStatus, _Mapping]]] = ...) -> None: ...
