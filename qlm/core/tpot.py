"""Time per output token (TPOT) in the plan: a step limit per worker.

A running request with a TPOT objective T misses it when its instance's steps are slower than
T, and a step is slow mostly because of the prompts prefilled in it (a long prompt admitted
into the batch stalls every running decode) and then because of the batch's size. So where
TPOT-bound work runs, the plan caps what one step may hold: the prefill tokens admitted per
step (chunked prefill: vLLM's max_num_batched_tokens) and, only when a full batch alone is
too slow, the batch size, both read off the same step cost model the estimator uses. A step
within the cap lasts at most T, so every request there keeps its TPOT whatever it shares the
batch with. The price is prefill throughput: a prompt is prefilled in chunks between decode
steps, so the estimator charges a capped worker's prefill at the capped rate (its waits, and
so the TTFT promises made on it, stay honest).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .plan import Snapshot, StepLimit, WorkerView

# The fewest prefill tokens a step is given before the batch is cut instead: smaller chunks
# would make a long prompt's TTFT unbounded (vLLM's chunked prefill works in chunks of
# hundreds of tokens too).
MIN_PREFILL_TOKENS = 128


def step_limit(throughput, worker: str, model: str, tpot_s: float,
               min_prefill: int = MIN_PREFILL_TOKENS) -> StepLimit:
    """The most one step on `worker` serving `model` may hold and still last at most tpot_s:
    a full batch and what prefill fits beside it, or, when a full batch leaves less than
    `min_prefill` tokens of room, the largest batch that leaves that much (at least one)."""
    full = throughput.batch(worker, model)
    per_token = throughput.prompt_s_per_token(worker, model)

    def room(batch: int) -> int:
        left = tpot_s - throughput.step_s(worker, model, batch)
        return int(left / per_token) if per_token > 0 else 1 << 30

    if room(full) >= min_prefill:
        return StepLimit(full, room(full))
    # step_s is affine in the batch: solve for the batch that leaves min_prefill of room
    base, slope = throughput.step_s(worker, model, 0), (
        throughput.step_s(worker, model, 1) - throughput.step_s(worker, model, 0))
    spare = tpot_s - base - min_prefill * per_token
    batch = max(1, min(full, math.floor(spare / slope) if slope > 0 else full))
    return StepLimit(batch, max(1, room(batch)))


def tightest_tpot(snapshot: Snapshot, worker: WorkerView) -> float | None:
    """The tightest TPOT objective among the work a worker runs or may take next: its running
    requests, and the queued groups of a model it serves (a group may be placed there by this
    plan, and starts before the next plan can set a limit). None: no TPOT-bound work."""
    slo = snapshot.slo_classes

    def tpots(classes: Iterable[str]):
        return (slo[c].tpot_s for c in classes if c in slo and slo[c].tpot_s is not None)

    running = (r.slo_class for r in worker.running_requests)
    queued = (g.slo_class for g in snapshot.groups if g.model in worker.models and g.queued)
    return min((*tpots(running), *tpots(queued)), default=None)


def step_limits(snapshot: Snapshot, throughput) -> dict[str, StepLimit]:
    """worker id -> its step limit, for the workers with TPOT-bound work (see tightest_tpot)."""
    out = {}
    for w in snapshot.workers:
        tpot_s = tightest_tpot(snapshot, w)
        model = w.loaded or (w.models[0] if w.models else "")
        if tpot_s is not None and model:
            out[w.id] = step_limit(throughput, w.id, model, tpot_s)
    return out


class CappedThroughput:
    """An InstanceThroughput as seen under the plan's step limits: a capped worker runs at most
    its limit's batch, and prefills at most max_prefill_tokens per step of (at most) the TPOT,
    so a prompt's prefill takes longer there. Everything else is the wrapped one's."""

    def __init__(self, inner, limits: Mapping[str, StepLimit] | None = None):
        self.inner, self.limits = inner, dict(limits or {})

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def chunked(self, worker: str, model: str) -> bool:
        return worker in self.limits or self.inner.chunked(worker, model)

    def batch(self, worker: str, model: str, tokens_per_seq: float | None = None) -> int:
        b = self.inner.batch(worker, model, tokens_per_seq)
        limit = self.limits.get(worker)
        return b if limit is None else max(1, min(b, limit.max_running))

    def decode_rate(self, worker: str, model: str, batch: int | None = None) -> float:
        b = self.batch(worker, model) if batch is None else batch
        return b / self.inner.step_s(worker, model, b)

    def _capped(self, worker: str, budget: float, batch: int | None):
        """A step's prompt budget and batch under the worker's limit, if it has one."""
        limit = self.limits.get(worker)
        if limit is None:
            return budget, batch
        return (min(budget, limit.max_prefill_tokens),
                limit.max_running if batch is None else min(batch, limit.max_running))

    def prefill_chunk_tokens(self, worker: str, model: str, budget: float = math.inf,
                             batch: int | None = None) -> float:
        return self.inner.prefill_chunk_tokens(worker, model, *self._capped(worker, budget, batch))

    def prefill_s_per_token(self, worker: str, model: str, budget: float = math.inf,
                            batch: int | None = None) -> float:
        """Wall time per prompt token: chunks of at most the limit's, each in a step of a full
        (capped) batch (the decodes in it are progress the batch makes anyway, but the next
        group cannot start before the chunks ahead of it are done)."""
        return self.inner.prefill_s_per_token(worker, model, *self._capped(worker, budget, batch))
