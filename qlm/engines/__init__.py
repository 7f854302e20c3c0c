"""Model-serving engines behind one interface (see base.py), and the factory workers use."""

from __future__ import annotations

import numbers

from qlm.config import ConfigError, StackConfig, WorkerConfig
from qlm.engines.base import Engine, EngineError

_SIM_OPTIONS = {"profile", "time_scale"}


def create_engine(worker: WorkerConfig, stack: StackConfig) -> Engine:
    """The engine a worker entry of the stack config asks for (not started yet)."""
    if worker.engine == "sim":
        # Imported here so that engines with heavy dependencies (vllm) load only when used.
        from qlm.engines.sim import SimEngine, SimProfile

        where = f"workers.{worker.id}"
        unknown = sorted(set(worker.options) - _SIM_OPTIONS)
        if unknown:
            raise ConfigError(f"{where}: unknown sim engine options {unknown}")
        if not worker.options.get("profile"):
            raise ConfigError(f"{where}: the sim engine needs a `profile` file")
        time_scale = worker.options.get("time_scale", 1.0)
        if (
            not isinstance(time_scale, numbers.Real)
            or isinstance(time_scale, bool)
            or time_scale < 0
        ):
            raise ConfigError(f"{where}.time_scale must be a number >= 0, got {time_scale!r}")
        profile = SimProfile.load(stack.resolve(str(worker.options["profile"])))
        return SimEngine(list(worker.models), profile, float(time_scale))
    raise EngineError(f"workers.{worker.id}: unknown engine kind {worker.engine!r} (known: sim)")
