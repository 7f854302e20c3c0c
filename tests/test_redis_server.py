"""The embedded Redis server: it answers, it stops, and it does not outlive a parent that is
killed with SIGKILL (a test run or launcher lost mid-way must not leave servers behind)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qlm.redis_server import EmbeddedRedis

from .harness import ROOT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still has a pid: read its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_started_server_answers_and_stop_ends_it():
    server = EmbeddedRedis().start()
    pid = server._proc.pid
    client = redis.Redis.from_url(server.url)
    try:
        assert client.ping()
        # the pid Popen holds is the server itself (the wrapper execs it), so stop reaches it
        assert os.readlink(f"/proc/{pid}/exe").endswith("-server")
    finally:
        client.close()
        server.stop()
    assert _wait_gone(pid, 5)


def test_server_dies_with_a_parent_killed_by_sigkill():
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import time
            from qlm.redis_server import EmbeddedRedis
            server = EmbeddedRedis().start()
            print(server._proc.pid, flush=True)
            time.sleep(60)
        """)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        assert _alive(pid)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert _wait_gone(pid, 10), f"redis server {pid} outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


async def test_starts_while_grpc_threads_are_busy():
    """Tests and the launcher start Redis from processes whose gRPC threads are mid-call. A
    Popen that forks and runs Python in the child before exec (a preexec_fn) lost about one
    start in four here to gRPC's state copied mid-call (the child died before exec)."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    busy = True

    async def call_in_a_loop():
        while busy:
            await stub.Check(health_pb2.HealthCheckRequest())

    callers = [asyncio.create_task(call_in_a_loop()) for _ in range(8)]
    try:
        for _ in range(30):
            started = await asyncio.to_thread(lambda: EmbeddedRedis().start())
            started.stop()
    finally:
        busy = False
        await asyncio.gather(*callers)
        await channel.close()
        await server.stop(None)
