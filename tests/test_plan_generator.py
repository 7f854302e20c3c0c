"""The QLM plan generator on hand-made snapshots: deadlines it can still meet come first,
model affinity, load balancing, and what it learns."""

from __future__ import annotations

import dataclasses
import random

import pytest

from qlm.core import policies
from qlm.core.estimator import InstanceThroughput, WaitEstimate
from qlm.core.plan import GroupView, RunningView, SloView, Snapshot, WorkerView
from qlm.core.plan_generator import ExactLengths, PlanGenerator, _LeastLoaded
from qlm.engines.sim import SimProfile

PROFILE = SimProfile(max_running=4, kv_capacity_tokens=1_000_000, prefill_ms_per_token=0.0,
                     decode_step_ms=10.0, decode_ms_per_seq=0.0, load_ms=30_000.0,
                     warm_load_ms=3_000.0)


def generator(workers=("w0",), models=("m",), oracle=True, swap_s=30.0) -> PlanGenerator:
    tp = InstanceThroughput()
    for w in workers:
        for m in models:
            tp.set_profile(w, m, PROFILE)
    return PlanGenerator(tp, ExactLengths() if oracle else None, swap_s=lambda w: swap_s)


def group(gid, deadline_s, queued=4, tokens=100, model="m", seq=None) -> GroupView:
    return GroupView(id=gid, model=model, slo_class="c", deadline_ms=int(deadline_s * 1000),
                     sequence=seq if seq is not None else int(gid[1:]), queued=queued,
                     max_tokens=queued * tokens)


def busy_worker() -> WorkerView:
    """All 4 slots taken by requests with 500 tokens to go: 5 s until one frees."""
    return WorkerView(id="w0", models=("m",), max_running=4, loaded="m",
                      running_requests=(RunningView("", "c", 0, 500),) * 4)


def worker(wid, models=("m",), loaded="m") -> WorkerView:
    return WorkerView(id=wid, models=models, max_running=4, loaded=loaded)


def test_hopeless_groups_go_last_so_the_rest_still_meet_their_deadlines():
    # the batch is busy for 5 s; g1 (due at 1 s) cannot make it, g2 (due at 6 s) can, but
    # only if it does not wait behind g1's 10 s of work
    busy = busy_worker()
    snap = Snapshot(now_ms=0, groups=(
        group("g1", 1.0, queued=4, tokens=1000),
        group("g2", 6.0, queued=4, tokens=10),
    ), workers=(busy,))
    plan = generator()(snap)
    assert plan.queues["w0"] == ["g2", "g1"]
    assert policies.edf(snap).queues["w0"] == ["g1", "g2"]  # EDF serves the lost cause first


def test_prefers_the_worker_that_needs_no_model_swap():
    snap = Snapshot(now_ms=0, groups=(group("g1", 600.0, model="a"), group("g2", 600.0,
                                                                           model="b")),
                    workers=(worker("w0", ("a", "b"), loaded="b"),
                             worker("w1", ("a", "b"), loaded="a")))
    plan = generator(("w0", "w1"), ("a", "b"))(snap)
    assert plan.queues == {"w0": ["g2"], "w1": ["g1"]}


def test_swaps_to_a_model_where_it_is_held_warm():
    # both need a swap to "b"; w1 holds it in CPU memory (3 s), w0 would load it cold (30 s)
    tp = InstanceThroughput()
    for w in ("w0", "w1"):
        for m in ("a", "b"):
            tp.set_profile(w, m, PROFILE)
    gen = PlanGenerator(tp, ExactLengths(), swap_s=lambda w: 3.0,
                        cold_swap_s=lambda w, m: 30.0)
    snap = Snapshot(now_ms=0, groups=(group("g1", 20.0, model="b"),), workers=(
        dataclasses.replace(worker("w0", ("a", "b"), loaded="a"), warm=()),
        dataclasses.replace(worker("w1", ("a", "b"), loaded="a"), warm=("b",))))
    assert gen(snap).queues == {"w0": [], "w1": ["g1"]}
    unknown = Snapshot(now_ms=0, groups=snap.groups, workers=tuple(
        dataclasses.replace(w, warm=None) for w in snap.workers))
    assert gen(unknown).queues == {"w0": ["g1"], "w1": []}  # a tie: every swap priced warm


