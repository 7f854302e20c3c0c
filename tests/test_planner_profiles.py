"""The qlm planner's cost model comes from the workers' measured engine profiles, adjusted to
how each worker is configured."""

from __future__ import annotations

import dataclasses

import pytest

from qlm import config as qlm_config
from qlm.core import variants
from qlm.core.cpsat import RefinedPlanGenerator
from qlm.engines.sim import SimProfile
from services.planner.loop import build_policy

from .harness import ROOT, write_config


def test_vllm_stack_plans_with_the_measured_profile_and_the_workers_batch_limit(tmp_path):
    cfg = qlm_config.load(ROOT / "deploy" / "vllm-cpu.yaml")
    measured = SimProfile.load(ROOT / "deploy" / "profiles" / "vllm-cpu-tiny.yaml")
    policy = build_policy(cfg, "qlm")
    tp = policy.estimator.throughput
    # the shipped config runs as many sequences as the profile was measured with
    assert tp.batch("w0", "small") == measured.max_running
    assert policy.swap_s("w0") == measured.warm_load_ms / 1000

    # a worker limited to fewer sequences than the profile's engine is planned with its limit
    w0 = dataclasses.replace(cfg.workers[0], options={**cfg.workers[0].options,
                                                      "max_num_seqs": 4})
    profile_path = cfg.resolve(cfg.workers[0].options["profile"])
    w0.options["profile"] = str(profile_path)
    narrow = dataclasses.replace(cfg, workers=(w0, *cfg.workers[1:]))
    tp = build_policy(narrow, "qlm").estimator.throughput
    assert tp.batch("w0", "small") == 4
    assert tp.batch("w1", "large") == measured.max_running


def test_every_planner_variant_is_built_with_what_it_changes():
    cfg = qlm_config.load(ROOT / "deploy" / "vllm-cpu.yaml")
    built = {name: build_policy(cfg, name) for name in variants.VARIANTS}
    generators = {name: getattr(p, "generator", p) for name, p in built.items()}
    assert isinstance(built["qlm-cpsat"], RefinedPlanGenerator)
    assert not isinstance(built["qlm"], RefinedPlanGenerator)
    assert {n: g.name for n, g in generators.items()} == {n: n for n in variants.VARIANTS}
    changed = {(n, attr) for n, g in generators.items()
               for attr in ("pull_elsewhere", "max_evictions", "tpot_limits")
               if getattr(g, attr) != getattr(generators["qlm"], attr)}
    assert changed == {("qlm-nopull", "pull_elsewhere"), ("qlm-noevict", "max_evictions"),
                       ("qlm-tpot", "tpot_limits")}
    assert generators["qlm"].pull_elsewhere and generators["qlm"].max_evictions > 0
    # the profiles reach every variant
    assert all(g.estimator.throughput.batch("w0", "small") == built["qlm"].estimator.throughput
               .batch("w0", "small") for g in generators.values())


@pytest.mark.parametrize("policy, message", [
    ("oracle", r"planner\.policy: unknown planner policy 'oracle' \(the oracle knows every "
               r"output length in advance: qlm bench sim only\); known: fcfs, priority, edf, "
               r"qlm, qlm-cpsat, qlm-tpot, qlm-noevict, qlm-nopull"),
    ("qlm-fast", r"unknown planner policy 'qlm-fast'; known: .*qlm-nopull"),
])
def test_a_config_naming_a_policy_no_planner_runs_is_refused_at_load(tmp_path, policy, message):
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"]}],
                        planner={"policy": policy})
    with pytest.raises(qlm_config.ConfigError, match=message):
        qlm_config.load(path)
    with pytest.raises(ValueError, match=message.split(": ", 1)[1]):
        build_policy(qlm_config.load(write_config(tmp_path, workers=[])), policy)


def test_the_qlm_planner_without_engine_profiles_is_a_config_error(tmp_path):
    cfg = qlm_config.load(write_config(tmp_path, workers=[{"id": "w0", "models": ["small"]}]))
    bare = dataclasses.replace(cfg, workers=tuple(
        dataclasses.replace(w, options={k: v for k, v in w.options.items() if k != "profile"})
        for w in cfg.workers))
    assert build_policy(cfg, "qlm").estimator.throughput.batch("w0", "small") > 0
    with pytest.raises(qlm_config.ConfigError, match="needs engine profiles.*qlm profile"):
        build_policy(bare, "qlm")
    assert build_policy(bare, "edf") is not None  # the planner's own policies need none


def test_a_measured_profile_keeps_the_engines_chunk_budget(tmp_path):
    from qlm.core.estimator import InstanceThroughput
    from qlm.engines.profile import render

    measured = {"prefill_ms_per_token": 0.01, "decode_step_ms": 4.0, "decode_ms_per_seq": 0.5,
                "raw_ttft_ms": {64: 1.0}, "raw_step_ms": {1: 4.5}, "max_running": 16,
                "kv_capacity_tokens": 4096, "load_ms": 1000, "warm_load_ms": 1.0,
                "max_batched_tokens": 2048}
    path = tmp_path / "measured.yaml"
    path.write_text(render(measured, "qlm profile --worker-id w0"))
    profile = SimProfile.load(path)
    assert (profile.max_batched_tokens, profile.max_running) == (2048, 16)
    assert InstanceThroughput(profile).chunked("w0", "small")
