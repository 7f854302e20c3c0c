"""qlm.sim.scenarios: seeded model and SLO class assignment, fleets, the registry."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from qlm.sim import scenarios
from qlm.sim.scenarios import (
    MODELS,
    SCENARIOS,
    InstanceSpec,
    Scenario,
    SimRequest,
    SloClass,
    get,
)
from qlm.sim.traces import TraceRequest

N = 10000


def synthetic(n=N, input_length=100, output_length=10):
    return [TraceRequest(i * 0.25, input_length, output_length) for i in range(n)]


REQS = synthetic()


def shares(values):
    counts = collections.Counter(values)
    return {k: c / len(values) for k, c in counts.items()}


# --- registry ------------------------------------------------------------------------------


def test_registry_has_paper_workloads_and_modern():
    assert {"wa", "wb", "wc", "modern"} <= set(SCENARIOS)
    assert scenarios.names() == sorted(SCENARIOS)
    for name, s in SCENARIOS.items():
        assert get(name) is s
        assert s.name == name and s.description


@pytest.mark.parametrize("name", ["nope", "WA", "", None])
def test_get_unknown_lists_known_names(name):
    with pytest.raises(ValueError) as e:
        get(name)
    msg = str(e.value)
    assert "unknown scenario" in msg
    for known in ("wa", "wb", "wc", "modern"):
        assert known in msg


def test_paper_slo_deadlines():
    def ttft(s):
        return {k: c.ttft_deadline_s for k, c in get(s).slo_classes.items()}

    assert ttft("wa") == {"interactive": 20.0, "batch": 60.0}
    assert ttft("wb") == {"batch": 60.0, "batch-1h": 3600.0}
    assert ttft("wc") == {"interactive": 20.0, "batch": 60.0}
    assert ttft("modern") == {"interactive": 2.0, "batch": 60.0}
    assert get("modern").slo_classes["interactive"].tpot_deadline_s == 0.1
    assert get("wa").slo_classes["interactive"].tpot_deadline_s is None


def test_documented_mixes():
    # the values the module docstring states
    assert get("wa").class_mix == {"interactive": 0.5, "batch": 0.5}
    assert get("modern").class_mix == {"interactive": 0.5, "batch": 0.5}
    assert get("wb").class_mix == {"batch": 0.5, "batch-1h": 0.5}
    assert dict(zip(get("wb").models, get("wb").model_weights, strict=True)) == {
        "llama-7b": 0.5,
        "mistral-7b": 0.3,
        "vicuna-13b": 0.2,
    }
    assert get("wc").long_prompt_fraction == 0.1
    assert get("wc").long_prompt_range == (8192, 16384)
    assert all(get(n).long_prompt_fraction == 0 for n in ("wa", "wb", "modern"))


def test_single_and_multi_model():
    for name in ("wa", "wc", "modern"):
        assert get(name).models == ("llama-7b",)
    assert len(get("wb").models) >= 3


# --- assign --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_assign_is_deterministic_for_a_seed_and_differs_across_seeds(name):
    s = get(name)
    reqs = REQS[:2000]
    a = s.assign(reqs, seed=1)
    assert a == s.assign(reqs, seed=1)
    b = s.assign(reqs, seed=2)
    assert [r.slo_class for r in a] != [r.slo_class for r in b]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_assign_keeps_arrivals_and_sets_deadlines(name):
    s = get(name)
    out = s.assign(REQS[:500], seed=3)
    assert [r.id for r in out] == list(range(500))
    assert [r.arrival_s for r in out] == [r.arrival_s for r in REQS[:500]]
    for r in out:
        assert r.model in s.models
        cls = s.slo_classes[r.slo_class]
        assert r.ttft_deadline_s == cls.ttft_deadline_s
        assert r.tpot_deadline_s == cls.tpot_deadline_s
        assert r.deadline_s == r.arrival_s + cls.ttft_deadline_s
        assert r.output_length == 10


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_class_mix_proportions(name):
    s = get(name)
    got = shares([r.slo_class for r in s.assign(REQS, seed=11)])
    total = sum(s.class_mix.values())
    assert set(got) == set(s.class_mix)
    for cls, w in s.class_mix.items():
        assert got[cls] == pytest.approx(w / total, abs=0.02), (cls, got)


def test_wa_mixes_interactive_and_batch_5050_and_wb_is_batch_only():
    wa = shares([r.slo_class for r in get("wa").assign(REQS, seed=5)])
    assert wa["interactive"] == pytest.approx(0.5, abs=0.02)
    wb = {r.slo_class for r in get("wb").assign(REQS, seed=5)}
    assert wb == {"batch", "batch-1h"}


def test_wb_spreads_requests_across_models():
    s = get("wb")
    got = shares([r.model for r in s.assign(REQS, seed=7)])
    assert set(got) == set(s.models)
    total = sum(s.model_weights)
    for model, w in zip(s.models, s.model_weights, strict=True):
        assert got[model] == pytest.approx(w / total, abs=0.02), (model, got)
    # models and classes are drawn independently
    a = s.assign(REQS[:2000], seed=7)
    b = s.assign(REQS[:2000], seed=8)
    assert [r.model for r in a] != [r.model for r in b]


def test_wa_and_modern_share_class_assignment_for_a_seed():
    wa = [r.slo_class for r in get("wa").assign(REQS[:3000], seed=9)]
    modern = get("modern").assign(REQS[:3000], seed=9)
    assert wa == [r.slo_class for r in modern]
    assert {r.ttft_deadline_s for r in modern if r.slo_class == "interactive"} == {2.0}


def test_wc_long_prompt_fraction_and_range():
    s = get("wc")
    lo, hi = s.long_prompt_range
    out = s.assign(REQS, seed=13)
    long = [r.input_length for r in out if r.input_length != 100]
    assert len(long) / len(out) == pytest.approx(s.long_prompt_fraction, abs=0.01)
    assert s.long_prompt_fraction >= 0.05
    cap = MODELS["llama-7b"].max_model_len - 10
    assert all(lo <= n <= min(hi, cap) for n in long)
    assert max(long) > hi - 1000 and min(long) < lo + 1000  # drawn across the range
    assert lo >= 8000
    # other scenarios leave prompt lengths alone
    assert {r.input_length for r in get("wa").assign(REQS, seed=13)} == {100}


def test_long_prompts_are_capped_at_the_model_context():
    max_len = MODELS["llama-7b"].max_model_len
    s = base(long_prompt_fraction=1.0, long_prompt_range=(max_len, 2 * max_len))
    out = s.assign(synthetic(200, output_length=50), seed=1)
    assert {r.input_length for r in out} == {max_len - 50}


def test_prompts_are_capped_to_fit_context_with_output():
    max_len = MODELS["llama-7b"].max_model_len
    reqs = [TraceRequest(0.0, max_len + 500, 300), TraceRequest(1.0, 0, 0)]
    a, b = get("wa").assign(reqs, seed=0)
    assert (a.input_length, a.output_length) == (max_len - 300, 300)
    # output 0 runs as 1 token; a prompt is at least 1 token
    assert (b.input_length, b.output_length) == (1, 1)


@pytest.mark.parametrize("seed", [1.5, "1", None, True])
def test_assign_rejects_non_integer_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        get("wa").assign(REQS[:3], seed=seed)


def test_assign_of_no_requests():
    assert get("wb").assign([], seed=1) == []


# --- fleets --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_default_fleet(name):
    s = get(name)
    fleet = s.instances()
    assert len(fleet) == s.default_instances == len(s.fleet)
    assert {m for inst in fleet for m in inst.models} == set(s.models)
    for inst in fleet:
        assert inst.gpu in ("a10", "a100")
        for m in inst.models:
            assert inst.profile(m) == f"{inst.gpu}-{m}"


def test_gpu_types_of_the_paper_are_used():
    gpus = {inst.gpu for s in SCENARIOS.values() for inst in s.fleet}
    assert gpus == {"a10", "a100"}


def test_instances_override_repeats_pattern():
    s = get("wa")
    fleet = s.instances(5)
    assert [i.name for i in fleet] == ["w0", "w1", "w2", "w3", "w4"]
    pattern = [i.gpu for i in s.fleet]
    assert [i.gpu for i in fleet] == [pattern[k % len(pattern)] for k in range(5)]
    assert fleet[0].profiles == {"llama-7b": f"{fleet[0].gpu}-llama-7b"}
    assert len(s.instances(1)) == 1


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_instances_rejects_bad_count(n):
    with pytest.raises(ValueError, match="instance count"):
        get("wa").instances(n)


def test_profile_of_unserved_model_is_an_error():
    with pytest.raises(ValueError, match="does not serve"):
        InstanceSpec("w0", "a10", ("llama-7b",)).profile("vicuna-13b")


# --- validation ----------------------------------------------------------------------------


def base(**changes):
    kw = dict(
        name="t",
        description="test",
        slo_classes={"interactive": SloClass("interactive", 20.0)},
        class_mix={"interactive": 1.0},
        models=("llama-7b",),
        model_weights=(),
        fleet=(InstanceSpec("w0", "a100", ("llama-7b",)),),
    )
    kw.update(changes)
    return Scenario(**kw)


def test_valid_base_scenario_assigns():
    out = base().assign(synthetic(3), seed=0)
    assert out[0] == SimRequest(0, 0.0, 100, 10, "llama-7b", "interactive", 20.0, None)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"class_mix": {"batch": 1.0}}, "unknown class"),
        ({"class_mix": {}}, "empty class_mix"),
        ({"class_mix": {"interactive": 0.0}}, "above 0"),
        ({"slo_classes": {"x": SloClass("interactive", 1.0)}}, "holds class"),
        ({"slo_classes": {"interactive": SloClass("interactive", 0.0)}}, "deadlines"),
        ({"models": ("gpt-9",)}, "unknown model"),
        ({"models": ("llama-7b", "mistral-7b")}, "no instance serves"),
        ({"model_weights": (1.0, 2.0)}, "model_weights"),
        ({"fleet": ()}, "empty fleet"),
        ({"fleet": (InstanceSpec("w0", "h100", ("llama-7b",)),)}, "unknown gpu"),
        ({"fleet": (InstanceSpec("w0", "a10", ("mistral-7b", "llama-7b")),)}, "unlisted"),
        ({"fleet": (InstanceSpec("w0", "a10", ("llama-7b",)),) * 2}, "duplicate"),
        ({"long_prompt_fraction": 1.5}, "long_prompt_fraction"),
        ({"long_prompt_range": (10, 5)}, "long_prompt_range"),
    ],
)
def test_scenario_validation(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        base(**changes)


def test_sim_request_is_frozen():
    r = SimRequest(0, 0.0, 1, 1, "m", "c", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.arrival_s = 2.0
