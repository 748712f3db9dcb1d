"""The replica's batcher: a batch is formed only when the model is free, so a busy replica runs full ones."""

from __future__ import annotations

import asyncio

import pytest

from tocom.serve import Batcher


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
    with pytest.raises(ValueError, match="wait_s must be >= 0"):
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
