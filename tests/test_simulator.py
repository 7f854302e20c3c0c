"""The discrete-event simulator: exact timings on small cases, step folding that changes
nothing, policies compared on a head-of-line burst, model swaps, and nothing lost."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from qlm.core import policies
from qlm.engines.sim import SimProfile
from qlm.sim.scenarios import InstanceSpec, SimRequest
from qlm.sim.simulator import Simulation


def profile(**kw) -> SimProfile:
    base = dict(max_running=4, kv_capacity_tokens=100_000, prefill_ms_per_token=0.0,
                decode_step_ms=10.0, decode_ms_per_seq=0.0, load_ms=5000.0, warm_load_ms=500.0)
    return SimProfile(**{**base, **kw})


def req(i, arrival, out, *, model="m", cls="batch", deadline=60.0, prompt=10) -> SimRequest:
    return SimRequest(id=i, arrival_s=arrival, input_length=prompt, output_length=out,
                      model=model, slo_class=cls, ttft_deadline_s=deadline)


def fleet(n=1, models=("m",), **kw):
    return [(InstanceSpec(f"i{k}", "a100", tuple(models)), {m: profile(**kw) for m in models})
            for k in range(n)]


def run(requests, policy="fcfs", **kw):
    sim_kw = {k: kw.pop(k) for k in list(kw) if k in
              ("fold_steps", "max_group_size", "plan_time_s", "plan_interval_s")}
    return Simulation(requests, fleet(**kw), policies.get(policy), **sim_kw).run()


def test_exact_times_on_one_slot():
    # one slot, 10 ms per step: requests run one after another, first token after one step
    res = run([req(0, 0.0, 3), req(1, 0.0, 2), req(2, 0.0, 1)], max_running=1)
    times = [t for r in res.requests for t in (r.start_s, r.first_token_s, r.finish_s)]
    assert times == pytest.approx([0.0, 0.01, 0.03, 0.03, 0.04, 0.05, 0.05, 0.06, 0.06])
    assert res.makespan_s == pytest.approx(0.06)


def test_prefill_and_batch_cost_follow_the_profile():
    # 2 in one batch, 100 prompt tokens each: first step 2 * 100 * 0.1 + 10 + 2 * 5 = 40 ms
    res = run([req(0, 0.0, 2, prompt=100), req(1, 0.0, 2, prompt=100)],
              prefill_ms_per_token=0.1, decode_ms_per_seq=5.0)
    assert [r.first_token_s for r in res.requests] == pytest.approx([0.04, 0.04])
    assert [r.finish_s for r in res.requests] == pytest.approx([0.06, 0.06])  # + 20 ms


@pytest.mark.parametrize("fold", [True, False])
def test_chunked_prefill_gives_a_short_prompt_its_first_token_before_a_long_one(fold):
    # a step holds 100 tokens (max_batched_tokens): a decode token per decoding request, the
    # rest prompt chunks in admission order; 0.1 ms per prompt token, 10 ms per step
    requests = [req(0, 0.0, 5, prompt=50, deadline=30.0), req(1, 0.0, 2, prompt=250)]
    res = run(requests, "edf", prefill_ms_per_token=0.1, max_batched_tokens=100, fold_steps=fold)
    # 50 + 50 tokens (20 ms): 0 has its first token; 99, 99 (19.9 ms each) beside its decode;
    # then 1's last 2 (10.2 ms): its first token; one more step of 10 ms ends both
    assert [r.first_token_s for r in res.requests] == pytest.approx([0.02, 0.07])
    assert [r.finish_s for r in res.requests] == pytest.approx([0.08, 0.08])
    # prefilled whole, both wait for all 300 prompt tokens (40 ms)
    res = run(requests, "edf", prefill_ms_per_token=0.1, fold_steps=fold)
    assert [r.first_token_s for r in res.requests] == pytest.approx([0.04, 0.04])
    assert [r.finish_s for r in res.requests] == pytest.approx([0.08, 0.05])


@pytest.mark.parametrize("policy", ["fcfs", "edf"])
def test_folding_steps_changes_no_timing(policy):
    rng = random.Random(7)
    requests = [req(i, rng.uniform(0, 20), rng.randint(1, 300), prompt=rng.randint(1, 2000),
                    cls=rng.choice(["interactive", "batch"]),
                    deadline=rng.choice([2.0, 60.0])) for i in range(300)]
    kw = dict(n=2, max_running=8, prefill_ms_per_token=0.05, decode_ms_per_seq=0.5,
              plan_time_s=0)
    folded = run(requests, policy, **kw)
    stepped = run(requests, policy, fold_steps=False, **kw)
    for a, b in zip(folded.requests, stepped.requests, strict=True):
        assert (a.spec.id, a.start_s, a.first_token_s, a.finish_s) == pytest.approx(
            (b.spec.id, b.start_s, b.first_token_s, b.finish_s))


@pytest.mark.parametrize("fold", [True, False])
def test_the_run_says_how_busy_each_model_kept_the_instances_and_at_what_batch(fold):
    # "a": 4 requests of 10 tokens in one batch of 4 (10 steps of 10 ms), then 2 more of 5
    # tokens arriving at 1 s (5 steps at 2); "b": 1 request of 3 tokens after a 5 s cold load
    res = run([*(req(i, 0.0, 10, model="a") for i in range(4)),
               req(4, 1.0, 5, model="a"), req(5, 1.0, 5, model="a"),
               req(6, 2.0, 3, model="b")], models=("a", "b"), fold_steps=fold)
    assert res.busy_s_by_model == pytest.approx({"a": 0.15, "b": 0.03})
    assert res.batch_by_model == pytest.approx({"a": (10 * 4 + 5 * 2) / 15, "b": 1.0})
    assert res.swap_s == pytest.approx(5.0) and res.model_swaps == 1


def test_edf_serves_interactive_before_a_batch_burst():
    burst = [req(i, 0.0, 200, cls="batch", deadline=3600.0) for i in range(40)]
    interactive = [req(100 + i, 0.5, 20, cls="interactive", deadline=3.0) for i in range(8)]

    def met(res):
        rs = [r for r in res.requests if r.spec.slo_class == "interactive"]
        return sum(r.first_token_s - r.spec.arrival_s <= r.spec.ttft_deadline_s for r in rs)

    fcfs = run(burst + interactive, "fcfs", max_running=4, max_group_size=4)
    edf = run(burst + interactive, "edf", max_running=4, max_group_size=4)
    assert met(fcfs) == 0  # stuck behind 40 x 2 s of batch work
    assert met(edf) == 8
    assert all(r.finish_s is not None for r in edf.requests + fcfs.requests)


def test_swaps_to_the_model_of_the_work_and_pays_the_load_time():
    res = run([req(0, 0.0, 1, model="b")], models=("a", "b"), max_running=1)
    r = res.requests[0]
    assert res.model_swaps == 1
    assert r.start_s == pytest.approx(5.0)  # cold load of "b"
    assert r.first_token_s == pytest.approx(5.01)


def test_swapping_back_is_a_warm_start():
    res = run([req(0, 0.0, 1, model="b"), req(1, 10.0, 1, model="a")], models=("a", "b"),
              max_running=1)
    b, a = res.requests
    assert res.model_swaps == 2
    assert b.start_s == pytest.approx(5.0)  # "b" cold: 5 s
    assert a.start_s == pytest.approx(10.5)  # "a" was served before: warm, 0.5 s


def test_a_swap_under_way_shows_as_the_model_it_loads():
    # a planner that reads a swapping instance as the model going out queues that model's work
    # behind the swap, and the plan after the swap the other way round: swaps back and forth
    seen = []

    def policy(snapshot):
        seen.append((snapshot.now_ms, snapshot.workers[0].loaded,
                     snapshot.workers[0].ready_in_s))
        return policies.edf(snapshot)

    Simulation([req(0, 0.0, 1, model="b"), req(1, 2.0, 1, model="b")], fleet(models=("a", "b")),
               policy, plan_time_s=0).run()
    during = [(loaded, ready) for t, loaded, ready in seen if 0 < t < 5000]
    assert during and all(loaded == "b" for loaded, _ in during)
    assert all(ready > 0 for _, ready in during)  # and busy until the load is done


def test_nothing_is_lost_across_models_and_instances():
    rng = random.Random(3)
    requests = [req(i, rng.uniform(0, 30), rng.randint(1, 100), model=rng.choice("ab"),
                    deadline=rng.choice([5.0, 60.0])) for i in range(500)]
    for policy in ("fcfs", "edf"):
        res = run(requests, policy, n=3, models=("a", "b"), max_running=16, load_ms=2000.0)
        assert all(r.finish_s is not None and r.generated == r.spec.output_length
                   for r in res.requests)
        assert all(r.spec.arrival_s <= r.start_s < r.first_token_s <= r.finish_s
                   for r in res.requests)
        assert res.plans > 0 and len(res.planner_ms) == res.plans


def test_a_learning_policy_hears_each_completion_with_its_prompt():
    from qlm.core.estimator import InstanceThroughput
    from qlm.core.plan_generator import PlanGenerator

    tp = InstanceThroughput(profile())
    gen = PlanGenerator(tp)
    heard = []

    class OldStyle:  # a policy whose observe takes no prompt (as a wrapper may)
        def __call__(self, snapshot):
            return policies.get("edf")(snapshot)

        def observe(self, model, slo_class, output_tokens):
            heard.append(output_tokens)

    requests = [req(i, 0.01 * i, 5 if i % 2 else 40, prompt=50 if i % 2 else 1500)
                for i in range(20)]
    Simulation(requests, fleet(), gen).run()
    assert gen.lengths.count("m", "batch", gen.lengths.band(50)) == 10
    assert gen.lengths.mean("m", "batch", band=gen.lengths.band(50)) < gen.lengths.mean(
        "m", "batch", band=gen.lengths.band(1500))
    Simulation(requests, fleet(), OldStyle()).run()
    assert sorted(heard) == sorted(r.output_length for r in requests)


def with_warm_starts(base):
    """`base`, plus the warm starts PlanGenerator derives from its queues."""
    from qlm.core.plan_generator import warm_starts

    def policy(snapshot):
        plan = base(snapshot)
        plan.warm_starts = warm_starts(snapshot, plan.queues)
        return plan
    return policy


def test_a_plans_warm_start_makes_the_later_swap_warm():
    # "a" runs 10 s (1000 steps of 10 ms) with "b" queued behind it: the plan warms "b" while
    # "a" runs (load_ms - warm_load_ms = 4.5 s in the background), so the swap costs 0.5 s
    requests = [req(0, 0.0, 1000, model="a"), req(1, 0.1, 1, model="b")]
    cold = Simulation(requests, fleet(models=("a", "b"), max_running=1),
                      policies.get("edf")).run()
    warm = Simulation(requests, fleet(models=("a", "b"), max_running=1),
                      with_warm_starts(policies.get("edf"))).run()
    assert cold.requests[1].start_s == pytest.approx(10.0 + 5.0, abs=0.02)
    assert warm.requests[1].start_s == pytest.approx(10.0 + 0.5, abs=0.02)
    assert cold.model_swaps == warm.model_swaps == 1


def test_a_swap_before_the_warm_start_is_done_waits_only_for_the_rest():
    # "a" runs 2 s: the warm start began at ~0.1 s and has ~2.6 s of its 4.5 s left
    requests = [req(0, 0.0, 200, model="a"), req(1, 0.1, 1, model="b")]
    res = Simulation(requests, fleet(models=("a", "b"), max_running=1),
                     with_warm_starts(policies.get("edf"))).run()
    b = res.requests[1]
    assert 2.0 + 0.5 < b.start_s < 2.0 + 5.0
    assert b.start_s == pytest.approx(0.1 + 4.5 + 0.5, abs=0.05)


def test_a_group_opened_during_a_plan_gets_the_next_plan_at_once():
    """As the planner service reads the events that came while it computed as soon as it is
    done, a group that opens meanwhile is planned right after, not at the next tick."""
    asked_at = []
    fcfs = policies.get("fcfs")

    def slow(snapshot):
        asked_at.append((round(snapshot.now_ms), sorted(g.id for g in snapshot.groups)))
        t = time.perf_counter()
        while time.perf_counter() - t < 0.05:  # 50 ms of (charged) compute
            pass
        return fcfs(snapshot)

    # r0 opens g1 and takes the one slot (a plan at 20 ms, in force at ~70 ms); r1, of
    # another class, opens g2 at 30 ms and waits
    requests = [req(0, 0.0, 500), req(1, 0.03, 5, cls="interactive", deadline=2.0)]
    Simulation(requests, fleet(max_running=1), slow, plan_interval_s=1.0).run()
    first, second = asked_at[0], asked_at[1]
    assert first == (20, [])
    # after the first plan is in force (~70 ms) and the debounce (20 ms): not at the 1 s tick
    assert 85 <= second[0] <= 120 and "g2" in second[1]


def test_a_fixed_plan_time_is_charged_instead_of_the_measured_one():
    """plan_time_s charges every plan that long, however fast it was: the same run each time.
    The policy here computes in microseconds, so only the charge keeps plans 300 ms apart."""
    asked_at = []
    fcfs = policies.get("fcfs")

    def quick(snapshot):
        asked_at.append(round(snapshot.now_ms))
        return fcfs(snapshot)

    # a new group every 50 ms (alternating classes), each asking for a plan
    requests = [req(i, 0.05 * i, 50, cls=("batch", "interactive")[i % 2],
                    deadline=(60.0, 2.0)[i % 2], prompt=10 * (1 + i)) for i in range(12)]
    Simulation(requests, fleet(max_running=1), quick, plan_time_s=0.3).run()
    gaps = [b - a for a, b in itertools.pairwise(asked_at)]
    assert asked_at[0] == 20 and gaps and min(gaps) >= 300
    asked_at.clear()
    Simulation(requests, fleet(max_running=1), quick).run()  # measured: next plans come sooner
    assert min(b - a for a, b in itertools.pairwise(asked_at)) < 300
