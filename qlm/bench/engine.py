"""`qlm bench engine`: the issue's measurements on a real engine (the vLLM CPU build on the tiny
local models), in one run on one VllmEngine:

  hol       head-of-line blocking: a burst of long batch requests, then short interactive ones,
            sent straight to the engine (vLLM's queue in arrival order: the engine's priority
            scheduler with every priority equal, which is FCFS; and with priorities by deadline)
            and through the mesh (router, planner, worker in this process, on the same engine)
  overhead  one stream at a time, bare engine vs through the router: TTFT and time per token
  resume    an evicted request resumed with its KV loaded from CPU memory vs recomputed
  start     cold start of each model of a two-model pool vs warm activation

The mesh runs in this process (like the tests' stack): its servers are real gRPC servers on
loopback and its queue state is in a private Redis, but they share this process's event loop and
the 2 cores with the engine. See docs/benchmarks.md for what the figures mean.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import time
import uuid

import yaml

from qlm import config as qlm_config
from qlm.bench import percentile

ROOT = qlm_config.DEFAULT_CONFIG.parent.parent
VLLM_CPU_CONFIG = ROOT / "deploy" / "vllm-cpu.yaml"
PROFILE = ROOT / "deploy" / "profiles" / "vllm-cpu-tiny.yaml"
MODELS_DIR = ROOT / ".cache" / "models"
MODEL, OTHER = "small", "large"
SEEDS = {MODEL: 0, OTHER: 1}  # the tiny models of deploy/vllm-cpu.yaml
FIRST_TOKEN_ID = 3  # after the tiny tokenizer's special tokens
SECTIONS = ("hol", "overhead", "resume", "start")


# --- pure pieces (no engine: tested in tests/test_bench_engine.py) ----------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One request of a workload: when it is sent (s after the run starts) and what it asks."""

    at_s: float
    cls: str
    prompt: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class Timed:
    """One request as its client saw it; times in s from when it was sent."""

    cls: str
    at_s: float
    ttft_s: float
    last_s: float  # the last token
    tokens: int

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first."""
        return (self.last_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else 0.0


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def p(values: list[float], q: float) -> float:
    return percentile(sorted(values), q)


def tokens(rng: random.Random, n: int, vocab: int) -> tuple[int, ...]:
    """A random prompt: distinct prompts share no prefix, so no cache can shortcut them."""
    return tuple(rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n))


def hol_workload(seed: int, vocab: int, batch: int, batch_prompt: int, batch_tokens: int,
                 interactive: int, gap_s: float, every_s: float) -> list[Item]:
    """The burst at t=0 (prompts of 3/4 to 1x batch_prompt tokens), then one short interactive
    request every `every_s` from `gap_s` on."""
    rng = random.Random(f"hol:{seed}")
    burst = [Item(0.0, "batch", tokens(rng, rng.randint(batch_prompt * 3 // 4, batch_prompt),
                                       vocab), batch_tokens) for _ in range(batch)]
    return burst + [Item(gap_s + i * every_s, "interactive", tokens(rng, 32, vocab), 16)
                    for i in range(interactive)]


@dataclasses.dataclass(frozen=True)
class Run:
    """One replay of the workload on one target."""

    samples: list[Timed]
    wall_s: float
    kv: dict  # the KV connector's counters during the run (saves = evictions)
    load_avg: float = 0.0  # the machine's 1-minute load average at its end


def hol_row(target: str, runs: list[Run], deadline_s: float) -> dict:
    """A target's figures over its runs (rounds): TTFTs pooled, per-run figures averaged."""
    samples = [s for r in runs for s in r.samples]
    inter = [s.ttft_s for s in samples if s.cls == "interactive"]
    batch = [s for s in samples if s.cls == "batch"]
    done = [max((s.at_s + s.last_s for s in r.samples if s.cls == "batch"), default=0.0)
            for r in runs]
    return {
        "target": target, "interactive": len(inter),
        "ttft_p50_s": round(p(inter, 50), 3), "ttft_p99_s": round(p(inter, 99), 3),
        "slo_met": sum(t <= deadline_s for t in inter),
        "attainment": round(sum(t <= deadline_s for t in inter) / len(inter), 3) if inter
        else None,
        "batch_ttft_p50_s": round(p([s.ttft_s for s in batch], 50), 3),
        # the engine's speed during this row (the shared machine's load varies)
        "batch_tpot_p50_ms": round(1000 * p([s.tpot_s for s in batch], 50), 1),
        "batch_done_s": round(sum(done) / len(done), 3) if done else 0.0,
        "runs": len(runs), "wall_s": [round(r.wall_s, 3) for r in runs],
        "evictions": sum(r.kv.get("saves", 0) for r in runs),
        "loaded_tokens": sum(r.kv.get("loaded_tokens", 0) for r in runs),
        "load_avg_1m": [round(r.load_avg, 1) for r in runs],
    }


