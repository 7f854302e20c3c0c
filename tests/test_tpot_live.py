"""TPOT deadlines on the live path: the config field and the request field (validated, stored,
reported), slo_met accounting for TPOT, the step-limit action reaching a worker and its
backpressure honouring it, and a qlm-tpot planner pushing a limit for a TPOT class."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import yaml

from qlm import config as qconfig
from qlm.config import ConfigError
from qlm.v1 import router_pb2, worker_pb2
from services.router.relay import finished_message
from services.router.validation import MAX_TPOT_DEADLINE_MS, ValidationError, validate

from .harness import ROOT, InProcessStack, write_config
from .test_mesh import collect, gen
from .test_worker_actions import plan, worker_stub


def config_with(tmp_path, **interactive) -> qconfig.StackConfig:
    raw = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    raw["slo_classes"]["interactive"].update(interactive)
    path = tmp_path / "tpot.yaml"
    path.write_text(yaml.safe_dump(raw))
    return qconfig.load(path)


# --- config and validation ------------------------------------------------------------------


def test_config_reads_an_optional_tpot_deadline(tmp_path):
    assert qconfig.load().slo_classes["interactive"].tpot_deadline_ms is None
    cfg = config_with(tmp_path, tpot_deadline_ms=50)
    assert cfg.slo_classes["interactive"].tpot_deadline_ms == 50
    assert cfg.slo_classes["batch"].tpot_deadline_ms is None


@pytest.mark.parametrize("bad", [0, -5, "fast", 2.5, True])
def test_config_refuses_a_bad_tpot_deadline(tmp_path, bad):
    with pytest.raises(ConfigError,
                       match=r"slo_classes\.interactive\.tpot_deadline_ms must be a positive"):
        config_with(tmp_path, tpot_deadline_ms=bad)


def test_the_tighter_of_class_and_request_tpot_is_stored(tmp_path):
    req = gen(max_tokens=4)
    cfg = qconfig.load()  # no class TPOT: the request's, or none
    assert validate(req, cfg).fields["tpot_ms"] == 0
    req.tpot_deadline_ms = 80
    assert validate(req, cfg).fields["tpot_ms"] == 80
    cfg = config_with(tmp_path, tpot_deadline_ms=50)
    assert validate(req, cfg).fields["tpot_ms"] == 50  # the class's is tighter
    req.tpot_deadline_ms = 20
    assert validate(req, cfg).fields["tpot_ms"] == 20  # the request's is
    req.tpot_deadline_ms = 0
    assert validate(req, cfg).fields["tpot_ms"] == 50


def test_an_absurd_request_tpot_is_invalid_argument():
    req = gen(tpot_deadline_ms=MAX_TPOT_DEADLINE_MS + 1)
    with pytest.raises(ValidationError) as e:
        validate(req, qconfig.load())
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tpot_deadline_ms must be at most 60000" in e.value.message
    req.tpot_deadline_ms = MAX_TPOT_DEADLINE_MS
    assert validate(req, qconfig.load()).fields["tpot_ms"] == MAX_TPOT_DEADLINE_MS


def test_slo_met_needs_the_tpot_kept_when_there_is_one():
    # arrival 0, first token at 100 ms (deadline 1000), 11 tokens by 1100 ms: 100 ms per token
    entry = {"a": "0", "s": "10", "ft": "100", "end": "1100", "d": "1000", "n": "11", "p": "5"}
    assert finished_message(entry).slo_met  # no TPOT deadline
    assert finished_message({**entry, "tp": "0"}).slo_met
    assert finished_message({**entry, "tp": "100"}).slo_met
    assert not finished_message({**entry, "tp": "99"}).slo_met
    assert finished_message({**entry, "n": "1", "tp": "1"}).slo_met  # one token: no TPOT
    assert not finished_message({**entry, "ft": "1001", "tp": "1000"}).slo_met  # TTFT missed


# --- through the stack ------------------------------------------------------------------------


async def test_tpot_is_stored_reported_and_judged_live(redis_server, tmp_path):
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"], "time_scale": 0.5}],
                        slo_classes={"interactive": {"ttft_deadline_ms": 20000,
                                                     "tpot_deadline_ms": 30000}})
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        listed = await stack.router().ListModels(router_pb2.ListModelsRequest())
        tpots = {c.name: c.tpot_deadline_ms for c in listed.slo_classes}
        assert tpots == {"interactive": 30000, "batch": 0}
        # the class's TPOT is kept (steps of ~12 ms), a 1 ms one is not
        for tpot, met in ((0, True), (1, False)):
            messages, ids = await collect(stack.router().Generate(
                gen("tpot", 6, tpot_deadline_ms=tpot)))
            assert len(ids) == 6
            finished = messages[-1].finished
            assert finished.slo_met is met, (tpot, finished)
            info = await stack.router().GetRequest(
                router_pb2.GetRequestRequest(request_id=messages[0].request_id))
            assert info.tpot_deadline_ms == (tpot or 30000)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stack.router().Submit(gen(tpot_deadline_ms=10**6))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tpot_deadline_ms" in e.value.details()
    finally:
        await stack.stop()


async def test_step_limit_action_caps_what_the_worker_runs(redis_server, tmp_path):
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"], "time_scale": 0.2}])
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        runner = stack.workers["w0"][0]
        limit = worker_pb2.StepLimitAction(max_running=2)
        reply = await worker_stub(stack).ApplyPlan(plan(1, worker_pb2.Action(step_limit=limit)))
        assert reply.applied and reply.detail == ""
        assert (runner.max_running, runner.max_prefill_tokens) == (2, 0)
        subs = [await stack.router().Submit(gen(f"c{i}", 400)) for i in range(6)]
        peak, queued_seen = 0, False
        for _ in range(40):
            await asyncio.sleep(0.02)
            peak = max(peak, len(runner.running), runner.engine.stats().running)
            queued_seen |= (await stack.store.queue_depth()).get("interactive", 0) > 0
        assert peak == 2 and queued_seen  # two ran while the rest waited in Redis
        # zeros lift it: the rest start at once
        reply = await worker_stub(stack).ApplyPlan(
            plan(2, worker_pb2.Action(step_limit=worker_pb2.StepLimitAction())))
        assert reply.applied
        for _ in range(50):
            await asyncio.sleep(0.02)
            if len(runner.running) > 2:
                break
        assert len(runner.running) > 2
        for s in subs:
            await stack.router().Cancel(router_pb2.CancelRequest(request_id=s.request_id))
    finally:
        await stack.stop()


async def test_prefill_budget_starts_no_more_prompts_until_a_step_ends(redis_server, tmp_path):
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"], "time_scale": 0.2}])
    stack = await InProcessStack(redis_server.url, path, workers=False).start()
    try:
        subs = [await stack.router().Submit(gen("p" * 20, 20)) for _ in range(6)]
        runner = await stack.start_worker("w0")
        runner.set_step_limit(0, 30)  # 30 prompt tokens a step: one 20-token prompt, then two
        assert await runner.pull() == 2  # the second crosses the budget, the third waits
        assert await runner.pull() == 0  # no step has ended since
        for _ in range(100):  # steps end, so the others start, a couple at a time
            await asyncio.sleep(0.02)
            if (await stack.store.queue_depth()).get("interactive", 0) == 0:
                break
        assert (await stack.store.queue_depth()).get("interactive", 0) == 0
        for s in subs:
            await stack.router().Cancel(router_pb2.CancelRequest(request_id=s.request_id))
    finally:
        await stack.stop()


async def test_a_qlm_tpot_planner_pushes_a_step_limit_for_a_tpot_class(redis_server, tmp_path):
    path = write_config(
        tmp_path, workers=[{"id": "w0", "models": ["small"], "time_scale": 0.2}],
        planner={"interval_ms": 50, "policy": "qlm-tpot"},
        slo_classes={"interactive": {"ttft_deadline_ms": 20000, "tpot_deadline_ms": 35}})
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        loop, runner = stack.planners[0][0], stack.workers["w0"][0]
        assert loop.policy.tpot_limits
        subs = [await stack.router().Submit(gen(f"t{i}", 200)) for i in range(4)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if runner.max_running:
                break
        limit = loop.last_plan.step_limits["w0"]
        # sim-small: a step of b sequences takes 24 + 0.25 b ms, so 35 ms cuts the batch of 64
        assert 0 < limit.max_running < 64 and limit.max_prefill_tokens >= 1
        assert (runner.max_running, runner.max_prefill_tokens) == (
            limit.max_running, limit.max_prefill_tokens)
        for s in subs:
            await stack.router().Cancel(router_pb2.CancelRequest(request_id=s.request_id))
    finally:
        await stack.stop()


async def test_a_qlm_planner_without_tpot_limits_pushes_none(redis_server, tmp_path):
    path = write_config(
        tmp_path, workers=[{"id": "w0", "models": ["small"], "time_scale": 0.2}],
        planner={"interval_ms": 50, "policy": "qlm"},
        slo_classes={"interactive": {"ttft_deadline_ms": 20000, "tpot_deadline_ms": 35}})
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        loop, runner = stack.planners[0][0], stack.workers["w0"][0]
        runner.set_step_limit(7, 7)  # a stale limit: the plans pushed lift it
        subs = [await stack.router().Submit(gen(f"u{i}", 200)) for i in range(4)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not runner.max_running:
                break
        assert loop.last_plan is not None and loop.last_plan.step_limits == {}
        assert (runner.max_running, runner.max_prefill_tokens) == (0, 0)
        for s in subs:
            await stack.router().Cancel(router_pb2.CancelRequest(request_id=s.request_id))
    finally:
        await stack.stop()
