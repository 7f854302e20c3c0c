"""`qlm bench live`: a scenario's requests replayed through the running stack (real Redis, the
real planner service, a router, sim workers, each its own process), one stack per policy in
the same run, beside the discrete-event simulator's figures for the very same requests.

Time scaling. Everything that takes time is multiplied by one factor `s` (--time-scale): the
engine profiles' durations (a step of the modelled hardware takes s times as long here), the
arrival times, the SLO deadlines and the planner's cadence. The workers run
time_scale 1 on the scaled profiles rather than time_scale s on the original ones because the
planner builds its waiting-time estimator from the profile files and does not read time_scale:
with scaled profiles the engine, the estimator and the deadlines share one clock. The simulator
runs that same scaled world (scaled profiles, arrivals, deadlines and plan cadence), so the
only differences left are the stack's own: processes, Redis round trips, gRPC, how workers
claim work, and a shared CPU. TTFTs are reported in trace seconds (measured seconds divided
by s); attainment is unit-free.

The comparison is within ATTAINMENT_TOLERANCE (absolute, overall and per class; see
docs/benchmarks.md for how it was chosen).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import random
import sys
import tempfile

import grpc
import yaml

from qlm import config as qlm_config
from qlm.bench import percentile
from qlm.bench import sim as bench_sim
from qlm.bench.mesh import child_pids, cpu_seconds
from qlm.engines.sim import SimProfile
from qlm.launcher import Stack, dial_address
from qlm.redis_server import EmbeddedRedis, free_port
from qlm.sim import get_scenario, load_trace, scale_load
from qlm.sim.scenarios import MODELS, SimRequest
from qlm.sim.simulator import Simulation
from qlm.sim.traces import TraceRequest
from qlm.v1 import (
    planner_pb2,
    planner_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

ATTAINMENT_TOLERANCE = 0.05
POLICY_NAMES = ("fcfs", "priority", "edf", "qlm")
DURATIONS = ("prefill_ms_per_token", "decode_step_ms", "decode_ms_per_seq", "load_ms",
             "warm_load_ms")
CHANNELS = 8  # client connections to the router; streams are spread over them
MAX_GROUP_SIZE = 32
PLAN_DEBOUNCE_S = 0.02  # the planner service's (services/planner/loop.py DEBOUNCE_S)
SPEED_BAND = 0.05  # engine speed change for the simulator's sensitivity band
DEBOUNCE_JITTER_S = (0.01, 0.03, 0.04)  # planner debounces besides PLAN_DEBOUNCE_S, for it too
TIMING_BAND = 0.1  # planner cadence change, for it too
REDIS_POOL = 4096  # Redis connections each service may open (see run_stack)


# --- inputs ----------------------------------------------------------------------------------


def synthetic_trace(n: int, seed: int = 0, rate_per_s: float = 5.5) -> list[TraceRequest]:
    """A seeded stand-in for the Azure 2023 conversation trace, so the command runs from a
    fresh clone: Poisson arrivals at its mean rate, log-normal prompt and output lengths with
    about its medians (1,020 and 129 tokens) and means (1,155 and 211)."""
    rng = random.Random(f"{seed}:synthetic-trace")
    t, out = 0.0, []
    for _ in range(n):
        prompt = min(4096, max(16, round(rng.lognormvariate(math.log(1020), 0.5))))
        output = min(1000, max(1, round(rng.lognormvariate(math.log(129), 1.0))))
        out.append(TraceRequest(t, prompt, output))
        t += rng.expovariate(rate_per_s)
    return out


def scaled_profile(profile: SimProfile, s: float) -> SimProfile:
    return dataclasses.replace(profile, **{k: getattr(profile, k) * s for k in DURATIONS})


def live_fleet(scenario, profiles_dir: pathlib.Path, s: float):
    """The scenario's fleet with time-scaled profiles."""
    fleet = bench_sim.load_profiles(scenario.instances(), profiles_dir)
    return [(inst, {m: scaled_profile(p, s) for m, p in profiles.items()})
            for inst, profiles in fleet]


def deadlines_ms(scenario, s: float) -> dict[str, int]:
    """Each class's TTFT deadline in ms of the scaled clock, whole ms as the config holds it."""
    return {c.name: max(1, round(c.ttft_deadline_s * 1000 * s))
            for c in scenario.slo_classes.values()}


