"""Request waiting time (RWT) estimator: how long until a request group starts on an instance.

A group's wait is a sum of the service times of the work ahead of it in its virtual queue, so
(QLM's observation) it follows from the output-length distribution per (model, SLO class) and
each instance's token throughput per model; means and variances of the summands add (CLT).
Choices beyond the paper, each for a known weakness of the published estimator:

- Lengths: see lengths.py (a window of completions with a prior, censored by the running
  requests, by prompt band, with the drift of the mean in its standard error).
- Tails: `quantile`/`p_meets` read a gamma matched to the wait's mean and variance (through the
  Wilson-Hilferty cube-root normal, closed form both ways), shifted by its deterministic part
  (swaps, prefill). Sums of positive skewed lengths are skewed, a gamma is too, and it tends to
  the normal for long queues; on heavy-tailed Monte Carlo queues it covered within 3 points of
  the target where the normal (`tail="normal"`, the paper) and a moment-matched log-normal
  under-covered by up to 4-5.
- Batching: an instance runs b = max_running sequences (fewer when the KV cache holds fewer of a
  group's prompt + max_tokens, or of what the running requests hold: context + expected output
  to come), each one token per decode step of step_s(b). A group starts when a slot frees
  and, where the running requests' contexts are known, its first request fits in KV: with n
  requests ahead (running + queued) and n < b at once; else after m = n - b + 1 completions.
  Whether it fits is uncertain (so is the output the batch still holds): it fits now with a
  probability, else after the completions that free enough, and the wait is that mixture
  (under load a KV-bound batch keeps slots free that no request can use: reading them as
  free caused nearly all the estimator's misses on the wa scenario). A busy batch completes
  requests at b / (step * mean length) per second whatever the length distribution (renewal
  theory), so the wait is m requests' work at the full-batch rate; running requests count as
  fresh ones then, with exponential spacing (b staggered requests complete like a Poisson
  stream), blended with their known remaining lengths by 1/b (exact for b = 1). Charging all
  work ahead at W / rate, as the published estimator does, overestimates the wait of the first
  groups by up to a batch's work.
- Chunked prefill (vLLM's max_num_batched_tokens, in the profile): a step holds one token per
  decoding sequence and prompt chunks in admission order, and admits new requests only while
  less than a chunk of prompts is left. So a group starts at the first step end with under a
  chunk of prompts ahead of it (those the batch still owes, then the queue's), free slots or
  not, and each step until then prefills a whole chunk: a sure wait of whole steps.
- A model change first drains the instance: its end is the fluid drain time or, when later, the
  end of the longest of the last k in flight (quantiles of the max of k lengths; heavy tails
  make the drain last much longer than its average work), then the swap time is added.
- Calibration (online, conformal): every uncertain wait's outcome is scored against the room
  its quantile left, (actual - fixed) / (quantile - fixed); the plan then reads quantiles
  with that room scaled by the 95th percentile of the last 400 scores (Calibration.spread).
  The model above erred on the safe side by a point or two on most loads, and the other way
  where the planner's own compute time was not yet counted; the spread corrects either,
  whatever the cause, from the estimates' own errors. Coverage is reported plainly (the
  share of waits at or under their quantile) and as the randomized probability integral
  transform counts it (`Calibration.pit_hits`): there a sure wait estimated right counts as
  the confidence, as it should for a forecast that puts all its probability on one instant,
  where the plain share counts it as 1 (and at low loads, where nearly every wait is sure,
  reads near 1 however calibrated the estimate).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections import Counter, deque
from statistics import NormalDist

from .lengths import Key, OutputLengthStats, group_band

_N01 = NormalDist()


class InstanceThroughput:
    """Per (worker, model) service rate: the engine profile's shape times a learned speed.

    The profile (max_running, prefill_ms_per_token, decode_step_ms, decode_ms_per_seq, optional
    kv_capacity_tokens: a SimProfile or a measured one) gives the step time at each batch size;
    completions teach an EWMA of log(profiled / measured step) per instance, so heterogeneous
    GPUs (or a sim's time_scale) get their own rate without re-profiling. The same factor scales
    prefill, which completions do not measure separately."""

    def __init__(self, default_profile=None, alpha: float = 0.1):
        self.default_profile, self.alpha = default_profile, alpha
        self._profiles: dict[Key, object] = {}
        self._log_speed: dict[Key, float] = {}

    def set_profile(self, worker: str, model: str, profile, speed: float = 1.0) -> None:
        self._profiles[(worker, model)] = profile
        self._log_speed[(worker, model)] = math.log(speed)

    def profile(self, worker: str, model: str):
        p = self._profiles.get((worker, model), self.default_profile)
        if p is None:
            raise KeyError(f"no engine profile for worker {worker!r} model {model!r}")
        return p

    def speed(self, worker: str, model: str) -> float:
        """Measured speed relative to the profile (2.0: steps take half the profiled time)."""
        return math.exp(self._log_speed.get((worker, model), 0.0))

    def step_s(self, worker: str, model: str, batch: float) -> float:
        """Seconds per decode step (one token for each running sequence) at this batch."""
        p = self.profile(worker, model)
        return (p.decode_step_ms + p.decode_ms_per_seq * batch) / 1000.0 / self.speed(worker, model)

    def observe(self, worker, model, output_tokens: int, decode_s: float, batch: float) -> None:
        """A request produced output_tokens in decode_s seconds with about `batch` running."""
        if output_tokens < 2 or decode_s <= 0:
            return
        profiled = self.step_s(worker, model, batch) * self.speed(worker, model)
        old = self._log_speed.get((worker, model), 0.0)
        ratio = profiled * output_tokens / decode_s
        self._log_speed[(worker, model)] = old + self.alpha * (math.log(ratio) - old)

    def batch(self, worker: str, model: str, tokens_per_seq: float | None = None) -> int:
        """Sequences that run at once: max_running, fewer when the KV cache is the limit."""
        p = self.profile(worker, model)
        kv = getattr(p, "kv_capacity_tokens", None)
        if kv and tokens_per_seq:
            return max(1, min(p.max_running, int(kv // tokens_per_seq)))
        return p.max_running

    def kv_capacity(self, worker: str, model: str) -> float:
        """Tokens its KV cache holds (0: unknown, not a limit)."""
        return float(getattr(self.profile(worker, model), "kv_capacity_tokens", 0) or 0)

    def decode_rate(self, worker: str, model: str, batch: int | None = None) -> float:
        """Output tokens per second over the whole batch (default: a full one)."""
        b = self.batch(worker, model) if batch is None else batch
        return b / self.step_s(worker, model, b)

    def prompt_s_per_token(self, worker: str, model: str) -> float:
        """What one prompt token adds to the step that prefills it."""
        return self.profile(worker, model).prefill_ms_per_token / 1000.0 / self.speed(worker, model)

    def chunked(self, worker: str, model: str) -> bool:
        """Whether the engine prefills prompts in chunks (its profile's max_batched_tokens)."""
        return bool(getattr(self.profile(worker, model), "max_batched_tokens", 0))

    def prefill_chunk_tokens(self, worker: str, model: str, budget: float = math.inf,
                             batch: int | None = None) -> float:
        """Prompt tokens one step prefills beside a batch (default: a full one): what the
        engine's budget leaves after the decodes' token each, or `budget` if smaller; inf:
        every prompt admitted, whole."""
        b = self.batch(worker, model) if batch is None else batch
        engine = getattr(self.profile(worker, model), "max_batched_tokens", 0)
        return max(min(budget, engine - b if engine else math.inf), 1)

    def prefill_s_per_token(self, worker: str, model: str, budget: float = math.inf,
                            batch: int | None = None) -> float:
        """Wall time per prompt token of a queue's prefill. In chunks (see
        prefill_chunk_tokens) each chunk's step also decodes the batch, and the work behind
        waits for that step too; whole, a prompt costs only its tokens."""
        b = self.batch(worker, model) if batch is None else batch
        chunk = self.prefill_chunk_tokens(worker, model, budget, b)
        per_token = self.prompt_s_per_token(worker, model)
        return per_token if chunk == math.inf else per_token + self.step_s(worker, model, b) / chunk


@dataclasses.dataclass(frozen=True)
class QueuedGroup:
    """A group as the estimator sees it in one virtual queue."""

    model: str
    slo_class: str
    queued: int
    prompt_tokens: int = 0  # total over its queued requests
    max_tokens: int | None = None  # sum of its requests' max_tokens, when known


@dataclasses.dataclass(frozen=True)
class WaitEstimate:
    """Wait until a group starts, seconds. `fixed` is its deterministic part (swaps, prefill).
    Tail "gamma": the rest is read as a gamma with its mean and std (Wilson-Hilferty: its cube
    root is nearly normal); "normal": mean + z * std, the paper's estimator."""

    mean: float
    std: float
    fixed: float = 0.0
    tail: str = "gamma"
    # the calibration's factor on the uncertain part of every quantile (Calibration.spread)
    spread: float = 1.0

    def _cube_root_normal(self):
        rand = self.mean - self.fixed
        if self.tail == "normal" or rand <= 0 or self.std <= 0:
            return None
        cv = self.std / rand
        return rand, 1 - cv * cv / 9, cv / 3

    def quantile(self, z: float) -> float:
        """The wait met with probability Phi(z)."""
        q = self._raw_quantile(z)
        if self.spread == 1.0 or self.std <= 0:
            return q
        return self.fixed + self.spread * (q - self.fixed)

    def _raw_quantile(self, z: float) -> float:
        wh = self._cube_root_normal()
        if wh is None:
            return self.mean + z * self.std
        rand, a, b = wh
        return self.fixed + rand * max(a + z * b, 0.0) ** 3

    def atom(self) -> tuple[float, float]:
        """(where, probability): the wait the estimate puts a probability on by itself. A sure
        wait is one; the gamma tail puts what its cube-root normal has below zero at `fixed`
        (the start its sure part alone allows); a normal tail has none (probability 0)."""
        if self.std <= 0:
            return self.mean, 1.0
        wh = self._cube_root_normal()
        if wh is None:
            return self.fixed, 0.0
        _, a, b = wh
        return self.fixed, _N01.cdf(-a / b)

    def p_meets(self, deadline_s: float) -> float:
        """P(wait <= deadline_s)."""
        if self.spread != 1.0 and self.std > 0:
            deadline_s = self.fixed + (deadline_s - self.fixed) / self.spread
        wh = self._cube_root_normal()
        if wh is not None:
            d = deadline_s - self.fixed
            return 0.0 if d <= 0 else _N01.cdf(((d / wh[0]) ** (1 / 3) - wh[1]) / wh[2])
        if self.std <= 0:
            return float(deadline_s >= self.mean)
        return _N01.cdf((deadline_s - self.mean) / self.std)


class _Segment:
    """Work of consecutive groups of one model, in one slot's seconds (per-sequence time).

    batch: the sequences that run at once (what sets the completion rate); slots: the most the
    engine runs (max_running); kv_cap: its KV cache in tokens (0: not modelled, when what the
    running requests hold is unknown)."""

    def __init__(self, batch: int, slots: int | None = None, kv_cap: float = 0.0):
        self.batch, self.n, self.prefill = batch, 0, 0.0
        self.prefill_tokens = 0  # prompts ahead, in tokens (a chunked prefill's steps)
        self.slots, self.kv_cap = slots or batch, kv_cap
        self.mean = self.var = self.left = self.left_var = 0.0  # left: running ones' remainder
        self.kv = self.kv_var = 0.0  # KV cache its requests hold (mean, variance), tokens
        self.kv_se: dict[Key, float] = {}  # and the error of the learned means, per key
        self.kv_se_sq = 0.0  # the sum of their squares
        self.se: dict[Key, float] = {}
        # distinct (step, model, class, cap, generated, band) in it, for drain tails: the longest of
        # the last k depends only on which kinds of request are there, not on how many
        self.members: dict[tuple, None] = {}
        # members only grow, so the longest of them per (quantile, k) is kept as far as it was
        # read, (members read, longest): a plan re-reads a segment's drain after each group
        # appended, and a running batch alone has up to one member per request
        self._longest: dict[tuple[float, int], tuple[int, float]] = {}
        self._order: list[tuple] = []

    def add(self, key: Key, count, mean, var, se, member, left=None,
            kv=(0.0, 0.0, 0.0)) -> None:
        self.n += count
        self.mean, self.var = self.mean + count * mean, self.var + count * var
        lm, lv = left or (mean, var)
        self.left, self.left_var = self.left + count * lm, self.left_var + count * lv
        self.kv, self.kv_var = self.kv + count * kv[0], self.kv_var + count * kv[1]
        old = self.kv_se.get(key, 0.0)
        self.kv_se[key] = new = old + count * kv[2]
        self.kv_se_sq += new * new - old * old
        self.se[key] = self.se.get(key, 0.0) + count * se
        if member not in self.members:
            self.members[member] = None
            self._order.append(member)

    def copy(self) -> _Segment:
        c = copy.copy(self)
        c.kv_se, c.se, c.members = dict(self.kv_se), dict(self.se), dict(self.members)
        c._longest, c._order = dict(self._longest), list(self._order)
        return c

    def slot_frac(self, need=None) -> tuple[tuple[float, float], ...]:
        """When a request needing `need` = (mean, variance, key, se) tokens of KV cache can
        start: the share of the work ahead done by then, per slot (0: at once), as
        (probability, share) cases. It needs a slot and, where KV is modelled, room in KV: the
        requests ahead hold an uncertain amount (their outputs are, and so is the learned mean
        they share), so it fits now with some probability, else after the completions that
        free enough (m, each freeing their mean)."""
        if self.n == 0:
            return ((1.0, 0.0),)
        if not self.kv_cap or need is None:
            m = self.n - self.batch + 1
            return ((1.0, 0.0 if m <= 0 else m / self.n / self.batch),)
        m_slot = max(0, self.n - self.slots + 1)
        excess = self.kv + need[0] - self.kv_cap
        old = self.kv_se.get(need[2], 0.0)
        shared = self.kv_se_sq - old * old + (old + need[3]) ** 2
        sd = math.sqrt(max(self.kv_var + need[1] + shared, 0.0))
        p_fit = _N01.cdf(-excess / sd) if sd > 0 else float(excess <= 0)
        m_kv = min(self.n, max(1, math.ceil(excess * self.n / self.kv))) if self.kv else 1
        per = 1 / self.n / self.batch
        if p_fit >= 1.0 or m_slot >= m_kv:
            return ((1.0, m_slot * per),)
        return ((p_fit, m_slot * per), (1 - p_fit, m_kv * per))

    def drain(self, lengths: OutputLengthStats) -> tuple[float, float, float]:
        """(mean, variance, se scale) of the time until all of the segment has finished."""
        if not self.n:
            return 0.0, 0.0, 0.0
        k = min(self.n, self.batch)
        start = (self.n - k) / (self.n * k) * self.left  # the last k start (fluid)

        def end(a: float) -> float:  # a-quantile of the longest of the last k
            read, longest = self._longest.get((a, k), (0, 0.0))
            q = a ** (1 / k)
            for st, m, c, cap, g, band in self._order[read:]:
                longest = max(longest, st * lengths.quantile(m, c, q, cap, g, band))
            self._longest[(a, k)] = (len(self._order), longest)
            return start + longest

        med, hi = end(0.5), end(0.95)
        s = math.log(hi / med) / 1.645 if 0 < med < hi else 0.0
        mean = med * math.exp(s * s / 2)
        var = mean * mean * math.expm1(s * s) + (self.n - k) / self.n * self.left_var / k**2
        fluid = self.left / k
        if fluid > mean:
            mean, var = fluid, max(var, self.left_var / k**2)
        return mean + self.prefill, var, 1 / k


class WaitingTimeEstimator:
    """Waits of the groups of one virtual queue (the model: see the module docstring)."""

    def __init__(
        self, lengths: OutputLengthStats, throughput: InstanceThroughput, tail: str = "gamma"
    ):
        if tail not in ("gamma", "normal"):
            raise ValueError(f"tail must be 'gamma' or 'normal', got {tail!r}")
        self.lengths, self.throughput, self.tail = lengths, throughput, tail
        self.spread = 1.0  # see Calibration.spread: set by whoever checks the estimates

    def estimate(
        self, worker: str, queue, *, model: str | None = None, running=(), swap_s: float = 0.0
    ) -> list[WaitEstimate]:
        """Wait until each group of `queue` (QueuedGroups in serving order) starts on `worker`.

        model: the model loaded now (None: the first group's). running: the batch now, as
        (slo_class, generated_tokens, max_tokens or None[, context_tokens]) per request, its
        context (prompt + output so far) when known, for the KV it holds. swap_s: the cost of each
        model change along the queue (and before its first group, when `model` differs)."""
        loaded = model if model is not None else (queue[0].model if queue else None)
        waits = self.queue(worker, loaded, running, swap_s)
        out = []
        for g in queue:
            out.append(waits.next_wait(g))
            waits.append(g)
        return out

    def queue(self, worker: str, model: str | None, running=(), swap_s: float = 0.0,
              ready_s: float = 0.0, cold_s=None, owed_tokens: int = 0):
        """An empty virtual queue of `worker` with `model` loaded and `running` in its batch,
        to be filled one group at a time (QueueWaits): what a plan generator needs to try a
        group at the end of every queue without re-estimating the whole queue. cold_s: model
        -> its load time for the models the worker does not hold warm (swap_s: the others).
        owed_tokens: prompt tokens the batch still has to prefill at ready_s (chunked)."""
        return QueueWaits(self, worker, model, running, swap_s, ready_s, cold_s, owed_tokens)


def _remaining(lengths: OutputLengthStats, model, slo_class, cap, progress, band) -> list:
    """remaining_many() per request: [mean, variance, se] each."""
    return lengths.remaining_many(model, slo_class, cap, progress, band).T.tolist()


def group_output(lengths: OutputLengthStats, g: QueuedGroup) -> tuple:
    """(cap, band, mean, variance, se) of the output of one request of g: the average of their
    caps stands for each; asked for once per group and plan, not per queue tried."""
    def compute() -> tuple:
        cap = g.max_tokens / max(g.queued, 1) if g.max_tokens else None
        band = group_band(lengths, g)
        return (cap, band, *lengths.moments(g.model, g.slo_class, cap, band=band),
                lengths.standard_error(g.model, g.slo_class, cap, band=band))

    return lengths.cached(("group", g), compute)


class QueueWaits:
    """The estimator's state along one virtual queue; `next_wait(g)` is the wait of group g if
    it came next, `append(g)` puts it there."""

    def __init__(self, est: WaitingTimeEstimator, worker: str, model, running, swap_s: float,
                 ready_s: float = 0.0, cold_s=None, owed_tokens: int = 0):
        self.est, self.worker, self.loaded, self.swap_s = est, worker, model, swap_s
        # a model's first load is cold (from disk: 30 s for a 7B where a warm one takes 1 s);
        # once loaded it stays warm, so only the first swap to it along the queue pays that
        self.cold_s = dict(cold_s or {})
        tp, ls = est.throughput, est.lengths
        self._set_model(model)
        self.base_mean = self.base_var = 0.0
        # deterministic delays: swaps along the queue, and the engine's step under way (it
        # takes new work only at a step boundary, however free its slots)
        self.swaps = ready_s
        self.base_se: dict[Key, float] = {}
        self.queued = 0
        self._drained = None  # the drain of `seg`, computed once per segment
        # until the next append: the shared error's terms (see _shared) and, per model, the
        # base after a change to it (a plan tries many groups at the end of each queue)
        self._terms = None
        self._changes: dict = {}
        # identical requests (same class, progress, cap and context) are estimated once
        kinds = Counter((*r[:3], r[3] if len(r) > 3 else None) for r in running)
        if model is None:
            kinds.clear()
        # a running request's prompt is its context less its output so far; the remainders
        # of the requests of one class, cap and band are computed at once (each has its own
        # progress, and the tables change every plan)
        same: dict[tuple, list] = {}
        for r in kinds:
            band = ls.band(r[3] - r[1]) if r[3] is not None else None
            same.setdefault((r[0], r[2], band), []).append(r)
        left = {}
        for (cls, cap, band), rs in same.items():
            # asked again within a plan for the same batch (a worker's queue from another
            # start: evictions, work taken before the plan is in force)
            progress = tuple(r[1] for r in rs)
            rests = ls.cached(("remaining", model, cls, cap, band, progress), functools.partial(
                _remaining, ls, model, cls, cap, progress, band))
            for r, rest in zip(rs, rests, strict=True):
                left[r] = rest
        # what the batch holds in KV cache: each request its context and the output still to
        # come (the engine reserves it; paged, it grows there). When that is the limit, fewer
        # than max_running fit: a request waits for KV with slots free
        known = all(r[3] is not None for r in kinds)  # else KV is not modelled on this segment
        if model is None:
            self.seg = _Segment(1)
        else:
            n = sum(kinds.values())
            kv = sum(k * (r[3] + left[r][0]) for r, k in kinds.items()) if known and n else 0
            self.seg = _Segment(tp.batch(worker, model, kv / n if kv else None),
                                tp.batch(worker, model),
                                tp.kv_capacity(worker, model) if known else 0.0)
            if self.chunked:
                self.seg.prefill_tokens = owed_tokens
        w = 1 / self.seg.batch
        step = tp.step_s(worker, model, self.seg.batch) if model is not None else 0.0
        for (cls, cap, band), rs in same.items():
            m, v = ls.moments(model, cls, cap, band=band)
            se = ls.standard_error(model, cls, cap, band=band)
            for r in rs:
                lm, lv, lse = left[r]
                self.seg.add(
                    (model, cls),
                    kinds[r],
                    (w * lm + (1 - w) * m) * step,
                    (w * lv + (1 - w) * m * m) * step**2,
                    se * step,
                    (step, model, cls, cap, r[1], band),
                    (lm * step, lv * step**2),
                    (r[3] + lm, lv, lse) if self.seg.kv_cap else (0.0, 0.0, 0.0),
                )
            if self.seg.kv_cap and step > 0:
                # the requests that end in the steps before the plan's work can start free
                # their KV then: a group "fits now" at that step end, not at the snapshot
                # (wa 1x: of the groups given p < 0.5 that fitted at once, 75 % started at
                # the instant a request ended)
                k = max(1, math.ceil(ready_s / step - 1e-9))
                p = ls.done_within(model, cls, cap, [r[1] for r in rs], k, band)
                for r, pr in zip(rs, p.tolist(), strict=True):
                    kv = kinds[r] * r[3]
                    self.seg.kv -= pr * kv
                    self.seg.kv_var += pr * (1 - pr) * kv * r[3]

    def copy(self) -> QueueWaits:
        """An independent copy: a plan generator tries orders from the same empty queue."""
        c = copy.copy(self)
        c.seg, c.cold_s, c._changes = self.seg.copy(), dict(self.cold_s), dict(self._changes)
        return c

    def _set_model(self, model) -> None:
        """The prefill rates of the model the queue serves from here on. Prefilled in chunks
        (by the engine, or under a step limit: qlm/core/tpot.py), a group starts at the first
        step end with less than a chunk of prompts ahead of it, free slots or not; until then
        every step prefills a whole chunk."""
        tp = self.est.throughput
        self._prefill_s = tp.prefill_s_per_token(self.worker, model) if model else 0.0
        self.chunked = model is not None and tp.chunked(self.worker, model)
        if self.chunked:
            self._chunk = tp.prefill_chunk_tokens(self.worker, model)
            self._chunk_step_s = self._chunk * self._prefill_s

    def _prefill_wait(self, seg, f: float) -> float:
        """The sure part of a group's wait that the prompts ahead of it in its segment make.
        In chunks: the whole chunk steps until less than a chunk of them is left. Whole: their
        prefill time, only when it waits for a slot (f > 0: a step after theirs)."""
        if not self.chunked:
            return seg.prefill if f else 0.0
        steps = math.ceil(max(0, seg.prefill_tokens - self._chunk + 1) / self._chunk)
        return steps * self._chunk_step_s

    def _drain(self):
        if self._drained is None:
            self._drained = self.seg.drain(self.est.lengths)
        return self._drained

    def _after_change(self, model):
        """(mean, var, se, swaps) of the base once everything so far has drained and `model`
        is loaded."""
        d_mean, d_var, d_scale = self._drain()
        se = dict(self.base_se)
        for k, v in self.seg.se.items():
            se[k] = se.get(k, 0.0) + v * d_scale
        return (self.base_mean + d_mean, self.base_var + d_var, se,
                self.swaps + self.cold_s.get(model, self.swap_s))

    @staticmethod
    def _shared(base_se, seg_se) -> tuple[float, float, float]:
        """The learned means' errors are shared by every request of a key, so a wait that
        starts after a share f of the segment's work is off by sum over keys of
        (base_k + f * seg_k)^2 = bb + f * bs + f^2 * ss: the three terms, (bb, bs, ss)."""
        bb = bs = ss = 0.0
        for k, b in base_se.items():
            bb += b * b
            bs += 2 * b * seg_se.get(k, 0.0)
        for v in seg_se.values():
            ss += v * v
        return bb, bs, ss

    def next_wait(self, g) -> WaitEstimate:
        if g.model != self.loaded:
            if g.model not in self._changes:
                base_mean, base_var, base_se, swaps = self._after_change(g.model)
                self._changes[g.model] = (base_mean, base_var, self._shared(base_se, {}), swaps)
            base_mean, base_var, terms, swaps = self._changes[g.model]
            return self._wait(base_mean, base_var, terms, swaps, _Segment(1), ((1.0, 0.0),))
        if self._terms is None:
            self._terms = self._shared(self.base_se, self.seg.se)
        return self._wait(self.base_mean, self.base_var, self._terms, self.swaps, self.seg,
                          self.seg.slot_frac(self._kv_need(g)))

    def _kv_need(self, g) -> tuple | None:
        """KV cache one request of g holds, (mean, variance, key, se): its prompt and its
        output."""
        if not self.seg.kv_cap:
            return None
        _, _, m, v, se = self._work(g)
        return g.prompt_tokens / max(g.queued, 1) + m, v, (g.model, g.slo_class), se

    def _work(self, g) -> tuple:
        return group_output(self.est.lengths, g)

    def _wait(self, base_mean, base_var, terms, swaps, seg, cases) -> WaitEstimate:
        """The wait given when g starts (`cases`, see slot_frac); several cases make a mixture,
        given by its mean and variance. terms: the shared error's (see _shared)."""
        bb, bs, ss = terms
        if len(cases) == 1:  # the common case, in a planner's inner loop
            f = cases[0][1]
            shared = bb + f * bs + f * f * ss
            fixed = swaps + self._prefill_wait(seg, f)
            return WaitEstimate(base_mean + fixed + f * seg.mean,
                                math.sqrt(base_var + f * seg.var / seg.batch + shared),
                                fixed, self.est.tail, self.est.spread)
        mean = second = 0.0
        for p, f in cases:
            shared = bb + f * bs + f * f * ss
            m = self._prefill_wait(seg, f) + f * seg.mean
            mean += p * m
            second += p * (f * seg.var / seg.batch + shared + m * m)
        # the prefill is a sure delay only when every case waits
        fixed = swaps + self._prefill_wait(seg, min(f for _, f in cases))
        return WaitEstimate(
            base_mean + swaps + mean,
            math.sqrt(max(base_var + second - mean * mean, 0.0)),
            fixed,
            self.est.tail,
            self.est.spread,
        )

    def append(self, g) -> None:
        tp = self.est.throughput
        if g.model != self.loaded:  # drain everything ahead, then swap
            self.base_mean, self.base_var, self.base_se, self.swaps = self._after_change(g.model)
            self.cold_s.pop(g.model, None)
            self._set_model(g.model)
            self.loaded, self.seg = g.model, _Segment(
                tp.batch(self.worker, g.model), None, tp.kv_capacity(self.worker, g.model))
        self._drained, self._terms = None, None
        self._changes.clear()
        q = max(g.queued, 0)
        if q == 0:
            return
        self.queued += q
        seg, worker = self.seg, self.worker
        cap, band, m, v, se = self._work(g)
        b = tp.batch(worker, g.model, g.prompt_tokens / q + (cap or m))
        seg.batch, step = min(seg.batch, b), tp.step_s(worker, g.model, b)
        seg.add(
            (g.model, g.slo_class),
            q,
            m * step,
            v * step**2,
            se * step,
            (step, g.model, g.slo_class, cap, 0, band),
            kv=(g.prompt_tokens / q + m, v, se),
        )
        seg.prefill += g.prompt_tokens * self._prefill_s
        seg.prefill_tokens += g.prompt_tokens


class Calibration:
    """Estimator coverage: how often actual waits fall at or under the predicted quantile; and
    the spread that would have made the recent uncertain ones fall under it at the confidence
    (online conformal calibration: the estimate's own errors, learned from the outcomes)."""

    # uncertain waits the spread is read from, the fewest it needs, and how far it may go
    WINDOW, MIN_COUNT, LIMITS = 400, 50, (0.25, 4.0)

    def __init__(self, confidence: float = 0.95):
        self.confidence, self.z = confidence, _N01.inv_cdf(confidence)
        self.count = self.hits = 0
        # the same for the waits whose quantile at the confidence lies past their sure part:
        # only there is the quantile a claim to calibrate. Where it does not (a sure start,
        # or a spread so skewed that the start is sure at the confidence: P(wait <= fixed)
        # >= 95 %), the outcome is right or wrong, right more often than the confidence if
        # the estimate is (wa at 1x: 40 % of the waits, 98 % right), and these lift the
        # overall figure
        self.uncertain = self.uncertain_hits = 0
        # the same with each wait that landed on its estimate's atom counted by the randomized
        # probability integral transform (Brockwell 2007; Czado, Gneiting and Held 2009): as
        # the chance that a uniform draw over the atom's probability falls under the
        # confidence. A sure wait estimated right then counts as the confidence, not as 1:
        # the calibration of an estimate that is sometimes sure, where the plain fraction
        # counts how many waits were sure
        self.pit_hits = 0.0
        self._error_sum = 0.0
        # per recent uncertain wait: (actual - fixed) / (quantile - fixed) before any spread
        self._scores: deque[float] = deque(maxlen=self.WINDOW)
        self.scored = 0  # scores ever taken here (the window keeps the last WINDOW)

    # Waits are compared to the millisecond (the services' clocks tick in ms).
    TOLERANCE_S = 0.001

    def record(self, predicted: WaitEstimate, actual_s: float) -> None:
        hit = actual_s <= predicted.quantile(self.z) + self.TOLERANCE_S
        self.count += 1
        self.hits += hit
        at, mass = predicted.atom()
        self.pit_hits += (min(1.0, self.confidence / mass)
                          if hit and mass > 0 and abs(actual_s - at) <= self.TOLERANCE_S
                          else hit)
        room = predicted._raw_quantile(self.z) - predicted.fixed
        if predicted.std > self.TOLERANCE_S and room > self.TOLERANCE_S:
            self.uncertain += 1
            self.uncertain_hits += hit
            self._scores.append((actual_s - predicted.fixed) / room)
            self.scored += 1
        self._error_sum += actual_s - predicted.mean

    def spread(self) -> float:
        """The factor on the uncertain part of each quantile under which the confidence share
        of the recent uncertain waits was met: below 1 where the estimates were too cautious,
        above where too bold; 1 until MIN_COUNT waits are known."""
        if len(self._scores) < self.MIN_COUNT:
            return 1.0
        scores = sorted(self._scores)
        k = min(len(scores) - 1, math.ceil(self.confidence * len(scores)) - 1)
        lo, hi = self.LIMITS
        return min(hi, max(lo, scores[k]))

    def scores_since(self, scored: int) -> list[float]:
        """The scores taken since `scored` were (oldest first; those the window still has),
        for a planner to keep where the next one finds them."""
        new = min(self.scored - scored, len(self._scores))
        return list(self._scores)[len(self._scores) - new:] if new > 0 else []

    def restore(self, scores) -> None:
        """Takes the scores the last leader kept (oldest first) as the window, so that spread()
        reads them at once. They include any this planner kept while it led before."""
        self._scores.clear()
        self._scores.extend(scores)

    def coverage(self) -> float:
        """Fraction of actual waits <= predicted quantile(z); nan before any record."""
        return self.hits / self.count if self.count else math.nan

    def coverage_pit(self) -> float:
        """coverage() with the waits that landed on an atom counted as the randomized PIT
        does (see pit_hits); nan before any record."""
        return self.pit_hits / self.count if self.count else math.nan

    def coverage_uncertain(self) -> float:
        """coverage() of the uncertain waits only; nan before any."""
        return self.uncertain_hits / self.uncertain if self.uncertain else math.nan

    def summary(self) -> dict:
        """The figures a report shows (the planner's GetPlan, qlm bench live), by the names of
        the EstimatorCalibration message."""
        return {"confidence": self.confidence, "waits": self.count,
                "coverage": self.coverage(), "coverage_pit": self.coverage_pit(),
                "uncertain": self.uncertain,
                "coverage_uncertain": self.coverage_uncertain() if self.uncertain else 0.0}

    def bias_s(self) -> float:
        """Mean of (actual - predicted mean): > 0 means the estimator is optimistic."""
        return self._error_sum / self.count if self.count else math.nan
