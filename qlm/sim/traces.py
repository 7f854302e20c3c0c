"""Request traces for the fleet simulator: load one, scale its load, summarise it.

Two formats are read, told apart by their first non-blank line:

- Azure LLM inference trace 2023 CSV: a header with `TIMESTAMP`, `ContextTokens` and
  `GeneratedTokens` (other columns are ignored), timestamps like `2023-11-16 18:15:46.6805900`
  (any number of fractional digits; no time zone).
- JSON lines: one object per line with `timestamp` (milliseconds since trace start),
  `input_length` and `output_length`; other keys (such as `hash_ids`) are ignored.

Either way a trace becomes a list of `TraceRequest`s sorted by arrival, the first at 0 s.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

CSV_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
JSONL_KEYS = ("timestamp", "input_length", "output_length")
_NS = 1_000_000_000

# 2023-11-16 18:15:46.6805900 (a "T" between date and time is accepted too)
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2}(?:\.\d+)?)",
    re.ASCII,
)


@dataclasses.dataclass(frozen=True, slots=True)
class TraceRequest:
    # Seconds since the trace's first request.
    arrival_s: float
    # Prompt tokens.
    input_length: int
    # Generated tokens as recorded; may be 0 (see effective_output).
    output_length: int


@dataclasses.dataclass(frozen=True)
class TraceStats:
    count: int
    # Last arrival minus first.
    duration_s: float
    # count / duration_s; None when every request arrives at the same instant.
    rate_per_s: float | None
    input_mean: float
    input_p50: float
    input_p99: float
    output_mean: float
    output_p50: float
    output_p99: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def effective_output(output_length: int) -> int:
    """Tokens the simulator generates for a request: a recorded output of 0 (the Azure traces
    have a few) still costs one decode step, so it counts as 1. Traces keep the raw value."""
    return max(1, output_length)


def load_trace(path: str | os.PathLike) -> list[TraceRequest]:
    """Reads an Azure CSV or JSON-lines trace (see the module docstring).

    Requests come back sorted by arrival (ties keep file order) with the first at 0 s. Outputs of
    0 tokens are kept as 0; the simulator runs them as `effective_output` (1 token).

    Raises ValueError naming the file and line for an empty file, an unknown format, a missing
    column or key, a value that is not a number (or not a whole number for lengths), or a
    negative length; OSError if the file cannot be read.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: unknown trace format (not UTF-8 text)") from e
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip()), None)
    if start is None:
        raise ValueError(f"{path}: empty trace file")
    head = lines[start].strip()
    # Arrival times come back as exact numbers in `scale` units per second.
    if head.startswith("{"):
        raw, scale = _read_jsonl(path, lines, start), 1000
    elif set(_split_header(head)) & {c.lower() for c in CSV_COLUMNS}:
        raw, scale = _read_azure_csv(path, lines, start), _NS
    else:
        raise ValueError(
            f"{path}:{start + 1}: unknown trace format: expected a CSV header with "
            f"{', '.join(CSV_COLUMNS)} or JSON lines with {', '.join(JSONL_KEYS)}"
        )
    if not raw:
        raise ValueError(f"{path}: no requests in trace (header only)")
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
    return [TraceRequest((t - t0) / scale, i, o) for t, i, o in raw]


def _split_header(line: str) -> list[str]:
    return [c.strip().lower() for c in line.split(",")]


def _length(path: pathlib.Path, lineno: int, name: str, text: str) -> int:
    s = text.strip()
    digits = s[1:] if s[:1] == "-" else s
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{path}:{lineno}: {name} must be a whole number, got {text!r}")
    value = int(s)
    if value < 0:
        raise ValueError(f"{path}:{lineno}: {name} must not be negative, got {value}")
    return value