def build_requests(trace: list[TraceRequest], scenario, fleet, load: float, s: float,
                   seed: int) -> tuple[list[SimRequest], int]:
    """The scenario's requests at `load`, on the scaled clock (arrivals and deadlines x s).
    A prompt that the smallest instance serving its model could not hold with its output is
    shortened (in both the live run and the simulator); returns how many were."""
    requests = scale_load(scenario.assign(trace, seed), load)
    kv = {}
    for _, profiles in fleet:
        for m, p in profiles.items():
            kv[m] = min(kv.get(m, p.kv_capacity_tokens), p.kv_capacity_tokens)
    deadlines = deadlines_ms(scenario, s)
    out, cut = [], 0
    for r in requests:
        prompt = min(r.input_length, kv[r.model] - r.output_length)
        cut += prompt < r.input_length
        out.append(dataclasses.replace(
            r, arrival_s=r.arrival_s * s, input_length=max(1, prompt),
            ttft_deadline_s=deadlines[r.slo_class] / 1000,
            tpot_deadline_s=None if r.tpot_deadline_s is None else r.tpot_deadline_s * s))
    return out, cut


def write_stack_config(folder: pathlib.Path, scenario, fleet, policy: str,
                       s: float) -> pathlib.Path:
    """A stack config for the scenario's fleet: its models and classes (deadlines x s), one sim
    worker per instance on its scaled profile, the planner's cadence x s, free ports."""
    for inst, profiles in fleet:
        for model, p in profiles.items():
            path = folder / f"{inst.profile(model)}.yaml"
            path.write_text(yaml.safe_dump(dataclasses.asdict(p)))
    config = {
        "redis": {"url": "embedded"},
        "router": {"listen": f"127.0.0.1:{free_port()}", "max_message_bytes": 4 << 20},
        "planner": {"listen": f"127.0.0.1:{free_port()}", "policy": policy,
                    "interval_ms": max(1, round(1000 * s))},
        "limits": {"lease_ms": 3000, "heartbeat_ms": 500, "max_group_size": MAX_GROUP_SIZE,
                   "retention_s": 3600},
        "default_slo_class": next(iter(scenario.slo_classes)),
        "slo_classes": {name: {"ttft_deadline_ms": ms, "max_queued": 1_000_000}
                        for name, ms in deadlines_ms(scenario, s).items()},
        "models": {m: {"max_model_len": MODELS[m].max_model_len,
                       "max_tokens": MODELS[m].max_model_len - 1} for m in scenario.models},
        "workers": [worker_config(inst, folder) for inst, _ in fleet],
    }
    path = folder / f"stack-{policy}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def worker_config(inst, folder: pathlib.Path) -> dict:
    """A sim worker like the simulator's instance: an instance of several models serves one at
    a time, the first to begin with, each at the cost of its own profile."""
    files = {m: str(folder / f"{inst.profile(m)}.yaml") for m in inst.models}
    worker = {"id": inst.name, "listen": f"127.0.0.1:{free_port()}", "engine": "sim",
              "models": list(inst.models), "time_scale": 1.0, "profile": files[inst.models[0]]}
    if len(inst.models) > 1:
        worker.update(active=[inst.models[0]], profiles=files)
    return worker


# --- figures ---------------------------------------------------------------------------------


def met(ttft_s: float | None, decode_s: float | None, r: SimRequest) -> bool:
    """bench_sim.slo_met's rule: first token within the TTFT deadline, and the time per output
    token after it within the TPOT deadline when the class has one."""
    if ttft_s is None or ttft_s > r.ttft_deadline_s:
        return False
    if r.tpot_deadline_s is not None and r.output_length > 1:
        return decode_s is not None and decode_s / (r.output_length - 1) <= r.tpot_deadline_s
    return True