def test_the_plan_warms_the_first_model_a_queue_will_swap_to():
    # w0 serves "a" and has "a" then "b" then "c" queued: "b" is loaded into CPU memory ahead
    # of its swap ("c" waits for a later plan: a host holds few models); w1 holds "b" warm
    # already, and nothing is warmed where the snapshot does not say what is warm
    gen = generator(("w0", "w1", "w2"), ("a", "b", "c"))
    groups = (group("g1", 600.0, model="a"), group("g2", 700.0, model="b"),
              group("g3", 800.0, model="c"))
    w0 = dataclasses.replace(worker("w0", ("a", "b", "c"), loaded="a"), warm=())
    plan = gen(Snapshot(now_ms=0, groups=groups, workers=(w0,)))
    assert plan.queues["w0"] == ["g1", "g2", "g3"]
    assert plan.warm_starts == {"w0": ["b"]}
    w1 = dataclasses.replace(w0, id="w1", warm=("b",))
    assert gen(Snapshot(now_ms=0, groups=groups, workers=(w1,))).warm_starts == {"w1": ["c"]}
    w2 = dataclasses.replace(w0, id="w2", warm=None)
    assert gen(Snapshot(now_ms=0, groups=groups, workers=(w2,))).warm_starts == {}


def test_work_starts_no_sooner_than_the_plan_is_in_force():
    # the batch's steps are 10 ms; the plan takes effect after its compute time, so a group
    # placed on a busy worker starts at the first step end after that, and on an idle one then
    gen = generator(("w0", "w1"))
    busy = dataclasses.replace(busy_worker(), ready_in_s=0.004)
    idle = worker("w1")
    assert gen.ready_s(busy) == 0.004 and gen.ready_s(idle) == 0.0  # no plan made yet
    gen._compute_s.append(0.025)
    assert gen.ready_s(busy) == pytest.approx(0.034)  # 4 ms, then three 10 ms steps
    assert gen.ready_s(idle) == pytest.approx(0.025)
    snap = Snapshot(now_ms=0, groups=(group("g1", 600.0),), workers=(busy,))
    gen(snap)  # a real plan's compute time replaces nothing: the longest of the last few counts
    assert gen.ready_s(busy) == pytest.approx(0.034)
    # told a fixed compute time (a reproducible simulation), it counts on that, not the clock
    fixed = generator(("w0", "w1"))
    fixed.fixed_compute_s = 0.045
    fixed(snap)
    assert fixed.ready_s(idle) == 0.045 and fixed.ready_s(busy) == pytest.approx(0.054)


def test_a_worker_with_room_takes_pending_work_at_its_step_end_before_the_plan():
    # plans take 25 ms; w0 runs 2 of its 4 slots and its step ends in 4 ms, w1 is full. The
    # pending groups (in no virtual queue) are taken from the pending pool in deadline
    # order: g1 at w0's step end, as sure; g2 finds no slot left there and waits for the plan
    gen = generator(("w0", "w1"))
    gen.fixed_compute_s = 0.025
    roomy = dataclasses.replace(worker("w0"), ready_in_s=0.004,
                                running_requests=(RunningView("", "c", 0, 500),) * 2)
    full = dataclasses.replace(busy_worker(), id="w1", ready_in_s=0.004)
    snap = Snapshot(now_ms=0, groups=(group("g1", 600.0, queued=2), group("g2", 601.0, queued=2)),
                    workers=(roomy, full))
    gen(snap)  # the first plan: none made before, so it is in force at once
    gen(snap)
    assert gen.ready_s(roomy) == pytest.approx(0.034)  # where the plan starts work on w0
    gen.group_started("g1", 0.004)
    # estimated sure at 4 ms and started then: counted as the confidence (randomized PIT)
    assert (gen.calibration.count, gen.calibration.coverage()) == (1, 1.0)
    assert gen.calibration.coverage_pit() == pytest.approx(0.95)
    gen.group_started("g2", 0.004)  # earlier than its estimate: a plain hit
    assert gen.calibration.coverage_pit() == pytest.approx((0.95 + 1) / 2)


def test_new_work_waits_for_the_prompts_a_chunked_prefill_still_owes():
    # steps of 10 ms hold 104 tokens: 100 of prompt beside the 4 decodes at 1 ms a token, so a
    # step that prefills a chunk takes 110 ms. With 350 owed, new work is admitted at the first
    # step end with under 100 left: after three chunk steps
    chunked = dataclasses.replace(PROFILE, prefill_ms_per_token=1.0, max_batched_tokens=104)
    tp = InstanceThroughput()
    tp.set_profile("w0", "m", chunked)
    gen = PlanGenerator(tp, ExactLengths())
    owing = dataclasses.replace(busy_worker(), ready_in_s=0.004, prefill_tokens=350)
    assert gen.ready_s(owing) == pytest.approx(0.004 + 3 * 0.110)
    less = dataclasses.replace(owing, prefill_tokens=99)
    assert gen.ready_s(less) == 0.004
    # a plan in force only after 200 ms: the steps until then prefill the rest (99 ms), then
    # decode (10 ms each)
    gen._compute_s.append(0.2)
    assert gen.ready_s(less) == pytest.approx(0.004 + 0.109 + 9 * 0.010)
    # prefilled whole, nothing is owed beyond the step under way
    assert generator().ready_s(owing) == 0.004


