"""The qlm.v1.Router servicer: validation, atomic enqueue, token relay, cancellation."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid

import grpc
import redis.exceptions

from qlm.config import StackConfig
from qlm.core.groups import group_kind
from qlm.state.store import QueueStore
from qlm.v1 import router_pb2, router_pb2_grpc

from .admission import AdmissionFeedback
from .relay import Relay, finished_message
from .validation import Admitted, ValidationError, validate

log = logging.getLogger("qlm.router")

STATES = {
    "queued": router_pb2.REQUEST_STATE_QUEUED,
    "running": router_pb2.REQUEST_STATE_RUNNING,
    "finished": router_pb2.REQUEST_STATE_FINISHED,
    "cancelled": router_pb2.REQUEST_STATE_CANCELLED,
    "failed": router_pb2.REQUEST_STATE_FAILED,
}


def unavailable_without_redis(method):
    """Turns a lost Redis into UNAVAILABLE (retryable) for a unary RPC, not UNKNOWN."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except redis.exceptions.RedisError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"queue state unavailable: {e}")

    return wrapper


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, config: StackConfig, store: QueueStore, router_id: str | None = None):
        self.config = config
        self.store = store
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self.relay = Relay(store, self.router_id)
        self.admission = AdmissionFeedback(
            store, {c.name: c.ttft_deadline_ms for c in config.slo_classes.values()})
        self._cancels: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.relay.start()
        await self.admission.start()

    async def stop(self) -> None:
        await self.admission.stop()
        await self.relay.stop()

    async def _validate(self, request, context) -> Admitted:
        try:
            return validate(request, self.config)
        except ValidationError as e:
            await context.abort(e.code, e.message)

    async def _enqueue(self, admitted: Admitted, context, watch: bool) -> bool:
        """Stores the request; False when its request_id existed already."""
        slo = self.config.slo_classes[admitted.slo_class]
        result = await self.store.enqueue(
            admitted.request_id,
            kind=group_kind(admitted.model, admitted.slo_class, admitted.prompt_tokens),
            model=admitted.model,
            slo_class=admitted.slo_class,
            max_queued=slo.max_queued,
            max_group_size=self.config.max_group_size,
            ttft_budget_ms=admitted.ttft_budget_ms,
            router=self.router_id if watch else "",
            fields={**admitted.fields, "detached": int(not watch)},
        )
        if result.status == "full":
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the {admitted.slo_class} queue is full ({result.detail} requests waiting); "
                "retry later",
            )
        return result.status == "ok"

    async def Generate(self, request, context):
        admitted = await self._validate(request, context)
        request_id = admitted.request_id
        # listen before enqueueing, so no output notification can be missed
        queue = self.relay.open(request_id)
        enqueued = finished = False
        try:
            created = await self._enqueue(admitted, context, watch=True)
            enqueued = True
            if not created:
                await self.store.watch(request_id, self.router_id)
            yield router_pb2.GenerateResponse(
                request_id=request_id,
                admission=self.admission.for_request(admitted.model, admitted.slo_class,
                                                     admitted.ttft_budget_ms))
            async for message in self.relay.stream(request_id, queue, 0, catch_up=not created):
                yield message
            finished = True
        except redis.exceptions.RedisError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"queue state unavailable: {e}")
        finally:
            self.relay.close(request_id, queue)
            if enqueued and not finished:
                # The client went away or its deadline passed (seen here as CancelledError, or
                # as GeneratorExit when it happens at a yield): free what the request holds.
                task = asyncio.ensure_future(self._cancel_quietly(request_id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)

    async def _cancel_quietly(self, request_id: str) -> None:
        try:
            await self.store.cancel(request_id, self.config.retention_s)
        except Exception as e:  # nothing to tell a client that is gone
            log.warning("cancel of %s after disconnect failed: %s", request_id, e)

    @unavailable_without_redis
    async def Submit(self, request, context):
        admitted = await self._validate(request, context)
        created = await self._enqueue(admitted, context, watch=False)
        return router_pb2.SubmitResponse(
            request_id=admitted.request_id, created=created,
            admission=self.admission.for_request(admitted.model, admitted.slo_class,
                                                 admitted.ttft_budget_ms))

    async def Watch(self, request, context):
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        queue = self.relay.open(request.request_id)
        try:
            fields = await self.store.get_request(request.request_id)
            if fields is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r}"
                )
            if request.from_index > int(fields.get("out", 0)) and fields["state"] not in (
                    "queued", "running"):
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"from_index {request.from_index} is past the request's "
                    f"{fields.get('out')} output tokens",
                )
            await self.store.watch(request.request_id, self.router_id)
            async for message in self.relay.stream(
                    request.request_id, queue, request.from_index, catch_up=True):
                yield message
        except redis.exceptions.RedisError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"queue state unavailable: {e}")
        finally:
            self.relay.close(request.request_id, queue)

    @unavailable_without_redis
    async def Cancel(self, request, context):
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        _, after = await self.store.cancel(request.request_id, self.config.retention_s)
        if after == "gone":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r}")
        return router_pb2.CancelResponse(state=STATES[after])

    @unavailable_without_redis
    async def GetRequest(self, request, context):
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        f = await self.store.get_request(request.request_id)
        if f is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r}")
        final = {"a": f.get("arrival_ms"), "s": f.get("start_ms"), "ft": f.get("first_token_ms"),
                 "end": f.get("finish_ms"), "d": f.get("deadline_ms"),
                 "p": f.get("prompt_tokens"), "n": f.get("out"), "f": f.get("finish_reason", ""),
                 "e": f.get("error", ""), "tp": f.get("tpot_ms")}
        finished = finished_message(final)
        live = f["state"] in ("queued", "running")
        return router_pb2.RequestInfo(
            request_id=request.request_id,
            model=f.get("model", ""),
            slo_class=f.get("cls", ""),
            state=STATES.get(f["state"], router_pb2.REQUEST_STATE_UNSPECIFIED),
            group_id=f.get("group", ""),
            worker_id=f.get("worker", "") if f["state"] == "running" else "",
            prompt_tokens=int(f.get("prompt_tokens") or 0),
            output_tokens=int(f.get("out") or 0),
            max_tokens=int(f.get("max_tokens") or 0),
            ttft_deadline_ms=int(f.get("ttft_budget_ms") or 0),
            tpot_deadline_ms=int(f.get("tpot_ms") or 0),
            finish_reason=finished.reason,
            usage=finished.usage,
            requeues=int(f.get("requeues") or 0),
            expires_in_s=0 if live else await self.store.request_ttl(request.request_id),
        )

    @unavailable_without_redis
    async def ListModels(self, request, context):
        workers = await self.store.alive_workers()
        count = {name: [0, 0] for name in self.config.models}  # can serve, loaded now
        for info in workers.values():
            for field, i in (("models", 0), ("loaded", 1)):
                for m in info.get(field, "").split():
                    if m in count:
                        count[m][i] += 1
        return router_pb2.ListModelsResponse(
            models=[router_pb2.ModelInfo(name=m.name, max_model_len=m.max_model_len,
                                         max_tokens=m.max_tokens, workers=count[m.name][0],
                                         workers_loaded=count[m.name][1])
                    for m in self.config.models.values()],
            slo_classes=[router_pb2.SloClass(name=c.name, ttft_deadline_ms=c.ttft_deadline_ms,
                                             max_queued=c.max_queued,
                                             tpot_deadline_ms=c.tpot_deadline_ms or 0,
                                             is_default=c.name == self.config.default_slo_class)
                         for c in self.config.slo_classes.values()],
        )
