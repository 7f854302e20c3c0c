"""qlm bench engine's pure pieces: workloads, figures and tables, without an engine (the
benchmark itself needs a vLLM engine of its own, too slow to start for a unit test)."""

from __future__ import annotations

from qlm.bench import engine as bench


def timed(cls, ttft, last=None, tokens=16, at=0.0):
    return bench.Timed(cls, at, ttft, ttft if last is None else last, tokens)


def test_workload_is_a_seeded_burst_then_interactive_requests():
    w = bench.hol_workload(0, 512, batch=3, batch_prompt=100, batch_tokens=50, interactive=2,
                           gap_s=1.0, every_s=0.5)
    assert w == bench.hol_workload(0, 512, 3, 100, 50, 2, 1.0, 0.5)
    assert [(i.at_s, i.cls, i.max_tokens) for i in w] == [
        (0.0, "batch", 50)] * 3 + [(1.0, "interactive", 16), (1.5, "interactive", 16)]
    assert all(75 <= len(i.prompt) <= 100 for i in w[:3])
    assert all(bench.FIRST_TOKEN_ID <= t < 512 for i in w for t in i.prompt)
    assert len({i.prompt for i in w}) == len(w)  # no shared prompts for a cache to reuse


def test_time_per_output_token_excludes_the_first():
    assert timed("x", 0.1, last=1.1, tokens=11).tpot_s == 0.1
    assert timed("x", 0.1, tokens=1).tpot_s == 0.0


def test_hol_row_pools_rounds_and_counts_the_deadline():
    runs = [bench.Run([timed("interactive", 0.5), timed("interactive", 3.0),
                       timed("batch", 0.2, last=2.0, tokens=10)], 3.0, {"saves": 1}),
            bench.Run([timed("interactive", 1.0), timed("batch", 0.4, last=4.0, tokens=10,
                                                         at=0.0)], 4.0, {"saves": 2})]
    row = bench.hol_row("mesh qlm", runs, deadline_s=1.0)
    assert row["interactive"] == 3 and row["slo_met"] == 2 and row["attainment"] == 0.667
    assert row["ttft_p50_s"] == 1.0 and row["ttft_p99_s"] == 3.0
    assert row["batch_done_s"] == 3.0  # the mean of the runs' last batch tokens
    assert row["evictions"] == 3


def test_ratios_are_against_bare_fcfs():
    rows = [{"target": "bare fcfs", "ttft_p50_s": 4.0, "ttft_p99_s": 6.0, "attainment": 0.0},
            {"target": "mesh edf", "ttft_p50_s": 1.0, "ttft_p99_s": 3.0, "attainment": 0.5}]
    assert bench.hol_ratios(rows) == {"bare fcfs / mesh edf": {
        "p50": 4.0, "p99": 2.0, "attainment_base": 0.0, "attainment": 0.5}}
    assert bench.hol_ratios(rows[1:]) == {}
    assert bench.ratio(1.0, 0.0) is None


def test_overhead_and_resume_summaries():
    rows = bench.overhead_summary([timed("i", 0.010, last=0.040, tokens=4)] * 3,
                                  [timed("i", 0.015, last=0.051, tokens=4)] * 3)
    assert rows["bare"]["ttft_p50_ms"] == 10.0 and rows["mesh"]["tpot_p50_ms"] == 12.0
    assert rows["mesh / bare"] == {"ttft_p50_ms": 1.5, "tpot_p50_ms": 1.2}
    trials = [{"context": 512, "mode": m, "ttft_s": s, "loaded_tokens": n}
              for m, s, n in (("resume", 0.01, 519), ("recompute", 0.04, 0),
                              ("resume", 0.02, 519), ("recompute", 0.05, 0))]
    (row,) = bench.resume_rows(trials)
    assert row["resume_ms"] == 10.0 and row["recompute_ms"] == 40.0
    assert row["recompute / resume"] == 4.0 and row["loaded_resume"] == [519, 519]


def test_report_prints_every_section_as_a_table():
    report = {"params": {"max_num_seqs": 4}, "sections": {
        "hol": {"params": {"batch": 12, "batch_prompt": 1024, "batch_tokens": 128,
                           "interactive": 6, "every_s": 0.1, "gap_s": 0.2, "wave_s": 1.0,
                           "rounds": 1, "interactive_deadline_ms": 500},
                "rows": [bench.hol_row("bare fcfs", [bench.Run(
                    [timed("interactive", 2.0), timed("batch", 0.1, last=1.0)], 2.0, {})], 0.5)],
                "ratios": {}},
        "overhead": {"params": {"requests": 3, "prompt": 64, "max_tokens": 4, "policy": "qlm"},
                     "rows": bench.overhead_summary([timed("i", 0.01)], [timed("i", 0.02)])},
        "resume": {"params": {"generated": 8}, "rows": []},
        "start": {"rows": [{"model": "large", "cold_start_s": 40.0, "warm_start_ms": 0.01,
                            "swap_ms": 2.0, "first_ttft_ms": 9.0}]}}}
    text = bench.format_report(report)
    assert "| bare fcfs | 2.00 |" in text and "TTFT <= 0.5 s" in text
    assert "| mesh / bare | 2.0 |" in text
    assert "| large | 40.0 | 0.010 | 2.000 | 9.0 |" in text
