"""PlanGenerator: the QLM policy. Orders request groups into virtual queues so that as many as
possible start before their deadline with the configured confidence (a chance constraint,
P(wait <= deadline) >= confidence, read through the waiting-time estimator's quantile).

The plan is greedy: groups in deadline order, each appended to the queue of the worker where
its estimated wait quantile is lowest, preferring (1) a worker where it meets its deadline,
(2) among those, one that needs no model swap (model affinity), (3) the least loaded. A group
that can meet its deadline nowhere is set aside and queued after all groups that can: under
overload EDF serves hopeless groups first and makes the next ones late too (the domino
effect); QLM serves what can still be saved. Where a set-aside group goes: where its wait is
shortest while it has a chance, else where it costs the fleet's throughput least (see
_place_late).

Merging (model affinity over time): deadline order serves a model's tight work in small
segments and its loose work later in segments of its own, so the plan then moves later groups
of the model a worker serves to the head of its queue, behind that model's groups there, when
the groups they pass keep their deadlines (see _merge_into_head for the gates). Fewer swaps
and fuller batches: on wb at 1x it took qlm from 17 % under fcfs's throughput to within 3 %.

Request eviction (an LSO): when the group at the head of a worker's queue would miss its
deadline while requests of a looser class (a longer TTFT objective) hold that worker's batch,
the plan pre-empts the fewest of them that let the most of the group's requests start in time
(attainment first, then fewest evictions), at most `max_evictions` per plan, and only where
the rest of that worker's queue is planned in time (under overload the victims' resumed work
costs the groups behind as much as the eviction saves). They go back to their group with their
output kept and resume later (KV swapped to CPU memory where the engine can, else recomputed).
A running request has its first token, so eviction cannot cost its TTFT; it is evicted only if
its stall (the whole planned queue, conservatively) plus the resume keeps its time per output
token within its class's objective, when the class has one.

Like every policy it is a function of a Snapshot; it also learns: the planner (or the
simulator) reports completed requests (observe) and when groups start (group_started), which
feeds the output-length statistics and the estimator's calibration.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Mapping
from statistics import NormalDist

import numpy as np

from .estimator import (
    Calibration,
    InstanceThroughput,
    QueuedGroup,
    WaitEstimate,
    WaitingTimeEstimator,
    group_output,
)
from .lengths import OutputLengthStats
from .plan import GroupView, Plan, RunningView, Snapshot, WorkerView
from .tpot import CappedThroughput, step_limits


class ExactLengths(OutputLengthStats):
    """What an oracle knows: every request's output length is its max_tokens, exactly."""

    def moments(self, model, slo_class, cap=None, generated=0, band=None):
        if cap is None:
            return super().moments(model, slo_class, cap, generated, band)
        return max(float(cap) - generated, 0.0), 0.0

    def standard_error(self, model, slo_class, cap=None, generated=0, band=None) -> float:
        if cap is not None:
            return 0.0
        return super().standard_error(model, slo_class, cap, generated, band)

    def quantile(self, model, slo_class, q, cap=None, generated=0, band=None) -> float:
        if cap is None:
            return super().quantile(model, slo_class, q, cap, generated, band)
        return max(float(cap) - generated, 0.0)

    def done_within(self, model, slo_class, cap, generated, more, band=None):
        if cap is None:
            return super().done_within(model, slo_class, cap, generated, more, band)
        return (float(cap) - np.asarray(generated, dtype=float) <= more).astype(float)

    def remaining_many(self, model, slo_class, cap, generated, band=None):
        if cap is None:
            return super().remaining_many(model, slo_class, cap, generated, band)
        left = np.maximum(float(cap) - np.asarray(generated, dtype=float), 0.0)
        return np.array([left, np.zeros(len(left)), np.zeros(len(left))])


class _LeastLoaded:
    """Workers by a load key, per model they can serve and per model at their queue's tail,
    each kind a sorted list: the plan generator tries only the few least loaded workers of
    each kind for a group instead of all of them. A placement changes one worker's load, so
    an update moves its entries (bisect; the lists are one entry per worker)."""

    def __init__(self, workers, load: Callable[[str], float], k: int):
        self.load = load
        self.models = {w.id: w.models for w in workers}
        self.k, self.small = k, len(self.models) <= 2 * k
        # every model some worker can serve, in the workers' order, and who can serve it
        self.served = list(dict.fromkeys(m for ms in self.models.values() for m in ms))
        self.can = {m: [w for w, ms in self.models.items() if m in ms] for m in self.served}
        self.by_model: dict[str, list] = {m: [] for m in self.served}
        self.by_tail: dict[str, list] = {}
        self.tail: dict[str, str] = {}
        self.entry: dict[str, tuple[float, str]] = {}  # each worker's (load, id) in the lists
        for w in workers:
            self.update(w.id, w.loaded)

    def update(self, wid: str, tail_model: str) -> None:
        old_tail, self.tail[wid] = self.tail.get(wid), tail_model
        if self.small:  # least() tries every worker: no need to know their loads
            return
        old, self.entry[wid] = self.entry.get(wid), (self.load(wid), wid)
        lists = [self.by_model[m] for m in self.models[wid]]
        if old is not None:
            for lst in (*lists, self.by_tail[old_tail]):
                del lst[bisect.bisect_left(lst, old)]
        for lst in (*lists, self.by_tail.setdefault(tail_model, [])):
            bisect.insort(lst, self.entry[wid])

    def least(self, model: str) -> list[str]:
        """Up to k least loaded workers that can serve `model`, and up to k of those whose
        queue ends with it (no swap)."""
        if self.small:  # a small fleet: try every worker
            return self.can.get(model, [])
        out = [wid for _, wid in self.by_model.get(model, ())[:self.k]]
        out += [wid for _, wid in self.by_tail.get(model, ())[:self.k] if wid not in out]
        return out