def test_spreads_equal_groups_over_workers():
    snap = Snapshot(now_ms=0, groups=tuple(group(f"g{i}", 100.0) for i in range(1, 9)),
                    workers=(worker("w0"), worker("w1")))
    plan = generator(("w0", "w1"))(snap)
    assert sorted(map(len, plan.queues.values())) == [4, 4]


@pytest.mark.parametrize("n", [2, 12])  # 12: more workers than the plan tries per group
def test_spreads_equal_groups_over_workers_of_any_fleet(n):
    ids = [f"w{i}" for i in range(n)]
    workers = [worker(w) for w in ids[:-1]] + [worker(ids[-1], models=("m", "x"), loaded="x")]
    snap = Snapshot(now_ms=0, groups=tuple(group(f"g{i}", 100.0) for i in range(1, 2 * n + 1)),
                    workers=tuple(workers))
    plan = generator(ids, models=("m", "x"))(snap)
    # evenly, but none for the one that would have to swap: it is a swap behind the others
    loads = [len(plan.queues[w]) for w in ids[:-1]]
    assert sum(loads) == 2 * n and max(loads) - min(loads) <= 1
    assert plan.queues[ids[-1]] == []


def test_least_loaded_tracks_every_update_like_a_full_scan():
    rng = random.Random(0)
    models = ("a", "b", "c")
    workers = [WorkerView(id=f"w{i:02}", models=tuple(rng.sample(models, rng.randint(1, 3))),
                          max_running=4, loaded=None) for i in range(24)]
    for i, w in enumerate(workers):
        workers[i] = dataclasses.replace(w, loaded=rng.choice(w.models))
    load = {w.id: float(rng.randint(0, 5)) for w in workers}  # ties: the id breaks them
    least = _LeastLoaded(workers, load.__getitem__, k=3)
    tail = {w.id: w.loaded for w in workers}
    for _ in range(300):
        w = rng.choice(workers)
        load[w.id] += rng.choice((0.0, 0.5, 2.0))
        tail[w.id] = rng.choice(w.models)
        least.update(w.id, tail[w.id])
        for m in models:
            serving = sorted((load[v.id], v.id) for v in workers if m in v.models)
            expected = [wid for _, wid in serving[:3]]
            expected += [wid for _, wid in [e for e in serving if tail[e[1]] == m][:3]
                         if wid not in expected]
            assert least.least(m) == expected


def test_a_swap_is_never_chosen_over_a_worker_of_the_model_that_meets_the_deadline():
    # 12 workers: more than the plan tries per group, so candidates are pruned
    ids = [f"w{i}" for i in range(12)]
    workers = [worker(w, models=("m", "x"), loaded="x" if i % 2 else "m")
               for i, w in enumerate(ids)]
    groups = tuple(group(f"g{i}", 500.0, model="m" if i % 3 else "x") for i in range(1, 40))
    plan = generator(ids, models=("m", "x"))(Snapshot(now_ms=0, groups=groups,
                                                      workers=tuple(workers)))
    loaded = {w.id: w.loaded for w in workers}
    model = {g.id: g.model for g in groups}
    for wid, queue in plan.queues.items():
        # every queue serves its loaded model only: no group needed a swap to be on time
        assert {model[g] for g in queue} <= {loaded[wid]}, (wid, queue)
    assert sum(map(len, plan.queues.values())) == len(groups)


