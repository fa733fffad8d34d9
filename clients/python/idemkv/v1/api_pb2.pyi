from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_STATE_UNSPECIFIED: _ClassVar[RecordState]
    IN_PROGRESS: _ClassVar[RecordState]
    AVAILABLE: _ClassVar[RecordState]
    COMPLETED: _ClassVar[RecordState]
    FAILED: _ClassVar[RecordState]

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEARIZABLE: _ClassVar[Consistency]
    SERIALIZABLE: _ClassVar[Consistency]
RECORD_STATE_UNSPECIFIED: RecordState
IN_PROGRESS: RecordState
AVAILABLE: RecordState
COMPLETED: RecordState
FAILED: RecordState
LINEARIZABLE: Consistency
SERIALIZABLE: Consistency

class Record(_message.Message):
    __slots__ = ("namespace", "key", "state", "owner", "token", "lease_deadline_ms", "attempts", "max_attempts", "fingerprint", "created_at_ms", "result", "code", "completed_at_ms", "expires_at_ms", "last_error", "checkpoint", "updated_at_ms")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    state: RecordState
    owner: str
    token: int
    lease_deadline_ms: int
    attempts: int
    max_attempts: int
    fingerprint: bytes
    created_at_ms: int
    result: bytes
    code: int
    completed_at_ms: int
    expires_at_ms: int
    last_error: str
    checkpoint: bytes
    updated_at_ms: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., state: _Optional[_Union[RecordState, str]] = ..., owner: _Optional[str] = ..., token: _Optional[int] = ..., lease_deadline_ms: _Optional[int] = ..., attempts: _Optional[int] = ..., max_attempts: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., created_at_ms: _Optional[int] = ..., result: _Optional[bytes] = ..., code: _Optional[int] = ..., completed_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., last_error: _Optional[str] = ..., checkpoint: _Optional[bytes] = ..., updated_at_ms: _Optional[int] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("namespace", "key", "owner", "claim_id", "lease_ms", "fingerprint", "max_attempts", "retention_ms")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_MS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    owner: str
    claim_id: str
    lease_ms: int
    fingerprint: bytes
    max_attempts: int
    retention_ms: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., owner: _Optional[str] = ..., claim_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., max_attempts: _Optional[int] = ..., retention_ms: _Optional[int] = ...) -> None: ...

