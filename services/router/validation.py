"""Checks a GenerateRequest against the stack config and turns it into what the queue stores.
Every refusal is a ValidationError carrying the gRPC status a client should see."""

from __future__ import annotations

import dataclasses
import math
import re
import uuid

import grpc

from qlm.config import StackConfig
from qlm.v1 import router_pb2

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A TPOT deadline over a minute per token is a mistake (seconds for milliseconds, say).
MAX_TPOT_DEADLINE_MS = 60_000


class ValidationError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Admitted:
    request_id: str
    model: str
    slo_class: str
    prompt_tokens: int
    max_tokens: int
    ttft_budget_ms: int
    # Stored in the request's hash for the worker.
    fields: dict[str, str | int]


def _invalid(message: str) -> ValidationError:
    return ValidationError(grpc.StatusCode.INVALID_ARGUMENT, message)


def estimate_prompt_tokens(text: str) -> int:
    """Prompt tokens of a text prompt, as the simulated models count them (UTF-8 bytes); an
    upper bound for byte-level BPE tokenizers, whose tokens are one or more bytes."""
    return len(text.encode("utf-8"))


def validate(req: router_pb2.GenerateRequest, config: StackConfig) -> Admitted:
    model = config.models.get(req.model)
    if not req.model:
        raise _invalid("model is required")
    if model is None:
        raise ValidationError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {req.model!r}; served: {', '.join(sorted(config.models))}",
        )
    slo_name = req.slo_class or config.default_slo_class
    slo = config.slo_classes.get(slo_name)
    if slo is None:
        raise ValidationError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown slo_class {slo_name!r}; known: {', '.join(sorted(config.slo_classes))}",
        )

    if req.prompt and req.prompt_token_ids:
        raise _invalid("set either prompt or prompt_token_ids, not both")
    if req.prompt_token_ids:
        prompt_tokens = len(req.prompt_token_ids)
    elif req.prompt:
        prompt_tokens = estimate_prompt_tokens(req.prompt)
    else:
        raise _invalid("prompt is empty")

    sampling = req.sampling
    max_tokens = req.max_tokens or sampling.max_tokens
    if max_tokens <= 0:
        raise _invalid("max_tokens must be at least 1")
    if max_tokens > model.max_tokens:
        raise _invalid(f"max_tokens {max_tokens} is over model {model.name}'s limit of "
                       f"{model.max_tokens}")
    if prompt_tokens + max_tokens > model.max_model_len:
        raise _invalid(f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over "
                       f"model {model.name}'s context of {model.max_model_len} tokens")
    temperature = sampling.temperature if sampling.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise _invalid(f"temperature must be >= 0, got {temperature}")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise _invalid(f"top_p must be in (0, 1], got {top_p}")

    if req.request_id and not _REQUEST_ID.fullmatch(req.request_id):
        raise _invalid("request_id must be 1-128 characters of [A-Za-z0-9._:-]")
    request_id = req.request_id or uuid.uuid4().hex

    budget = slo.ttft_deadline_ms
    if req.ttft_deadline_ms:
        budget = min(budget, req.ttft_deadline_ms)
    if req.tpot_deadline_ms > MAX_TPOT_DEADLINE_MS:
        raise _invalid(f"tpot_deadline_ms must be at most {MAX_TPOT_DEADLINE_MS} (ms per output "
                       f"token; 0 means the class's), got {req.tpot_deadline_ms}")
    # the tighter of the class's and the request's; 0: no TPOT objective
    tpot = min((d for d in (slo.tpot_deadline_ms, req.tpot_deadline_ms) if d), default=0)

    fields: dict[str, str | int] = {
        "prompt": req.prompt,
        "prompt_ids": " ".join(map(str, req.prompt_token_ids)),
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "temperature": repr(float(temperature)),
        "top_p": repr(float(top_p)),
        "seed": str(sampling.seed) if sampling.HasField("seed") else "",
        "ignore_eos": int(sampling.ignore_eos),
        "ttft_budget_ms": budget,
        "tpot_ms": tpot,
    }
    return Admitted(request_id, model.name, slo.name, prompt_tokens, max_tokens, budget, fields)
