"""The plan generator's second stage: OR-Tools CP-SAT refines the greedy plan (DESIGN.md).

The greedy PlanGenerator is myopic: it places groups in deadline order and never revisits a
choice, so a long group that can still meet its deadline goes ahead of short groups whose
deadlines are only slightly later, and they all miss. CP-SAT searches orders and placements
at once: every group goes to one worker that serves its model (a circuit per worker gives
the order of its virtual queue), a group's wait is its predecessors' work on that worker
plus a swap where the model changes plus the work running now, and the objective is the
PlanGenerator's own: requests of groups whose chance constraint holds, then fewer swaps.

It is seeded with the greedy plan (AddHint), runs under a time budget and returns the best
plan found; one `score` (the waiting-time estimator along each virtual queue, exactly as the
greedy plan is judged) decides, and the greedy plan stays unless the refined one scores
strictly higher, so the refinement is never worse by check, not by assumption.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

from ortools.sat.python import cp_model

from .estimator import QueuedGroup
from .plan import GroupView, Plan, Snapshot
from .plan_generator import PlanGenerator, warm_starts

# Times in the model are integer milliseconds, variances ms^2; z is read as Z / D.
_D = 100


class PlanScore(NamedTuple):
    """Requests of groups that meet their chance constraint, out of all placed, and swaps."""

    met: int
    total: int
    swaps: int

    @property
    def key(self) -> tuple[int, int]:
        return self.met, -self.swaps  # more SLOs met, then fewer model swaps

    @property
    def attainment(self) -> float:
        return self.met / self.total if self.total else 1.0


@dataclasses.dataclass
class Refinement:
    plan: Plan  # the refined plan when it scores higher, else the greedy one
    greedy: PlanScore
    score: PlanScore  # of `plan`
    status: str  # CP-SAT's: OPTIMAL, FEASIBLE, UNKNOWN (no solution in time), SKIPPED
    objective: float = math.nan  # the model's own objective (surrogate waits)
    solve_s: float = 0.0
    estimates: dict = dataclasses.field(default_factory=dict)  # of `plan`: gid -> WaitEstimate
    found: PlanScore | None = None  # of CP-SAT's own plan, kept or not

    @property
    def improved(self) -> bool:
        return self.score.key > self.greedy.key


class _Scorer:
    """`score` for one snapshot, caching each worker's queue: the greedy and the refined plan
    share most queues, so checking "never worse" costs only the queues that changed."""

    def __init__(self, gen: PlanGenerator, snapshot: Snapshot):
        self.gen, self.snapshot = gen, snapshot
        self.now_s = snapshot.now_ms / 1000
        self.groups = {g.id: g for g in snapshot.groups}
        self.workers = {w.id: w for w in snapshot.workers}
        self._cache: dict[tuple, tuple] = {}

    def fresh(self, wid: str):
        """The estimator's empty virtual queue of `wid`, as the greedy plan starts it."""
        w = self.workers[wid]
        return self.gen._empty_queue(w, self.gen._running(w))

    def queue(self, wid: str, gids) -> tuple[int, int, int, dict, dict]:
        """(met, total, swaps, gid -> slack s, gid -> WaitEstimate) of one virtual queue."""
        key = (wid, tuple(gids))
        if key not in self._cache:
            waits, loaded = self.fresh(wid), self.workers[wid].loaded
            met = total = swaps = 0
            slack, estimates = {}, {}
            for gid in gids:
                g = self.groups[gid]
                qg = _queued(g)
                estimates[gid] = waits.next_wait(qg)
                slack[gid] = g.deadline_ms / 1000 - self.now_s - estimates[gid].quantile(
                    self.gen.z)
                total += g.queued
                met += g.queued if slack[gid] >= 0 else 0
                swaps += bool(loaded) and g.model != loaded
                waits.append(qg)
                loaded = g.model
            self._cache[key] = met, total, swaps, slack, estimates
        return self._cache[key]

    def score(self, plan: Plan, workers=None) -> PlanScore:
        """The plan's score; over `workers` only, when given (comparing two plans that differ
        only there, the other queues add the same to both)."""
        parts = [self.queue(w, q) for w, q in plan.queues.items()
                 if workers is None or w in workers]
        return PlanScore(*(sum(p[i] for p in parts) for i in range(3)))

    def estimates(self, plan: Plan, workers) -> dict:
        return {g: e for w in workers for g, e in self.queue(w, plan.queues[w])[4].items()}


