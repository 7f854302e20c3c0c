"""InProcessStack: a whole mesh in one process (router, planner, workers as real gRPC servers on
loopback, talking to a real Redis), for the tests and for benchmarks that must share one
slow-to-start engine with the mesh they measure."""

from __future__ import annotations

import dataclasses
import pathlib
import uuid

import grpc

from qlm import config as qlm_config
from qlm.engines import create_engine
from qlm.redis_server import free_port
from qlm.serving import GrpcServer
from qlm.state.store import QueueStore
from qlm.v1 import planner_pb2_grpc, router_pb2_grpc, worker_pb2_grpc
from services.planner.loop import PlannerLoop
from services.planner.server import PlannerService
from services.router.server import RouterService
from services.worker.runner import WorkerRunner
from services.worker.server import WorkerService


class InProcessStack:
    def __init__(self, redis_url: str, config_path: pathlib.Path, routers: int = 1,
                 planners: int = 1, workers: bool = True, prefix: str | None = None):
        self.redis_url = redis_url
        self.config = qlm_config.load(config_path)
        self.prefix = prefix or f"s{uuid.uuid4().hex[:8]}:"
        self.start_workers = workers
        self.n_routers = routers
        self.n_planners = planners
        self.stores: list[QueueStore] = []
        self.servers: list[GrpcServer] = []
        self.routers: list[tuple[RouterService, GrpcServer]] = []
        self.planners: list[tuple[PlannerLoop, GrpcServer]] = []
        self.workers: dict[str, tuple[WorkerRunner, GrpcServer]] = {}
        self.channels: list[grpc.aio.Channel] = []
        self._own_engines: set[str] = set()  # workers whose engine this stack started

    def _store(self) -> QueueStore:
        s = QueueStore.connect(self.redis_url, prefix=self.prefix)
        self.stores.append(s)
        return s

    async def start(self) -> InProcessStack:
        for w in self.config.workers if self.start_workers else ():
            await self.start_worker(w.id)
        for _ in range(self.n_planners):
            loop = PlannerLoop(self.config, self._store())
            server = GrpcServer("qlm.v1.Planner", "127.0.0.1:0")
            planner_pb2_grpc.add_PlannerServicer_to_server(PlannerService(loop), server.server)
            await server.start()
            await loop.start()
            await server.set_serving(True)
            self.planners.append((loop, server))
        for _ in range(self.n_routers):
            service = RouterService(self.config, self._store())
            await service.start()
            limit = self.config.router_max_message_bytes
            server = GrpcServer("qlm.v1.Router", "127.0.0.1:0", options=[
                ("grpc.max_receive_message_length", limit)])
            router_pb2_grpc.add_RouterServicer_to_server(service, server.server)
            await server.start()
            await server.set_serving(True)
            self.routers.append((service, server))
        return self

    async def start_worker(self, worker_id: str, engine=None) -> WorkerRunner:
        """Starts a worker of the config; with `engine`, on that (started) engine instead of a
        new one, so tests can share one slow-to-start real engine."""
        address = f"127.0.0.1:{free_port()}"
        w = dataclasses.replace(self.config.worker(worker_id), listen=address, advertise=address)
        if engine is None:
            engine = create_engine(w, self.config)
            await engine.start()
            self._own_engines.add(worker_id)
        runner = WorkerRunner(self.config, w, engine, self._store(), poll_s=0.2)
        server = GrpcServer("qlm.v1.Worker", address)
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(runner), server.server)
        await server.start()
        await runner.start()
        await server.set_serving(True)
        self.workers[worker_id] = (runner, server)
        return runner

    async def stop_worker(self, worker_id: str) -> None:
        runner, server = self.workers.pop(worker_id)
        await runner.stop()
        if worker_id in self._own_engines:
            self._own_engines.discard(worker_id)
            await runner.engine.stop()
        await server.stop(0)

    def address(self, server: GrpcServer) -> str:
        return f"127.0.0.1:{server.port}"

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(address)
        self.channels.append(ch)
        return ch

    def router(self, i: int = 0) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel(self.address(self.routers[i][1])))

    def planner(self, i: int = 0) -> planner_pb2_grpc.PlannerStub:
        return planner_pb2_grpc.PlannerStub(self.channel(self.address(self.planners[i][1])))

    @property
    def store(self) -> QueueStore:
        return self.stores[0] if self.stores else self._store()

    async def stop(self) -> None:
        for ch in self.channels:
            await ch.close()
        for service, server in self.routers:
            await server.stop(0)
            await service.stop()
        for loop, server in self.planners:
            await loop.stop()
            await server.stop(0)
        for wid in list(self.workers):
            await self.stop_worker(wid)
        for s in self.stores:
            await s.close()
