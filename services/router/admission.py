"""Admission feedback: the planner's latest estimate of how long a new request of each model
would wait, read from Redis in the background so accepting a request costs no round trip."""

from __future__ import annotations

import asyncio
import logging
import time

from qlm.serving import cancel_and_wait
from qlm.state.store import QueueStore
from qlm.v1 import router_pb2

log = logging.getLogger("qlm.router")

REFRESH_S = 0.25


class AdmissionFeedback:
    def __init__(self, store: QueueStore):
        self.store = store
        self._waits: dict[str, float] = {}
        self._age_ms = 0.0  # age of the estimates when read
        self._read_at = 0.0  # time.monotonic() of that read
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop(), name="admission-refresh")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait([self._task])

    async def refresh(self) -> None:
        pipe = self.store.client.pipeline(transaction=False)
        pipe.hgetall(self.store.key("admission"))
        pipe.time()
        raw, (s, us) = await pipe.execute()
        at = raw.pop("@at_ms", None)
        self._waits = {m: float(w) for m, w in raw.items()}
        self._age_ms = max(0.0, s * 1000 + us / 1000 - float(at)) if at else 0.0
        self._read_at = time.monotonic()

    async def _refresh_loop(self) -> None:
        while not self._stopping:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # feedback is best effort; serving goes on without it
                log.debug("admission estimates unavailable: %s", e)
            await asyncio.sleep(REFRESH_S)

    def for_request(self, model: str, ttft_budget_ms: int) -> router_pb2.Admission | None:
        wait = self._waits.get(model)
        if wait is None:
            return None
        age = self._age_ms + (time.monotonic() - self._read_at) * 1000
        return router_pb2.Admission(estimated_wait_ms=wait, deadline_at_risk=wait > ttft_budget_ms,
                                    estimate_age_ms=age)
