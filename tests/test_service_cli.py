"""Each service started on its own, as the README shows: a config it cannot start with ends it
at once with status 2 and the reason, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .harness import ROOT, write_config


def start(*argv: str, env_redis: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QLM_REDIS_URL"}
    if env_redis is not None:
        env["QLM_REDIS_URL"] = env_redis
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("service", [
    ("services.router",), ("services.planner",), ("services.worker", "--worker-id", "w0")])
def test_a_service_alone_on_the_embedded_redis_says_how_to_name_one(service):
    # deploy/local.yaml says redis.url: embedded, which only `qlm up` starts
    done = start(*service, "--config", str(ROOT / "deploy" / "local.yaml"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"python -m {service[0]}: " in done.stderr
    assert "'embedded'" in done.stderr and "--redis-url or QLM_REDIS_URL" in done.stderr


def test_a_service_with_an_unreadable_config_says_so(tmp_path):
    done = start("services.router", "--config", str(tmp_path / "missing.yaml"),
                 env_redis="redis://127.0.0.1:1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot read config" in done.stderr and "missing.yaml" in done.stderr


def test_the_planner_refuses_a_policy_it_cannot_run(tmp_path):
    path = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"]}])
    done = start("services.planner", "--config", str(path), "--policy", "oracle",
                 env_redis="redis://127.0.0.1:1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "qlm bench sim only" in done.stderr and "qlm-nopull" in done.stderr
    # in the config file: the same reason, from the config check
    bad = write_config(tmp_path, workers=[{"id": "w0", "models": ["small"]}],
                       planner={"policy": "fifo"})
    done = start("services.planner", "--config", str(bad), env_redis="redis://127.0.0.1:1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "planner.policy: unknown planner policy 'fifo'" in done.stderr
