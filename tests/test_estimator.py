"""Request waiting time estimator: length statistics, instance throughput, waits, coverage."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np
import pytest

from qlm.core.estimator import (
    Calibration,
    InstanceThroughput,
    QueuedGroup,
    WaitEstimate,
    WaitingTimeEstimator,
)
from qlm.core.lengths import OutputLengthStats

Z95 = NormalDist().inv_cdf(0.95)


@dataclasses.dataclass(frozen=True)
class Profile:  # the fields of SimProfile the estimator reads
    max_running: int = 1
    prefill_ms_per_token: float = 0.0
    decode_step_ms: float = 20.0
    decode_ms_per_seq: float = 0.0
    kv_capacity_tokens: int = 1 << 30
    max_batched_tokens: int = 0


def estimator(stats=None, profile=None, **kw) -> WaitingTimeEstimator:
    return WaitingTimeEstimator(
        stats or OutputLengthStats(), InstanceThroughput(profile or Profile()), **kw
    )


def lognormal(rng, n):  # median 100 tokens, sigma 1.5: mean ~310, 99th percentile ~3300
    return np.exp(np.log(100.0) + 1.5 * rng.standard_normal(n))


def pareto(rng, n):  # tail index 1.5: infinite variance before the max_tokens cap
    return 30.0 * (1.0 + rng.pareto(1.5, n))


# --- output lengths --------------------------------------------------------------------------


def test_prior_is_used_before_any_observation():
    s = OutputLengthStats(prior_mean=300, prior_std=150, prior_weight=10)
    assert s.count("m", "chat") == 0
    assert s.mean("m", "chat") == pytest.approx(300)
    assert s.variance("m", "chat") == pytest.approx(150**2)
    # The prior is log-normal: its median is below its mean.
    assert s.quantile("m", "chat", 0.5) < 300 < s.quantile("m", "chat", 0.9)
    s.observe("m", "other", 5)  # another class does not move it
    assert s.mean("m", "chat") == pytest.approx(300)


def test_mean_and_variance_converge_to_the_observed_distribution():
    rng = np.random.default_rng(1)
    s = OutputLengthStats(prior_mean=600, prior_std=100, prior_weight=20, window=8192)
    xs = rng.normal(300, 50, 8000).round().astype(int)
    errors = []
    for n in (10, 100, 1000, 8000):
        for x in xs[s.count("m", "c") : n]:
            s.observe("m", "c", int(x))
        errors.append((abs(s.mean("m", "c") - 300), abs(math.sqrt(s.variance("m", "c")) - 50)))
    assert s.count("m", "c") == 8000
    assert errors == sorted(errors, reverse=True)  # the prior's pull fades as data comes in
    assert errors[-1][0] < 2 and errors[-1][1] < 3
    assert s.quantile("m", "c", 0.95) == pytest.approx(300 + Z95 * 50, abs=4)


def test_window_follows_drift():
    s = OutputLengthStats(prior_weight=0, window=100)
    for _ in range(100):
        s.observe("m", "c", 1000)
    for _ in range(100):
        s.observe("m", "c", 10)
    assert s.mean("m", "c") == 10


def test_max_tokens_truncates_the_expected_output():
    rng = np.random.default_rng(2)
    samples = lognormal(rng, 1000).astype(int)
    s = OutputLengthStats(prior_weight=0)
    for x in samples:
        s.observe("m", "c", int(x))
    full, capped = s.mean("m", "c"), s.mean("m", "c", cap=200)
    assert capped < full
    assert capped == pytest.approx(np.minimum(samples, 200).mean())
    assert s.variance("m", "c", cap=200) == pytest.approx(np.minimum(samples, 200).var())
    assert s.quantile("m", "c", 0.99, cap=200) == 200


def test_prior_truncation_matches_monte_carlo():
    s = OutputLengthStats(prior_mean=300, prior_std=600, prior_weight=10)
    mu, sigma = math.log(300) - math.log1p(4) / 2, math.sqrt(math.log1p(4))
    draws = np.minimum(np.exp(mu + sigma * np.random.default_rng(3).standard_normal(400_000)), 500)
    assert s.mean("m", "c", cap=500) == pytest.approx(draws.mean(), rel=0.01)
    assert s.variance("m", "c", cap=500) == pytest.approx(draws.var(), rel=0.02)


def test_remaining_tokens_of_a_running_request():
    rng = np.random.default_rng(4)
    s = OutputLengthStats(prior_weight=0)
    for x in lognormal(rng, 2000):
        s.observe("m", "c", int(x))
    fresh = s.moments("m", "c")[0]
    # Heavy tail: the longer a request has run, the longer it is expected to keep running.
    assert s.moments("m", "c", generated=500)[0] > fresh
    # ... but never past its cap.
    left, var = s.moments("m", "c", cap=600, generated=500)
    assert 0 < left <= 100 and var > 0
    assert s.moments("m", "c", cap=600, generated=600) == (0.0, 0.0)
    assert 0 < s.quantile("m", "c", 0.9, cap=600, generated=500) <= 100


def test_standard_error_shrinks_with_data_and_grows_with_a_wrong_prior():
    rng = np.random.default_rng(5)
    xs = rng.normal(300, 50, 2000).astype(int)
    few, many = OutputLengthStats(prior_mean=300), OutputLengthStats(prior_mean=300)
    wrong = OutputLengthStats(prior_mean=3000, prior_weight=20)
    for x in xs[:50]:
        few.observe("m", "c", int(x))
        wrong.observe("m", "c", int(x))
    for x in xs:
        many.observe("m", "c", int(x))
    assert many.standard_error("m", "c") < few.standard_error("m", "c")
    assert wrong.standard_error("m", "c") > 3 * few.standard_error("m", "c")


# --- running requests: censored observations of the lengths ----------------------------------


def kaplan_meier_mean(exact, censored) -> float:
    """E[L] by the product limit, the textbook way (an event at t comes before a censoring at
    t; the longest observation is exact, so the estimate is a proper distribution)."""
    exact, censored = np.asarray(exact), np.asarray(censored)
    survival, mean = 1.0, 0.0
    for t in np.unique(exact):
        at_risk = (exact >= t).sum() + (censored >= t).sum()
        after = survival * (1 - (exact == t).sum() / at_risk)
        mean += t * (survival - after)
        survival = after
    return mean


def test_running_requests_are_censored_observations_by_the_product_limit():
    rng = np.random.default_rng(11)
    exact = rng.integers(10, 400, 60)
    censored = rng.integers(10, 300, 40)  # still running: each L > what it has produced
    s = OutputLengthStats(prior_weight=0)
    for x in exact:
        s.observe("m", "c", int(x))
    s.set_running([("m", [("c", int(g), None) for g in censored])])
    assert s.mean("m", "c") == pytest.approx(kaplan_meier_mean(exact, censored))
    assert s.mean("m", "c") > exact.mean()  # the running ones are the longer ones
    # a request that has produced g: the same estimate, conditioned on L > g
    g = 200
    kept = censored[censored > g]
    assert s.moments("m", "c", generated=g)[0] == pytest.approx(
        kaplan_meier_mean(exact[exact > g], kept) - g)


def test_no_running_requests_leave_the_window_as_it_was():
    rng = np.random.default_rng(12)
    xs = lognormal(rng, 500).astype(int)
    plain, s = OutputLengthStats(), OutputLengthStats()
    for x in xs:
        plain.observe("m", "c", int(x))
        s.observe("m", "c", int(x))
    s.set_running([("m", [("c", 3000, None)] * 50)])
    assert s.mean("m", "c") > plain.mean("m", "c")
    s.set_running([])  # they finished: the next plan's snapshot has none
    for g in (0, 100, 1000):
        assert s.moments("m", "c", generated=g) == plain.moments("m", "c", generated=g)
        for q in (0.1, 0.5, 0.95):
            assert s.quantile("m", "c", q, generated=g) == plain.quantile("m", "c", q, generated=g)
    # quantiles of the window above g interpolate its order statistics, as numpy does
    above = np.sort(xs[xs > 100]).astype(float)
    for q in (0.2, 0.8):
        assert plain.quantile("m", "c", q, generated=100) == pytest.approx(
            np.quantile(above, q) - 100)


def test_censoring_lifts_every_estimate_and_never_below_what_was_generated():
    rng = np.random.default_rng(13)
    plain, s = OutputLengthStats(), OutputLengthStats()
    for x in rng.integers(20, 120, 200):  # the learned mean is ~70
        plain.observe("m", "c", int(x))
        s.observe("m", "c", int(x))
    s.set_running([("m", [("c", int(g), None) for g in (5, 80, 150, 150, 600, 900)])])
    for g in (0, 50, 100, 150, 500, 2000):
        for cap in (None, 100, 700):
            left, base = s.moments("m", "c", cap, g)[0], plain.moments("m", "c", cap, g)[0]
            assert left >= base - 1e-9 and left >= 0.0
            for q in (0.5, 0.95):
                x = s.quantile("m", "c", q, cap, g)
                assert x >= plain.quantile("m", "c", q, cap, g) - 1e-9 and x >= 0.0
    # a request past the learned mean: others have run far longer, so it may too
    assert s.moments("m", "c", generated=150)[0] > plain.moments("m", "c", generated=150)[0]


def test_running_requests_count_for_less_once_completions_outnumber_the_window():
    # the window stands for every completion seen; in steady state it is unbiased, and the
    # running requests (a length-biased sample: long ones run longest) should not skew it
    fresh, steady = OutputLengthStats(window=100), OutputLengthStats(window=100)
    for i in range(1000):
        if i >= 900:
            fresh.observe("m", "c", 50 + i % 100)
        steady.observe("m", "c", 50 + i % 100)
    base = steady.mean("m", "c")
    assert fresh.mean("m", "c") == base
    running = [("m", [("c", 300, None)] * 50)]
    fresh.set_running(running)
    steady.set_running(running)
    assert 0 < steady.mean("m", "c") - base < 0.2 * (fresh.mean("m", "c") - base)


def test_a_cohort_with_no_completions_yet_is_not_estimated_as_short():
    # 100 requests started together and every one has produced 400 tokens: none is done, so
    # the lengths of this cohort are all over 400, whatever the prior's mean (256)
    s = OutputLengthStats()
    s.set_running([("m", [("c", 400, None)] * 100)])
    assert s.mean("m", "c") > 400
    assert s.quantile("m", "c", 0.5) > 400
    # ... and the first completions of a cohort are its short requests: lengths ~ log-normal
    # (mean ~310), all started at once, 1 token per step; 150 steps in, 58 % have finished
    rng = np.random.default_rng(14)
    lengths = np.maximum(lognormal(rng, 400), 1).astype(int)
    done, running = lengths[lengths <= 150], lengths[lengths > 150]
    naive, s = OutputLengthStats(), OutputLengthStats()
    for x in done:
        naive.observe("m", "c", int(x))
        s.observe("m", "c", int(x))
    s.set_running([("m", [("c", 150, None)] * len(running))])
    # how far past 150 the running ones go is the prior's guess (its tail is lighter here),
    # but that 42 % of the cohort is past 150 is known
    true = lengths.mean()
    assert naive.mean("m", "c") < 0.3 * true < 0.6 * true < s.mean("m", "c") < true
    assert s.quantile("m", "c", 0.5, generated=100) > 150 > naive.quantile(
        "m", "c", 0.5, generated=100)


def test_running_requests_past_the_learned_mean_make_the_batch_hold_more_kv():
    # completions so far ~50 tokens; the batch's requests have produced 100 (past that mean)
    # and 600: the one at 100 is likely to run much longer than 50 more, and the KV the batch
    # holds (its contexts and the output still to come) keeps a 2,000-token prompt waiting
    s = OutputLengthStats(prior_weight=5)
    for x in range(30, 70):
        s.observe("m", "c", x)
    est = estimator(s, Profile(max_running=16, decode_step_ms=10, kv_capacity_tokens=12_000))
    running = [("c", 100, None, 1100)] * 4 + [("c", 600, None, 1600)] * 4
    before = s.moments("m", "c", generated=100)[0]
    blind = est.estimate("w", queue(1, prompt=2000), running=running)[0]
    s.set_running([("m", running)])
    assert s.moments("m", "c", generated=100)[0] > 2 * before
    aware = est.estimate("w", queue(1, prompt=2000), running=running)[0]
    assert aware.mean > blind.mean and aware.quantile(Z95) > blind.quantile(Z95)


def test_running_requests_of_a_band_lift_that_band():
    s = OutputLengthStats(prior_weight=10)
    for _ in range(50):
        s.observe("m", "c", 40, prompt_tokens=100)
        s.observe("m", "c", 40, prompt_tokens=3000)
    short, long_ = s.band(100), s.band(3000)
    s.set_running([("m", [("c", 500, None, 3000 + 500)] * 50)])  # long prompts, running long
    assert s.mean("m", "c", band=long_) > 3 * s.mean("m", "c", band=short)
    assert s.mean("m", "c", band=short) < s.mean("m", "c")  # the class moved less
    # a band with no running requests of its own: its completions and its class, blended
    assert s.mean("m", "c", band=short) == pytest.approx((50 * 40 + 10 * s.mean("m", "c")) / 60)
    # a table reads its lifted prior at many points at once (a band's, at its own censoring
    # points) as it does at one
    table = s._table(("m", "c", long_))
    xs = np.array([0.0, 40.0, 100.0, 500.0, 501.0, 5000.0])
    many = table.parts(xs)
    for i, x in enumerate(xs):
        for got, want in zip((many[0][:, i], many[1][:, i]), table.part(x), strict=True):
            assert got == pytest.approx(want)



@pytest.mark.parametrize("cap", [None, 300])
def test_remainders_of_a_batch_at_once_are_those_of_the_completions(cap):
    rng = np.random.default_rng(3)
    lengths = np.round(lognormal(rng, 200))  # under 4 blocks of 64: no drift term
    s = OutputLengthStats(prior_weight=0)
    for x in lengths:
        s.observe("m", "c", int(x))
    generated = [0, 3, 40, 40, 250, 299, 300, 2000]
    many = s.remaining_many("m", "c", cap, generated)
    for i, g in enumerate(generated):
        above = lengths[lengths > g]
        if cap is not None and g >= cap or not len(above):
            assert many[:, i].tolist() == [0.0, 0.0, 0.0]
            continue
        rest = (above if cap is None else np.minimum(above, cap)) - g
        want = (rest.mean(), rest.var(), math.sqrt(rest.var() / len(above)))
        assert many[:, i] == pytest.approx(want, rel=1e-9)
        assert s.moments("m", "c", cap, g) == pytest.approx(want[:2], rel=1e-9)
    # and the chance each ends within k more tokens
    for k in (1, 25, 400):
        ends = s.done_within("m", "c", cap, generated, k)
        for i, g in enumerate(generated):
            above = lengths[lengths > g]
            if cap is not None and g + k >= cap or not len(above):
                assert ends[i] == 1.0
            else:
                assert ends[i] == pytest.approx((above <= g + k).mean(), rel=1e-9)
    # the class prior's partial moments are remembered per point, and read the same
    prior = s._table(("m", "c")).prior
    xs = np.array([0.0, 1.0, 250.0, 1e4])
    fresh = np.array([prior.part(x) for x in xs]).T
    assert prior.parts(xs) == pytest.approx(fresh) and prior.parts(xs) == pytest.approx(fresh)


def test_a_plan_reads_its_snapshots_running_requests_as_censored():
    from qlm.core.plan import GroupView, RunningView, Snapshot, WorkerView
    from qlm.core.plan_generator import PlanGenerator

    gen = PlanGenerator(InstanceThroughput(Profile(max_running=64)))
    for x in range(30, 70):
        gen.observe("m", "c", x)
    before = gen.lengths.mean("m", "c")
    worker = WorkerView(id="w", models=("m",), max_running=64, loaded="m", running=32,
                        running_requests=(RunningView("", "c", 500),) * 32)
    gen(Snapshot(now_ms=0, workers=(worker,), groups=(
        GroupView(id="g", model="m", slo_class="c", deadline_ms=10_000, sequence=0, queued=1),)))
    assert gen.lengths.mean("m", "c") > 2 * before


# --- instance throughput ---------------------------------------------------------------------


def test_throughput_prior_comes_from_the_profile():
    tp = InstanceThroughput(
        Profile(max_running=32, decode_step_ms=30, decode_ms_per_seq=0.5, prefill_ms_per_token=0.4)
    )
    assert tp.step_s("w", "m", 32) == pytest.approx(0.046)
    assert tp.decode_rate("w", "m") == pytest.approx(32 / 0.046)
    assert tp.prefill_s_per_token("w", "m") == pytest.approx(0.0004)


def test_an_engine_that_prefills_in_chunks_makes_every_group_wait_for_the_prompts_ahead():
    whole = Profile(max_running=4, decode_step_ms=20, prefill_ms_per_token=1)
    chunked = dataclasses.replace(whole, max_batched_tokens=104)
    # a chunk is what the budget leaves beside a full batch's decodes, 100 tokens, and its step
    # also decodes the batch: 100 ms of prompt + 20 ms, over 100 tokens
    assert InstanceThroughput(chunked).prefill_s_per_token("w", "m") == pytest.approx(0.0012)
    assert InstanceThroughput(whole).prefill_s_per_token("w", "m") == pytest.approx(0.001)
    # groups of 150 prompt tokens on an idle instance with slots for all. Prefilled whole,
    # all start in the first step. In chunks, a group is admitted at the first step end with
    # under a chunk of prompts ahead of it: the second after one step (50 left), the third
    # after three (300 ahead)
    assert [w.mean for w in estimator(profile=whole).estimate("w", queue(1, 1, 1, prompt=150))
            ] == [0, 0, 0]
    waits = estimator(profile=chunked).estimate("w", queue(1, 1, 1, prompt=150))
    assert [w.fixed for w in waits] == pytest.approx([0, 0.12, 0.36])
    assert [w.mean for w in waits] == pytest.approx([0, 0.12, 0.36])
    # prompts the batch still owes count as ahead of the queue (less than a chunk: the plan
    # generator's ready_s waits out the rest)
    est = estimator(profile=chunked)
    owing = est.queue("w", "m", owed_tokens=60)
    for g, fixed in zip(queue(1, 1, prompt=50), [0, 0.12], strict=True):
        assert owing.next_wait(g).fixed == pytest.approx(fixed)
        owing.append(g)


def test_throughput_learns_a_faster_instance_online():
    tp = InstanceThroughput(
        Profile(max_running=8, decode_step_ms=20, decode_ms_per_seq=1.0), alpha=0.2
    )
    base = tp.decode_rate("fast", "m")
    for _ in range(60):  # steps measured at half the profiled 28 ms with 8 running
        tp.observe("fast", "m", output_tokens=100, decode_s=100 * 0.014, batch=8)
    assert tp.speed("fast", "m") == pytest.approx(2.0, rel=0.01)
    assert tp.decode_rate("fast", "m") == pytest.approx(2 * base, rel=0.01)
    assert tp.speed("slow", "m") == 1.0  # per instance


def test_kv_capacity_limits_the_batch():
    tp = InstanceThroughput(Profile(max_running=64, kv_capacity_tokens=32768))
    assert tp.batch("w", "m") == 64
    assert tp.batch("w", "m", tokens_per_seq=2048) == 16


def test_unknown_instance_without_default_profile_is_an_error():
    with pytest.raises(KeyError):
        InstanceThroughput().step_s("w", "m", 1)


# --- waiting times ---------------------------------------------------------------------------


def queue(*sizes, model="m", cls="c", cap=None, prompt=0):
    return [QueuedGroup(model, cls, q, prompt * q, None if cap is None else cap * q) for q in sizes]


def test_an_oracle_knows_when_each_running_request_ends():
    from qlm.core.plan_generator import ExactLengths

    est = estimator(ExactLengths())  # one slot, 20 ms a step
    for generated in (10, 45):
        wait = est.estimate("w", queue(1, cap=5), running=[("c", generated, 50)])[0]
        # (class, generated, max_tokens): the slot frees when the request reaches its cap
        assert wait.mean == pytest.approx((50 - generated) * 0.020) and wait.std == 0.0


def test_later_groups_wait_longer():
    waits = estimator().estimate("w", queue(2, 3, 1, 4), running=[("c", 10, None)])
    means = [e.mean for e in waits]
    assert means == sorted(means) and len(set(means)) == 4
    assert [e.quantile(Z95) for e in waits] == sorted(e.quantile(Z95) for e in waits)


def test_first_group_on_an_idle_instance_starts_at_once():
    (first,) = estimator().estimate("w", queue(3))
    assert first.mean == 0 and first.p_meets(0.0) == 1.0


def test_wait_is_the_sum_of_the_service_times_ahead():
    s = OutputLengthStats(prior_mean=250, prior_std=100, prior_weight=10)
    waits = estimator(s, Profile(decode_step_ms=20, prefill_ms_per_token=1)).estimate(
        "w", queue(2, 3, 1, prompt=50)
    )
    # group 3 waits for 5 requests: 5 * 250 tokens * 20 ms, plus 5 * 50 prompt tokens * 1 ms
    assert waits[2].mean == pytest.approx(5 * 250 * 0.02 + 5 * 50 * 0.001)
    assert waits[2].fixed == pytest.approx(0.25)
    assert waits[2].std >= math.sqrt(5) * 100 * 0.02


def test_the_learned_means_error_is_shared_by_every_request_of_a_key():
    rng = np.random.default_rng(8)
    s = OutputLengthStats(prior_weight=0)
    for x in rng.normal(300, 50, 100):
        s.observe("m", "c", int(x))
    waits = estimator(s).estimate("w", queue(100, 1))
    _, v = s.moments("m", "c")
    se = s.standard_error("m", "c")
    assert se == pytest.approx(math.sqrt(v / 100))
    # 100 requests ahead: 100 independent spreads, but one error of the mean times 100.
    assert waits[1].std == pytest.approx(math.sqrt(100 * v + (100 * se) ** 2) * 0.02)


def test_a_free_slot_means_no_wait_and_a_full_batch_waits_for_one_completion():
    s = OutputLengthStats(prior_mean=100, prior_std=50)
    est = estimator(s, Profile(max_running=4, decode_step_ms=10))
    waits = est.estimate("w", queue(1, 1, 1), running=[("c", 0, None)] * 2)
    assert [e.mean for e in waits[:2]] == [0.0, 0.0]  # 2 and 3 ahead: a slot is free
    assert 0 < waits[2].mean < 100 * 0.01  # 4 ahead: the first of 4 to finish, not all of them


def test_a_batch_that_holds_the_kv_cache_makes_a_request_wait_with_slots_free():
    # 8 slots, 4 running, each holding 1,000 tokens of context and ~100 to come: 4,400 of a
    # 5,000-token cache. A 100-token prompt fits at once, a 1,000-token one after a completion.
    s = OutputLengthStats(prior_mean=100, prior_std=10, prior_weight=1000)
    est = estimator(s, Profile(max_running=8, decode_step_ms=10, kv_capacity_tokens=5000))
    running = [("c", 10, None, 1000)] * 4
    small, large = (est.estimate("w", queue(1, prompt=p), running=running)[0] for p in (100, 1000))
    assert small.quantile(Z95) == 0.0
    assert large.mean > 0.5 * 90 * 0.01 / 4  # about a completion (90 tokens left, 4 running)
    # without the contexts the estimator cannot tell, and takes the slots as the limit
    blind = est.estimate("w", queue(1, prompt=1000), running=[("c", 10, None)] * 4)[0]
    assert blind.quantile(Z95) == 0.0


def test_a_request_ending_before_the_plan_is_in_force_frees_its_kv_for_the_next():
    from qlm.core.plan_generator import ExactLengths

    # 4 running, each with 1,000 tokens of context, holding 5,473 of a 6,000-token cache with
    # what they will still produce: a 1,000-token prompt does not fit. One of them ends at
    # its cap 3 tokens (steps) from now. If the plan's work can start at the end of the step
    # under way, the group waits for that completion; if only 3 steps from now (ready_s: the
    # plan's own compute time), it fits then, and waits for nothing more
    est = estimator(ExactLengths(), Profile(max_running=8, decode_step_ms=10,
                                            kv_capacity_tokens=6000))
    running = [("c", 10, 13, 1000)] + [("c", 10, 500, 1000)] * 3  # (class, out, cap, context)
    group = QueuedGroup("m", "c", 1, 1000, 5)
    soon, later = (est.queue("w", "m", running, ready_s=r).next_wait(group) for r in (0.01, 0.03))
    assert soon.mean > 0.01  # waits for the completion
    assert later.mean == pytest.approx(0.03) and later.std == 0.0


def test_a_request_that_may_not_fit_waits_in_a_mixture():
    # what the batch holds is uncertain: 4,400 +- a few hundred against room for 4,500
    s = OutputLengthStats(prior_mean=100, prior_std=100, prior_weight=1000)
    est = estimator(s, Profile(max_running=8, decode_step_ms=10, kv_capacity_tokens=5000))
    wait = est.estimate("w", queue(1, prompt=500), running=[("c", 10, None, 1000)] * 4)[0]
    one = est.estimate("w", queue(1, prompt=2000), running=[("c", 10, None, 1000)] * 4)[0]
    assert 0 < wait.mean < one.mean  # it fits now with some probability, else after one
    assert wait.quantile(Z95) > 0


def test_output_lengths_are_learned_per_prompt_band():
    s = OutputLengthStats(prior_weight=10)
    for _ in range(200):
        s.observe("m", "c", 50, prompt_tokens=100)  # short prompts, short answers
        s.observe("m", "c", 400, prompt_tokens=1500)
    short, long_ = s.band(100), s.band(1500)
    assert short != long_ and s.count("m", "c", short) == 200 and s.count("m", "c") == 400
    assert s.mean("m", "c", band=short) == pytest.approx(50, abs=10)  # 10 of 210 the class
    assert s.mean("m", "c", band=long_) == pytest.approx(400, abs=10)
    assert s.mean("m", "c") == pytest.approx(225, abs=10)
    assert s.mean("m", "c", band=s.band(20_000)) == s.mean("m", "c")  # unseen: the class's
    # a band with few completions leans on its class (its prior)
    s.observe("m", "c", 1000, prompt_tokens=5000)
    assert 225 < s.mean("m", "c", band=s.band(5000)) < 700
    assert s.quantile("m", "c", 0.5, band=long_) == pytest.approx(400)
    # a group's work is read in its band: the wait behind one request of each kind
    est = estimator(s, Profile(max_running=1, decode_step_ms=10))
    for p in (100, 1500):
        wait = est.estimate("w", queue(1, 1, prompt=p))[1].mean
        assert wait == pytest.approx(s.mean("m", "c", band=s.band(p)) * 0.01)


def test_a_drifting_window_widens_the_standard_error():
    rng = np.random.default_rng(3)
    steady, drifting = OutputLengthStats(prior_weight=0), OutputLengthStats(prior_weight=0)
    for i in range(1024):
        steady.observe("m", "c", int(rng.normal(300, 60)))
        # the same spread overall, but stretches of 128 requests at 200 or 400 on average
        drifting.observe("m", "c", int(rng.normal(200 if i // 128 % 2 else 400, 60)))
    assert steady.standard_error("m", "c") < 0.01 * 300
    assert drifting.standard_error("m", "c") > 0.2 * 300
    # too few completions to tell: sampling error and the prior's pull only
    few = OutputLengthStats(prior_weight=0)
    for i in range(100):
        few.observe("m", "c", 200 if i % 2 else 400)
    assert few.standard_error("m", "c") == pytest.approx(math.sqrt(few.variance("m", "c") / 100))


def test_faster_instance_gets_shorter_waits():
    tp = InstanceThroughput(Profile())
    tp.set_profile("fast", "m", Profile(decode_step_ms=10))
    est = WaitingTimeEstimator(OutputLengthStats(), tp)
    slow, fast = (est.estimate(w, queue(4, 4, 4))[-1] for w in ("slow", "fast"))
    assert fast.mean == pytest.approx(slow.mean / 2)
    assert fast.quantile(Z95) < slow.quantile(Z95)


def test_a_model_change_adds_the_swap_time():
    est = estimator()
    q = queue(2) + queue(1, model="n") + queue(1, model="n")
    no_swap = est.estimate("w", q, model="m", swap_s=0.0)
    swap = est.estimate("w", q, model="m", swap_s=7.5)
    assert swap[0].mean == no_swap[0].mean
    assert swap[1].mean == pytest.approx(no_swap[1].mean + 7.5)
    assert swap[1].fixed == pytest.approx(7.5)
    assert swap[2].mean == pytest.approx(no_swap[2].mean + 7.5)  # one change, one swap
    # Loaded with another model: even the head group waits for the swap.
    assert est.estimate("w", queue(1), model="n", swap_s=7.5)[0].mean == pytest.approx(7.5)


def test_only_the_first_load_of_a_model_is_cold():
    est = estimator()
    q = queue(1, model="n") + queue(1) + queue(1, model="n")
    warm = est.queue("w", "m", swap_s=1.0)
    cold = est.queue("w", "m", swap_s=1.0, cold_s={"n": 30.0})
    for g in q:
        gap = cold.next_wait(g).mean - warm.next_wait(g).mean
        warm.append(g)
        cold.append(g)
    assert gap == pytest.approx(29.0)  # back to "m" and to "n" again: warm swaps, as before
    assert est.queue("w", "m", swap_s=1.0, cold_s={"n": 30.0}).next_wait(q[0]).mean == (
        pytest.approx(30.0))


def test_a_model_change_waits_for_the_longest_running_request():
    # 32 running heavy-tailed requests: the drain lasts until the longest is done, far longer
    # than their average work spread over the batch.
    rng = np.random.default_rng(6)
    s = OutputLengthStats(prior_weight=0)
    for x in lognormal(rng, 1000):
        s.observe("m", "c", int(x))
    est = estimator(s, Profile(max_running=32))
    running = [("c", 0, 4096)] * 32
    (w,) = est.estimate("w", queue(1, model="n"), model="m", running=running)
    work = 32 * s.mean("m", "c", cap=4096) * 0.02 / 32
    assert w.mean > 3 * work
    assert w.quantile(Z95) <= 4096 * 0.02 * 1.01


def test_quantile_and_p_meets_agree():
    for tail in ("gamma", "normal"):
        e = WaitEstimate(mean=10.0, std=4.0, fixed=2.0, tail=tail)
        for z in (-1.0, 0.0, Z95, 3.0):
            assert e.p_meets(e.quantile(z)) == pytest.approx(NormalDist().cdf(z))
    n = WaitEstimate(mean=10.0, std=4.0, tail="normal")
    assert n.quantile(Z95) == pytest.approx(10 + Z95 * 4)
    assert n.p_meets(14.0) == pytest.approx(NormalDist().cdf(1.0))
    assert WaitEstimate(3.0, 0.0).p_meets(2.9) == 0.0
    assert WaitEstimate(3.0, 0.0).p_meets(3.0) == 1.0
    with pytest.raises(ValueError):
        estimator(tail="weibull")


# --- coverage ----------------------------------------------------------------------------------


def mc_coverage(sampler, sizes, *, tail="gamma", seeds=range(16), trials=500, cap=2048):
    """Coverage of quantile(z95) over Monte Carlo waits on one instance that serves a request at
    a time, so a group's actual wait is the sum of the sampled service times ahead of it. Each
    seed learns the lengths afresh from 1024 completions (logged under a larger cap of 8192):
    the estimate's own sampling error is part of what the coverage has to absorb."""
    hits = total = 0
    starts = np.cumsum([0, *sizes[:-1]])[1:]  # the head group's wait is 0 for sure: skip it
    for seed in seeds:
        rng = np.random.default_rng(seed)
        stats = OutputLengthStats(prior_mean=200, prior_std=200, prior_weight=20)
        for x in np.minimum(sampler(rng, 1024), 8192).astype(int):
            stats.observe("m", "c", int(x))
        waits = estimator(stats, tail=tail).estimate("w", queue(*sizes, cap=cap))[1:]
        bound = np.array([e.quantile(Z95) for e in waits])
        lengths = np.minimum(sampler(rng, trials * sum(sizes)).astype(int), cap)
        done = np.cumsum(lengths.reshape(trials, -1) * 0.02, axis=1)
        actual = done[:, starts - 1]
        hits += int((actual <= bound).sum())
        total += actual.size
    return hits / total


