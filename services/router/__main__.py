"""python -m services.router --config FILE [--listen ADDR] [--redis-url URL]"""

from __future__ import annotations

import logging

from qlm import config as qlm_config
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
from qlm.v1 import router_pb2_grpc

from .server import RouterService

log = logging.getLogger("qlm.router")


async def serve(args) -> None:
    config = qlm_config.load(args.config)
    listen = args.listen or config.router_listen
    store = QueueStore.connect(redis_url(args, config))
    service = RouterService(config, store)
    await service.start()
    limit = config.router_max_message_bytes
    server = GrpcServer("qlm.v1.Router", listen, options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ])
    router_pb2_grpc.add_RouterServicer_to_server(service, server.server)
    await server.start()
    await server.set_serving(True)
    log.info("router %s listening on %s", service.router_id, host_port(listen, server.port))
    try:
        await run_until_signal()
    finally:
        await server.set_serving(False)
        await server.stop()
        await service.stop()
        await store.close()


def main() -> None:
    parser = service_parser("services.router", __doc__, "router.listen")
    args = parser.parse_args()
    setup_logging("router")
    run(serve(args), parser.prog)


if __name__ == "__main__":
    main()
