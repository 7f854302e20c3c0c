"""The qlm.v1.Planner servicer."""

from __future__ import annotations

import grpc

from qlm.v1 import planner_pb2, planner_pb2_grpc

from .loop import PlannerLoop


class PlannerService(planner_pb2_grpc.PlannerServicer):
    def __init__(self, loop: PlannerLoop):
        self.loop = loop

    async def _plan_in_force(self) -> planner_pb2.Plan:
        store = self.loop.store
        info = await store.plan_info()
        workers = sorted(await store.alive_workers())
        queues = await store.virtual_queues(workers)
        return planner_pb2.Plan(
            epoch=int(info.get("epoch", 0)),
            sequence=int(info.get("sequence", 0)),
            policy=info.get("policy", ""),
            queues=[planner_pb2.VirtualQueue(worker_id=w, group_ids=queues[w]) for w in workers],
            created_ms=float(info.get("created_ms", 0)),
            compute_ms=float(info.get("compute_ms", 0)),
            leader=self.loop.leader,
            calibration=self._calibration(),
        )

    def _calibration(self) -> planner_pb2.EstimatorCalibration | None:
        cal = getattr(self.loop.policy, "calibration", None)
        if cal is None or not cal.count:
            return None
        return planner_pb2.EstimatorCalibration(**cal.summary())

    async def GetPlan(self, request, context):
        return await self._plan_in_force()

    async def Replan(self, request, context):
        if await self.loop.plan_once() is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"planner {self.loop.id} is on standby; ask the leader")
        return await self._plan_in_force()
