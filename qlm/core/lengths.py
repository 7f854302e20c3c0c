"""Output lengths per (model, SLO class) and prompt band, learned online: what the waiting-time
estimator (estimator.py) needs of them, means and variances of min(L, cap) and of the tokens
still to come for a request that has produced some. Choices beyond the paper:

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
- Parameter uncertainty: the learned mean is off by its standard error for every request of a
  key at once, so it adds (requests * se)^2 to the variance; without it long queues (whose
  relative spread is small) are overconfident. The standard error includes the drift of the
  mean between stretches of requests, measured on the window.
"""

from __future__ import annotations

import bisect
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
        self._known: dict[float, list] = {}

    def part(self, x: float) -> tuple[float, ...]:
        if x <= 0:
            return (0.0, 0.0, 0.0)
        if math.isinf(x):
            return tuple(self.total)
        z = (math.log(x) - self.mu) / (self.sigma * math.sqrt(2))
        return tuple(t * 0.5 * math.erfc(shift - z) for t, shift in self._terms)

    def parts(self, xs) -> np.ndarray:
        """Shape (3, len(xs)): part(x) for each x. Remembered per x: a class's prior is fixed,
        and its table is rebuilt every plan at much the same points (outputs so far)."""
        known = self._known
        new = [x for x in dict.fromkeys(xs) if x not in known]
        if new:
            if len(known) > 65536:
                known.clear()
            xa = np.asarray(new, dtype=float)
            z = np.full(len(xa), -np.inf)
            z[xa > 0] = (np.log(xa[xa > 0]) - self.mu) / (self.sigma * math.sqrt(2))
            cols = np.array([t * 0.5 * _erfc(shift - z).astype(float) for t, shift in self._terms])
            known.update(zip(new, cols.T.tolist(), strict=True))
        return np.array([known[x] for x in xs], dtype=float).reshape(-1, 3).T

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
        self.s, self.sums, self._parts, self._cw = s, window.sums, {}, None
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
        self._running_at = -math.inf  # when the running set was last taken
        self._sorted: dict[tuple, _Table] = {}
        self._windows: dict[tuple, _Window] = {}
        self._bands: dict[Key, set[tuple]] = {}
        # answers, until any table changes: a planner asks the same ones many times, and each
        # plan's running set changes some table anyway
        self._answers: dict[tuple, object] = {}

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

    # seconds a running set stands for the next ones (see set_running)
    RUNNING_REFRESH_S = 1.0

    def set_running(self, batches, now_s: float | None = None) -> None:
        """The requests started and not finished now: (model, running) per instance, running
        as WaitingTimeEstimator.estimate takes it, (slo_class, generated, max_tokens[,
        context_tokens]) per request. Each is a censored observation of its class (and of its
        prompt's band where the context is known): L > generated. Replaces the previous set;
        a planner passes its snapshot's before it plans. With now_s, a set taken less than
        RUNNING_REFRESH_S earlier stands: every step moves every running request, so a new set
        rebuilds every table, while a second's progress barely moves the estimates (on the
        modern scenario, rebuilding every plan took more of a plan's time than the rest)."""
        if now_s is not None:
            if now_s - self._running_at < self.RUNNING_REFRESH_S:
                return
            self._running_at = now_s
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
        self._answers.clear()
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

    def cached(self, args: tuple, compute):
        """compute() for these args, remembered until any table changes (args must say
        everything the answer depends on besides the tables)."""
        answer = self._answers.get(args)
        if answer is None:
            if len(self._answers) > 65536:
                self._answers.clear()
            answer = self._answers[args] = compute()
        return answer

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
        return self.cached(("m", model, slo_class, cap, generated, band), lambda: tuple(
            self.remaining_many(model, slo_class, cap, (generated,), band)[:, 0].tolist()))

    def remaining_many(self, model, slo_class, cap, generated, band=None) -> np.ndarray:
        """(mean, variance, standard error) of the tokens still to come for requests of one
        class and cap that have produced `generated` (a sequence) tokens: the moments() and
        standard_error() of each, at once (a batch has a request of each progress, and its
        tables change every plan). Shape (3, len(generated))."""
        key = self._key(model, slo_class, band)
        c, g = (math.inf if cap is None else float(cap)), np.asarray(generated, dtype=float)
        t = self._table(key)
        drift = t.drift if t.drift is not None or len(key) == 2 else self._table(key[:2]).drift
        (dg, pg), (dc, pc), (dt, pt) = t.parts(g), t.part(c), t.totals
        cut = 0.0 if math.isinf(c) else c
        # E[min(L, c)^k; L > g], k = 1, 2, of the completions and of the prior (weight 1)
        data = [dc[k] - dg[k] + cut**k * (dt[0] - dc[0]) for k in (1, 2)]
        prior = [pc[k] - pg[k] + cut**k * (pt[0] - pc[0]) for k in (1, 2)]
        w, n, p_above = self.prior_weight, dt[0] - dg[0], pt[0] - pg[0]
        mass = w * p_above + n
        ok = (mass > 1e-12) & (g < c)
        mass = np.where(ok, mass, 1.0)
        m1, m2 = ((w * p + d) / mass for p, d in zip(prior, data, strict=True))
        var = np.maximum(m2 - m1 * m1, 0.0)
        both = ok & (n > 0) & (p_above > 0)
        pull = np.zeros(len(g))
        pull[both] = (w * p_above[both] / mass[both]
                      * (prior[0][both] / p_above[both] - data[0][both] / n[both]))
        shift = (drift or 0.0) * (m1 - g)
        se = np.sqrt(var / mass + pull * pull + shift * shift)
        return np.where(ok, np.array([m1 - g, var, se]), 0.0)

    def mean(self, model: str, slo_class: str, cap: int | None = None, band=None) -> float:
        return self.moments(model, slo_class, cap, band=band)[0]

    def variance(self, model: str, slo_class: str, cap: int | None = None, band=None) -> float:
        return self.moments(model, slo_class, cap, band=band)[1]

    def done_within(self, model, slo_class, cap, generated, more: float, band=None) -> np.ndarray:
        """P(a request that has produced `generated` tokens ends within `more` tokens), for
        requests of one class and cap (generated: a sequence)."""
        key = self._key(model, slo_class, band)
        t, w = self._table(key), self.prior_weight
        g = np.asarray(generated, dtype=float)
        end = g + more if cap is None else np.minimum(g + more, float(cap))
        (dg, pg), (de, pe) = t.parts(g), t.parts(end)
        below = w * pg[0] + dg[0]
        above = w * t.totals[1][0] + t.totals[0][0] - below
        p = np.divide(w * pe[0] + de[0] - below, above, out=np.ones(len(g)),
                      where=above > 1e-12)
        if cap is not None:
            p[end >= float(cap)] = 1.0
        return np.clip(p, 0.0, 1.0)

    def quantile(self, model, slo_class, q: float, cap=None, generated=0, band=None) -> float:
        """q-quantile of min(L, cap) - generated given L > generated: from the window once its
        mass above `generated` outweighs the prior's pseudo-observations there, else from
        the prior (a band's: its class's). Each side's mass includes what the running
        requests lift onto it; the two are not blended (a drain asks for many quantiles)."""
        return self.cached((q, model, slo_class, cap, generated, band), lambda: self._quantile(
            self._key(model, slo_class, band), q, cap, generated))

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


def group_band(lengths: OutputLengthStats, g) -> int | None:
    """The prompt band of a group's requests (None: its prompts are not known)."""
    return lengths.band(g.prompt_tokens / g.queued) if g.prompt_tokens > 0 and g.queued else None
