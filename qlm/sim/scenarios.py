"""Scenarios for the fleet simulator: which model and SLO class each trace request gets, and
which fleet serves them.

A trace (qlm.sim.traces) only says when requests arrive and how long they are. A scenario adds,
per request and reproducibly for a seed, the model it asks for and its SLO class (hence its
time-to-first-token deadline), and names the fleet of instances: GPU type, models each can
serve, and the engine profile for each (GPU, model) pair, e.g. "a100-llama-7b".

The workloads follow the QLM paper (Patke et al., SoCC 2024) with its SLOs of 20 s (interactive),
60 s and 1 h (batch) time to first token:

- `wa`: one model (llama-7b); classes interactive (20 s) and batch (60 s), 50/50.
- `wb`: three models (llama-7b, mistral-7b, vicuna-13b; 50/30/20% of requests) on two A100s
  that each serve all three, so they must swap; batch classes only: batch (60 s) and batch-1h
  (1 h), 50/50.
- `wc`: like wa on A100s, but 10% of prompts are redrawn from 8k-16k tokens (long context).
- `modern`: like wa but today's interactive SLO: 2 s TTFT and 0.1 s per output token; batch 60 s.

Fleets mix the paper's GPU types, `a10` and `a100`. Default fleets are small (2 instances) so
that the bench's higher loads overload them (not yet calibrated against the engine profiles);
`Scenario.instances(n)` (`--instances N`) resizes one by repeating its pattern.

Seeding: each aspect (SLO class, model, long prompt) draws from its own random.Random seeded by
the seed and the aspect's name (only random.random() is used), so the same seed gives the same
assignment on every run and Python version, and scenarios with the same mix (wa and modern)
give every request the same class.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
from collections.abc import Sequence

from qlm.sim.traces import TraceRequest, effective_output

GPUS = ("a10", "a100")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    # Parameters, billions (for the engine profiles that come later).
    params_b: float
    # Prompt plus output tokens, at most. The sim's models get 16k so the Azure traces (longest
    # prompt 14,050 tokens) replay unclamped.
    max_model_len: int


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-7b", 7, 16384),
        ModelSpec("mistral-7b", 7, 16384),
        ModelSpec("vicuna-13b", 13, 16384),
    )
}


@dataclasses.dataclass(frozen=True)
class SloClass:
    name: str
    ttft_deadline_s: float
    # Time per output token after the first; None: no TPOT objective.
    tpot_deadline_s: float | None = None


INTERACTIVE = SloClass("interactive", 20.0)
BATCH = SloClass("batch", 60.0)
BATCH_1H = SloClass("batch-1h", 3600.0)
INTERACTIVE_MODERN = SloClass("interactive", 2.0, tpot_deadline_s=0.1)


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    name: str
    gpu: str
    # Models the instance can serve (one at a time; switching is a model swap).
    models: tuple[str, ...]

    def profile(self, model: str) -> str:
        """The engine profile for running `model` on this instance's GPU."""
        if model not in self.models:
            raise ValueError(f"instance {self.name} does not serve {model!r} ({self.models})")
        return profile_name(self.gpu, model)

    @property
    def profiles(self) -> dict[str, str]:
        return {m: profile_name(self.gpu, m) for m in self.models}


def profile_name(gpu: str, model: str) -> str:
    return f"{gpu}-{model}"


