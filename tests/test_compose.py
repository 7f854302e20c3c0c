"""Checks docker-compose.yml, deploy/Dockerfile and deploy/compose.yaml without a Docker engine.

The compose schema catches misspelt keys; the cross-reference checks below catch what the schema
cannot: a depends_on naming no service, a config path that is not in the image, a worker whose
compose service name is not the host the planner dials, a healthcheck probing the wrong port.

Each check is a function from the parsed files to a list of problems, so that the tests at the
bottom can feed it a broken copy and see it complain (a check that cannot fail proves nothing).
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import PurePosixPath

import pytest
import yaml

from qlm import config as qlm_config
from qlm.engines import create_engine
from qlm.engines.base import EngineError

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# The image's WORKDIR, where the Dockerfile puts the project: /app/X in a command is X in the repo.
APP_DIR = PurePosixPath("/app")
# Addresses a containerised service must listen on to be reachable from other containers.
ALL_INTERFACES = {"0.0.0.0", "::", "[::]"}


# --- reading compose services -------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def command_args(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE`, None when the flag is absent."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def qlm_role(service: dict) -> str | None:
    """Role "router", "planner" or "worker" for a `python -m services.X` command, else None."""
    args = command_args(service)
    for i, arg in enumerate(args[:-1]):
        if arg == "-m" and args[i + 1].startswith("services."):
            return args[i + 1].split(".", 1)[1]
    return None


def qlm_services(compose: dict) -> dict[str, tuple[str, dict]]:
    """Service name -> (role, service) for the services that run a QLM service."""
    out = {}
    for name, svc in (compose.get("services") or {}).items():
        role = qlm_role(svc or {})
        if role:
            out[name] = (role, svc)
    return out


def depends_on_names(service: dict) -> dict[str, str | None]:
    """depends_on in either form (list or mapping) -> {service: condition or None}."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: None for d in deps}
    return {d: (spec or {}).get("condition") for d, spec in deps.items()}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def healthcheck_addr(service: dict) -> str | None:
    """The HOST:PORT argument of a `qlm health HOST:PORT` healthcheck, None if there is none."""
    test = (service.get("healthcheck") or {}).get("test") or []
    args = shlex.split(test) if isinstance(test, str) else [str(a) for a in test]
    for i, arg in enumerate(args[:-1]):
        if arg == "health" and i > 0 and args[i - 1].endswith("qlm"):
            return args[i + 1]
    return None


def container_ports(entries: list) -> set[int]:
    """Container-side ports of `ports:` or `expose:` entries: "H:C", "IP:H:C", "C/tcp", {target}.
    (Port ranges are not used here and are not understood.)"""
    out = set()
    for e in entries or []:
        if isinstance(e, dict):
            out.add(int(e["target"]))
        else:
            out.add(int(str(e).split("/")[0].rsplit(":", 1)[-1]))
    return out


def repo_path(image_path: str, root: pathlib.Path) -> pathlib.Path | None:
    """Where a path inside the image comes from in the repo (/app/X -> root/X; a relative path is
    relative to WORKDIR /app); None for a path outside /app, which the project cannot provide."""
    p = PurePosixPath(image_path)
    if not p.is_absolute():
        p = APP_DIR / p
    if p != APP_DIR and APP_DIR not in p.parents:
        return None
    return root.joinpath(*p.relative_to(APP_DIR).parts)


def load_configs(compose: dict, root: pathlib.Path) -> dict[str, qlm_config.StackConfig]:
    """Service name -> its loaded --config, for the services whose config exists and loads
    (check_config_files reports the others)."""
    out = {}
    for name, (_, svc) in qlm_services(compose).items():
        cfg_arg = flag_value(command_args(svc), "--config")
        path = repo_path(cfg_arg, root) if cfg_arg else None
        if path and path.is_file():
            try:
                out[name] = qlm_config.load(path)
            except qlm_config.ConfigError:
                pass
    return out


# --- the checks: each returns a list of problems, empty when all is well -------------------------


