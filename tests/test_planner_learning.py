"""The planner learns output lengths from the fleet's completions: at start from those still in
the event stream, so a restarted planner, or a standby taking over, does not plan from the prior;
and while it is a standby, from each new one. The leader keeps its calibration scores in Redis
for the next leader."""

from __future__ import annotations

import asyncio

from qlm import config as qlm_config
from qlm.core.estimator import WaitEstimate
from services.planner.loop import PlannerLoop

from .test_failures import two_workers
from .test_store import claim_ids, enq


async def finish(store, rid: str, tokens: int, cls: str = "interactive") -> None:
    await enq(store, rid, model="small", cls=cls, kind=f"small:{cls}:0")
    assert await claim_ids(store, "w1", 1, models=("small",)) == [rid]
    await store.append(rid, "w1", 0, list(range(tokens)), "x" * tokens)
    assert (await store.finish(rid, "w1", "length", "", 60))[0] == "ok"


def planner(store, tmp_path) -> PlannerLoop:
    path, _ = two_workers(tmp_path, 1.0)
    return PlannerLoop(qlm_config.load(path), store, policy="qlm")


async def test_a_starting_planner_learns_the_completions_in_the_stream(
        store, tmp_path, monkeypatch):
    monkeypatch.setattr("services.planner.loop.CATCH_UP_BATCH", 4)  # several reads
    for i in range(5):
        await finish(store, f"i{i}", 7)
    await finish(store, "b0", 300, cls="batch")
    loop = planner(store, tmp_path)
    lengths = loop.policy.lengths
    prior = lengths.mean("small", "interactive")
    last = await loop._catch_up()
    assert lengths.count("small", "interactive") == 5
    assert lengths.count("small", "batch") == 1
    assert abs(lengths.mean("small", "interactive") - 7) < abs(prior - 7)
    # the loop goes on from the last event read, so it learns nothing twice
    newest = await store.client.xrevrange(store.key("events"), count=1)
    assert last == newest[0][0]


async def test_a_standby_planner_keeps_learning(store, tmp_path):
    assert await store.leader("the-leader", 60_000) > 0
    await finish(store, "i0", 7)
    loop = planner(store, tmp_path)
    await loop.start()
    try:
        for i in range(1, 4):
            await finish(store, f"i{i}", 9)
        lengths = loop.policy.lengths
        async with asyncio.timeout(10):
            while lengths.count("small", "interactive") < 4:
                await asyncio.sleep(0.05)
        assert not loop.leader and loop.last_plan is None
    finally:
        await loop.stop()


async def test_the_next_leader_reads_waits_as_calibrated_as_the_last(store, tmp_path):
    first = planner(store, tmp_path)
    await first._take_lead()
    assert first.leader
    calibration = first.policy.calibration
    est = WaitEstimate(mean=10.0, std=4.0, fixed=2.0)
    for i in range(120):  # waits that took a third of the room the estimates left
        calibration.record(est, est.fixed + (i % 10) / 30 * (est._raw_quantile(1.645) - 2.0))
    await first._save_calibration()
    await first._save_calibration()  # nothing new: nothing written twice
    assert await store.client.llen(store.key("calibration")) == 120
    spread = calibration.spread()
    assert spread < 0.5
    # the first is lost (its lock expires); a new planner takes the lead and reads the scores
    await store.client.delete(store.key("leader"))
    second = planner(store, tmp_path)
    assert second.policy.calibration.spread() == 1.0
    await second._take_lead()
    assert second.leader and second.policy.calibration.spread() == spread


async def test_the_snapshot_counts_the_prompts_a_worker_still_owes_a_first_token(store):
    from services.planner.loop import take_snapshot

    for rid in ("a", "b", "c"):
        await enq(store, rid, model="small", kind="small:interactive:0", prompt_tokens=100)
    assert await claim_ids(store, "w1", 3, models=("small",)) == ["a", "b", "c"]
    await store.heartbeat("w1", ttl_ms=60_000, lease_ms=60_000, address="x", engine="sim",
                          models=["small"], max_running=8, running=["a", "b", "c"])
    await store.append("a", "w1", 0, [1, 2], "xy")  # a has its first tokens: b and c owe
    snap = await take_snapshot(store, await store.alive_workers())
    (w1,) = snap.workers
    assert len(w1.running_requests) == 3
    assert w1.prefill_tokens == 200