class Acquired(_message.Message):
    __slots__ = ("token", "lease_deadline_ms", "attempt", "previous_owner", "checkpoint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_OWNER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    token: int
    lease_deadline_ms: int
    attempt: int
    previous_owner: str
    checkpoint: bytes
    def __init__(self, token: _Optional[int] = ..., lease_deadline_ms: _Optional[int] = ..., attempt: _Optional[int] = ..., previous_owner: _Optional[str] = ..., checkpoint: _Optional[bytes] = ...) -> None: ...

class InProgress(_message.Message):
    __slots__ = ("owner", "lease_remaining_ms", "attempt")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    owner: str
    lease_remaining_ms: int
    attempt: int
    def __init__(self, owner: _Optional[str] = ..., lease_remaining_ms: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("result", "completed_at_ms", "token", "code")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    completed_at_ms: int
    token: int
    code: int
    def __init__(self, result: _Optional[bytes] = ..., completed_at_ms: _Optional[int] = ..., token: _Optional[int] = ..., code: _Optional[int] = ...) -> None: ...

class Failed(_message.Message):
    __slots__ = ("attempts", "last_error")
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    attempts: int
    last_error: str
    def __init__(self, attempts: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("acquired", "in_progress", "completed", "failed")
    ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    acquired: Acquired
    in_progress: InProgress
    completed: Completed
    failed: Failed
    def __init__(self, acquired: _Optional[_Union[Acquired, _Mapping]] = ..., in_progress: _Optional[_Union[InProgress, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ...) -> None: ...

class ClaimBatchRequest(_message.Message):
    __slots__ = ("items", "all_or_nothing")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ALL_OR_NOTHING_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ClaimRequest]
    all_or_nothing: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ClaimRequest, _Mapping]]] = ..., all_or_nothing: bool = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ClaimBatchItem(_message.Message):
    __slots__ = ("acquired", "in_progress", "completed", "failed", "error")
    ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    acquired: Acquired
    in_progress: InProgress
    completed: Completed
    failed: Failed
    error: ItemError
    def __init__(self, acquired: _Optional[_Union[Acquired, _Mapping]] = ..., in_progress: _Optional[_Union[InProgress, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ClaimBatchResponse(_message.Message):
    __slots__ = ("items", "applied")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ClaimBatchItem]
    applied: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ClaimBatchItem, _Mapping]]] = ..., applied: bool = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("namespace", "key", "token", "result", "code", "retention_ms")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    RETENTION_MS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    token: int
    result: bytes
    code: int
    retention_ms: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., token: _Optional[int] = ..., result: _Optional[bytes] = ..., code: _Optional[int] = ..., retention_ms: _Optional[int] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("completed_at_ms", "expires_at_ms")
    COMPLETED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    completed_at_ms: int
    expires_at_ms: int
    def __init__(self, completed_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("namespace", "key", "token", "lease_ms", "checkpoint")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    token: int
    lease_ms: int
    checkpoint: bytes
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., token: _Optional[int] = ..., lease_ms: _Optional[int] = ..., checkpoint: _Optional[bytes] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("lease_deadline_ms",)
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_deadline_ms: int
    def __init__(self, lease_deadline_ms: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("namespace", "key", "token", "error", "permanent")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    token: int
    error: str
    permanent: bool
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., token: _Optional[int] = ..., error: _Optional[str] = ..., permanent: bool = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("state", "attempts")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    state: RecordState
    attempts: int
    def __init__(self, state: _Optional[_Union[RecordState, str]] = ..., attempts: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "key", "consistency")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    consistency: Consistency
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: Record
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ...) -> None: ...

class AwaitRequest(_message.Message):
    __slots__ = ("namespace", "key", "timeout_ms")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    timeout_ms: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class AwaitResponse(_message.Message):
    __slots__ = ("record", "timed_out")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    record: Record
    timed_out: bool
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., timed_out: bool = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "key", "token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    token: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., token: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: bool = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "api_addr", "raft_addr", "voter")
    ID_FIELD_NUMBER: _ClassVar[int]
    API_ADDR_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDR_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    id: int
    api_addr: str
    raft_addr: str
    voter: bool
    def __init__(self, id: _Optional[int] = ..., api_addr: _Optional[str] = ..., raft_addr: _Optional[str] = ..., voter: bool = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("id", "role", "leader_id", "leader_api_addr", "term", "commit_index", "applied_index", "last_log_index", "members", "snapshot_index", "api_addr", "clock_ms", "wall_clock_ms", "rejoin_until", "data_bytes", "quota_bytes", "alarms", "cluster_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_API_ADDR_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    API_ADDR_FIELD_NUMBER: _ClassVar[int]
    CLOCK_MS_FIELD_NUMBER: _ClassVar[int]
    WALL_CLOCK_MS_FIELD_NUMBER: _ClassVar[int]
    REJOIN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    role: str
    leader_id: int
    leader_api_addr: str
    term: int
    commit_index: int
    applied_index: int
    last_log_index: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    snapshot_index: int
    api_addr: str
    clock_ms: int
    wall_clock_ms: int
    rejoin_until: int
    data_bytes: int
    quota_bytes: int
    alarms: _containers.RepeatedScalarFieldContainer[str]
    cluster_id: str
    def __init__(self, id: _Optional[int] = ..., role: _Optional[str] = ..., leader_id: _Optional[int] = ..., leader_api_addr: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., last_log_index: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., snapshot_index: _Optional[int] = ..., api_addr: _Optional[str] = ..., clock_ms: _Optional[int] = ..., wall_clock_ms: _Optional[int] = ..., rejoin_until: _Optional[int] = ..., data_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., alarms: _Optional[_Iterable[str]] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class AddLearnerRequest(_message.Message):
    __slots__ = ("id", "api_addr", "raft_addr")
    ID_FIELD_NUMBER: _ClassVar[int]
    API_ADDR_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDR_FIELD_NUMBER: _ClassVar[int]
    id: int
    api_addr: str
    raft_addr: str
    def __init__(self, id: _Optional[int] = ..., api_addr: _Optional[str] = ..., raft_addr: _Optional[str] = ...) -> None: ...

class ChangeMembershipRequest(_message.Message):
    __slots__ = ("voters", "retain")
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    voters: _containers.RepeatedScalarFieldContainer[int]
    retain: bool
    def __init__(self, voters: _Optional[_Iterable[int]] = ..., retain: bool = ...) -> None: ...

class MembershipResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class TriggerSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TriggerSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HashStateRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class HashStateResponse(_message.Message):
    __slots__ = ("id", "index", "hash", "records")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    id: int
    index: int
    hash: bytes
    records: int
    def __init__(self, id: _Optional[int] = ..., index: _Optional[int] = ..., hash: _Optional[bytes] = ..., records: _Optional[int] = ...) -> None: ...

class SaveSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotData(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class TransferLeaderRequest(_message.Message):
    __slots__ = ("to",)
    TO_FIELD_NUMBER: _ClassVar[int]
    to: int
    def __init__(self, to: _Optional[int] = ...) -> None: ...
