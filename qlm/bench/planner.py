"""`qlm bench planner`: how long the policies take to plan a fleet snapshot, at the sizes the
project aims at (1,000 groups on 64 instances: p99 < 100 ms; 10,000 on 512: p99 < 1 s)."""

from __future__ import annotations

import json
import pathlib
import random
import time

from qlm.bench import percentile
from qlm.core import policies
from qlm.core.estimator import InstanceThroughput
from qlm.core.plan import GroupView, Snapshot, WorkerView
from qlm.core.plan_generator import PlanGenerator
from qlm.engines.sim import SimProfile

PROFILE = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "profiles" / "sim-small.yaml"
SIZES = ((1000, 64), (10000, 512))


def snapshot(groups: int, workers: int, models: int = 2, seed: int = 0) -> Snapshot:
    """A busy fleet: every worker half full, groups of mixed models, classes and deadlines."""
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(models)]
    return Snapshot(
        now_ms=0,
        groups=tuple(
            GroupView(id=f"g{i}", model=rng.choice(names), slo_class=rng.choice(["i", "b"]),
                      deadline_ms=int(rng.uniform(1, 600) * 1000), sequence=i,
                      queued=rng.randint(1, 32), prompt_tokens=rng.randint(10, 4000))
            for i in range(groups)),
        workers=tuple(
            WorkerView(id=f"w{i}", models=tuple(names), max_running=64,
                       loaded=names[i % models], running=32,
                       running_work=(("i", rng.randint(0, 200), 0),) * 32)
            for i in range(workers)),
    )


def qlm_policy(workers: int, models: int = 2) -> PlanGenerator:
    profile = SimProfile.load(PROFILE)
    tp = InstanceThroughput()
    for w in range(workers):
        for m in range(models):
            tp.set_profile(f"w{w}", f"m{m}", profile)
    return PlanGenerator(tp, swap_s=lambda w: profile.warm_load_ms / 1000)


def measure(policy, snap: Snapshot, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        policy(snap)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


def main(args) -> int:
    rows = []
    for groups, workers in SIZES:
        snap = snapshot(groups, workers)
        repeats = args.repeats if groups <= 1000 else max(3, args.repeats // 10)
        for name, policy in (("edf", policies.edf), ("qlm", qlm_policy(workers))):
            t = measure(policy, snap, repeats)
            rows.append({"groups": groups, "instances": workers, "policy": name,
                         "repeats": repeats, "p50_ms": round(percentile(t, 50), 2),
                         "p99_ms": round(percentile(t, 99), 2)})
    print(f"{'groups':>7}{'instances':>10}{'policy':>8}{'runs':>6}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(f"{r['groups']:>7}{r['instances']:>10}{r['policy']:>8}{r['repeats']:>6}"
              f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0
