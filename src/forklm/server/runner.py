"""The engine loop: one thread owns the `Engine`; HTTP handlers talk to it through queues.

The engine is single-threaded. Its thread repeats: take every new submission and abort from a
thread-safe inbox (`add_request` / `abort`), run one `engine.step()` (waiting requests that fit
join the running batch, finished ones have left it), and hand each request's deltas to the asyncio
queue of the handler that owns it (one `call_soon_threadsafe` per event loop per step). So a
request that arrives while others run joins at the next step, and one long request never blocks
short ones. When nothing is unfinished the thread sleeps on the inbox.

An HTTP request with several prompts becomes several engine requests (one per prompt, each with
its n samples sharing its context slot), accepted or refused together.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..engine import Engine
from ..errors import InvalidParameterError
from ..outputs import RequestOutput, SampleDelta
from ..sampling import SamplingParams
from .errors import APIError, QueueFullError
from .metrics import Metrics

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class Event:
    """What one prompt of a request got from one engine step."""

    prompt_index: int
    deltas: list[SampleDelta]
    output: RequestOutput | None = None  # the final output, once this prompt's request finished
    error: APIError | None = None  # the engine failed; the request is over


@dataclass
class _Submission:
    request_ids: list[str]
    prompts: list[list[int]]
    texts: list[str | None]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Live:
    sub: _Submission
    prompt_index: int
    got_first_token: bool = False


def give_memory_back() -> None:
    """Hand the heap's free pages back to the system (glibc keeps freed memory for reuse; after a burst
    of requests that is hundreds of MiB). A no-op where there is no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the handler gave up waiting (cancelled)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _deliver(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for q, event in items:
        q.put_nowait(event)


class RequestHandle:
    """A handler's view of its accepted request: the events of its prompts, and `close()`."""

    def __init__(self, runner: EngineRunner, request_ids: list[str], events: asyncio.Queue):
        self.request_ids = request_ids
        self._runner = runner
        self._events = events
        self._pending = set(range(len(request_ids)))

    @property
    def done(self) -> bool:
        """Every prompt finished (or failed, or was aborted)."""
        return not self._pending

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; raises asyncio.TimeoutError after `timeout` seconds without one."""
        if timeout is None:
            event = await self._events.get()
        else:
            event = await asyncio.wait_for(self._events.get(), timeout)
        if event.output is not None or event.error is not None:
            self._pending.discard(event.prompt_index)
        return event

    def close(self) -> None:
        """Drop whatever has not finished (the client went away). Safe to call twice."""
        if self._pending:
            self._runner.abort([self.request_ids[i] for i in sorted(self._pending)])
            self._pending.clear()

    def __del__(self) -> None:  # a stream cancelled before it started never ran its `finally`
        self.close()


class EngineRunner:
    """Owns the engine's thread. `submit` and `abort` may be called from any thread or loop."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int, request_timeout: float | None = None):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.request_timeout = request_timeout  # seconds from acceptance; past it a request ends (None: never)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._run, name="forklm-engine", daemon=True)
        self._looping = False  # the engine loop runs (in self._thread, or in the thread that called run())
        self._drain_deadline: float | None = None  # shutting down: no new requests; the loop ends by then
        # read by /metrics from other threads; written by the engine thread only
        self.num_waiting = 0
        self.num_running = 0
        self.rows_in_use = 0
        self.kv_usage = 0.0
        self.cached_tokens = 0
        self.rows_capacity = engine.shape.max_samples
        metrics.gauge("forklm_requests_waiting", "Engine requests queued, not yet admitted.", lambda: self.num_waiting)
        metrics.gauge("forklm_requests_running", "Engine requests in the running batch.", lambda: self.num_running)
        metrics.gauge("forklm_sample_rows_in_use", "Sample rows of the batch decoding now.", lambda: self.rows_in_use)
        metrics.gauge("forklm_sample_rows_capacity", "Sample rows of the batch (--max-batch).",
                      lambda: self.rows_capacity)
        metrics.gauge("forklm_prefix_cache_hit_tokens_total", "Prompt tokens whose K/V came from the prefix cache.",
                      lambda: engine.prefix_cache.hit_tokens)
        metrics.gauge("forklm_prefix_cache_evictions_total", "Cached prefixes evicted (LRU, unpinned only).",
                      lambda: engine.prefix_cache.evictions)
        metrics.gauge("forklm_prefix_cache_tokens", "Token slots the prefix cache's segments hold (in use or not; with "
                      "the room kept after prompts for their samples).",
                      lambda: self.cached_tokens)
        metrics.gauge("forklm_kv_cache_usage", "Fraction of the KV budget in use (sample rows + segments).",
                      lambda: self.kv_usage)
        metrics.gauge("forklm_queue_capacity", "Most engine requests that may wait (--max-queue).",
                      lambda: self.max_queue)
        if engine.speculative is not None:
            spec = engine.spec_totals
            metrics.gauge("forklm_spec_decode_num_draft_tokens_total", "Tokens drafted (speculative decoding).",
                          lambda: spec.num_draft_tokens)
            metrics.gauge("forklm_spec_decode_num_accepted_tokens_total", "Drafted tokens the target kept.",
                          lambda: spec.num_accepted_tokens)
            metrics.gauge("forklm_spec_decode_num_drafts_total", "Drafts verified (one per drafting sample and step).",
                          lambda: spec.num_drafts)
            metrics.gauge("forklm_spec_decode_acceptance_rate", "Accepted over drafted tokens since the start.",
                          lambda: spec.num_accepted_tokens / max(spec.num_draft_tokens, 1))

    # ---- lifecycle -----------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Tiny requests through the engine before serving (`Engine.warm_up`), so that the first clients
        wait for no first step and, compiled, no compiling."""
        self.engine.warm_up()

    def start(self) -> None:
        """The engine loop in a thread of its own."""
        self._looping = True
        self._thread.start()

    def run(self, on_ready=None) -> None:
        """The engine loop in the calling thread until `stop()`; `on_ready()` is called once the runner
        counts as alive. `forklm serve` runs it on the main thread (and the HTTP server beside it):
        OpenMP's parallel regions run up to 2x slower from a thread other than the main one here
        (a [64, 49152] softmax: 1.3-1.4 vs 2.3-3.0 ms; an n=1 decode step: 61-73 vs 87-147 ms)."""
        self._looping = True
        if on_ready is not None:
            on_ready()
        self._run()

    def stop(self, timeout: float = 5.0) -> None:
        if self._looping:
            self._inbox.put(_STOP)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._looping

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def begin_drain(self, grace_s: float) -> None:
        """Shut down gently: refuse new requests (503 shutting_down) and end the loop once the running
        ones finished, or after `grace_s` seconds (what is left then ends with engine_stopped).
        Safe from a signal handler: it only sets a deadline the loop reads."""
        self._drain_deadline = time.monotonic() + max(0.0, grace_s)
        self._inbox.put(("wake", None))

    # ---- the handlers' side (asyncio) ----------------------------------------------------------
    async def submit(self, prompts: list[list[int]], texts: list[str | None], params: SamplingParams) -> RequestHandle:
        """Queue one engine request per prompt; returns once the engine accepted them all.

        Raises the engine's validation error (ForklmError) or QueueFullError when refused.
        """
        if not self.alive:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_stopped")
        loop = asyncio.get_running_loop()
        base = uuid.uuid4().hex
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        sub = _Submission(ids, prompts, texts, params, loop, asyncio.Queue(), loop.create_future())
        self._inbox.put(("add", sub))
        try:
            await sub.accepted
        except asyncio.CancelledError:
            self.abort(ids)  # processed after the add: the inbox is FIFO
            raise
        return RequestHandle(self, ids, sub.queue)

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(("abort", list(request_ids)))

    async def update_weights(self, updates: dict) -> None:
        """New weights (checked by checkpoint.weight_updates), in use from the engine's next step;
        returns once they are. Requests running meanwhile go on over the K/V they have."""
        if not self.alive:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_stopped")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(("weights", (updates, loop, done)))
        await done

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        reason = "the server is shutting down"
        try:
            stalled = False
            busy = False  # work was done since the engine was last idle
            while True:
                if self._drain_deadline is not None:
                    if not self._live:
                        break
                    if time.monotonic() >= self._drain_deadline:
                        reason = "the server is shutting down (its grace period for running requests is over)"
                        break
                idle = stalled or not self.engine.has_unfinished()
                if idle and busy and not self.engine.has_unfinished():
                    busy = False
                    give_memory_back()
                if not self._drain(wait=idle):
                    break
                if self.request_timeout is not None:
                    self._expire()
                stalled = False
                if self.engine.has_unfinished():
                    busy = True
                    produced = self._step()
                    # nothing ran and nothing could be admitted: wait for news instead of spinning
                    stalled = not produced and self.engine.num_running == 0
        except Exception as error:  # a bug outside engine.step: /health turns 503, waiters are told
            log.exception("the engine loop died")
            reason = f"the engine loop died: {type(error).__name__}: {error}"
        finally:
            self._looping = False
            error = APIError(503, reason, type="server_error", code="engine_stopped")
            self._fail_all(error)
            while True:  # submissions that arrived meanwhile are refused, not left waiting
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP and item[0] == "add":
                    self._post(item[1].loop, _resolve, item[1].accepted, error)
                elif item is not _STOP and item[0] == "weights":
                    self._post(item[1][1], _resolve, item[1][2], error)

    def _drain(self, wait: bool) -> bool:
        """Handle every command in the inbox (waiting a little for one when idle). False on stop."""
        try:
            item = self._inbox.get(timeout=0.25) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            kind, payload = item
            if kind == "add":
                self._add(payload)
            elif kind == "weights":
                self._update_weights(*payload)
            elif kind == "wake":
                pass
            else:
                self._abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, sub: _Submission) -> None:
        added: list[str] = []
        try:
            if self._drain_deadline is not None:
                raise APIError(503, "the server is shutting down; send the request to another replica",
                               type="server_error", code="shutting_down")
            if len(sub.request_ids) > self.max_queue:  # could never be queued: not a retry-later 429
                raise InvalidParameterError(
                    "prompt", f"{len(sub.request_ids)} prompts in one request exceed the server's queue "
                    f"(--max-queue {self.max_queue}); send at most {self.max_queue} per request")
            if self.engine.num_waiting + len(sub.request_ids) > self.max_queue:
                raise QueueFullError(
                    f"the server's queue is full ({self.engine.num_waiting} requests waiting, "
                    f"--max-queue {self.max_queue}); retry later"
                )
            for rid, ids, text in zip(sub.request_ids, sub.prompts, sub.texts):
                self.engine.add_request(rid, ids, sub.params, prompt=text)
                added.append(rid)
        except Exception as error:  # refused: nothing of this submission stays in the engine
            for rid in added:
                self.engine.abort(rid)
            reason = "queue_full" if isinstance(error, QueueFullError) else "invalid"
            self.metrics.count_rejected("shutting_down" if self._drain_deadline is not None else reason)
            self._post(sub.loop, _resolve, sub.accepted, error)
            return
        for i, rid in enumerate(sub.request_ids):
            self._live[rid] = _Live(sub, i)
            self.metrics.on_submitted(len(sub.prompts[i]))
        self._update_gauges()
        self._post(sub.loop, _resolve, sub.accepted, None)

    def _update_weights(self, updates: dict, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        try:
            self.engine.update_weights(updates)
        except Exception as error:  # checked before; a failure here is a bug, told to the caller
            log.exception("weight update failed")
            self._post(loop, _resolve, done, error)
            return
        self.metrics.on_weight_update()
        self._update_gauges()
        self._post(loop, _resolve, done, None)

    def _expire(self) -> None:
        """End the requests accepted more than request_timeout seconds ago (408 / an error event)."""
        now = time.perf_counter()
        late = [rid for rid, live in self._live.items() if now - live.sub.submitted_at > self.request_timeout]
        for rid in late:
            live = self._live.pop(rid)
            self.engine.abort(rid)
            self.engine.pop_output(rid)
            error = APIError(408, f"the request ran past the server's --request-timeout of {self.request_timeout:g} s",
                             code="request_timeout")
            self._post(live.sub.loop, _deliver, [(live.sub.queue, Event(live.prompt_index, [], None, error))])
        if late:
            self.metrics.on_aborted(len(late))
            self.metrics.count_rejected("request_timeout")
            self._update_gauges()

    def _abort(self, request_ids: list[str]) -> None:
        dropped = 0
        for rid in request_ids:
            if self._live.pop(rid, None) is not None:
                self.engine.abort(rid)
                self.engine.pop_output(rid)  # in case it finished in the step that just ran
                dropped += 1
        if dropped:
            self.metrics.on_aborted(dropped)
            self._update_gauges()

    def _step(self) -> bool:
        t0 = time.perf_counter()
        try:
            deltas = self.engine.step()
        except Exception as error:  # a bug: fail the requests in the batch, keep serving
            log.exception("engine step failed")
            self.metrics.on_engine_error()
            self._fail_all(APIError(500, f"engine error: {type(error).__name__}: {error}", type="server_error"))
            return False
        now = time.perf_counter()
        by_request: dict[str, list[SampleDelta]] = {}
        for d in deltas:
            by_request.setdefault(d.request_id, []).append(d)
        posts: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        tokens = 0
        for rid, ds in by_request.items():
            live = self._live.get(rid)
            if live is None:
                continue
            tokens += sum(len(d.token_ids) for d in ds)
            if not live.got_first_token:
                live.got_first_token = True
                self.metrics.on_first_token(now - live.sub.submitted_at)
            output = None
            if any(d.finish_reason for d in ds):
                output = self.engine.pop_output(rid)
                if output is not None:
                    del self._live[rid]
                    self.metrics.on_finished()
            posts.setdefault(live.sub.loop, []).append((live.sub.queue, Event(live.prompt_index, ds, output)))
        if len(self._live) > self.engine.num_running + self.engine.num_waiting:
            # some request finished without a delta this step (beam search reports only at its end)
            for rid, live in list(self._live.items()):
                output = None if rid in by_request else self.engine.pop_output(rid)
                if output is not None:
                    del self._live[rid]
                    self.metrics.on_finished()
                    posts.setdefault(live.sub.loop, []).append((live.sub.queue, Event(live.prompt_index, [], output)))
        self.metrics.on_step(now - t0, tokens)
        self._update_gauges()  # before the events go out: a client that got its last token sees its rows free
        for loop, items in posts.items():
            self._post(loop, _deliver, items)
        return bool(deltas)

    def _fail_all(self, error: APIError) -> None:
        for rid, live in list(self._live.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # the engine is broken already; the client must still hear of it
                log.exception("abort of %s failed", rid)
            self._post(live.sub.loop, _deliver, [(live.sub.queue, Event(live.prompt_index, [], None, error))])
        self._live.clear()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.num_waiting = self.engine.num_waiting
        self.num_running = self.engine.num_running
        self.rows_in_use = self.engine.rows_in_use
        self.kv_usage = self.engine.kv_usage()
        self.cached_tokens = self.engine.storage.segment_tokens

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening
            pass
