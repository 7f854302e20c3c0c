"""Action plans pushed to a worker over gRPC: eviction (the request continues from its stored
output, with identical greedy text), model swap, stale plans."""

from __future__ import annotations

import asyncio

import grpc

from qlm.v1 import router_pb2, worker_pb2, worker_pb2_grpc

from .harness import InProcessStack, write_config
from .test_mesh import assert_dense, collect, gen, wait_state


async def make_stack(redis_server, tmp_path, time_scale=0.5):
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"],
                                            "time_scale": time_scale}])
    return await InProcessStack(redis_server.url, path).start()


def worker_stub(stack, wid="w0") -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(stack.channel(stack.address(stack.workers[wid][1])))


def plan(sequence, *actions, epoch=1000) -> worker_pb2.ActionPlan:
    return worker_pb2.ActionPlan(epoch=epoch, sequence=sequence, worker_id="w0",
                                 actions=list(actions))


async def test_evicted_request_resumes_with_identical_output(redis_server, tmp_path):
    stack = await make_stack(redis_server, tmp_path)
    try:
        _, expected = await collect(stack.router().Generate(gen("evict me", 40)))
        call = stack.router().Generate(gen("evict me", 40))
        messages = []
        while sum(len(m.token_ids) for m in messages) < 8:
            messages.append(await call.read())
        rid = messages[0].request_id
        reply = await worker_stub(stack).ApplyPlan(
            plan(1, worker_pb2.Action(evict=worker_pb2.EvictAction(request_id=rid))))
        assert reply.applied and reply.detail == ""
        while (m := await call.read()) != grpc.aio.EOF:
            messages.append(m)
        assert_dense(messages)
        assert [t for m in messages for t in m.token_ids] == expected
        info = await stack.router().GetRequest(router_pb2.GetRequestRequest(request_id=rid))
        assert info.requeues == 1 and info.state == router_pb2.REQUEST_STATE_FINISHED
        # evicting what is not running is reported, not an error
        reply = await worker_stub(stack).ApplyPlan(
            plan(2, worker_pb2.Action(evict=worker_pb2.EvictAction(request_id=rid))))
        assert reply.applied and "not running here" in reply.detail
    finally:
        await stack.stop()


async def test_stale_and_misaddressed_plans_are_refused(redis_server, tmp_path):
    stack = await make_stack(redis_server, tmp_path)
    try:
        stub = worker_stub(stack)
        assert (await stub.ApplyPlan(plan(5))).applied
        for stale in (plan(5), plan(4), plan(9, epoch=999)):
            reply = await stub.ApplyPlan(stale)
            assert not reply.applied and "stale" in reply.detail
        wrong = worker_pb2.ActionPlan(epoch=2000, sequence=1, worker_id="w9")
        assert not (await stub.ApplyPlan(wrong)).applied
        status = await stub.GetStatus(worker_pb2.GetStatusRequest())
        assert (status.plan_epoch, status.plan_sequence) == (1000, 5)
    finally:
        await stack.stop()


async def test_swap_model_moves_the_worker_to_another_model(redis_server, tmp_path):
    stack = await make_stack(redis_server, tmp_path, time_scale=0.01)
    try:
        stub = worker_stub(stack)
        running = await stack.router().Submit(gen("small one", 2000))
        await wait_state(stack, running.request_id, router_pb2.REQUEST_STATE_RUNNING)
        reply = await stub.ApplyPlan(plan(
            1, worker_pb2.Action(swap_model=worker_pb2.SwapModelAction(model="large"))))
        assert reply.applied and reply.detail == ""
        # the small request went back to its queue, with its output kept
        info = await stack.router().GetRequest(
            router_pb2.GetRequestRequest(request_id=running.request_id))
        assert info.requeues == 1 and info.output_tokens > 0
        _, ids = await collect(stack.router().Generate(gen("now large", 6, model="large")))
        assert len(ids) == 6
        # the worker serves the model it was swapped to, but can still serve small: with only
        # small work left, an idle worker swaps back (nothing waits forever for a model no
        # worker has loaded) and the evicted request completes
        models = await stack.router().ListModels(router_pb2.ListModelsRequest())
        assert {m.name: m.workers for m in models.models} == {"small": 1, "large": 1}
        info = await wait_state(stack, running.request_id, router_pb2.REQUEST_STATE_FINISHED)
        assert info.state == router_pb2.REQUEST_STATE_FINISHED and info.output_tokens == 2000
        status = await stub.GetStatus(worker_pb2.GetStatusRequest())
        # one model loaded, the other warm; at least the swap to large and one back to small
        assert len(status.models) == 1
        assert sorted([*status.models, *status.warm_models]) == ["large", "small"]
        assert status.model_swaps >= 2
        reply = await stub.ApplyPlan(plan(
            2, worker_pb2.Action(swap_model=worker_pb2.SwapModelAction(model="nope"))))
        assert "not in the stack config" in reply.detail
    finally:
        await asyncio.shield(stack.stop())
