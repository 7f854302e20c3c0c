"""The simulated engine: batching, KV admission, aborts, determinism, model loading, factory."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import time

import pytest

from qlm import config
from qlm.config import ConfigError
from qlm.engines import create_engine
from qlm.engines.base import EngineError, EngineRequest
from qlm.engines.sim import SimEngine, SimProfile
from qlm.engines.tokenizer import ByteTokenizer

PROFILES = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "profiles"
ALPHABET = set(range(97, 123)) | {32}

# Small numbers so that time_scale=1 tests take tens of milliseconds.
PROFILE = SimProfile(
    max_running=4,
    kv_capacity_tokens=10_000,
    prefill_ms_per_token=0.5,
    decode_step_ms=2.0,
    decode_ms_per_seq=1.0,
    load_ms=200,
    warm_load_ms=1,
)


@pytest.fixture
async def make_engine():
    engines = []

    async def make(profile=PROFILE, time_scale=0.0, models=("m",), **changes):
        engine = SimEngine(list(models), dataclasses.replace(profile, **changes), time_scale)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


def req(rid, max_tokens=10, prompt="hello", model="m", **kw) -> EngineRequest:
    ids = tuple(prompt.encode()) if isinstance(prompt, str) else tuple(prompt)
    return EngineRequest(rid, model, ids, max_tokens, **kw)


async def run(engine, request, outputs=None):
    """Consumes a request; checks the output invariants every test relies on."""
    outputs = [] if outputs is None else outputs
    async for out in engine.generate(request):
        assert out.text == ByteTokenizer().decode(out.token_ids)
        outputs.append(out)
    assert outputs and outputs[-1].finished
    assert not any(o.finished for o in outputs[:-1])
    return outputs


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


async def until(cond, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.decode([104, 0xC3, 0xA9]) == "hé"
    assert tok.decode([104, 0xC3]) == "h\ufffd"  # cut mid-character: replaced, not an error
    assert tok.eos_token_id == 0
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([104, 256])
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([-1])


async def test_batch_is_bounded_by_max_running(make_engine):
    engine = await make_engine(time_scale=1.0)
    assert engine.free_slots() == 4
    tasks = [asyncio.create_task(run(engine, req(f"r{i}", max_tokens=1000))) for i in range(5)]
    await until(lambda: engine.stats().running == 4)
    assert engine.stats().waiting == 1
    assert engine.free_slots() == 0

    await engine.abort("r0")
    await engine.abort("r1")
    # The waiting request joins the batch at the next step.
    await until(lambda: engine.stats().waiting == 0)
    stats = engine.stats()
    assert stats.running == 3
    assert stats.kv_used_tokens == 3 * (5 + 1000)
    assert engine.free_slots() == 1

    for i in range(2, 5):
        await engine.abort(f"r{i}")
    results = await asyncio.gather(*tasks)
    assert all(r[-1].finish_reason == "abort" for r in results)
    assert engine.free_slots() == 4 and engine.stats().kv_used_tokens == 0


async def test_requests_arriving_mid_step_wait_for_the_next_step(make_engine):
    engine = await make_engine(time_scale=1.0, decode_step_ms=300.0)
    first = asyncio.create_task(run(engine, req("r0", max_tokens=1000)))
    await until(lambda: engine.stats().running == 1)  # step 1 has just started
    later = [asyncio.create_task(run(engine, req(f"r{i}", max_tokens=1000))) for i in (1, 2)]
    await until(lambda: engine.stats().waiting == 2)
    assert engine.stats().running == 1
    assert engine.free_slots() == 1  # waiting requests hold their slots too
    await until(lambda: engine.stats().running == 3)
    assert engine.free_slots() == 1 and engine.steps == 2
    await engine.stop()
    await asyncio.gather(first, *later)


async def test_admission_is_by_priority_then_arrival(make_engine):
    engine = await make_engine(max_running=1)
    finished = []

    async def tracked(request):
        await run(engine, request)
        finished.append(request.request_id)

    blocker = asyncio.create_task(run(engine, req("blocker", max_tokens=1000)))
    await until(lambda: engine.stats().running == 1)
    tasks = [
        asyncio.create_task(tracked(req(rid, max_tokens=2, priority=prio)))
        for rid, prio in [("a", 5), ("b", 0), ("c", 1), ("d", 0)]
    ]
    await until(lambda: engine.stats().waiting == 4)
    await engine.abort("blocker")
    await asyncio.gather(blocker, *tasks)
    assert finished == ["b", "d", "c", "a"]


async def test_step_time_models_prefill_and_batch_size(make_engine):
    # 1 sequence: prefill of 5 tokens, then 10 steps of decode_step + 1 * per_seq.
    alone = await make_engine()
    await run(alone, req("x", max_tokens=10))
    assert alone.steps == 10
    assert alone.sim_time_ms == pytest.approx(0.5 * 5 + 10 * (2.0 + 1.0))

    # 4 sequences admitted together: one prefill of 20 tokens, steps cost 2 + 4 * 1.
    batch = await make_engine()
    await asyncio.gather(*(run(batch, req(f"x{i}", max_tokens=10)) for i in range(4)))
    assert batch.steps == 10
    assert batch.sim_time_ms == pytest.approx(0.5 * 20 + 10 * (2.0 + 4.0))


async def test_chunked_prefill_holds_a_step_to_max_batched_tokens(make_engine):
    # "a" (2 prompt tokens, 10 out) and "b" (20, 3) together under a budget of 8 tokens a step:
    # step 1 prefills a's 2 and 6 of b's (8 ms at 2 sequences); steps 2 and 3 decode a and
    # prefill 7 of b's each (7.5 ms); b then decodes in steps 3-5 (4 ms each, 2 sequences) and a
    # alone in 6-10 (3 ms): 10 steps in all
    engine = await make_engine(max_batched_tokens=8)
    a, b = await asyncio.gather(run(engine, req("a", max_tokens=10, prompt="hi")),
                                run(engine, req("b", max_tokens=3, prompt="x" * 20)))
    assert (len(tokens(a)), len(tokens(b))) == (10, 3)
    assert engine.steps == 10
    assert engine.sim_time_ms == pytest.approx(8 + 7.5 + 7.5 + 2 * 4 + 5 * 3)
    # prefilled whole: 22 prompt tokens in step 1 (15 ms), then 2 steps of 4 ms and 7 of 3
    whole = await make_engine()
    await asyncio.gather(run(whole, req("a", max_tokens=10, prompt="hi")),
                         run(whole, req("b", max_tokens=3, prompt="x" * 20)))
    assert whole.sim_time_ms == pytest.approx(15 + 2 * 4 + 7 * 3)


async def test_a_spent_chunk_budget_leaves_no_free_slot(make_engine):
    # slots for 4, but a step holds 8 tokens and 20 prompt tokens are still to prefill (a step
    # takes 163 ms here): a request claimed now would only wait in the engine behind them
    engine = await make_engine(time_scale=1.0, max_batched_tokens=8, prefill_ms_per_token=20.0)
    task = asyncio.create_task(run(engine, req("a", max_tokens=2, prompt="x" * 20)))
    await until(lambda: engine.stats().running == 1)
    assert engine.free_slots() == 0
    await task
    assert engine.free_slots() == 4


@pytest.mark.parametrize("budget", [3, -1, True, 2.5])
def test_a_step_budget_under_a_full_batch_is_refused(budget):
    with pytest.raises(ConfigError, match="max_batched_tokens"):
        dataclasses.replace(PROFILE, max_batched_tokens=budget)


async def test_time_scale_stretches_wall_time(make_engine):
    async def wall_time(time_scale):
        engine = await make_engine(time_scale=time_scale, decode_step_ms=20.0)
        start = time.monotonic()
        await run(engine, req("x", max_tokens=5))
        assert engine.sim_time_ms == pytest.approx(0.5 * 5 + 5 * 21.0)
        return time.monotonic() - start

    slow, fast = await wall_time(1.0), await wall_time(0.2)
    # Sleeps never end early (beyond clock granularity): lower bounds are safe.
    assert slow >= 0.9 * 0.1075 and fast >= 0.9 * 0.0215
    assert fast < slow


async def test_kv_capacity_limits_admission(make_engine):
    engine = await make_engine(time_scale=1.0, kv_capacity_tokens=100, max_running=8)
    # Each reserves 10 prompt + 40 output tokens: two fill the cache.
    tasks = [
        asyncio.create_task(run(engine, req(f"r{i}", max_tokens=40, prompt="0123456789")))
        for i in range(3)
    ]
    await until(lambda: engine.stats().running == 2)
    stats = engine.stats()
    assert stats.waiting == 1 and stats.kv_used_tokens == 100
    assert engine.free_slots() == 0  # batch room left, but no KV

    with pytest.raises(EngineError, match="KV capacity"):
        engine.generate(req("huge", max_tokens=91, prompt="0123456789"))

    await engine.abort("r0")
    await until(lambda: engine.stats().waiting == 0)
    assert engine.stats().running == 2 and engine.stats().kv_used_tokens == 100
    results = await asyncio.gather(*tasks)
    assert [r[-1].finish_reason for r in results] == ["abort", "length", "length"]
    assert [len(tokens(r)) for r in results[1:]] == [40, 40]
    assert engine.stats().kv_used_tokens == 0


async def test_abort_ends_running_and_waiting_requests(make_engine):
    engine = await make_engine(time_scale=1.0, max_running=1)
    outs_a, outs_b = [], []
    a = asyncio.create_task(run(engine, req("a", max_tokens=1000), outs_a))
    b = asyncio.create_task(run(engine, req("b", max_tokens=1000), outs_b))
    await until(lambda: len(outs_a) >= 2 and engine.stats().waiting == 1)

    await engine.abort("b")  # waiting
    await b
    assert outs_b[-1].finish_reason == "abort" and tokens(outs_b) == []
    await engine.abort("a")  # running
    await a
    assert outs_a[-1].finish_reason == "abort" and len(tokens(outs_a)) >= 2
    assert engine.stats() == dataclasses.replace(engine.stats(), running=0, kv_used_tokens=0)
    assert engine.free_slots() == 1
    await engine.abort("a")  # finished and unknown ids are ignored
    await engine.abort("nope")


async def test_evict_returns_tokens_that_resume_identically(make_engine):
    engine = await make_engine(time_scale=1.0)
    full = tokens(await run(engine, req("full", max_tokens=30, temperature=0)))

    outs = []
    task = asyncio.create_task(run(engine, req("e", max_tokens=30, temperature=0), outs))
    await until(lambda: len(tokens(outs)) >= 3)
    evicted = await engine.evict("e")
    await task
    assert outs[-1].finish_reason == "abort"
    assert evicted.request_id == "e" and not evicted.kv_kept
    assert list(evicted.generated_token_ids) == tokens(outs)
    assert 3 <= len(evicted.generated_token_ids) < 30
    assert engine.stats().kv_used_tokens == 0

    done = len(evicted.generated_token_ids)
    resumed = req("e2", 30 - done, tuple(b"hello") + evicted.generated_token_ids, temperature=0)
    assert tokens(outs) + tokens(await run(engine, resumed)) == full
    assert await engine.evict("e") is None
    assert await engine.evict("nope") is None


async def test_consumer_leaving_aborts_the_request(make_engine):
    engine = await make_engine(time_scale=1.0)

    gen = engine.generate(req("closed", max_tokens=1000))
    await anext(gen)
    assert engine.stats().running == 1
    await gen.aclose()
    assert engine.stats().running == 0 and engine.stats().kv_used_tokens == 0

    outs = []
    task = asyncio.create_task(run(engine, req("cancelled", max_tokens=1000), outs))
    await until(lambda: outs)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().running == 0 and engine.stats().kv_used_tokens == 0

    async with contextlib.aclosing(engine.generate(req("broken", max_tokens=1000))) as gen:
        async for _ in gen:
            break
    assert engine.free_slots() == 4


async def test_outputs_coalesce_tokens_the_consumer_has_not_read(make_engine):
    engine = await make_engine()
    gen = engine.generate(req("x", max_tokens=20))
    first = await anext(gen)
    await until(lambda: engine.stats().running == 0)  # the engine finished meanwhile
    rest = await anext(gen)
    assert rest.finished and rest.finish_reason == "length"
    assert len(first.token_ids) + len(rest.token_ids) == 20 and len(rest.token_ids) > 1
    with pytest.raises(StopAsyncIteration):
        await anext(gen)


async def test_output_is_a_function_of_the_context(make_engine):
    engine = await make_engine()
    prompt = tuple(b"resume me")

    async def gen(rid, context, n, **kw):
        return tokens(await run(engine, req(rid, n, context, **kw)))

    for kw in ({"temperature": 0}, {"temperature": 0.8, "seed": 7}):
        # Run alongside other requests: batch composition must not matter.
        full, *_ = await asyncio.gather(
            gen("full", prompt, 40, **kw), *(gen(f"o{i}", prompt[i:], 40) for i in range(3))
        )
        head = await gen("head", prompt, 12, **kw)
        tail = await gen("tail", prompt + tuple(head), 28, **kw)
        assert head + tail == full
        assert set(full) <= ALPHABET and len(set(full)) > 5

    assert await gen("g", prompt, 40, temperature=0) != await gen("s", prompt, 40, seed=7)
    assert await gen("g", prompt, 40, temperature=0) != await gen("p", b"other", 40, temperature=0)
    # Sampling without a seed: a fresh random seed per request.
    assert await gen("r1", prompt, 40) != await gen("r2", prompt, 40)


async def test_eos_ends_requests_unless_ignored(make_engine):
    always = await make_engine(eos_probability=1.0)
    outs = await run(always, req("x", max_tokens=10))
    assert outs[-1].finish_reason == "stop" and tokens(outs) == []
    outs = await run(always, req("y", max_tokens=10, ignore_eos=True))
    assert outs[-1].finish_reason == "length" and len(tokens(outs)) == 10

    some = await make_engine(eos_probability=0.2)
    runs = [await run(some, req(f"z{i}", max_tokens=300, temperature=0)) for i in range(2)]
    assert [r[-1].finish_reason for r in runs] == ["stop", "stop"]
    assert tokens(runs[0]) == tokens(runs[1]) and len(tokens(runs[0])) < 300
    assert some.stats().kv_used_tokens == 0


async def test_time_scale_zero_is_fast_and_does_not_starve_the_loop(make_engine):
    engine = await make_engine(max_running=64, kv_capacity_tokens=100_000)
    ticks = 0
    stop = False

    async def ticker():
        nonlocal ticks
        while not stop:
            await asyncio.sleep(0)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    start = time.monotonic()
    results = await asyncio.gather(*(run(engine, req(f"r{i}", max_tokens=16)) for i in range(200)))
    elapsed = time.monotonic() - start
    stop = True
    await tick_task

    assert all(r[-1].finish_reason == "length" and len(tokens(r)) == 16 for r in results)
    assert elapsed < 3.0
    assert engine.steps >= 16 * 4  # 200 requests in batches of 64
    assert ticks >= engine.steps  # the ticker ran at least once per engine step


async def test_invalid_requests_are_refused(make_engine):
    engine = await make_engine(time_scale=1.0, kv_capacity_tokens=100)
    for bad, message in [
        (req("a", model="other"), "not served"),
        (req("b", prompt=""), "empty prompt"),
        (req("c", max_tokens=0), "max_tokens"),
        (req("d", max_tokens=96), "KV capacity"),  # 5 + 96 > 100
    ]:
        with pytest.raises(EngineError, match=message):
            engine.generate(bad)
    with pytest.raises(EngineError, match="not served"):
        engine.tokenize("other", "hi")
    assert engine.tokenize("m", "hi") == [104, 105]

    task = asyncio.create_task(run(engine, req("dup", max_tokens=90)))
    await until(lambda: engine.stats().running == 1)
    with pytest.raises(EngineError, match="already running"):
        engine.generate(req("dup"))
    await engine.abort("dup")
    await task

    stopped = SimEngine(["m"], PROFILE)
    with pytest.raises(EngineError, match="start"):
        stopped.generate(req("x"))


async def test_load_warm_and_unload_models(make_engine):
    engine = await make_engine(time_scale=1.0, models=("a",))

    async def timed(coro):
        start = time.monotonic()
        await coro
        return time.monotonic() - start

    cold = await timed(engine.load_model("b"))
    assert cold >= 0.18  # load_ms 200
    assert engine.models() == ["a", "b"]
    assert await timed(engine.warm_model("c")) >= 0.18  # reading weights costs a load
    assert engine.models() == ["a", "b"]  # warm is not served
    assert await timed(engine.warm_model("c")) < cold / 2  # only once
    assert await timed(engine.load_model("c")) < cold / 2  # warm_load_ms 1
    assert engine.models() == ["a", "b", "c"]

    outs = await run(engine, req("on-b", max_tokens=3, model="b"))
    assert outs[-1].finish_reason == "length"

    running = asyncio.create_task(run(engine, req("on-a", max_tokens=1000, model="a")))
    await until(lambda: engine.stats().running == 1)
    await engine.unload_model("a")
    assert (await running)[-1].finish_reason == "abort"
    assert engine.models() == ["b", "c"] and engine.stats().kv_used_tokens == 0
    with pytest.raises(EngineError, match="not served"):
        engine.generate(req("x", model="a"))
    await engine.unload_model("a")  # not served: nothing to do


async def test_one_model_at_a_time_each_at_its_own_cost():
    slow = dataclasses.replace(PROFILE, max_running=2, load_ms=40, warm_load_ms=10)
    engine = SimEngine(["a", "b", "c"], PROFILE, time_scale=0.0, active=["a"],
                       profiles={"b": slow})
    await engine.start()
    try:
        assert engine.models() == ["a"] and engine.warm_models() == []
        assert engine.stats().max_running == 4
        await engine.unload_model("a")
        await engine.load_model("b")
        assert engine.models() == ["b"] and engine.warm_models() == ["a"]  # "a" stays warm
        assert engine.stats().max_running == 2  # steps cost what "b" costs
        assert engine.load_time_ms == 40  # b's cold load, not a's 200 ms
        await engine.unload_model("b")
        await engine.load_model("a")
        assert engine.load_time_ms == 40 + 1  # a's warm load
        await engine.warm_model("c")  # a warm start does the part of a cold load it can
        assert engine.load_time_ms == 40 + 1 + 199
    finally:
        await engine.stop()
    with pytest.raises(EngineError, match="active"):
        SimEngine(["a"], PROFILE, active=["z"])


async def test_stop_aborts_everything(make_engine):
    engine = await make_engine(time_scale=1.0)
    tasks = [asyncio.create_task(run(engine, req(f"r{i}", max_tokens=1000))) for i in range(6)]
    await until(lambda: engine.stats().running == 4)
    await engine.stop()
    results = await asyncio.gather(*tasks)
    assert all(r[-1].finish_reason == "abort" for r in results)
    assert engine.stats() == dataclasses.replace(engine.stats(), running=0, waiting=0)
    assert engine.stats().kv_used_tokens == 0


def test_profiles_load_and_are_checked(tmp_path):
    small = SimProfile.load(PROFILES / "sim-small.yaml")
    large = SimProfile.load(PROFILES / "sim-large.yaml")
    assert small.max_running == 64 and large.decode_step_ms > small.decode_step_ms
    assert small.warm_load_ms < small.load_ms and large.warm_load_ms < large.load_ms

    path = tmp_path / "p.yaml"
    good = dataclasses.asdict(PROFILE)
    for raw, message in [
        ({k: v for k, v in good.items() if k != "decode_step_ms"}, "missing keys.*decode_step_ms"),
        ({**good, "decode_stepms": 1}, "unknown keys.*decode_stepms"),
        ({**good, "max_running": 0}, "max_running must be a positive integer"),
        ({**good, "load_ms": -1}, "load_ms must be a non-negative number"),
        ({**good, "eos_probability": 1.5}, "eos_probability"),
    ]:
        path.write_text(config.yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=message):
            SimProfile.load(path)
    path.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        SimProfile.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        SimProfile.load(tmp_path / "missing.yaml")


def test_create_engine_from_stack_config(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.yaml").write_text(
        config.yaml.safe_dump(dataclasses.asdict(PROFILE))
    )
    (tmp_path / "stack.yaml").write_text(
        """
