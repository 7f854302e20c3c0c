"""Request waiting time (RWT) estimator: how long until a request group starts on an instance.

A group's wait is a sum of the service times of the work ahead of it in its virtual queue, so
(QLM's observation) it follows from the output-length distribution per (model, SLO class) and
each instance's token throughput per model; means and variances of the summands add (CLT).
Choices beyond the paper, each for a known weakness of the published estimator:

- Lengths: a window of the last `window` completions per key, blended with a log-normal prior
  worth `prior_weight` pseudo-observations (lengths are positive and skewed). Sorted with prefix
  sums, the window gives E[min(L, cap)] and its variance for any max_tokens cap in O(log n), for
  whatever shape the lengths have (heavy tailed: log-normal, Pareto), follows drift, and answers
  "tokens left for a request that has produced g" (which grows with g under heavy tails).
- Tails: `quantile`/`p_meets` read a gamma matched to the wait's mean and variance (through the
  Wilson-Hilferty cube-root normal, closed form both ways), shifted by its deterministic part
  (swaps, prefill). Sums of positive skewed lengths are skewed, a gamma is too, and it tends to
  the normal for long queues; on heavy-tailed Monte Carlo queues it covered within 3 points of
  the target where the normal (`tail="normal"`, the paper) and a moment-matched log-normal
  under-covered by up to 4-5.
- Parameter uncertainty: the learned mean is off by its standard error for every request of a
  key at once, so it adds (requests * se)^2 to the variance; without it long queues (whose
  relative spread is small) are overconfident.
- Batching: an instance runs b = max_running sequences (fewer when the KV cache holds fewer of a
  group's prompt + max_tokens), each one token per decode step of step_s(b). A group starts when
  a slot frees: with n requests ahead (running + queued) and n < b at once; else after
  m = n - b + 1 completions. A busy batch completes requests at b / (step * mean length) per
  second whatever the length distribution (renewal theory), so the wait is m requests' work at
  the full-batch rate; running requests count as fresh ones then, with exponential spacing (b
  staggered requests complete like a Poisson stream), blended with their known remaining
  lengths by 1/b (exact for b = 1). Charging all work ahead at W / rate, as the published
  estimator does, overestimates the wait of the first groups by up to a batch's work.
- A model change first drains the instance: its end is the fluid drain time or, when later, the
  end of the longest of the last k in flight (quantiles of the max of k lengths; heavy tails
  make the drain last much longer than its average work), then the swap time is added.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from statistics import NormalDist

import numpy as np

_N01 = NormalDist()
Key = tuple[str, str]


def _lognormal_params(mean: float, var: float) -> tuple[float, float]:
    """(mu, sigma) of the log-normal with this mean and variance."""
    s2 = math.log1p(var / (mean * mean))
    return math.log(mean) - s2 / 2, math.sqrt(s2)


class OutputLengthStats:
    """Output tokens per (model, slo_class): log-normal prior + window of recent completions."""

    def __init__(self, prior_mean=256.0, prior_std=256.0, prior_weight=20.0, window=1024):
        if prior_mean <= 0 or prior_std < 0 or prior_weight < 0 or window < 1:
            raise ValueError("need prior_mean > 0, prior_std >= 0, prior_weight >= 0, window >= 1")
        self.prior_weight = float(prior_weight)
        self._mu, self._sigma = _lognormal_params(prior_mean, max(prior_std, 1e-6) ** 2)
        self._window = window
        self._samples: dict[Key, deque] = {}
        self._sorted: dict[Key, tuple[np.ndarray, np.ndarray, np.ndarray, dict]] = {}

    def observe(self, model: str, slo_class: str, output_tokens: int) -> None:
        key = (model, slo_class)
        self._samples.setdefault(key, deque(maxlen=self._window)).append(max(output_tokens, 0))
        self._sorted.pop(key, None)

    def count(self, model: str, slo_class: str) -> int:
        return len(self._samples.get((model, slo_class), ()))

    def _table(self, key: Key):
        if key not in self._sorted:
            s = np.sort(np.asarray(self._samples.get(key, ()), dtype=float))
            zero = np.zeros(1)
            self._sorted[key] = (
                s,
                np.concatenate((zero, np.cumsum(s))),
                np.concatenate((zero, np.cumsum(s * s))),
                {},
            )
        return self._sorted[key]

    def _memo(self, key: Key, args: tuple, compute):
        """Answers are cached until the key's next observation: a planner asks many times."""
        memo = self._table(key)[3]
        if args not in memo:
            if len(memo) > 4096:
                memo.clear()
            memo[args] = compute(*args)
        return memo[args]

    def _prior_cdf(self, x: float, k: int = 0) -> float:
        """E[L^k; L < x] / E[L^k] under the prior (k = 0: the cdf)."""
        if x <= 0:
            return 0.0
        if math.isinf(x):
            return 1.0
        return _N01.cdf((math.log(x) - self._mu - k * self._sigma**2) / self._sigma)

    def moments(self, model, slo_class, cap=None, generated=0) -> tuple[float, float]:
        """Mean and variance of the tokens still to come, min(L, cap) - generated, for a request
        that has produced `generated` tokens (so L > generated); E[min(L, cap)] for a new one."""
        return self._moments_se(model, slo_class, cap, generated)[:2]

    def standard_error(self, model, slo_class, cap=None) -> float:
        """How far the estimated mean of min(L, cap) may be off: sampling error of the window
        plus the pull of the prior (its pseudo-observations times its distance from the data)."""
        return self._moments_se(model, slo_class, cap, 0)[2]

    def _moments_se(self, model, slo_class, cap, generated) -> tuple[float, float, float]:
        key = (model, slo_class)
        return self._memo(key, ("m", cap, generated), lambda _, c, g: self._compute(key, c, g))

    def _compute(self, key: Key, cap, generated) -> tuple[float, float, float]:
        c, g = (math.inf if cap is None else float(cap)), float(generated)
        s, c1, c2, _ = self._table(key)
        ig, ic = np.searchsorted(s, g, "right"), np.searchsorted(s, c, "left")
        w, p_cut, p_above = self.prior_weight, 1.0 - self._prior_cdf(c), 1 - self._prior_cdf(g)
        n = len(s) - ig
        if c <= g or w * p_above + n <= 1e-12:
            return 0.0, 0.0, 0.0
        cut = 0.0 if math.isinf(c) else c
        prior, data = [], []  # first and second moments: the prior's (weight 1), the data's sums
        for k, cs in ((1, c1), (2, c2)):
            full = math.exp(k * self._mu + k * k * self._sigma**2 / 2)
            prior.append(full * (self._prior_cdf(c, k) - self._prior_cdf(g, k)) + cut**k * p_cut)
            data.append(cs[ic] - cs[ig] + cut**k * (len(s) - ic))
        mass = w * p_above + n
        m1, m2 = ((w * p + d) / mass for p, d in zip(prior, data, strict=True))
        var = max(m2 - m1 * m1, 0.0)
        pull = w * p_above / mass * (prior[0] / p_above - data[0] / n) if n and p_above else 0.0
        return float(m1 - g), float(var), math.sqrt(var / mass + pull * pull)

    def mean(self, model: str, slo_class: str, cap: int | None = None) -> float:
        return self.moments(model, slo_class, cap)[0]

    def variance(self, model: str, slo_class: str, cap: int | None = None) -> float:
        return self.moments(model, slo_class, cap)[1]

    def quantile(self, model, slo_class, q: float, cap=None, generated=0) -> float:
        """q-quantile of min(L, cap) - generated given L > generated: from the window once its
        samples above `generated` outnumber the prior's pseudo-observations there."""
        key = (model, slo_class)
        return self._memo(key, (q, cap, generated), lambda *a: self._quantile(key, *a))

    def _quantile(self, key: Key, q: float, cap, generated) -> float:
        s, g = self._table(key)[0], float(generated)
        i0 = int(np.searchsorted(s, g, "right"))
        n, p_above = len(s) - i0, 1.0 - self._prior_cdf(g)
        if n and n >= self.prior_weight * p_above:
            pos = q * (n - 1)
            i = min(int(pos), n - 2) if n > 1 else 0
            x = s[i0 + i] if n == 1 else s[i0 + i] + (pos - i) * (s[i0 + i + 1] - s[i0 + i])
        else:
            u = min(max(1.0 - p_above + q * p_above, 1e-12), 1 - 1e-12)
            x = math.exp(self._mu + self._sigma * _N01.inv_cdf(u))
        return float(max((x if cap is None else min(x, float(cap))) - g, 0.0))


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

    def decode_rate(self, worker: str, model: str, batch: int | None = None) -> float:
        """Output tokens per second over the whole batch (default: a full one)."""
        b = self.batch(worker, model) if batch is None else batch
        return b / self.step_s(worker, model, b)

    def prefill_s_per_token(self, worker: str, model: str) -> float:
        return self.profile(worker, model).prefill_ms_per_token / 1000.0 / self.speed(worker, model)


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

    def _cube_root_normal(self):
        rand = self.mean - self.fixed
        if self.tail == "normal" or rand <= 0 or self.std <= 0:
            return None
        cv = self.std / rand
        return rand, 1 - cv * cv / 9, cv / 3

    def quantile(self, z: float) -> float:
        """The wait met with probability Phi(z)."""
        wh = self._cube_root_normal()
        if wh is None:
            return self.mean + z * self.std
        rand, a, b = wh
        return self.fixed + rand * max(a + z * b, 0.0) ** 3

    def p_meets(self, deadline_s: float) -> float:
        """P(wait <= deadline_s)."""
        wh = self._cube_root_normal()
        if wh is not None:
            d = deadline_s - self.fixed
            return 0.0 if d <= 0 else _N01.cdf(((d / wh[0]) ** (1 / 3) - wh[1]) / wh[2])
        if self.std <= 0:
            return float(deadline_s >= self.mean)
        return _N01.cdf((deadline_s - self.mean) / self.std)