def figures(requests: list[SimRequest], ttfts: list[float | None], oks: list[bool],
            span_s: float, s: float) -> dict:
    """One row of figures, times converted from the scaled clock to trace seconds."""
    by_class: dict[str, list[bool]] = {}
    for r, ok in zip(requests, oks, strict=True):
        by_class.setdefault(r.slo_class, []).append(ok)
    ttft = sorted(t / s for t in ttfts if t is not None)
    done = sum(t is not None for t in ttfts)
    return {
        "requests": len(requests),
        "slo_attainment": round(sum(oks) / len(oks), 4) if oks else 0.0,
        "slo_attainment_by_class": {c: round(sum(v) / len(v), 4)
                                    for c, v in sorted(by_class.items())},
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        "throughput_rps": round(done / (span_s / s), 4) if span_s else 0.0,
    }


def simulate(requests: list[SimRequest], fleet, policy: str, scenario, s: float,
             interval_s: float, debounce_s: float) -> dict:
    """The simulator on the same requests and fleet. Its snapshots show each group's summed
    max_tokens (Simulation's `oracle` switch) because the live router stores them too: the
    replay must send max_tokens = the trace's output length so the engines stop there."""
    deadlines = {c: ms / 1000 for c, ms in deadlines_ms(scenario, s).items()}
    planner = bench_sim.make_policy(policy, fleet, deadlines)
    result = Simulation(requests, fleet, planner, max_group_size=MAX_GROUP_SIZE,
                        plan_interval_s=interval_s, plan_debounce_s=debounce_s,
                        oracle=True).run()
    by_id = {r.spec.id: r for r in result.requests}
    ordered = [by_id[r.id] for r in requests]
    ttfts = [None if r.first_token_s is None else r.first_token_s - r.spec.arrival_s
             for r in ordered]
    oks = [met(t, None if r.finish_s is None else r.finish_s - r.first_token_s, r.spec)
           for t, r in zip(ttfts, ordered, strict=True)]
    span = max(r.finish_s for r in ordered) - min(r.spec.arrival_s for r in ordered)
    row = figures(requests, ttfts, oks, span, s)
    row["planner_ms_p99"] = round(percentile(sorted(result.planner_ms), 99), 3)
    row["requeues"] = result.evictions
    row["model_swaps"] = result.model_swaps
    cal = getattr(planner, "calibration", None)
    row["calibration"] = calibration_shown(cal.summary().get) if cal and cal.count else None
    row["start_to_first_token_p99_s"] = round(percentile(sorted(
        (r.first_token_s - r.start_s) / s for r in ordered), 99), 3)
    return row


def sim_band(requests, fleet, policy, scenario, s, interval_s, nominal: dict) -> dict:
    """The simulator's attainment range (overall and per class) over what a live run cannot
    hold fixed: engines SPEED_BAND slower or faster (a busy machine), and the planner's timing
    (its debounce DEBOUNCE_JITTER_S apart, its cadence TIMING_BAND longer or shorter). fcfs on
    an overloaded slice is chaotic in the second: wa, 300 requests at 4x, moved 0.83-0.92
    overall and 0.66-0.84 interactive for 10 ms of debounce (docs/benchmarks.md). A live
    figure is compared with this range, not with the one nominal run."""
    rows = [nominal]
    for factor in (1 - SPEED_BAND, 1 + SPEED_BAND):
        changed = [(i, {m: scaled_profile(p, factor) for m, p in ps.items()}) for i, ps in fleet]
        rows.append(simulate(requests, changed, policy, scenario, s, interval_s,
                             PLAN_DEBOUNCE_S))
    for debounce in DEBOUNCE_JITTER_S:
        rows.append(simulate(requests, fleet, policy, scenario, s, interval_s, debounce))
    for factor in (1 - TIMING_BAND, 1 + TIMING_BAND):
        rows.append(simulate(requests, fleet, policy, scenario, s, interval_s * factor,
                             PLAN_DEBOUNCE_S))

    def span(values):
        return [min(values), max(values)]
    return {"slo_attainment": span([r["slo_attainment"] for r in rows]),
            "slo_attainment_by_class": {
                c: span([r["slo_attainment_by_class"].get(c, 0.0) for r in rows])
                for c in nominal["slo_attainment_by_class"]}}


# --- the live replay -------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One request as the client saw it; times in seconds since the replay began."""
    sent_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    # length, stop, cancelled, error (the stream's finish reason); rpc CODE; unfinished
    status: str = "unsent"
    # the mesh's own account (Redis clock): arrival to claimed by a worker, to first token
    server_wait_ms: float = 0.0
    server_ttft_ms: float = 0.0
    server_slo_met: bool = False
    # times the stack sent it back to its group (evicted, or its worker's lease lapsed)
    requeues: int = 0