def counter_delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}


def hol_table(section: dict) -> str:
    d = section["params"]["interactive_deadline_ms"] / 1000
    lines = ["| target | interactive TTFT p50 (s) | p99 (s) | SLO met (TTFT <= "
             f"{d:g} s) | batch TTFT p50 (s) | batch ms/token p50 | last batch done (s, mean) | "
             "evictions (all rounds) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in section["rows"]:
        lines.append(f"| {r['target']} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                     f"{r['slo_met']}/{r['interactive']} | {r['batch_ttft_p50_s']:.2f} | "
                     f"{r['batch_tpot_p50_ms']:.1f} | {r['batch_done_s']:.1f} | "
                     f"{r['evictions']} |")
    for name, c in section["ratios"].items():
        lines.append(f"\n{name}: interactive TTFT p50 {c['p50']}x, p99 {c['p99']}x lower; "
                     f"SLO attainment {c['attainment_base']} -> {c['attainment']}")
    return "\n".join(lines)


def hol_ratios(rows: list[dict]) -> dict:
    """Every other row against the bare FCFS one: how many times lower its interactive TTFT."""
    base = next((r for r in rows if r["target"] == "bare fcfs"), None)
    if base is None:
        return {}
    return {f"bare fcfs / {r['target']}": {
        "p50": ratio(base["ttft_p50_s"], r["ttft_p50_s"]),
        "p99": ratio(base["ttft_p99_s"], r["ttft_p99_s"]),
        "attainment_base": base["attainment"], "attainment": r["attainment"]}
        for r in rows if r is not base}


def overhead_summary(bare: list[Timed], mesh: list[Timed]) -> dict:
    rows = {}
    for name, samples in (("bare", bare), ("mesh", mesh)):
        rows[name] = {"requests": len(samples),
                      "ttft_p50_ms": round(1000 * p([s.ttft_s for s in samples], 50), 2),
                      "tpot_p50_ms": round(1000 * p([s.tpot_s for s in samples], 50), 2)}
    b, m = rows["bare"], rows["mesh"]
    rows["mesh / bare"] = {"ttft_p50_ms": ratio(m["ttft_p50_ms"], b["ttft_p50_ms"]),
                           "tpot_p50_ms": ratio(m["tpot_p50_ms"], b["tpot_p50_ms"])}
    rows["mesh - bare (ms)"] = {"ttft_p50_ms": round(m["ttft_p50_ms"] - b["ttft_p50_ms"], 2),
                                "tpot_p50_ms": round(m["tpot_p50_ms"] - b["tpot_p50_ms"], 2)}
    return rows


def overhead_table(rows: dict) -> str:
    lines = ["| target | TTFT p50 (ms) | time per output token p50 (ms) |",
             "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r['ttft_p50_ms']} | {r['tpot_p50_ms']} |" for name, r in rows.items()]
    return "\n".join(lines)


def resume_rows(trials: list[dict]) -> list[dict]:
    """Per context length: p50 time to the first new token resumed vs recomputed."""
    out = []
    for context in sorted({t["context"] for t in trials}):
        of = {mode: [t for t in trials if t["context"] == context and t["mode"] == mode]
              for mode in ("resume", "recompute")}
        ms = {mode: round(1000 * p([t["ttft_s"] for t in ts], 50), 1) for mode, ts in of.items()}
        out.append({"context": context, "trials": len(of["resume"]),
                    "resume_ms": ms["resume"], "recompute_ms": ms["recompute"],
                    "recompute / resume": ratio(ms["recompute"], ms["resume"]),
                    "loaded_resume": [t["loaded_tokens"] for t in of["resume"]],
                    "loaded_recompute": [t["loaded_tokens"] for t in of["recompute"]]})
    return out


def resume_table(rows: list[dict]) -> str:
    lines = ["| context tokens | resume p50 (ms) | recompute p50 (ms) | recompute / resume | "
             "tokens loaded: resume | recompute |", "| ---: | ---: | ---: | ---: | --- | --- |"]
    lines += [f"| {r['context']} | {r['resume_ms']} | {r['recompute_ms']} | "
              f"{r['recompute / resume']} | {_short(r['loaded_resume'])} | "
              f"{_short(r['loaded_recompute'])} |" for r in rows]
    return "\n".join(lines)


def _short(values: list[int]) -> str:
    return ", ".join(map(str, values))


def start_table(rows: list[dict]) -> str:
    lines = ["| model | cold start (s) | warm start (ms) | swap to it (ms) | "
             "first TTFT after the swap (ms) |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['cold_start_s']:.1f} | {r['warm_start_ms']:.3f} | "
              f"{r['swap_ms']:.3f} | {r['first_ttft_ms']:.1f} |" for r in rows]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    s = report["sections"]
    parts = []
    if "hol" in s:
        h = s["hol"]["params"]
        parts += [f"Head-of-line blocking ({h['rounds']} rounds per target, interactive TTFTs "
                  f"pooled): {h['batch']} batch requests ({h['batch_prompt']} "
                  f"prompt tokens at most, {h['batch_tokens']} output) at t=0, then "
                  f"{h['interactive']} interactive (32 + 16 tokens) every {h['every_s']} s "
                  f"from t={h['gap_s']} s; max_num_seqs {report['params']['max_num_seqs']}; "
                  f"one wave (max_num_seqs batch requests alone) took {h['wave_s']} s",
                  hol_table(s["hol"])]
    if "overhead" in s:
        o = s["overhead"]["params"]
        parts += [f"Single stream: {o['requests']} requests per target, alternating, "
                  f"{o['prompt']} prompt tokens, {o['max_tokens']} output; mesh policy "
                  f"{o['policy']}", overhead_table(s["overhead"]["rows"])]
    if "resume" in s:
        parts += [f"Resume vs recompute: evicted after {s['resume']['params']['generated']} "
                  "tokens, time from resubmission to the first new token",
                  resume_table(s["resume"]["rows"])]
    if "start" in s:
        parts += ["Model pool (small and large, one engine each): cold vs warm start",
                  start_table(s["start"]["rows"])]
    return "\n\n".join(parts)


# --- clients -----------------------------------------------------------------------------------


async def bare_one(engine, item: Item, rid: str, priority: int = 0) -> Timed:
    from qlm.engines.base import EngineRequest

    request = EngineRequest(rid, MODEL, item.prompt, item.max_tokens, temperature=0.0,
                            ignore_eos=True, priority=priority)
    started, first, last, n = time.perf_counter(), None, 0.0, 0
    async for out in engine.generate(request):
        if out.token_ids:
            last = time.perf_counter() - started
            first = last if first is None else first
            n += len(out.token_ids)
        if out.finished and out.finish_reason != "length":
            raise RuntimeError(f"{rid} ended with {out.finish_reason}: {out.error}")
    return Timed(item.cls, item.at_s, first or 0.0, last, n)


async def mesh_one(stub, item: Item) -> Timed:
    from qlm.v1 import router_pb2

    request = router_pb2.GenerateRequest(
        model=MODEL, prompt_token_ids=item.prompt, max_tokens=item.max_tokens,
        slo_class=item.cls, sampling=router_pb2.SamplingParams(temperature=0.0, ignore_eos=True))
    started, first, last, n = time.perf_counter(), None, 0.0, 0
    async for m in stub.Generate(request):
        if m.token_ids:
            last = time.perf_counter() - started
            first = last if first is None else first
            n += len(m.token_ids)
        if m.HasField("finished") and m.finished.reason != router_pb2.FINISH_REASON_LENGTH:
            raise RuntimeError(f"{m.request_id} ended with {m.finished.reason}: "
                               f"{m.finished.error}")
    return Timed(item.cls, item.at_s, first or 0.0, last, n)


async def replay(workload: list[Item], send) -> tuple[list[Timed], float]:
    """Sends every item at its time (send(item) -> Timed); returns the samples and the wall
    time until the last one ended."""
    started = time.perf_counter()

    async def fire(item: Item) -> Timed:
        await asyncio.sleep(max(0.0, item.at_s - (time.perf_counter() - started)))
        return await send(item)

    samples = await asyncio.gather(*(fire(i) for i in workload))
    return list(samples), time.perf_counter() - started


async def idle(engine, timeout_s: float = 60.0) -> None:
    """Waits until the engine runs and queues nothing (the previous run's aborts included)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s, inst = engine.stats(), engine.instances[MODEL].stats
        if not s.running and not s.waiting and not inst.running and not inst.waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine is still busy after {timeout_s} s: {s}")
        await asyncio.sleep(0.1)


# --- the mesh in this process ------------------------------------------------------------------


def write_config(folder: pathlib.Path, redis_url: str, policy: str, args,
                 models: dict[str, pathlib.Path], deadline_ms: int) -> pathlib.Path:
    """deploy/vllm-cpu.yaml's settings (planner cadence, leases, group size) with this run's
    SLO classes and one worker on the bench's engine. The qlm policy reads the measured
    profile; its max_running is set to this engine's max_num_seqs (a setting, not a
    measurement), else the planner would count on a batch of 16 where only N fit."""
    raw = yaml.safe_load(VLLM_CPU_CONFIG.read_text())
    raw["redis"] = {"url": redis_url}
    raw["router"]["listen"] = raw["planner"]["listen"] = "127.0.0.1:0"
    raw["planner"]["policy"] = policy
    raw["slo_classes"] = {
        "interactive": {"ttft_deadline_ms": deadline_ms, "max_queued": 1000},
        "batch": {"ttft_deadline_ms": args.batch_deadline_ms, "max_queued": 1000}}
    raw["default_slo_class"] = "interactive"
    for name, path in models.items():
        raw["models"][name]["path"] = str(path)
    profile = yaml.safe_load(pathlib.Path(args.profile).read_text())
    profile["max_running"] = args.max_num_seqs
    (folder / "profile.yaml").write_text(yaml.safe_dump(profile))
    raw["workers"] = [{"id": "w0", "listen": "127.0.0.1:0", "engine": "vllm", "models": [MODEL],
                       "max_num_seqs": args.max_num_seqs, "prefix_caching": False,
                       "profile": str(folder / "profile.yaml")}]
    path = folder / f"stack-{policy}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def start_mesh(config_path: pathlib.Path, redis_url: str, engine):
    """Router, planner and worker w0 in this process, the worker on the bench's engine."""
    from qlm.inprocess import InProcessStack

    stack = await InProcessStack(redis_url, config_path, workers=False,
                                 prefix=f"bench{uuid.uuid4().hex[:8]}:").start()
    await stack.start_worker("w0", engine=engine)
    return stack


