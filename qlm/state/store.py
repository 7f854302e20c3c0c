"""QueueStore: the queue state in Redis, one method per atomic operation (see scripts/)."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import redis.asyncio as aioredis

SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"
_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.MULTILINE)


def admission_field(model: str, slo_class: str = "") -> str:
    """A field of the `admission` hash: MODEL, or MODEL|CLASS for one SLO class (readers look
    fields up by this name, they never split one)."""
    return f"{model}|{slo_class}" if slo_class else model


def script_source(name: str) -> str:
    """A script's text with its `-- @include NAME` lines replaced by include/NAME.lua."""
    text = (SCRIPTS / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: (SCRIPTS / "include" / f"{m[1]}.lua").read_text(), text)


@dataclasses.dataclass(frozen=True)
class ClaimedRequest:
    request_id: str
    fields: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Claim:
    requests: list[ClaimedRequest]
    # the model the worker's next work needs, which it serves only after a swap ("" none)
    swap_to: str = ""


@dataclasses.dataclass(frozen=True)
class EnqueueResult:
    status: str  # "ok" | "exists" | "full"
    detail: str  # group id | existing state | queue depth


class QueueStore:
    """Typed access to the queue state. Every multi-key change is one Lua script."""

    SCRIPT_NAMES = (
        "enqueue", "claim", "heartbeat", "expire", "append", "finish", "cancel", "evict",
        "count_prompt", "leader", "install_plan",
    )

    def __init__(self, client: aioredis.Redis, prefix: str = "qlm:"):
        self.client = client
        self.prefix = prefix
        # register_script reloads a script after a Redis restart (EVALSHA, then SCRIPT LOAD on
        # NOSCRIPT), so the services survive a Redis restart without reloading by hand.
        self._scripts = {n: client.register_script(script_source(n)) for n in self.SCRIPT_NAMES}

    @classmethod
    def connect(cls, url: str, prefix: str = "qlm:", **kwargs) -> QueueStore:
        # A blocking pool: redis-py's default pool raises once 100 connections are out, so a
        # worker streaming 100+ requests lost appends and heartbeats; this one waits instead.
        kwargs.setdefault("max_connections", 512)
        kwargs.setdefault("timeout", 5.0)  # seconds to wait for a free connection
        pool = aioredis.BlockingConnectionPool.from_url(url, decode_responses=True, **kwargs)
        return cls(aioredis.Redis.from_pool(pool), prefix)

    async def close(self) -> None:
        await self.client.aclose()

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _run(self, name: str, *args, client=None):
        return await self._scripts[name](args=[self.prefix, *args], client=client)

    # --- router ---------------------------------------------------------------------------

    async def enqueue(
        self, request_id: str, *, kind: str, model: str, slo_class: str, max_queued: int,
        max_group_size: int, ttft_budget_ms: int, router: str, fields: dict[str, str | int],
    ) -> EnqueueResult:
        flat = [x for kv in fields.items() for x in kv]
        status, detail = await self._run(
            "enqueue", request_id, kind, model, slo_class, max_queued, max_group_size,
            ttft_budget_ms, router, *flat,
        )
        return EnqueueResult(status, detail or "")

    async def cancel(self, request_id: str, retention_s: int) -> tuple[str, str]:
        before, after = await self._run("cancel", request_id, retention_s)
        return before, after

    async def watch(self, request_id: str, router: str) -> None:
        """Adds a router to those notified of the request's output."""
        await self.client.sadd(self.key("watch", request_id), router)

    async def get_request(self, request_id: str) -> dict[str, str] | None:
        fields = await self.client.hgetall(self.key("req", request_id))
        return fields or None

    async def request_ttl(self, request_id: str) -> int:
        return max(0, await self.client.ttl(self.key("req", request_id)))

    async def read_output(self, request_id: str, after: str = "-") -> list[tuple[str, dict]]:
        """Output entries after stream id `after` (exclusive; "-" for all)."""
        start = after if after == "-" else "(" + after
        return await self.client.xrange(self.key("out", request_id), min=start)

    async def queue_depth(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.client.hgetall(self.key("depth"))).items()}

    # --- worker ---------------------------------------------------------------------------

    async def claim(
        self, worker: str, n: int, lease_ms: int, models: list[str], swappable: list[str] = ()
    ) -> Claim:
        """Up to `n` requests of `models` (served now) in the worker's plan order; the claim
        stops where the next work needs one of `swappable` (see claim.lua)."""
        swap_to, *flat = await self._run(
            "claim", worker, n, lease_ms, " ".join(models), " ".join(swappable))
        return Claim([
            ClaimedRequest(flat[i], dict(zip(flat[i + 1][::2], flat[i + 1][1::2], strict=True)))
            for i in range(0, len(flat), 2)
        ], swap_to)

    async def heartbeat(
        self, worker: str, *, ttl_ms: int, lease_ms: int, address: str, engine: str,
        models: list[str], max_running: int, running: list[str],
        loaded: list[str] | None = None, warm: list[str] = (),
    ) -> tuple[int, list[str]]:
        """`models`: those it can serve (some maybe after a swap); `loaded`: those it serves
        now (default: all of `models`); `warm`: those it holds in CPU memory."""
        renewed, lost = await self._run(
            "heartbeat", worker, ttl_ms, lease_ms, address, engine, " ".join(models),
            max_running, " ".join(models if loaded is None else loaded), " ".join(warm),
            *running,
        )
        return renewed, lost

    async def expire(self, max_requests: int = 200) -> tuple[list[str], list[str]]:
        requeued, dead = await self._run("expire", max_requests)
        return requeued, dead

    async def append(
        self, request_id: str, worker: str, first: int, token_ids: list[int], text: str
    ) -> tuple[str, str]:
        status, detail = await self._run(
            "append", request_id, worker, first, " ".join(map(str, token_ids)), text
        )
        return status, detail

    async def finish(
        self, request_id: str, worker: str, reason: str, error: str, retention_s: int,
        first: int = 0, token_ids: list[int] | tuple[int, ...] = (), text: str = "",
    ) -> tuple[str, str]:
        """Ends a request the worker holds, storing its last tokens (from index `first`) in the
        same atomic step. Returns ("ok", count) | ("lost", state) | ("gap", count)."""
        status, detail = await self._run(
            "finish", request_id, worker, reason, error, retention_s, first,
            " ".join(map(str, token_ids)), text,
        )
        return status, detail

    async def count_prompt(self, request_id: str, worker: str, prompt_tokens: int) -> str:
        """Records the true prompt length of a text prompt the worker tokenized."""
        status, _ = await self._run("count_prompt", request_id, worker, prompt_tokens)
        return status

    async def evict(self, request_id: str, worker: str) -> tuple[str, str]:
        """Returns a request the worker runs to the head of its group now."""
        status, detail = await self._run("evict", request_id, worker)
        return status, detail

    async def generated_tokens(self, request_id: str) -> list[int]:
        """The output stored so far, for continuing a request on another worker."""
        ids: list[int] = []
        for _, entry in await self.read_output(request_id):
            if "t" in entry:
                ids.extend(int(t) for t in entry["t"].split())
        return ids

    # --- planner --------------------------------------------------------------------------

    async def leader(self, planner_id: str, ttl_ms: int) -> int:
        return int(await self._run("leader", planner_id, ttl_ms))

    async def install_plan(
        self, planner_id: str, epoch: int, sequence: int, policy: str, compute_ms: float,
        queues: dict[str, list[str]],
    ) -> tuple[bool, str]:
        flat: list[str | int] = []
        for worker, gids in queues.items():
            flat += [worker, len(gids), *gids]
        res = await self._run(
            "install_plan", planner_id, epoch, sequence, policy, f"{compute_ms:.3f}", *flat
        )
        return res[0] == "ok", (res[1] if len(res) > 1 else "")

    async def publish_admission(self, waits_ms: dict[str, float],
                                by_class_ms: dict[str, dict[str, float]] | None = None) -> None:
        """The planner's estimate of the wait a new request of each model would see: behind
        everything planned (field MODEL), and by SLO class, behind what is due before it
        (field MODEL|CLASS, see admission_field)."""
        now = await self.now_ms()
        per_class = {admission_field(m, c): w for m, ws in (by_class_ms or {}).items()
                     for c, w in ws.items()}
        await self.client.hset(self.key("admission"), mapping={
            **{f: f"{w:.1f}" for f, w in {**waits_ms, **per_class}.items()}, "@at_ms": now})

    async def admission(self) -> dict[str, str]:
        return await self.client.hgetall(self.key("admission"))

    async def plan_info(self) -> dict[str, str]:
        return await self.client.hgetall(self.key("plan"))

    async def alive_workers(self) -> dict[str, dict[str, str]]:
        """Workers whose heartbeat has not expired, with their registration."""
        now_s, now_us = await self.client.time()
        now_ms = now_s * 1000 + now_us // 1000
        ids = await self.client.zrangebyscore(self.key("workers"), now_ms, "+inf")
        pipe = self.client.pipeline(transaction=False)
        for wid in ids:
            pipe.hgetall(self.key("worker", wid))
            pipe.scard(self.key("running", wid))
        raw = await pipe.execute()
        return {wid: {**raw[2 * i], "running": str(raw[2 * i + 1])}
                for i, wid in enumerate(ids) if raw[2 * i]}

    async def running_requests(self, workers: list[str]) -> dict[str, dict[str, dict]]:
        """worker -> request id -> the fields the planner reads (cls, out, max_tokens,
        prompt_tokens, first_token_ms) of every request the worker runs; requests that ended
        between the two reads are left out. Two round trips, whatever the fleet's size."""
        names = ("cls", "out", "max_tokens", "prompt_tokens", "first_token_ms")
        pipe = self.client.pipeline(transaction=False)
        for wid in workers:
            pipe.smembers(self.key("running", wid))
        ids = [sorted(rids) for rids in await pipe.execute()]
        pipe = self.client.pipeline(transaction=False)
        for rid in (rid for rids in ids for rid in rids):
            pipe.hmget(self.key("req", rid), *names)
        fields = iter(await pipe.execute())
        out: dict[str, dict[str, dict]] = {}
        for wid, rids in zip(workers, ids, strict=True):
            values = {rid: next(fields) for rid in rids}
            out[wid] = {rid: dict(zip(names, v, strict=True))
                        for rid, v in values.items() if v[0] is not None}
        return out

    async def virtual_queues(self, workers) -> dict[str, list[str]]:
        pipe = self.client.pipeline(transaction=False)
        for wid in workers:
            pipe.lrange(self.key("vq", wid), 0, -1)
        return dict(zip(workers, await pipe.execute(), strict=True))

    async def groups(self) -> list[dict[str, str]]:
        """Every live group's fields plus `id` and `queued` (requests waiting in it)."""
        gids = await self.client.zrange(self.key("groups"), 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for gid in gids:
            pipe.hgetall(self.key("grp", gid))
            pipe.llen(self.key("grp", gid, "q"))
        raw = await pipe.execute()
        out = []
        for i, gid in enumerate(gids):
            fields, queued = raw[2 * i], raw[2 * i + 1]
            if fields:
                out.append({**fields, "id": gid, "queued": str(queued)})
        return out

    async def now_ms(self) -> int:
        s, us = await self.client.time()
        return s * 1000 + us // 1000
