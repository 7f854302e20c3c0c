"""TPOT in the plan (qlm/core/tpot.py): the step limit read off the cost model, only where
TPOT-bound work runs, and honoured by the simulator, where it keeps a TPOT that a long
prompt's prefill would otherwise break."""

from __future__ import annotations

import pytest

from qlm.core.estimator import InstanceThroughput
from qlm.core.plan import GroupView, RunningView, SloView, Snapshot, StepLimit, WorkerView
from qlm.core.plan_generator import PlanGenerator
from qlm.core.tpot import CappedThroughput, step_limit, step_limits
from qlm.engines.sim import SimProfile
from qlm.sim.scenarios import InstanceSpec, SimRequest
from qlm.sim.simulator import Simulation

# deploy/profiles/gpu/a100-llama-7b.yaml
A100 = SimProfile(max_running=115, kv_capacity_tokens=118672, prefill_ms_per_token=0.072,
                  decode_step_ms=11.5, decode_ms_per_seq=0.392, load_ms=29000,
                  warm_load_ms=1030)


def throughput(profile=A100, workers=("w0",), model="m") -> InstanceThroughput:
    tp = InstanceThroughput()
    for w in workers:
        tp.set_profile(w, model, profile)
    return tp


def test_limit_keeps_full_batch_and_fits_prefill_beside_it():
    # 100 ms - (11.5 + 0.392 * 115) ms = 43.42 ms of room, at 0.072 ms per prompt token
    assert step_limit(throughput(), "w0", "m", 0.1) == StepLimit(115, 603)


def test_limit_cuts_the_batch_when_a_full_one_leaves_no_room():
    # 50 ms: a full batch alone takes 56.6 ms. The batch that leaves 128 tokens (9.216 ms):
    # floor((50 - 11.5 - 9.216) / 0.392) = 74, and beside 74: (50 - 40.508) / 0.072 = 131
    assert step_limit(throughput(), "w0", "m", 0.05) == StepLimit(74, 131)


def snapshot(classes, groups=(), running=(), models=("m",)):
    return Snapshot(
        now_ms=0.0,
        groups=tuple(GroupView(f"g{i}", m, c, 60_000, i, 4, prompt_tokens=400)
                     for i, (m, c) in enumerate(groups)),
        workers=(WorkerView("w0", models, 115, len(running), loaded=models[0],
                            running_requests=tuple(RunningView("", c, 5) for c in running)),),
        slo_classes=classes)


CLASSES = {"batch": SloView(60.0), "chat": SloView(2.0, 0.1), "voice": SloView(1.0, 0.05)}


def test_no_limit_without_tpot_bound_work():
    tp = throughput()
    assert step_limits(snapshot(CLASSES, groups=[("m", "batch")], running=["batch"]), tp) == {}
    # TPOT-bound work of a model this worker does not serve sets no limit on it
    assert step_limits(snapshot(CLASSES, groups=[("other", "chat")]), tp) == {}
    gen = PlanGenerator(tp, tpot_limits=True)
    assert gen(snapshot(CLASSES, groups=[("m", "batch")])).step_limits == {}


def test_limit_follows_the_tightest_tpot_running_or_queued():
    tp = throughput()
    assert step_limits(snapshot(CLASSES, running=["chat"]), tp) == {
        "w0": step_limit(tp, "w0", "m", 0.1)}
    assert step_limits(snapshot(CLASSES, groups=[("m", "voice")], running=["chat"]), tp) == {
        "w0": StepLimit(74, 131)}
    plan = PlanGenerator(tp, tpot_limits=True)(snapshot(CLASSES, groups=[("m", "chat")]))
    assert plan.step_limits == {"w0": StepLimit(115, 603)}
    assert PlanGenerator(tp)(snapshot(CLASSES, groups=[("m", "chat")])).step_limits == {}


def test_capped_throughput_charges_prefill_at_the_chunked_rate():
    tp = throughput()
    capped = CappedThroughput(tp, {"w0": StepLimit(74, 131)})
    assert capped.batch("w0", "m") == 74
    # a step of 131 prompt tokens beside 74 sequences lasts 50 ms (to the token)
    step = (11.5 + 0.392 * 74 + 131 * 0.072) / 1000
    assert capped.prefill_s_per_token("w0", "m") == pytest.approx(step / 131)
    assert CappedThroughput(tp, {}).prefill_s_per_token("w0", "m") == tp.prefill_s_per_token(
        "w0", "m")


# --- simulator ---------------------------------------------------------------------------

SMALL = SimProfile(max_running=8, kv_capacity_tokens=100_000, prefill_ms_per_token=0.2,
                   decode_step_ms=30.0, decode_ms_per_seq=1.0, load_ms=1000,
                   warm_load_ms=100)


def tpot_of(limits: bool):
    # a chat request starts alone; 0.1 s later a batch request with a 4,000-token prompt
    # arrives: prefilled in one step it stalls the chat's decodes for 0.8 s
    chat = SimRequest(0, 0.0, 50, 12, "m", "chat", 2.0, tpot_deadline_s=0.1)
    batch = SimRequest(1, 0.1, 4000, 5, "m", "batch", 60.0)
    gen = PlanGenerator(throughput(SMALL, ("i0",)), tpot_limits=limits)
    result = Simulation([chat, batch], [(InstanceSpec("i0", "a100", ("m",)), {"m": SMALL})],
                        gen, plan_time_s=0).run()
    r = result.requests[0]
    assert r.finish_s is not None and result.requests[1].finish_s is not None
    return (r.finish_s - r.first_token_s) / (r.spec.output_length - 1)


def test_tpot_bound_request_meets_its_tpot_with_the_limit_and_misses_it_without():
    assert tpot_of(limits=False) > 0.1
    assert tpot_of(limits=True) <= 0.1


def test_chunked_prefill_delays_the_first_token_not_the_work():
    # under a limit (set once the chat runs) a long prompt is prefilled in chunks: its first
    # token comes only once all of it is in, and it still produces all its output
    chat = SimRequest(0, 0.0, 50, 40, "m", "chat", 2.0, tpot_deadline_s=0.1)
    long = SimRequest(1, 0.1, 1000, 3, "m", "batch", 60.0)
    gen = PlanGenerator(throughput(SMALL, ("i0",)), tpot_limits=True)
    sim = Simulation([chat, long], [(InstanceSpec("i0", "a100", ("m",)), {"m": SMALL})], gen,
                     plan_time_s=0)
    r = sim.run().requests[1]
    limit = step_limit(throughput(SMALL, ("i0",)), "i0", "m", 0.1)
    chunks = -(-1000 // limit.max_prefill_tokens)
    assert chunks > 1
    assert r.generated == 3
    assert r.first_token_s - r.start_s == pytest.approx(
        sum(SMALL.step_ms(min(limit.max_prefill_tokens, 1000 - k * limit.max_prefill_tokens),
                          2) for k in range(chunks)) / 1000)