# --- the measurements --------------------------------------------------------------------------


async def one_wave(engine, args, vocab: int) -> float:
    """Seconds the engine takes to serve one full batch (max_num_seqs) of the burst's batch
    requests alone: the unit the burst's timing and the interactive deadline are set in, so
    the experiment keeps its shape whatever the shared machine's speed is right now."""
    wave = hol_workload(args.seed + 1, vocab, args.max_num_seqs, args.batch_prompt,
                        args.batch_tokens, 0, 0.0, 0.0)
    await idle(engine)
    _, wall = await replay(wave, lambda i: bare_one(engine, i, f"wave-{uuid.uuid4().hex[:8]}"))
    return wall


async def measure_hol(engine, args, mesh_config, redis_url: str, vocab: int) -> dict:
    wave_s = await one_wave(engine, args, vocab)
    deadline_ms = args.interactive_deadline_ms or round(1000 * args.deadline_waves * wave_s)
    deadline_s = deadline_ms / 1000
    gap_s, every_s = round(args.gap * wave_s, 3), round(args.every * wave_s, 3)
    print(f"  one wave of {args.max_num_seqs} batch requests: {wave_s:.2f} s; interactive "
          f"deadline {deadline_ms} ms", flush=True)
    workload = hol_workload(args.seed, vocab, args.batch, args.batch_prompt, args.batch_tokens,
                            args.interactive, gap_s, every_s)
    deadlines = {"interactive": deadline_ms, "batch": args.batch_deadline_ms}
    targets = ([f"bare {o}" for o in args.bare.split(",")]
               + [f"mesh {x}" for x in args.policies.split(",")])
    runs: dict[str, list[Run]] = {t: [] for t in targets}
    for k in range(args.rounds):
        # every other round backwards, so a drift in the machine's load hits all targets alike
        for target in (targets if k % 2 == 0 else targets[::-1]):
            runs[target].append(await hol_run(engine, target, workload, deadlines,
                                              mesh_config, deadline_ms, redis_url))
            r = runs[target][-1]
            print(f"  round {k + 1} {target}: interactive TTFT p50 "
                  f"{p([s.ttft_s for s in r.samples if s.cls == 'interactive'], 50):.2f} s, "
                  f"wall {r.wall_s:.1f} s, evictions {r.kv.get('saves', 0)}", flush=True)
    rows = [hol_row(t, runs[t], deadline_s) for t in targets]
    params = {k: getattr(args, k) for k in ("batch", "batch_prompt", "batch_tokens",
                                            "interactive", "batch_deadline_ms", "seed",
                                            "rounds")}
    params.update(wave_s=round(wave_s, 3), interactive_deadline_ms=deadline_ms, gap_s=gap_s,
                  every_s=every_s)
    return {"params": params, "rows": rows, "ratios": hol_ratios(rows),
            "samples": {t: [[dataclasses.asdict(s) for s in r.samples] for r in rs]
                        for t, rs in runs.items()}}


