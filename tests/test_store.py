"""The queue state scripts (qlm/state/scripts/*.lua) through QueueStore, against a real Redis."""

from __future__ import annotations

import asyncio
import random

import pytest

KIND = "m/interactive/6"
SHORT_LEASE_MS = 30
LONG_LEASE_MS = 60_000


async def enq(store, rid, *, kind=KIND, model="m", cls="interactive", max_queued=1000,
              max_group_size=4, budget=10_000, router="", **fields):
    return await store.enqueue(
        rid, kind=kind, model=model, slo_class=cls, max_queued=max_queued,
        max_group_size=max_group_size, ttft_budget_ms=budget, router=router,
        fields={"prompt_tokens": 5, "max_tokens": 10, **fields},
    )


async def claim_ids(store, worker, n, models=("m",), lease_ms=LONG_LEASE_MS):
    return [c.request_id for c in (await store.claim(worker, n, lease_ms, list(models))).requests]


async def queue_of(store, gid):
    return await store.client.lrange(store.key("grp", gid, "q"), 0, -1)


async def pending(store, model="m"):
    return await store.client.zrange(store.key("pending", model), 0, -1, withscores=True)


async def events(store, type_=None):
    entries = await store.client.xrange(store.key("events"))
    return [e for _, e in entries if type_ is None or e["type"] == type_]


async def final_entries(store, rid):
    return [e for _, e in await store.read_output(rid) if "f" in e]