async def replay(address: str, requests: list[SimRequest], tag: str, timeout_s: float,
                 progress: str = "") -> tuple[list[Outcome], float]:
    """Sends every request with Router.Generate at its (scaled) arrival time and reads its
    stream to the end; returns the outcomes and the replay's wall time."""
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    stubs = [router_pb2_grpc.RouterStub(c) for c in channels]
    outcomes = [Outcome() for _ in requests]
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.1
    finished = 0

    async def one(i: int, r: SimRequest) -> None:
        nonlocal finished
        o = outcomes[i]
        request = router_pb2.GenerateRequest(
            model=r.model, prompt="x" * r.input_length, max_tokens=r.output_length,
            slo_class=r.slo_class, request_id=f"{tag}-{r.id}",
            sampling=router_pb2.SamplingParams(ignore_eos=True))
        o.sent_s, o.status = loop.time() - t0, "unfinished"
        try:
            async for m in stubs[i % len(stubs)].Generate(request):
                now = loop.time() - t0
                if m.token_ids:
                    if o.first_token_s is None:
                        o.first_token_s = now
                    o.tokens += len(m.token_ids)
                if m.HasField("finished"):
                    o.end_s = now
                    o.status = router_pb2.FinishReason.Name(m.finished.reason).removeprefix(
                        "FINISH_REASON_").lower()
                    o.server_wait_ms = m.finished.usage.queue_wait_ms
                    o.server_ttft_ms = m.finished.usage.ttft_ms
                    o.server_slo_met = m.finished.slo_met
        except grpc.aio.AioRpcError as e:
            o.status = f"rpc {e.code().name}"
        finished += 1
        if progress and (finished == len(requests) or finished % max(1, len(requests) // 10) == 0):
            print(f"{progress}: {finished}/{len(requests)} done after "
                  f"{loop.time() - t0:.1f} s", file=sys.stderr, flush=True)

    tasks = []
    try:
        for i, r in enumerate(requests):
            delay = t0 + r.arrival_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, r)))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + timeout_s - loop.time()))
        for task in pending:  # cancelling the call cancels the request in the stack
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await read_requeues(stubs, requests, outcomes, tag)
    finally:
        for c in channels:
            await c.close()
    return outcomes, loop.time() - t0


async def read_requeues(stubs, requests: list[SimRequest], outcomes: list[Outcome],
                        tag: str) -> None:
    """Asks the router how often each request went back to its group (GetRequest)."""
    limit = asyncio.Semaphore(32)

    async def one(i: int, r: SimRequest) -> None:
        async with limit:
            try:
                info = await stubs[i % len(stubs)].GetRequest(
                    router_pb2.GetRequestRequest(request_id=f"{tag}-{r.id}"), timeout=10)
                outcomes[i].requeues = info.requeues
            except grpc.aio.AioRpcError:
                pass  # never stored (refused at submit): nothing to count

    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))


def live_row(requests: list[SimRequest], outcomes: list[Outcome], s: float) -> dict:
    ttfts, oks = [], []
    for r, o in zip(requests, outcomes, strict=True):
        whole = o.status == "length" and o.tokens == r.output_length
        ttft = o.first_token_s - o.sent_s if whole else None
        ttfts.append(ttft)
        oks.append(met(ttft, o.end_s - o.first_token_s if whole else None, r))
    sent = [o.sent_s for o in outcomes if o.sent_s is not None]
    ends = [o.end_s for o in outcomes if o.end_s is not None]
    span = max(ends) - min(sent) if ends and sent else 0.0
    row = figures(requests, ttfts, oks, span, s)
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    lags = sorted(o.sent_s - r.arrival_s for r, o in zip(requests, outcomes, strict=True)
                  if o.sent_s is not None)
    row.update({
        "completed": sum(t is not None for t in ttfts),
        "statuses": statuses,
        "tokens": sum(o.tokens for o in outcomes),
        "requeues": sum(o.requeues for o in outcomes),
        # the mesh's own account (Redis clock, arrival to first token stored)
        "server_slo_attainment": round(
            sum(o.server_slo_met for o in outcomes) / len(outcomes), 4) if outcomes else 0.0,
        # how late the client sent, scaled clock: a busy client delays arrivals
        "send_lag_p99_ms": round(percentile(lags, 99) * 1000, 3),
        # claimed by a worker to first token, trace seconds: one engine step unless the worker
        # claimed more than its engine could start (it then waits inside the engine)
        "start_to_first_token_p99_s": round(percentile(sorted(
            (o.server_ttft_ms - o.server_wait_ms) / 1000 / s for o in outcomes
            if o.status == "length"), 99), 3),
    })
    return row


