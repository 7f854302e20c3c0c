"""`qlm bench sim` plumbing: the JSON contract, every request accounted for, clear errors."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from xml.etree import ElementTree

import pytest

from qlm.bench import sim as bench_sim
from qlm.cli import main as cli

from .harness import PROFILES, ROOT, children, is_running, start_time

KEYS = {"scenario", "load", "policy", "slo_attainment", "slo_attainment_by_class",
        "throughput_rps", "goodput_rps", "ttft_p50_s", "ttft_p99_s", "model_swaps",
        "evictions", "planner_ms_p99", "estimator_coverage", "estimator_coverage_pit"}


@pytest.fixture
def trace(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "trace.jsonl"
    t = 0.0
    lines = []
    for _ in range(300):
        t += rng.expovariate(5.0) * 1000
        lines.append(json.dumps({"timestamp": t, "input_length": rng.randint(10, 2000),
                                 "output_length": rng.randint(1, 300)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def profiles(tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    for name in ("a10-llama-7b", "a100-llama-7b"):
        shutil.copy(PROFILES / "sim-small.yaml", folder / f"{name}.yaml")
    return folder


def test_runs_every_policy_and_load_on_the_same_requests(trace, profiles, tmp_path):
    out = tmp_path / "out.json"
    code = cli(["bench", "sim", "--trace", str(trace), "--scenario", "wa", "--loads", "1,8",
                "--limit", "300", "--plots", str(tmp_path / "plots"),
                "--policies", "fcfs,priority,edf", "--profiles", str(profiles),
                "--json", str(out)])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["load"], r["policy"]) for r in runs] == [
        (1.0, "fcfs"), (1.0, "priority"), (1.0, "edf"),
        (8.0, "fcfs"), (8.0, "priority"), (8.0, "edf")]
    for r in runs:
        assert KEYS <= r.keys()
        assert r["requests"] == r["completed"] == 300
        assert set(r["slo_attainment_by_class"]) == {"interactive", "batch"}
        assert 0 <= r["slo_attainment"] <= 1 and r["goodput_rps"] <= r["throughput_rps"]
        # one model: its steps are the instances' busy time, one to max_running (sim-small:
        # 64) sequences at a time; nothing to swap
        assert set(r["busy_s_by_model"]) == set(r["mean_batch_by_model"]) == {"llama-7b"}
        assert 1.0 <= r["mean_batch_by_model"]["llama-7b"] <= 64
        assert r["model_swaps"] == 0 and r["swap_s"] == 0
        assert 0 < r["completed_after_arrivals"] <= 300 and r["drain_s"] > 0
    # 8x the arrival rate is harder than 1x for fcfs
    fcfs = {r["load"]: r for r in runs if r["policy"] == "fcfs"}
    assert fcfs[8.0]["ttft_p99_s"] > fcfs[1.0]["ttft_p99_s"]
    q = fcfs[1.0]["ttft_quantiles_s"]
    assert len(q) == 101 and q == sorted(q) and q[50] == fcfs[1.0]["ttft_p50_s"]
    # the plots: attainment per class and overall, a TTFT CDF per load, each a valid SVG
    # with a line for every policy
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["attainment-all.svg", "attainment-batch.svg", "attainment-interactive.svg",
                     "ttft-cdf-1x.svg", "ttft-cdf-8x.svg"]
    for name in plots:
        root = ElementTree.parse(tmp_path / "plots" / name).getroot()
        lines = root.findall("{http://www.w3.org/2000/svg}polyline")
        assert len(lines) == 3


def test_runs_side_by_side_give_the_runs_of_one_at_a_time(trace, profiles):
    args = (str(trace), "wa", ["fcfs", "edf"], [1.0, 8.0])
    serial = bench_sim.run(*args, profiles_dir=profiles, progress=False, jobs=1)
    parallel = bench_sim.run(*args, profiles_dir=profiles, progress=False, jobs=2)
    assert [(r["load"], r["policy"]) for r in parallel] == [
        (1.0, "fcfs"), (1.0, "edf"), (8.0, "fcfs"), (8.0, "edf")]
    for one, other in zip(serial, parallel, strict=True):
        assert (one["load"], one["policy"]) == (other["load"], other["policy"])
        # the same runs (the charged planner time may move a request or two)
        assert other["slo_attainment"] == pytest.approx(one["slo_attainment"], abs=0.02)
        assert other["ttft_p50_s"] == pytest.approx(one["ttft_p50_s"], rel=0.1, abs=0.05)
    assert serial[2]["ttft_p50_s"] > 2 * serial[0]["ttft_p50_s"]  # the loads differ


def test_the_progress_bar_of_runs_side_by_side_ticks_on_a_terminal(
        trace, profiles, capsys, monkeypatch):
    monkeypatch.setattr(bench_sim, "PROGRESS_EVERY_S", 0.05)
    args = (str(trace), "wa", ["fcfs", "edf"], [1.0])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bench_sim.run(*args, profiles_dir=profiles, jobs=2)
    bars = capsys.readouterr().err.split("\r")[1:]
    # redrawn with the clock (spawning alone takes longer than a tick) before the first run
    # is in, and the last line says all are done
    waiting = [b for b in bars if "] 0/2" in b]
    assert len(waiting) >= 2 and waiting[-1] != waiting[0]
    assert bars[-1].startswith("[" + "#" * 20 + "] 2/2 in ")
    # into a log: a line when it starts, after each run but the last, and at the end
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bench_sim.run(*args, profiles_dir=profiles, jobs=2)
    bars = capsys.readouterr().err.split("\r")[1:]
    assert [b.split("]")[1].split()[0] for b in bars] == ["0/2", "1/2", "2/2"]


def test_runs_with_a_fixed_plan_time_repeat_exactly(trace, profiles):
    # here and in spawned processes (other hash seeds): every figure but the measured plan
    # times is the same; a plan charged 2 s instead of 20 ms changes the run
    args = (str(trace), "wa", ["qlm"], [8.0, 8.0])
    runs = [*bench_sim.run(*args, profiles_dir=profiles, progress=False, plan_ms=20),
            *bench_sim.run(*args, profiles_dir=profiles, progress=False, plan_ms=20, jobs=2)]
    same = [{k: v for k, v in r.items() if k != "planner_ms_p99"} for r in runs]
    assert all(r == same[0] for r in same)
    slow = bench_sim.run(*args[:3], [8.0], profiles_dir=profiles, progress=False, plan_ms=2000)
    assert slow[0]["ttft_p99_s"] > same[0]["ttft_p99_s"]


def test_errors_are_clear(trace, profiles, capsys, tmp_path):
    assert cli(["bench", "sim", "--trace", str(trace), "--scenario", "wa",
                "--policies", "fcfs,nope", "--profiles", str(profiles)]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert cli(["bench", "sim", "--trace", str(trace), "--scenario", "wa", "--plan-ms", "-1",
                "--profiles", str(profiles)]) == 2
    assert "--plan-ms must be 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no engine profile"):
        bench_sim.run(str(trace), "wa", ["fcfs"], [1.0], profiles_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="known"):
        bench_sim.run(str(trace), "nope", ["fcfs"], [1.0], profiles_dir=profiles,
                      progress=False)


def test_planner_bench_reports_each_policy_and_size(monkeypatch, tmp_path):
    from qlm.bench import planner

    monkeypatch.setattr(planner, "SIZES", ((40, 4), (80, 8)))
    out = tmp_path / "planner.json"
    assert cli(["bench", "planner", "--repeats", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["groups"], r["instances"], r["policy"]) for r in rows] == [
        (40, 4, "edf"), (40, 4, "qlm"), (80, 8, "edf"), (80, 8, "qlm")]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    # every group of the snapshot gets a place
    snap = planner.snapshot(40, 4)
    plan = planner.qlm_policy(4)(snap)
    assert sorted(g for q in plan.queues.values() for g in q) == sorted(g.id for g in
                                                                       snap.groups)


def test_qlm_runs_report_the_coverage_of_the_waits_they_were_unsure_of(trace, profiles):
    runs = bench_sim.run(str(trace), "wa", ["qlm"], [8.0], profiles_dir=profiles,
                         progress=False)
    r = runs[0]
    n = r["estimator_uncertain_count"]
    # overloaded: many waits queue behind others, some with a quantile past their sure part
    assert n > 0 and 0 < r["estimator_uncertain_share"] < 1
    assert 0 <= r["estimator_coverage_uncertain"] <= 1
    row = next(line for line in bench_sim.table(runs, ["qlm"]).splitlines()
               if line.startswith("qlm"))
    assert f"{r['estimator_coverage_uncertain']:.3f} ({n:>5})" in row


def test_the_simulator_knows_qlm_nopull(trace, profiles):
    for name in ("a100-mistral-7b", "a100-vicuna-13b"):  # wb: three models that swap
        shutil.copy(PROFILES / "sim-small.yaml", profiles / f"{name}.yaml")
    runs = bench_sim.run(str(trace), "wb", ["qlm-nopull"], [2.0], profiles_dir=profiles,
                         progress=False, limit=120)
    assert runs[0]["policy"] == "qlm-nopull" and runs[0]["completed"] == runs[0]["requests"]
    assert bench_sim.make_policy("qlm-nopull", [], {}).pull_elsewhere is False
    assert bench_sim.make_policy("qlm", [], {}).pull_elsewhere is True
    assert bench_sim.make_policy("oracle", [], {}).pull_elsewhere is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_runs_side_by_side_end_with_a_killed_bench(trace, profiles, tmp_path):
    # the bench killed with SIGKILL mid-run: its spawned runs end too (they went on for minutes)
    code = (f"from qlm.bench import sim; sim.run({str(trace)!r}, 'wa', ['qlm'] * 2, [64.0] * 20, "
            f"profiles_dir=__import__('pathlib').Path({str(profiles)!r}), progress=False, "
            "jobs=2)")
    bench = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(runs := {p: s for p in children(bench.pid) if (s := start_time(p))}) < 2:
            assert bench.poll() is None and time.monotonic() < deadline, "no runs started"
            time.sleep(0.1)
        time.sleep(1.0)  # past the pool's start: the runs are computing
        bench.kill()
        bench.wait()
        deadline = time.monotonic() + 10
        while any(is_running(p, s) for p, s in runs.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(is_running(p, s) for p, s in runs.items())
    finally:
        if bench.poll() is None:
            bench.kill()