FEW = (1, 1, 1, 1)  # 1-3 heavy-tailed requests ahead: far from the CLT's comfort zone
MANY = (16,) * 12  # up to 176 requests ahead


@pytest.mark.parametrize("sampler", [lognormal, pareto])
@pytest.mark.parametrize("sizes", [FEW, (1, 2, 3), MANY], ids=["few", "mixed", "many"])
def test_wait_quantile_coverage_matches_the_confidence_under_heavy_tails(sampler, sizes):
    assert mc_coverage(sampler, sizes) == pytest.approx(0.95, abs=0.035)


def test_batched_instance_coverage_from_a_busy_state():
    """8 slots, each one token per step; the batch has been busy long enough that its requests
    are at random ages; a group starts when a slot frees (an FCFS 8-server queue)."""
    b, trials, step, cap = 8, 200, 0.02, 4096
    rng = np.random.default_rng(7)
    stats = OutputLengthStats(prior_weight=1)
    for x in np.minimum(lognormal(rng, 1024), cap).astype(int):
        stats.observe("m", "c", int(x))
    est = estimator(stats, Profile(max_running=b))
    sizes = (1, 4, 8, 8, 8)
    q = queue(*sizes, cap=cap)
    # Warm up: each slot serves requests back to back for 20 mean lengths.
    lens = np.minimum(lognormal(rng, trials * b * 400), cap).astype(int).reshape(trials, b, 400)
    ends = np.cumsum(lens, axis=2)
    horizon = 20 * stats.mean("m", "c")
    i = (ends <= horizon)[..., :].sum(axis=2)[..., None]
    end = np.take_along_axis(ends, i, 2)[..., 0]
    age = horizon - (end - np.take_along_axis(lens, i, 2)[..., 0])
    free = (end - horizon) * step
    hits = total = 0
    rows = np.arange(trials)
    actual = []
    for size in sizes:
        for k in range(size):
            j = free.argmin(axis=1)
            start = free[rows, j]
            if k == 0:
                actual.append(start.copy())
            free[rows, j] = start + np.minimum(lognormal(rng, trials), cap).astype(int) * step
    actual = np.array(actual).T
    for t in range(trials):
        waits = est.estimate("w", q, running=[("c", int(a), cap) for a in age[t]])
        bound = np.array([e.quantile(Z95) for e in waits])
        hits += int((actual[t] <= bound).sum())
        total += len(sizes)
    assert 0.90 <= hits / total <= 0.99