async def hol_run(engine, target: str, workload: list[Item], deadlines: dict, mesh_config,
                  deadline_ms: int, redis_url: str) -> Run:
    """One replay on `target`: "bare fcfs" (every priority equal, so vLLM's priority scheduler
    keeps arrival order), "bare priority" (lower first: the deadline, as the mesh's worker sets
    it) or "mesh POLICY" (a fresh stack on the same engine)."""
    kind, name = target.split(" ", 1)
    await idle(engine)
    before = engine.connector_totals(MODEL)
    if kind == "bare":
        samples, wall = await replay(workload, lambda i: bare_one(
            engine, i, f"hol-{uuid.uuid4().hex[:8]}",
            deadlines[i.cls] if name == "priority" else 0))
    else:
        mesh = await start_mesh(mesh_config(name, deadline_ms), redis_url, engine)
        router = mesh.router()  # one channel for the run, as a client would keep
        try:
            samples, wall = await replay(workload, lambda i: mesh_one(router, i))
        finally:
            await mesh.stop()
    return Run(samples, wall, counter_delta(before, engine.connector_totals(MODEL)),
               os.getloadavg()[0])


async def measure_overhead(engine, args, mesh_config, redis_url: str, vocab: int) -> dict:
    """Alternates bare and mesh requests, one at a time, so drift on the shared machine hits
    both alike; the first pair warms up and is not counted."""
    policies = args.policies.split(",")
    policy = "qlm" if "qlm" in policies else policies[0]
    rng = random.Random(f"overhead:{args.seed}")
    await idle(engine)
    mesh = await start_mesh(mesh_config(policy, 2000), redis_url, engine)
    router = mesh.router()
    bare, through = [], []
    try:
        for k in range(args.overhead_requests + 1):
            item = Item(0.0, "interactive", tokens(rng, 64, vocab), args.overhead_tokens)
            b = await bare_one(engine, item, f"ovh-{uuid.uuid4().hex[:8]}")
            m = await mesh_one(router, item)
            if k:
                bare.append(b)
                through.append(m)
    finally:
        await mesh.stop()
    return {"params": {"requests": args.overhead_requests, "prompt": 64,
                       "max_tokens": args.overhead_tokens, "policy": policy},
            "rows": overhead_summary(bare, through),
            "samples": {"bare": [dataclasses.asdict(s) for s in bare],
                        "mesh": [dataclasses.asdict(s) for s in through]}}


