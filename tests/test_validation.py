"""Request validation in the router (services/router/validation.py) and config loading."""

from __future__ import annotations

import math
import re

import grpc
import pytest
import yaml

from qlm import config as qconfig
from qlm.config import DEFAULT_CONFIG, REDIS_URL_ENV, ConfigError
from qlm.v1 import router_pb2
from services.router.validation import ValidationError, estimate_prompt_tokens, validate

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def cfg():
    return qconfig.load()


def request(*, sampling=None, **kw):
    kw.setdefault("model", "small")
    kw.setdefault("max_tokens", 16)
    if "prompt_token_ids" not in kw:
        kw.setdefault("prompt", "hello")
    return router_pb2.GenerateRequest(
        sampling=router_pb2.SamplingParams(**(sampling or {})), **kw)


def refused(req, cfg) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate(req, cfg)
    return info.value


def test_default_config_is_what_the_tests_assume(cfg):
    assert cfg.default_slo_class == "interactive"
    assert (cfg.models["small"].max_model_len, cfg.models["small"].max_tokens) == (4096, 2048)
    assert cfg.slo_classes["interactive"].ttft_deadline_ms == 20_000


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "code", "match"), [
    ({"prompt": ""}, INVALID, "prompt is empty"),
    ({"prompt": "hi", "prompt_token_ids": [1, 2]}, INVALID, "either prompt or prompt_token_ids"),
    ({"model": ""}, INVALID, "model is required"),
    ({"model": "huge"}, NOT_FOUND, r"unknown model 'huge'; served: large, small"),
    ({"slo_class": "gold"}, NOT_FOUND, r"unknown slo_class 'gold'; known: batch, interactive"),
    ({"max_tokens": 0}, INVALID, "max_tokens must be at least 1"),
    ({"max_tokens": 0, "sampling": {"max_tokens": 0}}, INVALID, "at least 1"),
    ({"max_tokens": 2049}, INVALID, r"max_tokens 2049 is over model small's limit of 2048"),
    ({"max_tokens": 0, "sampling": {"max_tokens": 2049}}, INVALID, "limit of 2048"),
    ({"model": "large", "max_tokens": 4097}, INVALID, "limit of 4096"),
    ({"prompt_token_ids": [1] * 2049, "max_tokens": 2048}, INVALID,
     r"prompt \(2049 tokens\) plus max_tokens \(2048\) is over model small's context of 4096"),
    ({"prompt": "é" * 1025, "max_tokens": 2047}, INVALID, r"prompt \(2050 tokens\)"),
    ({"sampling": {"temperature": -0.1}}, INVALID, "temperature must be >= 0"),
    ({"sampling": {"temperature": math.nan}}, INVALID, "temperature must be >= 0, got nan"),
    ({"sampling": {"temperature": math.inf}}, INVALID, "temperature"),
    ({"sampling": {"top_p": 0.0}}, INVALID, r"top_p must be in \(0, 1\], got 0.0"),
    ({"sampling": {"top_p": 1.5}}, INVALID, "top_p"),
    ({"sampling": {"top_p": -0.5}}, INVALID, "top_p"),
    ({"sampling": {"top_p": math.nan}}, INVALID, "top_p must be in .*nan"),
    ({"sampling": {"top_p": -math.inf}}, INVALID, "top_p"),
    ({"request_id": "has space"}, INVALID, "request_id must be"),
    ({"request_id": "x" * 129}, INVALID, "request_id"),
    ({"request_id": "a/b"}, INVALID, "request_id"),
    ({"request_id": "é"}, INVALID, "request_id"),
])
def test_refusals(cfg, kw, code, match):
    err = refused(request(**kw), cfg)
    assert err.code == code
    assert err.message == str(err)
    assert re.search(match, err.message), err.message


def test_request_id_with_trailing_newline_is_refused(cfg):
    assert refused(request(request_id="abc\n"), cfg).code == INVALID


# --- accepted ------------------------------------------------------------------------------


def test_accepted_applies_defaults(cfg):
    a = validate(request(prompt="héllo", max_tokens=0, sampling={"max_tokens": 7}), cfg)
    assert (a.model, a.slo_class, a.max_tokens) == ("small", "interactive", 7)
    assert a.prompt_tokens == 6 == estimate_prompt_tokens("héllo")
    assert a.ttft_budget_ms == 20_000
    assert len(a.request_id) == 32 and int(a.request_id, 16) >= 0
    assert validate(request(), cfg).request_id != validate(request(), cfg).request_id
    assert a.fields == {
        "prompt": "héllo", "prompt_ids": "", "prompt_tokens": 6, "max_tokens": 7,
        "temperature": "1.0", "top_p": "1.0", "seed": "", "ignore_eos": 0,
        "ttft_budget_ms": 20_000, "tpot_ms": 0,
    }