# --- calibration -------------------------------------------------------------------------------


def test_calibration_reports_coverage_and_bias():
    cal = Calibration(confidence=0.95)
    assert cal.z == pytest.approx(Z95) and math.isnan(cal.coverage())
    e = WaitEstimate(mean=10.0, std=1.0, tail="normal")  # bound 11.645
    for actual in (5.0, 11.6, 11.7, 20.0):
        cal.record(e, actual)
    assert cal.count == 4
    assert cal.coverage() == 0.5
    assert cal.bias_s() == pytest.approx((5 + 11.6 + 11.7 + 20) / 4 - 10)
    strict = Calibration(confidence=0.5)  # bound = mean
    for actual in (9.0, 10.0, 10.5):
        strict.record(e, actual)
    assert strict.coverage() == pytest.approx(2 / 3)


def test_calibration_reports_the_uncertain_waits_apart():
    cal = Calibration(confidence=0.95)
    sure = WaitEstimate(mean=0.01, std=0.0)  # starts at the next step, no spread
    unsure = WaitEstimate(mean=10.0, std=1.0, tail="normal")
    for actual in (0.01, 0.01, 0.01):
        cal.record(sure, actual)
    cal.record(unsure, 5.0)
    cal.record(unsure, 20.0)
    # a spread, but so skewed that the start is sure at the confidence: its quantile is the
    # sure part, so it is a right-or-wrong call like a sure start, not a quantile to calibrate
    skewed = WaitEstimate(mean=0.011, std=0.5, fixed=0.01)
    assert skewed.quantile(cal.z) == pytest.approx(skewed.fixed)
    cal.record(skewed, 0.01)
    assert cal.coverage() == pytest.approx(5 / 6)
    assert (cal.uncertain, cal.coverage_uncertain()) == (2, 0.5)
    assert math.isnan(Calibration().coverage_uncertain())


