"""python -m services.planner --config FILE [--listen ADDR] [--redis-url URL] [--policy NAME]"""

from __future__ import annotations

import logging

from qlm import config as qlm_config
from qlm.core import variants
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
from qlm.v1 import planner_pb2_grpc

from .loop import PlannerLoop
from .server import PlannerService

log = logging.getLogger("qlm.planner")


async def serve(args) -> None:
    config = qlm_config.load(args.config)
    listen = args.listen or config.planner_listen
    store = QueueStore.connect(redis_url(args, config))
    loop = PlannerLoop(config, store, policy=args.policy)
    server = GrpcServer("qlm.v1.Planner", listen)
    planner_pb2_grpc.add_PlannerServicer_to_server(PlannerService(loop), server.server)
    await server.start()
    await loop.start()
    await server.set_serving(True)
    log.info("planner %s (%s) listening on %s", loop.id, loop.policy_name,
             host_port(listen, server.port))
    try:
        await run_until_signal()
    finally:
        await server.set_serving(False)
        await loop.stop()
        await server.stop()
        await store.close()


def main() -> None:
    parser = service_parser("services.planner", __doc__, "planner.listen")
    parser.add_argument("--policy", default=None,
                        help=f"override planner.policy ({', '.join(variants.PLANNER_POLICIES)})")
    args = parser.parse_args()
    if args.policy is not None:
        try:
            variants.check(args.policy)
        except ValueError as e:
            parser.error(str(e))
    setup_logging("planner")
    run(serve(args), parser.prog)


if __name__ == "__main__":
    main()
