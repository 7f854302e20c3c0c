"""`qlm bench live`: a small replay through the real stack (processes, Redis, gRPC) for fcfs
and qlm, every request accounted for, the simulator beside it; and the pieces that decide what
a live request counts as. No timing thresholds: the machine is shared."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from qlm import config as qlm_config
from qlm.bench import live
from qlm.bench.sim import PROFILES
from qlm.sim import get_scenario
from qlm.sim.traces import effective_output

ROOT = pathlib.Path(__file__).resolve().parent.parent
N, SCALE = 40, 0.1


def test_bench_live_replays_every_request_through_the_stack(tmp_path):
    out = tmp_path / "live.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qlm", "bench", "live", "--limit", str(N), "--load", "4",
         "--time-scale", str(SCALE), "--policies", "fcfs,qlm", "--timeout", "60",
         "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["params"]["requests"] == N and report["params"]["time_scale"] == SCALE
    assert report["params"]["deadlines_ms"] == {"interactive": 2000, "batch": 6000}
    assert [r["policy"] for r in report["rows"]] == ["fcfs", "qlm"]
    want_tokens = sum(effective_output(r.output_length) for r in live.synthetic_trace(N))
    for row in report["rows"]:
        lv, sim = row["live"], row["sim"]
        # none lost: every request streamed its whole output and finished on length
        assert lv["requests"] == lv["completed"] == N, row["policy"]
        assert lv["statuses"] == {"length": N}, row["policy"]
        assert lv["tokens"] == want_tokens, row["policy"]
        for f in (lv, sim):
            assert 0 <= f["slo_attainment"] <= 1
            assert set(f["slo_attainment_by_class"]) == {"interactive", "batch"}
            assert all(0 <= v <= 1 for v in f["slo_attainment_by_class"].values())
            assert 0 < f["ttft_p50_s"] <= f["ttft_p99_s"]
            assert f["throughput_rps"] > 0
        assert 0 <= lv["server_slo_attainment"] <= 1
        assert lv["requeues"] >= 0 and sim["requeues"] >= 0
        band = sim["band"]
        lo, hi = band["slo_attainment"]
        assert 0 <= lo <= sim["slo_attainment"] <= hi <= 1
        for c, v in sim["slo_attainment_by_class"].items():
            c_lo, c_hi = band["slo_attainment_by_class"][c]
            assert c_lo <= v <= c_hi
        assert lv["cpu_s"]["router"] > 0 and lv["cpu_s"]["worker w0"] > 0
        # how far live lies outside the band, overall or in a class (0 inside)
        pairs = [(lv["slo_attainment"], band["slo_attainment"])] + [
            (v, band["slo_attainment_by_class"][c])
            for c, v in lv["slo_attainment_by_class"].items()]
        outside = max(max(b[0] - v, v - b[1], 0) for v, b in pairs)
        assert row["outside_band"] == pytest.approx(outside, abs=1e-4)
        assert row["within"] == (row["outside_band"] <= report["params"]["tolerance"])
        # the planner's own check of its wait estimates (GetPlan), and the simulator's: only
        # a policy that estimates waits has one
        for f in (lv, sim):
            c = f["calibration"]
            if row["policy"] == "fcfs":
                assert c is None
            else:
                assert c is None or (c["waits"] > 0
                                     and 0 <= c["coverage_pit"] <= c["coverage"] <= 1)
    assert report["within_tolerance"] == all(r["within"] for r in report["rows"])
    printed = {tuple(line.split()[:2]) for line in proc.stdout.splitlines() if line.strip()}
    for policy in ("fcfs", "qlm"):
        assert {(policy, s) for s in ("live", "sim", "band", "diff")} <= printed
    assert "agreement: live attainment within" in proc.stdout


def test_time_scale_applies_to_engine_arrivals_and_deadlines(tmp_path):
    scenario = get_scenario("wa")
    fleet = live.live_fleet(scenario, PROFILES, 0.5)
    full = live.live_fleet(scenario, PROFILES, 1.0)
    (_, half), (_, one) = fleet[0], full[0]
    p, q = half["llama-7b"], one["llama-7b"]
    assert p.decode_step_ms == q.decode_step_ms / 2 and p.load_ms == q.load_ms / 2
    assert (p.max_running, p.kv_capacity_tokens) == (q.max_running, q.kv_capacity_tokens)

    trace = live.synthetic_trace(50)
    scaled, _ = live.build_requests(trace, scenario, fleet, 2.0, 0.5, 0)
    plain, _ = live.build_requests(trace, scenario, full, 2.0, 1.0, 0)
    for a, b in zip(scaled, plain, strict=True):
        assert a.arrival_s == pytest.approx(b.arrival_s / 2)
        assert a.ttft_deadline_s == b.ttft_deadline_s / 2
        assert (a.input_length, a.output_length, a.slo_class) == (
            b.input_length, b.output_length, b.slo_class)

    cfg = qlm_config.load(live.write_stack_config(tmp_path, scenario, fleet, "qlm", 0.5))
    assert cfg.planner_policy == "qlm" and cfg.planner_interval_ms == 500
    assert {c.name: c.ttft_deadline_ms for c in cfg.slo_classes.values()} == {
        "interactive": 10000, "batch": 30000}
    assert [(w.id, w.models, w.options["time_scale"]) for w in cfg.workers] == [
        ("w0", ("llama-7b",), 1.0), ("w1", ("llama-7b",), 1.0)]
    # the planner reads the same scaled profile the worker runs
    from qlm.engines.sim import SimProfile
    assert SimProfile.load(cfg.resolve(cfg.workers[0].options["profile"])) == p


def test_prompts_that_the_smallest_instance_cannot_hold_are_shortened():
    scenario = get_scenario("wa")
    fleet = live.live_fleet(scenario, PROFILES, 1.0)
    smallest = min(p.kv_capacity_tokens for _, ps in fleet for p in ps.values())
    trace = [live.TraceRequest(0.0, 15000, 100), live.TraceRequest(1.0, 500, 100)]
    requests, cut = live.build_requests(trace, scenario, fleet, 1.0, 1.0, 0)
    assert cut == 1
    assert requests[0].input_length == smallest - 100 and requests[1].input_length == 500


def test_instances_that_swap_models_run_one_at_a_time_each_at_its_own_cost(tmp_path):
    from qlm.engines import create_engine

    scenario = get_scenario("wb")
    fleet = live.live_fleet(scenario, PROFILES, 0.5)
    cfg = qlm_config.load(live.write_stack_config(tmp_path, scenario, fleet, "qlm", 0.5))
    w0 = cfg.workers[0]
    assert w0.models == ("llama-7b", "mistral-7b", "vicuna-13b")
    assert w0.options["active"] == ["llama-7b"]  # the simulator's instances start on it too
    engine = create_engine(w0, cfg)
    assert engine.models() == ["llama-7b"]
    for m, profile in fleet[0][1].items():  # the scaled profile of each model
        assert engine.profiles[m] == profile
    assert engine.profiles["vicuna-13b"] != engine.profiles["llama-7b"]
    # the planner prices each model's throughput and cold load from the same files
    from services.planner.loop import build_policy
    policy = build_policy(cfg, "qlm")
    assert policy.cold_swap_s("w0", "vicuna-13b") == fleet[0][1]["vicuna-13b"].load_ms / 1000


def test_only_whole_outputs_within_the_deadline_count():
    scenario = get_scenario("wa")
    fleet = live.live_fleet(scenario, PROFILES, 1.0)
    trace = [live.TraceRequest(0.0, 100, 10)] * 4
    requests, _ = live.build_requests(trace, scenario, fleet, 1.0, 1.0, 0)
    deadline = requests[0].ttft_deadline_s
    outcomes = [
        live.Outcome(0.0, 1.0, 2.0, 10, "length"),              # met
        live.Outcome(0.0, 1.0, 2.0, 9, "length"),               # a token short
        live.Outcome(0.0, deadline + 0.5, deadline + 1, 10, "length"),  # late
        live.Outcome(0.0, None, None, 0, "rpc UNAVAILABLE"),    # failed
    ]
    row = live.live_row(requests, outcomes, 1.0)
    assert row["slo_attainment"] == 0.25 and row["completed"] == 2
    assert row["statuses"] == {"length": 3, "rpc UNAVAILABLE": 1}
    assert row["ttft_p50_s"] == 1.0