def test_calibration_counts_a_sure_wait_estimated_right_as_the_confidence():
    cal = Calibration(confidence=0.95)
    sure = WaitEstimate(mean=0.02, std=0.0)
    assert sure.atom() == (0.02, 1.0)
    cal.record(sure, 0.02)  # on its atom: a uniform draw over [0, 1] is under 0.95 at 0.95
    assert cal.coverage() == 1.0 and cal.coverage_pit() == pytest.approx(0.95)
    cal.record(sure, 0.005)  # before it: under the quantile whatever the draw
    cal.record(sure, 0.05)  # after it: over
    assert cal.coverage() == pytest.approx(2 / 3)
    assert cal.coverage_pit() == pytest.approx((0.95 + 1) / 3)
    # sure at the confidence through a skewed spread: the atom is the sure part, with the
    # probability the cube-root normal has below zero
    skewed = WaitEstimate(mean=0.11, std=0.8, fixed=0.01)
    at, mass = skewed.atom()
    assert skewed.quantile(cal.z) == pytest.approx(0.01)
    assert at == 0.01 and 0.95 < mass < 1
    assert skewed.p_meets(0.01 + 1e-12) == pytest.approx(mass, abs=1e-3)
    skewed_cal = Calibration(confidence=0.95)
    skewed_cal.record(skewed, 0.01)
    assert skewed_cal.coverage_pit() == pytest.approx(0.95 / mass)
    # an uncertain wait's atom holds under the confidence: a start on it counts whole
    unsure = WaitEstimate(mean=10.0, std=1.0, fixed=2.0)
    assert unsure.atom()[1] < 0.95
    unsure_cal = Calibration(confidence=0.95)
    unsure_cal.record(unsure, 2.0)
    assert unsure_cal.coverage_pit() == 1.0
    assert WaitEstimate(mean=10.0, std=1.0, tail="normal").atom()[1] == 0.0
    assert math.isnan(Calibration().coverage_pit())