def check_depends_on(compose: dict) -> list[str]:
    services = compose.get("services") or {}
    problems = []
    for name, svc in services.items():
        for dep, condition in depends_on_names(svc or {}).items():
            if dep not in services:
                problems.append(f"{name}: depends_on unknown service {dep!r}")
            elif condition == "service_healthy" and not (services[dep] or {}).get("healthcheck"):
                # Compose would wait forever for a health status that never comes.
                problems.append(f"{name}: waits for {dep} to be healthy, but it has no healthcheck")
    return problems


def check_volumes(compose: dict) -> list[str]:
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, svc in (compose.get("services") or {}).items():
        for v in (svc or {}).get("volumes") or []:
            if isinstance(v, dict):
                source = v.get("source") if v.get("type", "volume") == "volume" else None
            else:
                source = str(v).split(":", 1)[0] if ":" in str(v) else None
            # Bind mounts start with a path; a bare name is a named volume.
            if source and not source.startswith((".", "/", "~", "$")) and source not in declared:
                problems.append(f"{name}: named volume {source!r} is not declared under volumes:")
    return problems


def check_builds(compose: dict, root: pathlib.Path) -> list[str]:
    problems = []
    for name, svc in (compose.get("services") or {}).items():
        build = (svc or {}).get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        # The context is relative to the compose file, the dockerfile relative to the context.
        context = root / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not context.is_dir():
            problems.append(f"{name}: build context {context} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: dockerfile {dockerfile} does not exist")
    return problems


def check_config_files(compose: dict, root: pathlib.Path) -> list[str]:
    problems = []
    for name, (_, svc) in qlm_services(compose).items():
        cfg_arg = flag_value(command_args(svc), "--config")
        if cfg_arg is None:
            # Without it a service falls back to deploy/local.yaml: embedded redis, loopback.
            problems.append(f"{name}: no --config in its command")
            continue
        path = repo_path(cfg_arg, root)
        if path is None:
            problems.append(f"{name}: --config {cfg_arg} is outside {APP_DIR}, not from the repo")
        elif not path.is_file():
            problems.append(f"{name}: --config {cfg_arg} does not exist ({path})")
        else:
            try:
                qlm_config.load(path)
            except qlm_config.ConfigError as e:
                problems.append(f"{name}: --config {cfg_arg} does not load: {e}")
    return problems


def check_workers(compose: dict, root: pathlib.Path) -> list[str]:
    problems = []
    configs = load_configs(compose, root)
    # Config file -> {worker id: services running it}, to find workers run twice or not at all.
    running: dict[pathlib.Path, dict[str, list[str]]] = {}
    for name, (role, svc) in qlm_services(compose).items():
        if role != "worker" or name not in configs:
            continue
        cfg = configs[name]
        wid = flag_value(command_args(svc), "--worker-id")
        if wid is None:
            problems.append(f"{name}: worker without --worker-id")
            continue
        running.setdefault(cfg.path, {}).setdefault(wid, []).append(name)
        try:
            worker = cfg.worker(wid)
        except qlm_config.ConfigError:
            problems.append(f"{name}: --worker-id {wid} is not a worker in {cfg.path.name}")
            continue
        host, port = split_addr(worker.advertise)
        # The planner dials `advertise`; on the compose network that host is the service name.
        if host != name:
            problems.append(f"{name}: worker {wid} advertises {worker.advertise}, not {name}:...")
        # No port mapping between containers: the advertised port must be the one listened on.
        if port != split_addr(worker.listen)[1]:
            problems.append(
                f"{name}: worker {wid} advertises port {port}, listens on {worker.listen}"
            )
        # Building the engine (not starting it) reads the sim profile, which the config names
        # relative to itself: a missing or malformed profile shows up here, not as a worker
        # restarting in a loop under compose.
        try:
            create_engine(worker, cfg)
        except (qlm_config.ConfigError, EngineError) as e:
            problems.append(f"{name}: worker {wid} has no usable engine: {e}")
    for path, by_id in running.items():
        cfg = qlm_config.load(path)
        for w in cfg.workers:
            services = by_id.get(w.id, [])
            if not services:
                problems.append(f"worker {w.id} of {path.name} has no compose service")
            elif len(services) > 1:
                problems.append(f"worker {w.id} is run by several services: {services}")
    return problems


