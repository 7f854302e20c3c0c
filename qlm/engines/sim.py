"""A simulated LLM instance: continuous batching in real time, driven by a measured profile.

The sim lets the whole stack (router, planner, workers) run and be tested without GPUs while
keeping the properties the planner relies on: a bounded batch, a bounded KV cache, step times
that grow with the batch, slower cold than warm model loads, and outputs that are a
deterministic function of the context, so a request resumed elsewhere continues identically.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import math
import os
import random
from collections.abc import AsyncIterator

import yaml

from qlm.config import ConfigError
from qlm.engines.base import (
    Engine,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    EvictedRequest,
)
from qlm.engines.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

# Lowercase letters and space: generated text stays readable.
_ALPHABET = tuple(range(97, 123)) + (32,)
# How many trailing context tokens decide the next one. Any fixed window keeps the
# continuation property; a short one keeps hashing cheap for long prompts.
_WINDOW = 8
_DURATIONS = (
    "prefill_ms_per_token",
    "decode_step_ms",
    "decode_ms_per_seq",
    "load_ms",
    "warm_load_ms",
)


@dataclasses.dataclass(frozen=True)
class SimProfile:
    max_running: int
    kv_capacity_tokens: int
    prefill_ms_per_token: float
    decode_step_ms: float
    decode_ms_per_seq: float
    load_ms: float
    warm_load_ms: float
    eos_probability: float = 0.0
    # chunked prefill (vLLM's max_num_batched_tokens): the tokens one step may hold, one per
    # decoding sequence and the rest prompt chunks, in admission order; 0: a step prefills
    # every prompt admitted to it whole
    max_batched_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_running", "kv_capacity_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in _DURATIONS + ("eos_probability",):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.eos_probability > 1:
            raise ConfigError(f"eos_probability must be at most 1, got {self.eos_probability!r}")
        budget = self.max_batched_tokens
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0 or (
                0 < budget < self.max_running):
            # vLLM refuses a budget under max_num_seqs too: a full batch's decodes must fit
            raise ConfigError(f"max_batched_tokens must be 0 (no chunking) or an integer of at "
                              f"least max_running ({self.max_running}), got {budget!r}")

    def prefill_budget(self, decoding: int) -> float:
        """Prompt tokens a step with `decoding` sequences decoding may prefill (inf: all)."""
        return self.max_batched_tokens - decoding if self.max_batched_tokens else math.inf

    def step_ms(self, prefill_tokens: int, batch: int) -> float:
        """One continuous-batching step: prefill of the newly admitted prompts plus one decode
        token for each of the `batch` running sequences. The real-time sim engine and the
        discrete-event simulator both charge this."""
        return (self.prefill_ms_per_token * prefill_tokens + self.decode_step_ms
                + self.decode_ms_per_seq * batch)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SimProfile:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read sim profile {path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"sim profile {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"sim profile {path} must be a mapping of parameters")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(f"sim profile {path}: unknown keys {unknown} (known: {list(fields)})")
        missing = [
            n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"sim profile {path}: missing keys {missing}")
        try:
            return cls(**raw)
        except ConfigError as e:
            raise ConfigError(f"sim profile {path}: {e}") from None


# The most a sim engine catches up on its profile's timeline after the event loop fell behind.
MAX_LAG_S = 1.0

@dataclasses.dataclass(eq=False)
class _Seq:
    request: EngineRequest
    key: bytes  # hash key: the seed, or a random one per request
    arrival: int
    context: collections.deque  # the last _WINDOW tokens of prompt + generated
    generated: list[int] = dataclasses.field(default_factory=list)
    # Tokens produced but not yet read by the consumer; drained together (coalescing).
    pending: list[int] = dataclasses.field(default_factory=list)
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    finish_reason: str | None = None
    error: str = ""
    prefill_left: int = 0  # prompt tokens not yet prefilled (chunked prefill)

    @property
    def kv_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + self.request.max_tokens


class SimEngine(Engine):
    kind = "sim"

    def __init__(self, models: list[str], profile: SimProfile, time_scale: float = 1.0,
                 active: list[str] | None = None,
                 profiles: dict[str, SimProfile] | None = None):
        """`models` are served from the start, unless `active` names the few that are (the
        rest load on a swap, cold: a worker that serves one model at a time). `profiles`
        gives some models costs of their own (`profile` for the rest); steps cost what the
        first model served costs."""
        if time_scale < 0:
            raise EngineError(f"time_scale must be >= 0, got {time_scale!r}")
        if active is not None and not (active and set(active) <= set(models)):
            raise EngineError(f"active models {active!r} must be some of {models!r}")
        self.profiles = {m: (profiles or {}).get(m, profile) for m in models}
        self._default_profile = profile
        self.time_scale = float(time_scale)
        self.tokenizer = ByteTokenizer()
        self._served: dict[str, None] = dict.fromkeys(models if active is None else active)
        self._warm: set[str] = set()
        self._waiting: dict[str, _Seq] = {}
        self._running: dict[str, _Seq] = {}
        self._kv_used = 0
        self._arrivals = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # Virtual accounting, unaffected by time_scale or by machine load: tests and the
        # profiler can check the modelled cost without reading wall clocks.
        self.steps = 0
        self.sim_time_ms = 0.0
        self.load_time_ms = 0.0  # model loads and warm starts

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        # The initial models count as loaded already: the sim models a worker whose boot
        # happened before it joined, so a local stack starts in seconds, not load_ms.
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sim-engine-steps")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for seq in [*self._running.values(), *self._waiting.values()]:
            self._finish(seq, "abort")

    # --- queries ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        return list(self._served)

    @property
    def profile(self) -> SimProfile:
        """The cost model in force: the first served model's."""
        return self._profile_of(next(iter(self._served), ""))

    def _profile_of(self, model: str) -> SimProfile:
        return self.profiles.get(model, self._default_profile)

    def warm_models(self) -> list[str]:
        return sorted(self._warm - set(self._served))

    def free_slots(self) -> int:
        # Like vLLM's: what is already waiting for KV room counts as used, so a worker claims
        # no more than fits and the rest stays in the mesh's queues, where the plan orders it
        # and another worker can take it (not stuck in this engine's internal queue).
        waiting_kv = sum(seq.kv_tokens for seq in self._waiting.values())
        if self._kv_used + waiting_kv >= self.profile.kv_capacity_tokens:
            return 0
        # So do prompts: while a step's chunk budget is spent on those admitted and waiting,
        # a request claimed now would wait here, behind them, whatever the plan's order
        # (the simulator admits only then too; live, a tight request queued in the engine
        # behind 1 h ones met its TTFT less often than simulated)
        budget, owed = self._prefill_budget()
        if owed + sum(len(s.request.prompt_token_ids) for s in self._waiting.values()) >= budget:
            return 0
        return max(0, self.profile.max_running - len(self._running) - len(self._waiting))

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            max_running=self.profile.max_running,
            kv_used_tokens=self._kv_used,
            kv_capacity_tokens=self.profile.kv_capacity_tokens,
        )

    def tokenize(self, model: str, text: str) -> list[int]:
        self._check_model(model)
        return self.tokenizer.encode(text)

    # --- requests --------------------------------------------------------------------------

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        # Checked here, at call time, so a bad request fails before anyone iterates.
        self._check_request(request)
        return self._stream(request)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self._check_request(request)  # again: the model may have been unloaded meanwhile
        seq = self._submit(request)
        try:
            while True:
                await seq.ready.wait()
                seq.ready.clear()
                tokens, seq.pending = tuple(seq.pending), []
                done = seq.finish_reason is not None
                yield EngineOutput(
                    token_ids=tokens,
                    text=self.tokenizer.decode(tokens),
                    finished=done,
                    finish_reason=seq.finish_reason,
                    error=seq.error,
                )
                if done:
                    return
        finally:
            # The consumer went away (closed or cancelled): nobody will read the output.
            if seq.finish_reason is None:
                self._finish(seq, "abort")

    async def abort(self, request_id: str) -> None:
        seq = self._running.get(request_id) or self._waiting.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    async def evict(self, request_id: str) -> EvictedRequest | None:
        seq = self._running.get(request_id) or self._waiting.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return EvictedRequest(request_id, tuple(seq.generated), kv_kept=False)

    # --- models ----------------------------------------------------------------------------

    async def load_model(self, model: str) -> None:
        if model in self._served:
            return
        p = self._profile_of(model)
        cost = p.warm_load_ms if model in self._warm else p.load_ms
        self.load_time_ms += cost
        await self._sleep(cost)
        self._served[model] = None

    async def unload_model(self, model: str) -> None:
        if model in self._served:
            # its weights stay in CPU memory, as the simulator's instances keep them: swapping
            # back is a warm start
            self._warm.add(model)
        self._served.pop(model, None)
        for seq in [*self._running.values(), *self._waiting.values()]:
            if seq.request.model == model:
                self._finish(seq, "abort")

    async def warm_model(self, model: str) -> None:
        if model in self._warm or model in self._served:
            return
        # the part of a cold load a warm start does ahead (the simulator's warm starts too)
        p = self._profile_of(model)
        self.load_time_ms += p.load_ms - p.warm_load_ms
        await self._sleep(p.load_ms - p.warm_load_ms)
        self._warm.add(model)

    # --- internals -------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model not in self._served:
            raise EngineError(f"model {model!r} is not served here (serving {self.models()})")

    def _check_request(self, r: EngineRequest) -> None:
        if self._task is None or self._task.done():
            raise EngineError("sim engine is not running (call start())")
        self._check_model(r.model)
        if not r.prompt_token_ids:
            raise EngineError(f"request {r.request_id}: empty prompt")
        if r.max_tokens < 1:
            raise EngineError(
                f"request {r.request_id}: max_tokens must be >= 1, got {r.max_tokens}"
            )
        need = len(r.prompt_token_ids) + r.max_tokens
        if need > self.profile.kv_capacity_tokens:
            raise EngineError(
                f"request {r.request_id}: prompt + max_tokens = {need} tokens exceeds the "
                f"KV capacity of {self.profile.kv_capacity_tokens}"
            )
        if r.request_id in self._running or r.request_id in self._waiting:
            raise EngineError(f"request {r.request_id} is already running")

    def _submit(self, r: EngineRequest) -> _Seq:
        if r.seed is not None:
            seed = r.seed
        elif r.temperature == 0:
            seed = 0
        else:
            seed = random.getrandbits(64)
        self._arrivals += 1
        seq = _Seq(
            request=r,
            key=str(seed).encode(),
            arrival=self._arrivals,
            context=collections.deque(r.prompt_token_ids[-_WINDOW:], maxlen=_WINDOW),
        )
        self._waiting[r.request_id] = seq
        self._wake.set()
        return seq

    def _finish(self, seq: _Seq, reason: str, error: str = "") -> None:
        rid = seq.request.request_id
        if self._running.get(rid) is seq:
            del self._running[rid]
            self._kv_used -= seq.kv_tokens
        elif self._waiting.get(rid) is seq:
            del self._waiting[rid]
        seq.finish_reason, seq.error = reason, error
        seq.ready.set()

    def _prefill_budget(self) -> tuple[float, int]:
        """(the prompt tokens the next step may prefill, those the batch still owes)."""
        running = self._running.values()
        decoding = sum(not s.prefill_left for s in running)
        return self.profile.prefill_budget(decoding), sum(s.prefill_left for s in running)

    def _admit(self) -> None:
        budget, backlog = self._prefill_budget()
        # Strict order: a large request at the head is not overtaken by smaller ones forever.
        for seq in sorted(self._waiting.values(), key=lambda s: (s.request.priority, s.arrival)):
            if len(self._running) >= self.profile.max_running or backlog >= budget:
                break
            if self._kv_used + seq.kv_tokens > self.profile.kv_capacity_tokens:
                break
            del self._waiting[seq.request.request_id]
            self._running[seq.request.request_id] = seq
            self._kv_used += seq.kv_tokens
            seq.prefill_left = len(seq.request.prompt_token_ids)
            backlog += seq.prefill_left

    def _prefill_chunk(self) -> int:
        """Prompt tokens the next step prefills, in admission order, within the budget the
        decodes leave (vLLM's chunked prefill); what it completes decodes from this step on."""
        budget, chunk = self._prefill_budget()[0], 0
        for seq in self._running.values():
            take = min(seq.prefill_left, max(budget - chunk, 0))
            chunk += take
            seq.prefill_left -= take
            if seq.prefill_left:
                break
        return int(chunk)

    async def _sleep(self, ms: float) -> None:
        # asyncio.sleep(0) still yields, so time_scale 0 never starves other coroutines.
        await asyncio.sleep(ms * self.time_scale / 1000)

    async def _step_until(self, end: float | None, step_ms: float) -> float:
        """Waits out one step on the modelled clock and returns when it ended. Steps keep to
        the profile's timeline rather than each sleeping its full length after the event loop
        has done the previous step's work: on a busy machine that work (the worker's token
        appends) would otherwise add to every step, and a sim engine would run slower than
        its profile. A step the loop is already late for takes no time (catching up), within
        MAX_LAG_S; beyond that the lost time is let go."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        target = (now if end is None else end) + step_ms * self.time_scale / 1000
        if target - now < -MAX_LAG_S:
            target = now
        await asyncio.sleep(max(0.0, target - now))  # sleep(0) still yields
        return target

    async def _run(self) -> None:
        end = None  # when the last step ended on the modelled clock (None: idle)
        try:
            while True:
                self._admit()
                if not self._running:
                    self._wake.clear()
                    await self._wake.wait()
                    end = None
                    continue
                step_ms = self.profile.step_ms(self._prefill_chunk(), len(self._running))
                self.steps += 1
                self.sim_time_ms += step_ms
                end = await self._step_until(end, step_ms)
                # Requests aborted during the step are gone from _running; new ones wait, and
                # so do those whose prompt is not all prefilled yet.
                for seq in list(self._running.values()):
                    if not seq.prefill_left:
                        self._advance(seq)
        except Exception as e:
            # Without this, every consumer would wait forever on a dead stepping task.
            log.exception("sim engine stepping failed")
            for seq in [*self._running.values(), *self._waiting.values()]:
                self._finish(seq, "error", f"sim engine failed: {e}")
            raise

    def _advance(self, seq: _Seq) -> None:
        material = seq.key + b"|" + ",".join(map(str, seq.context)).encode()
        digest = hashlib.blake2b(material, digest_size=16).digest()
        r = seq.request
        eos_draw = int.from_bytes(digest[8:], "little") / 2**64  # uniform in [0, 1)
        if not r.ignore_eos and eos_draw < self.profile.eos_probability:
            # EOS only ends the request: it has no text, so it is not part of the output.
            self._finish(seq, "stop")
            return
        token = _ALPHABET[int.from_bytes(digest[:8], "little") % len(_ALPHABET)]
        seq.context.append(token)
        seq.generated.append(token)
        seq.pending.append(token)
        seq.ready.set()
        if len(seq.generated) >= r.max_tokens:
            self._finish(seq, "length")