async def next_message(pubsub, timeout=2.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if msg is not None:
            return msg
    return None


async def lead(store, planner="p1", ttl_ms=10_000) -> int:
    epoch = await store.leader(planner, ttl_ms)
    assert epoch > 0
    return epoch


async def plan(store, queues, planner="p1", epoch=None, sequence=1):
    if epoch is None:
        epoch = await lead(store, planner)
    ok, detail = await store.install_plan(planner, epoch, sequence, "test", 1.5, queues)
    assert ok, detail


async def expire_after_lease(store, lease_ms=SHORT_LEASE_MS):
    await asyncio.sleep(lease_ms / 1000 + 0.015)
    return await store.expire()


# --- enqueue -------------------------------------------------------------------------------


async def test_enqueue_stores_request_opens_group_and_counts_depth(store):
    before = await store.now_ms()
    res = await enq(store, "r1", budget=5000, router="rt1", prompt="hi")
    after = await store.now_ms()
    assert (res.status, res.detail) == ("ok", "g1")

    req = await store.get_request("r1")
    assert req["state"] == "queued"
    assert (req["model"], req["cls"], req["kind"], req["group"]) == ("m", "interactive", KIND, "g1")
    assert (req["worker"], req["out"], req["requeues"]) == ("", "0", "0")
    assert (req["prompt"], req["prompt_tokens"], req["max_tokens"]) == ("hi", "5", "10")
    arrival = int(req["arrival_ms"])
    assert before <= arrival <= after
    assert int(req["deadline_ms"]) == arrival + 5000

    assert await store.queue_depth() == {"interactive": 1}
    [group] = await store.groups()
    assert group["id"] == "g1" and group["queued"] == "1"
    assert (group["model"], group["cls"], group["kind"], group["vq"]) == ("m", "interactive",
                                                                          KIND, "")
    assert group["deadline_ms"] == req["deadline_ms"]
    assert await pending(store) == [("g1", float(req["deadline_ms"]))]
    assert await store.client.hget(store.key("open"), KIND) == "g1"
    assert await store.client.smembers(store.key("watch", "r1")) == {"rt1"}
    [arrive] = await events(store, "arrive")
    assert (arrive["rid"], arrive["gid"], arrive["model"]) == ("r1", "g1", "m")


async def test_enqueue_without_router_adds_no_watcher(store):
    await enq(store, "r1")
    assert not await store.client.exists(store.key("watch", "r1"))


async def test_enqueue_same_id_is_idempotent(store):
    assert (await enq(store, "r1")).status == "ok"
    again = await enq(store, "r1", budget=1, prompt="other")
    assert (again.status, again.detail) == ("exists", "queued")
    assert await store.queue_depth() == {"interactive": 1}
    assert await queue_of(store, "g1") == ["r1"]
    assert "prompt" not in await store.get_request("r1")  # not overwritten

    await claim_ids(store, "w1", 1)
    again = await enq(store, "r1")
    assert (again.status, again.detail) == ("exists", "running")
    assert await store.queue_depth() == {"interactive": 0}


async def test_enqueue_refuses_when_class_is_full(store):
    assert (await enq(store, "r1", max_queued=2)).status == "ok"
    assert (await enq(store, "r2", max_queued=2)).status == "ok"
    full = await enq(store, "r3", max_queued=2)
    assert (full.status, full.detail) == ("full", "2")
    assert await store.get_request("r3") is None
    assert await store.queue_depth() == {"interactive": 2}
    # another class has its own bound
    other = await enq(store, "b1", kind="m/batch/6", cls="batch", max_queued=2)
    assert other.status == "ok"
    assert await store.queue_depth() == {"interactive": 2, "batch": 1}
    # running requests do not count against the bound
    assert await claim_ids(store, "w1", 1) == ["r1"]
    assert (await enq(store, "r3", max_queued=2)).status == "ok"
    assert await store.queue_depth() == {"interactive": 2, "batch": 1}


async def test_enqueue_fills_groups_up_to_max_group_size(store):
    gids = [(await enq(store, f"r{i}", max_group_size=3)).detail for i in range(7)]
    assert gids == ["g1", "g1", "g1", "g2", "g2", "g2", "g3"]
    other = await enq(store, "x", kind="m/interactive/7", max_group_size=3)
    assert other.detail == "g4"
    assert await enq(store, "r7", max_group_size=3) == type(other)("ok", "g3")
    assert await queue_of(store, "g1") == ["r0", "r1", "r2"]
    assert await queue_of(store, "g3") == ["r6", "r7"]
    assert await store.client.hgetall(store.key("open")) == {
        KIND: "g3", "m/interactive/7": "g4"}
    groups = {g["id"]: g for g in await store.groups()}
    assert [groups[g]["joined"] for g in ("g1", "g2", "g3", "g4")] == ["3", "3", "2", "1"]
    assert [(await store.get_request(f"r{i}"))["group"] for i in (0, 3, 6)] == ["g1", "g2", "g3"]


async def test_tighter_deadline_pulls_pending_group_forward(store):
    await enq(store, "r1", budget=10_000)
    d1 = int((await store.get_request("r1"))["deadline_ms"])
    await enq(store, "r2", budget=100)
    d2 = int((await store.get_request("r2"))["deadline_ms"])
    assert d2 < d1
    [group] = await store.groups()
    assert int(group["deadline_ms"]) == d2
    assert await pending(store) == [("g1", float(d2))]
    # a looser deadline changes nothing
    await enq(store, "r3", budget=50_000)
    [group] = await store.groups()
    assert int(group["deadline_ms"]) == d2
    assert await pending(store) == [("g1", float(d2))]
    assert await queue_of(store, "g1") == ["r1", "r2", "r3"]  # order kept


async def test_tighter_deadline_of_group_in_a_virtual_queue_stays_out_of_pending(store):
    await enq(store, "r1", budget=10_000)
    await plan(store, {"w1": ["g1"]})
    await enq(store, "r2", budget=100)
    d2 = int((await store.get_request("r2"))["deadline_ms"])
    [group] = await store.groups()
    assert int(group["deadline_ms"]) == d2 and group["vq"] == "w1"
    assert await pending(store) == []


# --- claim ---------------------------------------------------------------------------------


async def test_claim_respects_n_and_leases(store):
    for i in range(5):
        await enq(store, f"r{i}", max_group_size=10)
    assert (await store.claim("w1", 0, LONG_LEASE_MS, ["m"])).requests == []
    before = await store.now_ms()
    claimed = (await store.claim("w1", 2, 5000, ["m"])).requests
    after = await store.now_ms()
    assert [c.request_id for c in claimed] == ["r0", "r1"]
    assert claimed[0].fields["state"] == "running" and claimed[0].fields["worker"] == "w1"
    assert claimed[0].fields["model"] == "m" and claimed[0].fields["max_tokens"] == "10"
    assert before <= int(claimed[0].fields["start_ms"]) <= after
    for rid in ("r0", "r1"):
        lease = await store.client.zscore(store.key("leases"), rid)
        assert before + 5000 <= lease <= after + 5000
    assert await store.client.smembers(store.key("running", "w1")) == {"r0", "r1"}
    assert await store.queue_depth() == {"interactive": 3}
    assert await queue_of(store, "g1") == ["r2", "r3", "r4"]
    starts = await events(store, "start")
    assert [(e["rid"], e["gid"], e["worker"]) for e in starts] == [
        ("r0", "g1", "w1"), ("r1", "g1", "w1")]
    # asks for more than there are
    assert await claim_ids(store, "w2", 10) == ["r2", "r3", "r4"]
    assert await claim_ids(store, "w2", 10) == []
    assert await store.queue_depth() == {"interactive": 0}


async def test_claim_pending_takes_earliest_deadline_first_across_models(store):
    await enq(store, "late", kind="m1/i/6", model="m1", budget=50_000)
    await enq(store, "early", kind="m2/i/6", model="m2", budget=1_000)
    await enq(store, "mid", kind="m1/i/7", model="m1", budget=20_000)
    models = ("m1", "m2")
    assert await claim_ids(store, "w1", 1, models) == ["early"]
    assert await claim_ids(store, "w1", 1, models) == ["mid"]
    assert await claim_ids(store, "w1", 1, models) == ["late"]


async def test_claim_never_takes_a_model_it_does_not_serve(store):
    await enq(store, "other", kind="m2/i/6", model="m2", budget=1)
    await enq(store, "mine", budget=100_000)
    assert await claim_ids(store, "w1", 5, ("m",)) == ["mine"]
    assert await claim_ids(store, "w1", 5, ("m", "m3")) == []
    assert (await store.get_request("other"))["state"] == "queued"
    assert await pending(store, "m2") != []


async def test_claim_stops_where_the_queue_needs_a_swap_and_names_the_model(store):
    # w1 serves "m" and could swap to "m2": its queue says m2's group first, so it claims
    # nothing, not even pending "m" work, and the groups stay where the plan put them
    await enq(store, "next", kind="m2/i/6", model="m2", budget=90_000)   # g1
    await enq(store, "mine", budget=1_000)                                # g2, pending
    await plan(store, {"w1": ["g1"]})
    claim = await store.claim("w1", 5, LONG_LEASE_MS, ["m"], ["m2"])
    assert (claim.requests, claim.swap_to) == ([], "m2")
    assert await store.client.lrange(store.key("vq", "w1"), 0, -1) == ["g1"]
    assert (await store.get_request("next"))["state"] == "queued"
    # after the swap it serves that group, then the pending work of its new model only
    claim = await store.claim("w1", 5, LONG_LEASE_MS, ["m2"], ["m"])
    assert [c.request_id for c in claim.requests] == ["next"]
    assert claim.swap_to == "m"  # nothing of m2 left: the most urgent it could swap to
    # a worker that cannot serve m2 hands that model's queued group back to the pool
    await enq(store, "more", kind="m2/i/7", model="m2", budget=90_000)   # g3
    await plan(store, {"w2": ["g3"]}, sequence=2)
    claim = await store.claim("w2", 5, LONG_LEASE_MS, ["m"], [])
    assert [c.request_id for c in claim.requests] == ["mine"] and claim.swap_to == ""
    assert [gid for gid, _ in await pending(store, "m2")] == ["g3"]


async def test_claim_names_no_swap_while_its_models_have_work(store):
    await enq(store, "other", kind="m2/i/6", model="m2", budget=1)
    await enq(store, "mine", budget=100_000)
    claim = await store.claim("w1", 1, LONG_LEASE_MS, ["m"], ["m2"])
    assert [c.request_id for c in claim.requests] == ["mine"] and claim.swap_to == ""
    claim = await store.claim("w1", 1, LONG_LEASE_MS, ["m"], ["m2"])
    assert (claim.requests, claim.swap_to) == ([], "m2")


async def test_claim_serves_virtual_queue_first_in_order(store):
    await enq(store, "a1", kind="k/a", budget=90_000)
    await enq(store, "a2", kind="k/a", budget=90_000)
    await enq(store, "b1", kind="k/b", budget=1_000)  # earliest deadline, left pending
    await enq(store, "c1", kind="k/c", budget=80_000)
    await plan(store, {"w1": ["g3", "g1"]})  # c first, then a
    assert await claim_ids(store, "w1", 2) == ["c1", "a1"]
    assert await store.client.lrange(store.key("vq", "w1"), 0, -1) == ["g1"]
    assert await claim_ids(store, "w1", 5) == ["a2", "b1"]
    assert not await store.client.exists(store.key("vq", "w1"))
    # another worker never takes from w1's queue
    gid = (await enq(store, "a3", kind="k/a2", budget=1)).detail
    await plan(store, {"w1": [gid]})
    assert await claim_ids(store, "w2", 5) == []
    assert await claim_ids(store, "w1", 5) == ["a3"]


async def test_claim_hands_unserved_vq_group_back_to_pending(store):
    await enq(store, "x", kind="m2/i/6", model="m2", budget=1000)
    await enq(store, "y", budget=5000)
    await plan(store, {"w1": ["g1", "g2"]})
    assert await pending(store, "m2") == []
    assert await claim_ids(store, "w1", 5, ("m",)) == ["y"]
    assert not await store.client.exists(store.key("vq", "w1"))
    deadline = int((await store.get_request("x"))["deadline_ms"])
    assert await pending(store, "m2") == [("g1", float(deadline))]
    assert await store.client.hget(store.key("grp", "g1"), "vq") == ""
    assert (await store.get_request("x"))["state"] == "queued"
    assert await claim_ids(store, "w2", 5, ("m2",)) == ["x"]


async def test_emptied_group_is_dropped_and_next_arrival_opens_a_new_one(store):
    await enq(store, "r1")
    await enq(store, "r2")
    assert await claim_ids(store, "w1", 2) == ["r1", "r2"]
    assert not await store.client.exists(store.key("grp", "g1"))
    assert await store.groups() == []
    assert await pending(store) == []
    assert await store.client.hget(store.key("open"), KIND) is None
    assert (await enq(store, "r3")).detail == "g2"
    assert await store.client.hget(store.key("open"), KIND) == "g2"


async def test_group_emptied_by_cancel_is_dropped_at_next_claim(store):
    await enq(store, "r1")
    await store.cancel("r1", 60)
    [group] = await store.groups()
    assert group["queued"] == "0"
    assert await claim_ids(store, "w1", 1) == []
    assert await store.groups() == [] and await pending(store) == []
    assert not await store.client.exists(store.key("grp", "g1"))
    assert (await enq(store, "r2")).detail == "g2"


async def test_claim_drops_a_vanished_group_from_the_virtual_queue(store):
    await enq(store, "r1")
    await enq(store, "r2", kind="k2")
    await plan(store, {"w1": ["g1", "g2"]})
    await store.cancel("r1", 60)
    assert await claim_ids(store, "w1", 1) == ["r2"]
    assert not await store.client.exists(store.key("vq", "w1"))
    assert not await store.client.exists(store.key("grp", "g1"))


# --- append --------------------------------------------------------------------------------


async def test_append_is_idempotent_by_index_and_reports_gaps(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1)
    assert await store.append("r1", "w1", 0, [1, 2, 3], "abc") == ("ok", "3")
    assert await store.append("r1", "w1", 0, [1, 2, 3], "abc") == ("ok", "3")
    assert await store.append("r1", "w1", 1, [2], "b") == ("ok", "3")
    assert await store.append("r1", "w1", 2, [3, 4, 5], "cde") == ("ok", "5")
    assert await store.append("r1", "w1", 7, [8], "h") == ("gap", "5")
    assert await store.append("r1", "w1", 5, [], "") == ("ok", "5")
    entries = [e for _, e in await store.read_output("r1")]
    assert entries == [{"i": "0", "t": "1 2 3", "x": "abc"}, {"i": "3", "t": "4 5", "x": ""}]
    assert await store.generated_tokens("r1") == [1, 2, 3, 4, 5]
    assert (await store.get_request("r1"))["out"] == "5"


async def test_append_sets_first_token_ms_once(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1)
    assert "first_token_ms" not in await store.get_request("r1")
    before = await store.now_ms()
    await store.append("r1", "w1", 0, [1], "a")
    first = (await store.get_request("r1"))["first_token_ms"]
    assert int(first) >= before
    await asyncio.sleep(0.005)
    await store.append("r1", "w1", 1, [2], "b")
    assert (await store.get_request("r1"))["first_token_ms"] == first


async def test_append_notifies_watching_routers(store):
    await enq(store, "r1", router="rt1")
    await claim_ids(store, "w1", 1)
    ps = store.client.pubsub()
    await ps.subscribe(store.key("relay", "rt1"))
    try:
        await store.append("r1", "w1", 0, [7, 8], "xy")
        msg = await next_message(ps)
    finally:
        await ps.aclose()
    assert msg is not None and '"t":"7 8"' in msg["data"] and '"r":"r1"' in msg["data"]


async def test_append_is_lost_when_not_held(store):
    assert await store.append("nope", "w1", 0, [1], "a") == ("lost", "gone")
    await enq(store, "r1")
    assert await store.append("r1", "w1", 0, [1], "a") == ("lost", "queued")
    await claim_ids(store, "w1", 1, lease_ms=SHORT_LEASE_MS)
    assert await store.append("r1", "w2", 0, [1], "a") == ("lost", "running")
    # lease lapsed and the request went to w2
    assert (await expire_after_lease(store))[0] == ["r1"]
    assert await store.append("r1", "w1", 0, [1], "a") == ("lost", "queued")
    assert await claim_ids(store, "w2", 1) == ["r1"]
    assert await store.append("r1", "w1", 0, [1], "a") == ("lost", "running")
    assert await store.append("r1", "w2", 0, [1], "a") == ("ok", "1")
    await store.cancel("r1", 60)
    assert await store.append("r1", "w2", 1, [2], "b") == ("lost", "cancelled")
    assert await store.generated_tokens("r1") == [1]


# --- finish --------------------------------------------------------------------------------


async def test_finish_writes_final_entry_with_usage_and_sets_retention(store):
    await enq(store, "r1", router="rt1")
    await claim_ids(store, "w1", 1)
    await store.append("r1", "w1", 0, [1, 2, 3], "abc")
    assert await store.finish("r1", "w1", "length", "", 120) == ("ok", "3")
    req = await store.get_request("r1")
    assert req["state"] == "finished" and req["finish_reason"] == "length"
    [final] = await final_entries(store, "r1")
    assert final["f"] == "length" and final["e"] == ""
    assert final["n"] == "3" and final["p"] == "5"
    assert (final["a"], final["s"], final["ft"], final["d"]) == (
        req["arrival_ms"], req["start_ms"], req["first_token_ms"], req["deadline_ms"])
    assert final["end"] == req["finish_ms"]
    assert int(final["a"]) <= int(final["s"]) <= int(final["ft"]) <= int(final["end"])
    for key in (store.key("req", "r1"), store.key("out", "r1"), store.key("watch", "r1")):
        assert 110 <= await store.client.ttl(key) <= 120
    assert 110 <= await store.request_ttl("r1") <= 120
    assert await store.client.zscore(store.key("leases"), "r1") is None
    assert not await store.client.sismember(store.key("running", "w1"), "r1")
    [ev] = await events(store, "finished")
    assert (ev["rid"], ev["worker"], ev["out"], ev["gid"]) == ("r1", "w1", "3", "g1")
    # done once only
    assert await store.finish("r1", "w1", "length", "", 120) == ("lost", "finished")
    assert len(await final_entries(store, "r1")) == 1


async def test_finish_with_error_marks_failed(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1)
    assert await store.finish("r1", "w1", "error", "boom", 60) == ("ok", "0")
    req = await store.get_request("r1")
    assert (req["state"], req["finish_reason"], req["error"]) == ("failed", "error", "boom")
    [final] = await final_entries(store, "r1")
    assert (final["f"], final["e"], final["n"], final["ft"]) == ("error", "boom", "0", "")


async def test_finish_is_lost_for_a_worker_that_does_not_hold_it(store):
    assert await store.finish("nope", "w1", "length", "", 60) == ("lost", "gone")
    await enq(store, "r1")
    assert await store.finish("r1", "w1", "length", "", 60) == ("lost", "queued")
    await claim_ids(store, "w1", 1)
    assert await store.finish("r1", "w2", "length", "", 60) == ("lost", "running")
    req = await store.get_request("r1")
    assert req["state"] == "running" and await store.request_ttl("r1") == 0
    assert await final_entries(store, "r1") == []


async def test_finish_stores_last_tokens_in_the_same_step(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1)
    await store.append("r1", "w1", 0, [1, 2], "ab")
    assert await store.finish("r1", "w1", "stop", "", 90, 2, [3, 4], "cd") == ("ok", "4")
    entries = [e for _, e in await store.read_output("r1")]
    assert entries[1] == {"i": "2", "t": "3 4", "x": "cd"}
    assert entries[2]["f"] == "stop" and entries[2]["n"] == "4" and entries[2]["p"] == "5"
    assert {"a", "s", "ft", "d", "end"} <= entries[2].keys()
    assert len(entries) == 3
    assert (await store.get_request("r1"))["state"] == "finished"
    assert 80 <= await store.request_ttl("r1") <= 90


async def test_finish_with_tokens_is_lost_for_another_worker(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1)
    assert await store.finish("r1", "w2", "stop", "", 60, 0, [1], "a") == ("lost", "running")
    assert (await store.get_request("r1"))["state"] == "running"
    assert await store.read_output("r1") == []


async def test_finish_with_a_gap_does_not_finish(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1)
    await store.append("r1", "w1", 0, [1, 2], "ab")
    status, detail = await store.finish("r1", "w1", "stop", "", 60, 5, [6], "f")
    assert (status, detail) == ("gap", "2")
    # the caller was told the tokens were refused: the request must still be its to finish
    assert (await store.get_request("r1"))["state"] == "running"
    assert await final_entries(store, "r1") == []


# --- cancel --------------------------------------------------------------------------------


async def test_cancel_queued_leaves_its_group(store):
    for i in range(3):
        await enq(store, f"r{i}")
    assert await store.cancel("r1", 60) == ("queued", "cancelled")
    assert await queue_of(store, "g1") == ["r0", "r2"]
    assert await store.queue_depth() == {"interactive": 2}
    req = await store.get_request("r1")
    assert (req["state"], req["finish_reason"]) == ("cancelled", "cancelled")
    [final] = await final_entries(store, "r1")
    assert final["f"] == "cancelled" and final["s"] == "" and final["n"] == "0"
    assert 50 <= await store.request_ttl("r1") <= 60
    assert await claim_ids(store, "w1", 5) == ["r0", "r2"]
    [ev] = await events(store, "cancelled")
    assert ev["rid"] == "r1"


async def test_cancel_running_aborts_on_its_worker(store):
    await enq(store, "r1")
    await enq(store, "r2")
    await claim_ids(store, "w1", 2)
    ps = store.client.pubsub()
    await ps.subscribe(store.key("ctl", "w1"))
    try:
        assert await store.cancel("r1", 60) == ("running", "cancelled")
        msg = await next_message(ps)
    finally:
        await ps.aclose()
    assert msg is not None and msg["data"] == "abort r1"
    assert await store.client.smembers(store.key("running", "w1")) == {"r2"}
    assert await store.client.zscore(store.key("leases"), "r1") is None
    assert await store.client.zscore(store.key("leases"), "r2") is not None
    assert (await store.get_request("r1"))["state"] == "cancelled"
    assert await store.queue_depth() == {"interactive": 0}
    assert await store.finish("r1", "w1", "length", "", 60) == ("lost", "cancelled")
    assert len(await final_entries(store, "r1")) == 1


async def test_cancel_finished_or_unknown_changes_nothing(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1)
    await store.finish("r1", "w1", "length", "", 60)
    before = await store.get_request("r1")
    assert await store.cancel("r1", 60) == ("finished", "finished")
    assert await store.get_request("r1") == before
    assert len(await final_entries(store, "r1")) == 1
    assert await store.cancel("nope", 60) == ("gone", "gone")
    assert await store.get_request("nope") is None
    await enq(store, "r2")
    await store.cancel("r2", 60)
    assert await store.cancel("r2", 60) == ("cancelled", "cancelled")
    assert await store.queue_depth() == {"interactive": 0}
    assert len(await final_entries(store, "r2")) == 1


# --- heartbeat -----------------------------------------------------------------------------


async def hb(store, worker="w1", running=(), ttl_ms=10_000, lease_ms=LONG_LEASE_MS):
    return await store.heartbeat(
        worker, ttl_ms=ttl_ms, lease_ms=lease_ms, address="127.0.0.1:1", engine="sim",
        models=["m", "m2"], max_running=8, running=list(running),
    )


async def test_heartbeat_registers_the_worker(store):
    before = await store.now_ms()
    assert await hb(store, ttl_ms=5000) == (0, [])
    after = await store.now_ms()
    expiry = await store.client.zscore(store.key("workers"), "w1")
    assert before + 5000 <= expiry <= after + 5000
    reg = await store.client.hgetall(store.key("worker", "w1"))
    assert (reg["address"], reg["engine"], reg["models"], reg["max_running"]) == (
        "127.0.0.1:1", "sim", "m m2", "8")
    assert before <= int(reg["seen_ms"]) <= after
    alive = await store.alive_workers()
    assert alive["w1"]["running"] == "0" and alive["w1"]["models"] == "m m2"
    assert (reg["loaded"], reg["warm"]) == ("m m2", "")  # by default it serves them all now
    await store.heartbeat("w1", ttl_ms=5000, lease_ms=LONG_LEASE_MS, address="127.0.0.1:1",
                          engine="sim", models=["m", "m2", "m3"], loaded=["m2"], warm=["m"],
                          max_running=8, running=[])
    reg = await store.client.hgetall(store.key("worker", "w1"))
    assert (reg["models"], reg["loaded"], reg["warm"]) == ("m m2 m3", "m2", "m")


async def test_heartbeat_renews_only_listed_leases_and_reports_lost(store):
    for rid in ("r1", "r2", "r3", "r4"):
        await enq(store, rid)
    await claim_ids(store, "w1", 3, lease_ms=SHORT_LEASE_MS)  # r1, r2, r3
    await claim_ids(store, "w2", 1)  # r4
    await store.cancel("r3", 60)
    old = await store.client.zscore(store.key("leases"), "r2")
    renewed, lost = await hb(store, running=["r1", "r3", "r4", "nope"])
    assert renewed == 1 and lost == ["r3", "r4", "nope"]
    assert await store.client.zscore(store.key("leases"), "r1") >= old + LONG_LEASE_MS - 1000
    assert await store.client.zscore(store.key("leases"), "r2") == old
    assert await store.client.zscore(store.key("leases"), "r3") is None
    requeued, _ = await expire_after_lease(store)
    assert requeued == ["r2"]
    assert (await store.get_request("r1"))["state"] == "running"


# --- expire --------------------------------------------------------------------------------


async def test_expired_lease_returns_request_to_head_of_its_group(store):
    for i in range(3):
        await enq(store, f"r{i}")
    assert await claim_ids(store, "w1", 1, lease_ms=SHORT_LEASE_MS) == ["r0"]
    await store.append("r0", "w1", 0, [1, 2], "ab")
    assert await expire_after_lease(store) == (["r0"], [])
    req = await store.get_request("r0")
    assert (req["state"], req["worker"], req["requeues"]) == ("queued", "", "1")
    assert req["out"] == "2"  # output kept, to resume from
    assert await queue_of(store, "g1") == ["r0", "r1", "r2"]
    assert await store.queue_depth() == {"interactive": 3}
    assert await store.client.zscore(store.key("leases"), "r0") is None
    assert not await store.client.exists(store.key("running", "w1"))
    [ev] = await events(store, "requeue")
    assert (ev["rid"], ev["gid"], ev["why"]) == ("r0", "g1", "lease")
    # the next claim resumes it first; start_ms is kept from the first start
    claimed = (await store.claim("w2", 1, LONG_LEASE_MS, ["m"])).requests
    assert claimed[0].request_id == "r0" and claimed[0].fields["out"] == "2"
    assert claimed[0].fields["start_ms"] == req["start_ms"]
    # idempotent
    assert await store.expire() == ([], [])
    assert (await store.get_request("r0"))["requeues"] == "1"


async def test_expired_lease_recreates_a_dropped_group_in_pending(store):
    await enq(store, "r1", budget=7000)
    deadline = (await store.get_request("r1"))["deadline_ms"]
    assert await claim_ids(store, "w1", 1, lease_ms=SHORT_LEASE_MS) == ["r1"]
    assert await store.groups() == []
    ps = store.client.pubsub()
    await ps.subscribe(store.key("wake", "m"))
    try:
        assert (await expire_after_lease(store))[0] == ["r1"]
        msg = await next_message(ps)
    finally:
        await ps.aclose()
    assert msg is not None and msg["data"] == "g1"
    [group] = await store.groups()
    assert (group["id"], group["model"], group["cls"], group["kind"]) == (
        "g1", "m", "interactive", KIND)
    assert (group["deadline_ms"], group["vq"], group["queued"]) == (deadline, "", "1")
    assert await pending(store) == [("g1", float(deadline))]
    assert await store.queue_depth() == {"interactive": 1}
    assert await claim_ids(store, "w2", 1) == ["r1"]
    assert await store.expire() == ([], [])


async def test_expired_lease_of_group_in_a_virtual_queue_stays_there(store):
    await enq(store, "r1")
    await enq(store, "r2")
    await plan(store, {"w1": ["g1"]})
    assert await claim_ids(store, "w1", 1, lease_ms=SHORT_LEASE_MS) == ["r1"]
    assert (await expire_after_lease(store))[0] == ["r1"]
    assert await queue_of(store, "g1") == ["r1", "r2"]
    assert await pending(store) == []
    assert await store.client.lrange(store.key("vq", "w1"), 0, -1) == ["g1"]
    assert await claim_ids(store, "w2", 5) == []
    assert await claim_ids(store, "w1", 5) == ["r1", "r2"]


async def test_expire_returns_at_most_max_requests_per_call(store):
    for i in range(3):
        await enq(store, f"r{i}")
    await claim_ids(store, "w1", 3, lease_ms=SHORT_LEASE_MS)
    await asyncio.sleep(SHORT_LEASE_MS / 1000 + 0.015)
    first, _ = await store.expire(max_requests=2)
    assert len(first) == 2
    rest, _ = await store.expire(max_requests=2)
    assert sorted(first + rest) == ["r0", "r1", "r2"]
    assert await store.queue_depth() == {"interactive": 3}


async def test_expire_ignores_leases_of_requests_no_longer_running(store):
    await enq(store, "r1")
    await claim_ids(store, "w1", 1, lease_ms=SHORT_LEASE_MS)
    await store.finish("r1", "w1", "stop", "", 60)
    # a stale lease entry (as a race might leave) is cleaned, not requeued
    await store.client.zadd(store.key("leases"), {"r1": 0})
    assert await store.expire() == ([], [])
    assert await store.client.zcard(store.key("leases")) == 0
    assert (await store.get_request("r1"))["state"] == "finished"


async def test_expire_hands_a_dead_workers_queue_back_and_unregisters_it(store):
    await enq(store, "a", kind="k/a", budget=3000)
    await enq(store, "b", kind="k/b", budget=2000)
    await hb(store, "w1", ttl_ms=SHORT_LEASE_MS)
    await hb(store, "w2", ttl_ms=LONG_LEASE_MS)
    await plan(store, {"w1": ["g1", "g2"]})
    assert await pending(store) == []
    assert await expire_after_lease(store) == ([], ["w1"])
    assert not await store.client.exists(store.key("vq", "w1"))
    assert not await store.client.exists(store.key("worker", "w1"))
    assert await store.client.zrange(store.key("workers"), 0, -1) == ["w2"]
    assert set(await store.alive_workers()) == {"w2"}
    deadlines = {g["id"]: float(g["deadline_ms"]) for g in await store.groups()}
    assert await pending(store) == [("g2", deadlines["g2"]), ("g1", deadlines["g1"])]
    assert {g["vq"] for g in await store.groups()} == {""}
    [ev] = await events(store, "worker_lost")
    assert ev["worker"] == "w1"
    assert await store.expire() == ([], [])
    assert len(await events(store, "worker_lost")) == 1
    assert await claim_ids(store, "w2", 5) == ["b", "a"]


async def test_requeue_keeps_pending_score_at_group_deadline(store):
    await enq(store, "loose", budget=60_000)
    await enq(store, "tight", budget=200)  # pulls g1's deadline forward
    tight = float((await store.get_request("tight"))["deadline_ms"])
    assert await pending(store) == [("g1", tight)]
    assert await claim_ids(store, "w1", 1, lease_ms=SHORT_LEASE_MS) == ["loose"]
    assert (await expire_after_lease(store))[0] == ["loose"]
    [group] = await store.groups()
    assert float(group["deadline_ms"]) == tight
    assert await pending(store) == [("g1", tight)]  # got the loose request's deadline instead


async def test_recreated_group_deadline_is_its_earliest_member(store):
    await enq(store, "a-loose", budget=60_000)
    await enq(store, "b-tight", budget=200)
    tight = float((await store.get_request("b-tight"))["deadline_ms"])
    assert await claim_ids(store, "w1", 2, lease_ms=SHORT_LEASE_MS) == ["a-loose", "b-tight"]
    assert sorted((await expire_after_lease(store))[0]) == ["a-loose", "b-tight"]
    [group] = await store.groups()
    assert await pending(store) == [("g1", tight)]
    assert float(group["deadline_ms"]) == tight  # what the planner reads


# --- leader --------------------------------------------------------------------------------


async def test_leader_lock_and_epochs(store):
    assert await store.leader("p1", 150) == 1
    assert await store.leader("p2", 150) == 0
    assert await store.leader("p1", 150) == 1  # renewing keeps the epoch
    assert await store.client.get(store.key("leader")) == "p1"
    await asyncio.sleep(0.17)
    assert await store.leader("p2", 10_000) == 2
    assert await store.leader("p1", 10_000) == 0
    assert await store.client.get(store.key("leader")) == "p2"
    assert await store.client.get(store.key("epoch")) == "2"


async def test_leader_renewal_extends_the_lock(store):
    assert await store.leader("p1", 200) == 1
    assert await store.client.pttl(store.key("leader")) <= 200
    assert await store.leader("p1", 10_000) == 1
    assert await store.client.pttl(store.key("leader")) > 5000
    assert await store.leader("p2", 10_000) == 0


# --- install_plan --------------------------------------------------------------------------


async def test_install_plan_is_fenced(store):
    await enq(store, "r1")
    assert await store.install_plan("p1", 1, 1, "edf", 1.0, {"w1": ["g1"]}) == (False, "0")
    assert await store.leader("p1", 150) == 1
    assert await store.install_plan("p2", 1, 1, "edf", 1.0, {"w1": ["g1"]}) == (False, "1")
    assert await store.install_plan("p1", 0, 1, "edf", 1.0, {"w1": ["g1"]}) == (False, "1")
    await asyncio.sleep(0.17)
    assert await store.leader("p2", 10_000) == 2
    # the deposed leader's plan is refused
    assert await store.install_plan("p1", 1, 5, "edf", 1.0, {"w1": ["g1"]}) == (False, "2")
    assert await store.install_plan("p2", 1, 5, "edf", 1.0, {"w1": ["g1"]}) == (False, "2")
    assert not await store.client.exists(store.key("vq", "w1"))
    assert await store.plan_info() == {}
    assert len(await pending(store)) == 1
    assert await store.install_plan("p2", 2, 5, "edf", 1.0, {"w1": ["g1"]}) == (True, "")


async def test_install_plan_places_groups_in_order(store):
    for kind in ("a", "b", "c"):
        await enq(store, kind, kind=kind)
    epoch = await lead(store)
    ps = store.client.pubsub()
    await ps.subscribe(store.key("ctl", "w1"))
    try:
        before = await store.now_ms()
        ok, _ = await store.install_plan("p1", epoch, 7, "edf", 2.25,
                                         {"w1": ["g3", "g1"], "w2": ["g2"]})
        msg = await next_message(ps)
    finally:
        await ps.aclose()
    assert ok
    assert msg is not None and msg["data"] == "plan"
    assert await store.virtual_queues(["w1", "w2"]) == {"w1": ["g3", "g1"], "w2": ["g2"]}
    assert await pending(store) == []
    assert {g["id"]: g["vq"] for g in await store.groups()} == {"g1": "w1", "g2": "w2",
                                                                "g3": "w1"}
    info = await store.plan_info()
    assert (info["epoch"], info["sequence"], info["policy"], info["compute_ms"]) == (
        "1", "7", "edf", "2.250")
    assert int(info["created_ms"]) >= before


async def test_install_plan_moves_a_group_between_workers(store):
    for kind in ("a", "b"):
        await enq(store, kind, kind=kind)
    epoch = await lead(store)
    await plan(store, {"w1": ["g1", "g2"]}, epoch=epoch)
    await plan(store, {"w2": ["g1"]}, epoch=epoch, sequence=2)
    assert await store.virtual_queues(["w1", "w2"]) == {"w1": ["g2"], "w2": ["g1"]}
    assert {g["id"]: g["vq"] for g in await store.groups()} == {"g1": "w2", "g2": "w1"}
    # both named: a group moves from a worker listed earlier in the plan
    await plan(store, {"w1": [], "w2": ["g2", "g1"]}, epoch=epoch, sequence=3)
    assert await store.virtual_queues(["w1", "w2"]) == {"w1": [], "w2": ["g2", "g1"]}
    assert await pending(store) == []
    # and to a worker listed earlier than the one holding it
    await plan(store, {"w1": ["g1"], "w2": ["g2"]}, epoch=epoch, sequence=4)
    assert await store.virtual_queues(["w1", "w2"]) == {"w1": ["g1"], "w2": ["g2"]}
    assert {g["id"]: g["vq"] for g in await store.groups()} == {"g1": "w1", "g2": "w2"}


async def test_install_plan_returns_left_out_groups_to_pending(store):
    await enq(store, "a", kind="a", budget=4000)
    await enq(store, "b", kind="b", budget=3000)
    epoch = await lead(store)
    await plan(store, {"w1": ["g1", "g2"]}, epoch=epoch)
    await plan(store, {"w1": ["g2"]}, epoch=epoch, sequence=2)
    assert await store.virtual_queues(["w1"]) == {"w1": ["g2"]}
    deadline = float((await store.get_request("a"))["deadline_ms"])
    assert await pending(store) == [("g1", deadline)]
    assert await store.client.hget(store.key("grp", "g1"), "vq") == ""
    await plan(store, {"w1": []}, epoch=epoch, sequence=3)
    assert not await store.client.exists(store.key("vq", "w1"))
    assert [g for g, _ in await pending(store)] == ["g2", "g1"]


async def test_install_plan_skips_unknown_and_duplicate_groups(store):
    await enq(store, "a", kind="a")
    await enq(store, "b", kind="b")
    await plan(store, {"w1": ["nope", "g1", "g1"], "w2": ["g1", "g9", "g2"]})
    assert await store.virtual_queues(["w1", "w2"]) == {"w1": ["g1"], "w2": ["g2"]}
    assert await store.client.exists(store.key("grp", "nope")) == 0


# --- nothing lost --------------------------------------------------------------------------


WORKERS = {"w1": ("a", "b"), "w2": ("b", "c")}
KINDS = [("a", "interactive", 2000), ("b", "interactive", 500), ("b", "batch", 90_000),
         ("c", "batch", 30_000), ("c", "interactive", 1000)]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_nothing_is_lost(store, seed):
    rng = random.Random(seed)
    n = 40
    rids = [f"r{i:03d}" for i in range(n)]
    enqueued: list[str] = []
    to_enqueue = list(rids)
    held: dict[str, set[str]] = {w: set() for w in WORKERS}
    out: dict[str, int] = {}  # tokens each holder believes stored
    ended: dict[str, str] = {}  # rid -> terminal state, as reported by the scripts
    epoch = await lead(store)
    sleeps = 0

    async def finish_one(worker, rid):
        count = out.get(rid, 0)
        if rng.random() < 0.5:
            status, detail = await store.append(rid, worker, count, [1, 2], "ab")
            if status == "ok":
                status, _ = await store.finish(rid, worker, "length", "", 600)
        else:
            status, detail = await store.finish(rid, worker, "stop", "", 600, count, [3], "c")
        held[worker].discard(rid)
        if status == "ok":
            assert rid not in ended, f"{rid} ended twice"
            ended[rid] = "finished"
        else:
            assert status == "lost", (status, detail)

    async def claim(worker, n_, lease_ms):
        for c in (await store.claim(worker, n_, lease_ms, list(WORKERS[worker]))).requests:
            assert c.fields["model"] in WORKERS[worker]
            assert c.request_id not in ended
            held[worker].add(c.request_id)
            out[c.request_id] = int(c.fields["out"])

    for _step in range(220):
        action = rng.choices(
            ["enqueue", "claim", "finish", "append", "cancel", "expire", "plan"],
            [6, 4, 3, 2, 2, 1, 1])[0]
        worker = rng.choice(list(WORKERS))
        if action == "enqueue" and to_enqueue:
            rid = to_enqueue.pop(0)
            model, cls, budget = rng.choice(KINDS)
            res = await enq(store, rid, kind=f"{model}/{cls}", model=model, cls=cls,
                            budget=budget, max_group_size=3)
            assert res.status == "ok"
            enqueued.append(rid)
        elif action == "claim":
            lease = SHORT_LEASE_MS if rng.random() < 0.3 else LONG_LEASE_MS
            await claim(worker, rng.randint(1, 3), lease)
        elif action == "finish" and held[worker]:
            await finish_one(worker, rng.choice(sorted(held[worker])))
        elif action == "append" and held[worker]:
            rid = rng.choice(sorted(held[worker]))
            status, detail = await store.append(rid, worker, out[rid], [9], "z")
            if status == "ok":
                out[rid] = int(detail)
            else:
                assert status == "lost"
                held[worker].discard(rid)
        elif action == "cancel" and enqueued:
            rid = rng.choice(enqueued)
            before, after = await store.cancel(rid, 600)
            if before in ("queued", "running"):
                assert after == "cancelled" and rid not in ended
                ended[rid] = "cancelled"
            else:
                assert before == after == ended[rid]
        elif action == "expire" and sleeps < 6:
            sleeps += 1
            await asyncio.sleep(SHORT_LEASE_MS / 1000 + 0.01)
            requeued, _ = await store.expire()
            for rid in requeued:
                assert rid not in ended
        elif action == "plan":
            gids = [g["id"] for g in await store.groups()]
            rng.shuffle(gids)
            queues = {w: [] for w in WORKERS}
            for gid in gids:
                if rng.random() < 0.7:
                    queues[rng.choice(list(WORKERS))].append(gid)
            ok, _ = await store.install_plan("p1", epoch, _step, "test", 0.1, queues)
            assert ok

    # drain: enqueue the rest, then serve everything still live
    for rid in to_enqueue:
        model, cls, budget = rng.choice(KINDS)
        assert (await enq(store, rid, kind=f"{model}/{cls}", model=model, cls=cls,
                          budget=budget, max_group_size=3)).status == "ok"
    for _ in range(100):
        if len(ended) == n:
            break
        await store.expire()
        for worker in WORKERS:
            await claim(worker, 50, LONG_LEASE_MS)
            for rid in sorted(held[worker]):
                await finish_one(worker, rid)
        if len(ended) < n and not any(held.values()):
            await asyncio.sleep(0.01)  # short leases still running out
    assert len(ended) == n
    for worker, models in WORKERS.items():  # sweeps empty groups left behind by cancels
        assert await claim_ids(store, worker, 10, models) == []

    terminal = [e for e in await events(store) if e["type"] in ("finished", "cancelled",
                                                                 "failed")]
    assert sorted(e["rid"] for e in terminal) == rids  # each exactly once
    for rid in rids:
        req = await store.get_request(rid)
        assert req["state"] == ended[rid]
        assert len(await final_entries(store, rid)) == 1
        assert await store.request_ttl(rid) > 0
    assert set((await store.queue_depth()).values()) <= {0}
    c = store.client
    assert await c.zcard(store.key("leases")) == 0
    assert await c.zcard(store.key("groups")) == 0
    assert await c.hgetall(store.key("open")) == {}
    for pattern in ("grp:*", "pending:*", "running:*", "vq:*"):
        assert [k async for k in c.scan_iter(store.key(pattern))] == [], pattern


async def test_group_token_totals_follow_its_queued_requests(store):
    async def totals(gid="g1"):
        g = await store.client.hmget(store.key("grp", gid), "prompt_tokens", "max_tokens")
        return tuple(int(x) for x in g)

    await enq(store, "a", prompt_tokens=100, max_tokens=50)
    await enq(store, "b", prompt_tokens=20, max_tokens=7)
    await enq(store, "c", prompt_tokens=1, max_tokens=1)
    assert await totals() == (121, 58)
    assert await store.cancel("c", 60) == ("queued", "cancelled")
    assert await totals() == (120, 57)
    assert await claim_ids(store, "w1", 1) == ["a"]
    assert await totals() == (20, 7)
    # "a" produced 30 tokens, then is evicted: it comes back with a longer context and
    # fewer tokens to go
    await store.append("a", "w1", 0, list(range(30)), "x" * 30)
    assert (await store.evict("a", "w1"))[0] == "ok"
    assert await totals() == (20 + 130, 7 + 20)
    assert sorted(await claim_ids(store, "w1", 2)) == ["a", "b"]
    assert not await store.client.exists(store.key("grp", "g1"))  # emptied and dropped