def check_ports(compose: dict, root: pathlib.Path) -> list[str]:
    problems = []
    configs = load_configs(compose, root)
    for name, (role, svc) in qlm_services(compose).items():
        if name not in configs:
            continue
        cfg = configs[name]
        if role == "router":
            listen = cfg.router_listen
        elif role == "planner":
            listen = cfg.planner_listen
        else:
            wid = flag_value(command_args(svc), "--worker-id")
            if wid not in {w.id for w in cfg.workers}:
                continue  # check_workers reports it
            listen = cfg.worker(wid).listen
        host, port = split_addr(listen)
        if host not in ALL_INTERFACES:
            problems.append(f"{name}: listens on {listen}, unreachable from outside its container")
        health = healthcheck_addr(svc)
        if health is None:
            problems.append(f"{name}: no `qlm health` healthcheck")
        elif split_addr(health)[1] != port:
            problems.append(f"{name}: healthcheck probes {health}, the service listens on {listen}")
        for key in ("ports", "expose"):
            ports = container_ports(svc.get(key))
            if ports and port not in ports:
                problems.append(f"{name}: {key} {sorted(ports)} miss the listen port {port}")
        # Clients reach the mesh through the router only, so it must be published to the host.
        if role == "router" and port not in container_ports(svc.get("ports")):
            problems.append(f"{name}: router port {port} is not published")
    return problems


def check_redis(compose: dict, root: pathlib.Path) -> list[str]:
    services = compose.get("services") or {}
    problems = []
    for name, (_, svc) in qlm_services(compose).items():
        url = environment(svc).get(qlm_config.REDIS_URL_ENV)
        if not url:
            problems.append(f"{name}: {qlm_config.REDIS_URL_ENV} is not set")
            continue
        host = re.sub(r"^rediss?://([^@/]*@)?", "", url).split("/")[0].rsplit(":", 1)[0]
        if host not in services:
            problems.append(f"{name}: {qlm_config.REDIS_URL_ENV}={url} names no compose service")
        elif depends_on_names(svc).get(host) != "service_healthy":
            problems.append(f"{name}: does not wait for {host} to be healthy")
        # The env var wins, but a config that says otherwise would mislead whoever reads it.
        cfg_arg = flag_value(command_args(svc), "--config")
        path = repo_path(cfg_arg, root) if cfg_arg else None
        if path and path.is_file():
            file_url = ((yaml.safe_load(path.read_text()) or {}).get("redis") or {}).get("url")
            if file_url != url:
                problems.append(f"{name}: {qlm_config.REDIS_URL_ENV}={url}, config says {file_url}")
    return problems


COMPOSE_CHECKS: dict[str, Callable[[dict, pathlib.Path], list[str]]] = {
    "depends_on": lambda c, root: check_depends_on(c),
    "volumes": lambda c, root: check_volumes(c),
    "builds": check_builds,
    "config_files": check_config_files,
    "workers": check_workers,
    "ports": check_ports,
    "redis": check_redis,
}


# --- the Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_or_shell(args: str) -> list[str]:
    """Arguments of an instruction in exec form (["a", "b"]) or shell form (a b)."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def dockerfile_copies(text: str) -> list[tuple[list[str], PurePosixPath, bool]]:
    """(sources, absolute destination, destination is a folder) of each COPY/ADD from the build
    context."""
    out, workdir = [], PurePosixPath("/")
    for word, args in dockerfile_instructions(text):
        if word == "WORKDIR":
            workdir = workdir / args
        elif word in ("COPY", "ADD"):
            parts = exec_or_shell(args)
            flags = [p for p in parts if p.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue  # from another stage or image, not from the repo
            *sources, dest = [p for p in parts if not p.startswith("--")]
            dest_path = workdir / dest
            # A trailing slash (or several sources) makes the destination a folder.
            is_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
            out.append((sources, dest_path, is_dir))
    return out


def image_source(image_path: PurePosixPath, text: str, root: pathlib.Path) -> pathlib.Path | None:
    """The repo file that ends up at image_path according to the Dockerfile's COPYs, if any."""
    found = None
    for sources, dest, dest_is_dir in dockerfile_copies(text):
        for src in sources:
            s = root / src
            if s.is_dir():
                # COPY of a folder copies its contents to the destination.
                if image_path == dest or dest in image_path.parents:
                    found = s.joinpath(*image_path.relative_to(dest).parts)
            elif (dest / s.name if dest_is_dir else dest) == image_path:
                found = s
    return found  # the last COPY to a path wins, as in a build