def test_accepted_token_ids_and_sampling_fields(cfg):
    a = validate(request(
        prompt_token_ids=[5, 6, 7], max_tokens=3, request_id="Req.1:a-b_c",
        slo_class="batch",
        sampling={"max_tokens": 99, "temperature": 0.0, "top_p": 0.5, "seed": 0,
                  "ignore_eos": True},
    ), cfg)
    assert (a.request_id, a.slo_class, a.prompt_tokens, a.max_tokens) == (
        "Req.1:a-b_c", "batch", 3, 3)  # top-level max_tokens wins
    assert a.fields["prompt"] == "" and a.fields["prompt_ids"] == "5 6 7"
    assert (a.fields["temperature"], a.fields["top_p"]) == ("0.0", "0.5")
    assert a.fields["seed"] == "0"  # set to 0 is not unset
    assert a.fields["ignore_eos"] == 1
    assert a.fields["ttft_budget_ms"] == a.ttft_budget_ms == 3_600_000
    a = validate(request(sampling={"seed": -42}), cfg)
    assert a.fields["seed"] == "-42"


@pytest.mark.parametrize(("cls", "explicit", "budget"), [
    ("", 500, 500),  # tighter explicit deadline wins
    ("", 30_000, 20_000),  # a looser one does not
    ("", 20_000, 20_000),
    ("batch", 60_000, 60_000),
    ("batch", 0, 3_600_000),  # 0 means the class's
])
def test_ttft_deadline(cfg, cls, explicit, budget):
    a = validate(request(slo_class=cls, ttft_deadline_ms=explicit), cfg)
    assert a.ttft_budget_ms == budget == a.fields["ttft_budget_ms"]


def test_accepted_at_the_limits(cfg):
    a = validate(request(prompt_token_ids=[1] * 2048, max_tokens=2048), cfg)
    assert (a.prompt_tokens, a.max_tokens) == (2048, 2048)
    a = validate(request(model="large", max_tokens=4096, request_id="x" * 128,
                         sampling={"top_p": 1.0, "temperature": 0.0}), cfg)
    assert a.request_id == "x" * 128 and a.max_tokens == 4096


# --- config loading ------------------------------------------------------------------------


def base_config() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def write(tmp_path, raw) -> str:
    path = tmp_path / "stack.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return str(path)


def test_load_default_config(monkeypatch):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    c = qconfig.load()
    assert c.path == DEFAULT_CONFIG
    assert c.redis_url == "embedded"
    assert [w.id for w in c.workers] == ["w0", "w1", "w2", "w3"]
    assert c.worker("w2").models == ("large",)
    assert c.worker("w0").advertise == c.worker("w0").listen == "127.0.0.1:50061"
    assert c.worker("w0").options == {"profile": "profiles/sim-small.yaml", "time_scale": 1.0}
    assert c.resolve("profiles/x.yaml") == DEFAULT_CONFIG.parent / "profiles" / "x.yaml"
    with pytest.raises(ConfigError, match="no worker 'w9'"):
        c.worker("w9")


def test_redis_url_env_overrides_config(tmp_path, monkeypatch):
    raw = base_config()
    raw["redis"] = {"url": "redis://from-file:6379/0"}
    path = write(tmp_path, raw)
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    assert qconfig.load(path).redis_url == "redis://from-file:6379/0"
    monkeypatch.setenv(REDIS_URL_ENV, "redis://from-env:6380/1")
    assert qconfig.load(path).redis_url == "redis://from-env:6380/1"
    assert qconfig.load().redis_url == "redis://from-env:6380/1"


def _unknown_model(raw):
    raw["workers"][1]["models"] = ["small", "medium"]


def _duplicate_worker(raw):
    raw["workers"][2]["id"] = "w0"


def _max_tokens_equal(raw):
    raw["models"]["small"]["max_tokens"] = raw["models"]["small"]["max_model_len"]


def _max_tokens_over(raw):
    raw["models"]["large"]["max_tokens"] = 9000


def _bad_default_class(raw):
    raw["default_slo_class"] = "gold"


def _zero_deadline(raw):
    raw["slo_classes"]["batch"]["ttft_deadline_ms"] = 0


def _bool_lease(raw):
    raw["limits"]["lease_ms"] = True


def _no_models(raw):
    raw["models"] = {}


def _worker_without_models(raw):
    raw["workers"][0]["models"] = []


def _worker_without_listen(raw):
    del raw["workers"][0]["listen"]


@pytest.mark.parametrize(("breaks", "match"), [
    (_unknown_model, r"workers.w1 serves unknown model 'medium'"),
    (_duplicate_worker, r"duplicate id 'w0'"),
    (_max_tokens_equal, r"models.small: max_tokens must be below max_model_len"),
    (_max_tokens_over, r"models.large: max_tokens must be below"),
    (_bad_default_class, r"default_slo_class 'gold' is not in slo_classes"),
    (_zero_deadline, r"slo_classes.batch.ttft_deadline_ms must be a positive integer"),
    (_bool_lease, r"limits.lease_ms must be a positive integer"),
    (_no_models, r"no models configured"),
    (_worker_without_models, r"workers.w0: no models"),
    (_worker_without_listen, r"workers.w0.listen is required"),
])
def test_load_refuses_broken_configs(tmp_path, breaks, match):
    raw = base_config()
    breaks(raw)
    with pytest.raises(ConfigError, match=match):
        qconfig.load(write(tmp_path, raw))


def test_load_refuses_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        qconfig.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        qconfig.load(write(tmp_path, "models: [unclosed\n"))
