"""KVSwapConnector: keeps an evicted request's KV blocks in CPU memory and loads them back
when the request resumes, so its prompt and generated tokens are not recomputed.

A vLLM KV connector (KVConnectorBase_V1) of the project's own, because vLLM's CPU offloading
does not run on its CPU build. One instance runs in vLLM's scheduler process (it decides what
to save and load) and one in each model worker process (it copies the blocks):

- Evict: the engine writes an intent file `<swap_dir>/<key>.evict`, then aborts the request.
  When the scheduler frees the aborted request, `request_finished` sees the intent, keeps the
  blocks alive and asks the worker side to copy them to CPU memory; the blocks are freed once
  the copy is reported done. Plain aborts (cancels) leave nothing behind.
- Resume: the engine submits the request again, its context = prompt + tokens generated so
  far, with kv_transfer_params {"qlm_kv_key": key, "qlm_resume": true}.
  `get_num_new_matched_tokens` offers the saved tokens (if the context still starts with
  them), and the worker side copies the blocks into the newly allocated ones before the step.
- Counters: every request that finishes reports {"qlm_loaded_tokens": n} in its
  kv_transfer_params (tokens loaded instead of computed), and the scheduler side writes its
  running totals to `<swap_dir>/stats.json`, so tests and `qlm profile` can prove a resume
  loaded rather than recomputed.

On a GPU the CPU copies are pinned (page-locked) so copies in and out run at full PCIe speed;
on a CPU build they are plain tensors. Only the CPU path runs in this project's CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.request import RequestStatus

KEY = "qlm_kv_key"
RESUME = "qlm_resume"
LOADED = "qlm_loaded_tokens"


def intent_path(swap_dir: str | pathlib.Path, key: str) -> pathlib.Path:
    return pathlib.Path(swap_dir) / f"{key}.evict"


def read_totals(swap_dir: str | pathlib.Path) -> dict:
    """The scheduler side's running totals (saves, loads, tokens loaded), {} before any."""
    try:
        return json.loads((pathlib.Path(swap_dir) / "stats.json").read_text())
    except FileNotFoundError:
        return {}


@dataclasses.dataclass
class SwapMetadata(KVConnectorMetadata):
    # (key, engine request id, block ids) to copy out to CPU memory
    saves: list[tuple[str, str, list[int]]] = dataclasses.field(default_factory=list)
    # (key, block ids, index of the first saved block they take) to copy in from CPU memory
    # before this step's forward; the CPU copy is dropped afterwards
    loads: list[tuple[str, list[int], int]] = dataclasses.field(default_factory=list)
    # saved copies nobody will resume (superseded by a newer save of the same key)
    drops: list[str] = dataclasses.field(default_factory=list)


class KVSwapConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.swap_dir = pathlib.Path(extra.get("swap_dir", "/tmp/qlm-kv-swap"))
        self.swap_dir.mkdir(parents=True, exist_ok=True)
        # CPU memory for saved KV, in tokens: past it the oldest saves are dropped (their
        # requests recompute on resume, which is correct, only slower)
        self.capacity_tokens = int(extra.get("capacity_tokens", 1 << 20))
        # scheduler side: key -> token ids whose KV is (or is being) held in CPU memory
        self.saved: dict[str, list[int]] = {}
        self.pending = SwapMetadata()
        self.request_key: dict[str, str] = {}  # engine request id -> key, for resumes
        self.loaded_tokens: dict[str, int] = {}  # engine request id -> tokens loaded
        self.totals = {"saves": 0, "saved_tokens": 0, "loads": 0, "loaded_tokens": 0,
                       "refused_loads": 0, "resumed_context_tokens": 0}
        # worker side: key -> per-layer copies of its blocks, and the paged caches
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.cpu: dict[str, dict[str, torch.Tensor]] = {}
        self._sent: set[str] = set()
        self._finished: set[str] = set()  # finished ids the scheduler has told us of

    # --- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        params = request.kv_transfer_params or {}
        key = params.get(KEY)
        if not params.get(RESUME) or key not in self.saved:
            return 0, False
        tokens = self.saved[key]
        # the last token is always computed: the step needs its logits
        usable = min(len(tokens), request.num_tokens - 1)
        if list(request.all_token_ids[:usable]) != tokens[:usable]:
            self.totals["refused_loads"] += 1  # the context changed: recompute is correct
            return 0, False
        return max(0, usable - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        key = request.kv_transfer_params[KEY]
        block_ids = blocks.get_block_ids()[0]
        first = request.num_computed_tokens // self.block_size
        last = -(-(request.num_computed_tokens + num_external_tokens) // self.block_size)
        self.pending.loads.append((key, block_ids[first:last], first))
        self.saved.pop(key)
        self.loaded_tokens[request.request_id] = num_external_tokens
        self.totals["loads"] += 1
        self.totals["loaded_tokens"] += num_external_tokens
        # the context the resume had to rebuild: loaded + locally cached + recomputed
        self.totals["resumed_context_tokens"] += request.num_tokens
        self._write_totals()

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta, self.pending = self.pending, SwapMetadata()
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        params = {LOADED: self.loaded_tokens.pop(request.request_id, 0)}
        key = (request.kv_transfer_params or {}).get(KEY)
        if key is None or request.status != RequestStatus.FINISHED_ABORTED:
            return False, params
        intent = intent_path(self.swap_dir, key)
        if not intent.exists():
            return False, params  # a cancel, not an eviction
        intent.unlink(missing_ok=True)
        computed = request.num_computed_tokens
        blocks = block_ids[: -(-computed // self.block_size)]
        if computed <= 0 or not blocks:
            return False, params
        if key in self.saved:
            self.pending.drops.append(key)
            del self.saved[key]
        while self.saved and sum(map(len, self.saved.values())) + computed > self.capacity_tokens:
            oldest = next(iter(self.saved))  # dicts keep insertion order
            del self.saved[oldest]
            self.pending.drops.append(oldest)
            self.totals["dropped"] = self.totals.get("dropped", 0) + 1
        self.saved[key] = list(request.all_token_ids[:computed])
        self.pending.saves.append((key, request.request_id, list(blocks)))
        self.totals["saves"] += 1
        self.totals["saved_tokens"] += computed
        self._write_totals()
        return True, params  # the blocks stay until the worker side has copied them

    def _write_totals(self) -> None:
        tmp = self.swap_dir / "stats.json.tmp"
        tmp.write_text(json.dumps(self.totals | {"held": len(self.saved)}))
        os.replace(tmp, self.swap_dir / "stats.json")

    # --- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.kv_caches = kv_caches

    def _host_copy(self, blocks: torch.Tensor) -> torch.Tensor:
        if blocks.device.type == "cuda":  # page-locked, so copies overlap and run at PCIe speed
            host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
            host.copy_(blocks, non_blocking=True)
            return host
        return blocks.clone()

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, SwapMetadata)
        for key in meta.drops:
            self.cpu.pop(key, None)
        for key, request_id, blocks in meta.saves:
            index = torch.tensor(blocks, dtype=torch.long)
            self.cpu[key] = {name: self._host_copy(cache[index.to(cache.device)])
                             for name, cache in self.kv_caches.items()}
            self._sent.add(request_id)
        if meta.saves and torch.cuda.is_available():
            torch.cuda.synchronize()  # the blocks are freed once reported sent
        for key, blocks, first in meta.loads:
            saved = self.cpu.pop(key)
            index = torch.tensor(blocks, dtype=torch.long)
            for name, cache in self.kv_caches.items():
                part = saved[name][first:first + len(blocks)]
                cache.index_copy_(0, index.to(cache.device),
                                  part.to(cache.device, non_blocking=True))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv copies everything before the forward pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # saves happen at eviction, not per layer

    def wait_for_save(self):
        return

    def get_finished(self, finished_req_ids: set[str]):
        # a save may be reported only once the scheduler has named the request finished
        self._finished |= finished_req_ids & self._sent
        sent = self._sent & self._finished
        self._sent -= sent
        self._finished -= sent
        return (sent or None), None