@contextlib.contextmanager
def redis_url_for_children(url: str):
    """The services read QLM_REDIS_URL before their config: point it at this run's Redis while
    the stack's processes are started (they copy the environment)."""
    saved = os.environ.get(qlm_config.REDIS_URL_ENV)
    os.environ[qlm_config.REDIS_URL_ENV] = url
    try:
        yield
    finally:
        if saved is None:
            del os.environ[qlm_config.REDIS_URL_ENV]
        else:
            os.environ[qlm_config.REDIS_URL_ENV] = saved


async def model_swaps(cfg) -> int:
    """The swaps the stack's workers made (their GetStatus)."""
    total = 0
    for w in cfg.workers:
        async with grpc.aio.insecure_channel(dial_address(w.advertise)) as channel:
            status = await worker_pb2_grpc.WorkerStub(channel).GetStatus(
                worker_pb2.GetStatusRequest(), timeout=10)
            total += status.model_swaps
    return total


async def planner_calibration(cfg) -> dict | None:
    """How the planner's waiting-time estimates held (its GetPlan), None if it reports none."""
    async with grpc.aio.insecure_channel(dial_address(cfg.planner_listen)) as channel:
        plan = await planner_pb2_grpc.PlannerStub(channel).GetPlan(
            planner_pb2.GetPlanRequest(), timeout=10)
    if not plan.HasField("calibration"):
        return None
    return calibration_shown(lambda name: getattr(plan.calibration, name))


def calibration_shown(figure) -> dict:
    """The calibration figures the report shows, by their names in Calibration.summary() and
    the EstimatorCalibration message (`figure`: name -> value)."""
    return {name: round(figure(name), 4) for name in ("waits", "coverage", "coverage_pit")}


def run_stack(config_path: pathlib.Path, requests: list[SimRequest], policy: str, s: float,
              timeout_s: float, progress: bool, redis_pool: int = REDIS_POOL) -> dict:
    """One policy: a fresh stack on its own Redis, the replay, everything stopped."""
    redis = EmbeddedRedis().start()
    # redis-py 8's asyncio pools hold at most 100 connections and then fail the command
    # (MaxConnectionsError) rather than wait: a worker streaming 100+ requests at once loses
    # some of them to lease expiry. The pool size is a query parameter of the Redis URL.
    url = f"{redis.url}?max_connections={redis_pool}" if redis_pool else redis.url
    cfg = dataclasses.replace(qlm_config.load(config_path), redis_url=url)
    stack = Stack(cfg)
    try:
        with redis_url_for_children(url):
            stack.start()
        pids = {name: p.pid for name, p in stack.procs}
        pids.update({"redis" if i == 0 else f"redis {i}": pid
                     for i, pid in enumerate(child_pids() - set(pids.values()))})
        pids["client"] = os.getpid()
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
        load0 = os.getloadavg()[0]
        outcomes, wall = asyncio.run(replay(
            dial_address(cfg.router_listen), requests, f"live-{policy}", timeout_s,
            progress=f"live {policy}" if progress else ""))
        cpu = {n: round(cpu_seconds(p) - cpu0[n], 2) for n, p in pids.items()}
        swaps = asyncio.run(model_swaps(cfg))
        calibration = asyncio.run(planner_calibration(cfg))
        # the machine is shared: what else ran shows in its load average
        loadavg = [round(load0, 2), round(os.getloadavg()[0], 2)]
    finally:
        stack.stop()
        redis.stop()
    row = live_row(requests, outcomes, s)
    row["wall_s"] = round(wall, 2)
    row["model_swaps"] = swaps
    row["calibration"] = calibration
    row["cpu_s"] = cpu
    row["loadavg_1m"] = loadavg
    # share of the machine's cores the stack and the client kept busy
    row["cpu_busy"] = round(sum(cpu.values()) / wall / (os.cpu_count() or 1), 3) if wall else 0
    return row


