"""The qlm.v1.Worker servicer: action plans from the planner, status for operators."""

from __future__ import annotations

import logging

from qlm.engines.base import EngineError
from qlm.v1 import worker_pb2, worker_pb2_grpc

from .runner import WorkerRunner

log = logging.getLogger("qlm.worker")


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runner: WorkerRunner):
        self.runner = runner
        self.applied = (0, 0)  # (epoch, sequence) of the last plan carried out

    async def ApplyPlan(self, request, context):
        version = (request.epoch, request.sequence)
        if request.worker_id and request.worker_id != self.runner.id:
            return worker_pb2.ApplyPlanResponse(
                applied=False, detail=f"this is worker {self.runner.id}, not {request.worker_id}")
        if version <= self.applied:
            return worker_pb2.ApplyPlanResponse(
                applied=False, detail=f"stale plan {version}, have {self.applied}")
        self.applied = version
        failures = []
        for action in request.actions:
            kind = action.WhichOneof("action")
            try:
                if kind == "evict":
                    if not await self.runner.evict(action.evict.request_id):
                        failures.append(f"evict: {action.evict.request_id} is not running here")
                elif kind == "swap_model":
                    await self.runner.swap_model(action.swap_model.model)
                elif kind == "warm_model":
                    self.runner.warm(action.warm_model.model)
                elif kind == "step_limit":
                    self.runner.set_step_limit(action.step_limit.max_running,
                                               action.step_limit.max_prefill_tokens)
            except EngineError as e:
                failures.append(f"{kind}: {e}")
        self.runner.wake()  # the virtual queue changed with the plan
        return worker_pb2.ApplyPlanResponse(applied=True, detail="; ".join(failures))

    async def GetStatus(self, request, context):
        stats = self.runner.engine.stats()
        return worker_pb2.WorkerStatus(
            worker_id=self.runner.id,
            models=self.runner.engine.models(),
            warm_models=self.runner.engine.warm_models(),
            model_swaps=self.runner.model_swaps,
            engine=self.runner.engine.kind,
            running=stats.running,
            max_running=stats.max_running,
            kv_used_tokens=stats.kv_used_tokens,
            kv_capacity_tokens=stats.kv_capacity_tokens,
            plan_epoch=self.applied[0],
            plan_sequence=self.applied[1],
            completed=self.runner.completed,
        )
