"""Scheduling policies (pure Snapshot -> Plan functions) and request group kinds."""

from __future__ import annotations

import copy

import pytest

from qlm.core import policies
from qlm.core.groups import group_kind, prompt_bucket
from qlm.core.plan import GroupView, Plan, Snapshot, WorkerView


def g(gid, model="m", deadline=1000, seq=None, queued=1, cls="interactive", worker=""):
    if seq is None:
        seq = int(gid.lstrip("g"))
    return GroupView(gid, model, cls, deadline, seq, queued, worker)


def w(wid, *models, max_running=4, running=0):
    return WorkerView(wid, tuple(models) or ("m",), max_running, running)


def snap(groups, workers, now=0):
    return Snapshot(now, tuple(groups), tuple(workers))


# --- fcfs ----------------------------------------------------------------------------------


def test_fcfs_serves_in_arrival_order_regardless_of_deadline():
    groups = [g("g3", deadline=10), g("g1", deadline=900), g("g2", deadline=50)]
    plan = policies.fcfs(snap(groups, [w("w0")]))
    assert plan == Plan(queues={"w0": ["g1", "g2", "g3"]}, unplaced=[], policy="fcfs")


def test_fcfs_deals_round_robin_per_model_over_sorted_workers():
    groups = [g("g1"), g("g2", model="n"), g("g3"), g("g4"), g("g5", model="n"), g("g6")]
    workers = [w("wb", "m"), w("wc", "n", "m"), w("wa", "m")]  # order given does not matter
    plan = policies.fcfs(snap(groups, workers))
    # m: wa, wb, wc, wa ...; n has its own turn: wc, wc
    assert plan.queues == {"wb": ["g3"], "wc": ["g2", "g4", "g5"], "wa": ["g1", "g6"]}
    assert plan.unplaced == []


def test_fcfs_leaves_unserved_models_unplaced():
    groups = [g("g1", model="x"), g("g2"), g("g3", model="y"), g("g4", model="x")]
    plan = policies.fcfs(snap(groups, [w("w0"), w("w1", "z")]))
    assert plan.queues == {"w0": ["g2"], "w1": []}
    assert plan.unplaced == ["g1", "g3", "g4"]
    assert policies.fcfs(snap(groups, [])) == Plan(queues={}, unplaced=["g1", "g2", "g3", "g4"],
                                                   policy="fcfs")


def test_fcfs_is_pure_and_deterministic():
    s = snap([g("g2"), g("g1"), g("g3", model="n")], [w("w1"), w("w0", "m", "n")])
    before = copy.deepcopy(s)
    first = policies.fcfs(s)
    assert policies.fcfs(s) == first
    assert s == before
    assert first.queues == {"w0": ["g1", "g3"], "w1": ["g2"]}


# --- edf -----------------------------------------------------------------------------------


def test_edf_orders_by_deadline_then_sequence():
    groups = [g("g1", deadline=500), g("g2", deadline=100), g("g3", deadline=500),
              g("g4", deadline=300), g("g5", deadline=100, seq=0)]
    plan = policies.edf(snap(groups, [w("w0", max_running=1000)]))
    assert plan.queues == {"w0": ["g5", "g2", "g4", "g1", "g3"]}
    assert plan.policy == "edf" and plan.unplaced == []


def test_edf_places_on_least_loaded_counting_running_and_placed():
    # load per unit of capacity: wa 0/4, wb 4/8
    workers = [w("wb", max_running=8, running=4), w("wa", max_running=4)]
    groups = [g("g1", deadline=1, queued=3),  # wa 0 < wb .5 -> wa (3/4 = .75)
              g("g2", deadline=2, queued=1),  # wb .5 < .75 -> wb (5/8 = .625)
              g("g3", deadline=3, queued=2),  # wb .625 < .75 -> wb (7/8 = .875)
              g("g4", deadline=4, queued=1),  # wa .75 < .875 -> wa (4/4 = 1)
              g("g5", deadline=5, queued=1)]  # wb .875 < 1 -> wb
    plan = policies.edf(snap(groups, workers))
    assert plan.queues == {"wb": ["g2", "g3", "g5"], "wa": ["g1", "g4"]}


