"""PlannerLoop: leadership, snapshots, plan installation and pushes (no gRPC server here)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import grpc

from qlm.config import ConfigError, StackConfig
from qlm.core import policies, variants
from qlm.core.estimator import InstanceThroughput
from qlm.core.plan import GroupView, Plan, RunningView, SloView, Snapshot, WorkerView
from qlm.core.plan_generator import observer
from qlm.engines import sim_profiles
from qlm.engines.sim import SimProfile
from qlm.serving import cancel_and_wait
from qlm.state.store import QueueStore
from qlm.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("qlm.planner")

# After the first event, wait this long for more so a burst costs one plan, not hundreds.
DEBOUNCE_S = 0.02
CATCH_UP_BATCH = 1000  # events per read when a planner learns from the stream at start


async def take_snapshot(store: QueueStore, workers: dict[str, dict[str, str]],
                        config: StackConfig | None = None) -> Snapshot:
    """The fleet as a policy sees it; `workers` is store.alive_workers()."""
    groups = await store.groups()
    running = await running_requests(store, sorted(workers))
    return Snapshot(
        now_ms=await store.now_ms(),
        groups=tuple(
            GroupView(id=g["id"], model=g["model"], slo_class=g["cls"],
                      deadline_ms=int(g["deadline_ms"]), sequence=int(g["id"][1:]),
                      queued=int(g["queued"]), worker=g.get("vq", ""),
                      prompt_tokens=max(0, int(g.get("prompt_tokens") or 0)),
                      max_tokens=max(0, int(g.get("max_tokens") or 0)))
            for g in groups if int(g["queued"]) > 0
        ),
        workers=tuple(_worker_view(wid, info, running[wid])
                      for wid, info in sorted(workers.items())),
        slo_classes={n: SloView(c.ttft_deadline_ms / 1000,
                                c.tpot_deadline_ms / 1000 if c.tpot_deadline_ms else None)
                     for n, c in (config.slo_classes if config else {}).items()},
    )


async def running_requests(store: QueueStore, workers: list[str]) -> dict[str, list]:
    """What each worker runs, by request (the set its claims fill), for the estimator and for
    evictions, which name them."""
    return {wid: [RunningView(rid, f["cls"], int(f["out"] or 0), int(f["max_tokens"] or 0),
                              int(f["prompt_tokens"] or 0) + int(f["out"] or 0),
                              float(f["first_token_ms"] or 0))
                  for rid, f in running.items()]
            for wid, running in (await store.running_requests(workers)).items()}


def _worker_view(wid: str, info: dict[str, str], running: list[RunningView]) -> WorkerView:
    """`models` are those it can serve, `loaded` the first it serves now (heartbeat.lua)."""
    models = tuple(info.get("models", "").split())
    loaded = info.get("loaded", "").split() or models[:1]
    return WorkerView(
        id=wid, models=models, max_running=int(info.get("max_running") or 1),
        running=int(info.get("running") or 0), loaded=loaded[0] if loaded else "",
        warm=tuple(info.get("warm", "").split()),
        running_requests=tuple(running),
        # what a chunked prefill still owes, at most: the prompts of those with no token yet
        prefill_tokens=sum(r.context_tokens for r in running if not r.generated),
    )


def build_policy(config: StackConfig, name: str) -> policies.Policy:
    """The policy called `name`: one of the planner's own (qlm/core/policies.py) or a qlm
    variant (qlm/core/variants.py), whose estimator is fed the workers' engine profiles (from
    the stack config: sim workers name theirs), adjusted to how each worker is configured."""
    variants.check(name)
    if name not in variants.VARIANTS:
        return policies.get(
            name, {c.name: c.ttft_deadline_ms for c in config.slo_classes.values()})
    throughput = InstanceThroughput()
    load_s: dict[str, float] = {}  # worker -> a warm model's load time (its slowest)
    cold_s: dict[tuple[str, str], float] = {}
    for w in config.workers:
        if "profile" not in w.options:
            continue  # measured profiles of real engines come with the vllm engine
        default = SimProfile.load(config.resolve(str(w.options["profile"])))
        own = sim_profiles(w, config) if w.engine == "sim" else {}
        seqs = w.options.get("max_num_seqs")
        for m in w.models:
            profile = own.get(m, default)
            if isinstance(seqs, int) and 0 < seqs < profile.max_running:
                # the worker runs fewer sequences than the engine it was measured on allowed
                profile = dataclasses.replace(profile, max_running=seqs)
            throughput.set_profile(w.id, m, profile)
            load_s[w.id] = max(load_s.get(w.id, 0.0), profile.warm_load_ms / 1000)
            cold_s[w.id, m] = profile.load_ms / 1000
    if config.workers and not load_s:  # (a stack of no workers has nothing to plan yet)
        raise ConfigError(f"planner policy {name}: it needs engine profiles, and no worker of "
                          f"{config.path} has one (`qlm profile` measures one; or choose a "
                          "policy that needs none: planner.policy edf, fcfs or priority)")
    return variants.build(
        name, throughput, swap_s=lambda wid: load_s.get(wid, 0.0),
        cold_swap_s=lambda wid, model: cold_s.get((wid, model), 0.0),
        slo_deadlines_s={c.name: c.ttft_deadline_ms / 1000 for c in config.slo_classes.values()})


class PlannerLoop:
    def __init__(self, config: StackConfig, store: QueueStore, policy: str | None = None,
                 planner_id: str | None = None):
        self.config = config
        self.store = store
        self.policy_name = policy or config.planner_policy
        self.policy = build_policy(config, self.policy_name)
        # a learning policy hears of completions and of groups starting
        self._observe = observer(self.policy)
        self._group_started = getattr(self.policy, "group_started", None)
        self.id = planner_id or uuid.uuid4().hex[:12]
        self.epoch = 0
        self.sequence = 0
        self.last_plan: Plan | None = None
        self.last_compute_ms = 0.0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._saved_scores = 0  # of the policy's calibration scores, those kept in Redis

    @property
    def interval_s(self) -> float:
        return self.config.planner_interval_ms / 1000

    @property
    def leader(self) -> bool:
        return self.epoch > 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="planner-loop")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait([self._task])
        for ch in self._channels.values():
            await ch.close()

    async def _take_lead(self) -> None:
        ttl_ms = max(2000, 4 * self.config.planner_interval_ms)
        epoch = await self.store.leader(self.id, ttl_ms)
        if epoch != self.epoch:
            log.info("planner %s: %s", self.id,
                     f"leader with epoch {epoch}" if epoch else "standby")
            self.sequence = 0
            self.last_plan = None
            if epoch and not self.epoch:
                await self._load_calibration()
        self.epoch = epoch

    # The estimator's recent calibration scores (Calibration.spread), kept in Redis by the
    # leader so that the next one reads waits as calibrated as this one did. Unlike the
    # output lengths they cannot be rebuilt from the event stream: they compare a plan's
    # estimates, which only the planner that made them knows, with the starts that followed.

    async def _load_calibration(self) -> None:
        calibration = getattr(self.policy, "calibration", None)
        if calibration is None:
            return
        kept = await self.store.client.lrange(self.store.key("calibration"), 0, -1)
        calibration.restore(float(x) for x in kept)
        self._saved_scores = calibration.scored

    async def _save_calibration(self) -> None:
        calibration = getattr(self.policy, "calibration", None)
        if calibration is None:
            return
        new = calibration.scores_since(self._saved_scores)
        if not new:
            return
        key = self.store.key("calibration")
        async with self.store.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(repr(x) for x in new))
            pipe.ltrim(key, -calibration.WINDOW, -1)
            await pipe.execute()
        self._saved_scores = calibration.scored

    async def _wait_for_events(self, last_event: str) -> str:
        """Returns at the first new event (arrival, completion, ...) or at the end of the
        interval; gives back the id of the last event seen."""
        streams = await self.store.client.xread(
            {self.store.key("events"): last_event}, count=10000,
            block=max(1, int(self.interval_s * 1000)))
        if streams:
            last_event = streams[0][1][-1][0]
            self._learn(streams[0][1])
            await asyncio.sleep(DEBOUNCE_S)
        return last_event

    async def _catch_up(self) -> str:
        """Learns the output lengths of the completions still in the event stream (its last
        ~100,000 events), so that a planner that starts, or takes over from a lost leader,
        plans with what the fleet has done lately rather than with the prior. Gives back the
        id of the last event read. (Its start events find no estimates of this planner's to
        check, so they teach the calibration nothing.)"""
        key, last = self.store.key("events"), "0-0"
        while events := await self.store.client.xrange(key, min=f"({last}",
                                                       count=CATCH_UP_BATCH):
            self._learn(events)
            last = events[-1][0]
        return last

    def _learn(self, events) -> None:
        for event_id, e in events:
            kind = e.get("type")
            if kind == "finished" and self._observe:
                prompt = e.get("prompt_tokens")
                self._observe(e.get("model", ""), e.get("cls", ""), int(e.get("out") or 0),
                              int(prompt) if prompt else None)
            elif kind == "start" and self._group_started:
                self._group_started(e.get("gid", ""), int(event_id.split("-")[0]) / 1000)

    async def _run(self) -> None:
        last_event = None
        while not self._stopping:
            try:
                if last_event is None:
                    last_event = await self._catch_up()
                await self._take_lead()
                # a standby learns too, to take over with what the leader knew
                last_event = await self._wait_for_events(last_event)
                if not self.leader:
                    continue
                await self.store.expire()
                await self.plan_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis or a worker unreachable: try again next tick
                log.warning("planner %s: %s", self.id, e)
                await asyncio.sleep(self.interval_s)

    async def plan_once(self) -> Plan | None:
        """Computes and installs one plan; None when this planner is not the leader."""
        async with self._lock:
            if not self.leader:
                return None
            workers = await self.store.alive_workers()  # read once: snapshot and pushes
            snapshot = await take_snapshot(self.store, workers, self.config)
            started = time.perf_counter()
            plan = getattr(self.policy, "greedy", self.policy)(snapshot)
            compute_ms = (time.perf_counter() - started) * 1000
            self.sequence += 1
            ok, epoch_now = await self.store.install_plan(
                self.id, self.epoch, self.sequence, self.policy_name, compute_ms, plan.queues)
            if not ok:
                log.warning("planner %s: plan refused, epoch %s is in force", self.id, epoch_now)
                self.epoch = 0
                return None
            if plan.admission_s:
                await self.store.publish_admission(
                    {m: s * 1000 for m, s in plan.admission_s.items()},
                    {m: {c: s * 1000 for c, s in ws.items()}
                     for m, ws in plan.admission_by_class_s.items()})
            previous, self.last_plan, self.last_compute_ms = self.last_plan, plan, compute_ms
            await self._push(plan, previous, workers)
            await self._save_calibration()
            refine = getattr(self.policy, "refine", None)
            if refine is not None:
                return await self._refine(refine, snapshot, plan, workers) or plan
            return plan

    async def _refine(self, refine, snapshot: Snapshot, plan: Plan, workers) -> Plan | None:
        """CP-SAT's refinement of the plan just installed, in a thread under its time budget:
        workers pull in the greedy plan's order meanwhile, so dispatch never waits for it. The
        refined plan goes in only when it scores higher; its evictions went with the first."""
        started = time.perf_counter()
        refined = await asyncio.to_thread(refine, snapshot, plan)
        if refined is None:
            return None
        refined = dataclasses.replace(refined, evictions={})
        self.sequence += 1
        ok, _ = await self.store.install_plan(
            self.id, self.epoch, self.sequence, self.policy_name,
            (time.perf_counter() - started) * 1000, refined.queues)
        if not ok:
            self.epoch = 0
            return None
        self.last_plan = refined
        await self._push(refined, plan, workers)
        return refined

    async def _push(self, plan: Plan, previous: Plan | None, workers: dict) -> None:
        """Sends each worker whose queue, step limit or warm starts changed, or that must
        evict, its action plan; every plan sent carries the worker's step limit (zeros: none),
        which stays in force on the worker until the next. (Swaps need no action: a worker
        swaps when its queue's next group needs another model, see claim.lua.)"""
        calls = []
        for wid, queue in plan.queues.items():
            evict = plan.evictions.get(wid, [])
            limit = plan.step_limits.get(wid)
            warm = plan.warm_starts.get(wid, [])
            if (previous is not None and previous.queues.get(wid) == queue and not evict
                    and previous.step_limits.get(wid) == limit
                    and previous.warm_starts.get(wid, []) == warm):
                continue
            address = workers.get(wid, {}).get("address")
            if not address:
                continue
            stub = worker_pb2_grpc.WorkerStub(self._channel(address))
            actions = [worker_pb2.Action(evict=worker_pb2.EvictAction(request_id=rid))
                       for rid in evict]
            actions += [worker_pb2.Action(warm_model=worker_pb2.WarmModelAction(model=m))
                        for m in warm]
            actions.append(worker_pb2.Action(step_limit=worker_pb2.StepLimitAction(
                max_running=limit.max_running if limit else 0,
                max_prefill_tokens=limit.max_prefill_tokens if limit else 0)))
            calls.append(stub.ApplyPlan(
                worker_pb2.ActionPlan(epoch=self.epoch, sequence=self.sequence, worker_id=wid,
                                      actions=actions),
                timeout=2.0))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("planner %s: push failed: %s", self.id, result)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]
