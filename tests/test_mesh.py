"""The mesh over real gRPC and a real Redis: streaming, resume, cancellation, validation,
health and the planner, with sim engines in the test process."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qlm.v1 import planner_pb2, router_pb2

from .harness import PROFILES, InProcessStack, write_config

SMALL = {"models": ["small"]}


@pytest.fixture
async def stack(redis_server, tmp_path):
    s = await InProcessStack(
        redis_server.url,
        write_config(tmp_path, workers=[
            {"id": "w0", **SMALL},
            {"id": "w1", "models": ["large"], "profile": str(PROFILES / "sim-large.yaml")},
        ]),
        routers=2,
    ).start()
    yield s
    await s.stop()


def gen(prompt="Hello", max_tokens=8, **kw) -> router_pb2.GenerateRequest:
    kw.setdefault("model", "small")
    sampling = router_pb2.SamplingParams(temperature=0.0, ignore_eos=True)
    return router_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                                      **kw)


async def collect(call) -> tuple[list[router_pb2.GenerateResponse], list[int]]:
    messages = [m async for m in call]
    ids = [t for m in messages for t in m.token_ids]
    return messages, ids


def assert_dense(messages: list[router_pb2.GenerateResponse], start: int = 0) -> None:
    at = start
    for m in messages:
        if m.token_ids:
            assert m.index == at, f"message at index {m.index}, expected {at}"
            at += len(m.token_ids)


async def test_generate_streams_id_then_tokens_then_usage(stack):
    messages, ids = await collect(stack.router().Generate(gen(max_tokens=12)))
    first, last = messages[0], messages[-1]
    assert first.request_id and not first.token_ids and not first.HasField("finished")
    assert all(m.request_id == first.request_id for m in messages)
    assert_dense(messages)
    assert len(ids) == 12
    assert "".join(m.text for m in messages) == bytes(ids).decode()
    f = last.finished
    assert f.reason == router_pb2.FINISH_REASON_LENGTH
    assert f.usage.prompt_tokens == len(b"Hello") and f.usage.output_tokens == 12
    assert 0 < f.usage.ttft_ms <= f.usage.e2e_ms
    assert f.usage.queue_wait_ms <= f.usage.ttft_ms
    assert f.slo_met


async def test_greedy_output_is_reproducible_and_token_prompts_work(stack):
    _, a = await collect(stack.router().Generate(gen("same prompt", 10)))
    _, b = await collect(stack.router(1).Generate(gen("same prompt", 10)))
    assert a == b
    _, c = await collect(stack.router().Generate(
        gen("", 10, prompt_token_ids=list(b"same prompt"))))
    assert c == a


async def test_submit_then_watch_from_any_index_on_another_router(stack):
    sub = await stack.router(0).Submit(gen("watch me", 16))
    assert sub.created
    assert not sub.HasField("admission")  # edf publishes no estimates
    full, ids = await collect(stack.router(1).Watch(
        router_pb2.WatchRequest(request_id=sub.request_id)))
    assert len(ids) == 16 and full[-1].finished.reason == router_pb2.FINISH_REASON_LENGTH
    # resume from the end of a received message: the rest, nothing repeated
    cut = full[0].index + len(full[0].token_ids)
    rest_msgs, rest = await collect(stack.router(0).Watch(
        router_pb2.WatchRequest(request_id=sub.request_id, from_index=cut)))
    assert rest == ids[cut:]
    assert_dense(rest_msgs, cut)
    again = await stack.router(1).Submit(gen("watch me", 16, request_id=sub.request_id))
    assert again.request_id == sub.request_id and not again.created


async def test_watch_and_get_unknown_request_is_not_found(stack):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(stack.router().Watch(router_pb2.WatchRequest(request_id="nope")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stack.router().GetRequest(router_pb2.GetRequestRequest(request_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def wait_state(stack, request_id, state, timeout_s=5.0) -> router_pb2.RequestInfo:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        info = await stack.router().GetRequest(router_pb2.GetRequestRequest(request_id=request_id))
        if info.state == state or loop.time() > deadline:
            return info
        await asyncio.sleep(0.02)


async def test_cancel_running_request_stops_the_engine(stack):
    engine = stack.workers["w0"][0].engine
    sub = await stack.router().Submit(gen("long one", 2000))
    info = await wait_state(stack, sub.request_id, router_pb2.REQUEST_STATE_RUNNING)
    assert info.worker_id == "w0"
    assert engine.stats().running == 1
    res = await stack.router().Cancel(router_pb2.CancelRequest(request_id=sub.request_id))
    assert res.state == router_pb2.REQUEST_STATE_CANCELLED
    for _ in range(100):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().running == 0 and engine.stats().kv_used_tokens == 0
    messages, ids = await collect(stack.router(1).Watch(
        router_pb2.WatchRequest(request_id=sub.request_id)))
    assert messages[-1].finished.reason == router_pb2.FINISH_REASON_CANCELLED
    info = await stack.router().GetRequest(router_pb2.GetRequestRequest(request_id=sub.request_id))
    assert info.state == router_pb2.REQUEST_STATE_CANCELLED and info.output_tokens == len(ids)
    assert info.expires_in_s > 0
    # cancelling again is not an error
    res = await stack.router().Cancel(router_pb2.CancelRequest(request_id=sub.request_id))
    assert res.state == router_pb2.REQUEST_STATE_CANCELLED


async def test_cancel_queued_request_leaves_its_queue(stack):
    # `large` has no worker in this stack... give it one that is busy: stop w1 first
    await stack.stop_worker("w1")
    sub = await stack.router().Submit(gen("queued", 8, model="large"))
    assert (await stack.store.queue_depth())["interactive"] == 1
    res = await stack.router().Cancel(router_pb2.CancelRequest(request_id=sub.request_id))
    assert res.state == router_pb2.REQUEST_STATE_CANCELLED
    assert (await stack.store.queue_depth())["interactive"] == 0
    groups = await stack.store.groups()
    assert all(int(g["queued"]) == 0 for g in groups)


async def test_client_disconnect_and_deadline_cancel_the_request(stack):
    call = stack.router().Generate(gen("bye", 2000))
    first = await call.read()
    await call.read()  # a first token: it runs
    call.cancel()
    info = await wait_state(stack, first.request_id, router_pb2.REQUEST_STATE_CANCELLED)
    assert info.state == router_pb2.REQUEST_STATE_CANCELLED

    call = stack.router().Generate(gen("deadline", 2000), timeout=0.5)
    first = await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        while await call.read() != grpc.aio.EOF:
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = await wait_state(stack, first.request_id, router_pb2.REQUEST_STATE_CANCELLED)
    assert info.state == router_pb2.REQUEST_STATE_CANCELLED


@pytest.mark.parametrize("request_kwargs, code, fragment", [
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown model"),
    ({"slo_class": "gold"}, grpc.StatusCode.NOT_FOUND, "unknown slo_class"),
    ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"max_tokens": 100000}, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    ({"prompt": "x" * 5_000_000}, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
async def test_bad_requests_get_clear_statuses(stack, request_kwargs, code, fragment):
    request = gen(**request_kwargs)
    if "max_tokens" in request_kwargs:
        request.max_tokens = request_kwargs["max_tokens"]
    for call in (stack.router().Generate(request),):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(call)
        assert e.value.code() == code
        assert fragment in e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stack.router().Submit(request)
    assert e.value.code() == code
    # nothing was queued and the router still serves
    assert sum((await stack.store.queue_depth()).values()) == 0
    _, ids = await collect(stack.router().Generate(gen(max_tokens=3)))
    assert len(ids) == 3


async def test_full_class_queue_is_resource_exhausted(redis_server, tmp_path):
    path = write_config(tmp_path, workers=[], slo_classes={
        "interactive": {"ttft_deadline_ms": 1000, "max_queued": 2},
        "batch": {"ttft_deadline_ms": 60000, "max_queued": 5}})
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        for _ in range(2):
            await stack.router().Submit(gen())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stack.router().Submit(gen())
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "interactive queue is full" in e.value.details()
        # other classes are unaffected
        assert (await stack.router().Submit(gen(slo_class="batch"))).created
    finally:
        await stack.stop()


async def test_list_models_counts_live_workers(stack):
    res = await stack.router().ListModels(router_pb2.ListModelsRequest())
    workers = {m.name: m.workers for m in res.models}
    assert workers == {"small": 1, "large": 1}
    assert {c.name for c in res.slo_classes} == {"interactive", "batch"}
    assert [c.name for c in res.slo_classes if c.is_default] == ["interactive"]


async def test_health_by_service_name_and_overall(stack):
    targets = [(stack.routers[0][1], "qlm.v1.Router"), (stack.planners[0][1], "qlm.v1.Planner"),
               (stack.workers["w0"][1], "qlm.v1.Worker")]
    for server, name in targets:
        stub = health_pb2_grpc.HealthStub(stack.channel(stack.address(server)))
        for service in ("", name):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Check(health_pb2.HealthCheckRequest(service="qlm.v1.Nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_planner_places_groups_and_standby_refuses_to_plan(redis_server, tmp_path):
    path = write_config(tmp_path, workers=[{"id": "w0", **SMALL}, {"id": "w1", **SMALL}],
                        planner={"interval_ms": 100})
    stack = await InProcessStack(redis_server.url, path, planners=2).start()
    try:
        await asyncio.sleep(0.3)
        leaders = [loop for loop, _ in stack.planners if loop.leader]
        assert len(leaders) == 1
        standby = next(i for i, (loop, _) in enumerate(stack.planners) if not loop.leader)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stack.planner(standby).Replan(planner_pb2.ReplanRequest())
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # stop the leader: the standby takes over with a higher epoch
        leader_i = 1 - standby
        old_epoch = stack.planners[leader_i][0].epoch
        await stack.planners[leader_i][0].stop()
        await stack.store.client.delete(stack.store.key("leader"))  # as if its lock expired
        for _ in range(50):
            if stack.planners[standby][0].leader:
                break
            await asyncio.sleep(0.05)
        assert stack.planners[standby][0].epoch > old_epoch
        plan = await stack.planner(standby).Replan(planner_pb2.ReplanRequest())
        assert plan.leader and plan.epoch == stack.planners[standby][0].epoch
        assert {q.worker_id for q in plan.queues} == {"w0", "w1"}
        assert not plan.HasField("calibration")  # no group has started: nothing to report
        # the deposed leader cannot install a plan any more
        assert await stack.planners[leader_i][0].plan_once() is None
    finally:
        await stack.stop()


async def test_many_concurrent_streams_all_complete_exactly_once(stack):
    async def one(i):
        messages, ids = await collect(stack.router(i % 2).Generate(gen(f"p{i}", 5 + i % 7)))
        assert_dense(messages)
        return len(ids) == 5 + i % 7 and messages[-1].finished.reason == 1

    results = await asyncio.gather(*(one(i) for i in range(120)))
    assert all(results)
    assert sum((await stack.store.queue_depth()).values()) == 0


async def test_worker_pulls_only_what_its_engine_has_room_for(redis_server, tmp_path):
    profile = tmp_path / "two-slots.yaml"
    profile.write_text((PROFILES / "sim-small.yaml").read_text().replace(
        "max_running: 64", "max_running: 2"))
    path = write_config(tmp_path, workers=[{"id": "w0", **SMALL, "profile": str(profile),
                                            "time_scale": 0.2}])
    stack = await InProcessStack(redis_server.url, path, workers=False).start()
    try:
        # a backlog first, then the worker: its first pull meets six waiting requests
        subs = [await stack.router().Submit(gen(f"p{i}", 50)) for i in range(6)]
        runner = await stack.start_worker("w0")
        for _ in range(10):
            await runner.pull()  # as many extra pulls as a burst of wake-ups would cause
            stats = runner.engine.stats()
            assert stats.running + stats.waiting <= 2
            assert len(runner.running) <= 2
        assert (await stack.store.queue_depth())["interactive"] == 4  # the rest wait in Redis
        for s in subs:
            await stack.router().Cancel(router_pb2.CancelRequest(request_id=s.request_id))
    finally:
        await stack.stop()


async def test_planner_runs_the_qlm_policy_live_and_learns(redis_server, tmp_path):
    path = write_config(tmp_path, workers=[{"id": "w0", **SMALL}, {"id": "w1", **SMALL}],
                        planner={"interval_ms": 50, "policy": "qlm"})
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        loop = stack.planners[0][0]
        assert loop.policy_name == "qlm"
        results = await asyncio.gather(*(
            collect(stack.router(0).Generate(gen(f"q{i}", 6, slo_class=cls)))
            for i, cls in enumerate(["batch", "interactive"] * 20)))
        assert all(len(ids) == 6 for _, ids in results)
        plan = await stack.planner().GetPlan(planner_pb2.GetPlanRequest())
        for _ in range(40):  # the planner reads completions from the event stream
            if loop.policy.lengths.count("small", "interactive"):
                break
            await asyncio.sleep(0.05)
            plan = await stack.planner().GetPlan(planner_pb2.GetPlanRequest())
        assert plan.policy == "qlm" and plan.leader
        assert loop.policy.lengths.count("small", "interactive") > 0
        assert loop.policy.lengths.mean("small", "batch") < 256  # learned: 6, prior 256
        # and per prompt band, from the prompt tokens the finished events carry
        assert loop.policy.lengths.count("small", "interactive", loop.policy.lengths.band(3)) > 0
    finally:
        await stack.stop()


async def two_slot_qlm_stack(redis_server, tmp_path) -> InProcessStack:
    """One sim worker with 2 batch slots in real time, under the qlm planner: a small backlog
    makes long waits."""
    profile = tmp_path / "two-slots.yaml"
    profile.write_text((PROFILES / "sim-small.yaml").read_text().replace(
        "max_running: 64", "max_running: 2"))
    path = write_config(tmp_path, workers=[{"id": "w0", **SMALL, "profile": str(profile),
                                            "time_scale": 1.0}],
                        planner={"interval_ms": 50, "policy": "qlm"})
    return await InProcessStack(redis_server.url, path).start()


async def test_admission_feedback_tells_a_client_its_deadline_is_at_risk(redis_server, tmp_path):
    stack = await two_slot_qlm_stack(redis_server, tmp_path)
    try:
        backlog = [await stack.router().Submit(gen(f"b{i}", 1000, slo_class="batch"))
                   for i in range(12)]  # ~5 rounds of 1000 steps on 2 slots: a minute
        for _ in range(100):
            if "small" in await stack.store.admission():
                break
            await asyncio.sleep(0.05)
        await stack.routers[0][0].admission.refresh()
        tight = await stack.router().Submit(gen("urgent", 4, ttft_deadline_ms=1000))
        assert tight.admission.deadline_at_risk
        assert tight.admission.estimated_wait_ms > 1000
        assert 0 <= tight.admission.estimate_age_ms < 5000
        relaxed = await stack.router().Submit(gen("later", 4, slo_class="batch",
                                                  ttft_deadline_ms=3_600_000))
        assert relaxed.HasField("admission") and not relaxed.admission.deadline_at_risk
        call = stack.router().Generate(gen("stream", 4, ttft_deadline_ms=1000))
        first = await call.read()
        assert first.admission.deadline_at_risk
        call.cancel()
        for s in [*backlog, tight, relaxed]:
            await stack.router().Cancel(router_pb2.CancelRequest(request_id=s.request_id))
    finally:
        await stack.stop()


async def test_admission_feedback_is_per_slo_class(redis_server, tmp_path):
    # interactive requests are planned ahead of queued batch groups: a minute of batch backlog
    # delays them by one slot's turn, not by the minute
    stack = await two_slot_qlm_stack(redis_server, tmp_path)
    try:
        backlog = [await stack.router().Submit(gen(f"b{i}", 2000, slo_class="batch"))
                   for i in range(24)]
        published = {}
        for _ in range(100):  # until a plan has seen the whole backlog
            published = await stack.store.admission()
            if ({"small|interactive", "small|batch"} <= published.keys()
                    and float(published.get("small", 0)) > 60_000):
                break
            await asyncio.sleep(0.05)
        behind_all = float(published["small"])
        assert behind_all > 60_000  # the model's estimate: behind everything planned
        assert float(published["small|batch"]) > 60_000
        await stack.routers[0][0].admission.refresh()
        chat = await stack.router().Submit(gen("chat", 4, slo_class="interactive"))
        assert chat.HasField("admission") and not chat.admission.deadline_at_risk
        assert chat.admission.estimated_wait_ms < 20_000 < behind_all
        # a batch request with its own 5 s deadline: no class is that tight, so it is read
        # behind everything planned, and flagged
        hurried = await stack.router().Submit(gen("hurried", 4, slo_class="batch",
                                                  ttft_deadline_ms=5000))
        assert hurried.admission.deadline_at_risk
        assert hurried.admission.estimated_wait_ms > 60_000
        for s in [*backlog, chat, hurried]:
            await stack.router().Cancel(router_pb2.CancelRequest(request_id=s.request_id))
    finally:
        await stack.stop()
