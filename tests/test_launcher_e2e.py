"""`qlm up` end to end: the real launcher as a subprocess (embedded Redis, planner, router, two sim
workers, each its own process), driven from outside with grpcurl and `qlm generate` exactly as
the README tells a developer to, then stopped with SIGINT.

Every port is a free one (never 50051-50064: a developer's own stack may be running), and
QLM_REDIS_URL is removed from the launcher's environment so it always starts its own Redis. The
launcher runs in a session of its own, so the tests can tell whether anything it started (its
process group) outlives it."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from qlm import config as qlm_config
from qlm.procutil import kill_group
from qlm.redis_server import free_port

from .harness import (
    PROFILES,
    ROOT,
    children,
    group_members,
    is_running,
    start_time,
    write_config,
)

GRPCURL = pathlib.Path(sys.executable).with_name("grpcurl")
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
# The default stack's ports: a developer's `qlm up` may hold them while the tests run.
DEFAULT_PORTS = set(range(50051, 50053)) | set(range(50061, 50065))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="inspects processes through /proc")


# --- helpers -----------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports and p not in DEFAULT_PORTS:
            ports.append(p)
    return ports


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != qlm_config.REDIS_URL_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stack_config(tmp_path: pathlib.Path, router: int, planner: int,
                 workers: list[tuple[str, int, str]]) -> pathlib.Path:
    """A config like deploy/local.yaml on the given ports; workers are (id, port, model)."""
    return write_config(
        tmp_path,
        workers=[{"id": wid, "listen": f"127.0.0.1:{port}", "models": [model],
                  "profile": str(PROFILES / f"sim-{model}.yaml"), "time_scale": 0.05}
                 for wid, port, model in workers],
        redis={"url": "embedded"},
        router={"listen": f"127.0.0.1:{router}"},
        planner={"listen": f"127.0.0.1:{planner}"},
        # local.yaml's limits, not the harness's tight ones: a loaded CI machine must not make
        # a worker's heartbeat lapse (ListModels counts live workers)
        limits={"lease_ms": 3000, "heartbeat_ms": 500},
    )


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of `pid`."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            started = start_time(child)
            if started is not None and child not in found:
                found[child] = started
                todo.append(child)
    return found


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def run_up(config: pathlib.Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """`qlm up` that is expected to fail at start; its whole process group must be gone."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlm", "up", "--config", str(config)], cwd=ROOT, env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"qlm up did not exit within {timeout_s:.0f}s\nstdout:\n{out}\nstderr:\n"
                    f"{err[-3000:]}")
    deadline = time.monotonic() + 5.0
    while (left := group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_group(proc.pid)
    assert not left, f"qlm up exited ({proc.returncode}) but left processes running: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def grpcurl(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRPCURL), "-plaintext", "-max-time", "20", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def json_messages(text: str) -> list[dict]:
    """grpcurl prints one JSON object per message, pretty-printed, back to back."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


def field(msg: dict, name: str, default=None):
    """A field of grpcurl's JSON by its proto name or its JSON (lowerCamelCase) name."""
    camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
    return msg.get(name, msg.get(camel, default))


# --- the stack ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Launcher:
    proc: subprocess.Popen
    router: str
    planner: str
    workers: dict[str, str]
    stderr_path: pathlib.Path
    lines: list[str] = dataclasses.field(default_factory=list)
    cond: threading.Condition = dataclasses.field(default_factory=threading.Condition)
    eof: bool = False
    # Every process the launcher started (and theirs), pid -> start time, seen while it ran.
    started: dict[int, str] = dataclasses.field(default_factory=dict)
    redis_port: int | None = None

    def read_stdout(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for_line(self, wanted: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        exited = False
        with self.cond:
            while wanted not in self.lines:
                if not exited and self.proc.poll() is not None:
                    # its last lines may still be in the pipe; EOF can lag behind while a
                    # service that inherited stdout is on its way out
                    exited = True
                    deadline = min(deadline, time.monotonic() + 2.0)
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    return wanted in self.lines
                self.cond.wait(min(left, 0.5))
            return True

    def stdout(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def stderr(self, tail: int = 4000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        return f"stdout:\n{self.stdout()}\nstderr (tail):\n{self.stderr()}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launcher")
    router_port, planner_port, w_small, w_large = free_ports(4)
    config = stack_config(tmp, router_port, planner_port,
                          [("ws", w_small, "small"), ("wl", w_large, "large")])
    stderr_path = tmp / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qlm", "up", "--config", str(config)], cwd=ROOT,
            env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            text=True, start_new_session=True,
        )
    launcher = Launcher(proc, router=f"127.0.0.1:{router_port}",
                        planner=f"127.0.0.1:{planner_port}",
                        workers={"ws": f"127.0.0.1:{w_small}", "wl": f"127.0.0.1:{w_large}"},
                        stderr_path=stderr_path)
    reader = threading.Thread(target=launcher.read_stdout, name="qlm-up-stdout", daemon=True)
    reader.start()
    try:
        if not launcher.wait_for_line("ready", READY_TIMEOUT_S):
            pytest.fail(f"qlm up printed no `ready` within {READY_TIMEOUT_S:.0f}s "
                        f"(exit status {proc.poll()})\n{launcher.output()}")
        launcher.started = descendants(proc.pid)
        m = re.search(r"^redis: redis://[^:]+:(\d+)/", launcher.stdout(), re.M)
        launcher.redis_port = int(m.group(1)) if m else None
        yield launcher
    finally:
        if proc.poll() is None:  # the SIGINT test did not run or did not stop it
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc.pid)
        proc.wait()
        reader.join(5)
        proc.stdout.close()


# --- tests against the running stack -----------------------------------------------------------


def test_up_prints_router_address_and_starts_everything(stack):
    assert f"router: {stack.router}" in stack.lines, stack.output()
    assert stack.redis_port is not None, f"no `redis: URL (embedded)` line\n{stack.output()}"
    assert accepts_connections(stack.redis_port)
    # redis, planner, router and two workers, all children of the launcher
    assert len(children(stack.proc.pid)) == 5, (
        f"children: {sorted(children(stack.proc.pid))}\n{stack.output()}")


def test_grpcurl_generate_streams_tokens(stack):
    r = grpcurl("-d", json.dumps({"model": "small", "prompt": "Hello", "max_tokens": 16,
                                  "slo_class": "interactive"}),
                stack.router, "qlm.v1.Router/Generate")
    assert r.returncode == 0, f"grpcurl failed ({r.returncode}): {r.stderr}\n{r.stdout}"
    messages = json_messages(r.stdout)
    assert len(messages) >= 2, r.stdout
    first, last = messages[0], messages[-1]
    request_id = field(first, "request_id")
    assert request_id, f"first message has no request id: {first}"
    assert all(field(m, "request_id", request_id) == request_id for m in messages)
    tokens = [t for m in messages for t in field(m, "token_ids", [])]
    assert len(tokens) == 16, r.stdout
    index = 0  # indexes are dense: each message starts where the previous one ended
    for m in messages:
        assert int(field(m, "index", 0)) == index, f"expected index {index}: {m}"
        index += len(field(m, "token_ids", []))
    assert all("finished" not in m for m in messages[:-1])
    finished = last["finished"]
    assert finished["reason"] == "FINISH_REASON_LENGTH", last
    assert int(field(finished["usage"], "output_tokens")) == 16, last


@pytest.mark.parametrize("target, service", [
    ("router", ""), ("router", "qlm.v1.Router"), ("planner", "qlm.v1.Planner"),
    ("worker", "qlm.v1.Worker"),
])
def test_grpcurl_health_check(stack, target, service):
    address = stack.workers["ws"] if target == "worker" else getattr(stack, target)
    r = grpcurl("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check")
    assert r.returncode == 0, f"grpcurl failed ({r.returncode}): {r.stderr}"
    assert json_messages(r.stdout) == [{"status": "SERVING"}], r.stdout


@pytest.mark.parametrize("target, service", [
    ("router", "qlm.v1.Router"), ("planner", "qlm.v1.Planner"), ("worker", "qlm.v1.Worker"),
])
def test_grpcurl_list_uses_reflection(stack, target, service):
    address = stack.workers["wl"] if target == "worker" else getattr(stack, target)
    r = grpcurl(address, "list")
    assert r.returncode == 0, f"grpcurl list failed ({r.returncode}): {r.stderr}"
    services = r.stdout.split()
    assert service in services, r.stdout
    assert "grpc.health.v1.Health" in services, r.stdout


@pytest.mark.parametrize("request_json, code", [
    ({"model": "no-such-model", "prompt": "Hello", "max_tokens": 4}, "NotFound"),
    ({"model": "small", "prompt": "", "max_tokens": 4}, "InvalidArgument"),
])
def test_grpcurl_bad_request(stack, request_json, code):
    r = grpcurl("-d", json.dumps(request_json), stack.router, "qlm.v1.Router/Generate")
    assert r.returncode != 0, f"grpcurl succeeded on a bad request: {r.stdout}"
    assert code in r.stdout + r.stderr, f"expected {code}: {r.stderr}\n{r.stdout}"


def test_grpcurl_list_models(stack):
    deadline = time.monotonic() + 10.0  # a heartbeat may be late on a loaded machine
    while True:
        r = grpcurl("-d", "{}", stack.router, "qlm.v1.Router/ListModels")
        assert r.returncode == 0, f"grpcurl failed ({r.returncode}): {r.stderr}"
        (reply,) = json_messages(r.stdout)
        models = {m["name"]: m for m in reply["models"]}
        workers = {name: int(m.get("workers", 0)) for name, m in models.items()}
        if workers == {"small": 1, "large": 1} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(models) == {"small", "large"}, r.stdout
    assert workers == {"small": 1, "large": 1}, r.stdout
    classes = {c["name"] for c in field(reply, "slo_classes")}
    assert {"interactive", "batch"} <= classes, r.stdout


def test_qlm_generate_cli(stack):
    r = subprocess.run(
        [sys.executable, "-m", "qlm", "generate", "--router", stack.router, "--model", "large",
         "--prompt", "Hello", "--max-tokens", "8", "--slo-class", "batch"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, f"qlm generate failed ({r.returncode}): {r.stderr}"
    assert r.stdout.strip(), f"qlm generate printed no text; stderr: {r.stderr}"
    assert "FINISH_REASON_LENGTH" in r.stderr and "output=8" in r.stderr, r.stderr


# Must stay the last test of the stack: it stops it.
def test_sigint_stops_everything(stack):
    assert stack.proc.poll() is None, f"qlm up is no longer running\n{stack.output()}"
    started = {**stack.started, **descendants(stack.proc.pid)}
    assert started, "qlm up has no child processes"
    stack.proc.send_signal(signal.SIGINT)
    try:
        status = stack.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qlm up did not exit within {STOP_TIMEOUT_S:.0f}s of SIGINT\n"
                    f"{stack.output()}")
    assert status == 0, f"qlm up exited with {status} after SIGINT\n{stack.output()}"
    assert stack.wait_for_line("stopped", 5.0), f"no `stopped` line\n{stack.output()}"
    deadline = time.monotonic() + 3.0  # orphans may still be on their way out
    while True:
        left = {pid: s for pid, s in started.items() if is_running(pid, s)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes started by qlm up still running: {group_members(stack.proc.pid)}"
    assert not group_members(stack.proc.pid)
    assert stack.redis_port is not None
    assert not accepts_connections(stack.redis_port), "the embedded Redis still accepts connections"


# --- start-up failures -------------------------------------------------------------------------


def test_up_rejects_broken_config(tmp_path):
    router_port, planner_port, w_port = free_ports(3)
    config = stack_config(tmp_path, router_port, planner_port, [("w0", w_port, "small")])
    text = config.read_text().replace("- small", "- no-such-model")
    assert text != config.read_text()
    config.write_text(text)
    t0 = time.monotonic()
    r = run_up(config, timeout_s=30)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0, r.stdout
    assert elapsed < 15, f"qlm up took {elapsed:.1f}s to reject a broken config"
    assert "no-such-model" in r.stderr and "w0" in r.stderr, r.stderr
    assert "ready" not in r.stdout.split(), r.stdout
    # A typo in a config is the user's mistake, not a crash: one line saying what is wrong.
    assert "Traceback" not in r.stderr, (
        "qlm up reports a config error as a Python traceback instead of a one-line message "
        f"(`qlm up: ...`):\n{r.stderr[-2000:]}")


def test_up_fails_when_a_port_is_taken(tmp_path):
    router_port, planner_port, w_port = free_ports(3)
    config = stack_config(tmp_path, router_port, planner_port, [("w0", w_port, "small")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", router_port))
        taken.listen()
        r = run_up(config, timeout_s=READY_TIMEOUT_S)
    assert r.returncode != 0, f"qlm up started although port {router_port} was taken\n{r.stdout}"
    assert "ready" not in r.stdout.split(), r.stdout
    # the launcher's own verdict (the services' logs and tracebacks come before it)
    verdict = [line for line in r.stderr.splitlines() if line.startswith("qlm up:")]
    assert verdict and "router" in verdict[-1], (
        f"no `qlm up: ...` line naming the router:\n{r.stderr[-3000:]}")
    assert "stopped" in r.stdout.split(), r.stdout
