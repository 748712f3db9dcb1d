"""A model that serves at any of a set of degrees, switching (and folding a plugin's delta) per batch.

Switching writes W_q and W_v in place while another thread may be running a forward, so a switch
and the forward that follows it happen under one lock: a forward never sees half-switched weights.
A switch that fails while serving leaves the model at the degree it had (``set_degree`` is all
or nothing), logs why, and the batch runs there: :meth:`ElasticModel.run_timed` says so.

With :meth:`ElasticModel.compile` the forwards run through a :func:`tocom.compile` runner, one
static graph per (degree, batch bucket) built at start-up; a switch folds the plugin's delta in
place, which the graphs read, so switching needs no recompilation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tocom.compensator import Compensator, attach, set_degree
from tocom.models import is_patched, patch, schedule_report
from tocom.runtime import CompiledRunner
from tocom.runtime import compile as compile_runner

logger = logging.getLogger(__name__)
LOG_EVERY_S = 60.0  # a degree that keeps failing is logged again at most this often


class ElasticModel:
    """``model`` (a timm ViT) runnable at each of ``degrees``; with ``plugin``, compensated from ``source``.

    Args:
        model: patched or not (it is patched with the plugin's method, else ToMe).
        degrees: the degrees it may run at.
        plugin: a ToCom plugin fitted to the model, or None (plain token merging).
        source: the degree the model was fine-tuned at (the plugin's zero point).
        scale: the plugin's scale ``s`` (default: its own).
    """

    def __init__(self, model: nn.Module, degrees: Sequence[int], plugin: Compensator | None = None,
                 source: int = 0, scale: float | None = None):
        if not degrees:
            raise ValueError("give at least one degree to serve at")
        self.model = model.eval()
        self.degrees = sorted(set(int(d) for d in degrees))
        self.plugin = plugin
        self.source = source
        if plugin is not None:
            for d in self.degrees:
                plugin.check_degree(d)  # fail at start-up, not at the first busy minute
            attach(model, plugin, source=source, scale=scale)
        elif not is_patched(model):
            patch(model, "tome")
        # the model's own cost report: clamping, and dense mode's full-length attention, included
        self.gflops = {d: schedule_report(model, d)["gflops"] for d in self.degrees}
        # The model's own state lock makes each switch atomic; this one pairs a switch with the
        # forward that follows it, so no other thread can move the degree in between.
        self._lock = threading.Lock()
        self._degree = -1
        self.switch_failures = 0  # switches that failed while serving (the model kept its degree)
        self._logged: dict[int, float] = {}  # degree -> when its last failure was logged
        self.runner: CompiledRunner | None = None  # set by compile(); else forwards run eagerly
        self.switch(self.degrees[0])

    def compile(self, batch_sizes: Sequence[int], backend: str | None = "inductor") -> CompiledRunner:
        """Build a graph per (served degree, batch bucket) now; later forwards run through them.

        ``backend=None`` captures CUDA graphs of the eager forward (CUDA only). On the CPU no CUDA
        graphs are captured. Raises ValueError, naming why, for a model the runner cannot compile.
        """
        with self._lock:  # no forward or switch while the graphs are traced
            try:
                self.runner = compile_runner(self.model, degrees=self.degrees, batch_sizes=batch_sizes,
                                             backend=backend)
            except ValueError as err:
                raise ValueError(f"--compile cannot compile this model: {err}; serve it without "
                                 "--compile") from None
        seconds = self.runner.capture_seconds
        logger.info("compiled %d graphs (backend %s) in %.1f s; seconds per (degree, bucket): %s",
                    len(seconds), backend, sum(seconds.values()),
                    {key: round(s, 2) for key, s in seconds.items()})
        return self.runner

    @property
    def forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What runs a batch at the current degree: the compiled runner, else the model itself;
        images (B, 3, H, W) -> logits (B, num_classes). Calibration times this."""
        return self.runner if self.runner is not None else self.model

    @property
    def degree(self) -> int:
        """The degree the weights are folded for now."""
        return self._degree

    def _check(self, degree: int) -> None:
        if degree not in self.gflops:
            raise ValueError(f"degree {degree} is not one this model serves ({self.degrees})")

    def _switch_locked(self, degree: int) -> None:
        self._check(degree)
        if degree == self._degree:
            return
        if self.plugin is not None:
            set_degree(self.model, degree)
        else:
            self.model.r = degree
        self._degree = degree

    def switch(self, degree: int) -> None:
        """Fold the weights for ``degree`` (waits for a running forward to finish)."""
        with self._lock:
            self._switch_locked(degree)

    def run(self, images: torch.Tensor, degree: int) -> torch.Tensor:
        """Class probabilities: ``images`` (B, 3, H, W) -> (B, num_classes), all computed at ``degree``
        (or all at the degree before, when switching fails: see :meth:`run_timed`)."""
        return self.run_timed(images, degree)[0]

    def run_timed(self, images: torch.Tensor, degree: int) -> tuple[torch.Tensor, float, int]:
        """:meth:`run`, the milliseconds of it spent switching to ``degree`` (0 when already there),
        and the degree it ran at: ``degree``, or the one before when the switch failed.

        A server learning how fast its forwards run should not count a switch as forward time: with
        a plugin it folds a delta into the weights (2.7 ms median for DeiT-Tiny on a 2-core CPU).
        A failed switch does not fail the batch: the requests are answered at the previous degree
        (slower or less compressed than asked, never with half-switched weights), the failure is
        logged and counted in :attr:`switch_failures`, and the next batch tries again.
        """
        self._check(degree)  # a degree the model does not serve is the caller's bug: raise
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            try:
                self._switch_locked(degree)
            except Exception:  # noqa: BLE001 - the model is still whole at the old degree; serve on
                self._switch_failed(degree)
            switch_ms = (time.perf_counter() - start) * 1000
            param = next(self.model.parameters())
            logits = self.forward(images.to(param.device, param.dtype))
            return logits.float().softmax(dim=-1).cpu(), switch_ms, self._degree

    def _switch_failed(self, degree: int) -> None:
        self.switch_failures += 1
        now = time.monotonic()
        if now - self._logged.get(degree, float("-inf")) >= LOG_EVERY_S:
            self._logged[degree] = now
            logger.exception("switching from degree %d to %d failed (%d failures so far); the batch "
                             "runs at degree %d", self._degree, degree, self.switch_failures, self._degree)