async def resume_trial(engine, context: int, mode: str, generated: int, rng, vocab) -> dict:
    """Runs a request of `context` prompt tokens until it has `generated` tokens, evicts it,
    then resubmits prompt + output and times the first new token. "recompute" forgets the
    saved KV first (as the tests do), so vLLM prefills the whole context again."""
    from qlm.engines.base import EngineRequest

    rid = f"rs-{context}-{uuid.uuid4().hex[:8]}"
    prompt = tokens(rng, context, vocab)
    start = engine.connector_totals(MODEL)
    out, evicted = [], None
    async for o in engine.generate(EngineRequest(rid, MODEL, prompt, 64, temperature=0.0,
                                                 ignore_eos=True)):
        out += o.token_ids
        if evicted is None and len(out) >= generated:
            evicted = await engine.evict(rid)
    if evicted is None:
        raise RuntimeError(f"{rid} finished before it could be evicted")
    await idle(engine)
    await asyncio.sleep(0.2)  # the copy to CPU memory runs with the engine's next step
    totals = engine.connector_totals(MODEL)
    if mode == "recompute":
        engine.instances[MODEL].swapped.discard(rid)
    resumed = Item(0.0, "resume", prompt + evicted.generated_token_ids, 2)
    t = await bare_one(engine, resumed, rid)
    after = engine.connector_totals(MODEL)
    return {"context": context, "mode": mode, "ttft_s": t.ttft_s,
            "context_at_resume": len(resumed.prompt),
            "saved_tokens": totals.get("saved_tokens", 0) - start.get("saved_tokens", 0),
            "loaded_tokens": after.get("loaded_tokens", 0) - totals.get("loaded_tokens", 0)}