def check_dockerfile(text: str, root: pathlib.Path) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(text)
    for sources, dest, _ in dockerfile_copies(text):
        for src in sources:
            # Globs and URLs are not used here; a literal missing path fails the build.
            if not (root / src).exists():
                problems.append(f"COPY {src} -> {dest}: {src} is not in the build context")
    workdirs = [args for word, args in instructions if word == "WORKDIR"]
    if not workdirs or PurePosixPath(workdirs[-1]) != APP_DIR:
        problems.append(f"WORKDIR is {workdirs[-1] if workdirs else None}, expected {APP_DIR}")
    if not any(word == "USER" and args not in ("root", "0") for word, args in instructions):
        problems.append("no USER: the services would run as root")
    cmds = [exec_or_shell(args) for word, args in instructions if word == "CMD"]
    cfg_arg = flag_value(cmds[-1], "--config") if cmds else None
    if cfg_arg and image_source(APP_DIR / cfg_arg, text, root) is None:
        problems.append(f"CMD's --config {cfg_arg} is not copied into the image")
    return problems


def check_image_has_configs(compose: dict, dockerfile_text: str, root: pathlib.Path) -> list[str]:
    """Every --config a compose command passes, and every sim profile a worker's config names, is a
    file the Dockerfile copies into the image."""
    problems = []
    configs = load_configs(compose, root)
    for name, (role, svc) in qlm_services(compose).items():
        args = command_args(svc)
        cfg_arg = flag_value(args, "--config")
        if cfg_arg is None:
            continue  # check_config_files reports it
        src = image_source(APP_DIR / cfg_arg, dockerfile_text, root)
        if src is None or not src.is_file():
            problems.append(f"{name}: --config {cfg_arg} is not copied into the image")
        cfg = configs.get(name)
        wid = flag_value(args, "--worker-id")
        if role != "worker" or cfg is None or wid not in {w.id for w in cfg.workers}:
            continue  # check_config_files / check_workers report it
        profile = cfg.worker(wid).options.get("profile")
        if profile is None:
            continue
        # The profile is relative to the config; in the image that is the same place under /app.
        resolved = cfg.resolve(str(profile))
        if not resolved.is_relative_to(root):
            problems.append(f"{name}: profile {resolved} is outside the repo")
            continue
        image_path = APP_DIR.joinpath(*resolved.relative_to(root).parts)
        src = image_source(image_path, dockerfile_text, root)
        if src is None or not src.is_file():
            problems.append(f"{name}: profile {image_path} is not copied into the image")
    return problems


# --- tests: the real files -----------------------------------------------------------------------


