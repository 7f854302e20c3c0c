"""CP-SAT on top of the greedy plan: better where the greedy plan is provably not optimal,
never worse, within its time budget, and only ever placing a group where its model runs."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest
from ortools.sat.python import cp_model

from qlm.bench import planner
from qlm.core.cpsat import CpSatRefiner, RefinedPlanGenerator, _Model, _Scorer, score
from qlm.core.estimator import InstanceThroughput
from qlm.core.plan import GroupView, Snapshot, WorkerView
from qlm.core.plan_generator import ExactLengths, PlanGenerator
from qlm.engines.sim import SimProfile
from qlm.v1 import planner_pb2, router_pb2

from .harness import PROFILES, InProcessStack, write_config

# four slots, 10 ms per step: a request of n tokens holds its slot n / 100 seconds
PROFILE = SimProfile(max_running=4, kv_capacity_tokens=1_000_000, prefill_ms_per_token=0.0,
                     decode_step_ms=10.0, decode_ms_per_seq=0.0, load_ms=30_000.0,
                     warm_load_ms=3_000.0)


def generator(workers=("w0",), models=("m",)) -> PlanGenerator:
    tp = InstanceThroughput()
    for w in workers:
        for m in models:
            tp.set_profile(w, m, PROFILE)
    return PlanGenerator(tp, ExactLengths(), swap_s=lambda w: 3.0)


def group(gid, deadline_s, queued, tokens, model="m") -> GroupView:
    return GroupView(id=gid, model=model, slo_class="c", deadline_ms=int(deadline_s * 1000),
                     sequence=int(gid[1:]), queued=queued, max_tokens=queued * tokens)


def idle(wid="w0", models=("m",), loaded="m") -> WorkerView:
    return WorkerView(id=wid, models=models, max_running=4, loaded=loaded)


def placed(plan) -> list[str]:
    return sorted(g for q in plan.queues.values() for g in q)


def long_group_first() -> Snapshot:
    """g1 is long (40 requests of 10 s) and due in 3 s; g2 and g3 are short (4 requests of
    0.1 s) and due in 4 and 5 s. The greedy plan goes by deadline: g1 meets its deadline at
    the head, so it stays there, and the short groups then wait behind 400 s of work and
    miss. Served first, the short groups take 0.2 s and g1 still starts within its 3 s:
    all 48 requests meet their deadlines, so the greedy plan (40 of 48) is not optimal."""
    return Snapshot(now_ms=0, groups=(group("g1", 3.0, 40, 1000), group("g2", 4.0, 4, 10),
                                      group("g3", 5.0, 4, 10)), workers=(idle(),))


def test_finds_the_better_order_the_greedy_plan_misses():
    snap, gen = long_group_first(), generator()
    greedy = gen(snap)
    assert greedy.queues["w0"][0] == "g1"
    assert score(gen, snap, greedy).met == 40
    result = CpSatRefiner(gen, budget_s=None).refine(snap, greedy)
    assert result.status == "OPTIMAL" and result.improved
    assert result.plan.queues["w0"][-1] == "g1"
    assert score(gen, snap, result.plan) == (48, 48, 0)
    # the composed policy returns the refined plan and records its estimates for coverage
    policy = RefinedPlanGenerator(generator())
    plan = policy(snap)
    assert plan.queues["w0"][-1] == "g1" and score(gen, snap, plan).met == 48
    assert policy.generator._latest["g1"][0].mean > 0


def test_the_hint_is_feasible_and_scores_as_the_greedy_plan_does():
    for seed in range(6):
        snap = planner.small_snapshot(seed)
        gen = planner.qlm_policy(len(snap.workers))
        greedy = gen(snap)
        sc = _Scorer(gen, snap)
        model = _Model(CpSatRefiner(gen), sc, greedy.queues, {w: [] for w in greedy.queues})
        for w, q in greedy.queues.items():
            slack = sc.queue(w, q)[3]
            for g in q:  # the linear chance constraint agrees with `score` at the hint
                assert model._chance(g, model.hint[g]) == (slack[g] >= 0), (seed, g)
        solver = cp_model.CpSolver()
        solver.parameters.fix_variables_to_their_hinted_value = True
        assert solver.solve(model.cp) == cp_model.OPTIMAL
        # and the hint is the least the constraints allow along the greedy order: the
        # recurrences (`_after`) and the constraints (`_link`) say the same
        states = [x for state in model.vars.values() for x in state]
        for var, value in model.hints:
            if var not in states:
                model.cp.add(var == value)
        model.cp.minimize(sum(states))
        solver = cp_model.CpSolver()
        assert solver.solve(model.cp) == cp_model.OPTIMAL
        for g, state in model.vars.items():
            assert tuple(solver.value(x) for x in state) == model.hint[g], (seed, g)


def test_never_worse_than_the_greedy_plan_and_better_where_it_can_be():
    improved = 0
    for seed in range(12):
        snap = planner.small_snapshot(seed)
        gen = planner.qlm_policy(len(snap.workers))
        greedy = gen(snap)
        result = CpSatRefiner(gen, budget_s=0.02).refine(snap, greedy)
        before, after = score(gen, snap, greedy), score(gen, snap, result.plan)
        assert after.key >= before.key, seed
        assert placed(result.plan) == placed(greedy)
        assert result.plan.unplaced == greedy.unplaced
        if seed == 8:  # the greedy plan leaves requests behind that CP-SAT can save
            best = CpSatRefiner(gen, budget_s=None).refine(snap, greedy)
            improved = score(gen, snap, best.plan).met - before.met
    assert improved > 0


def test_keeps_the_greedy_plan_when_the_models_own_best_scores_lower():
    # The model is linear and the estimator is not: here CP-SAT's optimum moves groups with
    # long prompts into a queue whose batch they narrow (fewer sequences fit the KV cache),
    # which slows every group of that queue more than the model reckons. `score` sees it,
    # and the greedy plan stays.
    snap = planner.small_snapshot(66)
    gen = planner.qlm_policy(len(snap.workers))
    greedy = gen(snap)
    result = CpSatRefiner(gen, budget_s=None).refine(snap, greedy)
    assert result.status == "OPTIMAL" and result.found.key < result.greedy.key
    assert result.plan.queues == greedy.queues and not result.improved
    assert score(gen, snap, result.plan) == score(gen, snap, greedy)


def test_stays_within_its_budget_on_a_large_fleet_and_places_every_group():
    # 1,000 groups on 64 instances with deadlines most cannot meet: a model CP-SAT cannot
    # finish in the budget (a generous slack: the machine is shared)
    rng = random.Random(3)
    snap = planner.snapshot(1000, 64)
    snap = dataclasses.replace(snap, groups=tuple(
        dataclasses.replace(g, deadline_ms=int(rng.uniform(1, 30) * 1000)) for g in snap.groups))
    gen = planner.qlm_policy(64)
    greedy = gen(snap)
    started = time.perf_counter()
    result = CpSatRefiner(gen, budget_s=0.05).refine(snap, greedy)
    assert time.perf_counter() - started < 10.0
    assert result.solve_s < 3.0  # the 0.05 s budget, with a wide margin for a busy machine
    assert placed(result.plan) == sorted(g.id for g in snap.groups)
    assert score(gen, snap, result.plan).key >= score(gen, snap, greedy).key


def test_groups_only_go_to_workers_that_serve_their_model():
    rng = random.Random(7)
    workers = (idle("w0", ("a",), "a"), idle("w1", ("b",), "b"), idle("w2", ("a", "b"), "b"))
    groups = tuple(group(f"g{i}", rng.uniform(0.5, 20), rng.randint(1, 8),
                         rng.randint(10, 400), model=rng.choice("ab")) for i in range(10))
    snap = Snapshot(now_ms=0, groups=(*groups, group("g99", 5.0, 2, 10, model="zz")),
                    workers=workers)
    gen = generator(("w0", "w1", "w2"), ("a", "b"))
    greedy = gen(snap)
    result = CpSatRefiner(gen, budget_s=None).refine(snap, greedy)
    assert result.status == "OPTIMAL"
    serves = {w.id: w.models for w in workers}
    model = {g.id: g.model for g in snap.groups}
    for w, q in result.plan.queues.items():
        assert all(model[g] in serves[w] for g in q), (w, q)
    assert result.plan.unplaced == ["g99"] and "g99" not in placed(result.plan)
    assert placed(result.plan) == sorted(g.id for g in groups)


def test_a_head_group_that_evicts_keeps_its_place():
    snap, gen = long_group_first(), generator()
    greedy = dataclasses.replace(gen(snap), evictions={"w0": ["r1"]})
    result = CpSatRefiner(gen, budget_s=None).refine(snap, greedy)
    assert result.plan.queues["w0"][0] == "g1"
    assert result.plan.evictions == {"w0": ["r1"]}


async def _drain(call) -> list:
    return [m async for m in call]


async def test_live_planner_installs_the_greedy_plan_then_refines_it(redis_server, tmp_path):
    # one slot per worker, so requests queue and plans have groups left to refine (with room
    # for all of them the workers claim everything before a plan has anything to order)
    profile = tmp_path / "one-slot.yaml"
    profile.write_text((PROFILES / "sim-small.yaml").read_text().replace(
        "max_running: 64", "max_running: 1"))
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"],
                                            "profile": str(profile)},
                                           {"id": "w1", "models": ["small"],
                                            "profile": str(profile)}],
                        planner={"interval_ms": 50, "policy": "qlm-cpsat"})
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        loop = stack.planners[0][0]
        assert isinstance(loop.policy, RefinedPlanGenerator)
        refined_after = []  # the plan in force when CP-SAT starts: the greedy one
        refine = loop.policy.refine

        def spy(snap, plan):
            refined_after.append(loop.last_plan is plan)
            return refine(snap, plan)

        loop.policy.refine = spy
        sampling = router_pb2.SamplingParams(temperature=0.0, ignore_eos=True)
        calls = [stack.router(0).Generate(router_pb2.GenerateRequest(
            model="small", prompt=f"q{i}", max_tokens=4, sampling=sampling, slo_class=cls))
            for i, cls in enumerate(["batch", "interactive"] * 10)]
        done = await asyncio.gather(*map(_drain, calls))
        assert all(sum(len(m.token_ids) for m in messages) == 4 for messages in done)
        plan = await stack.planner().GetPlan(planner_pb2.GetPlanRequest())
        assert plan.policy == "qlm-cpsat" and plan.leader
        assert refined_after and all(refined_after)
        # the groups that queued started after a plan had estimated their wait: the planner
        # reports how those estimates held
        cal, kept = plan.calibration, loop.policy.calibration
        assert plan.HasField("calibration") and cal.waits == kept.count > 0
        assert cal.confidence == pytest.approx(0.95)
        assert 0 <= cal.coverage_pit <= cal.coverage <= 1
        assert cal.coverage == pytest.approx(kept.coverage())
    finally:
        await stack.stop()
