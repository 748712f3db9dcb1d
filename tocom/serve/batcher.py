"""Dynamic batching that forms a batch only when the model is (nearly) free to run it.

Ray Serve 2.60's ``@serve.batch`` forms the next batch as soon as one request waits, while the
previous batch is still running, and queues the formed batches on a semaphore. Under load a
replica then runs batches of one or two requests back to back while hundreds of milliseconds of
requests queue behind them (measured on a 2-core CPU at 1.5x capacity: mean batch 1.4 with 480 ms
of queueing). Here the batch is taken from the queue when the previous one has finished, so a
busy replica runs full batches and an idle one answers a lone request after ``wait_s``.

Waiting for the answer before forming the next batch leaves the model idle for a round trip per
batch: the answer's way back, the stacking and sending of the next batch. With a model in another
process that was a fifth of the model's time at 1.5x load (2-core CPU, DeiT-Tiny at r = 16:
worker 80% busy while requests were refused). A pipelined batcher (``start=``) closes that gap: the
handler says how long the model will be busy with a batch, and the next batch is formed
``lead_s`` before then and sent to wait in the model's own queue, so it starts the moment the
previous one ends, with everything that arrived until shortly before.

Plain asyncio, no Ray: any server that can await a coroutine can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEPTH = 2  # batches handed to the model at once: the running one and the next, waiting


@dataclass
class Running(Generic[R]):
    """A batch handed to the model: its answers to come, and how long the model is predicted to
    be busy with it (``math.inf``: form the next batch only once these answers are back)."""

    results: Awaitable[Sequence[R]]
    busy_s: float = math.inf


class Batcher(Generic[T, R]):
    """Collects items submitted concurrently into batches for a model.

    Args:
        handler: ``await handler(items)`` answers a batch; it must return one result per item, in
            order. An exception fails every request of that batch, and no other. Batches run one
            at a time.
        max_batch: most items per batch.
        wait_s: how long a batch smaller than ``max_batch`` waits for more items before it runs.
        start: instead of ``handler``, pipelined: ``await start(items)`` hands a batch to the model
            and returns at once with a :class:`Running`. The model must run the batches it is handed
            in order (a Ray actor, a single-threaded executor); it holds at most two at a time.
        lead_s: with ``start``, the next batch is formed this long before the model is predicted
            to be free.
    """

    def __init__(self, handler: Callable[[list[T]], Awaitable[Sequence[R]]] | None = None, max_batch: int = 8,
                 wait_s: float = 0.005, *, start: Callable[[list[T]], Awaitable[Running[R]]] | None = None,
                 lead_s: float = 0.025):
        if (handler is None) == (start is None):
            raise ValueError("give the batcher a handler (one batch at a time) or a start function "
                             "(pipelined), not both")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if wait_s < 0 or lead_s < 0:
            raise ValueError(f"wait_s and lead_s must be >= 0, got {wait_s}, {lead_s}")
        self.handler = handler
        self.max_batch = max_batch
        self.wait_s, self.lead_s = wait_s, lead_s
        self._start = start or self._start_whole
        self._pending: deque[tuple[T, asyncio.Future, float]] = deque()  # item, future, loop time queued
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not those with the model)."""
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (raises what its batch's handler raised)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop, self._arrived = loop, asyncio.Event()
            # a fresh context: the worker must not carry the first request's context variables
            self._worker = contextvars.Context().run(loop.create_task, self._run())
            self._worker.add_done_callback(self._fail_pending)
        future = loop.create_future()
        self._pending.append((item, future, loop.time()))
        self._arrived.set()
        return await future

    async def _start_whole(self, items: list[T]) -> Running[R]:
        return Running(self.handler(items))

    async def _next_batch(self) -> list[tuple[T, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        # the wait counts from the oldest request's arrival: one that queued behind a running
        # batch has waited already
        deadline = self._pending[0][2] + self.wait_s
        while len(self._pending) < self.max_batch and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
        batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        return [(item, future) for item, future, _ in batch if not future.done()]  # drop cancelled ones

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        with_model: set[asyncio.Task] = set()  # one task per batch handed to the model, answering it
        busy_until = loop.time()  # when the model is predicted to finish the batches it holds
        try:
            while True:
                with_model = {task for task in with_model if not task.done()}
                if with_model:
                    early = busy_until - self.lead_s - loop.time()
                    if len(with_model) >= DEPTH or early > 0:
                        timeout = None if len(with_model) >= DEPTH or math.isinf(early) else early
                        await asyncio.wait(with_model, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                        continue
                batch = await self._next_batch()
                if not batch:
                    continue
                items, futures = zip(*batch)
                running = None
                with self._failing(futures):
                    running = await self._start(list(items))
                if running is None:
                    continue
                now = loop.time()
                queued_behind = any(not task.done() for task in with_model)
                busy_until = (max(now, busy_until) if queued_behind else now) + running.busy_s
                with_model.add(loop.create_task(self._answer(futures, running.results)))
        finally:  # shutting down: the batches with the model fail their requests (in _answer)
            for task in with_model:
                task.cancel()

    async def _answer(self, futures: Sequence[asyncio.Future], results: Awaitable[Sequence[R]]) -> None:
        answers = None
        with self._failing(futures):
            answers = await results
            if len(answers) != len(futures):
                raise RuntimeError(f"the batch handler answered {len(answers)} results for "
                                   f"{len(futures)} items")
        if answers is None:
            return
        for future, answer in zip(futures, answers):
            if not future.done():
                future.set_result(answer)

    @contextlib.contextmanager
    def _failing(self, futures: Sequence[asyncio.Future]) -> Iterator[None]:
        """An error in the block goes to the batch's requests, and no others; a cancellation
        (shutdown) fails them too and goes on, so that no request of the batch hangs."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - it goes to the requests of this batch
            self._fail(futures, err)
        except BaseException as err:
            self._fail(futures, RuntimeError(f"the batch was interrupted: {err!r}"))
            raise

    @staticmethod
    def _fail(futures: Iterable[asyncio.Future], err: BaseException) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(err)

    def _fail_pending(self, worker: asyncio.Task) -> None:
        """The worker ended (cancelled, or a bug): the requests still queued must not wait forever."""
        if worker is not self._worker:  # a newer worker serves the queue
            return
        reason = "cancelled" if worker.cancelled() else repr(worker.exception())
        futures = [future for _, future, _ in self._pending]
        self._pending.clear()
        self._fail(futures, RuntimeError(f"the batcher stopped ({reason}); retry the request"))