@pytest.mark.parametrize("y_deadline_s, moves", [(40.0, True), (30.5, False)])
def test_loose_work_of_a_model_moves_to_the_worker_serving_it(y_deadline_s, moves):
    # w0 serves m and has room; w1 runs x, busy for 3 s. Deadline order puts y behind m's
    # small group on w0 (a swap either way, w0 is free sooner), so the loose m group finds
    # no m tail and goes by load to w1, behind a swap
    models = ("m", "x", "y")
    workers = (WorkerView(id="w0", models=models, max_running=4, loaded="m"),
               WorkerView(id="w1", models=models, max_running=4, loaded="x",
                          running_requests=(RunningView("", "c", 0, 300),) * 4))
    groups = (group("g1", 20.0, queued=1, tokens=10, model="m"),
              group("g2", y_deadline_s, queued=4, tokens=100, model="y"),
              group("g3", 1000.0, queued=4, tokens=100, model="m"))
    snap = Snapshot(now_ms=0, groups=groups, workers=workers)
    unmerged = generator(("w0", "w1"), models=models)
    unmerged.max_merges = 0
    assert unmerged(snap).queues == {"w0": ["g1", "g2"], "w1": ["g3"]}
    unpulled = generator(("w0", "w1"), models=models)
    unpulled.pull_elsewhere = False
    assert unpulled(snap).queues == unmerged(snap).queues
    plan = generator(("w0", "w1"), models=models)(snap)  # pulls by default
    if moves:  # w0 serves it now, and y's group still has room for the second of work
        assert plan.queues == {"w0": ["g1", "g3", "g2"], "w1": []}
    else:  # 30.5 s: g2 starts after the 30 s swap on time only if nothing goes before it
        assert plan.queues == {"w0": ["g1", "g2"], "w1": ["g3"]}


@pytest.mark.parametrize("head_deadline_s, chunks, moves", [
    (10.0, 0, False), (30.0, 0, True), (10.0, 104, True)])
def test_work_moved_in_leaves_the_head_time_to_prefill_its_prompts(head_deadline_s, chunks,
                                                                    moves):
    # as above, with 1 ms of prefill per prompt token: the loose m group's 16,000 tokens
    # take 16 s, prefilled in the step that starts g1, so g1 (at once) would see its first
    # token only then. An engine that prefills in chunks (max_batched_tokens) does g1's
    # prompt first, whatever comes in behind it
    profile = dataclasses.replace(PROFILE, prefill_ms_per_token=1.0, max_batched_tokens=chunks)
    models = ("m", "x", "y")
    tp = InstanceThroughput()
    for w in ("w0", "w1"):
        for m in models:
            tp.set_profile(w, m, profile)
    workers = (WorkerView(id="w0", models=models, max_running=4, loaded="m"),
               WorkerView(id="w1", models=models, max_running=4, loaded="x",
                          running_requests=(RunningView("", "c", 0, 300),) * 4))
    groups = (group("g1", head_deadline_s, queued=1, tokens=10, model="m"),
              group("g2", 60.0, queued=4, tokens=100, model="y"),
              dataclasses.replace(group("g3", 1000.0, queued=4, tokens=100, model="m"),
                                  prompt_tokens=16_000))
    plan = PlanGenerator(tp, ExactLengths(), swap_s=lambda w: 30.0, pull_elsewhere=True)(
        Snapshot(now_ms=0, groups=groups, workers=workers))
    assert ("g3" in plan.queues["w0"]) is moves
    assert plan.queues["w0"][:1] == ["g1"]


def test_groups_of_a_model_nobody_serves_stay_unplaced():
    snap = Snapshot(now_ms=0, groups=(group("g1", 10.0, model="zz"),), workers=(worker("w0"),))
    plan = generator()(snap)
    assert plan.unplaced == ["g1"] and plan.queues == {"w0": []}


def test_learns_lengths_and_checks_its_estimates():
    gen = generator(oracle=False)
    for _ in range(200):
        gen.observe("m", "c", 50)
    assert 50 < gen.lengths.mean("m", "c") < 80  # from the prior's 256 most of the way
    snap = Snapshot(now_ms=1000, groups=(group("g1", 100.0),), workers=(worker("w0"),))
    gen(snap)
    gen.group_started("g1", 1.0)
    gen.group_started("g1", 5.0)  # only its first start counts
    assert gen.calibration.count == 1 and gen.calibration.coverage() == 1.0


def test_late_group_is_not_set_aside_when_nothing_after_it_is_tight():
    # the same late g1 as above, but what follows it has an hour to spare: serving g1 first
    # costs no deadline, setting it aside would only make it later
    busy = busy_worker()
    snap = Snapshot(now_ms=0, groups=(
        group("g1", 1.0, queued=4, tokens=1000),
        group("g2", 3600.0, queued=4, tokens=10),
    ), workers=(busy,))
    assert generator()(snap).queues["w0"] == ["g1", "g2"]