class _Segment:
    """Work of consecutive groups of one model, in one slot's seconds (per-sequence time)."""

    def __init__(self, batch: int):
        self.batch, self.n, self.prefill = batch, 0, 0.0
        self.mean = self.var = self.left = self.left_var = 0.0  # left: running ones' remainder
        self.se: dict[Key, float] = {}
        # distinct (step, model, class, cap, generated) in it, for drain tails: the longest of
        # the last k depends only on which kinds of request are there, not on how many
        self.members: dict[tuple, None] = {}

    def add(self, key: Key, count, mean, var, se, member, left=None) -> None:
        self.n += count
        self.mean, self.var = self.mean + count * mean, self.var + count * var
        lm, lv = left or (mean, var)
        self.left, self.left_var = self.left + count * lm, self.left_var + count * lv
        self.se[key] = self.se.get(key, 0.0) + count * se
        self.members[member] = None

    def slot_frac(self) -> float:
        """Share of the work ahead done before a slot frees, per slot (0: one is free)."""
        return 0.0 if self.n < self.batch else (self.n - self.batch + 1) / self.n / self.batch

    def drain(self, lengths: OutputLengthStats) -> tuple[float, float, float]:
        """(mean, variance, se scale) of the time until all of the segment has finished."""
        if not self.n:
            return 0.0, 0.0, 0.0
        k = min(self.n, self.batch)
        start = (self.n - k) / (self.n * k) * self.left  # the last k start (fluid)

        def end(a: float) -> float:  # a-quantile of the longest of the last k
            return start + max(
                st * lengths.quantile(m, c, a ** (1 / k), cap, g)
                for st, m, c, cap, g in self.members
            )

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

    def estimate(
        self, worker: str, queue, *, model: str | None = None, running=(), swap_s: float = 0.0
    ) -> list[WaitEstimate]:
        """Wait until each group of `queue` (QueuedGroups in serving order) starts on `worker`.

        model: the model loaded now (None: the first group's). running: the batch now, as
        (slo_class, generated_tokens, max_tokens or None) per request. swap_s: the cost of each
        model change along the queue (and before its first group, when `model` differs)."""
        loaded = model if model is not None else (queue[0].model if queue else None)
        waits = self.queue(worker, loaded, running, swap_s)
        out = []
        for g in queue:
            out.append(waits.next_wait(g))
            waits.append(g)
        return out

    def queue(self, worker: str, model: str | None, running=(), swap_s: float = 0.0,
              ready_s: float = 0.0):
        """An empty virtual queue of `worker` with `model` loaded and `running` in its batch,
        to be filled one group at a time (QueueWaits): what a plan generator needs to try a
        group at the end of every queue without re-estimating the whole queue."""
        return QueueWaits(self, worker, model, running, swap_s, ready_s)