def observer(policy) -> Callable | None:
    """A policy's observe hook as f(model, slo_class, output_tokens, prompt_tokens): a policy
    whose hook takes no prompt_tokens learns without them; None: it learns nothing."""
    observe = getattr(policy, "observe", None)
    if observe is None or "prompt_tokens" in inspect.signature(observe).parameters:
        return observe
    return lambda model, slo_class, output_tokens, prompt_tokens=None: observe(
        model, slo_class, output_tokens)


def warm_starts(snapshot: Snapshot, queues: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """For each worker, the first model its queue will swap to that it does not hold warm:
    loading its weights into CPU memory now, while the worker still serves, makes that swap a
    warm start. One per worker and plan, as a host's CPU memory holds only a few models; none
    where the snapshot does not say what is warm."""
    model_of = {g.id: g.model for g in snapshot.groups}
    starts = {}
    for w in snapshot.workers:
        if w.warm is None:
            continue
        for gid in queues.get(w.id, ()):
            m = model_of.get(gid)
            if m and m != w.loaded and m not in w.warm:
                starts[w.id] = [m]
                break
    return starts


class PlanGenerator:
    def __init__(
        self,
        throughput: InstanceThroughput,
        lengths: OutputLengthStats | None = None,
        *,
        confidence: float = 0.95,
        swap_s: Callable[[str], float] = lambda worker: 0.0,
        name: str = "qlm",
        candidates: int = 4,
        max_evictions: int = 8,
        max_merges: int = 4,
        pull_elsewhere: bool = True,
        recalibrate: bool = True,
        resume_s_per_token: Callable[[str, str], float] | None = None,
        slo_deadlines_s: Mapping[str, float] | None = None,
        tpot_limits: bool = False,
        cold_swap_s: Callable[[str, str], float] | None = None,
        compute_s: float | None = None,
        comparative_s: float = 3000.0,
    ):
        self.lengths = lengths or OutputLengthStats()
        self.estimator = WaitingTimeEstimator(self.lengths, throughput)
        # step limits for TPOT-bound work (qlm/core/tpot.py); the estimator then sees each
        # worker's capped throughput, re-derived every plan from the raw one
        self.tpot_limits, self._throughput = tpot_limits, throughput
        self.confidence = confidence
        self.z = NormalDist().inv_cdf(confidence)
        self.swap_s = swap_s
        # (worker, model) -> seconds to load it cold, for workers whose snapshot says which
        # models they hold warm (swap_s prices a warm start)
        self.cold_swap_s = cold_swap_s
        self.name = name
        # least loaded workers tried per group, of each kind (any, and no swap needed)
        self.candidates = candidates
        # evictions one plan may ask for (0: none); (worker, model) -> seconds per context token
        # to resume an evicted request (KV back from CPU memory); None: it is recomputed
        self.max_evictions = max_evictions
        # groups one plan may move forward into each worker's head segment (0: none)
        self.max_merges = max_merges
        # and whether a worker may take them from other workers' queues too (see
        # _merge_into_head; on wb at 1x fcfs's throughput or more, where without it qlm fell
        # 4-9 % under)
        self.pull_elsewhere = pull_elsewhere
        # a late group's queue start traded against its relative cost there (see _place_late)
        self.comparative_s = comparative_s
        self.resume_s_per_token = resume_s_per_token or throughput.prefill_s_per_token
        # SLO class -> its TTFT objective, seconds: where in the plan a new request of each
        # class would go, for admission feedback (None: the snapshot's classes)
        self.slo_deadlines_s = slo_deadlines_s
        self.calibration = Calibration(confidence)
        # read each wait's quantile through the spread its recent errors call for (see
        # Calibration.spread); False: the estimator's own quantiles
        self.recalibrate = recalibrate
        self._compute_s: collections.deque = collections.deque(maxlen=8)  # see ready_s
        # None: each plan's measured compute time; else this, for every plan (a simulation
        # that charges plans a fixed time, and is then reproducible)
        self.fixed_compute_s = compute_s
        self._empty: dict = {}  # see _head_queue
        # the estimate of the plan in force for each group, and when it was made: checked
        # against the group's real wait when it starts (a later plan may move a group back
        # behind newer, tighter groups; that is the plan's doing, not the estimator's error)
        self._latest: dict[str, tuple[WaitEstimate, float]] = {}
        self._early: set[str] = set()  # groups the last plan expects taken before it is in force

    # --- learning --------------------------------------------------------------------------

    def observe(self, model: str, slo_class: str, output_tokens: int,
                prompt_tokens: int | None = None) -> None:
        self.lengths.observe(model, slo_class, output_tokens, prompt_tokens)

    def group_started(self, group_id: str, now_s: float) -> None:
        latest = self._latest.pop(group_id, None)
        if latest is not None:
            estimate, planned_s = latest
            self.calibration.record(estimate, now_s - planned_s)

    # --- planning --------------------------------------------------------------------------

    @staticmethod
    def _queued(g: GroupView) -> QueuedGroup:
        return QueuedGroup(g.model, g.slo_class, g.queued, g.prompt_tokens, g.max_tokens or None)

    def ready_s(self, w: WorkerView) -> float:
        """When w can start the plan's work. Not before the plan is in force, which is once it
        has been computed (the longest of the last few plans' compute times stands for this
        one's); a worker that is running a batch then takes new work at the first step end
        after that. Without this, on wb nearly all the estimator's misses were groups
        estimated to start within a few ms that started one decode step (12-35 ms) later:
        the plan came in after the step boundary the estimate counted on.

        An engine that prefills in chunks admits new work only at a step end where less than
        a chunk of its batch's prompts is left to prefill, and until then each step also
        prefills a chunk (wb at 1x, before this was counted: 319 of the estimator's 331
        misses were sure starts, late by 0.13 s at the median, a chunk's step). What a
        worker takes before then (its own queue, the pending pool) starts at its own step
        end: see _pending_starts."""
        return self._ready(w)[0]

    def _in_force_s(self) -> float:
        """How long after its snapshot this plan will be in force: the longest of the last
        few plans' compute times."""
        return max(self._compute_s, default=0.0)

    def _ready(self, w: WorkerView, delay: float | None = None) -> tuple[float, int]:
        """ready_s, and the prompt tokens the batch still owes then (less than a chunk).
        delay: when the work can be there (default: once the plan is in force)."""
        if delay is None:
            delay = self._in_force_s()
        t = w.ready_in_s
        if not w.running_requests or not w.loaded:
            return max(t, delay), 0
        tp, batch = self.estimator.throughput, len(w.running_requests)
        step = tp.step_s(w.id, w.loaded, batch)
        owed = w.prefill_tokens if tp.chunked(w.id, w.loaded) else 0
        # the budget less a token for each of the batch (the few still prefilling take none,
        # a step's chunk is that many tokens larger: 0.1-1 ms)
        chunk = tp.prefill_chunk_tokens(w.id, w.loaded, batch=batch)
        per_token = tp.prompt_s_per_token(w.id, w.loaded)
        while owed >= chunk or (owed and t < delay):
            take = min(owed, chunk)
            t, owed = t + step + take * per_token, owed - take
        return (t if t >= delay else t + math.ceil((delay - t) / step) * step), owed

    def _empty_queue(self, w: WorkerView, running, delay: float | None = None):
        """The estimator's virtual queue of w with nothing placed in it yet."""
        ready_s, owed = self._ready(w, delay)
        return self.estimator.queue(w.id, w.loaded or None, running, self.swap_s(w.id),
                                    ready_s, self._cold(w), owed)

    def __call__(self, snapshot: Snapshot) -> Plan:
        started = time.perf_counter()
        plan = self._plan(snapshot)
        self._compute_s.append(time.perf_counter() - started if self.fixed_compute_s is None
                               else self.fixed_compute_s)
        return plan

    def _plan(self, snapshot: Snapshot) -> Plan:
        now_s = snapshot.now_ms / 1000
        plan = Plan(queues={w.id: [] for w in snapshot.workers}, policy=self.name)
        self.estimator.spread = self.calibration.spread() if self.recalibrate else 1.0
        if self.tpot_limits:
            plan.step_limits = step_limits(snapshot, self._throughput)
            self.estimator.throughput = CappedThroughput(self._throughput, plan.step_limits)
        # the running requests are censored observations of the output lengths (L > generated)
        self.lengths.set_running(((w.loaded, self._running(w)) for w in snapshot.workers
                                  if w.loaded), now_s)
        self._empty = {}  # worker id -> its empty queue, built once a plan (see _head_queue)
        waits = {w.id: self._head_queue(w, None) for w in snapshot.workers}
        tail_model = {w.id: w.loaded for w in snapshot.workers}
        # a worker's load: when a small group of its tail model would start there
        least = _LeastLoaded(snapshot.workers, lambda wid: waits[wid].next_wait(
            QueuedGroup(tail_model[wid], "", 1)).mean if tail_model[wid] else 0.0,
            self.candidates)

        late: list[GroupView] = []
        self._views = {g.id: g for g in snapshot.groups}  # this plan's groups, by id
        self._admission_at: dict[tuple[str, str], dict[str, float]] = {}  # see _admission
        ordered = sorted(snapshot.groups, key=lambda g: (g.deadline_ms, g.sequence))
        # a new request of a class is due at now + its objective: it goes in behind the groups
        # due before that, so its wait is read when the deadline order passes that point
        admit = sorted(((snapshot.now_ms + s * 1000, c) for c, s in self._deadlines(snapshot)),
                       reverse=True)
        for i, g in enumerate(ordered):
            while admit and g.deadline_ms > admit[-1][0]:
                self._admission(plan, admit.pop()[1], waits, least)
            candidates = least.least(g.model)
            if not candidates:
                plan.unplaced.append(g.id)
                continue
            queued = self._queued(g)
            budget = g.deadline_ms / 1000 - now_s
            best, best_key, best_estimate = None, None, None
            # those with g's model at their tail first: once one of them meets the deadline no
            # swap can beat it (the key below), and a swap's wait need not be read (exact: the
            # order within each kind, so the tie-break, is kept)
            for wid in sorted(candidates, key=lambda w: tail_model[w] != g.model):
                if best_key is not None and best_key[:2] == (False, False) \
                        and tail_model[wid] != g.model:
                    break
                estimate = waits[wid].next_wait(queued)
                q = estimate.quantile(self.z)
                key = (q > budget, tail_model[wid] != g.model, q)
                if best_key is None or key < best_key:
                    best, best_key, best_estimate = wid, key, estimate
            if best_key[0] and self._worth_deferring(
                    g, best, best_key[-1] - budget, ordered[i + 1:i + 2], now_s):
                late.append(g)
                continue
            self._place(plan, waits, tail_model, best, g, queued, best_estimate, now_s)
            least.update(best, g.model)

        while admit:  # due after every group: still ahead of the late ones
            self._admission(plan, admit.pop()[1], waits, least)
        self._place_late(late, plan, waits, tail_model, least, now_s)
        if self.max_merges > 0:
            objectives = dict(self._deadlines(snapshot))
            views = {w.id: w for w in snapshot.workers}
            for w in snapshot.workers:
                self._merge_into_head(w, plan, waits, now_s, objectives, views)
        if self.max_evictions > 0 and snapshot.slo_classes:
            self._plan_evictions(snapshot, plan, waits, now_s)
        self._pending_starts(ordered, snapshot.workers, now_s)
        plan.warm_starts = warm_starts(snapshot, plan.queues)
        for model in least.served:
            options = [waits[w].next_wait(QueuedGroup(model, "", 1)).quantile(self.z)
                       for w in least.least(model)]
            if options:
                plan.admission_s[model] = min(options)
        return plan

    def _pending_starts(self, ordered: list[GroupView], workers, now_s: float) -> None:
        """The estimates of the groups a worker with room takes before this plan is in force,
        at the first step end that admits work: claim.lua's order, the worker's own queue
        first (by deadline: the snapshot does not give its order), then the pending pool (the
        groups in no virtual queue) by deadline. The plan's estimate starts nothing before
        the plan is in force: it stood for a later start than theirs (wa at 0.5x: 70 % of the
        sure starts came earlier than estimated, at the median after a third of the wait).
        `ordered`: the snapshot's groups by deadline."""
        delay = self._in_force_s()
        self._early = set()
        pending: dict[str, list[GroupView]] = {}
        own: dict[str, list[GroupView]] = {}
        for g in ordered:
            (own.setdefault(g.worker, []) if g.worker else pending.setdefault(g.model, [])
             ).append(g)
        early = []
        for w in workers:
            if (w.loaded in pending or w.id in own) and len(w.running_requests) < w.max_running:
                t = self._ready(w, 0.0)[0]
                if t < delay:
                    early.append((t, w.id, w))
        # per model: how many of its pending groups are taken (the first ones: every worker
        # takes them in deadline order)
        taken = dict.fromkeys(pending, 0)
        for _, _, w in sorted(early):
            line = pending.get(w.loaded, [])
            if taken.get(w.loaded, 0) == len(line) and w.id not in own:
                continue
            waits = self._empty_queue(w, self._running(w), 0.0)
            if all(self._taken_early(waits, w, g, delay, now_s) for g in own.get(w.id, ())):
                while taken.get(w.loaded, 0) < len(line) and self._taken_early(
                        waits, w, line[taken[w.loaded]], delay, now_s):
                    taken[w.loaded] += 1

    def _taken_early(self, waits, w: WorkerView, g: GroupView, delay: float,
                     now_s: float) -> bool:
        """Whether w takes g next at its step end before `delay` (then its estimate is that)."""
        queued = self._queued(g)
        estimate = waits.next_wait(queued)
        if g.model != w.loaded or estimate.std > Calibration.TOLERANCE_S \
                or estimate.mean >= delay:
            return False
        self._latest[g.id] = (estimate, now_s)
        self._early.add(g.id)
        waits.append(queued)
        return True

    def _deadlines(self, snapshot: Snapshot):
        if self.slo_deadlines_s is not None:
            return self.slo_deadlines_s.items()
        return ((c, v.ttft_s) for c, v in snapshot.slo_classes.items())

    def _admission(self, plan: Plan, slo_class: str, waits, least: _LeastLoaded) -> None:
        """The wait of a request of `slo_class` for each model, were it placed now (and, per
        worker tried, in _admission_at)."""
        for model in least.served:
            at = {w: waits[w].next_wait(QueuedGroup(model, slo_class, 1)).quantile(self.z)
                  for w in least.least(model)}
            self._admission_at[(model, slo_class)] = at
            if at:
                plan.admission_by_class_s.setdefault(model, {})[slo_class] = min(at.values())

    def _place_late(self, late, plan, waits, tail_model, least, now_s) -> None:
        """Places the groups no worker can start by their deadline with the configured
        confidence, after everything that can still meet one. One that still has a chance
        goes where its wait is shortest. For one that has none (under 1 - confidence even
        there), what counts is the fleet's throughput: it goes where it is comparatively
        cheapest, its cost there against that worker's cost for the average late request (an
        A10 prefills at 40 % of an A100's speed but decodes at 13 %, so prompt-heavy work is
        cheap there), traded against how much later that worker's queue starts:
        `comparative_s` seconds per unit of relative cost. Shortest waits alone gave the A10
        the groups that fitted its KV cache soonest: qlm's throughput under overload on wa
        and modern (an A100 and an A10) was 0.1-0.7 % under fcfs's, and is now 0.7-0.8 % over
        it (plans charged 40 ms; docs/benchmarks.md)."""
        if not late:
            return
        output = {g.id: self._mean_output(g) for g in late}
        n = sum(g.queued for g in late) or 1
        average = (sum(g.prompt_tokens for g in late) / n,
                   sum(output[g.id] * g.queued for g in late) / n)
        per_average: dict[tuple[str, str], float] = {}  # (worker, model) -> its average cost
        starts: dict[str, dict[str, float]] = {}  # worker -> model -> its queue's start

        def key(w: str, g: GroupView) -> tuple[float, str]:
            if (w, g.model) not in per_average:
                per_average[w, g.model] = max(self._request_s(w, g.model, *average), 1e-9)
            cost = self._request_s(w, g.model, g.prompt_tokens / max(g.queued, 1),
                                   output[g.id]) / per_average[w, g.model]
            at = starts.setdefault(w, {})
            if g.model not in at:
                at[g.model] = waits[w].next_wait(QueuedGroup(g.model, "", 1)).mean
            return at[g.model] + self.comparative_s * cost, w

        for g in late:
            queued, budget = self._queued(g), g.deadline_ms / 1000 - now_s
            candidates, options = least.least(g.model), {}
            if budget > 0:  # past its deadline it has no chance anywhere
                options = {w: waits[w].next_wait(queued) for w in candidates}
                wid = min(options, key=lambda w: (options[w].quantile(self.z), w))
            if budget <= 0 or options[wid].p_meets(budget) < 1 - self.confidence:
                wid = min(candidates, key=lambda w, g=g: key(w, g))
            estimate = options[wid] if wid in options else waits[wid].next_wait(queued)
            self._place(plan, waits, tail_model, wid, g, queued, estimate, now_s)
            starts.pop(wid, None)
            least.update(wid, g.model)

    def _mean_output(self, g: GroupView) -> float:
        """The mean output of one request of g, as the estimator reads it."""
        return group_output(self.lengths, self._queued(g))[2]

    def _request_s(self, wid: str, model: str, prompt: float, output: float) -> float:
        """Seconds of wid's time one request of `prompt` and `output` tokens takes: its prompt,
        and its share of the decode steps of a batch of requests like it (as many as fit in
        the KV cache)."""
        tp = self.estimator.throughput
        batch = tp.batch(wid, model, prompt + output)
        return (prompt * tp.prompt_s_per_token(wid, model)
                + output * tp.step_s(wid, model, batch) / batch)

    def _worth_deferring(self, g, wid, lateness_s, following, now_s) -> bool:
        """Setting a late group aside helps only the groups it would delay: if even the next
        deadline (the tightest of those still to place) has room for this group's lateness
        plus its work, serving it now costs no one a deadline, and setting it aside would
        make it later still (a 60 s group behind a queue of 1 h ones, say)."""
        if not following:
            return False
        tp = self.estimator.throughput
        mean_len = self._mean_output(g)
        batch = tp.batch(wid, g.model)
        work_s = g.queued * mean_len * tp.step_s(wid, g.model, batch) / batch
        next_budget = following[0].deadline_ms / 1000 - now_s
        return next_budget - (g.deadline_ms / 1000 - now_s) < lateness_s + work_s

    def _place(self, plan, waits, tail_model, wid, g, queued, estimate, now_s) -> None:
        plan.queues[wid].append(g.id)
        waits[wid].append(queued)
        tail_model[wid] = g.model
        self._latest[g.id] = (estimate, now_s)

    # --- merging ---------------------------------------------------------------------------

    def _merge_into_head(self, w: WorkerView, plan: Plan, waits, now_s: float,
                         objectives: Mapping[str, float],
                         views: Mapping[str, WorkerView]) -> None:
        """Moves later groups of the model w is serving to the head of w's queue, behind the
        groups of that model already there, while every group they pass still starts by its
        deadline. Deadline order serves a model's tight work in small segments as it comes and
        its loose work later in segments of its own: smaller batches and more swaps than
        arrival order (wb at 1x: mistral-7b ran in batches of 11.9 against fcfs's 15.1, and
        qlm completed 4.21 requests/s against fcfs's 5.08). Only at the head: it is what the
        worker pulls before the next plan. Two more conditions, each measured on wb at 2x
        (`objectives`: SLO class -> TTFT objective, s):
        - w has room for tight work: a request of the tightest class arriving now, of each
          model w serves that no other worker has room for, would still start in time where
          deadline order puts it. Without that, 0.991 -> 0.972 on the first 8,000 requests:
          the groups passed kept their deadlines, the ones that arrived next did not.
        - When the head of the queue needs a swap already (the batch is draining), only a
          group as tight as anything queued on w goes in front of it: a looser one extends the
          drain while tight work waits (0.991 -> 0.977).
        With `pull_elsewhere`, when w's own queue has no more of its model and its batch has
        slots free, the earliest due group of it queued on another worker (not one that
        worker is serving) moves over, on the same conditions: deadline order places a model's loose
        work by load, so under a backlog it waited behind other models' work on one worker
        while the other ran that model with slots free (wb at 1x: half the plans left a worker
        with ~100 free slots and 100-400 requests of its model queued on the other)."""
        queue, model = plan.queues[w.id], w.loaded
        if not model or not queue:
            return
        groups = self._views
        end = next((i for i, gid in enumerate(queue) if groups[gid].model != model),
                   len(queue))
        if end == len(queue):
            return
        tightest = min(objectives.items(), key=lambda c: c[1], default=None)
        newcomers = [] if tightest is None else [
            (now_s + tightest[1], QueuedGroup(m, tightest[0], 1)) for m in w.models
            if not any(wait <= tightest[1] for wid, wait in self._admission_at.get(
                (m, tightest[0]), {}).items() if wid != w.id)]
        queued_tightest = min(objectives.get(groups[gid].slo_class, 0.0) for gid in queue)

        def fits(gid) -> bool:  # a draining head takes only work as tight as any queued
            return end > 0 or objectives.get(groups[gid].slo_class, 0.0) <= queued_tightest

        prefill_s = self.estimator.throughput.prefill_s_per_token(w.id, model)
        prefill_room = self._prefill_room(w, queue[:end], prefill_s, now_s)
        moved = 0
        for _ in range(self.max_merges):
            src, k = None, next((k for k in range(end + 1, len(queue))
                                 if groups[queue[k]].model == model and fits(queue[k])), None)
            # with none left in w's queue, from another's, only to fill the batch: beyond that
            # it would sit in w's queue, pushing w's other work to the edge of its deadlines
            if k is None and self.pull_elsewhere and w.running + sum(
                    groups[gid].queued for gid in queue[:end]) < w.max_running:
                src, k = self._queued_elsewhere(w, plan, model, fits, views)
            if k is None:
                break
            source = queue if src is None else plan.queues[src]
            gid = source[k]
            prefill_room -= prefill_s * groups[gid].prompt_tokens
            if prefill_room < 0:
                break
            rest = source[:k] + source[k + 1:]
            # the groups it passes: in w's queue up to where it was, or all of w's queue
            order, last = (rest[:end] + [gid] + rest[end:], k + 1) if src is None else \
                (queue[:end] + [gid] + queue[end:], len(queue) + 1)
            rebuilt = self._estimate_queue(w, order, end, last, now_s, newcomers)
            if rebuilt is None:
                break  # a later group would pass the same ones
            if src is not None:  # it leaves src's queue: re-read the waits behind it there
                waits[src], behind = self._estimate_queue(views[src], rest, k, k, now_s)
                source[:] = rest
                self._latest.update((g, (e, now_s)) for g, e in behind.items())
            waits[w.id], estimates = rebuilt
            queue[:] = order
            self._latest.update((g, (e, now_s)) for g, e in estimates.items())
            end, moved = end + 1, moved + 1
        if moved and tightest is not None and self.pull_elsewhere:
            self._readmit(w, queue, tightest, now_s)

    def _prefill_room(self, w: WorkerView, head, prefill_s: float, now_s: float) -> float:
        """Seconds of prompts that work moved in behind the head groups may bring. A batch
        that prefills what it pulls in one step (no chunked prefill) gives the head's groups,
        which start at once, their first token only after the prompts moved in behind them
        (wb at 1x: 60 s groups started 5 s before their deadline and met it 2 s late, behind
        7 s of prompts).
        Measured with pull_elsewhere only, whose moves fill whole batches; without it the
        moves are fewer and the room is not checked (inf). Prefilled in chunks, in admission
        order, the head's prompts go first whatever moves in behind them: not checked either."""
        if not self.pull_elsewhere or self.estimator.throughput.chunked(w.id, w.loaded):
            return math.inf
        groups = self._views
        return min((groups[gid].deadline_ms / 1000 - now_s
                    - self._latest[gid][0].quantile(self.z) for gid in head),
                   default=math.inf) - prefill_s * sum(groups[gid].prompt_tokens for gid in head)

    def _readmit(self, w: WorkerView, queue, tightest: tuple[str, float], now_s: float):
        """Re-reads, after merges on w, where a request of the tightest class arriving now
        would start on w, for the workers merged later: each keeps room for one only where no
        other worker has it, so each must see the others' room as merged (wb at 1x: the first
        worker to merge counted on the second's room, which the second then filled)."""
        cls, objective = tightest
        due_ms = (now_s + objective) * 1000
        for m in w.models:
            at = self._admission_at.get((m, cls))
            if at is None:
                continue
            qw = self._head_queue(w, None)
            for gid in queue:
                if self._views[gid].deadline_ms > due_ms:
                    break  # it would go in here, as in _estimate_queue
                qw.append(self._queued(self._views[gid]))
            at[w.id] = qw.next_wait(QueuedGroup(m, cls, 1)).quantile(self.z)

    def _queued_elsewhere(self, w: WorkerView, plan: Plan, model: str, fits, views):
        """(worker, index) of the earliest due group of `model` queued on another worker and
        not in the head segment that worker is serving, that `fits`; (None, None) if none."""
        groups, best, best_key = self._views, (None, None), None
        for wid, queue in plan.queues.items():
            if wid == w.id:
                continue
            serving = views[wid].loaded == model
            for k, gid in enumerate(queue):
                g = groups[gid]
                if g.model != model:
                    serving = False
                    continue
                if serving or not fits(gid):
                    continue
                key = (g.deadline_ms, g.sequence)
                if best_key is None or key < best_key:
                    best, best_key = (wid, k), key
                break  # a queue is in deadline order within a model
        return best

    def _estimate_queue(self, w: WorkerView, order, first: int, last: int, now_s: float,
                        newcomers=()):
        """(the estimator's state after `order` on w, the estimates of its groups from
        `first` on); None if one of them up to `last` would start late, or a newcomer
        (deadline s, QueuedGroup) put in from `first` on where its deadline falls."""
        groups = self._views
        qw = self._head_queue(w, None)
        estimates = {}
        pending = sorted(newcomers, key=lambda n: n[0])
        for k, gid in enumerate(order):
            g, due_s = self._queued(groups[gid]), groups[gid].deadline_ms / 1000
            while k >= first and pending and pending[0][0] < due_s:
                n_due_s, n = pending.pop(0)
                if qw.next_wait(n).quantile(self.z) > n_due_s - now_s:
                    return None
            if k >= first:
                e = qw.next_wait(g)
                if k < last and e.quantile(self.z) > due_s - now_s:
                    return None
                estimates[gid] = e
            qw.append(g)
        if any(qw.next_wait(n).quantile(self.z) > n_due_s - now_s for n_due_s, n in pending):
            return None
        return qw, estimates

    # --- eviction --------------------------------------------------------------------------

    def _plan_evictions(self, snapshot: Snapshot, plan: Plan, waits, now_s: float) -> None:
        slo = snapshot.slo_classes
        groups = self._views
        # an eviction names its requests: only where the snapshot knows every id
        heads = sorted(((groups[q[0]], w) for w in snapshot.workers
                        if (q := plan.queues[w.id]) and w.running_requests
                        and all(r.id for r in w.running_requests)),
                       key=lambda h: (h[0].deadline_ms, h[0].sequence))
        left = self.max_evictions
        for g, w in heads:
            budget = g.deadline_ms / 1000 - now_s
            if (left <= 0 or g.queued <= 0 or g.slo_class not in slo or g.model != w.loaded
                    or budget <= self.ready_s(w)
                    or self._late_behind(plan.queues[w.id][1:], groups, now_s)):
                continue
            victims = self._victims(w, g, slo, waits[w.id], now_s)
            if not victims:
                continue
            base = self._in_time(w, w.running_requests, g, budget)
            if base >= g.queued:
                continue  # no request of it is at risk
            victims = victims[:min(left, g.queued - base)]

            def kept(k: int, w=w, victims=victims) -> list[RunningView]:
                gone = {v.id for v in victims[:k]}
                return [r for r in w.running_requests if r.id not in gone]

            most = self._in_time(w, kept(len(victims)), g, budget)
            if most <= base:
                continue  # evicting would save no deadline
            lo, hi = 1, len(victims)  # the fewest evictions that save as many
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if self._in_time(w, kept(mid), g, budget) >= most else (
                    mid + 1, hi)
            plan.evictions[w.id] = [v.id for v in victims[:lo]]
            left -= lo
            # the estimate this plan stands by for the group is the one with the evictions
            estimate = self._head_queue(w, kept(lo)).next_wait(self._one(g))
            self._latest[g.id] = (estimate, now_s)

    def _late_behind(self, gids, groups, now_s) -> bool:
        """Whether the plan already has a group behind the head late. Then the worker is
        overloaded, and what an eviction saves at the head the victims' resumed work costs the
        groups behind it (measured on wa at 2x: -2 points of attainment without this rule)."""
        return any(self._latest[gid][0].quantile(self.z) > groups[gid].deadline_ms / 1000 - now_s
                   for gid in gids)

    def _in_time(self, w: WorkerView, running, g: GroupView, budget: float):
        """How many of g's requests start within `budget` at the head of w's queue with
        `running` (RunningViews) in the batch. Requests of a group start in order, so the first
        late one ends the count."""
        one = self._one(g)
        if g.queued > 1:
            # the common case first, in O(1) estimates: even its last request is in time
            qw = self._head_queue(w, running)
            qw.append(dataclasses.replace(one, queued=g.queued - 1))
            if qw.next_wait(one).quantile(self.z) <= budget:
                return g.queued
        qw = self._head_queue(w, running)
        for n in range(g.queued):
            if qw.next_wait(one).quantile(self.z) > budget:
                return n
            qw.append(one)
        return g.queued

    @staticmethod
    def _one(g: GroupView) -> QueuedGroup:
        """One request of g, of its average size."""
        return QueuedGroup(g.model, g.slo_class, 1, round(g.prompt_tokens / g.queued),
                           g.max_tokens / g.queued if g.max_tokens else None)

    @staticmethod
    def _running(w: WorkerView, running=None) -> list[tuple]:
        """w's batch (or `running`) as the estimator takes it: by request, with the context
        each holds in KV cache where known."""
        return [(r.slo_class, r.generated, r.max_tokens or None, r.context_tokens or None)
                for r in (w.running_requests if running is None else running)]

    def _head_queue(self, w: WorkerView, running):
        """w's empty queue with `running` in its batch (None: the snapshot's). The snapshot's
        is built once a plan and copied: building it reads every running request's remaining
        output (wb at 2x: 2.4 ms, 45,000 times a run, a third of the planner's time)."""
        if running is not None:
            return self._empty_queue(w, self._running(w, running))
        if w.id not in self._empty:
            self._empty[w.id] = self._empty_queue(w, self._running(w))
        return self._empty[w.id].copy()

    def _cold(self, w: WorkerView) -> dict[str, float]:
        """Load times of the models w would load cold."""
        if self.cold_swap_s is None or w.warm is None:
            return {}
        return {m: self.cold_swap_s(w.id, m) for m in w.models
                if m != w.loaded and m not in w.warm}

    def _victims(self, w: WorkerView, g: GroupView, slo, tail, now_s) -> list[RunningView]:
        """Running requests of w that g may pre-empt: of a looser class, with their first token
        out, and whose own objective survives the stall; loosest class first, then the most
        work left (they would hold their slot longest)."""
        tight = slo[g.slo_class].ttft_s
        out = [r for r in w.running_requests
               if r.generated >= 1 and r.slo_class in slo and slo[r.slo_class].ttft_s > tight
               and self._keeps_tpot(w, r, slo[r.slo_class].tpot_s, tail, now_s)]
        return sorted(out, key=lambda r: (
            -slo[r.slo_class].ttft_s,
            -self.lengths.moments(w.loaded, r.slo_class, r.max_tokens or None, r.generated,
                                  self._band(r))[0]))

    def _band(self, r: RunningView) -> int | None:
        """The prompt band of a running request (its context less its output so far)."""
        return self.lengths.band(r.context_tokens - r.generated) if r.context_tokens else None

    def _keeps_tpot(self, w: WorkerView, r: RunningView, tpot_s, tail, now_s) -> bool:
        """Whether r still meets its time per output token if it is evicted now and resumes
        only after everything planned on w (`tail`: that queue's estimator state)."""
        if tpot_s is None:
            return True
        if not r.first_token_ms:
            return False
        tp = self.estimator.throughput
        left = self.lengths.quantile(w.loaded, r.slo_class, self.confidence,
                                     r.max_tokens or None, r.generated, self._band(r))
        stall = tail.next_wait(QueuedGroup(w.loaded, r.slo_class, 1, r.context_tokens))
        finish_s = (now_s - r.first_token_ms / 1000 + stall.quantile(self.z)
                    + r.context_tokens * self.resume_s_per_token(w.id, w.loaded)
                    + left * tp.step_s(w.id, w.loaded, max(len(w.running_requests), 1)))
        return finish_s <= tpot_s * max(r.generated + left - 1, 1)
