"""`qlm bench sim`: scheduling quality of the policies on a replayed trace, in the
discrete-event simulator, all policies on the same requests, fleet and seed in one run.

For each load (a multiplier of the trace's arrival rate) and each policy it reports SLO
attainment (overall and per class), throughput, goodput, TTFT percentiles, model swaps and
planner time, prints them side by side with ratios to fcfs, and writes them as JSON.
`qlm-noevict` is qlm with request eviction off, to measure what eviction adds; `qlm-tpot` is
qlm with step limits for TPOT-bound work (qlm/core/tpot.py), to measure what they add.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import sys
import time

import yaml

from qlm.bench import percentile
from qlm.bench.plots import write_plots
from qlm.core import policies, variants
from qlm.core.estimator import InstanceThroughput
from qlm.core.lengths import OutputLengthStats
from qlm.core.plan_generator import ExactLengths
from qlm.engines.sim import SimProfile
from qlm.procutil import die_with_parent
from qlm.sim import get_scenario, load_trace, scale_load
from qlm.sim.simulator import SimResult, Simulation

PROFILES = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "profiles" / "gpu"
# KV swap ms per token by profile name (evicted requests resume without recompute)
KV_SWAP = PROFILES.parent / "kv-swap.yaml"


def slo_met(r) -> bool:
    s = r.spec
    if r.first_token_s is None or r.first_token_s - s.arrival_s > s.ttft_deadline_s:
        return False
    if s.tpot_deadline_s is not None and s.output_length > 1:
        tpot = (r.finish_s - r.first_token_s) / (s.output_length - 1)
        return tpot <= s.tpot_deadline_s
    return True


def tpot_met(r) -> bool | None:
    """Whether a request met its TPOT objective (an unfinished one did not); None: it has
    none, or a single output token (no time per output token to measure)."""
    s = r.spec
    if s.tpot_deadline_s is None or s.output_length <= 1:
        return None
    if r.finish_s is None or r.first_token_s is None:
        return False
    return (r.finish_s - r.first_token_s) / (s.output_length - 1) <= s.tpot_deadline_s


QLM_NAMES = (*variants.VARIANTS, "oracle")
POLICY_NAMES = (*policies.NAMES, *QLM_NAMES)


def make_policy(name: str, fleet, deadlines: dict[str, float], kv_swap_ms=None,
                plan_s: float | None = None):
    """A fresh policy for one run: the planner's own ones, or the QLM plan generator (the
    oracle is the same generator told every output length). kv_swap_ms: instance -> model ->
    KV swap ms per token, what resuming an evicted request costs (else a recompute). plan_s:
    the compute time the generator counts on for every plan (None: each one's measured)."""
    if name not in QLM_NAMES:
        return policies.get(name, deadlines)
    throughput = InstanceThroughput()
    load_s, cold_s = {}, {}
    for inst, profiles in fleet:
        for model, profile in profiles.items():
            throughput.set_profile(inst.name, model, profile)
        # swaps are warm starts once a model has run there (the simulator keeps it warm);
        # the first load of a model is cold
        load_s[inst.name] = max(p.warm_load_ms for p in profiles.values()) / 1000
        cold_s[inst.name] = {m: p.load_ms / 1000 for m, p in profiles.items()}
    lengths = ExactLengths() if name == "oracle" else OutputLengthStats()
    kv = kv_swap_ms or {}

    def resume_s_per_token(worker: str, model: str) -> float:
        ms = kv.get(worker, {}).get(model)
        return throughput.prefill_s_per_token(worker, model) if ms is None else ms / 1000

    return variants.build("qlm" if name == "oracle" else name, throughput, name=name,
                          lengths=lengths, swap_s=load_s.__getitem__,
                          resume_s_per_token=resume_s_per_token, slo_deadlines_s=deadlines,
                          cold_swap_s=lambda worker, model: cold_s[worker][model],
                          compute_s=plan_s)


def summarize(result: SimResult, *, scenario: str, load: float, policy: str,
              calibration=None) -> dict:
    reqs = result.requests
    done = [r for r in reqs if r.finish_s is not None]
    met = [slo_met(r) for r in reqs]
    last = max((r.spec.arrival_s for r in reqs), default=0.0)
    end = max((r.finish_s for r in done), default=0.0)
    span = end - min((r.spec.arrival_s for r in reqs), default=0.0)
    by_class: dict[str, list[bool]] = {}
    for r, ok in zip(reqs, met, strict=True):
        by_class.setdefault(r.spec.slo_class, []).append(ok)
    tpot = [ok for r in reqs if (ok := tpot_met(r)) is not None]
    ttft = sorted(r.first_token_s - r.spec.arrival_s for r in reqs
                  if r.first_token_s is not None)
    return {
        "scenario": scenario, "load": load, "policy": policy,
        "requests": len(reqs), "completed": len(done),
        "slo_attainment": round(sum(met) / len(reqs), 4) if reqs else 0.0,
        "slo_attainment_by_class": {c: round(sum(v) / len(v), 4)
                                    for c, v in sorted(by_class.items())},
        "throughput_rps": round(len(done) / span, 4) if span else 0.0,
        # after the trace's last arrival: how long the run went on and what it completed then
        # (a policy that defers loose work ends the trace with more of it queued)
        "drain_s": round(end - last, 1) if done else 0.0,
        "completed_after_arrivals": sum(r.finish_s > last for r in done),
        "goodput_rps": round(sum(met) / span, 4) if span else 0.0,
        # of the requests with a TPOT objective (None: there are none)
        "tpot_attainment": round(sum(tpot) / len(tpot), 4) if tpot else None,
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        # 0th, 1st, ..., 100th percentile: enough for a CDF plot
        "ttft_quantiles_s": [round(percentile(ttft, q), 3) for q in range(101)],
        "model_swaps": result.model_swaps,
        "swap_s": round(result.swap_s, 1),
        "busy_s_by_model": {m: round(v, 1) for m, v in result.busy_s_by_model.items()},
        "mean_batch_by_model": {m: round(v, 2) for m, v in result.batch_by_model.items()},
        "evictions": result.evictions,
        "planner_ms_p99": round(percentile(sorted(result.planner_ms), 99), 3),
        "plans": result.plans,
        "estimator_coverage": None if calibration is None else round(calibration.coverage(), 4),
        # the same, a wait estimated sure and right counted as the confidence, not as 1
        # (Calibration.pit_hits): the calibration where many waits are sure
        "estimator_coverage_pit": None if calibration is None
        else round(calibration.coverage_pit(), 4),
        # of the groups whose wait's quantile had room past its sure part (Calibration), and
        # how many: at low loads a handful, too few to judge a 95 % by
        "estimator_coverage_uncertain": None if calibration is None
        else round(calibration.coverage_uncertain(), 4),
        "estimator_uncertain_count": None if calibration is None else calibration.uncertain,
        "estimator_uncertain_share": None if calibration is None or not calibration.count
        else round(calibration.uncertain / calibration.count, 4),
    }


def load_profiles(instances, directory: pathlib.Path) -> list:
    fleet = []
    for inst in instances:
        profiles = {}
        for model, name in inst.profiles.items():
            path = directory / f"{name}.yaml"
            if not path.exists():
                raise SystemExit(f"qlm bench sim: no engine profile {path} for {inst.gpu} "
                                 f"serving {model}")
            profiles[model] = SimProfile.load(path)
        fleet.append((inst, profiles))
    return fleet


def load_kv_swap(instances, path: pathlib.Path = KV_SWAP) -> dict[str, dict[str, float]]:
    """instance -> model -> KV swap ms per token, for the profiles that path lists."""
    per_profile = yaml.safe_load(path.read_text()) if path.exists() else {}
    return {inst.name: {m: float(per_profile[p]) for m, p in inst.profiles.items()
                        if p in per_profile} for inst in instances}


def table(runs: list[dict], policies_: list[str]) -> str:
    lines = []
    for load in sorted({r["load"] for r in runs}):
        rows = {r["policy"]: r for r in runs if r["load"] == load}
        base = rows.get("fcfs")
        lines.append(f"\nload {load:g}x")
        classes = sorted({c for r in rows.values() for c in r["slo_attainment_by_class"]})
        head = f"{'policy':<12}{'SLO met':>9}{'/fcfs':>7}" + "".join(
            f"{c[:12]:>13}" for c in classes) + f"{'thr rps':>9}{'good rps':>9}" \
            f"{'TTFT p50':>10}{'TTFT p99':>10}{'swaps':>7}{'evict':>7}{'plan p99':>10}" \
            f"{'est cov':>9}{'PIT cov':>9}{'unsure cov (n)':>16}{'TPOT met':>10}"
        lines.append(head)
        for p in policies_:
            r = rows[p]
            ratio = (f"{r['slo_attainment'] / base['slo_attainment']:.2f}"
                     if base and base["slo_attainment"] else "-")
            lines.append(
                f"{p:<12}{r['slo_attainment']:>9.3f}{ratio:>7}" + "".join(
                    f"{r['slo_attainment_by_class'].get(c, 0):>13.3f}" for c in classes)
                + f"{r['throughput_rps']:>9.2f}{r['goodput_rps']:>9.2f}"
                f"{r['ttft_p50_s']:>10.2f}{r['ttft_p99_s']:>10.2f}{r['model_swaps']:>7}"
                f"{r['evictions']:>7}"
                f"{r['planner_ms_p99']:>8.2f}ms"
                + "".join(f"{r[k]:>9.3f}" if r.get(k) is not None else f"{'-':>9}"
                          for k in ("estimator_coverage", "estimator_coverage_pit"))
                + (f"{r['estimator_coverage_uncertain']:>9.3f}"
                   f" ({r['estimator_uncertain_count']:>5})"
                   if r.get("estimator_uncertain_count") else f"{'-':>16}")
                + (f"{r['tpot_attainment']:>10.3f}" if r.get("tpot_attainment") is not None
                   else f"{'-':>10}"))
    return "\n".join(lines)


def _simulate(requests, fleet, deadlines, kv_swap_ms, max_group_size, plan_s, scenario, load,
              name) -> dict:
    """One policy at one load (in a worker process when the runs go side by side)."""
    policy = make_policy(name, fleet, deadlines, kv_swap_ms, plan_s)
    result = Simulation(scale_load(requests, load), fleet, policy,
                        max_group_size=max_group_size, oracle=name == "oracle",
                        kv_swap_ms=kv_swap_ms, plan_time_s=plan_s).run()
    return summarize(result, scenario=scenario, load=load, policy=name,
                     calibration=getattr(policy, "calibration", None))


def default_jobs() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


PROGRESS_EVERY_S = 1.0  # how often a terminal's progress bar of runs side by side is redrawn


def run(trace: str, scenario: str, policy_names: list[str], loads: list[float], *,
        instances: int | None = None, seed: int = 0, profiles_dir: pathlib.Path = PROFILES,
        max_group_size: int = 32, limit: int | None = None, progress=True,
        jobs: int = 1, plan_ms: float | None = None) -> list[dict]:
    """Every policy at every load, in that order. jobs > 1 runs them side by side in as many
    processes, the slowest first (the plan generators at the highest loads): each run is
    independent, and the simulator charges each plan the time it took to compute, so a
    machine with fewer free CPUs than jobs makes the plan generators' runs a little worse.
    plan_ms: charge every plan this instead; the runs then repeat exactly (CP-SAT's, whose
    search stops on a time budget, aside)."""
    sc = get_scenario(scenario)
    requests = sc.assign(load_trace(trace)[:limit], seed)
    fleet = load_profiles(sc.instances(instances), profiles_dir)
    kv_swap_ms = load_kv_swap(sc.instances(instances))
    deadlines = {c.name: c.ttft_deadline_s for c in sc.slo_classes.values()}
    plan_s = None if plan_ms is None else plan_ms / 1000
    common = (requests, fleet, deadlines, kv_swap_ms, max_group_size, plan_s, scenario)
    tasks = [(load, name) for load in loads for name in policy_names]
    runs: dict[tuple, dict] = {}
    started = time.monotonic()

    def report(next_task=None) -> None:
        if progress:
            what = f" load {next_task[0]:g} {next_task[1]:<8}" if next_task else ""
            print(f"\r[{'#' * (20 * len(runs) // len(tasks)):<20}] {len(runs)}/{len(tasks)}"
                  f"{what} {time.monotonic() - started:6.1f}s", end="", file=sys.stderr,
                  flush=True)

    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            report(task)
            runs[task] = _simulate(*common, *task)
    else:
        slowest_first = sorted(tasks, key=lambda t: (t[1] in QLM_NAMES, t[0]), reverse=True)
        # spawned, not forked: a caller with gRPC threads running (a test, a service) would
        # fork their locks mid-call, and the runs hung
        with concurrent.futures.ProcessPoolExecutor(
                min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            pending = {pool.submit(_simulate, *common, *t): t for t in slowest_first}
            # on a terminal the clock ticks while runs compute (the first ones take minutes);
            # a log gets a line per finished run
            every = PROGRESS_EVERY_S if progress and sys.stderr.isatty() else None
            while pending:
                report()
                done, _ = concurrent.futures.wait(pending, timeout=every,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    runs[pending.pop(future)] = future.result()
    if progress:
        print(f"\r[{'#' * 20}] {len(tasks)}/{len(tasks)} in {time.monotonic() - started:.1f}s"
              + " " * 20, file=sys.stderr)
    return [runs[t] for t in tasks]


def main(args) -> int:
    policy_names = [p.strip() for p in args.policies.split(",") if p.strip()]
    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    for p in policy_names:
        if p not in POLICY_NAMES:
            print(f"qlm bench sim: unknown policy {p!r}; known: {', '.join(POLICY_NAMES)}",
                  file=sys.stderr)
            return 2
    if not loads or min(loads) <= 0:
        print("qlm bench sim: --loads must be positive numbers", file=sys.stderr)
        return 2
    if args.plan_ms is not None and args.plan_ms < 0:
        print("qlm bench sim: --plan-ms must be 0 or more", file=sys.stderr)
        return 2
    runs = run(args.trace, args.scenario, policy_names, loads, instances=args.instances,
               seed=args.seed, profiles_dir=pathlib.Path(args.profiles), limit=args.limit,
               jobs=args.jobs or default_jobs(), plan_ms=args.plan_ms)
    charged = "measured" if args.plan_ms is None else f"{args.plan_ms:g} ms each"
    print(f"scenario {args.scenario}, trace {args.trace}, seed {args.seed}, plans charged: "
          f"{charged}")
    print(table(runs, policy_names))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    if args.plots:
        written = write_plots(runs, pathlib.Path(args.plots))
        print(f"plots: {', '.join(str(p) for p in written)}")
    return 0