# --- the command -----------------------------------------------------------------------------


def compare(live: dict, sim: dict, tolerance: float) -> dict:
    """Live minus the nominal simulation (`diff`), and how far live attainment lies outside
    the simulator's band (sim_band), overall and per class: within the tolerance, they
    agree."""
    diff = {"slo_attainment": round(live["slo_attainment"] - sim["slo_attainment"], 4)}
    diff["slo_attainment_by_class"] = {
        c: round(v - sim["slo_attainment_by_class"].get(c, 0.0), 4)
        for c, v in live["slo_attainment_by_class"].items()}
    for k in ("ttft_p50_s", "ttft_p99_s", "throughput_rps"):
        diff[k] = round(live[k] - sim[k], 3)
    band = sim["band"]
    pairs = [(live["slo_attainment"], band["slo_attainment"])] + [
        (v, band["slo_attainment_by_class"].get(c, [0.0, 0.0]))
        for c, v in live["slo_attainment_by_class"].items()]
    outside = max(max(lo - v, v - hi, 0.0) for v, (lo, hi) in pairs)
    return {"diff": diff, "outside_band": round(outside, 4), "within": outside <= tolerance}


def run(trace: list[TraceRequest], trace_name: str, scenario_name: str, policies: list[str],
        load: float, s: float, *, seed: int = 0, profiles_dir: pathlib.Path = bench_sim.PROFILES,
        timeout_s: float = 600.0, tolerance: float = ATTAINMENT_TOLERANCE,
        redis_pool: int = REDIS_POOL, progress: bool = True) -> dict:
    scenario = get_scenario(scenario_name)
    fleet = live_fleet(scenario, profiles_dir, s)
    requests, cut = build_requests(trace, scenario, fleet, load, s, seed)
    interval_s = max(1, round(1000 * s)) / 1000
    rows = []
    with tempfile.TemporaryDirectory(prefix="qlm-bench-live-") as folder:
        for policy in policies:
            path = write_stack_config(pathlib.Path(folder), scenario, fleet, policy, s)
            live = run_stack(path, requests, policy, s, timeout_s, progress, redis_pool)
            sim = simulate(requests, fleet, policy, scenario, s, interval_s, PLAN_DEBOUNCE_S)
            sim["band"] = sim_band(requests, fleet, policy, scenario, s, interval_s, sim)
            rows.append({"scenario": scenario_name, "load": load, "policy": policy,
                         "live": live, "sim": sim, **compare(live, sim, tolerance)})
    return {
        "benchmark": "live",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "params": {"trace": trace_name, "scenario": scenario_name, "load": load,
                   "requests": len(requests), "time_scale": s, "seed": seed,
                   "fleet": [f"{i.name}:{i.profile(i.models[0])}" for i, _ in fleet],
                   "plan_interval_ms": round(interval_s * 1000),
                   "deadlines_ms": deadlines_ms(scenario, s), "prompts_shortened": cut,
                   "tolerance": tolerance, "redis_max_connections": redis_pool,
                   "cpus": os.cpu_count()},
        "rows": rows,
        "within_tolerance": all(r["within"] for r in rows),
    }


