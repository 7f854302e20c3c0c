"""The Engine interface: what a worker needs from the thing that runs a model.

Three implementations are planned: `sim` (a calibrated model of one instance, real time),
`vllm` on a GPU and `vllm` on a CPU (one AsyncLLM-based class for both). The worker only talks
to this interface, so it never knows which one it drives.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator


class EngineError(Exception):
    """The engine cannot do what was asked (unknown model, bad request, not supported)."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    model: str
    # The whole context to continue from: the prompt and, when a request resumes on another
    # engine after its worker was lost or it was evicted, the tokens it had already generated.
    prompt_token_ids: tuple[int, ...]
    # Tokens still to generate.
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    # Lower runs first, as in vLLM's priority scheduling.
    priority: int = 0


@dataclasses.dataclass(frozen=True)
class EngineOutput:
    """New tokens of one request since its previous output."""

    token_ids: tuple[int, ...]
    text: str
    finished: bool = False
    # "length", "stop", "abort" or "error" once finished.
    finish_reason: str | None = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_running: int
    kv_used_tokens: int
    kv_capacity_tokens: int


@dataclasses.dataclass(frozen=True)
class EvictedRequest:
    """What an evicted request leaves behind: the tokens it generated before it stopped, and
    whether the engine kept its KV state (so resuming it does not recompute the context)."""

    request_id: str
    generated_token_ids: tuple[int, ...]
    kv_kept: bool = False


class Engine(abc.ABC):
    """One model-serving instance. All methods run on the worker's asyncio event loop."""

    kind: str = "abstract"

    @abc.abstractmethod
    async def start(self) -> None:
        """Loads the initial models; returns when the engine can take requests."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Aborts everything still running and releases the engine's resources."""

    @abc.abstractmethod
    def models(self) -> list[str]:
        """The models this engine serves right now."""

    def warm_models(self) -> list[str]:
        """Models held warm (weights in CPU memory, not serving): loading one is a warm start."""
        return []

    @abc.abstractmethod
    def free_slots(self) -> int:
        """How many more requests the engine can start now without queueing them internally.

        The worker pulls at most this many requests from its virtual queue (backpressure)."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def tokenize(self, model: str, text: str) -> list[int]: ...

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Runs a request, yielding its new tokens as they come; the last output has
        finished=True. Raises EngineError for an unknown model or a request it cannot take."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stops a request; its generate() iterator ends with finish_reason "abort".
        Unknown or finished ids are ignored."""

    async def evict(self, request_id: str) -> EvictedRequest | None:
        """Pre-empts a running request so it can be resumed later; None if it is not running.
        Its generate() iterator ends with finish_reason "abort"."""
        raise EngineError(f"{self.kind} engine cannot evict requests")

    async def load_model(self, model: str) -> None:
        """Starts serving `model` (a warm model loads faster than a cold one)."""
        raise EngineError(f"{self.kind} engine cannot load models")

    async def unload_model(self, model: str) -> None:
        raise EngineError(f"{self.kind} engine cannot unload models")

    async def warm_model(self, model: str) -> None:
        """Holds `model`'s weights in CPU memory so a later load_model is fast."""
        raise EngineError(f"{self.kind} engine cannot warm models")
