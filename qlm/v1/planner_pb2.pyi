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
    __slots__ = ("epoch", "sequence", "policy", "queues", "created_ms", "compute_ms", "leader", "calibration")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sequence: int
    policy: str
    queues: _containers.RepeatedCompositeFieldContainer[VirtualQueue]
    created_ms: float
    compute_ms: float
    leader: bool
    calibration: EstimatorCalibration
    def __init__(self, epoch: _Optional[int] = ..., sequence: _Optional[int] = ..., policy: _Optional[str] = ..., queues: _Optional[_Iterable[_Union[VirtualQueue, _Mapping]]] = ..., created_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., leader: _Optional[bool] = ..., calibration: _Optional[_Union[EstimatorCalibration, _Mapping]] = ...) -> None: ...

class EstimatorCalibration(_message.Message):
    __slots__ = ("confidence", "waits", "coverage", "coverage_pit", "uncertain", "coverage_uncertain")
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WAITS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_PIT_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    confidence: float
    waits: int
    coverage: float
    coverage_pit: float
    uncertain: int
    coverage_uncertain: float
    def __init__(self, confidence: _Optional[float] = ..., waits: _Optional[int] = ..., coverage: _Optional[float] = ..., coverage_pit: _Optional[float] = ..., uncertain: _Optional[int] = ..., coverage_uncertain: _Optional[float] = ...) -> None: ...
