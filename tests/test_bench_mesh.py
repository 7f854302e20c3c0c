"""`qlm bench mesh` plumbing: a tiny run of the real command (stack, bare gRPC server, load
generator, JSON report), and the bookkeeping that decides whether a request counts. No timing
thresholds: the machine is shared, so only the shape and the counts are checked."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from qlm.bench.mesh import TARGETS, Sample, percentile, summarise

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUESTS, CONCURRENCY, MAX_TOKENS = 30, 4, 5


def test_bench_mesh_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qlm", "bench", "mesh", "--requests", str(REQUESTS),
         "--concurrency", str(CONCURRENCY), "--max-tokens", str(MAX_TOKENS), "--workers", "1",
         "--policy", "edf", "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())

    assert report["params"]["max_tokens"] == MAX_TOKENS
    # the planner ran the policy asked for, not the default stack's (qlm)
    assert report["params"]["planner_policy"] == "edf" and "planner policy: edf" in proc.stdout
    assert [(p["phase"], p["concurrency"]) for p in report["phases"]] == [
        ("latency", 1), ("throughput", CONCURRENCY)]
    for phase in report["phases"]:
        assert list(phase["rows"]) == list(TARGETS)
        for target, row in phase["rows"].items():
            where = f"{phase['phase']}/{target}"
            # every request came back whole: max_tokens tokens, finish reason "length"
            assert row["requests"] == row["completed"] == REQUESTS, where
            assert row["errors"] == 0, where
            assert row["tokens"] == REQUESTS * MAX_TOKENS, where
            assert row["rps"] > 0 and row["wall_s"] > 0, where
            assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"], where
            assert 0 < row["e2e_p50_ms"] <= row["e2e_p99_ms"], where
            assert row["ttft_p50_ms"] <= row["e2e_p99_ms"], where
        mesh = phase["rows"]["mesh"]
        # the id message, then tokens; the mesh's own account of the request is relayed
        assert mesh["messages_per_request"] >= 2
        assert 0 < mesh["mean_ack_ms"] < mesh["mean_ttft_ms"]
        assert mesh["mean_server_ttft_ms"] >= mesh["mean_queue_wait_ms"] >= 0
        if sys.platform == "linux":
            assert {"client", "router", "planner", "worker bench0", "redis"} <= set(
                mesh["cpu_ms_per_request"])
    assert report["aims"]["mesh_rps"] == report["phases"][1]["rows"]["mesh"]["rps"]
    assert "mesh throughput" in proc.stdout and "added p50 TTFT" in proc.stdout


def test_a_policy_no_planner_runs_is_refused_before_anything_starts():
    proc = subprocess.run([sys.executable, "-m", "qlm", "bench", "mesh", "--policy", "oracle"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "qlm bench mesh: planner.policy: unknown planner policy 'oracle'" in proc.stderr


def test_short_or_missing_output_does_not_count():
    samples = [Sample(0.001, 0.002, MAX_TOKENS), Sample(0.001, 0.002, MAX_TOKENS - 1),
               Sample(0.003, 0.004, MAX_TOKENS)]
    row = summarise(samples, errors=2, wall_s=1.0, max_tokens=MAX_TOKENS)
    assert (row["requests"], row["completed"], row["errors"]) == (5, 2, 3)
    assert row["rps"] == 2.0
    assert row["ttft_p50_ms"] == 1.0 and row["e2e_p99_ms"] == 4.0


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