async def measure_resume(engine, args, vocab: int) -> dict:
    rng = random.Random(f"resume:{args.seed}")
    # the first load and save of a run pay one-time costs (allocations, first calls): not counted
    await resume_trial(engine, 256, "resume", args.generated, rng, vocab)
    trials = []
    for context in (int(c) for c in args.contexts.split(",")):
        for k in range(args.resume_trials):
            # alternate which mode goes first, so drift on the shared machine hits both alike
            for mode in (("resume", "recompute") if k % 2 == 0 else ("recompute", "resume")):
                trials.append(await resume_trial(engine, context, mode, args.generated, rng,
                                                 vocab))
    return {"params": {"generated": args.generated, "trials": args.resume_trials},
            "rows": resume_rows(trials), "trials": trials}


async def measure_start(engine, cold_small_s: float, vocab: int) -> dict:
    """The pool's second model starts cold (its own engine), then the worker swaps to it and
    back: a warm start on a CPU build is the activation of an engine already in memory."""
    rng = random.Random("start")
    await engine.warm_model(OTHER)
    cold = {MODEL: cold_small_s, OTHER: engine.timings["cold_start_s"]}
    rows = []
    for model, leaving in ((OTHER, MODEL), (MODEL, OTHER)):
        started = time.perf_counter()
        await engine.unload_model(leaving)
        await engine.load_model(model)
        swap_s = time.perf_counter() - started
        warm_s = engine.timings["warm_start_s"]
        first = await _first_ttft(engine, model, tokens(rng, 32, vocab))
        rows.append({"model": model, "cold_start_s": round(cold[model], 2),
                     "warm_start_ms": round(1000 * warm_s, 3), "swap_ms": round(1000 * swap_s, 3),
                     "first_ttft_ms": round(1000 * first, 1)})
    return {"rows": rows}