@dataclasses.dataclass(frozen=True, slots=True)
class SimRequest:
    # Position in arrival order, from 0.
    id: int
    arrival_s: float
    # Prompt tokens after the scenario's changes (long prompts) and the model's context cap.
    input_length: int
    # Tokens to generate: effective_output of the trace's value, so at least 1.
    output_length: int
    model: str
    slo_class: str
    ttft_deadline_s: float
    tpot_deadline_s: float | None = None

    @property
    def deadline_s(self) -> float:
        """Absolute time (same clock as arrival_s) by which the first token is due."""
        return self.arrival_s + self.ttft_deadline_s


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    slo_classes: dict[str, SloClass]
    # SLO class name -> share of requests (weights, normalised).
    class_mix: dict[str, float]
    models: tuple[str, ...]
    # Share of requests per model, same order as `models`; empty: uniform.
    model_weights: tuple[float, ...]
    # The default fleet; its size is the default instance count.
    fleet: tuple[InstanceSpec, ...]
    # Share of requests whose prompt length is redrawn uniformly from long_prompt_range
    # (then capped to fit the model's context with the output).
    long_prompt_fraction: float = 0.0
    long_prompt_range: tuple[int, int] = (8192, 16384)

    def __post_init__(self) -> None:
        where = f"scenario {self.name!r}"
        for key, c in self.slo_classes.items():
            if key != c.name:
                raise ValueError(f"{where}: slo_classes key {key!r} holds class {c.name!r}")
            if c.ttft_deadline_s <= 0 or (c.tpot_deadline_s is not None and c.tpot_deadline_s <= 0):
                raise ValueError(f"{where}: class {key!r} deadlines must be above 0")
        if not self.class_mix:
            raise ValueError(f"{where}: empty class_mix")
        for key, w in self.class_mix.items():
            if key not in self.slo_classes:
                raise ValueError(f"{where}: class_mix names unknown class {key!r}")
            if not w > 0:
                raise ValueError(f"{where}: class_mix weight for {key!r} must be above 0")
        if not self.models:
            raise ValueError(f"{where}: no models")
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"{where}: unknown model {m!r} (known: {sorted(MODELS)})")
        if self.model_weights and (
            len(self.model_weights) != len(self.models) or min(self.model_weights) <= 0
        ):
            raise ValueError(f"{where}: model_weights must be one positive weight per model")
        if not self.fleet:
            raise ValueError(f"{where}: empty fleet")
        for inst in self.fleet:
            if inst.gpu not in GPUS:
                raise ValueError(f"{where}: instance {inst.name} has unknown gpu {inst.gpu!r}")
            for m in inst.models:
                if m not in self.models:
                    raise ValueError(f"{where}: instance {inst.name} serves unlisted model {m!r}")
        served = {m for inst in self.fleet for m in inst.models}
        for m in self.models:
            if m not in served:
                raise ValueError(f"{where}: no instance serves model {m!r}")
        if len({inst.name for inst in self.fleet}) != len(self.fleet):
            raise ValueError(f"{where}: duplicate instance names")
        if not 0 <= self.long_prompt_fraction <= 1:
            raise ValueError(f"{where}: long_prompt_fraction must be within [0, 1]")
        lo, hi = self.long_prompt_range
        if not 0 < lo <= hi:
            raise ValueError(f"{where}: bad long_prompt_range {self.long_prompt_range}")

    @property
    def default_instances(self) -> int:
        return len(self.fleet)

    def instances(self, n: int | None = None) -> tuple[InstanceSpec, ...]:
        """The fleet with `n` instances (default: the scenario's own fleet), repeating the
        default fleet's pattern of (gpu, models). Instances are named w0, w1, ..."""
        if n is None:
            n = len(self.fleet)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"instance count must be a positive integer, got {n!r}")
        pattern = itertools.islice(itertools.cycle(self.fleet), n)
        return tuple(InstanceSpec(f"w{i}", p.gpu, p.models) for i, p in enumerate(pattern))

    def assign(self, requests: Sequence[TraceRequest], seed: int) -> list[SimRequest]:
        """Gives each request (in the order given, normally arrival order) an id, model and SLO
        class; reproducible for a seed. Arrival times are kept. Outputs become
        effective_output (>= 1); a share of prompts is redrawn long when the scenario says so;
        a prompt is cut to fit the model's context with its output, and is at least 1 token."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        class_pick = _Picker(list(self.class_mix), list(self.class_mix.values()), seed, "class")
        weights = list(self.model_weights) or [1.0] * len(self.models)
        model_pick = _Picker(list(self.models), weights, seed, "model")
        long_rng = random.Random(f"{seed}:long-prompt")
        lo, hi = self.long_prompt_range
        fraction = self.long_prompt_fraction

        out = []
        for i, r in enumerate(requests):
            cls = self.slo_classes[class_pick()]
            model = model_pick()
            max_len = MODELS[model].max_model_len
            output = min(effective_output(r.output_length), max_len - 1)
            prompt = r.input_length
            if fraction and long_rng.random() < fraction:
                prompt = lo + int(long_rng.random() * (hi - lo + 1))
            prompt = max(1, min(prompt, max_len - output))
            out.append(
                SimRequest(
                    id=i,
                    arrival_s=r.arrival_s,
                    input_length=prompt,
                    output_length=output,
                    model=model,
                    slo_class=cls.name,
                    ttft_deadline_s=cls.ttft_deadline_s,
                    tpot_deadline_s=cls.tpot_deadline_s,
                )
            )
        return out


class _Picker:
    """Weighted choice from a stream that depends only on random.random()."""

    def __init__(self, names: list[str], weights: Sequence[float], seed: int, aspect: str):
        self._names = names
        self._cum = list(itertools.accumulate(weights))
        self._total = self._cum[-1]
        self._single = len(names) == 1
        self._rng = random.Random(f"{seed}:{aspect}")

    def __call__(self) -> str:
        if self._single:
            return self._names[0]
        i = bisect.bisect(self._cum, self._rng.random() * self._total)
        return self._names[min(i, len(self._names) - 1)]


def _classes(*classes: SloClass) -> dict[str, SloClass]:
    return {c.name: c for c in classes}


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="wa",
            description="one 7B model, interactive (20 s) and batch (60 s) requests 50/50",
            slo_classes=_classes(INTERACTIVE, BATCH),
            class_mix={"interactive": 0.5, "batch": 0.5},
            models=("llama-7b",),
            model_weights=(),
            fleet=(
                InstanceSpec("w0", "a100", ("llama-7b",)),
                InstanceSpec("w1", "a10", ("llama-7b",)),
            ),
        ),
        Scenario(
            name="wb",
            description=(
                "three models (50/30/20%) on two A100s that swap between them, batch only: "
                "60 s and 1 h 50/50"
            ),
            slo_classes=_classes(BATCH, BATCH_1H),
            class_mix={"batch": 0.5, "batch-1h": 0.5},
            models=("llama-7b", "mistral-7b", "vicuna-13b"),
            model_weights=(0.5, 0.3, 0.2),
            fleet=(
                InstanceSpec("w0", "a100", ("llama-7b", "mistral-7b", "vicuna-13b")),
                InstanceSpec("w1", "a100", ("llama-7b", "mistral-7b", "vicuna-13b")),
            ),
        ),
        Scenario(
            name="wc",
            description=(
                "one 7B model, interactive (20 s) and batch (60 s) 50/50, 10% of prompts "
                "redrawn at 8k-16k tokens"
            ),
            slo_classes=_classes(INTERACTIVE, BATCH),
            class_mix={"interactive": 0.5, "batch": 0.5},
            models=("llama-7b",),
            model_weights=(),
            fleet=(
                InstanceSpec("w0", "a100", ("llama-7b",)),
                InstanceSpec("w1", "a100", ("llama-7b",)),
            ),
            long_prompt_fraction=0.1,
        ),
        Scenario(
            name="modern",
            description=(
                "wa with a modern interactive SLO (2 s TTFT, 0.1 s TPOT) and batch (60 s) 50/50"
            ),
            slo_classes=_classes(INTERACTIVE_MODERN, BATCH),
            class_mix={"interactive": 0.5, "batch": 0.5},
            models=("llama-7b",),
            model_weights=(),
            fleet=(
                InstanceSpec("w0", "a100", ("llama-7b",)),
                InstanceSpec("w1", "a10", ("llama-7b",)),
            ),
        ),
    )
}


def get(name: str) -> Scenario:
    """The registered scenario called `name`; ValueError listing the known ones otherwise."""
    try:
        return SCENARIOS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown scenario {name!r} (known: {', '.join(sorted(SCENARIOS))})"
        ) from None


def names() -> list[str]:
    return sorted(SCENARIOS)


__all__ = [
    "GPUS",
    "MODELS",
    "SCENARIOS",
    "InstanceSpec",
    "ModelSpec",
    "Scenario",
    "SimRequest",
    "SloClass",
    "get",
    "names",
    "profile_name",
]
