"""WorkerRunner: the pull loop, leases and output streaming of one worker (no gRPC here)."""

from __future__ import annotations

import asyncio
import logging

from qlm.config import StackConfig, WorkerConfig
from qlm.engines.base import Engine, EngineError, EngineRequest
from qlm.serving import cancel_and_wait
from qlm.state.store import ClaimedRequest, QueueStore

log = logging.getLogger("qlm.worker")


def engine_request(claimed: ClaimedRequest, context: list[int], generated: int) -> EngineRequest:
    f = claimed.fields
    return EngineRequest(
        request_id=claimed.request_id,
        model=f["model"],
        prompt_token_ids=tuple(context),
        max_tokens=int(f["max_tokens"]) - generated,
        temperature=float(f.get("temperature") or 1.0),
        top_p=float(f.get("top_p") or 1.0),
        seed=int(f["seed"]) if f.get("seed") else None,
        ignore_eos=f.get("ignore_eos") == "1",
        # tighter deadlines run first inside the engine when it must queue
        priority=int(f.get("ttft_budget_ms") or 0),
    )


class WorkerRunner:
    def __init__(self, config: StackConfig, worker: WorkerConfig, engine: Engine,
                 store: QueueStore, poll_s: float = 0.5):
        self.config = config
        self.worker = worker
        self.engine = engine
        self.store = store
        self.poll_s = poll_s
        self.running: dict[str, asyncio.Task] = {}
        self._model_of: dict[str, str] = {}  # running request id -> its model
        self.completed = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._pubsub = None
        self._stopping = False
        # True while the last claim filled the engine: more work may be waiting, so a finished
        # request should trigger a claim (otherwise new work announces itself on `wake:MODEL`)
        self._backlog = False
        # Claimed requests not yet handed to the engine: engines count a request only once
        # its generate() is first iterated, so without this a pull would claim twice.
        self._starting = 0
        # held by a model swap, so no request of a model being unloaded is claimed meanwhile
        self._swap_lock = asyncio.Lock()
        # The plan's step limit (StepLimitAction; 0: none): at most max_running requests run
        # here, and new requests start only while the prompt tokens started since the engine's
        # last step are under max_prefill_tokens (see _pull).
        self.max_running = 0
        self.max_prefill_tokens = 0
        self._prefill_since_step = 0
        # True while a pull stopped at the prefill budget: the next step's output wakes it
        self._prefill_wait = False
        self.model_swaps = 0
        self._loading = ""  # the model a swap under way loads
        self._warming: dict[str, asyncio.Task] = {}

    @property
    def id(self) -> str:
        return self.worker.id

    def servable(self) -> list[str]:
        """The models it can serve: those loaded now, and after a swap its config's others and
        any it holds warm (a model an operator swapped it to, say)."""
        return list(dict.fromkeys(
            [*self.engine.models(), *self.worker.models, *self.engine.warm_models()]))

    async def start(self) -> None:
        await self._heartbeat()
        self._pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
        await self._subscribe()
        self._tasks = [
            asyncio.create_task(self._listen(), name="worker-listen"),
            asyncio.create_task(self._heartbeats(), name="worker-heartbeat"),
            asyncio.create_task(self._pull_loop(), name="worker-pull"),
        ]

    async def _subscribe(self) -> None:
        """Listens to its control channel and the wake-ups of the models it can serve (new
        work of a model it could swap to matters when it is idle, see _pull)."""
        wanted = {self.store.key("ctl", self.id)} | {
            self.store.key("wake", m) for m in self.servable()}
        stale = set(self._pubsub.channels) - wanted
        await self._pubsub.subscribe(*wanted)
        if stale:
            await self._pubsub.unsubscribe(*stale)

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._tasks)
        await cancel_and_wait(list(self._warming.values()))
        await cancel_and_wait(list(self.running.values()))
        if self._pubsub:
            await self._pubsub.aclose()

    def wake(self) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        while not self._stopping:
            try:
                async for message in self._pubsub.listen():
                    data = message["data"]
                    if data.startswith("abort "):
                        await self.engine.abort(data[6:])
                    else:
                        self._wake.set()  # new work, or a new plan
                await asyncio.sleep(0.05)  # listen() returns while nothing is subscribed
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("%s: subscription lost (%s); resubscribing", self.id, e)
                await asyncio.sleep(0.5)
                try:
                    await self._subscribe()
                except Exception:
                    pass

    async def _heartbeat(self) -> None:
        stats = self.engine.stats()
        _, lost = await self.store.heartbeat(
            self.id, ttl_ms=3 * self.config.heartbeat_ms, lease_ms=self.config.lease_ms,
            address=self.worker.advertise, engine=self.engine.kind,
            models=self.servable(),
            loaded=[self._loading] if self._loading else self.engine.models(),
            warm=self.engine.warm_models(), max_running=stats.max_running,
            running=list(self.running),
        )
        for rid in lost:  # cancelled, or our lease lapsed and it runs elsewhere now
            await self.engine.abort(rid)

    async def _heartbeats(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.heartbeat_ms / 1000)
            try:
                await self._heartbeat()
                await self.store.expire()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("%s: heartbeat failed: %s", self.id, e)

    async def _pull_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.pull()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("%s: pull failed: %s", self.id, e)
                await asyncio.sleep(self.poll_s)

    async def swap_model(self, model: str) -> None:
        """Serves `model` instead of the current models now: requests of the others are
        evicted back to their groups (their output so far is kept), then the engine swaps.
        (The plan's own swaps wait for the batch to drain instead, see _pull.)"""
        if model not in self.config.models:
            raise EngineError(f"model {model!r} is not in the stack config")
        async with self._swap_lock:
            for rid, m in list(self._model_of.items()):
                if m != model:
                    await self.evict(rid)
            await self._swap(model)
        await self.models_changed()

    async def _swap(self, model: str) -> None:
        """The engine serves `model` only; the others it served stay warm where it can."""
        if self.engine.models() == [model]:
            return
        before = self.engine.models()
        log.info("%s: swapping %s -> %s", self.id, before, model)
        # for planning, a swapping worker is the model it loads: read as the one going out, a
        # plan would queue that model's work behind the swap and the next plan swap back
        # (the simulator's instances show it so too)
        self._loading = model
        try:
            await self._heartbeat()
            for m in before:
                if m != model:
                    await self.engine.unload_model(m)
            try:
                await self.engine.load_model(model)
            except Exception:
                for m in before:  # serve what it served rather than nothing
                    await self.engine.load_model(m)
                raise
        finally:
            self._loading = ""
        self.model_swaps += 1

    def warm(self, model: str) -> None:
        """Starts holding `model` warm, in the background (a cold load takes seconds to
        minutes; the planner's push must not wait for it). The heartbeat then lists it."""
        if model not in self.servable():
            raise EngineError(f"model {model!r} is not one this worker serves "
                              f"({self.servable()})")
        if model in self.engine.models() or model in self.engine.warm_models():
            return
        task = self._warming.get(model)
        if task is None or task.done():
            self._warming[model] = asyncio.create_task(self._warm(model), name=f"warm-{model}")

    async def _warm(self, model: str) -> None:
        try:
            await self.engine.warm_model(model)
            await self._heartbeat()  # the planner prices a swap to it warm from now on
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("%s: warming %s failed: %s", self.id, model, e)

    async def models_changed(self) -> None:
        """Announces the engine's models: registration, and the wake-ups listened to."""
        await self._heartbeat()
        await self._subscribe()
        self._wake.set()

    async def evict(self, request_id: str) -> bool:
        """Pre-empts a running request and hands it back to its group; False if it is not
        running here."""
        if request_id not in self.running:
            return False
        await self.engine.evict(request_id)  # its serve task ends quietly on "abort"
        status, _ = await self.store.evict(request_id, self.id)
        return status == "ok"

    def set_step_limit(self, max_running: int, max_prefill_tokens: int) -> None:
        """The plan's step limit (0: none); requests running over a lowered max_running finish
        as they would, only no new one starts until the batch is under it."""
        self.max_running, self.max_prefill_tokens = max_running, max_prefill_tokens
        self._wake.set()  # a raised limit may leave room now

    def room(self) -> int:
        """Requests this worker may claim now: the engine's free slots, within the step
        limit's max_running (self.running counts the claimed ones not yet started too)."""
        room = self.engine.free_slots() - self._starting
        if self.max_running:
            room = min(room, self.max_running - len(self.running))
        return room

    async def pull(self) -> int:
        """Claims as many requests as the engine has room for; returns how many."""
        async with self._swap_lock:
            return await self._pull()

    async def _pull(self) -> int:
        total = 0
        if not self.running:
            self._prefill_since_step = 0  # no step under way: nothing to wait for
        while (room := self.room()) > 0:
            # The prefill budget, for engines that cannot be told to chunk prompts per request
            # (vLLM fixes max_num_batched_tokens at start): an approximation in admission. A
            # step is taken to have ended when any running request yields tokens (_serve), and
            # no request starts while the prompt (and resumed output) tokens started since then
            # reach the budget; the one that crosses it still starts whole (a prompt is never
            # split here), so a step may prefill up to one prompt over the budget. Under a budget
            # requests are claimed one at a time, each checked against it.
            budget = self.max_prefill_tokens
            if budget and self._prefill_since_step >= budget:
                self._prefill_wait = True
                break
            want = 1 if budget else room
            loaded = self.engine.models()
            claim = await self.store.claim(
                self.id, want, self.config.lease_ms, loaded,
                [m for m in self.servable() if m not in loaded])
            claimed = claim.requests
            if claim.swap_to and not claimed:
                if self.running or self._starting:
                    # the plan's next work needs another model: drain the batch first (a
                    # finishing request wakes the pull), as the estimator assumes
                    self._backlog = True
                    break
                await self._swap(claim.swap_to)
                await self.models_changed()
                continue
            self._starting += len(claimed)
            for c in claimed:
                self._prefill_since_step += (int(c.fields.get("prompt_tokens") or 0)
                                             + int(c.fields.get("out") or 0))
                self._model_of[c.request_id] = c.fields["model"]
                self.running[c.request_id] = asyncio.create_task(
                    self._serve(c), name=f"serve-{c.request_id}")
            total += len(claimed)
            self._backlog = len(claimed) == want
            if not self._backlog:
                break
        if room <= 0 and self.running:
            # the engine may have room again after its next step (a sim engine whose chunk
            # budget is spent frees it then, not when a request ends): the next tokens wake us
            self._prefill_wait = True
        return total

    async def _context(self, claimed: ClaimedRequest) -> tuple[list[int], int]:
        """The token context to run: the prompt, plus any output a previous worker stored."""
        f = claimed.fields
        if f.get("prompt_ids"):
            prompt = [int(t) for t in f["prompt_ids"].split()]
        else:
            prompt = self.engine.tokenize(f["model"], f["prompt"])
            if str(len(prompt)) != f.get("prompt_tokens"):  # the router's was an upper bound
                await self.store.count_prompt(claimed.request_id, self.id, len(prompt))
        generated = await self.store.generated_tokens(claimed.request_id) if int(
            f.get("out") or 0) else []
        return prompt + generated, len(generated)

    async def _serve(self, claimed: ClaimedRequest) -> None:
        rid = claimed.request_id
        index = 0
        starting = True
        try:
            context, index = await self._context(claimed)
            request = engine_request(claimed, context, index)
            if request.max_tokens <= 0:  # it had finished everything but its final message
                await self.store.finish(rid, self.id, "length", "", self.config.retention_s,
                                        index)
                return
            outputs = self.engine.generate(request)
            # the engine counts it from its first iteration on, which begins right here
            self._starting -= 1
            starting = False
            async for out in outputs:
                if out.finished and out.finish_reason in ("length", "stop", "error"):
                    status, detail = await self.store.finish(
                        rid, self.id, out.finish_reason, out.error, self.config.retention_s,
                        index, out.token_ids, out.text)
                    if status == "gap":
                        raise RuntimeError(f"finish refused: output gap at {detail}")
                    self.completed += status == "ok"
                    return
                if out.finished:  # aborted or evicted: whoever stopped it owns what follows
                    return
                if out.token_ids:
                    self._prefill_since_step = 0  # a step ended (see _pull)
                    if self._prefill_wait:
                        self._prefill_wait = False
                        self._wake.set()
                    status, detail = await self.store.append(
                        rid, self.id, index, list(out.token_ids), out.text)
                    if status == "lost":  # cancelled, or taken over after our lease lapsed
                        await self.engine.abort(rid)
                        return
                    if status != "ok":
                        raise RuntimeError(f"append refused: {status} {detail}")
                    index = int(detail)
        except EngineError as e:
            log.warning("%s: %s failed: %s", self.id, rid, e)
            await self.store.finish(rid, self.id, "error", str(e), self.config.retention_s,
                                    index)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # leave the lease to expire: the request goes back to its group and runs elsewhere
            log.exception("%s: serving %s failed: %s", self.id, rid, e)
        finally:
            if starting:
                self._starting -= 1
            self.running.pop(rid, None)
            self._model_of.pop(rid, None)
            if self._backlog:
                self._wake.set()
