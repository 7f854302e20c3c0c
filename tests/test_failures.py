"""Failures, with real processes killed by SIGKILL: a worker dies mid-stream and its request
completes on another worker; a router dies mid-stream and the client resumes on another one.
Either way the client sees every token once, and greedy output equals an uninterrupted run."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from qlm.redis_server import EmbeddedRedis, free_port
from qlm.v1 import router_pb2

from .harness import InProcessStack, ServiceProcess, write_config
from .test_mesh import assert_dense, collect, gen

TOKENS = 60


@pytest.fixture
def private_redis():
    # services started as processes use the default key prefix: give them a server of their own
    with EmbeddedRedis() as server:
        yield server


def two_workers(tmp_path, time_scale):
    ports = [free_port(), free_port()]
    path = write_config(tmp_path, workers=[
        {"id": f"w{i}", "models": ["small"], "listen": f"127.0.0.1:{port}",
         "time_scale": time_scale} for i, port in enumerate(ports)])
    return path, ports


async def reference_output(stack) -> list[int]:
    _, ids = await collect(stack.router().Generate(gen("resume me", TOKENS)))
    assert len(ids) == TOKENS
    return ids


async def read_tokens(call, at_least: int) -> tuple[list[router_pb2.GenerateResponse], int]:
    messages, got = [], 0
    while got < at_least:
        m = await call.read()
        assert m != grpc.aio.EOF, "stream ended early"
        messages.append(m)
        got += len(m.token_ids)
    return messages, got


async def test_worker_killed_mid_stream_request_completes_elsewhere(private_redis, tmp_path):
    path, ports = two_workers(tmp_path, time_scale=1.0)  # ~25 ms per token
    workers = [ServiceProcess("services.worker", "--config", str(path), "--worker-id", f"w{i}",
                              redis_url=private_redis.url) for i in range(2)]
    stack = None
    try:
        for w, port in zip(workers, ports, strict=True):
            await w.wait_healthy(f"127.0.0.1:{port}")
        stack = await InProcessStack(private_redis.url, path, workers=False,
                                     prefix="qlm:").start()
        expected = await reference_output(stack)

        call = stack.router().Generate(gen("resume me", TOKENS))
        messages, _ = await read_tokens(call, 10)
        request_id = messages[0].request_id
        info = await stack.router().GetRequest(router_pb2.GetRequestRequest(request_id=request_id))
        victim = int(info.worker_id[1:])
        workers[victim].kill()

        async with asyncio.timeout(30):
            while (m := await call.read()) != grpc.aio.EOF:
                messages.append(m)
        assert_dense(messages)
        ids = [t for m in messages for t in m.token_ids]
        assert ids == expected  # no token missing, none twice, same greedy output
        assert messages[-1].finished.reason == router_pb2.FINISH_REASON_LENGTH
        assert messages[-1].finished.usage.output_tokens == TOKENS
        info = await stack.router().GetRequest(router_pb2.GetRequestRequest(request_id=request_id))
        assert info.requeues == 1 and info.state == router_pb2.REQUEST_STATE_FINISHED
        # the survivor keeps serving
        _, ids = await collect(stack.router().Generate(gen("after", 5)))
        assert len(ids) == 5
    finally:
        if stack:
            await stack.stop()
        for w in workers:
            w.stop()


async def test_router_killed_mid_stream_client_resumes_on_another(private_redis, tmp_path):
    path, _ = two_workers(tmp_path, time_scale=1.0)
    stack = await InProcessStack(private_redis.url, path, prefix="qlm:").start()
    port = free_port()
    doomed = ServiceProcess("services.router", "--config", str(path),
                            "--listen", f"127.0.0.1:{port}", redis_url=private_redis.url)
    try:
        await doomed.wait_healthy(f"127.0.0.1:{port}")
        expected = await reference_output(stack)
        channel = stack.channel(f"127.0.0.1:{port}")
        from qlm.v1 import router_pb2_grpc

        call = router_pb2_grpc.RouterStub(channel).Generate(gen("resume me", TOKENS))
        messages, _ = await read_tokens(call, 10)
        doomed.kill()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while await call.read() != grpc.aio.EOF:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        resume_at = messages[-1].index + len(messages[-1].token_ids)
        rest = [m async for m in stack.router().Watch(router_pb2.WatchRequest(
            request_id=messages[0].request_id, from_index=resume_at))]
        assert_dense(rest, resume_at)
        ids = [t for m in messages + rest for t in m.token_ids]
        assert ids == expected
        assert rest[-1].finished.reason == router_pb2.FINISH_REASON_LENGTH
    finally:
        doomed.stop()
        await stack.stop()


async def test_lost_redis_is_unavailable_not_a_crash(tmp_path):
    server = EmbeddedRedis().start()
    path, _ = two_workers(tmp_path, time_scale=0.05)
    stack = await InProcessStack(server.url, path, prefix="qlm:").start()
    try:
        _, ids = await collect(stack.router().Generate(gen("before", 4)))
        assert len(ids) == 4
        server.stop()
        router = stack.router()
        calls = {
            "Generate": lambda: collect(router.Generate(gen("during", 4))),
            "Submit": lambda: router.Submit(gen("during", 4)),
            "GetRequest": lambda: router.GetRequest(router_pb2.GetRequestRequest(request_id="x")),
            "Cancel": lambda: router.Cancel(router_pb2.CancelRequest(request_id="x")),
            "ListModels": lambda: router.ListModels(router_pb2.ListModelsRequest()),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async with asyncio.timeout(20):
                    await call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, name
            assert "queue state unavailable" in e.value.details(), name
    finally:
        await stack.stop()
        server.stop()
