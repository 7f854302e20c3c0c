"""`qlm bench mesh`: requests/s through one router process, and the latency the mesh adds.

Three targets serve the same short requests with the same sim profile at time_scale 0 (the
engine takes no time), so what differs between them is overhead only:
  direct  the engine called from this process: no serialisation, no network, no queue
  grpc    the engine behind a bare grpc.aio server (its own process; Router.Generate, no Redis)
  mesh    the real stack as processes (launcher.Stack): router, planner, workers, embedded Redis
Each target runs at concurrency 1 (latency) and at --concurrency (throughput), closed loop,
after warmup requests that are not counted. This process is the load generator; the servers
are other processes. TTFT is when the first message carrying tokens arrives, e2e when the
last one does, both as the client sees them.

QLM_BENCH_PROFILE=FILE also drives one more router, run under cProfile (stats saved in FILE),
and prints where its time goes. See docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
import yaml

from qlm import config as qlm_config
from qlm.bench import percentile
from qlm.engines.base import EngineError, EngineRequest
from qlm.engines.sim import SimEngine, SimProfile
from qlm.launcher import Stack, check_health, dial_address
from qlm.procutil import spawn_dying_with_parent
from qlm.redis_server import free_port
from qlm.v1 import router_pb2, router_pb2_grpc

MODEL = "small"
PROFILE = qlm_config.DEFAULT_CONFIG.parent / "profiles" / "sim-small.yaml"
PROMPT = "a short benchmark prompt"
STREAMS_PER_CHANNEL = 16
LATENCY_REQUESTS = 300  # requests per target at concurrency 1
AIM_RPS, AIM_ADDED_TTFT_MS = 1000.0, 2.0
TARGETS = ("direct", "grpc", "mesh")


class BadOutput(Exception):
    """A request that ended without its max_tokens tokens."""


@dataclasses.dataclass(frozen=True)
class Sample:
    ttft_s: float
    e2e_s: float
    tokens: int
    messages: int = 0  # stream messages received (gRPC targets)
    ack_s: float = 0.0  # first message (the request id, sent once the request is stored)
    # the mesh's own account (Redis clock, whole ms): arrival to claim, arrival to first token
    queue_wait_ms: float = 0.0
    server_ttft_ms: float = 0.0


# --- measuring -------------------------------------------------------------------------------


def summarise(samples: list[Sample], errors: int, wall_s: float, max_tokens: int) -> dict:
    good = [s for s in samples if s.tokens == max_tokens]
    ttft = sorted(s.ttft_s * 1000 for s in good) or [0.0]
    e2e = sorted(s.e2e_s * 1000 for s in good) or [0.0]
    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else 0.0

    return {
        "requests": len(samples) + errors, "completed": len(good),
        "errors": errors + len(samples) - len(good), "tokens": sum(s.tokens for s in samples),
        "wall_s": round(wall_s, 3), "rps": round(len(good) / wall_s, 1) if wall_s else 0.0,
        **{f"ttft_p{q}_ms": round(percentile(ttft, q), 3) for q in (50, 99)},
        **{f"e2e_p{q}_ms": round(percentile(e2e, q), 3) for q in (50, 99)},
        # means, to split the TTFT into its legs (see docs/benchmarks.md)
        "messages_per_request": mean([s.messages for s in good]),
        "mean_ack_ms": mean([s.ack_s * 1000 for s in good]),
        "mean_ttft_ms": mean([s.ttft_s * 1000 for s in good]),
        "mean_queue_wait_ms": mean([s.queue_wait_ms for s in good]),
        "mean_server_ttft_ms": mean([s.server_ttft_ms for s in good]),
    }


async def closed_loop(one, n: int, concurrency: int) -> tuple[list[Sample], int, float]:
    """Runs n requests with `concurrency` in flight; each client slot starts its next request
    as soon as its previous one ends. Returns the samples, the error count and the wall time."""
    issued, samples, errors = itertools.count(), [], 0

    async def client(slot: int) -> None:
        nonlocal errors
        while next(issued) < n:
            try:
                samples.append(await one(slot))
            except (grpc.aio.AioRpcError, EngineError, BadOutput):
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return samples, errors, time.perf_counter() - started


def direct_client(engine: SimEngine, max_tokens: int):
    prompt = tuple(engine.tokenize(MODEL, PROMPT))
    ids = itertools.count()

    async def one(slot: int) -> Sample:
        request = EngineRequest(f"d{next(ids)}", MODEL, prompt, max_tokens, ignore_eos=True)
        started, ttft, tokens = time.perf_counter(), None, 0
        async for out in engine.generate(request):
            if out.token_ids and ttft is None:
                ttft = time.perf_counter() - started
            tokens += len(out.token_ids)
            if out.finished and out.finish_reason != "length":
                raise BadOutput(out.finish_reason)
        return Sample(ttft or 0.0, time.perf_counter() - started, tokens)

    return one


def grpc_client(addresses: list[str], concurrency: int, max_tokens: int):
    """Router.Generate over several channels (one per STREAMS_PER_CHANNEL streams, spread over
    `addresses`); returns the per-request coroutine and the channels to close."""
    n = max(len(addresses), math.ceil(concurrency / STREAMS_PER_CHANNEL))
    # a local subchannel pool gives each channel its own connection (and HTTP/2 stream limit)
    channels = [grpc.aio.insecure_channel(addresses[i % len(addresses)],
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for i in range(n)]
    stubs = [router_pb2_grpc.RouterStub(c) for c in channels]
    request = router_pb2.GenerateRequest(
        model=MODEL, prompt=PROMPT, max_tokens=max_tokens,
        sampling=router_pb2.SamplingParams(ignore_eos=True))

    async def one(slot: int) -> Sample:
        started, ack, ttft, tokens, messages = time.perf_counter(), 0.0, None, 0, 0
        usage = router_pb2.Usage()
        async for message in stubs[slot % len(stubs)].Generate(request):
            messages += 1
            if messages == 1:
                ack = time.perf_counter() - started
            if message.token_ids and ttft is None:
                ttft = time.perf_counter() - started
            tokens += len(message.token_ids)
            if message.HasField("finished"):
                usage = message.finished.usage
                if message.finished.reason != router_pb2.FINISH_REASON_LENGTH:
                    raise BadOutput(router_pb2.FinishReason.Name(message.finished.reason))
        return Sample(ttft or 0.0, time.perf_counter() - started, tokens, messages, ack,
                      usage.queue_wait_ms, usage.ttft_ms)

    return one, channels


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids() -> set[int]:
    """This process's children (the embedded Redis has no other handle here)."""
    found = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


