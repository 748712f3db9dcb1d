"""The replica's batcher: a batch is formed only when the model is free, so a busy replica runs full ones."""

from __future__ import annotations

import asyncio

import pytest

from tocom.serve import Batcher, Running


class SlowModel:
    """A batch handler that records its batches, takes ``seconds`` each, and checks it runs alone."""

    def __init__(self, seconds: float = 0.0, gate: asyncio.Event | None = None):
        self.seconds, self.gate = seconds, gate
        self.batches: list[list[int]] = []
        self.running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.running += 1
        assert self.running == 1, "two batches ran at once"
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.seconds)
        self.running -= 1
        if -1 in items:
            raise ValueError("a bad item")
        return [10 * i for i in items]


async def busy_batcher() -> tuple[asyncio.Event, SlowModel, Batcher, asyncio.Task]:
    """A batcher (batches of 8) whose first request, alone in its batch, runs until ``gate`` is set."""
    gate = asyncio.Event()
    model = SlowModel(gate=gate)
    batcher = Batcher(model, max_batch=8, wait_s=0.001)
    first = asyncio.create_task(batcher.submit(0))
    while not model.batches:
        await asyncio.sleep(0.001)
    return gate, model, batcher, first


def test_waiting_requests_form_full_batches_when_the_model_frees():
    async def scenario():
        gate, model, batcher, first = await busy_batcher()
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 21)]
        await asyncio.sleep(0.01)  # all 20 queue behind the running batch
        assert batcher.queued == 20
        gate.set()
        answers = await asyncio.gather(first, *rest)
        return model.batches, answers

    batches, answers = asyncio.run(scenario())
    assert [len(b) for b in batches] == [1, 8, 8, 4]  # not 20 batches of one queued behind each other
    assert [i for b in batches for i in b] == list(range(21))  # first come, first served
    assert answers == [10 * i for i in range(21)]  # each request gets its own item's answer


def test_steady_arrivals_under_a_slow_model_fill_the_batches():
    async def scenario():
        model = SlowModel(seconds=0.04)
        batcher = Batcher(model, max_batch=8, wait_s=0.002)
        tasks = []
        for i in range(48):  # one request every 5 ms: about 8 arrive during each 40 ms forward
            tasks.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.005)
        answers = await asyncio.gather(*tasks)
        return model.batches, answers

    batches, answers = asyncio.run(scenario())
    sizes = [len(b) for b in batches]
    assert max(sizes) <= 8 and sum(sizes) == 48
    assert answers == [10 * i for i in range(48)]
    # about 8 arrive per forward; @serve.batch would run batches of 1-2 here. Sleeps overshoot on a
    # loaded machine, so the bound leaves room for that.
    assert sum(sizes[1:]) / len(sizes[1:]) >= 3.5, sizes


def test_a_failing_batch_fails_only_its_own_requests():
    async def scenario():
        gate = asyncio.Event()
        model = SlowModel(gate=gate)
        batcher = Batcher(model, max_batch=2, wait_s=0.001)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, -1, 3, 4)]
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, bad, third, fourth = asyncio.run(scenario())
    assert isinstance(first, ValueError) and isinstance(bad, ValueError)  # the batch [1, -1]
    assert (third, fourth) == (30, 40)  # the next batch still runs


def test_cancelled_requests_are_left_out_and_result_counts_are_checked():
    async def scenario():
        gate, model, batcher, first = await busy_batcher()
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.005)
        gone.cancel()  # the client went away while queued
        gate.set()
        await asyncio.gather(first, kept)

        async def short(items):
            return items[:-1]

        with pytest.raises(RuntimeError, match="answered 0 results for 1 items"):
            await Batcher(short, max_batch=4).submit(5)
        return model.batches

    assert asyncio.run(scenario()) == [[0], [2]]


def test_batcher_checks_its_settings():
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        Batcher(SlowModel(), max_batch=0)
    with pytest.raises(ValueError, match="wait_s and lead_s must be >= 0"):
        Batcher(SlowModel(), max_batch=1, wait_s=-1)


def test_a_cancelled_batch_fails_its_requests_and_the_queue_instead_of_hanging():
    async def scenario():
        gate, model, batcher, first = await busy_batcher()
        queued = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.005)
        batcher._worker.cancel()  # e.g. the replica shutting down mid-batch
        results = await asyncio.gather(first, queued, return_exceptions=True)
        gate.set()
        model.running = 0
        after = await batcher.submit(7)  # a new worker takes over
        return results, after

    (first, queued), after = asyncio.run(scenario())
    assert isinstance(first, RuntimeError) and "interrupted" in str(first)
    assert isinstance(queued, RuntimeError) and "batcher stopped" in str(queued)
    assert after == 70


def test_a_batcher_moves_to_a_new_event_loop():
    batcher = Batcher(SlowModel(), max_batch=2)
    assert asyncio.run(batcher.submit(1)) == 10
    assert asyncio.run(batcher.submit(2)) == 20  # the first loop is closed; a new worker runs here


def test_requests_that_waited_behind_a_batch_do_not_wait_again():
    async def scenario():
        gate = asyncio.Event()
        model = SlowModel(gate=gate)
        batcher = Batcher(model, max_batch=8, wait_s=0.3)
        first = asyncio.create_task(batcher.submit(0))
        while not model.batches:  # the lone first request waits its 0.3 s, then runs until the gate
            await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.35)  # they have waited longer than wait_s behind the running batch
        loop = asyncio.get_running_loop()
        opened = loop.time()
        gate.set()
        await asyncio.gather(first, *rest)
        return loop.time() - opened, model.batches

    elapsed, batches = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3]]
    assert elapsed < 0.2  # not another 0.3 s of waiting for a fuller batch


