from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetPlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VirtualQueue(_message.Message):
    __slots__ = ("worker_id", "group_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    group_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., group_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("epoch", "sequence", "policy", "queues", "created_ms", "compute_ms", "leader")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sequence: int
    policy: str
    queues: _containers.RepeatedCompositeFieldContainer[VirtualQueue]
    created_ms: float
    compute_ms: float
    leader: bool
    def __init__(self, epoch: _Optional[int] = ..., sequence: _Optional[int] = ..., policy: _Optional[str] = ..., queues: _Optional[_Iterable[_Union[VirtualQueue, _Mapping]]] = ..., created_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., leader: _Optional[bool] = ...) -> None: ...