def test_plan_says_how_long_a_new_request_would_wait():
    gen = generator(("w0", "w1"))
    idle = gen(Snapshot(now_ms=0, groups=(), workers=(worker("w0"), worker("w1"))))
    assert idle.admission_s == {"m": 0.0}
    busy = gen(Snapshot(now_ms=0, groups=tuple(group(f"g{i}", 600.0, tokens=500)
                                               for i in range(1, 5)),
                        workers=(busy_worker(), worker("w1"))))
    # 4 groups of 4 x 500 tokens on 4 + 4 slots, plus w0's running batch: a new request waits
    assert busy.admission_s["m"] > 4.0
    assert policies.edf(Snapshot(now_ms=0, groups=(), workers=(worker("w0"),))).admission_s == {}


def test_admission_per_class_counts_only_the_groups_due_before_the_class_deadline():
    gen = generator()
    gen.slo_deadlines_s = {"interactive": 20.0, "batch": 600.0}
    now = 1000.0

    def due(gid, cls, in_s, queued=4, tokens=500):
        return GroupView(id=gid, model="m", slo_class=cls, deadline_ms=int((now + in_s) * 1000),
                         sequence=int(gid[1:]), queued=queued, max_tokens=queued * tokens)

    # a minute of batch backlog (12 groups x 4 x 500 tokens on 4 slots at 10 ms a step = 60 s)
    # and one interactive group due in 10 s, ahead of it
    backlog = tuple(due(f"g{i}", "batch", 300.0 + i) for i in range(1, 13))
    plan = gen(Snapshot(now_ms=now * 1000, groups=(due("g0", "interactive", 10.0), *backlog),
                        workers=(worker("w0"),)))
    by_class = plan.admission_by_class_s["m"]
    # an interactive request goes behind g0 only (at most 5 s), a batch one behind everything
    assert 0.0 < by_class["interactive"] <= 5.0
    assert 60.0 < by_class["batch"] <= plan.admission_s["m"]

    # a late group is set aside behind everything that can meet its deadline; a new request of
    # a class that can is placed ahead of it
    lost = due("g99", "interactive", -5.0, queued=32, tokens=2000)
    plan = gen(Snapshot(now_ms=now * 1000, groups=(lost, due("g1", "interactive", 15.0)),
                        workers=(worker("w0"),)))
    assert plan.queues["w0"] == ["g1", "g99"]
    assert plan.admission_by_class_s["m"]["interactive"] <= 5.0
    assert plan.admission_by_class_s["m"]["batch"] <= 5.0
    assert plan.admission_s["m"] > 100.0  # the model's: behind everything planned


def test_admission_per_class_defaults_to_the_snapshot_classes():
    snap = Snapshot(now_ms=0, groups=(), workers=(worker("w0"),),
                    slo_classes={"interactive": SloView(20.0), "batch": SloView(60.0)})
    assert generator()(snap).admission_by_class_s == {"m": {"interactive": 0.0, "batch": 0.0}}


def merge_snapshot(g2_due_s=700.0, tight_s=600.0, head=True, g2_class="c") -> Snapshot:
    """w0 serves "a" (groups of 4 x 100 tokens: 1 s each; a swap takes 30 s). Deadline order
    gives a, b, a: g3, due in an hour, would need a swap back to "a" of its own."""
    g2 = dataclasses.replace(group("g2", g2_due_s, model="b"), slo_class=g2_class)
    groups = (group("g1", 20.0, model="a"), g2, group("g3", 3600.0, model="a"))
    return Snapshot(now_ms=0, groups=groups if head else groups[1:],
                    workers=(worker("w0", ("a", "b"), loaded="a"),),
                    slo_classes={"c": SloView(3600.0), "tight": SloView(tight_s)})


def test_a_later_group_of_the_model_being_served_joins_its_segment():
    gen = generator(models=("a", "b"))
    assert gen(merge_snapshot()).queues["w0"] == ["g1", "g3", "g2"]  # one swap, not two
    # the estimate the plan stands by for the group passed counts the work put before it
    assert gen._latest["g2"][0].mean == pytest.approx(32.0, abs=0.1)
    gen.max_merges = 0
    assert gen(merge_snapshot()).queues["w0"] == ["g1", "g2", "g3"]


def test_a_group_joins_the_segment_only_if_those_it_passes_keep_their_deadlines():
    # g2 starts at 31 s behind g1 and the swap; g3's second of work first would make it late
    gen = generator(models=("a", "b"))
    assert gen(merge_snapshot(g2_due_s=31.5)).queues["w0"] == ["g1", "g2", "g3"]
    assert gen(merge_snapshot(g2_due_s=32.5)).queues["w0"] == ["g1", "g3", "g2"]