def test_calibration_learns_the_spread_its_recent_errors_call_for():
    z = NormalDist().inv_cdf(0.95)
    est = WaitEstimate(mean=10.0, std=4.0, fixed=2.0)
    room = est.quantile(z) - est.fixed
    cal = Calibration(confidence=0.95)
    assert cal.spread() == 1.0
    rng = np.random.default_rng(0)
    # the real waits: the fixed part plus a uniform share of only half the quantile's room
    for u in rng.uniform(0, 0.5, Calibration.MIN_COUNT - 1):
        cal.record(est, est.fixed + u * room)
    assert cal.spread() == 1.0  # too few to say
    for u in rng.uniform(0, 0.5, 400):
        cal.record(est, est.fixed + u * room)
    assert cal.spread() == pytest.approx(0.475, abs=0.02)
    # read through that spread, the quantile covers 95 % of such waits, not all of them
    tight = dataclasses.replace(est, spread=cal.spread())
    waits = est.fixed + rng.uniform(0, 0.5, 4000) * room
    assert np.mean(waits <= tight.quantile(z)) == pytest.approx(0.95, abs=0.03)  # 1.0 before
    assert tight.p_meets(tight.quantile(z)) == pytest.approx(0.95, abs=1e-6)
    # sure waits are not stretched, and too bold estimates are widened
    assert dataclasses.replace(WaitEstimate(3.0, 0.0), spread=0.5).quantile(z) == 3.0
    bold = Calibration(confidence=0.95)
    for u in rng.uniform(0, 2.0, 400):
        bold.record(est, est.fixed + u * room)
    assert bold.spread() == pytest.approx(1.9, abs=0.08)


