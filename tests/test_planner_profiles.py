"""The qlm planner's cost model comes from the workers' measured engine profiles, adjusted to
how each worker is configured."""

from __future__ import annotations

import dataclasses

from qlm import config as qlm_config
from qlm.engines.sim import SimProfile
from services.planner.loop import build_policy

from .harness import ROOT


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


def test_qlm_nopull_is_qlm_without_pulling_from_other_queues():
    cfg = qlm_config.load(ROOT / "deploy" / "vllm-cpu.yaml")
    assert build_policy(cfg, "qlm").pull_elsewhere is True
    nopull = build_policy(cfg, "qlm-nopull")
    assert nopull.pull_elsewhere is False and nopull.name == "qlm-nopull"


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
