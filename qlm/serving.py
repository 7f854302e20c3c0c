"""What every service's gRPC server has in common: health checking (per service and overall),
reflection, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import ConfigError

log = logging.getLogger("qlm")


class GrpcServer:
    """A grpc.aio server with health and reflection; `name` is the full service name
    (e.g. "qlm.v1.Router") reported by the health service next to "" (overall)."""

    def __init__(self, name: str, listen: str, options: list[tuple[str, int]] | None = None):
        self.name = name
        self.listen = listen
        self.server = grpc.aio.server(options=options or [])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )
        self.port = 0

    async def start(self) -> None:
        self.port = self.server.add_insecure_port(self.listen)
        if not self.port:
            raise RuntimeError(f"{self.name}: cannot listen on {self.listen}")
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", self.name):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def cancel_and_wait(tasks, timeout_s: float = 5.0) -> None:
    """Cancels background tasks and waits for them. Their loops must also check a stop flag:
    some client libraries swallow a CancelledError that lands inside their own await."""
    tasks = [t for t in tasks if t is not None]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)


def host_port(listen: str, port: int) -> str:
    """The address to print for a server bound to `listen` (which may say port 0)."""
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"


async def run_until_signal(stop: asyncio.Event | None = None) -> None:
    """Waits for SIGINT or SIGTERM (or `stop` being set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def redis_url(args, config) -> str:
    """The Redis a service uses: --redis-url, else QLM_REDIS_URL or the config's redis.url."""
    url = args.redis_url or config.redis_url
    if url == "embedded":
        raise ConfigError(
            f"{config.path}: redis.url is 'embedded', a Redis that only `qlm up` starts (and "
            "shares with the services it runs); a service started on its own needs "
            "--redis-url or QLM_REDIS_URL (redis://host:port)")
    return url


def run(main, prog: str = "qlm") -> None:
    """Runs a service's main coroutine, on uvloop when it is installed (QLM_EVENT_LOOP=asyncio
    keeps the standard loop). A config the service cannot start with ends it with the
    reason and status 2, as `qlm up` does, not a traceback."""
    import os

    try:
        if os.environ.get("QLM_EVENT_LOOP", "uvloop") == "uvloop":
            try:
                import uvloop
            except ImportError:
                uvloop = None
            if uvloop is not None:
                uvloop.run(main)
                return
        asyncio.run(main)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def service_parser(module: str, doc: str, listen_of: str) -> argparse.ArgumentParser:
    """The command line every service shares; `listen_of` names the config key --listen
    overrides."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc)
    parser.add_argument("--config", default=None, help="stack config (default deploy/local.yaml)")
    parser.add_argument("--listen", default=None, help=f"override the config's {listen_of}")
    parser.add_argument("--redis-url", default=None, help="override QLM_REDIS_URL / redis.url")
    return parser


def setup_logging(service: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {service} %(levelname)s %(message)s",
    )
