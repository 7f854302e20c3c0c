"""The stack configuration: one YAML file (deploy/local.yaml is the default) read by the launcher
and by every service, so the router, planner and workers agree on models and SLO classes."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import yaml

from .core import variants

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "local.yaml"
REDIS_URL_ENV = "QLM_REDIS_URL"


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    # Prompt plus output tokens, at most.
    max_model_len: int
    # Largest max_tokens a request may ask for.
    max_tokens: int
    # Real engines: the model's folder (relative to the config file) or hub name.
    path: str = ""
    # When set and `path` holds no model, `qlm up` makes a tiny random model there with this
    # seed (qlm make-tiny-model): the CPU demo and CI need no model hub.
    tiny_seed: int | None = None


@dataclasses.dataclass(frozen=True)
class SloClassConfig:
    name: str
    ttft_deadline_ms: int
    # Queued (not yet running) requests of this class before the router refuses more.
    max_queued: int
    # Time per output token after the first, milliseconds (None: no TPOT objective). A request
    # of the class meets its SLO only if it keeps both; the `qlm-tpot` planner policy caps the
    # steps of workers running TPOT-bound work so it does (qlm/core/tpot.py).
    tpot_deadline_ms: int | None = None


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    id: str
    listen: str
    # The address the planner dials; defaults to `listen` (differs behind NAT or in compose).
    advertise: str
    engine: str
    models: tuple[str, ...]
    # Engine-specific settings (for sim: profile file, time_scale).
    options: dict


@dataclasses.dataclass(frozen=True)
class StackConfig:
    path: pathlib.Path
    redis_url: str  # "embedded" or a redis:// URL
    router_listen: str
    router_max_message_bytes: int
    planner_listen: str
    planner_policy: str
    planner_interval_ms: int
    lease_ms: int
    heartbeat_ms: int
    max_group_size: int
    # Finished requests (state and output) are kept this long for GetRequest and Watch.
    retention_s: int
    default_slo_class: str
    slo_classes: dict[str, SloClassConfig]
    models: dict[str, ModelConfig]
    workers: tuple[WorkerConfig, ...]

    def resolve(self, relative: str) -> pathlib.Path:
        """A path from the config file, relative to the file's folder."""
        p = pathlib.Path(relative)
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def worker(self, worker_id: str) -> WorkerConfig:
        for w in self.workers:
            if w.id == worker_id:
                return w
        known = [w.id for w in self.workers]
        raise ConfigError(f"{self.path}: no worker {worker_id!r} (have {known})")


def _positive_int(section: str, raw: dict, key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"{section}.{key} is required")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{section}.{key} must be a positive integer, got {value!r}")
    return value


def load(path: str | os.PathLike | None = None) -> StackConfig:
    """Reads and checks a stack config; QLM_REDIS_URL overrides its redis.url."""
    path = pathlib.Path(path or DEFAULT_CONFIG).resolve()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e

    redis = raw.get("redis") or {}
    router = raw.get("router") or {}
    planner = raw.get("planner") or {}
    limits = raw.get("limits") or {}

    models = {}
    for name, m in (raw.get("models") or {}).items():
        m = m or {}
        mc = ModelConfig(
            name=name,
            max_model_len=_positive_int(f"models.{name}", m, "max_model_len"),
            max_tokens=_positive_int(f"models.{name}", m, "max_tokens"),
            path=str(m.get("path") or ""),
            tiny_seed=m.get("tiny_seed"),
        )
        if mc.tiny_seed is not None and (
                not isinstance(mc.tiny_seed, int) or isinstance(mc.tiny_seed, bool)):
            raise ConfigError(f"models.{name}.tiny_seed must be an integer")
        if mc.tiny_seed is not None and not mc.path:
            raise ConfigError(f"models.{name}: tiny_seed needs a path to write the model to")
        if mc.max_tokens >= mc.max_model_len:
            raise ConfigError(f"models.{name}: max_tokens must be below max_model_len")
        models[name] = mc
    if not models:
        raise ConfigError(f"{path}: no models configured")

    policy = str(planner.get("policy", "qlm"))
    try:
        variants.check(policy)
    except ValueError as e:
        raise ConfigError(f"planner.policy: {e}") from None

    classes = {}
    for name, c in (raw.get("slo_classes") or {}).items():
        c = c or {}
        classes[name] = SloClassConfig(
            name=name,
            ttft_deadline_ms=_positive_int(f"slo_classes.{name}", c, "ttft_deadline_ms"),
            max_queued=_positive_int(f"slo_classes.{name}", c, "max_queued", 10000),
            tpot_deadline_ms=(_positive_int(f"slo_classes.{name}", c, "tpot_deadline_ms")
                              if c.get("tpot_deadline_ms") is not None else None),
        )
    if not classes:
        raise ConfigError(f"{path}: no slo_classes configured")
    default_class = raw.get("default_slo_class") or next(iter(classes))
    if default_class not in classes:
        raise ConfigError(f"default_slo_class {default_class!r} is not in slo_classes")

    workers = []
    seen = set()
    for i, w in enumerate(raw.get("workers") or []):
        options = dict(w)
        wid = str(options.pop("id", f"w{i}"))
        if wid in seen:
            raise ConfigError(f"workers: duplicate id {wid!r}")
        seen.add(wid)
        listen = str(options.pop("listen", ""))
        if not listen:
            raise ConfigError(f"workers.{wid}.listen is required")
        served = tuple(options.pop("models", ()) or ())
        for m in served:
            if m not in models:
                raise ConfigError(f"workers.{wid} serves unknown model {m!r}")
        if not served:
            raise ConfigError(f"workers.{wid}: no models")
        workers.append(
            WorkerConfig(
                id=wid,
                listen=listen,
                advertise=str(options.pop("advertise", listen)),
                engine=str(options.pop("engine", "sim")),
                models=served,
                options=options,
            )
        )

    return StackConfig(
        path=path,
        redis_url=os.environ.get(REDIS_URL_ENV) or str(redis.get("url", "embedded")),
        router_listen=str(router.get("listen", "127.0.0.1:50051")),
        router_max_message_bytes=_positive_int("router", router, "max_message_bytes", 4 << 20),
        planner_listen=str(planner.get("listen", "127.0.0.1:50052")),
        planner_policy=policy,
        planner_interval_ms=_positive_int("planner", planner, "interval_ms", 250),
        lease_ms=_positive_int("limits", limits, "lease_ms", 3000),
        heartbeat_ms=_positive_int("limits", limits, "heartbeat_ms", 500),
        max_group_size=_positive_int("limits", limits, "max_group_size", 32),
        retention_s=_positive_int("limits", limits, "retention_s", 3600),
        default_slo_class=default_class,
        slo_classes=classes,
        models=models,
        workers=tuple(workers),
    )