async def measure(addresses: dict[str, list[str]], phases: list[tuple[str, int, int]],
                  max_tokens: int, pids: dict[str, dict[str, int]]) -> list[dict]:
    """`pids`: per target, the processes whose CPU time its requests cost."""
    engine = SimEngine([MODEL], SimProfile.load(PROFILE), time_scale=0.0)
    await engine.start()
    out = []
    try:
        for name, concurrency, n in phases:
            rows = {}
            for target in TARGETS:
                channels = []
                if target == "direct":
                    one = direct_client(engine, max_tokens)
                else:
                    one, channels = grpc_client(addresses[target], concurrency, max_tokens)
                await closed_loop(one, min(100, max(2, n // 10)), concurrency)  # warmup
                cpu = {name: cpu_seconds(pid) for name, pid in pids[target].items()}
                samples, errors, wall = await closed_loop(one, n, concurrency)
                rows[target] = summarise(samples, errors, wall, max_tokens)
                rows[target]["cpu_ms_per_request"] = {
                    name: round((cpu_seconds(pid) - cpu[name]) * 1000 / n, 3)
                    for name, pid in pids[target].items()}
                for c in channels:
                    await c.close()
            out.append({"phase": name, "concurrency": concurrency, "rows": rows})
    finally:
        await engine.stop()
    return out


# --- the bare gRPC baseline (run as `python -m qlm.bench.mesh bare PORT`) --------------------


class BareRouter(router_pb2_grpc.RouterServicer):
    """Router.Generate straight onto a local engine: what gRPC alone costs."""

    def __init__(self, engine: SimEngine):
        self.engine = engine

    async def Generate(self, request, context):
        rid = uuid.uuid4().hex
        yield router_pb2.GenerateResponse(request_id=rid)
        prompt = tuple(self.engine.tokenize(request.model, request.prompt))
        index = 0
        async for out in self.engine.generate(EngineRequest(
                rid, request.model, prompt, request.max_tokens,
                ignore_eos=request.sampling.ignore_eos)):
            message = router_pb2.GenerateResponse(
                request_id=rid, index=index, token_ids=out.token_ids, text=out.text)
            index += len(out.token_ids)
            if out.finished:
                message.finished.reason = router_pb2.FINISH_REASON_LENGTH if (
                    out.finish_reason == "length") else router_pb2.FINISH_REASON_ERROR
                message.finished.usage.output_tokens = index
            yield message


async def serve_bare(port: int) -> None:
    from qlm.serving import GrpcServer, run_until_signal

    engine = SimEngine([MODEL], SimProfile.load(PROFILE), time_scale=0.0)
    await engine.start()
    server = GrpcServer("qlm.v1.Router", f"127.0.0.1:{port}")
    router_pb2_grpc.add_RouterServicer_to_server(BareRouter(engine), server.server)
    await server.start()
    await server.set_serving(True)
    await run_until_signal()
    await server.stop(0.5)
    await engine.stop()


# --- processes -------------------------------------------------------------------------------


def write_stack_config(folder: str, workers: int, policy: str | None = None) -> str:
    """deploy/local.yaml's models, classes, limits and planner policy (unless `policy`);
    free ports; sim workers serving MODEL that take no time."""
    base = yaml.safe_load(qlm_config.DEFAULT_CONFIG.read_text())
    if policy:
        base["planner"]["policy"] = policy
    base["redis"] = {"url": "embedded"}
    base["router"]["listen"] = f"127.0.0.1:{free_port()}"
    base["planner"]["listen"] = f"127.0.0.1:{free_port()}"
    base["workers"] = [
        {"id": f"bench{i}", "listen": f"127.0.0.1:{free_port()}", "engine": "sim",
         "models": [MODEL], "profile": str(PROFILE), "time_scale": 0} for i in range(workers)]
    path = os.path.join(folder, "bench-stack.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(base, f)
    return path


def start_service(argv: list[str], address: str, timeout_s: float = 30.0) -> subprocess.Popen:
    proc = spawn_dying_with_parent(argv)
    deadline = time.monotonic() + timeout_s
    while not check_health(address, timeout_s=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(proc)
            raise RuntimeError(f"{' '.join(argv)} did not become healthy on {address}")
        time.sleep(0.1)
    return proc


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Where a profiled function's file or name says it belongs. cProfile cannot see inside C and
# Cython code, so the C callbacks the event loop runs (grpc's Cython, asyncio's C tasks) show
# as self time of Context.run; builtins are charged to whoever called them.
PROFILE_GROUPS = (("_contextvars.Context", "grpc + C callbacks"), ("select.epoll", "epoll wait"),
                  ("selectors.py", "epoll wait"),
                  ("grpc", "grpc"), ("redis", "redis client"), ("json", "json"),
                  ("asyncio", "asyncio"), ("protobuf", "protobuf"),
                  ("services/router", "router code"), ("/qlm/", "qlm code"))


def _profile_group(key: tuple) -> str | None:
    where = f"{key[0]}:{key[2]}"
    return next((g for k, g in PROFILE_GROUPS if k in where), None)


def profile_summary(path: str, top: int = 12) -> dict:
    """Where the profiled router spent its time, by library and by function (self time)."""
    by_group: dict[str, float] = {}
    rows = []
    for key, (_, calls, self_s, _, callers) in pstats.Stats(path).stats.items():
        group = _profile_group(key)
        # an unplaced function (a builtin, a stdlib helper) counts for the libraries calling it
        shares = [(group, self_s)] if group or not callers else [
            (_profile_group(c) or "other", v[2]) for c, v in callers.items()]
        for g, t in shares:
            by_group[g or "other"] = by_group.get(g or "other", 0.0) + t
        rows.append((self_s, calls, f"{os.path.basename(key[0])}:{key[1]}({key[2]})"))
    total = sum(by_group.values()) or 1.0
    rows.sort(reverse=True)
    return {
        "total_s": round(total, 3),
        "by_group_pct": {g: round(100 * s / total, 1)
                         for g, s in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "top_self": [{"function": f, "calls": c, "self_s": round(s, 3)} for s, c, f in rows[:top]],
    }


# --- running ---------------------------------------------------------------------------------


def start_router(cfg: qlm_config.StackConfig, redis_url: str,
                 profile: str | None = None) -> tuple[str, subprocess.Popen]:
    """One more router of the stack (routers are stateless), optionally under cProfile."""
    listen = f"127.0.0.1:{free_port()}"
    wrap = ["-m", "cProfile", "-o", profile] if profile else []
    return listen, start_service(
        [sys.executable, *wrap, "-m", "services.router", "--config", str(cfg.path),
         "--listen", listen, "--redis-url", redis_url], listen)


def process_ids(stack: Stack, bare: subprocess.Popen,
                routers: dict[str, subprocess.Popen]) -> dict[str, dict[str, int]]:
    """Per target, the processes whose CPU time its requests cost."""
    client = {"client": os.getpid()}
    mesh = {name: p.pid for name, p in stack.procs if name != "router"}
    mesh.update({name: p.pid for name, p in routers.items()})
    known = {p.pid for _, p in stack.procs} | {p.pid for p in routers.values()} | {bare.pid}
    redis = child_pids() - known  # the embedded Redis is the one child left
    if len(redis) == 1:
        mesh["redis"] = redis.pop()
    return {"direct": client, "grpc": {**client, "bare grpc": bare.pid},
            "mesh": {**client, **mesh}}


def run(requests: int = 4000, concurrency: int = 64, max_tokens: int = 8, workers: int = 2,
        routers: int = 1, profile: str | None = None, policy: str | None = None) -> dict:
    """Starts the stack and the baselines, measures, stops everything; returns the results.
    `routers` > 1 spreads the mesh's load over that many router processes (scale-out);
    `profile` names a file for cProfile stats of a router that then takes all the mesh load;
    `policy` is the planner's (default: deploy/local.yaml's)."""
    phases = [("latency", 1, min(LATENCY_REQUESTS, requests)),
              ("throughput", concurrency, requests)]
    own: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="qlm-bench-") as folder:
        # "embedded" even when QLM_REDIS_URL is set: the benchmark must not share queue state
        cfg = dataclasses.replace(qlm_config.load(write_stack_config(folder, workers, policy)),
                                  redis_url="embedded")
        stack = Stack(cfg)
        try:
            stack.start()
            bare_port = free_port()
            bare = f"127.0.0.1:{bare_port}"
            own.append(start_service(
                [sys.executable, "-m", "qlm.bench.mesh", "bare", str(bare_port)], bare))
            # the routers taking the mesh's load: name -> (address, process)
            mesh = {} if profile else {
                "router": (dial_address(cfg.router_listen), dict(stack.procs)["router"])}
            for i in range(1 if profile else routers - 1):
                mesh[f"router {i + 2}"] = start_router(cfg, stack.redis.url, profile)
                own.append(mesh[f"router {i + 2}"][1])
            pids = process_ids(stack, own[0], {name: p for name, (_, p) in mesh.items()})
            results = asyncio.run(measure(
                {"grpc": [bare], "mesh": [address for address, _ in mesh.values()]},
                phases, max_tokens, pids))
        finally:
            for proc in reversed(own):
                stop_service(proc)
            stack.stop()
    latency, throughput = results
    added_ttft = latency["rows"]["mesh"]["ttft_p50_ms"] - latency["rows"]["direct"]["ttft_p50_ms"]
    mesh_rps = throughput["rows"]["mesh"]["rps"]
    report = {
        "benchmark": "mesh",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "grpcio": grpc.__version__},
        "params": {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
                   "workers": workers, "routers": 1 if profile else routers,
                   "planner_policy": cfg.planner_policy,
                   "latency_requests": phases[0][2], "prompt": PROMPT, "profile": str(PROFILE)},
        "phases": results,
        "aims": {"rps": AIM_RPS, "mesh_rps": mesh_rps, "rps_met": mesh_rps >= AIM_RPS,
                 "added_ttft_p50_ms_max": AIM_ADDED_TTFT_MS,
                 "added_ttft_p50_ms": round(added_ttft, 3),
                 "added_ttft_met": added_ttft < AIM_ADDED_TTFT_MS},
    }
    if profile:
        report["router_profile"] = profile_summary(profile)
    return report


def format_report(report: dict) -> str:
    lines = [f"planner policy: {report['params']['planner_policy']}"]
    cores = report["machine"]["cpus"]
    head = (f"{'target':<8}{'req/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'e2e p50':>10}"
            f"{'e2e p99':>10}{'req/s/direct':>14}{'TTFT p50/direct':>17}{'+TTFT p50':>11}")
    for phase in report["phases"]:
        rows = phase["rows"]
        d = rows["direct"]
        title = (f"{phase['phase']}: concurrency {phase['concurrency']}, "
                 f"{d['requests']} requests per target (times in ms)")
        lines += ["", title, head]
        for name, r in rows.items():
            lines.append(
                f"{name:<8}{r['rps']:>9.0f}{r['ttft_p50_ms']:>10.3f}{r['ttft_p99_ms']:>10.3f}"
                f"{r['e2e_p50_ms']:>10.3f}{r['e2e_p99_ms']:>10.3f}"
                f"{r['rps'] / d['rps'] if d['rps'] else 0:>14.3f}"
                f"{r['ttft_p50_ms'] / d['ttft_p50_ms'] if d['ttft_p50_ms'] else 0:>17.1f}"
                f"{r['ttft_p50_ms'] - d['ttft_p50_ms']:>11.3f}"
                + (f"  ({r['errors']} errors)" if r["errors"] else ""))
        lines.append("CPU time per request (ms), by process:")
        for name, r in rows.items():
            cpu = r["cpu_ms_per_request"]
            total = sum(cpu.values())
            busy = total and phase["concurrency"] > 1  # at concurrency 1 the CPUs idle
            limit = f"; {cores} cores allow {1000 * cores / total:.0f} req/s" if busy else ""
            lines.append(f"  {name:<7} {total:6.2f} = "
                         + " + ".join(f"{k} {v:.2f}" for k, v in cpu.items()) + limit)
        m = rows["mesh"]
        lines.append(f"mesh legs (means): id message {m['mean_ack_ms']:.2f}, arrival to claim "
                     f"{m['mean_queue_wait_ms']:.2f}, arrival to first token stored "
                     f"{m['mean_server_ttft_ms']:.2f}, TTFT {m['mean_ttft_ms']:.2f} ms")
    a = report["aims"]
    lines += ["", (f"mesh throughput {a['mesh_rps']:.0f} req/s: aim {a['rps']:.0f} "
                   f"{'met' if a['rps_met'] else 'missed'} ({a['mesh_rps'] / a['rps']:.0%})"),
              (f"added p50 TTFT at concurrency 1: {a['added_ttft_p50_ms']:.3f} ms: aim < "
               f"{a['added_ttft_p50_ms_max']:.0f} ms {'met' if a['added_ttft_met'] else 'missed'}")]
    if "router_profile" in report:
        p = report["router_profile"]
        lines += ["", f"router self time by library ({p['total_s']} s, cProfile):"]
        lines += [f"  {g:<20}{pct:5.1f}%" for g, pct in p["by_group_pct"].items()]
        lines += ["router functions by self time:"]
        lines += [f"  {f['self_s']:8.3f} s {f['calls']:>9} calls  {f['function']}"
                  for f in p["top_self"]]
    return "\n".join(lines)


def main(args) -> int:
    profile = os.environ.get("QLM_BENCH_PROFILE")
    try:
        report = run(args.requests, args.concurrency, args.max_tokens, args.workers,
                     routers=args.routers, profile=profile and os.path.abspath(profile),
                     policy=args.policy)
    except qlm_config.ConfigError as e:  # a --policy no planner runs
        print(f"qlm bench mesh: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"qlm bench mesh: {e}", file=sys.stderr)
        return 1
    print(format_report(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = [(p["phase"], t) for p in report["phases"] for t, r in p["rows"].items() if r["errors"]]
    if bad:
        print(f"qlm bench mesh: failed requests in {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["bare"] or len(sys.argv) != 3:
        sys.exit("usage: python -m qlm.bench.mesh bare PORT  (the bare gRPC baseline server)")
    asyncio.run(serve_bare(int(sys.argv[2])))
