"""What a policy sees (a Snapshot of the fleet) and what it returns (a Plan)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class GroupView:
    id: str
    model: str
    slo_class: str
    # Earliest TTFT deadline of its members, Unix ms.
    deadline_ms: int
    # Arrival order: groups are numbered as they open.
    sequence: int
    # Requests still waiting in it.
    queued: int
    # The worker whose virtual queue holds it now ("" when pending).
    worker: str = ""
    # Prompt tokens of its queued requests, summed.
    prompt_tokens: int = 0
    # Their max_tokens summed, when known (0: unknown).
    max_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class RunningView:
    """One request of a worker's batch, as a plan that may evict it needs to know it."""

    id: str
    slo_class: str
    # Output tokens so far (>= 1: its first token is out, so its TTFT is settled).
    generated: int
    max_tokens: int = 0  # 0: unknown
    # Prompt plus output so far: what a resume restores (swap-in) or recomputes (prefill).
    context_tokens: int = 0
    # When its first token came, Unix ms (0: not yet).
    first_token_ms: float = 0.0


@dataclasses.dataclass(frozen=True)
class SloView:
    """An SLO class's objectives, seconds: time to first token, and per output token after it
    (None: no TPOT objective)."""

    ttft_s: float
    tpot_s: float | None = None


@dataclasses.dataclass(frozen=True)
class WorkerView:
    id: str
    models: tuple[str, ...]
    max_running: int
    running: int = 0
    # The model loaded now ("" unknown); `models` are those it can serve (maybe after a swap).
    loaded: str = ""
    # Seconds until its engine next takes new work (the end of the step under way), if known.
    ready_in_s: float = 0.0
    # The batch now, by request. A plan evicts only where every one has its id (an eviction
    # names them); context_tokens 0: unknown, and the KV cache is then not modelled there.
    running_requests: tuple[RunningView, ...] = ()
    # Models it holds warm (in CPU memory: swapping to them is a warm start) besides the loaded
    # one; None: unknown, every swap is priced warm.
    warm: tuple[str, ...] | None = None
    # Prompt tokens its batch still has to prefill after the step under way (an engine that
    # prefills in chunks admits new work only once they are nearly done).
    prefill_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Snapshot:
    now_ms: float
    groups: tuple[GroupView, ...]
    workers: tuple[WorkerView, ...]
    # SLO class name -> its objectives; a class missing here is never evicted for, nor evicted
    slo_classes: Mapping[str, SloView] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepLimit:
    """What one engine step may hold on a worker so that its running requests keep their time
    per output token: a step decodes one token for each running sequence and prefills the
    prompts admitted (vLLM: max_num_seqs and max_num_batched_tokens, with chunked prefill)."""

    max_running: int
    max_prefill_tokens: int


@dataclasses.dataclass
class Plan:
    # worker id -> group ids in the order that worker serves them
    queues: dict[str, list[str]]
    # groups no alive worker can serve (their model has no worker); they stay pending
    unplaced: list[str] = dataclasses.field(default_factory=list)
    policy: str = ""
    # model -> seconds a request arriving now would wait behind everything planned (at the
    # policy's confidence), for admission feedback; policies without an estimator leave it empty
    admission_s: dict[str, float] = dataclasses.field(default_factory=dict)
    # model -> SLO class -> the same wait for a request of that class: it is planned by its
    # deadline, so it waits only behind groups due before it (and no late ones, which go last)
    admission_by_class_s: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # worker id -> running requests to pre-empt now (their group goes back to the queues with
    # their output kept), so that the group at the head of that worker's queue meets its deadline
    evictions: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # worker id -> the step limit that keeps its TPOT-bound requests within their objective;
    # a worker missing here runs unlimited (policies that do not reason about TPOT set none)
    step_limits: dict[str, StepLimit] = dataclasses.field(default_factory=dict)
    # worker id -> models to hold warm (weights into CPU memory, in the background) because
    # its queue will swap to them: the swap is then a warm start (see warm_starts)
    warm_starts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