def test_edf_breaks_load_ties_by_worker_id_and_only_uses_eligible_workers():
    workers = [w("w2", "m"), w("w1", "m"), w("w0", "n"), w("w3", "m", max_running=0)]
    groups = [g("g1", queued=1), g("g2", queued=1), g("g3", model="n", queued=5),
              g("g4", model="q")]
    plan = policies.edf(snap(groups, workers))
    # g1: all m workers at 0 -> w1 (smallest id); g2: w2 and w3 at 0 -> w2
    assert plan.queues == {"w2": ["g2"], "w1": ["g1"], "w0": ["g3"], "w3": []}
    assert plan.unplaced == ["g4"]


def test_edf_treats_zero_max_running_as_one():
    workers = [w("wa", max_running=0, running=1), w("wb", max_running=2, running=1)]
    plan = policies.edf(snap([g("g1", queued=1), g("g2", queued=1)], workers))
    # wa 1/1 vs wb 1/2 -> wb (2/2 = 1); then tie 1 vs 1 -> wa
    assert plan.queues == {"wa": ["g2"], "wb": ["g1"]}


def test_edf_ignores_where_a_group_sits_now():
    workers = [w("wa"), w("wb")]
    plan = policies.edf(snap([g("g1", queued=4, worker="wb"), g("g2", queued=1, worker="wb")],
                             workers))
    assert plan.queues == {"wa": ["g1"], "wb": ["g2"]}


def test_edf_is_pure_and_deterministic():
    s = snap([g("g1", deadline=9, queued=2), g("g2", deadline=3, queued=2)],
             [w("w1", running=1), w("w0", running=1)])
    before = copy.deepcopy(s)
    first = policies.edf(s)
    assert policies.edf(s) == first
    assert s == before
    assert first.queues == {"w1": ["g1"], "w0": ["g2"]}


# --- registry ------------------------------------------------------------------------------


def test_get_returns_known_policies():
    assert policies.get("fcfs") is policies.fcfs
    assert policies.get("edf") is policies.edf


@pytest.mark.parametrize("name", ["", "qlm", "EDF"])
def test_get_refuses_unknown_policy(name):
    with pytest.raises(ValueError, match=r"unknown policy .*known: fcfs, priority, edf"):
        policies.get(name)


def test_priority_needs_class_deadlines_and_serves_tighter_classes_first():
    with pytest.raises(ValueError, match="deadlines"):
        policies.get("priority")
    plan = policies.get("priority", {"batch": 60_000, "interactive": 2_000})(Snapshot(
        now_ms=0,
        groups=(GroupView("g1", "m", "batch", 10, 1, 4), GroupView("g2", "m", "interactive",
                                                                   99, 2, 4),
                GroupView("g3", "m", "batch", 5, 3, 4), GroupView("g4", "m", "interactive",
                                                                  50, 4, 4)),
        workers=(WorkerView("w0", ("m",), 8),),
    ))
    # class first (whatever the deadlines), then arrival order
    assert plan.queues == {"w0": ["g2", "g4", "g1", "g3"]} and plan.policy == "priority"


# --- group kinds ---------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "bucket"), [
    (-5, 6), (0, 6), (1, 6), (63, 6), (64, 7), (127, 7), (128, 8), (255, 8), (256, 9),
    (4095, 12), (4096, 13), (8191, 13), (8192, 14), ((1 << 20) - 1, 20), (1 << 20, 21),
])
def test_prompt_bucket_boundaries(tokens, bucket):
    assert prompt_bucket(tokens) == bucket


def test_group_kind_separates_model_class_and_bucket():
    assert group_kind("small", "interactive", 1) == "small/interactive/6"
    assert group_kind("small", "interactive", 63) == group_kind("small", "interactive", 1)
    assert group_kind("small", "interactive", 64) == "small/interactive/7"
    assert group_kind("small", "batch", 10) != group_kind("small", "interactive", 10)
    assert group_kind("large", "batch", 10) != group_kind("small", "batch", 10)
