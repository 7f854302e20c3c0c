"""A whole mesh in the test process: real gRPC servers on loopback ports, a real Redis (one
server per session, a fresh key prefix per stack), sim engines. Services that a test must kill
with SIGKILL run as processes instead (see ServiceProcess)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import uuid

import yaml

from qlm import config as qlm_config
from qlm.inprocess import InProcessStack  # noqa: F401 (the tests import it from here)
from qlm.procutil import kill_group, spawn_dying_with_parent, stop_process

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROFILES = ROOT / "deploy" / "profiles"


def write_config(tmp_path: pathlib.Path, *, workers: list[dict], **overrides) -> pathlib.Path:
    """A stack config like deploy/local.yaml with the given workers; listen ports 0 (any free)
    unless a test names them. `overrides` replace top-level sections."""
    base = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    base["router"]["listen"] = "127.0.0.1:0"
    base["planner"]["listen"] = "127.0.0.1:0"
    base["planner"]["interval_ms"] = 100
    base["limits"].update({"lease_ms": 1000, "heartbeat_ms": 200})
    base["workers"] = [
        {"listen": "127.0.0.1:0", "engine": "sim", "profile": str(PROFILES / "sim-small.yaml"),
         "time_scale": 0.05, **w} for w in workers
    ]
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key].update(value)
        else:
            base[key] = value
    path = tmp_path / f"stack-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes in process group `pgid`, as "PID (command)"."""
    alive = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(f"{d.name} {raw[raw.index('('):raw.rindex(')') + 1]}")
    return alive


class ServiceProcess:
    """One service (`python -m services.X ...`) as its own process, for tests that kill it."""

    def __init__(self, module: str, *args: str, redis_url: str):
        env = {**os.environ, qlm_config.REDIS_URL_ENV: redis_url}
        self.proc = spawn_dying_with_parent(
            [sys.executable, "-m", module, *args], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )

    async def wait_healthy(self, address: str, timeout_s: float = 30.0) -> None:
        from qlm.launcher import check_health

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await asyncio.to_thread(check_health, address, "", 0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.proc.stderr.read().decode()[-2000:]}")
            if loop.time() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout_s}s")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as when its host is lost: whatever it started dies with it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        kill_group(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        kill_group(self.proc.pid)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state), or None."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def start_time(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat: starttime


def is_running(pid: int, started: str) -> bool:
    """Whether `pid` is still the process that started at `started` and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[19] == started and fields[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for f in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out.update(int(x) for x in f.read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out