def _read_azure_csv(
    path: pathlib.Path, lines: list[str], start: int
) -> list[tuple[float | int, int, int]]:
    header = _split_header(lines[start])
    index = {}
    for col in CSV_COLUMNS:
        try:
            index[col] = header.index(col.lower())
        except ValueError:
            raise ValueError(
                f"{path}:{start + 1}: missing column {col!r} (header has "
                f"{[c.strip() for c in lines[start].split(',')]})"
            ) from None
    ts_i, in_i, out_i = (index[c] for c in CSV_COLUMNS)
    width = max(ts_i, in_i, out_i) + 1

    base_ordinal = None
    day_ordinals: dict[str, int] = {}
    out: list[tuple[float | int, int, int]] = []
    rows = csv.reader(line.rstrip("\r") for line in lines[start + 1 :])
    for lineno, row in enumerate(rows, start + 2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < width:
            raise ValueError(
                f"{path}:{lineno}: expected at least {width} fields, got {len(row)}: {row}"
            )
        stamp = row[ts_i].strip()
        m = _TIMESTAMP.fullmatch(stamp)
        if m is None:
            raise ValueError(
                f"{path}:{lineno}: bad TIMESTAMP {row[ts_i]!r} "
                "(expected YYYY-MM-DD HH:MM:SS[.fraction])"
            )
        date = stamp[:10]
        ordinal = day_ordinals.get(date)
        if ordinal is None:
            try:
                ordinal = datetime.date(int(m[1]), int(m[2]), int(m[3])).toordinal()
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad TIMESTAMP {row[ts_i]!r}: {e}") from None
            day_ordinals[date] = ordinal
        if base_ordinal is None:
            base_ordinal = ordinal
        hour, minute = int(m[4]), int(m[5])
        whole, _, fraction = m[6].partition(".")
        second = int(whole)
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{path}:{lineno}: bad TIMESTAMP {row[ts_i]!r}: time out of range")
        # Whole nanoseconds (exact integers) so that subtracting the first arrival loses nothing.
        t = ((ordinal - base_ordinal) * 86400 + hour * 3600 + minute * 60 + second) * _NS + int(
            (fraction + "000000000")[:9]
        )
        out.append(
            (
                t,
                _length(path, lineno, "ContextTokens", row[in_i]),
                _length(path, lineno, "GeneratedTokens", row[out_i]),
            )
        )
    return out


def _json_length(path: pathlib.Path, lineno: int, key: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{path}:{lineno}: {key} must be a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"{path}:{lineno}: {key} must not be negative, got {value}")
    return value


def _read_jsonl(
    path: pathlib.Path, lines: list[str], start: int
) -> list[tuple[float | int, int, int]]:
    out: list[tuple[float | int, int, int]] = []
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        for key in JSONL_KEYS:
            if key not in obj:
                raise ValueError(f"{path}:{lineno}: missing key {key!r}")
        ts = obj["timestamp"]
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
            raise ValueError(f"{path}:{lineno}: timestamp must be a finite number, got {ts!r}")
        out.append(
            (
                ts,
                _json_length(path, lineno, "input_length", obj["input_length"]),
                _json_length(path, lineno, "output_length", obj["output_length"]),
            )
        )
    return out


_R = TypeVar("_R")


def scale_load(requests: Sequence[_R], load: float) -> list[_R]:
    """Multiplies the arrival rate by `load`: every arrival time is divided by it (load 2 packs
    the same requests into half the time). Works on any dataclass with `arrival_s`
    (TraceRequest, SimRequest); the input is not modified."""
    if (
        not isinstance(load, (int, float))
        or isinstance(load, bool)
        or not math.isfinite(load)
        or load <= 0
    ):
        raise ValueError(f"load must be a finite number above 0, got {load!r}")
    out = []
    cls = names = None
    for r in requests:
        if type(r) is not cls:
            cls = type(r)
            names = [f.name for f in dataclasses.fields(cls)]
            if not all(f.init for f in dataclasses.fields(cls)):
                return [dataclasses.replace(r, arrival_s=r.arrival_s / load) for r in requests]
            k = names.index("arrival_s")
        values = [getattr(r, n) for n in names]
        values[k] /= load
        out.append(cls(*values))
    return out


def trace_stats(requests: Sequence[TraceRequest]) -> TraceStats:
    """Count, duration, mean arrival rate and input/output length mean, p50 and p99 (linear
    interpolation) of a trace, with lengths as recorded."""
    if not requests:
        raise ValueError("trace_stats: no requests")
    arrivals = [r.arrival_s for r in requests]
    duration = max(arrivals) - min(arrivals)
    inputs = np.fromiter((r.input_length for r in requests), dtype=np.float64, count=len(requests))
    outputs = np.fromiter(
        (r.output_length for r in requests), dtype=np.float64, count=len(requests)
    )
    in_p50, in_p99 = np.percentile(inputs, [50, 99])
    out_p50, out_p99 = np.percentile(outputs, [50, 99])
    return TraceStats(
        count=len(requests),
        duration_s=float(duration),
        rate_per_s=len(requests) / duration if duration > 0 else None,
        input_mean=float(inputs.mean()),
        input_p50=float(in_p50),
        input_p99=float(in_p99),
        output_mean=float(outputs.mean()),
        output_p50=float(out_p50),
        output_p99=float(out_p99),
    )
