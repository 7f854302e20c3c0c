"""Discrete-event simulator: a fleet serving a scenario's requests under a scheduling policy,
in virtual time, so an hour of trace runs in seconds.

It runs the planner's own policy functions (qlm.core.policies, Snapshot -> Plan) and the sim
engine's cost model (SimProfile.step_ms), and mirrors the live queue semantics of
qlm/state/scripts: a request joins the newest open group of its kind until the group holds
`max_group_size`; new groups wait in a pending pool until a plan places them in a virtual
queue; an instance pulls from the head of its virtual queue only when it has room, else from
the pending groups of the model it has loaded, earliest deadline first. A plan is asked for on
arrivals (after a debounce) and on a cadence, and is installed only after the policy's real
compute time has passed in virtual time, so a slow planner costs what it would cost live.

A step prefills prompts as vLLM does: in chunks, where the profile sets max_batched_tokens
(the GPU profiles: vLLM's default of 2048), in admission order within what the decodes leave
of that budget; a request gets its first token at the end of the step that finishes its
prompt, and new requests are admitted only while the budget is not spent. A plan's StepLimit
can lower the budget; with neither, a step prefills everything it admits.

An instance runs one model at a time; when the head of its queue (or, with nothing queued, the
most urgent pending group it can serve) needs another model, it drains what it runs and swaps,
paying the profile's load time: load_ms the first time, warm_load_ms for a model it served
before (kept in CPU memory: warm start). A plan's warm starts (Plan.warm_starts) read a model's
weights into CPU memory in the background, taking load_ms - warm_load_ms, while the instance
serves: a swap to it after that is warm, one during it waits only for the rest.

Evictions a plan asks for happen at the end of the step under way (an engine changes its batch
only between steps): the request leaves the batch, frees its KV cache and goes back to the head
of its group (recreated under its id if it was emptied meanwhile, as return_to_group.lua does)
with its output so far. Where `kv_swap_ms` names the model, its KV is copied to the instance's
CPU memory and back when it resumes there (that many ms per token of context, each way, added
to the step that does it); resumed elsewhere, or without a swap cost, it is recomputed (a
prefill of its prompt and output so far). Its first token came before, so its TTFT stays.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from qlm.core.groups import group_kind
from qlm.core.plan import GroupView, Plan, RunningView, SloView, Snapshot, WorkerView
from qlm.core.plan_generator import observer
from qlm.engines.sim import SimProfile
from qlm.sim.scenarios import InstanceSpec, SimRequest

Policy = Callable[[Snapshot], Plan]


@dataclasses.dataclass(eq=False)
class _Request:
    spec: SimRequest
    group: str = ""
    generated: int = 0
    evicted: int = 0  # times it was pre-empted
    kv_at: str = ""  # the instance whose CPU memory holds its KV while it waits
    start_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def kv_tokens(self) -> int:
        return self.spec.input_length + self.spec.output_length

    @property
    def context(self) -> int:
        """Prompt plus output so far: what it counts as in its group while it waits."""
        return self.spec.input_length + self.generated

    @property
    def left(self) -> int:
        return self.spec.output_length - self.generated


@dataclasses.dataclass(eq=False)
class _Group:
    id: str
    sequence: int
    model: str
    slo_class: str
    kind: str
    deadline_s: float
    queue: deque = dataclasses.field(default_factory=deque)
    joined: int = 0
    vq: str = ""  # the instance whose virtual queue holds it; "" while pending
    started: bool = False
    # of the requests queued in it, summed (kept up to date for snapshots)
    prompt_tokens: int = 0
    output_tokens: int = 0


@dataclasses.dataclass(eq=False)
class _Instance:
    spec: InstanceSpec
    profiles: dict[str, SimProfile]
    model: str
    vq: list[str] = dataclasses.field(default_factory=list)
    running: list[_Request] = dataclasses.field(default_factory=list)
    kv_used: int = 0
    busy: bool = False
    busy_until: float = 0.0  # end of the step (or swap) under way
    warm: set[str] = dataclasses.field(default_factory=set)
    # model -> when the warm start a plan asked for has its weights in CPU memory (loaded in
    # the background while the instance serves; see _swap_ms)
    warming: dict[str, float] = dataclasses.field(default_factory=dict)
    swaps: int = 0
    loading: str = ""  # the model a swap under way loads ("" none)
    # model -> ms per token to copy KV to CPU memory or back; a model missing: recomputed
    kv_swap_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    evicting: list[_Request] = dataclasses.field(default_factory=list)  # at the step's end
    kv_copy_tokens: int = 0  # KV to copy out or in during the next step
    # the step event under way: (began, first step s, decode step s, tokens), and its version
    step: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 0)
    step_version: int = 0
    # the plan's StepLimit for it (None: unlimited), and the prompt tokens still to prefill of
    # the requests admitted, when steps prefill in chunks (under the profile's
    # max_batched_tokens or the limit's max_prefill_tokens: they get no token until it is done)
    limit: object = None
    prefill_left: dict = dataclasses.field(default_factory=dict)

    @property
    def profile(self) -> SimProfile:
        return self.profiles[self.model]

    def prefill_budget(self) -> float:
        """Prompt tokens the next step may prefill (inf: every prompt admitted, whole). Like
        vLLM's scheduler, the decodes take their token each first."""
        budget = self.profile.prefill_budget(len(self.running) - len(self.prefill_left))
        if self.limit is not None:
            budget = min(budget, self.limit.max_prefill_tokens)
        return max(budget, 0)

    def room(self) -> int:
        most = self.profile.max_running
        if self.limit is not None:
            most = min(most, self.limit.max_running)
        # admitted only while this step's prefill budget is not yet spent
        if sum(self.prefill_left.values()) >= self.prefill_budget():
            return 0
        return most - len(self.running)

    def prefill_chunk(self) -> int:
        """Prompt tokens prefilled in the next step under the budget, in admission order; the
        requests whose prefill it completes leave prefill_left."""
        budget, chunk = self.prefill_budget(), 0
        for req in list(self.prefill_left):
            take = min(self.prefill_left[req], budget - chunk)
            chunk += take
            if take == self.prefill_left[req]:
                del self.prefill_left[req]
            else:
                self.prefill_left[req] -= take
                break
        return int(chunk)


