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
  Per prompt-length band too (the groups' prompt buckets), with the class as the band's prior:
  output length depends on the prompt, and a group is of one band.
- Censoring: the requests running now (set_running, from each plan's snapshot) are lengths
  known only to exceed what they have produced; they join the completions by the product limit
  (Kaplan-Meier). Completions alone are biased short whenever many requests started together:
  the short ones finish first (on wa at 2x, in the first 30 s, the KV the batch holds was
  underestimated by 6,000-10,000 tokens and the groups planned then were covered 0.47-0.81).
- Tails: `quantile`/`p_meets` read a gamma matched to the wait's mean and variance (through the
  Wilson-Hilferty cube-root normal, closed form both ways), shifted by its deterministic part
  (swaps, prefill). Sums of positive skewed lengths are skewed, a gamma is too, and it tends to
  the normal for long queues; on heavy-tailed Monte Carlo queues it covered within 3 points of
  the target where the normal (`tail="normal"`, the paper) and a moment-matched log-normal
  under-covered by up to 4-5.
- Parameter uncertainty: the learned mean is off by its standard error for every request of a
  key at once, so it adds (requests * se)^2 to the variance; without it long queues (whose
  relative spread is small) are overconfident. The standard error includes the drift of the
  mean between stretches of requests, measured on the window.
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
- A model change first drains the instance: its end is the fluid drain time or, when later, the
  end of the longest of the last k in flight (quantiles of the max of k lengths; heavy tails
  make the drain last much longer than its average work), then the swap time is added.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter, deque
from statistics import NormalDist

import numpy as np

from .groups import prompt_bucket

_N01 = NormalDist()
_erfc = np.frompyfunc(math.erfc, 1, 1)  # numpy has no erfc of its own
Key = tuple[str, str]


def _lognormal_params(mean: float, var: float) -> tuple[float, float]:
    """(mu, sigma) of the log-normal with this mean and variance."""
    s2 = math.log1p(var / (mean * mean))
    return math.log(mean) - s2 / 2, math.sqrt(s2)


class _LogNormal:
    """A class's prior: its partial moments E[L^k; L <= x], k = 0, 1, 2, and its quantiles."""

    def __init__(self, mu: float, sigma: float):
        self.mu, self.sigma = mu, sigma
        self.total = np.array([math.exp(k * mu + k * k * sigma**2 / 2) for k in range(3)])
        self._terms = tuple(zip(self.total.tolist(), (k * sigma / math.sqrt(2) for k in range(3)),
                                strict=True))

    def part(self, x: float) -> tuple[float, ...]:
        if x <= 0:
            return (0.0, 0.0, 0.0)
        if math.isinf(x):
            return tuple(self.total)
        z = (math.log(x) - self.mu) / (self.sigma * math.sqrt(2))
        return tuple(t * 0.5 * math.erfc(shift - z) for t, shift in self._terms)

    def parts(self, xs) -> np.ndarray:
        """Shape (3, len(xs)): part(x) for each x."""
        xs = np.asarray(xs, dtype=float)
        z = np.full(len(xs), -np.inf)
        z[xs > 0] = (np.log(xs[xs > 0]) - self.mu) / (self.sigma * math.sqrt(2))
        return np.array([t * 0.5 * _erfc(shift - z).astype(float) for t, shift in self._terms])

    def inverse(self, u: float) -> float:
        return math.exp(self.mu + self.sigma * _N01.inv_cdf(min(max(u, 1e-12), 1 - 1e-12)))


class _Window:
    """A key's completions, sorted, with prefix sums of L^k (k = 0, 1, 2) and its drift: built
    at its first read after a completion, kept while only the running requests change."""

    def __init__(self, raw: np.ndarray, drift: float | None):
        self.s, self.drift = np.sort(raw), drift
        self.sums = np.concatenate(
            (np.zeros((3, 1)), np.cumsum([np.ones_like(self.s), self.s, self.s**2], axis=1)),
            axis=1)


class _Table:
    """One key's output lengths, as masses: the window's completions, one each, and `weight`
    pseudo-observations of the prior (a class's: the log-normal; a band's: its class's
    lengths), and the running requests, each a censored observation (L > generated) of mass
    `kappa`, added by the product limit (Kaplan-Meier, read as Efron's redistribution to the
    right): a running request's mass goes to every length above what it has produced, in
    proportion to theirs. So every length above a censoring point c is lifted by
    (1 + mass at c / mass above c), and the lifts multiply: between censoring points the
    completions and the prior keep their shape, the running requests say how much of the
    distribution lies beyond them. Without it, the first completions (the short requests of
    a cohort: the long ones are still running) read as the lengths of all.

    part(x): the partial moments on [0, x], (data, prior), each (mass, sum of L, of L^2); the
    prior's per unit of weight. O(log n) per read; O(j log n) to build for j censoring points
    (the window's prefix sums are the window's), so a plan can rebuild it."""

    def __init__(self, window: _Window, prior, weight: float, censored: Counter, kappa: float):
        s, self.prior, self.drift = window.s, prior, window.drift
        self.s, self.sums, self.memo, self._parts, self._cw = s, window.sums, {}, {}, None
        self.b = np.array(sorted(censored), dtype=float)
        at = np.array([censored[g] for g in sorted(censored)], dtype=float)
        pe = prior.parts(self.b)
        below = np.searchsorted(s, self.b, "right")  # completions at or under each point
        # mass strictly above each censoring point before any is redistributed (the lifts
        # below it scale every length above it alike, so they cancel in its proportions)
        above = (len(s) - below + weight * (prior.total[0] - pe[0])
                 + kappa * (at.sum() - np.cumsum(at)))
        gain = np.divide(kappa * at, above, out=np.zeros(len(at)), where=above > 0)
        # lift[j]: on (b[j-1], b[j]]; lift[0] below the first point, lift[-1] above the last
        self.lift = np.concatenate(([1.0], np.cumprod(1.0 + gain)))
        # at the edges (0 and each point): the window's and the prior's partial moments,
        # unlifted (`*_at`) and lifted (`*_cum`)
        self.data_at = self.sums[:, np.concatenate(([0], below))]
        self.data_cum = self._lifted(self.data_at)
        self.prior_at = np.concatenate((np.zeros((3, 1)), pe), axis=1)
        self.prior_cum = self._lifted(self.prior_at)
        self.totals = (self._read(self.data_cum, self.data_at, len(self.b), self.sums[:, -1]),
                       self._read(self.prior_cum, self.prior_at, len(self.b), prior.total))
        # as lists, for one read at a time
        self._b, self._lift = self.b.tolist(), self.lift.tolist()
        self._rows = [a.T.tolist() for a in (self.data_cum, self.data_at, self.prior_cum,
                                             self.prior_at)]

    def _lifted(self, at: np.ndarray) -> np.ndarray:
        """Cumulative lifted mass at the edges, from the unlifted partial moments there."""
        return np.concatenate(
            (np.zeros((3, 1)), np.cumsum(self.lift[:-1] * np.diff(at, axis=1), axis=1)), axis=1)

    def _read(self, cum, at, j, here):
        """The lifted partial moments at a point of piece j whose unlifted ones are `here`."""
        return tuple((cum[:, j] + self.lift[j] * (here - at[:, j])).tolist())

    def part(self, x: float) -> tuple[tuple, tuple]:
        # a plan reads the same points again and again (each running request's output so
        # far, for its moments and several quantiles)
        if x not in self._parts:
            if len(self._parts) > 4096:
                self._parts.clear()
            self._parts[x] = self._part(x)
        return self._parts[x]

    def _part(self, x: float) -> tuple[tuple, tuple]:
        if math.isinf(x):
            return self.totals
        j = bisect.bisect_left(self._b, x)
        lift, (data_cum, data_at, prior_cum, prior_at) = self._lift[j], (r[j] for r in self._rows)
        here = self.sums[:, np.searchsorted(self.s, x, "right")].tolist()
        return (tuple(c + lift * (h - a) for c, h, a in zip(data_cum, here, data_at, strict=True)),
                tuple(c + lift * (h - a) for c, h, a in zip(prior_cum, self.prior.part(x),
                                                            prior_at, strict=True)))

    def parts(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """part(x) for each x, as two arrays of shape (3, len(xs))."""
        j = np.searchsorted(self.b, xs, "left")
        lift = self.lift[j]
        data = self.data_cum[:, j] + lift * (
            self.sums[:, np.searchsorted(self.s, xs, "right")] - self.data_at[:, j])
        prior = self.prior_cum[:, j] + lift * (self.prior.parts(xs) - self.prior_at[:, j])
        return data, prior

    def data_quantile(self, q: float, g: float) -> float:
        """q-quantile of the completions above g, interpolated between order statistics by
        their masses (with unit masses: at q * (n - 1), as numpy's default)."""
        s, last = self.s, len(self.s) - 1
        if self._cw is None:  # their cumulative masses, once a quantile is asked
            self._cw = np.concatenate(
                ([0.0], np.cumsum(self.lift[np.searchsorted(self.b, s, "left")])))
        cw = self._cw
        i0 = int(np.searchsorted(s, g, "right"))
        target = cw[i0] + q * (cw[last] - cw[i0])
        j = min(int(np.searchsorted(cw, target, "right")) - 1, last)
        if j >= last:
            return float(s[last])
        frac = (target - cw[j]) / (cw[j + 1] - cw[j])
        return float(s[j] + frac * (s[j + 1] - s[j]))

    def prior_quantile(self, q: float, g: float) -> float:
        """q-quantile of the lifted prior above g (a log-normal prior: a class's table)."""
        low, total = self.part(g)[1][0], self.totals[1][0]
        target = low + q * (total - low)
        cum = self.prior_cum[0]
        j = min(max(int(np.searchsorted(cum, target, "right")) - 1, 0), len(self._b))
        return self.prior.inverse(self.prior_at[0, j] + (target - cum[j]) / self._lift[j])


class _ClassPrior:
    """A band's prior: its class's lengths (completions, prior and running requests alike),
    normalized to mass 1."""

    def __init__(self, table: _Table, weight: float):
        data, prior = (np.array(t) for t in table.totals)
        self.table, self.weight = table, weight
        self.mass = data[0] + weight * prior[0]
        self.total = (data + weight * prior) / self.mass

    def part(self, x: float) -> tuple[float, ...]:
        data, prior = self.table.part(x)
        return tuple((d + self.weight * p) / self.mass for d, p in zip(data, prior, strict=True))

    def parts(self, xs) -> np.ndarray:
        data, prior = self.table.parts(xs)
        return (data + self.weight * prior) / self.mass


class OutputLengthStats:
    """Output tokens per (model, slo_class), and per prompt-length band within it: log-normal
    prior + window of recent completions + the running requests (censored: see _Table).

    Bands are the request groups' prompt buckets (powers of two): output length depends on the
    prompt (on the Azure conversation trace the mean output per band ranges from 68 to 341
    tokens, against 259 overall), and a group is of one band. A band's window is blended with
    its class's distribution as the prior, so a band with few completions reads its class."""

    def __init__(self, prior_mean=256.0, prior_std=256.0, prior_weight=20.0, window=1024):
        if prior_mean <= 0 or prior_std < 0 or prior_weight < 0 or window < 1:
            raise ValueError("need prior_mean > 0, prior_std >= 0, prior_weight >= 0, window >= 1")
        self.prior_weight = float(prior_weight)
        self._lognormal = _LogNormal(*_lognormal_params(prior_mean, max(prior_std, 1e-6) ** 2))
        self._window = window
        # keys: (model, class) and (model, class, band)
        self._samples: dict[tuple, deque] = {}
        self._seen: Counter = Counter()  # completions ever, per key
        # the running requests' output so far, per key: tokens -> requests
        self._censored: dict[tuple, Counter] = {}
        self._sorted: dict[tuple, _Table] = {}
        self._windows: dict[tuple, _Window] = {}
        self._bands: dict[Key, set[tuple]] = {}

    @staticmethod
    def band(prompt_tokens: float | None) -> int | None:
        """The band of a prompt of this many tokens (None: unknown)."""
        return None if prompt_tokens is None else prompt_bucket(round(prompt_tokens))

    def observe(self, model: str, slo_class: str, output_tokens: int,
                prompt_tokens: int | None = None) -> None:
        key = (model, slo_class)
        keys = [key]
        if prompt_tokens is not None:
            keys.append((model, slo_class, self.band(prompt_tokens)))
            self._bands.setdefault(key, set()).add(keys[1])
        for k in keys:
            self._samples.setdefault(k, deque(maxlen=self._window)).append(max(output_tokens, 0))
            self._seen[k] += 1
            self._windows.pop(k, None)
        self._invalidate(key)

    def set_running(self, batches) -> None:
        """The requests started and not finished now: (model, running) per instance, running
        as WaitingTimeEstimator.estimate takes it, (slo_class, generated, max_tokens[,
        context_tokens]) per request. Each is a censored observation of its class (and of its
        prompt's band where the context is known): L > generated. Replaces the previous set;
        a planner passes its snapshot's before it plans."""
        censored: dict[tuple, Counter] = {}
        for model, running in batches:
            for r, count in Counter(running).items():  # a batch has few kinds of request
                censored.setdefault((model, r[0]), Counter())[r[1]] += count
                if len(r) > 3 and r[3] is not None:
                    band = (model, r[0], self.band(r[3] - r[1]))
                    censored.setdefault(band, Counter())[r[1]] += count
        for k in self._censored.keys() | censored.keys():
            if self._censored.get(k) != censored.get(k):
                self._invalidate(k)
        self._censored = censored

    def _invalidate(self, key: tuple) -> None:
        """Forget a key's table; a class's bands too: the class is their prior."""
        self._sorted.pop(key, None)
        for k in self._bands.get(key, ()) if len(key) == 2 else ():
            self._sorted.pop(k, None)

    def count(self, model: str, slo_class: str, band: int | None = None) -> int:
        """Completions seen of the class, or of one band of it."""
        key = (model, slo_class) if band is None else (model, slo_class, band)
        return len(self._samples.get(key, ()))

    def _key(self, model: str, slo_class: str, band: int | None) -> tuple:
        """The band's key when it has completions, else the class's."""
        if band is not None and (model, slo_class, band) in self._samples:
            return (model, slo_class, band)
        return (model, slo_class)

    # completions per block when measuring drift, and the fewest blocks that measure it
    DRIFT_BLOCK, DRIFT_BLOCKS = 64, 4

    def _table(self, key: tuple) -> _Table:
        if key not in self._sorted:
            if key not in self._windows:
                raw = np.asarray(self._samples.get(key, ()), dtype=float)
                self._windows[key] = _Window(raw, self._drift(raw))
            window = self._windows[key]
            prior = (self._lognormal if len(key) == 2
                     else _ClassPrior(self._table(key[:2]), self.prior_weight))
            # the window stands for every completion seen, the running requests for
            # themselves: together they are every request started (a cohort), whose product
            # limit is unbiased; in steady state the window alone is too, and the running
            # requests' weight fades as completions outnumber the window
            n = len(window.s)
            kappa = min(1.0, n / self._seen[key]) if self._seen[key] else 1.0
            self._sorted[key] = _Table(window, prior, self.prior_weight,
                                       self._censored.get(key, Counter()), kappa)
        return self._sorted[key]

    def _drift(self, raw: np.ndarray) -> float | None:
        """How far the mean length of a stretch of requests strays from the window's, relative
        to it: the spread of the window's block means beyond what sampling explains (None: too
        few completions to tell). Traces drift (on the Azure conversation trace the means of
        100 consecutive requests spread 2.3x more than independent lengths would), and a batch
        of requests that arrived together shares its stretch's mean: an error no larger window
        averages away."""
        k = self.DRIFT_BLOCK
        blocks = len(raw) // k
        if blocks < self.DRIFT_BLOCKS:
            return None
        means = raw[len(raw) - blocks * k:].reshape(blocks, k).mean(axis=1)
        between = means.var(ddof=1) - raw.var() / k
        mean = raw.mean()
        return math.sqrt(between) / mean if between > 0 and mean > 0 else 0.0

    def _memo(self, key: tuple, args: tuple, compute):
        """Answers are cached until the key's table changes: a planner asks many times."""
        memo = self._table(key).memo
        if args not in memo:
            if len(memo) > 4096:
                memo.clear()
            memo[args] = compute(*args)
        return memo[args]

    def moments(self, model, slo_class, cap=None, generated=0, band=None) -> tuple[float, float]:
        """Mean and variance of the tokens still to come, min(L, cap) - generated, for a request
        that has produced `generated` tokens (so L > generated); E[min(L, cap)] for a new one.
        band: its prompt's (see band()), None: its class's as a whole."""
        return self._moments_se(model, slo_class, cap, generated, band)[:2]

    def standard_error(self, model, slo_class, cap=None, generated=0, band=None) -> float:
        """How far the estimated mean of min(L, cap) - generated may be off for the requests
        arriving now: sampling error of the window, the pull of the prior (its
        pseudo-observations times its distance from the data), and the drift of the mean."""
        return self._moments_se(model, slo_class, cap, generated, band)[2]

    def _moments_se(self, model, slo_class, cap, generated, band) -> tuple[float, float, float]:
        key = self._key(model, slo_class, band)
        return self._memo(key, ("m", cap, generated), lambda _, c, g: self._compute(key, c, g))

    def _compute(self, key: tuple, cap, generated) -> tuple[float, float, float]:
        c, g = (math.inf if cap is None else float(cap)), float(generated)
        t = self._table(key)
        drift = t.drift if t.drift is not None or len(key) == 2 else self._table(key[:2]).drift
        if c <= g:
            return 0.0, 0.0, 0.0
        (dg, pg), (dc, pc), (dt, pt) = t.part(g), t.part(c), t.totals
        cut = 0.0 if math.isinf(c) else c
        # E[min(L, c)^k; L > g], k = 1, 2, of the completions and of the prior (weight 1)
        data = [dc[k] - dg[k] + cut**k * (dt[0] - dc[0]) for k in (1, 2)]
        prior = [pc[k] - pg[k] + cut**k * (pt[0] - pc[0]) for k in (1, 2)]
        w, n, p_above = self.prior_weight, dt[0] - dg[0], pt[0] - pg[0]
        mass = w * p_above + n
        if mass <= 1e-12:
            return 0.0, 0.0, 0.0
        m1, m2 = ((w * p + d) / mass for p, d in zip(prior, data, strict=True))
        var = max(m2 - m1 * m1, 0.0)
        pull = (w * p_above / mass * (prior[0] / p_above - data[0] / n)
                if n > 0 and p_above > 0 else 0.0)
        shift = (drift or 0.0) * (m1 - g)
        return float(m1 - g), float(var), math.sqrt(var / mass + pull * pull + shift * shift)

    def mean(self, model: str, slo_class: str, cap: int | None = None, band=None) -> float:
        return self.moments(model, slo_class, cap, band=band)[0]

    def variance(self, model: str, slo_class: str, cap: int | None = None, band=None) -> float:
        return self.moments(model, slo_class, cap, band=band)[1]

    def quantile(self, model, slo_class, q: float, cap=None, generated=0, band=None) -> float:
        """q-quantile of min(L, cap) - generated given L > generated: from the window once its
        mass above `generated` outweighs the prior's pseudo-observations there, else from
        the prior (a band's: its class's). Each side's mass includes what the running
        requests lift onto it; the two are not blended (a drain asks for many quantiles)."""
        key = self._key(model, slo_class, band)
        return self._memo(key, (q, cap, generated), lambda *a: self._quantile(key, *a))

    def _quantile(self, key: tuple, q: float, cap, generated) -> float:
        t, g = self._table(key), float(generated)
        (dg, pg), (dt, pt) = t.part(g), t.totals
        n = dt[0] - dg[0]
        if n > 0 and n >= self.prior_weight * (pt[0] - pg[0]):
            x = t.data_quantile(q, g)
        elif len(key) == 3:
            return self.quantile(*key[:2], q, cap, generated)
        else:
            x = t.prior_quantile(q, g)
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

    def kv_capacity(self, worker: str, model: str) -> float:
        """Tokens its KV cache holds (0: unknown, not a limit)."""
        return float(getattr(self.profile(worker, model), "kv_capacity_tokens", 0) or 0)

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
    """Work of consecutive groups of one model, in one slot's seconds (per-sequence time).

    batch: the sequences that run at once (what sets the completion rate); slots: the most the
    engine runs (max_running); kv_cap: its KV cache in tokens (0: not modelled, when what the
    running requests hold is unknown)."""

    def __init__(self, batch: int, slots: int | None = None, kv_cap: float = 0.0):
        self.batch, self.n, self.prefill = batch, 0, 0.0
        self.slots, self.kv_cap = slots or batch, kv_cap
        self.mean = self.var = self.left = self.left_var = 0.0  # left: running ones' remainder
        self.kv = self.kv_var = 0.0  # KV cache its requests hold (mean, variance), tokens
        self.kv_se: dict[Key, float] = {}  # and the error of the learned means, per key
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
        self.kv_se[key] = self.kv_se.get(key, 0.0) + count * kv[2]
        self.se[key] = self.se.get(key, 0.0) + count * se
        if member not in self.members:
            self.members[member] = None
            self._order.append(member)

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
        shared = dict(self.kv_se)
        shared[need[2]] = shared.get(need[2], 0.0) + need[3]
        sd = math.sqrt(self.kv_var + need[1] + sum(v * v for v in shared.values()))
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
              ready_s: float = 0.0, cold_s=None):
        """An empty virtual queue of `worker` with `model` loaded and `running` in its batch,
        to be filled one group at a time (QueueWaits): what a plan generator needs to try a
        group at the end of every queue without re-estimating the whole queue. cold_s: model
        -> its load time for the models the worker does not hold warm (swap_s: the others)."""
        return QueueWaits(self, worker, model, running, swap_s, ready_s, cold_s)


class QueueWaits:
    """The estimator's state along one virtual queue; `next_wait(g)` is the wait of group g if
    it came next, `append(g)` puts it there."""

    def __init__(self, est: WaitingTimeEstimator, worker: str, model, running, swap_s: float,
                 ready_s: float = 0.0, cold_s=None):
        self.est, self.worker, self.loaded, self.swap_s = est, worker, model, swap_s
        # a model's first load is cold (from disk: 30 s for a 7B where a warm one takes 1 s);
        # once loaded it stays warm, so only the first swap to it along the queue pays that
        self.cold_s = dict(cold_s or {})
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
        self.queued = 0
        self._drained = None  # the drain of `seg`, computed once per segment
        # identical requests (same class, progress, cap and context) are estimated once
        kinds = Counter((*r[:3], r[3] if len(r) > 3 else None) for r in running)
        if model is None:
            kinds.clear()
        # a running request's prompt is its context less its output so far
        left = {r: (ls.band(r[3] - r[1]) if r[3] is not None else None,
                    *ls.moments(model, r[0], r[2], r[1],
                                ls.band(r[3] - r[1]) if r[3] is not None else None))
                for r in kinds}
        # what the batch holds in KV cache: each request its context and the output still to
        # come (the engine reserves it; paged, it grows there). When that is the limit, fewer
        # than max_running fit: a request waits for KV with slots free
        known = all(r[3] is not None for r in kinds)  # else KV is not modelled on this segment
        if model is None:
            self.seg = _Segment(1)
        else:
            n = sum(kinds.values())
            kv = sum(k * (r[3] + left[r][1]) for r, k in kinds.items()) if known and n else 0
            self.seg = _Segment(tp.batch(worker, model, kv / n if kv else None),
                                tp.batch(worker, model),
                                tp.kv_capacity(worker, model) if known else 0.0)
        w = 1 / self.seg.batch
        for (cls, generated, cap, c), count in kinds.items():
            band, lm, lv = left[(cls, generated, cap, c)]
            step = tp.step_s(worker, model, self.seg.batch)
            m, v = ls.moments(model, cls, cap, band=band)
            se = ls.standard_error(model, cls, cap, band=band)
            mix = (w * lm + (1 - w) * m) * step, (w * lv + (1 - w) * m * m) * step**2
            self.seg.add(
                (model, cls),
                count,
                *mix,
                se * step,
                (step, model, cls, cap, generated, band),
                (lm * step, lv * step**2),
                ((c + lm, lv, ls.standard_error(model, cls, cap, generated, band))
                 if self.seg.kv_cap else (0.0, 0.0, 0.0)),
            )

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

    def next_wait(self, g) -> WaitEstimate:
        if g.model != self.loaded:
            base_mean, base_var, base_se, swaps = self._after_change(g.model)
            return self._wait(base_mean, base_var, base_se, swaps, _Segment(1), ((1.0, 0.0),))
        return self._wait(self.base_mean, self.base_var, self.base_se, self.swaps, self.seg,
                          self.seg.slot_frac(self._kv_need(g)))

    def _kv_need(self, g) -> tuple | None:
        """KV cache one request of g holds, (mean, variance, key, se): its prompt and its
        output."""
        if not self.seg.kv_cap:
            return None
        q, ls = max(g.queued, 1), self.est.lengths
        cap, band = g.max_tokens / q if g.max_tokens else None, group_band(ls, g)
        m, v = ls.moments(g.model, g.slo_class, cap, band=band)
        return (g.prompt_tokens / q + m, v, (g.model, g.slo_class),
                ls.standard_error(g.model, g.slo_class, cap, band=band))

    def _wait(self, base_mean, base_var, base_se, swaps, seg, cases) -> WaitEstimate:
        """The wait given when g starts (`cases`, see slot_frac); several cases make a mixture,
        given by its mean and variance."""
        if len(cases) == 1:  # the common case, in a planner's inner loop
            f = cases[0][1]
            shared = sum(
                (base_se.get(k, 0.0) + f * seg.se.get(k, 0.0)) ** 2
                for k in base_se.keys() | seg.se.keys()
            )
            fixed = swaps + (seg.prefill if f or self.chunked else 0.0)
            return WaitEstimate(base_mean + fixed + f * seg.mean,
                                math.sqrt(base_var + f * seg.var / seg.batch + shared),
                                fixed, self.est.tail)
        mean = second = 0.0
        for p, f in cases:
            shared = sum(
                (base_se.get(k, 0.0) + f * seg.se.get(k, 0.0)) ** 2
                for k in base_se.keys() | seg.se.keys()
            )
            m = (seg.prefill if f or self.chunked else 0.0) + f * seg.mean
            mean += p * m
            second += p * (f * seg.var / seg.batch + shared + m * m)
        # the prefill is a sure delay only when every case waits
        fixed = swaps + (seg.prefill if self.chunked or min(f for _, f in cases) else 0.0)
        return WaitEstimate(
            base_mean + swaps + mean,
            math.sqrt(max(base_var + second - mean * mean, 0.0)),
            fixed,
            self.est.tail,
        )

    def append(self, g) -> None:
        tp, ls = self.est.throughput, self.est.lengths
        if g.model != self.loaded:  # drain everything ahead, then swap
            self.base_mean, self.base_var, self.base_se, self.swaps = self._after_change(g.model)
            self.cold_s.pop(g.model, None)
            self.loaded, self.seg = g.model, _Segment(
                tp.batch(self.worker, g.model), None, tp.kv_capacity(self.worker, g.model))
        self._drained = None
        q = max(g.queued, 0)
        if q == 0:
            return
        self.queued += q
        seg, worker = self.seg, self.worker
        cap = g.max_tokens / q if g.max_tokens else None  # the average cap stands for each
        band = group_band(ls, g)
        m, v = ls.moments(g.model, g.slo_class, cap, band=band)
        b = tp.batch(worker, g.model, g.prompt_tokens / q + (cap or m))
        seg.batch, step = min(seg.batch, b), tp.step_s(worker, g.model, b)
        se = ls.standard_error(g.model, g.slo_class, cap, band=band)
        seg.add(
            (g.model, g.slo_class),
            q,
            m * step,
            v * step**2,
            se * step,
            (step, g.model, g.slo_class, cap, 0, band),
            kv=(g.prompt_tokens / q + m, v, se),
        )
        seg.prefill += g.prompt_tokens * tp.prefill_s_per_token(worker, g.model)


def group_band(lengths: OutputLengthStats, g) -> int | None:
    """The prompt band of a group's requests (None: its prompts are not known)."""
    return lengths.band(g.prompt_tokens / g.queued) if g.prompt_tokens > 0 and g.queued else None


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
