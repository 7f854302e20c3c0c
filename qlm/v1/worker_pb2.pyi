from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvictAction(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class SwapModelAction(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WarmModelAction(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class StepLimitAction(_message.Message):
    __slots__ = ("max_running", "max_prefill_tokens")
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_running: int
    max_prefill_tokens: int
    def __init__(self, max_running: _Optional[int] = ..., max_prefill_tokens: _Optional[int] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("evict", "swap_model", "warm_model", "step_limit")
    EVICT_FIELD_NUMBER: _ClassVar[int]
    SWAP_MODEL_FIELD_NUMBER: _ClassVar[int]
    WARM_MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_LIMIT_FIELD_NUMBER: _ClassVar[int]
    evict: EvictAction
    swap_model: SwapModelAction
    warm_model: WarmModelAction
    step_limit: StepLimitAction
    def __init__(self, evict: _Optional[_Union[EvictAction, _Mapping]] = ..., swap_model: _Optional[_Union[SwapModelAction, _Mapping]] = ..., warm_model: _Optional[_Union[WarmModelAction, _Mapping]] = ..., step_limit: _Optional[_Union[StepLimitAction, _Mapping]] = ...) -> None: ...

class ActionPlan(_message.Message):
    __slots__ = ("epoch", "sequence", "worker_id", "actions")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sequence: int
    worker_id: str
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    def __init__(self, epoch: _Optional[int] = ..., sequence: _Optional[int] = ..., worker_id: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ...) -> None: ...

class ApplyPlanResponse(_message.Message):
    __slots__ = ("applied", "detail")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    detail: str
    def __init__(self, applied: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "models", "engine", "running", "max_running", "kv_used_tokens", "kv_capacity_tokens", "plan_epoch", "plan_sequence", "completed", "warm_models", "model_swaps")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PLAN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    WARM_MODELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SWAPS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    models: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    running: int
    max_running: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    plan_epoch: int
    plan_sequence: int
    completed: int
    warm_models: _containers.RepeatedScalarFieldContainer[str]
    model_swaps: int
    def __init__(self, worker_id: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., running: _Optional[int] = ..., max_running: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., plan_epoch: _Optional[int] = ..., plan_sequence: _Optional[int] = ..., completed: _Optional[int] = ..., warm_models: _Optional[_Iterable[str]] = ..., model_swaps: _Optional[int] = ...) -> None: ...
