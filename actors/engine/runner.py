"""Drive one engine from a dedicated thread and hand its events to asyncio callers.

A Serve replica, an async actor or any asyncio program submits requests with
:meth:`EngineLoop.stream` (or :meth:`EngineLoop.generate`) and receives typed
:class:`~actors.engine.base.StreamEvent` s as the engine decodes. The loop thread steps the
engine while any request is queued or running, so a request joins the running batch at the
next step (continuous batching) and nobody waits for a batch to fill or to drain. When a
caller stops listening (its client disconnected, its task was cancelled) the request is
aborted and its rows are freed at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from actors.engine.base import Completion, DecodePolicy, GenerationEngine, Prompt, StreamEvent
from selftaught import metrics
from selftaught.config import SamplingConfig

log = logging.getLogger(__name__)


class EngineLoop:
    """One engine, one stepping thread, any number of async callers."""

    def __init__(self, engine: GenerationEngine, name: str = "engine-loop"):
        self.engine = engine
        self._wake = threading.Event()
        self._stopped = False
        # add_request waits for the step in progress (it uses the engine's tokenizer): it runs
        # here, never on a caller's event loop
        self._admission = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-admit")
        self._ids = itertools.count()
        self.steps_failed = 0
        self._metric_tags = {"model": getattr(engine, "model_name", "?"), "kind": "serve"}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # noqa: BLE001 - keep serving; the engine failed that step's rows
                self.steps_failed += 1
                log.exception("engine step failed")

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._admission.shutdown(wait=False)

    def new_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def stream(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None,
                     policy: DecodePolicy | None = None) -> AsyncIterator[StreamEvent]:
        """Events of one request until each of its ``n`` samples has finished. Raises
        :class:`~actors.engine.base.RequestError` (before any event) for a request the engine
        refuses. Leaving the iteration early aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        rid = request_id or self.new_id()

        def sink(ev: StreamEvent) -> None:  # the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        admitted = loop.run_in_executor(self._admission, lambda: self.engine.add_request(
            rid, prompt, sampling, on_event=sink, policy=policy))
        try:
            await asyncio.shield(admitted)
        except asyncio.CancelledError:  # the caller left while the request was being admitted
            admitted.add_done_callback(lambda f: f.cancelled() or f.exception() or self.engine.abort(rid))
            raise
        self._wake.set()
        metrics.ENGINE_QUEUE_DEPTH.add(1, self._metric_tags)  # admitted: queued or running until it ends
        left = sampling.n
        try:
            while left:
                ev = await queue.get()
                left -= ev.finished
                if ev.finished and ev.completion is not None:
                    metrics.GENERATED_TOKENS.inc(ev.completion.num_tokens, self._metric_tags)
                yield ev
        finally:
            metrics.ENGINE_QUEUE_DEPTH.add(-1, self._metric_tags)
            if left:
                self.engine.abort(rid)
                self._wake.set()
            else:
                metrics.ENGINE_REQUESTS.inc(1, self._metric_tags)

    async def generate(self, prompt: Prompt, sampling: SamplingConfig,
                       request_id: str | None = None) -> tuple[list[Completion], list[dict[str, Any]]]:
        """The finished completions of one request (and each sample's usage)."""
        done: dict[int, StreamEvent] = {}
        async for ev in self.stream(prompt, sampling, request_id):
            if ev.finished:
                done[ev.index] = ev
        order = sorted(done)
        return [done[i].completion for i in order], [done[i].usage or {} for i in order]