class QueueWaits:
    """The estimator's state along one virtual queue; `next_wait(g)` is the wait of group g if
    it came next, `append(g)` puts it there."""

    def __init__(self, est: WaitingTimeEstimator, worker: str, model, running, swap_s: float,
                 ready_s: float = 0.0):
        self.est, self.worker, self.loaded, self.swap_s = est, worker, model, swap_s
        # under a step limit (qlm/core/tpot.py) prompts are prefilled in chunks and a group
        # starts only once the chunks ahead of it are done, free slots or not
        chunked = getattr(est.throughput, "chunked", None)
        self.chunked = bool(chunked and chunked(worker))
        tp, ls = est.throughput, est.lengths
        self.base_mean = self.base_var = 0.0
        # deterministic delays: swaps along the queue, and the engine's step under way (it
        # takes new work only at a step boundary, however free its slots)
        self.swaps = ready_s
        self.base_se: dict[Key, float] = {}
        self.seg = _Segment(tp.batch(worker, model) if model is not None else 1)
        self.queued = 0
        self._drained = None  # the drain of `seg`, computed once per segment
        w = 1 / self.seg.batch
        for cls, generated, cap in running if model is not None else ():
            step = tp.step_s(worker, model, self.seg.batch)
            m, v = ls.moments(model, cls, cap)
            lm, lv = ls.moments(model, cls, cap, generated)
            se = ls.standard_error(model, cls, cap)
            mix = (w * lm + (1 - w) * m) * step, (w * lv + (1 - w) * m * m) * step**2
            self.seg.add(
                (model, cls),
                1,
                *mix,
                se * step,
                (step, model, cls, cap, generated),
                (lm * step, lv * step**2),
            )

    def _drain(self):
        if self._drained is None:
            self._drained = self.seg.drain(self.est.lengths)
        return self._drained

    def _after_change(self):
        """(mean, var, se, swaps) of the base once everything so far has drained and swapped."""
        d_mean, d_var, d_scale = self._drain()
        se = dict(self.base_se)
        for k, v in self.seg.se.items():
            se[k] = se.get(k, 0.0) + v * d_scale
        return self.base_mean + d_mean, self.base_var + d_var, se, self.swaps + self.swap_s

    def next_wait(self, g) -> WaitEstimate:
        if g.model != self.loaded:
            base_mean, base_var, base_se, swaps = self._after_change()
            return self._wait(base_mean, base_var, base_se, swaps, _Segment(1), 0.0)
        return self._wait(self.base_mean, self.base_var, self.base_se, self.swaps, self.seg,
                          self.seg.slot_frac())

    def _wait(self, base_mean, base_var, base_se, swaps, seg, f) -> WaitEstimate:
        shared = sum(
            (base_se.get(k, 0.0) + f * seg.se.get(k, 0.0)) ** 2
            for k in base_se.keys() | seg.se.keys()
        )
        fixed = swaps + (seg.prefill if f or self.chunked else 0.0)
        return WaitEstimate(
            base_mean + fixed + f * seg.mean,
            math.sqrt(base_var + f * seg.var / seg.batch + shared),
            fixed,
            self.est.tail,
        )

    def append(self, g) -> None:
        tp, ls = self.est.throughput, self.est.lengths
        if g.model != self.loaded:  # drain everything ahead, then swap
            self.base_mean, self.base_var, self.base_se, self.swaps = self._after_change()
            self.loaded, self.seg = g.model, _Segment(tp.batch(self.worker, g.model))
        self._drained = None
        q = max(g.queued, 0)
        if q == 0:
            return
        self.queued += q
        seg, worker = self.seg, self.worker
        cap = g.max_tokens / q if g.max_tokens else None  # the average cap stands for each
        m, v = ls.moments(g.model, g.slo_class, cap)
        b = tp.batch(worker, g.model, g.prompt_tokens / q + (cap or m))
        seg.batch, step = min(seg.batch, b), tp.step_s(worker, g.model, b)
        se = ls.standard_error(g.model, g.slo_class, cap)
        seg.add(
            (g.model, g.slo_class),
            q,
            m * step,
            v * step**2,
            se * step,
            (step, g.model, g.slo_class, cap, 0),
        )
        seg.prefill += g.prompt_tokens * tp.prefill_s_per_token(worker, g.model)


class Calibration:
    """Estimator coverage: how often actual waits fall at or under the predicted quantile."""

    def __init__(self, confidence: float = 0.95):
        self.confidence, self.z = confidence, _N01.inv_cdf(confidence)
        self.count = self.hits = 0
        self._error_sum = 0.0

    # Waits are compared to the millisecond (the services' clocks tick in ms).
    TOLERANCE_S = 0.001

    def record(self, predicted: WaitEstimate, actual_s: float) -> None:
        self.count += 1
        self.hits += actual_s <= predicted.quantile(self.z) + self.TOLERANCE_S
        self._error_sum += actual_s - predicted.mean

    def coverage(self) -> float:
        """Fraction of actual waits <= predicted quantile(z); nan before any record."""
        return self.hits / self.count if self.count else math.nan

    def bias_s(self) -> float:
        """Mean of (actual - predicted mean): > 0 means the estimator is optimistic."""
        return self._error_sum / self.count if self.count else math.nan
