"""The QLM policy's variants by name: one table for the planner service, the stack config's
check of `planner.policy` and the simulator's bench (which adds `oracle`, qlm told every
output length: it exists only where the lengths are known in advance)."""

from __future__ import annotations

from . import policies

# what each variant changes in PlanGenerator; qlm-cpsat is qlm whose plans CP-SAT refines
VARIANTS: dict[str, dict] = {
    "qlm": {},
    "qlm-cpsat": {},
    # step limits where TPOT-bound work runs (qlm/core/tpot.py): an opt-in, because on the
    # modern scenario they removed the few TPOT misses but cost more TTFT misses than that
    # (docs/benchmarks-history.md, "TPOT step limits")
    "qlm-tpot": {"tpot_limits": True},
    "qlm-noevict": {"max_evictions": 0},
    # workers with free slots do not take their model's groups from other workers' queues
    # (PlanGenerator.pull_elsewhere): for comparison
    "qlm-nopull": {"pull_elsewhere": False},
}

# what a planner can run
PLANNER_POLICIES = (*policies.NAMES, *VARIANTS)


def check(name: str) -> None:
    """Raises ValueError, saying what a planner can run, unless it can run `name`."""
    if name in PLANNER_POLICIES:
        return
    why = (" (the oracle knows every output length in advance: qlm bench sim only)"
           if name == "oracle" else "")
    raise ValueError(f"unknown planner policy {name!r}{why}; known: "
                     f"{', '.join(PLANNER_POLICIES)}")


def build(variant: str, throughput, **options):
    """The plan generator of `variant`, with the caller's options (engine profiles, swap
    times, deadlines) under the variant's own."""
    # imported here, not above: the config check needs the names, not numpy and OR-Tools
    from .cpsat import RefinedPlanGenerator
    from .plan_generator import PlanGenerator

    generator = PlanGenerator(throughput, **{"name": variant, **options, **VARIANTS[variant]})
    return RefinedPlanGenerator(generator) if variant == "qlm-cpsat" else generator