def _queued(g: GroupView) -> QueuedGroup:
    return QueuedGroup(g.model, g.slo_class, g.queued, g.prompt_tokens, g.max_tokens or None)


def score(gen: PlanGenerator, snapshot: Snapshot, plan: Plan) -> PlanScore:
    """How a plan is judged, greedy or refined: each virtual queue through the estimator,
    a group meets its SLO when its wait's quantile at the confidence is within its deadline."""
    return _Scorer(gen, snapshot).score(plan)


def _batch(gen: PlanGenerator, g: GroupView, wid: str) -> int:
    """Sequences of g that run at once on wid (fewer than max_running when its prompts and
    outputs fill the KV cache), as the estimator reckons it."""
    q = max(g.queued, 1)
    cap = g.max_tokens / q if g.max_tokens else None
    mean = gen.lengths.moments(g.model, g.slo_class, cap)[0]
    return gen.estimator.throughput.batch(wid, g.model, g.prompt_tokens / q + (cap or mean))


class _Numbers:
    """What the model knows of group g on worker w, in ms, from the estimator the greedy
    plan uses. first_*: its wait if it came first on w (running work, swap and drain
    included: the estimator's own). For the groups behind it: its work (fluid: a batch of b
    completes requests at b / (step * mean length) per second, plus its prefill; b is the
    smallest of its own and of the model's groups on w in the greedy plan, as the estimator
    lets one KV-hungry group narrow its whole segment); the variance of its lengths (ms^2),
    which adds under the square root; the uncertainty of the learned mean (ms), which adds
    linearly (it errs the same way for every request of its kind); the slot credit (a group
    starts when one slot frees, not when all the work ahead is done: (b - 1) / b of a
    request less); and its drain, from its start until its last request ends, with its
    variance (a model change waits for the longest request in flight, well after the fluid
    end of the work when lengths are heavy tailed)."""

    def __init__(self, sc: _Scorer, g: GroupView, wid: str, first, b: int, multi_model: bool):
        gen, tp = sc.gen, sc.gen.estimator.throughput
        q = max(g.queued, 1)
        cap = g.max_tokens / q if g.max_tokens else None
        mean, var = gen.lengths.moments(g.model, g.slo_class, cap)
        se = gen.lengths.standard_error(g.model, g.slo_class, cap)
        own = _batch(gen, g, wid)
        step, b = tp.step_s(wid, g.model, own), min(b, own)
        estimate = first.next_wait(_queued(g))
        self.first_mean = _ms(estimate.mean)
        self.first_var = _ms2(estimate.std**2)
        prefill = g.prompt_tokens * tp.prefill_s_per_token(wid, g.model)
        self.work = _ms(q * mean * step / b + prefill)
        self.var = _ms2(q * var * step**2 / b**2)
        self.se = _ms(q * se * step / b)
        self.credit = _ms((b - 1) / b * mean * step)
        self.drain = self.drain_var = 0
        if multi_model:  # the estimator's drain of g alone on an idle worker
            alone = gen.estimator.queue(wid, g.model)
            alone.append(_queued(g))
            drain = alone.next_wait(QueuedGroup("", "", 1))
            self.drain, self.drain_var = _ms(drain.mean), _ms2(drain.std**2)


def _ms(s: float) -> int:
    return max(0, round(s * 1000))


