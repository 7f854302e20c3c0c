"""Request eviction: the plan generator pre-empts looser-class running requests when the group at
the head of a queue would miss its deadline; the simulator carries it out (KV swapped out and
back, or recomputed) with TTFT and token counts intact; the live planner's decision reaches a
sim worker over gRPC and the evicted request's stream continues without a gap or a repeat."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import grpc
import pytest

from qlm.core.estimator import InstanceThroughput
from qlm.core.plan import GroupView, RunningView, SloView, Snapshot, WorkerView
from qlm.core.plan_generator import ExactLengths, PlanGenerator
from qlm.engines.base import EngineRequest
from qlm.engines.sim import SimEngine, SimProfile
from qlm.sim.scenarios import InstanceSpec, SimRequest
from qlm.sim.simulator import Simulation
from qlm.v1 import router_pb2

from .harness import InProcessStack, write_config
from .test_mesh import assert_dense, collect, gen

PROFILE = SimProfile(max_running=4, kv_capacity_tokens=100_000, prefill_ms_per_token=0.0,
                     decode_step_ms=10.0, decode_ms_per_seq=0.0, load_ms=5000.0,
                     warm_load_ms=500.0)
SLO = {"interactive": SloView(2.0), "batch": SloView(3600.0), "batch-1h": SloView(7200.0)}


def generator(max_evictions=8, profile=PROFILE, workers=("w0",)) -> PlanGenerator:
    tp = InstanceThroughput()
    for w in workers:
        tp.set_profile(w, "m", profile)
    # told every output length (an oracle), so the tests do not hang on the length prior
    return PlanGenerator(tp, ExactLengths(), max_evictions=max_evictions)


def busy(classes=("batch",) * 4, generated=10, max_tokens=2000) -> WorkerView:
    """A full batch of long requests: the next slot frees in about 20 s."""
    running = tuple(RunningView(f"r{i}", c, generated, max_tokens, 100 + generated, 1.0)
                    for i, c in enumerate(classes))
    return WorkerView(id="w0", models=("m",), max_running=len(classes), running=len(classes),
                      loaded="m", running_requests=running)


def snapshot(worker, deadline_s=2.0, queued=1, slo=SLO) -> Snapshot:
    group = GroupView(id="g1", model="m", slo_class="interactive",
                      deadline_ms=int(deadline_s * 1000), sequence=1, queued=queued,
                      prompt_tokens=10 * queued, max_tokens=20 * queued)
    return Snapshot(now_ms=0, groups=(group,), workers=(worker,), slo_classes=slo)


# --- plan generator -----------------------------------------------------------------------


def test_evicts_as_many_as_the_group_at_risk_needs():
    plan = generator()(snapshot(busy(), queued=2))
    assert plan.queues["w0"] == ["g1"]
    assert len(plan.evictions["w0"]) == 2


def test_loosest_class_goes_first_and_never_a_tighter_or_equal_one():
    worker = busy(("interactive", "batch", "batch-1h", "batch"))
    assert generator()(snapshot(worker)).evictions == {"w0": ["r2"]}
    only_tight = busy(("interactive",) * 4)
    assert generator()(snapshot(only_tight)).evictions == {}


def test_no_eviction_when_nothing_is_at_risk():
    # an hour to spare: the group waits for a slot to free
    assert generator()(snapshot(busy(), deadline_s=3000.0)).evictions == {}
    # a free slot: it starts at once
    free = dataclasses.replace(busy(("batch",) * 3), max_running=4)
    assert generator()(snapshot(free)).evictions == {}


def test_no_eviction_that_would_not_save_the_deadline():
    # due before the step under way ends: too late whatever runs
    late = dataclasses.replace(busy(), ready_in_s=3.0)
    assert generator()(snapshot(late)).evictions == {}
    # nothing has its first token yet: eviction would cost them their TTFT
    fresh = busy(generated=0)
    assert generator()(snapshot(fresh)).evictions == {}
    # a batch whose requests the snapshot does not name: nothing to name in an eviction
    anonymous = dataclasses.replace(busy(), running_requests=tuple(
        dataclasses.replace(r, id="") for r in busy().running_requests))
    assert generator()(snapshot(anonymous)).evictions == {}
    # without SLO classes (or when switched off) the plan evicts nothing
    assert generator()(snapshot(busy(), slo={})).evictions == {}
    assert generator(max_evictions=0)(snapshot(busy())).evictions == {}


def test_no_eviction_on_an_overloaded_worker():
    # g2 behind the head starts at ~18.5 s: due at 25 s it is in time and the head may evict;
    # due at 17 s it is late already, and the victims' resumed work would make it later still
    def plan(g2_due_s):
        g1 = snapshot(busy()).groups[0]
        g2 = GroupView(id="g2", model="m", slo_class="batch", deadline_ms=int(g2_due_s * 1000),
                       sequence=2, queued=4, prompt_tokens=40, max_tokens=400)
        return generator()(Snapshot(now_ms=0, groups=(g1, g2), workers=(busy(),),
                                    slo_classes=SLO))

    assert plan(25.0).queues["w0"] == plan(17.0).queues["w0"] == ["g1", "g2"]
    assert plan(25.0).evictions == {"w0": ["r0"]}
    assert plan(17.0).evictions == {}


def test_keeps_a_victims_time_per_output_token():
    tight_tpot = {**SLO, "batch": SloView(3600.0, tpot_s=0.011)}
    assert generator()(snapshot(busy(), slo=tight_tpot)).evictions == {}
    loose_tpot = {**SLO, "batch": SloView(3600.0, tpot_s=1.0)}
    assert len(generator()(snapshot(busy(), slo=loose_tpot)).evictions["w0"]) == 1


def test_evictions_per_plan_are_capped():
    plan = generator(max_evictions=3)(snapshot(busy(), queued=4))
    assert len(plan.evictions["w0"]) == 3


# --- simulator ------------------------------------------------------------------------------


def req(i, arrival, out, cls="batch", deadline=3600.0, prompt=10) -> SimRequest:
    return SimRequest(id=i, arrival_s=arrival, input_length=prompt, output_length=out,
                      model="m", slo_class=cls, ttft_deadline_s=deadline)


def simulate(requests, policy, kv_swap_ms=None, profile=PROFILE, **kw):
    fleet = [(InstanceSpec("w0", "a100", ("m",)), {"m": profile})]
    return Simulation(requests, fleet, policy, plan_time_s=0, oracle=True,
                      kv_swap_ms={"w0": {"m": kv_swap_ms}} if kv_swap_ms else None, **kw).run()


def head_of_line():
    """Four 20 s batch requests fill the batch; an interactive one (due in 2 s) arrives."""
    return [req(i, 0.0, 2000) for i in range(4)] + [req(9, 1.0005, 20, "interactive", 2.0)]


def met(res) -> int:
    return sum(r.first_token_s - r.spec.arrival_s <= r.spec.ttft_deadline_s
               for r in res.requests)


def test_eviction_lets_the_interactive_request_meet_its_deadline():
    requests = head_of_line()
    without = simulate(requests, generator(max_evictions=0))
    with_ = simulate(requests, generator(), kv_swap_ms=0.001)
    assert without.evictions == 0 and met(without) == 4
    assert with_.evictions == 1 and met(with_) == 5
    by_id = {r.spec.id: r for r in with_.requests}
    interactive = by_id[9]
    # planned at 1.0205 (arrival + debounce), carried out at the end of the step under way
    # (1.03), where the victim's KV (10 prompt + 103 output tokens) is copied out during the
    # next step, which also gives the interactive request its first token
    assert interactive.first_token_s == pytest.approx(1.03 + 0.010 + 113 * 0.001e-3)
    victims = [r for r in with_.requests if r.evicted]
    assert len(victims) == 1 and victims[0].spec.slo_class == "batch"
    before = {r.spec.id: r for r in without.requests}
    for r in with_.requests:
        assert r.finish_s is not None and r.generated == r.spec.output_length
        # TTFT is the first token: an evicted request had its own before
        if r.spec.id != 9:
            assert r.first_token_s == pytest.approx(before[r.spec.id].first_token_s)
    assert victims[0].finish_s > before[victims[0].spec.id].finish_s


def test_resume_swaps_kv_back_or_recomputes():
    profile = SimProfile(**{**PROFILE.__dict__, "prefill_ms_per_token": 0.1})
    requests = [req(i, 0.0, 2000, prompt=3000) for i in range(4)] + [
        req(9, 1.0005, 20, "interactive", 2.0)]
    swapped = simulate(requests, generator(profile=profile), kv_swap_ms=0.001, profile=profile)
    recomputed = simulate(requests, generator(profile=profile), profile=profile)
    assert swapped.evictions == recomputed.evictions == 1

    def victim(res):
        return next(r for r in res.requests if r.evicted)

    # the recompute prefills ~3,100 tokens again (~0.31 s); the swap copies them (~6 ms)
    delay = victim(recomputed).finish_s - victim(swapped).finish_s
    assert 0.25 < delay < 0.35
    assert all(r.generated == r.spec.output_length for r in recomputed.requests)


def test_no_evictions_when_nothing_is_at_risk_in_a_run():
    rng = random.Random(5)
    requests = [req(i, rng.uniform(0, 60), rng.randint(1, 200),
                    *rng.choice([("batch", 3600.0), ("interactive", 20.0)]))
                for i in range(200)]
    res = simulate(requests, generator())
    assert res.evictions == 0 and met(res) == 200


def test_the_cap_holds_in_every_plan():
    sizes = []
    inner = generator(max_evictions=2)

    def policy(snap):
        plan = inner(snap)
        sizes.append(sum(map(len, plan.evictions.values())))
        return plan

    policy.group_started, policy.observe = inner.group_started, inner.observe
    requests = [req(i, 0.0, 2000) for i in range(4)] + [
        req(10 + i, 1.0005, 20, "interactive", 2.0) for i in range(4)]
    res = simulate(requests, policy, kv_swap_ms=0.001)
    assert max(sizes) == 2 and res.evictions == sum(sizes) == 4
    assert inner.calibration.count > 0  # the estimates with evictions are checked too
    assert met(res) == 8
    assert all(r.generated == r.spec.output_length for r in res.requests)


def test_folded_steps_match_single_steps_with_evictions():
    rng = random.Random(11)
    requests = [req(i, rng.uniform(0, 30), rng.randint(1, 400),
                    *rng.choice([("batch", 3600.0), ("interactive", 1.5)]))
                for i in range(150)]
    runs = [simulate(requests, generator(), kv_swap_ms=0.001, fold_steps=fold)
            for fold in (True, False)]
    assert runs[0].evictions == runs[1].evictions > 0
    for a, b in zip(*(r.requests for r in runs), strict=True):
        assert (a.spec.id, a.start_s, a.first_token_s, a.finish_s, a.evicted) == pytest.approx(
            (b.spec.id, b.start_s, b.first_token_s, b.finish_s, b.evicted))


# --- live: planner -> gRPC -> sim worker -------------------------------------------------------


async def test_live_planner_evicts_and_the_request_resumes_whole(redis_server, tmp_path):
    profile = tmp_path / "two-slots.yaml"
    profile.write_text("max_running: 2\nkv_capacity_tokens: 32768\nprefill_ms_per_token: 0\n"
                       "decode_step_ms: 10\ndecode_ms_per_seq: 0\nload_ms: 1000\n"
                       "warm_load_ms: 100\neos_probability: 0\n")
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"],
                                            "profile": str(profile), "time_scale": 1.0}],
                        planner={"policy": "qlm"})
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        router = stack.router()
        batch = [router.Generate(gen(f"long batch job {i}", 400, slo_class="batch"))
                 for i in range(2)]
        firsts = [await call.read() for call in batch]
        rids = [m.request_id for m in firsts]
        await asyncio.sleep(0.3)  # both run and have their first tokens
        # due in 1.5 s; without eviction the slots free in ~4 s
        urgent, tokens = await collect(router.Generate(
            gen("urgent", 10, slo_class="interactive", ttft_deadline_ms=1500)))
        assert len(tokens) == 10 and urgent[-1].finished.slo_met
        outputs = []
        for first, call in zip(firsts, batch, strict=True):
            messages = [first]
            while (m := await call.read()) != grpc.aio.EOF:
                messages.append(m)
            outputs.append(messages)
        infos = [await router.GetRequest(router_pb2.GetRequestRequest(request_id=rid))
                 for rid in rids]
        assert sorted(i.requeues for i in infos) == [0, 1]  # one eviction was enough
        events = await stack.store.client.xrange(stack.store.key("events"))
        assert [e["why"] for _, e in events if e.get("type") == "requeue"] == ["evict"]
        engine = SimEngine(["small"], SimProfile.load(profile), time_scale=0)
        await engine.start()
        try:
            for i, messages in enumerate(outputs):
                assert_dense(messages)
                ids = [t for m in messages for t in m.token_ids]
                expected = [t async for out in engine.generate(EngineRequest(
                    f"x{i}", "small", tuple(f"long batch job {i}".encode()), 400,
                    temperature=0.0, ignore_eos=True)) for t in out.token_ids]
                assert ids == expected  # nothing missing, nothing twice
                assert messages[-1].finished.reason == router_pb2.FINISH_REASON_LENGTH
        finally:
            await engine.stop()
    finally:
        await stack.stop()
