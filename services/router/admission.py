"""Admission feedback: the planner's latest estimate of how long a new request of each model
and SLO class would wait, read from Redis in the background so accepting a request costs no
round trip.

The planner places a request by its deadline, so its wait depends on its class: it goes ahead
of groups due later. A request with an explicit deadline tighter than its class's is read at
the nearest class deadline not looser than its own: that position is behind no more groups
than its real one, so the estimate errs towards "in time", and a request flagged at risk is
at risk. With no class that tight, the model's estimate stands: behind everything planned, it
errs the other way."""

from __future__ import annotations

import asyncio
import logging
import time

from qlm.serving import cancel_and_wait
from qlm.state.store import QueueStore, admission_field
from qlm.v1 import router_pb2

log = logging.getLogger("qlm.router")

REFRESH_S = 0.25


class AdmissionFeedback:
    def __init__(self, store: QueueStore, class_deadlines_ms: dict[str, int] | None = None):
        self.store = store
        # SLO class -> its TTFT objective, and the classes loosest first
        self._deadline_ms = dict(class_deadlines_ms or {})
        self._loosest_first = sorted(self._deadline_ms.items(), key=lambda c: (-c[1], c[0]))
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

    def _wait(self, model: str, slo_class: str, ttft_budget_ms: int) -> float | None:
        own = self._deadline_ms.get(slo_class)
        if own is not None and ttft_budget_ms < own:  # an explicit deadline, tighter
            slo_class = next((c for c, d in self._loosest_first if d <= ttft_budget_ms), "")
        wait = self._waits.get(admission_field(model, slo_class)) if slo_class else None
        return self._waits.get(model) if wait is None else wait

    def for_request(self, model: str, slo_class: str,
                    ttft_budget_ms: int) -> router_pb2.Admission | None:
        wait = self._wait(model, slo_class, ttft_budget_ms)
        if wait is None:
            return None
        age = self._age_ms + (time.monotonic() - self._read_at) * 1000
        return router_pb2.Admission(estimated_wait_ms=wait, deadline_at_risk=wait > ttft_budget_ms,
                                    estimate_age_ms=age)