def table(report: dict) -> str:
    p = report["params"]
    classes = sorted({c for r in report["rows"] for c in r["live"]["slo_attainment_by_class"]})
    lines = [
        f"scenario {p['scenario']}, {p['requests']} requests of {p['trace']}, load {p['load']:g}x, "
        f"fleet {', '.join(p['fleet'])}",
        f"time scale {p['time_scale']:g}: engine, arrivals, deadlines "
        f"({', '.join(f'{c} {ms} ms' for c, ms in p['deadlines_ms'].items())}) and planner "
        f"cadence ({p['plan_interval_ms']} ms) scaled alike; TTFT in trace seconds",
        "",
        f"{'policy':<9}{'source':<7}{'SLO met':>8}" + "".join(f"{c[:11]:>12}" for c in classes)
        + f"{'TTFT p50':>10}{'TTFT p99':>10}{'thr rps':>9}  note",
    ]
    for r in report["rows"]:
        for source in ("live", "sim"):
            f = r[source]
            note = f"{f['requeues']} requeued, {f['model_swaps']} swaps"
            if source == "live":
                bad = {k: v for k, v in f["statuses"].items() if k != "length"}
                note = (f"{f['completed']}/{f['requests']} whole" + (f" {bad}" if bad else "")
                        + f", {f['requeues']} requeued, {f['model_swaps']} swaps"
                        + f", cpu {f['cpu_busy']:.0%}, load {max(f['loadavg_1m']):.1f}, "
                        f"{f['wall_s']:.0f} s")
            if f.get("calibration"):
                c = f["calibration"]
                note += (f", waits covered {c['coverage']:.2f} (PIT {c['coverage_pit']:.2f})"
                         f" of {c['waits']}")
            lines.append(
                f"{r['policy']:<9}{source:<7}{f['slo_attainment']:>8.3f}"
                + "".join(f"{f['slo_attainment_by_class'].get(c, 0):>12.3f}" for c in classes)
                + f"{f['ttft_p50_s']:>10.2f}{f['ttft_p99_s']:>10.2f}{f['throughput_rps']:>9.2f}"
                + f"  {note}")
        band = r["sim"]["band"]

        def span(lo_hi, width):
            return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}".rjust(width)
        lines.append(
            f"{r['policy']:<9}{'band':<7}{span(band['slo_attainment'], 8)}"
            + "".join(span(band["slo_attainment_by_class"].get(c, [0, 0]), 12)
                      for c in classes)
            + f"{'':29}  sim: engines ±{SPEED_BAND:.0%}, planner timing jittered")
        d = r["diff"]
        lines.append(
            f"{r['policy']:<9}{'diff':<7}{d['slo_attainment']:>+8.3f}"
            + "".join(f"{d['slo_attainment_by_class'].get(c, 0):>+12.3f}" for c in classes)
            + f"{d['ttft_p50_s']:>+10.2f}{d['ttft_p99_s']:>+10.2f}{d['throughput_rps']:>+9.2f}"
            + f"  live {r['outside_band']:.3f} outside the band: "
            + f"{'within' if r['within'] else 'OUTSIDE'} ±{p['tolerance']:g}")
    lines.append("")
    lines.append(f"agreement: live attainment within ±{p['tolerance']:g} of the simulator's band "
                 "(overall and per class): "
                 + ("met by every policy" if report["within_tolerance"] else "missed by "
                    + ", ".join(r["policy"] for r in report["rows"] if not r["within"])))
    return "\n".join(lines)


def main(args) -> int:
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = [x for x in policies if x not in POLICY_NAMES]
    if unknown or not policies:
        print(f"qlm bench live: unknown policy {unknown}; known: {', '.join(POLICY_NAMES)}",
              file=sys.stderr)
        return 2
    if not args.time_scale > 0 or not args.load > 0 or args.limit < 1:
        print("qlm bench live: --time-scale, --load and --limit must be above 0",
              file=sys.stderr)
        return 2
    if args.trace:
        trace, name = load_trace(args.trace)[:args.limit], os.path.basename(args.trace)
    else:
        trace = synthetic_trace(args.limit, args.seed)
        name = f"a synthetic trace (seed {args.seed})"
    try:
        report = run(trace, name, args.scenario, policies, args.load, args.time_scale,
                     seed=args.seed, timeout_s=args.timeout,
                     tolerance=ATTAINMENT_TOLERANCE if args.tolerance is None
                     else args.tolerance,
                     redis_pool=REDIS_POOL if args.redis_pool is None else args.redis_pool)
    except (ValueError, RuntimeError) as e:
        print(f"qlm bench live: {e}", file=sys.stderr)
        return 1
    print(table(report), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    lost = [r["policy"] for r in report["rows"] if r["live"]["completed"] < r["live"]["requests"]]
    if lost:
        print(f"qlm bench live: requests not completed whole under {lost}", file=sys.stderr)
    return 1 if lost else 0