def test_calibration_scores_carry_over_to_another_planner():
    z = NormalDist().inv_cdf(0.95)
    est = WaitEstimate(mean=10.0, std=4.0, fixed=2.0)
    room = est.quantile(z) - est.fixed
    rng = np.random.default_rng(1)
    old = Calibration(confidence=0.95)
    for u in rng.uniform(0, 0.5, 300):
        old.record(est, est.fixed + u * room)
    assert old.scored == 300 and len(old.scores_since(0)) == 300
    kept = old.scores_since(0)
    for u in rng.uniform(0, 0.5, 200):
        old.record(est, est.fixed + u * room)
    # the window holds 400: of the 200 new, all; since the start, only the last 400
    assert old.scores_since(300) == list(old._scores)[-200:]
    assert old.scores_since(0) == list(old._scores) and len(old._scores) == 400
    new = Calibration(confidence=0.95)
    new.restore(kept + old.scores_since(300))
    assert new.spread() == old.spread() != 1.0
    assert new.scored == 0  # nothing of its own to keep yet
    # its own scores come after the restored ones and push the oldest out
    for _ in range(10):
        new.record(est, est.fixed + 2.0 * room)
    assert list(new._scores)[-10:] == [pytest.approx(2.0)] * 10 and len(new._scores) == 400


def test_the_estimator_reads_its_quantiles_through_the_spread():
    est = estimator(profile=Profile(max_running=4))
    g = QueuedGroup("m", "c", 8)
    z = NormalDist().inv_cdf(0.95)
    before = est.estimate("w", [g, g])[1]
    est.spread = 0.5
    after = est.estimate("w", [g, g])[1]
    assert after.spread == 0.5 and after.mean == before.mean and after.std == before.std
    assert after.quantile(z) - after.fixed == pytest.approx(
        0.5 * (before.quantile(z) - before.fixed))
