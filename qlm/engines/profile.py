"""`qlm profile`: measures a real vLLM engine and writes the engine profile that the sim engine,
the simulator and the qlm planner's estimator read (the SimProfile format).

What it measures, on an engine it starts from the stack config's worker entry:
- prefill_ms_per_token: the slope of time-to-first-token over prompt length (one request at a
  time, so the fixed per-step cost cancels out);
- decode_step_ms and decode_ms_per_seq: a straight line through the time per decode step at
  several batch sizes (all requests of a batch start together and run to the same length);
- kv_capacity_tokens: the engine's KV blocks times the block size; max_running: max_num_seqs;
- max_batched_tokens: the engine's token budget per step when it prefills in chunks (its
  scheduler's max_num_batched_tokens; 0 when chunked prefill is off);
- load_ms: a cold start of the model (engine start-up included); warm_load_ms: activating it
  again once it is warm (the pool keeps it started; on a GPU it wakes from sleep level 1).
"""

from __future__ import annotations

import asyncio
import datetime
import platform
import statistics
import time
import uuid

from qlm import config as qlm_config
from qlm.engines.base import EngineRequest

PROMPT_LENGTHS = (64, 256, 512, 1024)
BATCH_SIZES = (1, 2, 4, 8)
DECODE_TOKENS = 64
REPEATS = 5


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x; returns (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


async def _run(engine, model: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """Seconds to the first token and to the last."""
    started = time.perf_counter()
    first = None
    async for out in engine.generate(EngineRequest(
            f"profile-{uuid.uuid4().hex[:8]}", model, tuple(prompt), max_tokens,
            temperature=0.0, ignore_eos=True)):
        if first is None and out.token_ids:
            first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


async def measure(engine, model: str, log=print) -> dict:
    """The profile's numbers for `model` on a started engine that serves it."""
    vocab = 200  # token ids every tiny or real tokenizer has
    await _run(engine, model, list(range(3, 35)), 4)  # warm-up: first-call costs
    ttft = {}
    for n in PROMPT_LENGTHS:
        prompt = [3 + (i * 7) % vocab for i in range(n)]
        # the fastest of a few runs: on a shared machine noise only ever adds time
        ttft[n] = min([(await _run(engine, model, prompt, 1))[0] for _ in range(REPEATS)])
        log(f"  prefill {n:>5} tokens: {ttft[n] * 1000:8.2f} ms")
    _, prefill_s = fit(list(ttft), list(ttft.values()))
    steps = {}
    for b in BATCH_SIZES:
        runs = []
        for _ in range(REPEATS):
            results = await asyncio.gather(*[
                _run(engine, model, [3 + i, 4 + i, 5 + i, 6 + i], DECODE_TOKENS)
                for i in range(b)])
            runs.append(statistics.median((total - first) / (DECODE_TOKENS - 1)
                                          for first, total in results))
        steps[b] = min(runs)
        log(f"  decode batch {b:>3}: {steps[b] * 1000:8.2f} ms per step")
    step_s, per_seq_s = fit(list(steps), list(steps.values()))
    return {
        "prefill_ms_per_token": round(max(prefill_s, 0.0) * 1000, 4),
        "decode_step_ms": round(max(step_s, 0.0) * 1000, 3),
        "decode_ms_per_seq": round(max(per_seq_s, 0.0) * 1000, 4),
        "raw_ttft_ms": {n: round(s * 1000, 2) for n, s in ttft.items()},
        "raw_step_ms": {b: round(s * 1000, 3) for b, s in steps.items()},
    }


def render(profile: dict, command: str) -> str:
    today = datetime.date.today().isoformat()
    return f"""# Engine profile MEASURED by `{command}` on {today}
# ({platform.machine()}, {platform.processor() or 'cpu'}; a shared machine, so +-20% is noise).
# Read by the sim engine, the simulator and the qlm planner's estimator (SimProfile).
# Raw points: TTFT by prompt length (ms) {profile['raw_ttft_ms']},
# decode step by batch size (ms) {profile['raw_step_ms']}.
max_running: {profile['max_running']}
kv_capacity_tokens: {profile['kv_capacity_tokens']}
# slope of TTFT over prompt length
prefill_ms_per_token: {profile['prefill_ms_per_token']}
# a line through the decode step time at batch sizes {list(profile['raw_step_ms'])}
decode_step_ms: {profile['decode_step_ms']}
decode_ms_per_seq: {profile['decode_ms_per_seq']}
# a cold start: the engine's processes, weights and KV cache allocation
load_ms: {profile['load_ms']}
# activating a warm model of the worker's pool
warm_load_ms: {profile['warm_load_ms']}
# benchmarks and demos run to max_tokens (ignore_eos); real traffic ends earlier
eos_probability: 0.0
# tokens one step holds under chunked prefill (the scheduler's max_num_batched_tokens; 0: off)
max_batched_tokens: {profile['max_batched_tokens']}
"""


async def profile_worker(config_path: str, worker_id: str, model: str | None, out: str,
                         command: str) -> dict:
    from qlm.engines import create_engine
    from qlm.launcher import make_missing_models

    cfg = qlm_config.load(config_path)
    worker = cfg.worker(worker_id)
    if worker.engine != "vllm":
        raise qlm_config.ConfigError(f"workers.{worker_id} is a {worker.engine} engine; "
                                     "qlm profile measures vllm engines")
    model = model or worker.models[0]
    make_missing_models(cfg)
    engine = create_engine(worker, cfg)
    engine.initial = []  # started below, timed
    await engine.start()
    try:
        started = time.perf_counter()
        await engine.load_model(model)
        load_s = time.perf_counter() - started
        print(f"{worker_id}/{model}: cold start {load_s:.1f} s")
        result = await measure(engine, model)
        sched = engine.instances[model].llm.vllm_config.scheduler_config
        chunked = getattr(sched, "enable_chunked_prefill", False)
        await engine.unload_model(model)
        started = time.perf_counter()
        await engine.load_model(model)
        warm_s = time.perf_counter() - started
        result |= {"max_running": engine.options.max_num_seqs,
                   "kv_capacity_tokens": engine.instances[model].kv_capacity_tokens,
                   "max_batched_tokens": sched.max_num_batched_tokens if chunked else 0,
                   "load_ms": round(load_s * 1000), "warm_load_ms": round(warm_s * 1000, 3)}
    finally:
        await engine.stop()
    with open(out, "w") as f:
        f.write(render(result, command))
    print(f"wrote {out}")
    return result