@dataclasses.dataclass
class SimResult:
    requests: list[_Request]
    makespan_s: float
    model_swaps: int
    planner_ms: list[float]
    plans: int
    evictions: int = 0
    # per model: seconds the instances spent in its steps, and the sequences decoding in a
    # step on average (weighted by steps): where a policy's batching gains or loses capacity
    busy_s_by_model: dict[str, float] = dataclasses.field(default_factory=dict)
    batch_by_model: dict[str, float] = dataclasses.field(default_factory=dict)
    swap_s: float = 0.0  # seconds spent loading models


class Simulation:
    def __init__(
        self,
        requests: Sequence[SimRequest],
        fleet: Sequence[tuple[InstanceSpec, dict[str, SimProfile]]],
        policy: Policy,
        *,
        max_group_size: int = 32,
        plan_interval_s: float = 1.0,
        plan_debounce_s: float = 0.02,
        plan_time_s: float | None = None,
        fold_steps: bool = True,
        oracle: bool = False,
        kv_swap_ms: Mapping[str, Mapping[str, float]] | None = None,
    ):
        self.requests = [_Request(r) for r in sorted(requests, key=lambda r: r.arrival_s)]
        # instance name -> model -> KV swap ms per token (see the module docstring)
        kv_swap_ms = kv_swap_ms or {}
        self.instances = {
            spec.name: _Instance(spec, dict(profiles), model=spec.models[0],
                                 kv_swap_ms=dict(kv_swap_ms.get(spec.name, {})))
            for spec, profiles in fleet
        }
        self.slo_classes = {}
        for r in self.requests:
            self.slo_classes.setdefault(
                r.spec.slo_class, SloView(r.spec.ttft_deadline_s, r.spec.tpot_deadline_s))
        self.policy = policy
        self.max_group_size = max_group_size
        self.plan_interval_s = plan_interval_s
        self.plan_debounce_s = plan_debounce_s
        # each plan charged this long instead of its measured compute time: a run that does
        # not depend on how busy the machine is (the same plans, given a policy that is told
        # the same time; see bench sim's --plan-ms); 0: plans take effect at once
        self.plan_time_s = plan_time_s
        # Folding runs several decode steps as one event when nothing can change the batch
        # meanwhile; off, every step is an event (slow, used to check the folding).
        self.fold_steps = fold_steps
        # An oracle policy is shown every request's true output length (as its max_tokens);
        # other policies see max_tokens as unknown, as a planner would for open-ended chats.
        self.oracle = oracle
        self._observe = observer(policy)
        self._group_started = getattr(policy, "group_started", None)

        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()
        self._groups: dict[str, _Group] = {}
        self._open: dict[str, str] = {}
        self._pending: dict[str, set[str]] = {}  # model -> pending group ids
        self._group_seq = itertools.count(1)
        self._next_arrival = 0
        self._plan_asked = False
        self._installs: list[float] = []  # times of plans computed but not yet installed
        # something asked for a plan while one was being computed: the planner service reads
        # the events that came meanwhile as soon as it is done, so one follows at once
        self._asked_meanwhile = False
        self._done = 0
        self.planner_ms: list[float] = []
        self.evictions = 0
        # model -> [step seconds, steps, sequence-steps]; swap seconds (see SimResult)
        self._steps: dict[str, list[float]] = {}
        self._swap_s = 0.0

    # --- event loop ------------------------------------------------------------------------

    def _at(self, t: float, kind: str, arg=None) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, arg))

    def run(self) -> SimResult:
        if self.requests:
            self._at(self.requests[0].spec.arrival_s, "arrive")
            self._at(self.requests[0].spec.arrival_s + self.plan_interval_s, "tick")
        handlers = {"arrive": self._on_arrive, "tick": self._on_tick, "plan": self._on_plan,
                    "install": self._on_install, "step": self._on_step, "swap": self._on_swap}
        while self._events and self._done < len(self.requests):
            self.now, _, kind, arg = heapq.heappop(self._events)
            handlers[kind](arg)
        return SimResult(
            requests=self.requests,
            makespan_s=self.now,
            model_swaps=sum(i.swaps for i in self.instances.values()),
            planner_ms=self.planner_ms,
            plans=len(self.planner_ms),
            evictions=self.evictions,
            busy_s_by_model={m: v[0] for m, v in sorted(self._steps.items())},
            batch_by_model={m: v[2] / v[1] for m, v in sorted(self._steps.items()) if v[1]},
            swap_s=self._swap_s,
        )

    def _next_outside_event_s(self) -> float:
        """When the queue can next gain work: an arrival or a plan being installed."""
        t = math.inf
        if self._next_arrival < len(self.requests):
            t = self.requests[self._next_arrival].spec.arrival_s
        if self._installs:
            t = min(t, min(self._installs))
        return t

    # --- arrivals and groups (enqueue.lua) --------------------------------------------------

    def _on_arrive(self, _) -> None:
        # all requests arriving at this instant
        opened = False
        while (self._next_arrival < len(self.requests)
               and self.requests[self._next_arrival].spec.arrival_s <= self.now):
            opened |= self._enqueue(self.requests[self._next_arrival])
            self._next_arrival += 1
        if self._next_arrival < len(self.requests):
            self._at(self.requests[self._next_arrival].spec.arrival_s, "arrive")
        # a request joining a group the plan already holds changes little: the next tick
        # will see it; a new group asks for a plan (until then it waits in the pending pool)
        if opened:
            self._ask_plan()
        self._kick_all()

    def _ask_plan(self) -> None:
        if self._installs:
            self._asked_meanwhile = True
        elif not self._plan_asked:
            self._plan_asked = True
            self._at(self.now + self.plan_debounce_s, "plan")

    def _enqueue(self, req: _Request) -> bool:
        """Adds a request to its group; True when it opened a new group."""
        s = req.spec
        kind = group_kind(s.model, s.slo_class, s.input_length)
        g = self._groups.get(self._open.get(kind, ""))
        opened = g is None or g.joined >= self.max_group_size
        if opened:
            seq = next(self._group_seq)
            g = _Group(f"g{seq}", seq, s.model, s.slo_class, kind, s.deadline_s)
            self._groups[g.id] = g
            self._open[kind] = g.id
            self._pending.setdefault(g.model, set()).add(g.id)
        self._join(g, req, front=False)
        req.group = g.id
        return opened

    @staticmethod
    def _join(g: _Group, req: _Request, front: bool) -> None:
        """A request enters a group (at the back when it arrives, at the head when it comes
        back): the group's deadline and token totals follow its members, as in the Lua."""
        g.deadline_s = min(g.deadline_s, req.spec.deadline_s)
        (g.queue.appendleft if front else g.queue.append)(req)
        g.joined += 1
        g.prompt_tokens += req.context
        g.output_tokens += req.left

    def _requeue(self, req: _Request) -> None:
        """An evicted request goes back to the head of its group (return_to_group.lua): one
        emptied and dropped meanwhile comes back under its id, pending, closed to arrivals."""
        s = req.spec
        g = self._groups.get(req.group)
        if g is None:
            g = _Group(req.group, int(req.group[1:]), s.model, s.slo_class,
                       group_kind(s.model, s.slo_class, s.input_length), s.deadline_s)
            self._groups[g.id] = g
            self._pending.setdefault(g.model, set()).add(g.id)
        self._join(g, req, front=True)

    def _drop_group(self, g: _Group) -> None:
        del self._groups[g.id]
        if self._open.get(g.kind) == g.id:
            del self._open[g.kind]
        if g.vq:
            self.instances[g.vq].vq.remove(g.id)
        else:
            self._pending[g.model].discard(g.id)

    # --- the planner (planner service + install_plan.lua) ----------------------------------

    def _on_tick(self, _) -> None:
        # one planner: no new plan while the last one is still being computed
        if not self._plan_asked and not self._installs:
            self._plan_asked = True
            self._at(self.now, "plan")
        self._at(self.now + self.plan_interval_s, "tick")

    def snapshot(self) -> Snapshot:
        return Snapshot(
            now_ms=self.now * 1000,
            groups=tuple(
                GroupView(id=g.id, model=g.model, slo_class=g.slo_class,
                          deadline_ms=int(g.deadline_s * 1000), sequence=g.sequence,
                          queued=len(g.queue), worker=g.vq, prompt_tokens=g.prompt_tokens,
                          max_tokens=g.output_tokens if self.oracle else 0)
                for g in self._groups.values() if g.queue
            ),
            workers=tuple(self._worker_view(i) for i in self.instances.values()),
            slo_classes=self.slo_classes,
        )

    def _worker_view(self, inst: _Instance) -> WorkerView:
        # a folded run of steps has produced tokens already: the planner sees them (and when
        # the step under way ends), as it would stepping one by one
        done, ready_s = self._progress(inst) if inst.running else (0, inst.busy_until)
        ready_in_s = max(0.0, ready_s - self.now) if inst.busy else 0.0
        cap = (lambda r: r.spec.output_length) if self.oracle else (lambda r: 0)
        # during a swap the instance is, for planning, the model it is loading: reading it as
        # the one going out, a plan queued that model's groups behind the swap, and the next
        # plan (after the swap) the other way round (measured on wb: both instances swapping
        # back and forth for a minute, running nothing)
        model = inst.loading or inst.model
        return WorkerView(
            id=inst.spec.name, models=inst.spec.models,
            max_running=inst.profiles[model].max_running,
            running=len(inst.running), loaded=model, ready_in_s=ready_in_s,
            running_requests=tuple(
                RunningView(str(r.spec.id), r.spec.slo_class, r.generated + done, cap(r),
                            r.context + done,
                            r.first_token_s * 1000 if r.generated + done else 0.0)
                for r in inst.running),
            # the model a swap under way unloads stays warm too
            warm=tuple(sorted(inst.warm | {inst.model}
                              | {m for m, t in inst.warming.items() if t <= self.now})),
            prefill_tokens=sum(inst.prefill_left.values()))

    def _progress(self, inst: _Instance) -> tuple[int, float]:
        """Of the step event under way: the steps done by now, and when the next one ends."""
        began, first_s, decode_s, tokens = inst.step
        done_s = self.now - began - first_s
        if done_s < 0 or decode_s <= 0:
            return 0, began + first_s
        done = min(tokens, 1 + math.floor(done_s / decode_s))
        return done, min(began + first_s + done * decode_s, inst.busy_until)

    def _on_plan(self, _) -> None:
        self._plan_asked = False
        snapshot = self.snapshot()
        started = time.perf_counter()
        plan = self.policy(snapshot)
        compute_s = time.perf_counter() - started
        self.planner_ms.append(compute_s * 1000)
        if self.plan_time_s is not None:
            compute_s = self.plan_time_s
        ready = self.now + compute_s
        self._installs.append(ready)
        self._at(ready, "install", (ready, plan))

    def _on_install(self, arg) -> None:
        ready, plan = arg
        self._installs.remove(ready)
        if self._asked_meanwhile and not self._installs:
            self._asked_meanwhile = False
            self._ask_plan()
        for name, inst in self.instances.items():
            inst.limit = plan.step_limits.get(name)
            for m in plan.warm_starts.get(name, ()):
                if m not in inst.warm and m not in inst.warming and m != inst.model:
                    p = inst.profiles[m]  # reading weights into CPU memory: a cold load's
                    inst.warming[m] = self.now + (p.load_ms - p.warm_load_ms) / 1000  # rest
        placed: set[str] = set()
        for name, gids in plan.queues.items():
            inst = self.instances[name]
            dropped = set(inst.vq)
            inst.vq = []
            for gid in gids:
                g = self._groups.get(gid)
                if g is None or gid in placed:
                    continue  # finished meanwhile, or listed twice
                if g.vq and g.vq != name:
                    self.instances[g.vq].vq.remove(gid)
                elif not g.vq:
                    self._pending[g.model].discard(gid)
                g.vq = name
                inst.vq.append(gid)
                placed.add(gid)
            for gid in dropped - placed:
                g = self._groups.get(gid)
                if g is not None and g.vq == name:
                    g.vq = ""
                    self._pending[g.model].add(gid)
        for name, rids in plan.evictions.items():
            inst = self.instances.get(name)
            if inst is None:
                continue
            wanted = set(rids)
            # those that finished since the snapshot are gone; what is left goes at the step's end
            inst.evicting += [r for r in inst.running
                              if str(r.spec.id) in wanted and r not in inst.evicting]
            if inst.evicting and inst.busy:
                self._cut_step(inst)
        self._cut_steps_with_room()
        self._kick_all()

    # --- instances (worker + engine) --------------------------------------------------------

    def _kick_all(self) -> None:
        for inst in self.instances.values():
            if not inst.busy:
                self._begin_step(inst)

    def _next_group(self, inst: _Instance) -> _Group | None:
        """The group the instance should serve next, whatever its model (claim.lua's order)."""
        if inst.vq:
            return self._groups[inst.vq[0]]
        pending = self._pending.get(inst.model)
        if pending:
            return self._groups[min(pending, key=lambda gid: self._groups[gid].deadline_s)]
        # nothing for the loaded model: the most urgent pending work it could swap to
        others = [self._groups[gid] for m in inst.spec.models if m != inst.model
                  for gid in self._pending.get(m, ())]
        return min(others, key=lambda g: g.deadline_s, default=None)

    def _pull(self, inst: _Instance) -> tuple[int, str | None]:
        """Moves queued requests of the loaded model into the batch while there is room;
        returns the prompt tokens to prefill and the model to swap to, if the next work needs
        another one. A resumed request's KV comes back from CPU memory (kv_copy_tokens) where
        this instance keeps it, else its prompt and output so far are prefilled again."""
        prefill = 0
        while inst.room() > 0:
            g = self._next_group(inst)
            if g is None:
                return prefill, None
            if g.model != inst.model:
                return prefill, g.model
            req = g.queue[0]
            if inst.kv_used + req.kv_tokens > inst.profile.kv_capacity_tokens and inst.running:
                return prefill, None  # wait for KV to free up
            g.queue.popleft()
            g.prompt_tokens -= req.context
            g.output_tokens -= req.left
            if not g.started:
                g.started = True
                if self._group_started:
                    self._group_started(g.id, self.now)
            if not g.queue:
                self._drop_group(g)
            if req.start_s is None:
                req.start_s = self.now
            inst.running.append(req)
            inst.kv_used += req.kv_tokens
            if req.kv_at == inst.spec.name:
                inst.kv_copy_tokens += req.context
            elif inst.prefill_budget() < math.inf:
                inst.prefill_left[req] = req.context
            else:
                prefill += req.context
            req.kv_at = ""
        return prefill, None

    def _evict(self, inst: _Instance) -> None:
        """Carries out the evictions planned for this instance (at a step boundary)."""
        evicting, inst.evicting = inst.evicting, []
        for req in evicting:
            if req not in inst.running:
                continue  # finished meanwhile
            inst.running.remove(req)
            inst.prefill_left.pop(req, None)
            inst.kv_used -= req.kv_tokens
            if inst.model in inst.kv_swap_ms:
                inst.kv_copy_tokens += req.context
                req.kv_at = inst.spec.name
            req.evicted += 1
            self.evictions += 1
            self._requeue(req)
        if evicting:
            self._ask_plan()
            self._cut_steps_with_room()

    def _cut_steps_with_room(self) -> None:
        """Work appeared (a plan, a requeued request) that instances with room may take at the
        end of their step under way, not after a folded run of steps."""
        for inst in self.instances.values():
            if inst.busy and inst.running and inst.room() > 0:
                self._cut_step(inst)

    def _cut_step(self, inst: _Instance) -> None:
        """Ends a folded run of decode steps at the end of the step under way, so that the
        batch can change there."""
        began, first_s, decode_s, tokens = inst.step
        if tokens <= 1 or decode_s <= 0:
            return
        done_s = self.now - began - first_s
        j = 1 if done_s <= 0 else 1 + math.ceil(done_s / decode_s)
        if j >= tokens:
            return
        inst.step = (began, first_s, decode_s, j)
        inst.step_version += 1
        inst.busy_until = began + first_s + (j - 1) * decode_s
        self._at(inst.busy_until, "step", (inst, j, inst.step_version))

    def _begin_step(self, inst: _Instance) -> None:
        self._evict(inst)
        prefill, swap_to = self._pull(inst)
        prefill += inst.prefill_chunk()
        copy_ms = inst.kv_copy_tokens * inst.kv_swap_ms.get(inst.model, 0.0)
        inst.kv_copy_tokens = 0
        if not inst.running:
            if swap_to is not None:
                self._begin_swap(inst, swap_to)
            return
        p = inst.profile
        batch = len(inst.running)
        first_s = (p.step_ms(prefill, batch) + copy_ms) / 1000
        for req in inst.running:
            if req.first_token_s is None and req not in inst.prefill_left:
                req.first_token_s = self.now + first_s
        extra, decode_s = 0, 0.0
        if self.fold_steps and not inst.prefill_left:  # chunked prefill: steps differ
            # later steps add one token each at a constant cost while the batch stays the same:
            # until the first request finishes, and, if the instance could still take work,
            # until new work can appear
            left = min(r.spec.output_length - r.generated for r in inst.running) - 1
            decode_s = p.step_ms(0, batch) / 1000
            if inst.room() > 0:
                horizon = self._next_outside_event_s() - (self.now + first_s)
                if horizon < math.inf:
                    left = min(left, max(0, math.floor(horizon / decode_s)) if decode_s else 0)
            extra = max(0, left)
        inst.step = (self.now, first_s, decode_s, 1 + extra)
        inst.step_version += 1
        inst.busy = True
        inst.busy_until = self.now + first_s + extra * decode_s
        self._at(inst.busy_until, "step", (inst, 1 + extra, inst.step_version))

    def _on_step(self, arg) -> None:
        inst, tokens, version = arg
        if version != inst.step_version:
            return  # cut short: a later event ends this step
        inst.busy = False
        decoding = len(inst.running) - len(inst.prefill_left)
        acc = self._steps.setdefault(inst.model, [0.0, 0, 0])
        acc[0] += self.now - inst.step[0]
        acc[1] += tokens
        acc[2] += tokens * decoding
        still = []
        for req in inst.running:
            if req in inst.prefill_left:  # its prompt is not all prefilled yet
                still.append(req)
                continue
            req.generated += tokens
            if req.generated >= req.spec.output_length:
                req.generated = req.spec.output_length
                req.finish_s = self.now
                inst.kv_used -= req.kv_tokens
                self._done += 1
                if self._observe:
                    self._observe(req.spec.model, req.spec.slo_class, req.spec.output_length,
                                  req.spec.input_length)
            else:
                still.append(req)
        inst.running = still
        self._begin_step(inst)

    def _swap_ms(self, inst: _Instance, model: str) -> float:
        """A warm model loads in warm_load_ms; one still warming waits for its weights too."""
        p = inst.profiles[model]
        if model in inst.warm:
            return p.warm_load_ms
        if model in inst.warming:
            return min(p.load_ms, p.warm_load_ms + max(0.0, inst.warming[model] - self.now) * 1000)
        return p.load_ms

    def _begin_swap(self, inst: _Instance, model: str) -> None:
        ms = self._swap_ms(inst, model)
        inst.busy = True
        inst.busy_until = self.now + ms / 1000
        inst.swaps += 1
        self._swap_s += ms / 1000
        inst.loading = model
        self._at(self.now + ms / 1000, "swap", (inst, model))

    def _on_swap(self, arg) -> None:
        inst, model = arg
        inst.busy = False
        # warm start: the model swapped out stays in (pinned) CPU memory, so swapping back
        # costs warm_load_ms; a host's memory holds the few models an instance serves
        inst.warm.add(inst.model)
        inst.warming.pop(model, None)
        inst.model, inst.loading = model, ""
        self._begin_step(inst)