def test_no_group_joins_the_segment_while_tight_work_arriving_now_would_be_late():
    # a request of the 30.5 s class arriving now for "b" would start at 31 s: w0 has no room
    # for tight work, so nothing is moved ahead of what it will have to serve
    gen = generator(models=("a", "b"))
    assert gen(merge_snapshot(tight_s=30.5)).queues["w0"] == ["g1", "g2", "g3"]
    assert gen(merge_snapshot(tight_s=31.5)).queues["w0"] == ["g1", "g3", "g2"]
    # unless another worker has room for it: w1 serves "b" 100 times slower and has an hour
    # of it queued (g5) behind which g2 would be late, but a request arriving now would go
    # before g5 and start at once
    tp = InstanceThroughput()
    for m in ("a", "b"):
        tp.set_profile("w0", m, PROFILE)
    tp.set_profile("w1", "b", dataclasses.replace(PROFILE, decode_step_ms=1000.0))
    gen = PlanGenerator(tp, ExactLengths(), swap_s=lambda w: 30.0)
    snap = merge_snapshot(tight_s=30.5)
    snap = dataclasses.replace(
        snap, groups=(*snap.groups, group("g5", 100.0, tokens=4000, model="b")),
        workers=(*snap.workers, worker("w1", ("b",), loaded="b")))
    assert gen(snap).queues == {"w0": ["g1", "g3", "g2"], "w1": ["g5"]}
    gen.max_merges = 0
    assert gen(snap).queues == {"w0": ["g1", "g2", "g3"], "w1": ["g5"]}


def test_only_work_as_tight_as_any_queued_goes_in_front_of_a_swap():
    # the head of w0's queue needs a swap already: work put before it lengthens the drain
    # before the swap, which a group of the same class may do, but not a looser one
    gen = generator(models=("a", "b"))
    assert gen(merge_snapshot(head=False)).queues["w0"] == ["g3", "g2"]
    assert gen(merge_snapshot(head=False, g2_class="tight")).queues["w0"] == ["g2", "g3"]


def test_a_plan_reads_its_waits_through_the_spread_its_past_errors_call_for():
    # the last 100 uncertain waits took at most 60 % of the room their 95 % quantile left
    gen = generator(oracle=False)
    past = WaitEstimate(mean=10.0, std=4.0)
    room = past.quantile(gen.z)
    for i in range(100):
        gen.calibration.record(past, 0.6 * room * (i + 1) / 100)
    snap = Snapshot(now_ms=0, groups=(group("g1", 600.0), group("g2", 600.0)),
                    workers=(busy_worker(),))
    gen(snap)
    assert gen._latest["g2"][0].spread == pytest.approx(0.57, abs=0.01)
    gen.recalibrate = False
    gen(snap)
    assert gen._latest["g2"][0].spread == 1.0


def test_groups_lost_anyway_go_where_they_are_comparatively_cheapest():
    # "fast" prefills 2.5x and decodes 8x as fast as "slow". g1's and g2's deadlines are long
    # past; g3 is due in half a second (one request, one token) and goes first, to slow.
    # "Prompty" g1 (1,000-token prompts, 10 tokens out) costs slow a smaller share of its time
    # than an average late request does, "talky" g2 (10 in, 500 out) a larger one: g1 goes to
    # slow and g2 to fast. The queues' starts alone give g1 to fast (idle), then g2 to slow.
    tp = InstanceThroughput()
    tp.set_profile("fast", "m", dataclasses.replace(PROFILE, prefill_ms_per_token=0.1))
    tp.set_profile("slow", "m", dataclasses.replace(PROFILE, prefill_ms_per_token=0.25,
                                                    decode_step_ms=80.0))
    gen = PlanGenerator(tp, ExactLengths())
    prompty = dataclasses.replace(group("g1", 1.0, tokens=10), prompt_tokens=4000)
    talky = dataclasses.replace(group("g2", 1.001, tokens=500), prompt_tokens=40)
    soon = dataclasses.replace(group("g3", 100.5, queued=1, tokens=1), prompt_tokens=1)
    snap = Snapshot(now_ms=100_000, groups=(prompty, talky, soon),
                    workers=(worker("slow"), worker("fast")))
    assert gen(snap).queues == {"slow": ["g3", "g1"], "fast": ["g2"]}
    gen.comparative_s = 0.0
    assert gen(snap).queues == {"slow": ["g3", "g2"], "fast": ["g1"]}