async def _first_ttft(engine, model: str, prompt: tuple[int, ...]) -> float:
    from qlm.engines.base import EngineRequest

    started = time.perf_counter()
    first = None
    async for out in engine.generate(EngineRequest(f"st-{uuid.uuid4().hex[:8]}", model, prompt,
                                                   4, temperature=0.0, ignore_eos=True)):
        if out.token_ids and first is None:
            first = time.perf_counter() - started
    return first or 0.0


# --- running -----------------------------------------------------------------------------------


def _profile(args) -> dict | None:
    path = pathlib.Path(args.profile)
    if not path.is_file():
        return None
    return {**yaml.safe_load(path.read_text()), "max_running": args.max_num_seqs,
            "path": str(path)}


def ensure_models(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    from qlm.engines.tiny_model import is_tiny_model, make_tiny_model

    out = {}
    for name, seed in SEEDS.items():
        out[name] = folder / f"tiny-{name}"
        if not is_tiny_model(out[name]):
            print(f"making tiny model {name!r} (seed {seed}) in {out[name]}", flush=True)
            make_tiny_model(out[name], seed)
    return out


async def run(args) -> dict:
    from qlm.engines.tiny_model import VOCAB
    from qlm.engines.vllm_engine import VllmEngine, VllmModel, VllmOptions
    from qlm.redis_server import EmbeddedRedis

    sections = args.sections.split(",")
    models = ensure_models(pathlib.Path(args.models))
    max_len = qlm_config.load(VLLM_CPU_CONFIG).models[MODEL].max_model_len
    # prefix caching off: a recompute must really recompute, and no prompt may shortcut another
    options = VllmOptions(max_num_seqs=args.max_num_seqs, prefix_caching=False)
    engine = VllmEngine([VllmModel(n, str(path), max_len) for n, path in models.items()],
                        [MODEL], options)
    report = {"benchmark": "engine",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "params": {"max_num_seqs": args.max_num_seqs, "block_size": options.block_size,
                         "enforce_eager": options.enforce_eager, "prefix_caching": False,
                         "models": {n: str(p) for n, p in models.items()},
                         # what the qlm policy's estimator read (max_running: see write_config)
                         "qlm_profile": _profile(args)},
              "command": "qlm bench engine " + " ".join(sys.argv[3:]), "sections": {},
              "load_avg_1m_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="qlm-bench-engine-") as folder, \
            EmbeddedRedis() as redis:
        print(f"starting the engine ({MODEL}, max_num_seqs {args.max_num_seqs})", flush=True)
        await engine.start()
        cold_small_s = engine.timings["cold_start_s"]
        print(f"  cold start {cold_small_s:.1f} s", flush=True)

        def mesh_config(policy, deadline_ms):
            return write_config(pathlib.Path(folder), redis.url, policy, args, models,
                                deadline_ms)

        try:
            s = report["sections"]
            if "hol" in sections:
                print("head-of-line blocking", flush=True)
                s["hol"] = await measure_hol(engine, args, mesh_config, redis.url, VOCAB)
            if "overhead" in sections:
                print("single-stream overhead", flush=True)
                s["overhead"] = await measure_overhead(engine, args, mesh_config, redis.url,
                                                       VOCAB)
            if "resume" in sections:
                print("resume vs recompute", flush=True)
                s["resume"] = await measure_resume(engine, args, VOCAB)
            if "start" in sections:
                print("cold vs warm start", flush=True)
                s["start"] = await measure_start(engine, cold_small_s, VOCAB)
        finally:
            await engine.stop()
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    return report


def main(args) -> int:
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        print(f"qlm bench engine: unknown sections {sorted(unknown)} (known: {SECTIONS})",
              file=sys.stderr)
        return 2
    if "qlm" in args.policies.split(",") and not pathlib.Path(args.profile).is_file():
        print(f"qlm bench engine: the qlm policy needs an engine profile ({args.profile}; "
              "`qlm profile` writes one), or use --policies edf", file=sys.stderr)
        return 2
    # vLLM logs every engine step's setup at INFO; the tables are what this prints
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from qlm.serving import run as run_loop

    result = {}

    async def go():
        result["report"] = await run(args)

    try:
        run_loop(go(), "qlm bench engine")
    except ImportError as e:
        print(f"qlm bench engine needs the vllm-cpu (or vllm) extra: {e}", file=sys.stderr)
        return 2
    report = result["report"]
    print("\n" + format_report(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def add_arguments(p) -> None:
    """The command line of `qlm bench engine` (qlm/cli.py)."""
    p.add_argument("--sections", default=",".join(SECTIONS), help="which measurements")
    p.add_argument("--max-num-seqs", type=int, default=4,
                   help="the engine's batch, and so the worker's backpressure")
    p.add_argument("--batch", type=int, default=12, help="batch requests in the burst")
    p.add_argument("--batch-prompt", type=int, default=1024, help="their largest prompt")
    p.add_argument("--batch-tokens", type=int, default=256, help="their output tokens")
    p.add_argument("--interactive", type=int, default=6, help="interactive requests")
    p.add_argument("--gap", type=float, default=0.2,
                   help="waves from the burst to the first interactive request (a wave: the "
                   "time one full batch of batch requests takes alone, measured first)")
    p.add_argument("--every", type=float, default=0.1, help="waves between interactive ones")
    p.add_argument("--deadline-waves", type=float, default=0.5,
                   help="the interactive TTFT deadline, in waves")
    p.add_argument("--interactive-deadline-ms", type=int, default=0,
                   help="a fixed interactive deadline instead (0: --deadline-waves)")
    p.add_argument("--batch-deadline-ms", type=int, default=600000)
    p.add_argument("--rounds", type=int, default=3, help="replays of the burst per target")
    p.add_argument("--bare", default="fcfs,priority",
                   help="the engine alone: fcfs (all priorities equal), priority (by deadline)")
    p.add_argument("--policies", default="edf,qlm", help="planner policies for the mesh")
    p.add_argument("--profile", default=str(PROFILE), help="engine profile for the qlm policy")
    p.add_argument("--overhead-requests", type=int, default=20)
    p.add_argument("--overhead-tokens", type=int, default=32)
    p.add_argument("--contexts", default="256,512,1024,1536")
    p.add_argument("--resume-trials", type=int, default=3)
    p.add_argument("--generated", type=int, default=8, help="tokens before the eviction")
    p.add_argument("--models", default=str(MODELS_DIR), help="where the tiny models are made")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
