"""python -m services.worker --config FILE --worker-id ID [--listen ADDR] [--redis-url URL]"""

from __future__ import annotations

import dataclasses
import logging

from qlm import config as qlm_config
from qlm.engines import create_engine
from qlm.serving import (
    GrpcServer,
    host_port,
    redis_url,
    run,
    run_until_signal,
    service_parser,
    setup_logging,
)
from qlm.state.store import QueueStore
from qlm.v1 import worker_pb2_grpc

from .runner import WorkerRunner
from .server import WorkerService

log = logging.getLogger("qlm.worker")


async def serve(args) -> None:
    config = qlm_config.load(args.config)
    worker = config.worker(args.worker_id)
    if args.listen:
        worker = dataclasses.replace(worker, listen=args.listen, advertise=args.listen)
    store = QueueStore.connect(redis_url(args, config))
    engine = create_engine(worker, config)
    await engine.start()
    runner = WorkerRunner(config, worker, engine, store)
    server = GrpcServer("qlm.v1.Worker", worker.listen)
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(runner), server.server)
    await server.start()
    await runner.start()
    await server.set_serving(True)
    log.info("worker %s serving %s on %s", worker.id, engine.models(),
             host_port(worker.listen, server.port))
    try:
        await run_until_signal()
    finally:
        await server.set_serving(False)
        await runner.stop()
        await engine.stop()
        await server.stop()
        await store.close()


def main() -> None:
    parser = service_parser("services.worker", __doc__, "worker's listen address")
    parser.add_argument("--worker-id", required=True)
    args = parser.parse_args()
    setup_logging(f"worker[{args.worker_id}]")
    run(serve(args), parser.prog)


if __name__ == "__main__":
    main()
