"""Input side of the fleet simulator (`qlm bench sim`): request traces (traces) and the
scenarios that give each request a model, an SLO class and a fleet to run on (scenarios)."""

from qlm.sim.scenarios import (
    SCENARIOS,
    InstanceSpec,
    Scenario,
    SimRequest,
    SloClass,
)
from qlm.sim.scenarios import get as get_scenario
from qlm.sim.traces import (
    TraceRequest,
    TraceStats,
    effective_output,
    load_trace,
    scale_load,
    trace_stats,
)

__all__ = [
    "SCENARIOS",
    "InstanceSpec",
    "Scenario",
    "SimRequest",
    "SloClass",
    "TraceRequest",
    "TraceStats",
    "effective_output",
    "get_scenario",
    "load_trace",
    "scale_load",
    "trace_stats",
]
