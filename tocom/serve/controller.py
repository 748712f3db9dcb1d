"""The degree controller: per batch, the least compression that keeps queued requests within the SLO.

Plain Python (no Ray, no torch), so any server can drive it. It reasons over a
:class:`LatencyTable` (milliseconds per forward, measured for every degree at a few batch sizes,
see :mod:`tocom.serve.calibrate`) and the waits of the requests a replica holds:

* the batch about to run and the requests queued behind it are served first-in first-out, in
  batches of at most ``max_batch``, all at the degree being considered;
* a degree *fits* when every one of those requests is predicted to finish within
  ``margin * slo_ms`` of its arrival, and, given the recent arrival rate, it keeps up: full
  batches at that degree would keep the model busy at most ``margin`` of the time. The queue
  alone looks only at requests already here; under a sustained load above a degree's capacity
  the queue is short at first and grows, so without the rate the controller picks a slow degree,
  falls behind, and pays for it in a backlog later;
* the controller raises the degree at once when the current one does not fit, and lowers it only
  after ``patience`` consecutive batches in which a lower degree fits even ``hysteresis`` below
  the budget, so that it does not flap around a boundary;
* a request is admitted only if, queued behind the ones held, it is predicted to finish within
  the SLO at the fastest degree (:meth:`DegreeController.admits`): past the capacity of the most
  compressed model the excess is refused at once (503) instead of being answered late;
* forwards measured while serving (:meth:`DegreeController.observe`) scale every prediction by how
  much slower than calibrated the machine runs now (other load, thermal limits), so the table
  measured once at start-up stays honest.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LatencyTable:
    """Calibrated forward latency in ms: ``ms[degree][batch_size]``.

    Batch sizes between calibrated ones are interpolated linearly; beyond the largest, the
    per-image cost of the largest is extrapolated.
    """

    ms: Mapping[int, Mapping[int, float]]

    def __post_init__(self) -> None:
        if not self.ms:
            raise ValueError("a latency table needs at least one degree")
        for degree, row in self.ms.items():
            if not row or any(b < 1 or t <= 0 for b, t in row.items()):
                raise ValueError(f"degree {degree}: latencies need batch sizes >= 1 and times > 0, got {row}")

    @property
    def degrees(self) -> list[int]:
        return sorted(self.ms)

    def predict(self, degree: int, batch_size: int) -> float:
        """Milliseconds of one forward of ``batch_size`` images at ``degree``."""
        if degree not in self.ms:
            raise ValueError(f"degree {degree} was not calibrated (calibrated: {self.degrees})")
        row = self.ms[degree]
        sizes = sorted(row)
        if batch_size <= sizes[0]:
            return row[sizes[0]] * batch_size / sizes[0] if batch_size < sizes[0] else row[sizes[0]]
        if batch_size >= sizes[-1]:
            return row[sizes[-1]] * batch_size / sizes[-1]
        hi = bisect.bisect_left(sizes, batch_size)
        b0, b1 = sizes[hi - 1], sizes[hi]
        w = (batch_size - b0) / (b1 - b0)
        return row[b0] * (1 - w) + row[b1] * w

    def to_json(self) -> dict[str, dict[str, float]]:
        return {str(d): {str(b): round(t, 3) for b, t in sorted(row.items())}
                for d, row in sorted(self.ms.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, float]]) -> LatencyTable:
        return cls({int(d): {int(b): float(t) for b, t in row.items()} for d, row in data.items()})


def completion_ms(table: LatencyTable, degree: int, waits_ms: Sequence[float], max_batch: int,
                  slowdown: float | Callable[[int], float] = 1.0, setup_ms: float = 0.0) -> float:
    """Worst predicted time from arrival to answer over requests served FIFO in batches.

    ``waits_ms``: how long each held request has waited so far, oldest first; the first
    ``max_batch`` form the batch about to run, the rest queue behind it. ``slowdown`` scales the
    table's compute times (a number, or a function of the batch size); ``setup_ms`` comes before
    the first batch (switching to ``degree``).
    """
    factor = slowdown if callable(slowdown) else (lambda _: slowdown)
    worst, elapsed = 0.0, setup_ms
    for start in range(0, len(waits_ms), max_batch):
        chunk = waits_ms[start:start + max_batch]
        elapsed += factor(len(chunk)) * table.predict(degree, len(chunk))
        worst = max(worst, max(chunk) + elapsed)
    return worst


class ArrivalRate:
    """Requests per second over the last ``window_s`` seconds (times in seconds).

    A load that began less than a window ago is measured over the time since its first arrival
    (at least ``min_span_s``, so that two close arrivals do not read as a flood): a full window
    would see it at a fraction of its rate for a whole window.
    """

    def __init__(self, window_s: float = 2.0, min_span_s: float = 0.5):
        if not 0 < min_span_s <= window_s:
            raise ValueError(f"need 0 < min_span_s <= window_s, got {min_span_s}, {window_s}")
        self.window_s, self.min_span_s = window_s, min_span_s
        self._times: deque[float] = deque()

    def add(self, t: float) -> None:
        """Record an arrival at time ``t`` (non-decreasing, e.g. ``time.perf_counter()``)."""
        self._times.append(t)
        self._forget(t)

    def rate(self, now: float) -> float:
        """Arrivals per second in the window ending at ``now``."""
        self._forget(now)
        if not self._times:
            return 0.0
        return len(self._times) / min(self.window_s, max(self.min_span_s, now - self._times[0]))

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()


@dataclass
class DegreeController:
    """Picks the degree of each batch (see the module docstring for the policy).

    Args:
        table: calibrated latencies; its degrees are the ones the controller may pick.
        slo_ms: latency objective from arrival at the replica to answer.
        max_batch: the largest batch the server forms.
        margin: fraction of the SLO that predictions may use (calibration is not exact).
        hysteresis: a lower degree must fit within ``(1 - hysteresis)`` of the budget to count
            towards stepping down.
        patience: consecutive batches a lower degree must fit before the controller steps down.
        smoothing: weight of the newest measured forward in the running slowdown estimates
            (and of the newest switch in ``switch_ms``).

    How much slower than calibrated the forwards run is learned per batch-size bucket (the
    table's batch sizes): served at light load, lone requests ran 0.9-1.4x their calibrated time
    and 2-2.7x now and then, and one factor for all sizes, learned from them, was applied to the
    full batches that decide whether a degree keeps up with the arrival rate. A bucket not yet
    measured borrows the nearest measured one's factor.
    """

    table: LatencyTable
    slo_ms: float
    max_batch: int
    margin: float = 0.85
    hysteresis: float = 0.25
    patience: int = 3
    smoothing: float = 0.2
    degree: int = field(default=-1)
    switch_ms: float = field(default=0.0)  # measured cost of changing the degree (a plugin's fold)
    _streak: int = field(default=0, repr=False)
    _candidate: int = field(default=0, repr=False)
    _slowdowns: dict[int, float] = field(default_factory=dict, repr=False)  # batch-size bucket -> factor

    def __post_init__(self) -> None:
        if self.slo_ms <= 0 or self.max_batch < 1:
            raise ValueError(f"need slo_ms > 0 and max_batch >= 1, got {self.slo_ms}, {self.max_batch}")
        if not 0 < self.margin <= 1 or not 0 <= self.hysteresis < 1 or self.patience < 1:
            raise ValueError("need 0 < margin <= 1, 0 <= hysteresis < 1 and patience >= 1")
        if self.degree not in self.table.ms:
            self.degree = self.table.degrees[0]
        self._buckets = sorted({b for row in self.table.ms.values() for b in row})

    def _bucket(self, batch_size: int) -> int:
        """The smallest calibrated batch size that holds ``batch_size`` (else the largest)."""
        return next((b for b in self._buckets if b >= batch_size), self._buckets[-1])

    def slowdown_at(self, batch_size: int) -> float:
        """Measured / calibrated forward time for batches of ``batch_size`` (1.0 before any measurement)."""
        bucket = self._bucket(batch_size)
        if bucket in self._slowdowns:
            return self._slowdowns[bucket]
        if not self._slowdowns:
            return 1.0
        nearest = min(self._slowdowns, key=lambda b: (abs(math.log2(b / bucket)), b))
        return self._slowdowns[nearest]

    @property
    def slowdown(self) -> float:
        """The slowdown at full batches."""
        return self.slowdown_at(self.max_batch)

    @slowdown.setter
    def slowdown(self, value: float) -> None:
        self._slowdowns = dict.fromkeys(self._buckets, value)

    def forward_ms(self, degree: int, batch_size: int) -> float:
        """Predicted milliseconds of one forward of ``batch_size`` at ``degree``, as things run now."""
        return self.slowdown_at(batch_size) * self.table.predict(degree, batch_size)

    def utilisation(self, degree: int, rate_rps: float) -> float:
        """Share of the time full batches at ``degree`` keep the model busy at ``rate_rps`` arrivals."""
        return rate_rps * self.forward_ms(degree, self.max_batch) / self.max_batch / 1000

    def least_fitting(self, waits_ms: Sequence[float], budget_ms: float, rate_rps: float = 0.0,
                      share: float = 1.0) -> int:
        """The smallest degree whose predicted completion is within ``budget_ms`` and whose
        utilisation at ``rate_rps`` is at most ``share`` (else the largest)."""
        for degree in self.table.degrees:
            if (self.utilisation(degree, rate_rps) <= share and
                    self.completion(degree, waits_ms) <= budget_ms):
                return degree
        return self.table.degrees[-1]

    def choose(self, waits_ms: Sequence[float], rate_rps: float = 0.0) -> int:
        """The degree for the next batch; ``waits_ms`` of every held request, oldest first;
        ``rate_rps``: requests arriving per second lately (0: judge by the queue alone)."""
        waits = sorted(waits_ms, reverse=True)
        budget = self.margin * self.slo_ms
        target = self.least_fitting(waits, budget, rate_rps, self.margin)
        if target > self.degree:
            self.degree, self._streak = target, 0
        elif target < self.degree:
            band = 1 - self.hysteresis
            relaxed = self.least_fitting(waits, band * budget, rate_rps, band * self.margin)
            if relaxed < self.degree:
                # Step down to the most cautious degree seen during the streak, not the latest.
                self._candidate = relaxed if self._streak == 0 else max(self._candidate, relaxed)
                self._streak += 1
                if self._streak >= self.patience:
                    self.degree, self._streak = self._candidate, 0
            else:
                self._streak = 0
        else:
            self._streak = 0
        return self.degree

    def completion(self, degree: int, waits_ms: Sequence[float]) -> float:
        """:func:`completion_ms` at ``degree`` as things stand: the measured slowdown, and the
        switch's cost unless ``degree`` is the current one."""
        setup = self.switch_ms if degree != self.degree else 0.0
        return completion_ms(self.table, degree, waits_ms, self.max_batch, self.slowdown_at, setup)

    def observe_switch(self, ms: float) -> None:
        """Fold a measured degree switch (a plugin's delta folded into the weights) into ``switch_ms``.

        A switch is not forward time (counted as such, it would read as a slower machine); it is
        charged to predictions at any degree but the current one, a small push towards staying.
        With a plugin on DeiT-Tiny it took 2.7 ms median on a 2-core CPU.
        """
        w = self.smoothing
        self.switch_ms = ms if self.switch_ms == 0 else (1 - w) * self.switch_ms + w * ms

    def observe(self, degree: int, batch_size: int, ms: float) -> None:
        """Fold a measured forward into the slowdown of its batch size's bucket (measured /
        calibrated, kept within 0.5..4)."""
        ratio = ms / self.table.predict(degree, batch_size)
        estimate = (1 - self.smoothing) * self.slowdown_at(batch_size) + self.smoothing * ratio
        self._slowdowns[self._bucket(batch_size)] = min(4.0, max(0.5, estimate))

    @property
    def fastest(self) -> int:
        """The degree with the shortest full-batch forward."""
        return min(self.table.degrees, key=lambda d: self.table.predict(d, self.max_batch))

    def admits(self, held: int, waited_ms: float = 0.0) -> bool:
        """Whether a request arriving behind ``held`` others (FIFO), having already waited
        ``waited_ms`` before reaching the replica, is predicted to be answered within the SLO at
        the fastest degree.

        Pessimistic for the batch already running (counted whole). Time spent before the replica
        (an HTTP proxy's queue) is known only when a front end says so (``X-Request-Start``, see
        :mod:`tocom.serve.app`): a refusal costs the client a retry, a late answer costs it the
        SLO anyway.
        """
        # The newcomer ends the FIFO queue, so the worst completion is its own.
        waits = [0.0] * (held + 1)
        done_ms = self.completion(self.fastest, waits)
        return waited_ms + done_ms <= self.slo_ms

    def retry_after_s(self, held: int) -> int:
        """Whole seconds until ``held`` requests drain at the fastest degree (at least 1)."""
        batches = math.ceil(held / self.max_batch)
        batch_ms = self.forward_ms(self.fastest, self.max_batch)
        return max(1, math.ceil(batches * batch_ms / 1000))
