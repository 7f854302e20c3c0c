"""Request groups: requests of one model and SLO class with a similar token profile.

The planner orders groups, not single requests, which keeps its problem small. A group's kind
says which requests may share it; new arrivals join the newest open group of their kind until
it holds `max_group_size` requests (roughly one batch's worth of work)."""

from __future__ import annotations

import math

# Prompt lengths are bucketed on a log2 scale: 1-63 tokens share a bucket, then 64-127,
# 128-255, ..., so short chat turns never share a group with 8k-token documents.
_MIN_BUCKET = 6


def prompt_bucket(prompt_tokens: int) -> int:
    return max(_MIN_BUCKET, math.ceil(math.log2(max(prompt_tokens, 1) + 1)))


def group_kind(model: str, slo_class: str, prompt_tokens: int) -> str:
    """The key under which requests may share a group."""
    return f"{model}/{slo_class}/{prompt_bucket(prompt_tokens)}"