class QueuedModel:
    """A model in another process: batches handed to it wait in its queue and run in order, one
    at a time, ``seconds`` each; handing a batch over and getting its answers back take ``trip_s``
    each way (stacking, sending, the answer's return)."""

    def __init__(self, seconds: float, trip_s: float = 0.0, gate: asyncio.Event | None = None):
        self.seconds, self.trip_s, self.gate = seconds, trip_s, gate
        self.batches: list[list[int]] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each batch's run
        self.handed, self.most_handed = 0, 0
        self._turn = asyncio.Lock()  # FIFO: batches run in the order they were handed over

    async def start(self, items: list[int]) -> Running:
        await asyncio.sleep(self.trip_s)
        self.handed += 1
        self.most_handed = max(self.most_handed, self.handed)
        return Running(self._run(list(items)), busy_s=self.seconds)

    async def _run(self, items: list[int]) -> list[int]:
        loop = asyncio.get_running_loop()
        async with self._turn:
            begin = loop.time()
            self.batches.append(items)
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.seconds)
            self.spans.append((begin, loop.time()))
        self.handed -= 1
        await asyncio.sleep(self.trip_s)
        return [10 * i for i in items]

    async def whole(self, items: list[int]) -> list[int]:
        """The same model driven one batch at a time: hand over, run, wait for the answers."""
        return await (await self.start(items)).results

    def idle_s(self) -> float:
        """Time the model stood idle between its first and its last batch."""
        return sum(b[0] - a[1] for a, b in zip(self.spans, self.spans[1:]))


def test_a_pipelined_batcher_keeps_the_model_busy_through_the_round_trip():
    async def scenario(pipelined: bool):
        model = QueuedModel(seconds=0.04, trip_s=0.01)
        batcher = (Batcher(start=model.start, max_batch=8, wait_s=0.002, lead_s=0.02) if pipelined else
                   Batcher(model.whole, max_batch=8, wait_s=0.002))
        tasks = []
        for i in range(60):  # one request every 4 ms: more than the model's 8 per 40 ms can keep up with
            tasks.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.004)
        answers = await asyncio.gather(*tasks)
        return model, answers

    piped, answers = asyncio.run(scenario(True))
    whole, _ = asyncio.run(scenario(False))
    assert answers == [10 * i for i in range(60)]
    assert [i for b in piped.batches for i in b] == list(range(60))  # first come, first served
    assert piped.most_handed <= 2  # the running batch and the next, no more
    # one batch at a time, the model waits a round trip (20 ms) after each batch; pipelined it
    # should not. Sleeps overshoot on a loaded machine, so the bound is relative and loose.
    assert whole.idle_s() >= 0.015 * (len(whole.spans) - 1)
    assert piped.idle_s() < 0.5 * whole.idle_s(), (piped.idle_s(), whole.idle_s())
    assert sum(map(len, piped.batches)) / len(piped.batches) >= 3.5  # still batches, not a trickle


def test_a_pipelined_batcher_waits_for_the_lead_before_forming_the_next_batch():
    async def scenario():
        model = QueuedModel(seconds=0.2)
        batcher = Batcher(start=model.start, max_batch=8, wait_s=0.001, lead_s=0.02)
        first = asyncio.create_task(batcher.submit(0))
        while not model.batches:
            await asyncio.sleep(0.001)
        rest = []
        for i in range(1, 6):  # arrive early in the first batch's 200 ms run
            rest.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.01)
        await asyncio.gather(first, *rest)
        return model.batches

    # not handed over one by one as they came (what @serve.batch did), but as one batch near the end
    assert asyncio.run(scenario()) == [[0], [1, 2, 3, 4, 5]]


def test_a_pipelined_batcher_holds_at_most_two_batches_with_the_model():
    async def scenario():
        gate = asyncio.Event()
        model = QueuedModel(seconds=0.001, gate=gate)  # predicted quick, but stuck until the gate
        batcher = Batcher(start=model.start, max_batch=2, wait_s=0.001, lead_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(8)]
        await asyncio.sleep(0.05)
        held, queued = model.handed, batcher.queued
        gate.set()
        return held, queued, await asyncio.gather(*tasks)

    held, queued, answers = asyncio.run(scenario())
    assert (held, queued) == (2, 4)  # two batches of 2 with the model, the other 4 wait here
    assert answers == [10 * i for i in range(8)]


def test_a_cancelled_pipelined_batcher_fails_the_batches_it_handed_over():
    async def scenario():
        gate = asyncio.Event()
        model = QueuedModel(seconds=0.001, gate=gate)
        batcher = Batcher(start=model.start, max_batch=1, wait_s=0.001, lead_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        while model.handed < 2:
            await asyncio.sleep(0.001)
        batcher._worker.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    running, waiting, queued = asyncio.run(scenario())
    assert isinstance(running, RuntimeError) and "interrupted" in str(running)
    assert isinstance(waiting, RuntimeError) and "interrupted" in str(waiting)
    assert isinstance(queued, RuntimeError) and "batcher stopped" in str(queued)


def test_a_batcher_takes_a_handler_or_a_start_function():
    with pytest.raises(ValueError, match="not both"):
        Batcher(SlowModel(), max_batch=1, start=QueuedModel(0.0).start)
    with pytest.raises(ValueError, match="not both"):
        Batcher(max_batch=1)
    with pytest.raises(ValueError, match="lead_s must be >= 0"):
        Batcher(start=QueuedModel(0.0).start, lead_s=-0.01)
