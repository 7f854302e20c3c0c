"""`qlm up`: the whole local stack in one command: an embedded Redis (unless the config or
QLM_REDIS_URL names one), the planner, the router and the configured workers, each its own
process. Prints the router's address and "ready" once every service answers its health check;
SIGINT or SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import config as qlm_config
from .procutil import kill_group, spawn_dying_with_parent
from .redis_server import EmbeddedRedis

START_TIMEOUT_S = 60.0
# a vLLM engine takes 30-45 s to start alone on two CPU cores, longer beside others
VLLM_START_TIMEOUT_S = 600.0


def check_health(address: str, service: str = "", timeout_s: float = 1.0) -> bool:
    """Whether the gRPC health service at `address` says SERVING for `service`."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def dial_address(listen: str) -> str:
    """Where to reach a server bound to `listen` from this machine."""
    host, port = listen.rsplit(":", 1)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else listen


def service_commands(cfg: qlm_config.StackConfig) -> list[tuple[str, list[str], str]]:
    """(name, argv, address to health-check) for every service of the stack."""
    py = [sys.executable, "-m"]
    conf = ["--config", str(cfg.path)]
    out = [
        ("planner", [*py, "services.planner", *conf], dial_address(cfg.planner_listen)),
        ("router", [*py, "services.router", *conf], dial_address(cfg.router_listen)),
    ]
    for w in cfg.workers:
        out.append((f"worker {w.id}", [*py, "services.worker", *conf, "--worker-id", w.id],
                    dial_address(w.listen)))
    return out


def make_missing_models(cfg: qlm_config.StackConfig) -> None:
    """Makes the tiny models (models with a `tiny_seed`) that real-engine workers need and
    that do not exist yet, so a fresh clone runs the vLLM stack without a model hub."""
    needed = {m for w in cfg.workers if w.engine != "sim" for m in w.models}
    for name in sorted(needed):
        m = cfg.models[name]
        if m.tiny_seed is None:
            continue
        from .engines.tiny_model import is_tiny_model, make_tiny_model

        path = cfg.resolve(m.path)
        if not is_tiny_model(path):
            print(f"making tiny model {name!r} (seed {m.tiny_seed}) in {path}", flush=True)
            make_tiny_model(path, m.tiny_seed)


class Stack:
    def __init__(self, cfg: qlm_config.StackConfig):
        self.cfg = cfg
        self.redis: EmbeddedRedis | None = None
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self) -> None:
        env = dict(os.environ)
        if self.cfg.redis_url == "embedded":
            self.redis = EmbeddedRedis().start()
            env[qlm_config.REDIS_URL_ENV] = self.redis.url
            print(f"redis: {self.redis.url} (embedded)", flush=True)
        make_missing_models(self.cfg)
        commands = service_commands(self.cfg)
        for name, argv, _ in commands:
            # a session (process group) per service, so its own children go with it (stop)
            self.procs.append((name, spawn_dying_with_parent(
                argv, env=env, start_new_session=True)))
        timeout_s = (VLLM_START_TIMEOUT_S if any(w.engine == "vllm" for w in self.cfg.workers)
                     else START_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        waiting = {name: address for name, _, address in commands}
        while waiting:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode} at start")
            for name, address in list(waiting.items()):
                if check_health(address, timeout_s=0.5):
                    del waiting[name]
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy after {timeout_s:.0f}s: "
                                   f"{', '.join(waiting)}")
            if waiting:
                time.sleep(0.2)

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in 10 s; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()
            kill_group(proc.pid)
        self.procs = []
        if self.redis:
            self.redis.stop()
            self.redis = None


def up(config_path: str | None) -> int:
    try:
        cfg = qlm_config.load(config_path)
    except qlm_config.ConfigError as e:
        print(f"qlm up: {e}", file=sys.stderr, flush=True)
        return 2
    stack = Stack(cfg)
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        print(f"router: {dial_address(cfg.router_listen)}", flush=True)
        print("ready", flush=True)
        while all(p.poll() is None for _, p in stack.procs):
            time.sleep(0.5)
        dead = [f"{n} (status {p.returncode})" for n, p in stack.procs if p.poll() is not None]
        print(f"stopping: {', '.join(dead)} exited", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return 0
    except RuntimeError as e:
        print(f"qlm up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        stack.stop()
        print("stopped", flush=True)