slo_classes: {interactive: {ttft_deadline_ms: 1000}}
models: {small: {max_model_len: 4096, max_tokens: 2048}}
workers:
  - {id: w0, listen: "127.0.0.1:1", models: [small], profile: profiles/p.yaml, time_scale: 0.5}
  - {id: w1, listen: "127.0.0.1:2", engine: sim, models: [small], profile: profiles/p.yaml}
  - {id: w2, listen: "127.0.0.1:3", engine: vllm, models: [small]}
  - {id: w3, listen: "127.0.0.1:4", engine: sim, models: [small], profile: p.yaml, scale: 2}
  - {id: w4, listen: "127.0.0.1:5", engine: tgi, models: [small]}
"""
    )
    stack = config.load(tmp_path / "stack.yaml")
    w0 = create_engine(stack.worker("w0"), stack)
    assert isinstance(w0, SimEngine) and w0.kind == "sim"
    assert w0.time_scale == 0.5 and w0.models() == ["small"] and w0.profile == PROFILE
    assert create_engine(stack.worker("w1"), stack).time_scale == 1.0
    with pytest.raises(ConfigError, match="needs the model's `path`"):
        create_engine(stack.worker("w2"), stack)  # a real engine needs weights to load
    with pytest.raises(EngineError, match="unknown engine kind 'tgi'"):
        create_engine(stack.worker("w4"), stack)
    with pytest.raises(ConfigError, match="scale"):
        create_engine(stack.worker("w3"), stack)

    default = config.load()
    engine = create_engine(default.worker("w0"), default)
    assert engine.profile == SimProfile.load(PROFILES / "sim-small.yaml")


async def test_requests_waiting_for_kv_leave_no_free_slots(make_engine):
    engine = await make_engine(time_scale=1.0, kv_capacity_tokens=160, max_running=8)
    # Each reserves 50 tokens: two run (100 used), then a third fits (150 used) and a fourth
    # waits: 10 tokens are free, so the KV is not full, but what waits already needs more.
    tasks = [asyncio.create_task(run(engine, req(f"r{i}", max_tokens=40, prompt="0123456789")))
             for i in range(2)]
    await until(lambda: engine.stats().running == 2)
    assert engine.free_slots() == 6
    more = [asyncio.create_task(run(engine, req(f"w{i}", max_tokens=40, prompt="0123456789")))
            for i in range(2)]
    await until(lambda: engine.stats().running == 3 and engine.stats().waiting == 1)
    assert engine.stats().kv_used_tokens == 150
    assert engine.free_slots() == 0  # batch room left, but what waits already fills the KV
    for t in tasks + more:
        t.cancel()


async def test_steps_keep_to_the_profiles_timeline_when_the_loop_falls_behind():
    engine = SimEngine(["m"], PROFILE, time_scale=1.0)
    loop = asyncio.get_running_loop()
    late = loop.time() - 0.5  # the loop was busy: the last step ended 0.5 s ago
    assert await engine._step_until(late, 10.0) == pytest.approx(late + 0.010)  # no sleep
    far = loop.time() - 5.0  # beyond MAX_LAG_S the lost time is let go
    now = loop.time()
    assert await engine._step_until(far, 10.0) >= now
    start = loop.time()
    end = await engine._step_until(None, 10.0)  # idle before: a step from now
    assert end >= start + 0.010 and loop.time() >= end
