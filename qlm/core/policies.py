"""Scheduling policies: pure functions from a Snapshot of the fleet to a Plan.

`fcfs` is what vLLM does out of the box (first come first served per instance, requests spread
round-robin); `priority` is vLLM's priority scheduling by SLO class; `edf` orders by deadline
and balances queued work. The QLM policy (estimator and
plan generator) builds on the same signature.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .plan import GroupView, Plan, Snapshot, WorkerView

Policy = Callable[[Snapshot], Plan]


def _eligible(snapshot: Snapshot) -> dict[str, list[WorkerView]]:
    by_model: dict[str, list[WorkerView]] = {}
    for w in sorted(snapshot.workers, key=lambda w: w.id):
        for m in w.models:
            by_model.setdefault(m, []).append(w)
    return by_model


def _place(snapshot: Snapshot, ordered: list[GroupView], pick, name: str) -> Plan:
    plan = Plan(queues={w.id: [] for w in snapshot.workers}, policy=name)
    by_model = _eligible(snapshot)
    for g in ordered:
        candidates = by_model.get(g.model)
        if not candidates:
            plan.unplaced.append(g.id)
            continue
        plan.queues[pick(g, candidates)].append(g.id)
    return plan


def _round_robin():
    """A placement that deals each model's groups to its workers in turn."""
    turn: dict[str, int] = {}

    def pick(g: GroupView, candidates: list[WorkerView]) -> str:
        i = turn.get(g.model, 0)
        turn[g.model] = i + 1
        return candidates[i % len(candidates)].id

    return pick


def fcfs(snapshot: Snapshot) -> Plan:
    """Arrival order; groups dealt to the model's workers in turn."""
    ordered = sorted(snapshot.groups, key=lambda g: g.sequence)
    return _place(snapshot, ordered, _round_robin(), "fcfs")


def edf(snapshot: Snapshot) -> Plan:
    """Earliest deadline first; each group goes to the worker with the least work ahead of it
    (running plus already placed queued requests, per unit of batch capacity)."""
    load = {w.id: w.running for w in snapshot.workers}
    capacity = {w.id: max(w.max_running, 1) for w in snapshot.workers}
    # per model, (load / capacity, worker id) with lazy deletion: O(log W) per group
    heaps: dict[str, list[tuple[float, str]]] = {}
    for w in snapshot.workers:
        for m in w.models:
            heaps.setdefault(m, []).append((load[w.id] / capacity[w.id], w.id))
    for h in heaps.values():
        heapq.heapify(h)
    serves = {w.id: w.models for w in snapshot.workers}

    def least_loaded(g: GroupView, candidates: list[WorkerView]) -> str:
        heap = heaps[g.model]
        while True:
            share, wid = heapq.heappop(heap)
            if share == load[wid] / capacity[wid]:
                break  # not stale
        load[wid] += g.queued
        for m in serves[wid]:
            heapq.heappush(heaps[m], (load[wid] / capacity[wid], wid))
        return wid

    ordered = sorted(snapshot.groups, key=lambda g: (g.deadline_ms, g.sequence))
    return _place(snapshot, ordered, least_loaded, "edf")


def priority(class_deadlines: dict[str, float]) -> Policy:
    """vLLM's priority scheduling by class: tighter classes first, arrival order within a
    class, groups dealt to the model's workers in turn (no deadlines, no load estimate)."""
    rank = {c: i for i, c in enumerate(sorted(class_deadlines, key=class_deadlines.get))}

    def plan(snapshot: Snapshot) -> Plan:
        ordered = sorted(snapshot.groups,
                         key=lambda g: (rank.get(g.slo_class, len(rank)), g.sequence))
        return _place(snapshot, ordered, _round_robin(), "priority")

    return plan


POLICIES: dict[str, Policy] = {"fcfs": fcfs, "edf": edf}
NAMES = ("fcfs", "priority", "edf")


def get(name: str, class_deadlines: dict[str, float] | None = None) -> Policy:
    """The policy called `name`; `priority` needs the SLO classes' TTFT deadlines."""
    if name == "priority":
        if not class_deadlines:
            raise ValueError("the priority policy needs the SLO classes' deadlines")
        return priority(class_deadlines)
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(NAMES)}") from None