def _ms2(v: float) -> int:
    return max(0, round(v * 1e6))


class CpSatRefiner:
    """CP-SAT over the heads of the greedy virtual queues.

    Only the heads of the queues are re-planned, at most `max_groups` groups in all: the
    first `head` groups (more when few queues share `max_groups`) of the queues with the
    tightest deadlines there. Their order is what workers pull
    next, the plan is recomputed every few seconds so a tail's order is revisited before it
    matters, and a model of a few dozen groups improves on its hint within tens of
    milliseconds (the circuits grow with the square of the groups a worker may take). A
    tail keeps its greedy order behind its head, and its groups still count: each stays met
    only while the head in front of it ends within its slack. A head group may stay on its
    worker or move to one of `moves` others that serve its model (the least loaded, each
    taking groups while it has fewer than `max_nodes`).

    budget_s bounds CP-SAT's search (None: until it proves the plan optimal); 0.2 s is what
    kept every small instance of `qlm bench planner` within 5% of the optimum on a busy
    shared machine (docs/benchmarks.md). Building the model and scoring its plan come on
    top, a few milliseconds per refined worker. quick
    (None: when there is a budget) skips presolve and the LP relaxation: each can take a
    short budget by itself, and measured on small instances the search finds better plans
    sooner without them; from a complete feasible hint it cannot end below the hint anyway.
    workers: CP-SAT's search threads (the planner shares its machine)."""

    def __init__(self, generator: PlanGenerator, *, budget_s: float | None = 0.2,
                 head: int = 6, max_groups: int = 36, moves: int = 2, max_nodes: int = 12,
                 workers: int = 1, quick: bool | None = None):
        self.gen = generator
        self.budget_s, self.head, self.max_groups = budget_s, head, max_groups
        self.moves, self.max_nodes, self.workers = moves, max_nodes, workers
        self.quick = budget_s is not None if quick is None else quick

    def score(self, snapshot: Snapshot, plan: Plan) -> PlanScore:
        return score(self.gen, snapshot, plan)

    def refine(self, snapshot: Snapshot, greedy: Plan) -> Refinement:
        """The best plan CP-SAT finds from `greedy` within the budget, or `greedy` itself
        when nothing found scores higher. Its scores cover the workers the model touched
        (the other queues are the greedy plan's, and score the same in both plans)."""
        sc = _Scorer(self.gen, snapshot)
        busy = [w for w, q in greedy.queues.items() if q]
        if not busy:
            return Refinement(greedy, PlanScore(0, 0, 0), PlanScore(0, 0, 0), "SKIPPED")
        k = max(self.head, self.max_groups // len(busy))
        urgent = sorted(busy, key=lambda w: (min(sc.groups[g].deadline_ms
                                                 for g in greedy.queues[w][:k]), w))
        heads, room = {w: [] for w in greedy.queues}, self.max_groups
        for w in urgent:
            if room <= 0:
                break
            heads[w] = greedy.queues[w][:min(k, room)]
            room -= len(heads[w])
        if not any(heads.values()):
            return Refinement(greedy, PlanScore(0, 0, 0), PlanScore(0, 0, 0), "SKIPPED")
        # a worker that evicts for its head group keeps that group at its head
        pinned = {w for w, ev in greedy.evictions.items() if ev and greedy.queues.get(w)}
        model = _Model(self, sc, heads, {w: q[len(heads[w]):] for w, q in
                                         greedy.queues.items()}, pinned)
        touched = set(model.circuits)
        base = sc.score(greedy, touched)
        solver = cp_model.CpSolver()
        if self.budget_s is not None:
            solver.parameters.max_time_in_seconds = self.budget_s
        if self.quick:
            solver.parameters.cp_model_presolve = False
            solver.parameters.linearization_level = 0
        solver.parameters.num_workers = self.workers
        started = time.perf_counter()
        status = solver.solve(model.cp)
        solve_s = time.perf_counter() - started
        name = solver.status_name(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return Refinement(greedy, base, base, name, solve_s=solve_s)
        queues = model.queues(solver)
        plan = dataclasses.replace(greedy, queues=queues,
                                   warm_starts=warm_starts(snapshot, queues))
        found = best = sc.score(plan, touched)
        if found.key <= base.key:
            plan, best = greedy, base
        return Refinement(plan, base, best, name, solver.objective_value, solve_s,
                          sc.estimates(plan, touched), found)


class _State(NamedTuple):
    """A head group in the model, ms: S its start, F the fluid end of the work up to and
    including it, D when all of that work has ended (a model change waits for it), V the
    variance of its wait (ms^2) and R the part of its spread that adds linearly (the learned
    means' uncertainty)."""

    S: int
    F: int
    D: int
    V: int
    R: int


class _Model:
    """The CP-SAT model of one refinement: per worker a circuit through the head groups it
    may serve (node 0 stands for the queue's start and end), per group a _State. `_after`
    computes a state from its predecessor's and `_link` states the same as constraints, so
    the hint (the greedy heads through `chain`) is feasible and worth in the model exactly
    what `score` says the greedy plan is worth."""

    def __init__(self, ref: CpSatRefiner, sc: _Scorer, heads: dict, tails: dict,
                 pinned: set = frozenset()):
        self.gen, self.sc, self.heads, self.tails = ref.gen, sc, heads, tails
        self.cp = m = cp_model.CpModel()
        self.first: dict = {}  # worker -> its empty virtual queue (estimator)
        self._n: dict[tuple, _Numbers] = {}
        self.circuits: dict[str, tuple[list, list]] = {}
        self.hints: list = []
        self.weights: list = []  # (literal, requests whose SLO it says is met)
        self.swaps: list = []
        groups, workers = sc.groups, sc.workers
        home = {g: w for w, q in heads.items() for g in q}

        where, nodes = self._where(ref, home, pinned)
        tp = self.gen.estimator.throughput
        self.batch = {(w, mo): tp.batch(w, mo) for w, v in workers.items() for mo in v.models}
        for w, q in heads.items():  # the batches of the hint's segments
            for g in q:
                key = (w, groups[g].model)
                self.batch[key] = min(self.batch[key], _batch(self.gen, groups[g], w))
        circuit = {w for w in workers if nodes[w]}
        self.running = {w: self._running_fluid(workers[w]) for w in circuit}
        # the batch now, drained: when a worker could change model before any new group
        self.drain, self.drain_var = {}, {}
        for w in circuit:
            d = self._first(w).next_wait(QueuedGroup("", "", 1)) if workers[w].loaded else None
            self.drain[w] = _ms(d.mean - self.gen.swap_s(w)) if d else 0
            self.drain_var[w] = _ms2(d.std**2) if d else 0

        self.hint: dict[str, _State] = {}
        self.end: dict[str, int] = {}  # when the tail's first group starts behind the head
        for w, q in heads.items():
            self.hint.update(self.chain(w, q))
            if tails[w] and nodes[w]:
                self.end[w] = self._tail_start(w, q[-1] if q else None, self.hint)
        self.slack = {g: sc.queue(w, heads[w] + tails[w])[3][g] for g, w in home.items()}

        reach = [self.num(g, w) for g in home for w in where[g]]
        horizon = max(n.first_mean for n in reach) + max(self.running.values()) + 1
        horizon += max(self.drain.values()) + sum(max(
            self.num(g, w).work + self.num(g, w).drain + _ms(self.gen.swap_s(w))
            for w in where[g]) for g in home)
        v_horizon = max(n.first_var for n in reach) + max(self.drain_var.values()) + sum(
            max(self.num(g, w).var + self.num(g, w).drain_var for w in where[g]) for g in home)
        r_horizon = sum(max(self.num(g, w).se for w in where[g]) for g in home)
        # (and never below the hint's own values, whatever rounding did)
        horizon = max(horizon, *(max(h.S, h.F, h.D) + 1 for h in self.hint.values()))
        v_horizon = max(v_horizon, *(h.V for h in self.hint.values()))
        self.vars = {g: _State(m.new_int_var(0, horizon, f"s_{g}"),
                               m.new_int_var(0, 2 * horizon, f"f_{g}"),
                               m.new_int_var(0, 2 * horizon, f"d_{g}"),
                               m.new_int_var(0, v_horizon, f"v_{g}"),
                               m.new_int_var(0, r_horizon, f"r_{g}")) for g in home}
        on: dict[str, list] = {g: [] for g in home}
        self.met = {g: self._bool(f"met_{g}", self.slack[g] >= 0) for g in home}

        for w in workers:
            nodes_w = [g for g in home if w in where[g]]
            if nodes_w:
                self._circuit(w, nodes_w, home, on, w in pinned, horizon)

        for g in home:
            m.add_exactly_one(on[g])
            self._chance(g, self.vars[g], self.met[g])
            self.weights.append((self.met[g], groups[g].queued))
            self.hints += zip(self.vars[g], self.hint[g], strict=True)

        # lexicographic: one more request meeting its SLO outweighs every swap there can be
        big = len(self.swaps) + 1
        m.maximize(big * sum(wt * lit for lit, wt in self.weights) - sum(self.swaps))
        for var, value in self.hints:
            m.add_hint(var, value)

    def _where(self, ref: CpSatRefiner, home: dict, pinned) -> tuple[dict, dict]:
        """Where each head group may go: home, or one of the `moves` least loaded workers
        (requests ahead per batch slot, a cheap measure) that serve its model and have room
        (fewer than `max_nodes` groups); a worker evicting for a group outside the model
        takes none. Also how many groups each worker may get."""
        groups, workers, heads, tails = self.sc.groups, self.sc.workers, self.heads, self.tails
        ahead = {w: (v.running + sum(groups[g].queued for g in heads[w] + tails[w]))
                 / max(1, v.max_running) for w, v in workers.items()}
        by_load = sorted(workers, key=lambda w: (ahead[w], w))
        nodes = {w: len(q) for w, q in heads.items()}
        where = {}
        for g in sorted(home, key=lambda g: (groups[g].deadline_ms, g)):
            others = [w for w in by_load if w != home[g] and groups[g].model in workers[w].models
                      and nodes[w] < ref.max_nodes and (heads[w] or w not in pinned)]
            where[g] = [home[g], *others[:ref.moves]]
            for w in where[g][1:]:
                nodes[w] += 1
        return where, nodes

    def _circuit(self, w: str, nodes: list, home: dict, on: dict, pinned: bool,
                 horizon: int) -> None:
        """w's virtual queue: a circuit through the groups it may take, each arc bringing
        the constraints of one group right after another, and the tail behind the last."""
        m, q = self.cp, self.heads[w]
        index = {None: 0, **{g: i + 1 for i, g in enumerate(nodes)}}
        arcs = [(0, 0, self._bool(f"empty_{w}", not q))]
        E = None
        if self.tails[w]:
            E = m.new_int_var(0, 2 * horizon + self.end[w], f"end_{w}")
            self.hints.append((E, self.end[w]))
            self._link_tail(arcs[0][2], w, None, E)
            self._tail_slack(w, E)
        for g in nodes:
            here = self._bool(f"on_{g}_{w}", home[g] == w)
            on[g].append(here)
            arcs.append((index[g], index[g], ~here))
            for prev in [None, *nodes]:
                if prev == g:
                    continue
                hinted = _follows(q, prev, g)
                lit = self._bool(f"arc_{prev}_{g}_{w}", hinted)
                arcs.append((index[prev], index[g], lit))
                self._link(lit, w, prev, g)
                if pinned and prev is None and hinted:
                    m.add(lit == 1)  # its head group evicts for it: it stays the head
                if prev is not None and not hinted:
                    # a group that misses its deadline anyway delays whoever comes after
                    # it: some plan as good has it behind the groups that meet theirs
                    # (the greedy plan's own arcs stay, so the hint holds)
                    m.add_bool_or([~lit, self.met[prev], ~self.met[g]])
            lit = self._bool(f"last_{g}_{w}", q[-1:] == [g])
            arcs.append((index[g], 0, lit))
            if E is not None:
                self._link_tail(lit, w, g, E)
        m.add_circuit(arcs)
        self.circuits[w] = (nodes, arcs)

    def num(self, g: str, w: str) -> _Numbers:
        if (g, w) not in self._n:
            group = self.sc.groups[g]
            self._n[g, w] = _Numbers(self.sc, group, w, self._first(w),
                                     self.batch[w, group.model],
                                     len(self.sc.workers[w].models) > 1)
        return self._n[g, w]

    def _first(self, w: str):
        if w not in self.first:
            self.first[w] = self.sc.fresh(w)
        return self.first[w]

    def _bool(self, name: str, hint: bool):
        lit = self.cp.new_bool_var(name)
        self.hints.append((lit, int(hint)))
        return lit

    # --- the chance constraint -----------------------------------------------------------

    def _chance(self, g: str, state: _State, met=None):
        """mean + z * std <= deadline, as a linear inequality: a constraint enforced by `met`
        on the model's variables, or (met None) whether a _State of numbers satisfies it.

        The square root in std = sqrt(V) + R is concave, so its tangent at the hint's
        variance s^2 bounds it from above, sqrt(V) <= s + (V - s^2) / (2 s): exact where the
        greedy plan put the group, cautious elsewhere. And each group is calibrated to the
        estimator's quantile at its greedy place (its gamma tail, batching, drains: slack),
        so the model errs only in how a move changes a wait. Multiplied by 2 s D to be
        integer: c (S - S0) + Z (V - V0) + c z (R - R0) <= c * slack."""
        h, z = self.hint[g], max(self.gen.z, 0.0)  # below 50% confidence: no spread term
        c = max(1, round(2 * math.sqrt(h.V) * _D))
        lhs = (c * (state.S - h.S) + round(z * _D) * (state.V - h.V)
               + round(c * z) * (state.R - h.R))
        rhs = math.floor(c * self.slack[g] * 1000)
        if met is None:
            return lhs <= rhs
        return self.cp.add(lhs <= rhs).only_enforce_if(met)

    # --- the recurrences: numbers for the hint, constraints for the model ------------------

    def chain(self, w: str, order) -> dict[str, _State]:
        """The states of `order` (head groups) as w's head, in that order."""
        out, prev = {}, None
        for g in order:
            out[g] = self._after(w, prev, out.get(prev), g)
            prev = g
        return out

    def _after(self, w: str, prev: str | None, p: _State | None, g: str) -> _State:
        """The state of g right after prev (state p) on w; prev None: g first."""
        n, loaded = self.num(g, w), self.sc.workers[w].loaded
        if prev is None:
            s = n.first_mean
            if self.sc.groups[g].model == loaded:
                f = self.running[w] + n.work
                return _State(s, f, max(self.drain[w], s + n.drain, f), n.first_var, 0)
            return _State(s, s + n.work, max(s + n.drain, s + n.work), n.first_var, 0)
        pn = self.num(prev, w)
        r = p.R + pn.se
        if self.sc.groups[prev].model == self.sc.groups[g].model:
            s, f = max(p.S, p.F - pn.credit, 0), p.F + n.work
            return _State(s, f, max(p.D, s + n.drain, f), p.V + pn.var, r)
        s = p.D + _ms(self.gen.swap_s(w))
        return _State(s, s + n.work, max(s + n.drain, s + n.work),
                      p.V + pn.var + self._drain_var(prev, w), r)

    def _drain_var(self, g: str, w: str) -> int:
        """The spread a model change after g adds: its drain's, or the batch's now when g
        may share its segment (the larger, not knowing which ends last)."""
        v = self.num(g, w).drain_var
        return max(v, self.drain_var[w]) if self.sc.groups[g].model == \
            self.sc.workers[w].loaded else v

    def _link(self, lit, w: str, prev: str | None, g: str) -> None:
        """`_after` as constraints that hold when lit (g right after prev on w) does."""
        m, n, loaded = self.cp, self.num(g, w), self.sc.workers[w].loaded
        x = self.vars[g]
        model = self.sc.groups[g].model
        m.add(x.D >= x.S + n.drain).only_enforce_if(lit)
        m.add(x.D >= x.F).only_enforce_if(lit)
        if prev is None:
            m.add(x.S >= n.first_mean).only_enforce_if(lit)
            m.add(x.V >= n.first_var).only_enforce_if(lit)
            if model == loaded:
                m.add(x.F >= self.running[w] + n.work).only_enforce_if(lit)
                m.add(x.D >= self.drain[w]).only_enforce_if(lit)
            else:
                m.add(x.F >= x.S + n.work).only_enforce_if(lit)
                if loaded:
                    self.swaps.append(lit)
            return
        pn, p = self.num(prev, w), self.vars[prev]
        m.add(x.R >= p.R + pn.se).only_enforce_if(lit)
        if self.sc.groups[prev].model == model:
            m.add(x.S >= p.S).only_enforce_if(lit)
            m.add(x.S >= p.F - pn.credit).only_enforce_if(lit)
            m.add(x.F >= p.F + n.work).only_enforce_if(lit)
            m.add(x.D >= p.D).only_enforce_if(lit)
            m.add(x.V >= p.V + pn.var).only_enforce_if(lit)
        else:
            m.add(x.S >= p.D + _ms(self.gen.swap_s(w))).only_enforce_if(lit)
            m.add(x.F >= x.S + n.work).only_enforce_if(lit)
            m.add(x.V >= p.V + pn.var + self._drain_var(prev, w)).only_enforce_if(lit)
            self.swaps.append(lit)

    def _tail_start(self, w: str, last: str | None, states: dict) -> int:
        """When the first group of w's tail starts behind a head ending with `last`."""
        t = self.sc.groups[self.tails[w][0]]
        if last is None:
            return _ms(self._first(w).next_wait(_queued(t)).mean)
        pn, p = self.num(last, w), states[last]
        if self.sc.groups[last].model == t.model:
            return max(p.S, p.F - pn.credit, 0)
        return p.D + _ms(self.gen.swap_s(w))

    def _link_tail(self, lit, w: str, last: str | None, E) -> None:
        """`_tail_start` as constraints on E that hold when lit (last ends w's head) does."""
        t, m, loaded = self.sc.groups[self.tails[w][0]], self.cp, self.sc.workers[w].loaded
        if last is None:
            m.add(E >= _ms(self._first(w).next_wait(_queued(t)).mean)).only_enforce_if(lit)
            if loaded and t.model != loaded:
                self.swaps.append(lit)
            return
        pn, p = self.num(last, w), self.vars[last]
        if self.sc.groups[last].model == t.model:
            m.add(E >= p.S).only_enforce_if(lit)
            m.add(E >= p.F - pn.credit).only_enforce_if(lit)
        else:
            m.add(E >= p.D + _ms(self.gen.swap_s(w))).only_enforce_if(lit)
            self.swaps.append(lit)

    def _tail_slack(self, w: str, E) -> None:
        """A tail group stays met while its worker's head ends within its slack (its own
        spread is taken as it was: the head shifts the tail more than it widens it)."""
        slack = self.sc.queue(w, self.heads[w] + self.tails[w])[3]
        for t in self.tails[w]:
            keep = self._bool(f"met_{t}", slack[t] >= 0)
            self.cp.add(E <= self.end[w] + math.floor(slack[t] * 1000)).only_enforce_if(keep)
            self.weights.append((keep, self.sc.groups[t].queued))

    def _running_fluid(self, w) -> int:
        """The batch now as work ahead (ms of a full batch): the fluid start of its queue."""
        if not w.loaded or not w.running_requests:
            return 0
        tp = self.gen.estimator.throughput
        step = tp.step_s(w.id, w.loaded, tp.batch(w.id, w.loaded))
        left = sum(self.gen.lengths.moments(w.loaded, r.slo_class, r.max_tokens or None,
                                            r.generated)[0] for r in w.running_requests)
        return _ms(left * step / self.batch.get((w.id, w.loaded), tp.batch(w.id, w.loaded)))

    def queues(self, solver: cp_model.CpSolver) -> dict[str, list[str]]:
        out = {}
        for w, tail in self.tails.items():
            head = self.heads[w]
            if w in self.circuits:
                nodes, arcs = self.circuits[w]
                succ = {t: h for t, h, lit in arcs if t != h and solver.boolean_value(lit)}
                head, node = [], succ.get(0, 0)
                while node:
                    head.append(nodes[node - 1])
                    node = succ[node]
            out[w] = head + tail
        return out


def _follows(queue: list[str], prev: str | None, g: str) -> bool:
    """Whether g comes right after prev in queue (prev None: g first)."""
    if prev is None:
        return queue[:1] == [g]
    return prev in queue and queue.index(prev) + 1 < len(queue) and \
        queue[queue.index(prev) + 1] == g


class RefinedPlanGenerator:
    """The QLM policy with both stages: PlanGenerator's greedy plan, then CP-SAT's refinement
    of it. Called with a Snapshot it returns the better of the two, like any policy (the
    simulator, the benchmarks); a caller that must not wait for CP-SAT (the live planner)
    installs `greedy(snapshot)` at once and `refine(snapshot, plan)` when that returns a
    better one. It wraps the generator rather than extending it: learning, calibration and
    the greedy plan stay PlanGenerator's."""

    def __init__(self, generator: PlanGenerator, **refiner_options):
        self.generator = generator
        self.refiner = CpSatRefiner(generator, **refiner_options)
        self.name = generator.name
        self.last: Refinement | None = None

    def observe(self, model: str, slo_class: str, output_tokens: int) -> None:
        self.generator.observe(model, slo_class, output_tokens)

    def group_started(self, group_id: str, now_s: float) -> None:
        self.generator.group_started(group_id, now_s)

    @property
    def calibration(self):
        return self.generator.calibration

    @property
    def lengths(self):
        return self.generator.lengths

    def greedy(self, snapshot: Snapshot) -> Plan:
        return self.generator(snapshot)

    def refine(self, snapshot: Snapshot, plan: Plan) -> Plan | None:
        """A plan that scores higher than `plan` (the greedy one), or None."""
        self.last = self.refiner.refine(snapshot, plan)
        if not self.last.improved:
            return None
        # estimator coverage is checked against the estimate of the plan in force; the
        # generator keeps them (privately) for the greedy plan, so they follow the refined one
        latest = getattr(self.generator, "_latest", None)
        if isinstance(latest, dict):
            now_s = snapshot.now_ms / 1000
            # the head of a worker that evicts for it keeps the estimate with its evictions,
            # and a group that starts before the plan is in force the estimate of that start
            keep = {plan.queues[w][0] for w, ev in plan.evictions.items()
                    if ev and plan.queues.get(w)} | getattr(self.generator, "_early", set())
            latest.update((g, (e, now_s)) for g, e in self.last.estimates.items()
                          if g not in keep)
        return self.last.plan

    def __call__(self, snapshot: Snapshot) -> Plan:
        plan = self.greedy(snapshot)
        return self.refine(snapshot, plan) or plan
