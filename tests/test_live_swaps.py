"""Model swaps and warm starts on the live path: the qlm planner places work on a worker that
must swap for it, pushes a warm start ahead of the swap, and the worker swaps once its batch
has drained (the simulator's semantics, qlm/sim/simulator.py)."""

from __future__ import annotations

import asyncio

from qlm.v1 import router_pb2, worker_pb2

from .harness import InProcessStack, write_config
from .test_mesh import assert_dense, gen, wait_state
from .test_worker_actions import worker_stub

SMALL_TOKENS = 2000  # ~2.5 s at time_scale 0.05: longer than the warm start (~1.2 s)


async def stream(call) -> tuple[list, float, float]:
    """Messages, and when the first token and the end came (loop time)."""
    loop = asyncio.get_running_loop()
    messages, first = [], None
    async for m in call:
        messages.append(m)
        if first is None and m.token_ids:
            first = loop.time()
    return messages, first, loop.time()


async def test_worker_warms_then_swaps_after_its_batch_drains(redis_server, tmp_path):
    path = write_config(tmp_path, planner={"policy": "qlm"}, workers=[
        {"id": "w0", "models": ["small", "large"], "active": ["small"]}])
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        store, stub = stack.store, worker_stub(stack)
        small = asyncio.create_task(stream(stack.router().Generate(gen("small", SMALL_TOKENS))))
        while not (await stub.GetStatus(worker_pb2.GetStatusRequest())).running:
            await asyncio.sleep(0.02)
        large = asyncio.create_task(stream(stack.router().Generate(gen("big", 8, model="large"))))
        # the plan queues the large group behind the running batch and warms "large" now
        warm_seen = None
        while not small.done():
            reg = await store.client.hgetall(store.key("worker", "w0"))
            if "large" in reg["warm"].split():
                warm_seen = reg
                break
            await asyncio.sleep(0.02)
        assert warm_seen is not None, "no warm start before the small request finished"
        assert warm_seen["loaded"] == "small"
        (s_msgs, _, s_end), (l_msgs, l_first, _) = await asyncio.gather(small, large)
        assert_dense(s_msgs)
        assert sum(len(m.token_ids) for m in s_msgs) == SMALL_TOKENS
        assert sum(len(m.token_ids) for m in l_msgs) == 8
        assert l_first >= s_end  # drained, not pre-empted: the swap came after the batch
        info = await stack.router().GetRequest(
            router_pb2.GetRequestRequest(request_id=s_msgs[0].request_id))
        assert info.requeues == 0
        status = await stub.GetStatus(worker_pb2.GetStatusRequest())
        assert list(status.models) == ["large"] and list(status.warm_models) == ["small"]
        assert status.model_swaps == 1
        # the heartbeat tells the planner what it serves now, and what it could swap back to
        await asyncio.sleep(0.5)
        reg = await store.client.hgetall(store.key("worker", "w0"))
        assert (reg["models"].split(), reg["loaded"], reg["warm"]) == (
            ["large", "small"], "large", "small")
    finally:
        await asyncio.shield(stack.stop())


async def test_idle_worker_swaps_for_work_no_loaded_worker_serves(redis_server, tmp_path):
    # edf knows nothing of warm starts; the worker still swaps for the only work there is
    path = write_config(tmp_path, planner={"policy": "edf"}, workers=[
        {"id": "w0", "models": ["small", "large"], "active": ["small"]}])
    stack = await InProcessStack(redis_server.url, path).start()
    try:
        call = stack.router().Generate(gen("big", 4, model="large"))
        messages = [m async for m in call]
        assert sum(len(m.token_ids) for m in messages) == 4
        info = await wait_state(stack, messages[0].request_id,
                                router_pb2.REQUEST_STATE_FINISHED)
        assert info.state == router_pb2.REQUEST_STATE_FINISHED
        status = await worker_stub(stack).GetStatus(worker_pb2.GetStatusRequest())
        assert status.model_swaps == 1 and list(status.models) == ["large"]
    finally:
        await asyncio.shield(stack.stop())
