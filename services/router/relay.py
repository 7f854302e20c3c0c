"""Relays request output from Redis to gRPC streams.

Workers append output to a per-request Redis stream and publish each entry on the channel of
every router watching the request. One pub/sub connection per router feeds all of its streams;
the Redis stream stays the source of truth: when an entry is missing (a gap in token indexes,
a pub/sub message lost on reconnect, or nothing heard for a while), the relay re-reads the
stream from the last entry it saw. Token indexes make the output exactly-once per stream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from qlm.serving import cancel_and_wait
from qlm.state.store import QueueStore
from qlm.v1 import router_pb2

log = logging.getLogger("qlm.router")

# How long a stream waits for a notification before it re-reads Redis anyway.
SAFETY_POLL_S = 1.0

FINISH_REASONS = {
    "length": router_pb2.FINISH_REASON_LENGTH,
    "stop": router_pb2.FINISH_REASON_STOP,
    "cancelled": router_pb2.FINISH_REASON_CANCELLED,
    "error": router_pb2.FINISH_REASON_ERROR,
}


def _ms(entry: dict, key: str) -> float:
    value = entry.get(key)
    return float(value) if value not in (None, "") else 0.0


def finished_message(entry: dict) -> router_pb2.Finished:
    arrival = _ms(entry, "a")
    start, first, end, deadline = (_ms(entry, k) for k in ("s", "ft", "end", "d"))
    output_tokens = int(_ms(entry, "n"))
    # TPOT: the time per output token after the first, kept by a request of at most one token
    tpot_deadline = _ms(entry, "tp")
    tpot_met = (not tpot_deadline or output_tokens < 2 or not first or not end
                or (end - first) / (output_tokens - 1) <= tpot_deadline)
    usage = router_pb2.Usage(
        prompt_tokens=int(_ms(entry, "p")),
        output_tokens=output_tokens,
        queue_wait_ms=max(0.0, start - arrival) if start else 0.0,
        ttft_ms=max(0.0, first - arrival) if first else 0.0,
        e2e_ms=max(0.0, end - arrival) if end else 0.0,
    )
    return router_pb2.Finished(
        reason=FINISH_REASONS.get(entry.get("f", ""), router_pb2.FINISH_REASON_UNSPECIFIED),
        usage=usage,
        error=entry.get("e", ""),
        slo_met=bool(first) and first <= deadline and tpot_met,
    )


class Relay:
    def __init__(self, store: QueueStore, router_id: str):
        self.store = store
        self.router_id = router_id
        self.channel = store.key("relay", router_id)
        self._queues: dict[str, set[asyncio.Queue]] = {}
        self._pubsub = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        self._pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.channel)
        self._task = asyncio.create_task(self._listen(), name="relay-listen")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait([self._task])
        if self._pubsub:
            await self._pubsub.aclose()

    async def _listen(self) -> None:
        while not self._stopping:
            try:
                async for message in self._pubsub.listen():
                    if message["type"] != "message":
                        continue
                    entry = json.loads(message["data"])
                    for q in self._queues.get(entry.get("r"), ()):
                        q.put_nowait(entry)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis went away: streams fall back to polling meanwhile
                log.warning("relay subscription lost (%s); resubscribing", e)
                await asyncio.sleep(0.5)
                try:
                    await self._pubsub.subscribe(self.channel)
                except Exception:
                    pass

    def open(self, request_id: str) -> asyncio.Queue:
        """Starts buffering the request's notifications; call before it can produce output."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues.setdefault(request_id, set()).add(q)
        return q

    def close(self, request_id: str, q: asyncio.Queue) -> None:
        qs = self._queues.get(request_id)
        if qs is not None:
            qs.discard(q)
            if not qs:
                del self._queues[request_id]

    async def stream(
        self, request_id: str, q: asyncio.Queue, from_index: int = 0, catch_up: bool = True
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Token chunks from `from_index` on, then the final message."""
        next_index = from_index
        last_id = "-"
        need_read = catch_up
        while True:
            if need_read:
                need_read = False
                items = [{**e, "id": eid} for eid, e in
                         await self.store.read_output(request_id, last_id)]
            else:
                try:
                    async with asyncio.timeout(SAFETY_POLL_S):
                        items = [await q.get()]
                except TimeoutError:
                    need_read = True
                    continue
                while not q.empty():
                    items.append(q.get_nowait())
            ids: list[int] = []
            text: list[str] = []
            start = next_index
            for item in items:
                if "f" in item:
                    if int(_ms(item, "n")) > next_index:
                        need_read = True  # tokens before the end are still missing
                        break
                    yield router_pb2.GenerateResponse(
                        request_id=request_id, index=start, token_ids=ids, text="".join(text),
                        finished=finished_message(item),
                    )
                    return
                first = int(item["i"])
                chunk = [int(t) for t in str(item["t"]).split()]
                if first > next_index:
                    need_read = True
                    break
                if first + len(chunk) <= next_index:
                    continue  # already relayed
                skip = next_index - first
                ids.extend(chunk[skip:])
                # text cannot be split at a token boundary; a chunk is relayed whole unless a
                # client resumes from inside it
                text.append(item.get("x", "") if skip == 0 else "")
                next_index = first + len(chunk)
                last_id = item["id"]
            if ids:
                yield router_pb2.GenerateResponse(
                    request_id=request_id, index=start, token_ids=ids, text="".join(text)
                )