def compose_schema_check(path: pathlib.Path) -> subprocess.CompletedProcess:
    """Runs check-jsonschema (installed next to this Python) with the compose-spec schema it
    ships, so no network is needed."""
    exe = pathlib.Path(sys.executable).parent / "check-jsonschema"
    cmd = [str(exe), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_compose_file_matches_the_compose_schema():
    result = compose_schema_check(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  router:\n    image: x\n    restart: sometimes\n    prots: []\n")
    result = compose_schema_check(broken)
    assert result.returncode != 0, result.stdout


@pytest.mark.parametrize("check", sorted(COMPOSE_CHECKS))
def test_compose_cross_references(check):
    assert COMPOSE_CHECKS[check](load_compose(), ROOT) == []


def test_expected_services_are_defined():
    services = load_compose()["services"]
    assert {"redis", "planner", "router", "w0", "w1", "w2", "w3"} <= set(services)
    roles = {name: role for name, (role, _) in qlm_services(load_compose()).items()}
    assert roles == {
        "planner": "planner",
        "router": "router",
        "w0": "worker",
        "w1": "worker",
        "w2": "worker",
        "w3": "worker",
    }


def test_dockerfile_copies_exist_and_config_is_in_the_image():
    text = DOCKERFILE.read_text()
    assert check_dockerfile(text, ROOT) == []
    assert check_image_has_configs(load_compose(), text, ROOT) == []


def test_compose_config_loads(monkeypatch):
    monkeypatch.delenv(qlm_config.REDIS_URL_ENV, raising=False)
    cfg = qlm_config.load(ROOT / "deploy" / "compose.yaml")
    assert cfg.redis_url == "redis://redis:6379/0"
    assert [w.id for w in cfg.workers] == ["w0", "w1", "w2", "w3"]


def test_compose_config_matches_local_config():
    """Same models, SLO classes, limits and worker roles as deploy/local.yaml; only addresses
    (and Redis) differ, so a stack behaves the same under `qlm up` and docker-compose."""
    local = qlm_config.load(ROOT / "deploy" / "local.yaml")
    stack = qlm_config.load(ROOT / "deploy" / "compose.yaml")
    same = [
        "router_max_message_bytes", "planner_policy", "planner_interval_ms", "lease_ms",
        "heartbeat_ms", "max_group_size", "retention_s", "default_slo_class", "slo_classes",
        "models",
    ]  # fmt: skip
    for field in same:
        assert getattr(stack, field) == getattr(local, field), field

    def roles(cfg):
        return [(w.id, w.engine, w.models, w.options) for w in cfg.workers]

    assert roles(stack) == roles(local)


# --- tests: each check reports a broken copy -----------------------------------------------------


def _set_command_flag(compose: dict, service: str, flag: str, value: str) -> None:
    args = command_args(compose["services"][service])
    args[args.index(flag) + 1] = value
    compose["services"][service]["command"] = args


def _rename_service(compose: dict, old: str, new: str) -> None:
    compose["services"][new] = compose["services"].pop(old)


# (check, how to break the parsed compose file, a word the problem report must contain).
# Mutations replace values rather than editing them in place: `<<: *qlm` merges share objects.
BREAKAGES = {
    "unknown dependency": (
        "depends_on",
        lambda c: c["services"]["router"].update(
            depends_on={"redsi": {"condition": "service_started"}}
        ),
        "redsi",
    ),
    "healthy dependency without healthcheck": (
        "depends_on",
        lambda c: c["services"]["redis"].pop("healthcheck"),
        "no healthcheck",
    ),
    "undeclared volume": ("volumes", lambda c: c.pop("volumes"), "redis-data"),
    "missing build context": (
        "builds",
        lambda c: c["services"]["w2"].update(build={"context": "nope"}),
        "nope",
    ),
    "missing dockerfile": (
        "builds",
        lambda c: c["services"]["w2"].update(build={"context": ".", "dockerfile": "deploy/Nope"}),
        "Nope",
    ),
    "missing config file": (
        "config_files",
        lambda c: _set_command_flag(c, "planner", "--config", "/app/deploy/missing.yaml"),
        "missing.yaml",
    ),
    "config outside /app": (
        "config_files",
        lambda c: _set_command_flag(c, "planner", "--config", "/etc/qlm.yaml"),
        "outside",
    ),
    "no --config": (
        "config_files",
        lambda c: c["services"]["router"].update(command=["python", "-m", "services.router"]),
        "no --config",
    ),
    "unknown worker id": (
        "workers",
        lambda c: _set_command_flag(c, "w1", "--worker-id", "w9"),
        "w9",
    ),
    "service name is not the advertised host": (
        "workers",
        lambda c: _rename_service(c, "w0", "worker0"),
        "worker0",
    ),
    "configured worker without service": (
        "workers",
        lambda c: c["services"].pop("w3"),
        "no compose service",
    ),
    "worker run twice": (
        "workers",
        lambda c: _set_command_flag(c, "w3", "--worker-id", "w2"),
        "several services",
    ),
    "router port not published": (
        "ports",
        lambda c: c["services"]["router"].update(ports=["8080:8080"]),
        "not published",
    ),
    "healthcheck on the wrong port": (
        "ports",
        lambda c: c["services"]["w1"].update(
            healthcheck={"test": ["CMD", "qlm", "health", "127.0.0.1:50099"]}
        ),
        "50099",
    ),
    "no qlm healthcheck": (
        "ports",
        lambda c: c["services"]["planner"].pop("healthcheck"),
        "no `qlm health`",
    ),
    "expose misses the listen port": (
        "ports",
        lambda c: c["services"]["planner"].update(expose=["50099"]),
        "50052",
    ),
    "redis url names no service": (
        "redis",
        lambda c: c["services"]["router"].update(
            environment={"QLM_REDIS_URL": "redis://cache:6379/0"}
        ),
        "cache",
    ),
    "redis url unset": (
        "redis",
        lambda c: c["services"]["router"].update(environment={}),
        "not set",
    ),
    "does not wait for healthy redis": (
        "redis",
        lambda c: c["services"]["w0"].update(depends_on=["redis"]),
        "healthy",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_check_reports_broken_compose(breakage):
    check, breaker, expected = BREAKAGES[breakage]
    compose = copy.deepcopy(load_compose())
    breaker(compose)
    problems = COMPOSE_CHECKS[check](compose, ROOT)
    assert any(expected in p for p in problems), problems


def _repo_with_config(tmp_path: pathlib.Path, edit: Callable[[str], str]) -> pathlib.Path:
    """A fake repo root holding an edited deploy/compose.yaml and the sim profiles it names."""
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    edited = edit(text)
    assert edited != text, "the edit did not apply"
    shutil.copytree(ROOT / "deploy" / "profiles", tmp_path / "deploy" / "profiles")
    (tmp_path / "deploy" / "compose.yaml").write_text(edited)
    return tmp_path


@pytest.mark.parametrize(
    "check, edit, expected",
    [
        # A worker on loopback inside its container: the planner could never reach it.
        ("ports", lambda t: t.replace("listen: 0.0.0.0:50062", "listen: 127.0.0.1:50062"), "w2"),
        ("ports", lambda t: t.replace("listen: 0.0.0.0:50051", "listen: 0.0.0.0:50099"), "router"),
        ("workers", lambda t: t.replace("advertise: w1:50061", "advertise: w1:6000"), "w1"),
        ("workers", lambda t: t.replace("advertise: w3:50063", "advertise: w03:50063"), "w03"),
        ("redis", lambda t: t.replace("url: redis://redis:6379/0", "url: embedded"), "embedded"),
        ("config_files", lambda t: t.replace("max_tokens: 2048", "max_tokens: 9999"), "load"),
        ("workers", lambda t: t.replace("profiles/sim-large", "profiles/sim-huge"), "sim-huge"),
        (
            "workers",
            lambda t: t.replace("engine: sim, models: [small]", "engine: gpu, models: [small]"),
            "gpu",
        ),
    ],
)
def test_check_reports_broken_stack_config(tmp_path, check, edit, expected):
    root = _repo_with_config(tmp_path, edit)
    problems = COMPOSE_CHECKS[check](load_compose(), root)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace("COPY services ./services", "COPY servicez ./services"), "servicez"),
        (lambda t: t.replace("WORKDIR /app", "WORKDIR /srv"), "WORKDIR"),
        (lambda t: t.replace("USER qlm", ""), "USER"),
        (lambda t: t.replace("COPY deploy ./deploy", ""), "CMD's --config"),
    ],
)
def test_dockerfile_check_reports_broken_dockerfile(edit, expected):
    text = DOCKERFILE.read_text()
    edited = edit(text)
    assert edited != text, "the edit did not apply"
    problems = check_dockerfile(edited, ROOT)
    assert any(expected in p for p in problems), problems


def test_image_check_reports_profile_not_copied():
    text = DOCKERFILE.read_text().replace(
        "COPY deploy ./deploy", "COPY deploy/compose.yaml ./deploy/"
    )
    problems = check_image_has_configs(load_compose(), text, ROOT)
    assert any("profile /app/deploy/profiles/sim-small.yaml" in p for p in problems), problems


def test_image_check_reports_config_not_copied():
    text = DOCKERFILE.read_text().replace(
        "COPY deploy ./deploy", "COPY deploy/local.yaml ./deploy/"
    )
    problems = check_image_has_configs(load_compose(), text, ROOT)
    assert any("not copied" in p for p in problems), problems
