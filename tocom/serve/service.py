"""What one replica does, without Ray: load the model, calibrate, pick a degree per batch, answer.

:mod:`tocom.serve.app` wraps a :class:`Service` in a Ray Serve deployment; anything else that can
form batches (a plain asyncio server, a queue worker) can drive it the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tocom.data import transform_from_record
from tocom.finetuned import recorded_preprocessing
from tocom.serve.calibrate import DEFAULT_DEGREES, calibrate, distinct_degrees
from tocom.serve.controller import DegreeController
from tocom.serve.elastic import ElasticModel
from tocom.serve.images import class_names, decode_image


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``tocom serve`` is told; one per deployment, shipped to every replica."""

    model: str
    checkpoint: str | None = None
    plugin: str | None = None
    source: int | None = None  # default: the checkpoint's recorded degree, else 0
    degrees: tuple[int, ...] = DEFAULT_DEGREES
    fixed_degree: int | None = None
    scale: float | None = None
    slo_ms: float = 200.0
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_ongoing: int = 32  # requests a replica holds (running or batched) before refusing
    max_queued: int = 64  # requests waiting for a replica in Ray's router (a backstop)
    replicas: int = 1
    max_replicas: int = 1
    replica_cpus: float = 1.0
    threads: int | None = None  # torch threads per replica (default: its CPUs)
    device: str = "cpu"
    classes: str | None = None
    max_body_mb: float = 10.0
    top_k: int = 5
    recalibrate: bool = False
    access_log: bool = False  # Ray's per-request log lines (files under Ray's session folder)
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    name: str = "tocom"
    margin: float = 0.85
    hysteresis: float = 0.25
    patience: int = 3

    @property
    def served_degrees(self) -> tuple[int, ...]:
        return (self.fixed_degree,) if self.fixed_degree is not None else tuple(self.degrees)


def load_elastic(config: ServeConfig) -> tuple[ElasticModel, dict[str, str]]:
    """The model of ``config`` (checkpoint, plugin, degrees) and the checkpoint's metadata."""
    from tocom.compensator import Compensator
    from tocom.finetuned import checkpoint_metadata, load_model, source_degree

    meta = checkpoint_metadata(config.checkpoint) if config.checkpoint else {}
    source = config.source if config.source is not None else (source_degree(meta) or 0)
    degrees = config.served_degrees
    if meta.get("method") == "pyra" and set(degrees) != {source}:
        raise ValueError("a PYRA checkpoint only runs at the schedule it was trained at; "
                         f"serve it with --fixed-degree {source}")
    model = load_model(config.model, config.checkpoint).to(config.device).eval()
    plugin = Compensator.load(config.plugin) if config.plugin else None
    if plugin is None:
        degrees = distinct_degrees(model, degrees) if len(degrees) > 1 else degrees
    return ElasticModel(model, degrees, plugin, source, config.scale), meta


class Service:
    """One replica's model, preprocessing, latency table and degree controller."""

    def __init__(self, config: ServeConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.elastic, meta = load_elastic(config)
        model = self.elastic.model
        # exactly what the checkpoint was validated with (squash for VTAB fine-tunes)
        self.transform = transform_from_record(recorded_preprocessing(meta, model))
        self.num_classes = int(getattr(model, "num_classes", 0))
        self.classes = class_names(meta, config.classes, self.num_classes)
        self.table, self.calibration = calibrate(
            model, self.elastic.degrees, config.max_batch, set_degree=self.elastic.switch,
            refresh=config.recalibrate)
        self.controller = DegreeController(self.table, config.slo_ms, config.max_batch, margin=config.margin,
                                           hysteresis=config.hysteresis, patience=config.patience)
        self.elastic.switch(self.controller.degree)

    def preprocess(self, body: bytes) -> torch.Tensor:
        """Image bytes -> (3, H, W) model input; :class:`~tocom.serve.images.BadImage` when undecodable."""
        return self.transform(decode_image(body))

    def classify(self, images: Sequence[torch.Tensor], waits_ms: Sequence[float], top_k: Sequence[int]
                 ) -> list[dict[str, Any]]:
        """Answer one batch. ``images``: (3, H, W) each; ``waits_ms``: every held request's wait so far
        (this batch's and those queued behind it); ``top_k``: classes wanted per image."""
        degree = self.controller.choose(waits_ms)
        start = time.perf_counter()
        probs = self.elastic.run(torch.stack(list(images)), degree)
        compute_ms = (time.perf_counter() - start) * 1000
        self.controller.observe(degree, len(images), compute_ms)
        out = []
        for p, k in zip(probs, top_k):
            values, indices = p.topk(min(k, p.numel()))
            preds = [{"index": int(i), "label": self.classes[int(i)] if self.classes else None,
                      "probability": round(float(v), 6)} for v, i in zip(values, indices)]
            out.append({"predictions": preds, "degree": degree,
                        "gflops": round(self.elastic.gflops[degree], 4), "batch_size": len(images),
                        "compute_ms": round(compute_ms, 3)})
        return out

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/info`` answers."""
        c = self.config
        gflops = {str(d): round(g, 4) for d, g in self.elastic.gflops.items()}
        return {"model": c.model, "checkpoint": c.checkpoint, "plugin": c.plugin,
                "source": self.elastic.source, "degrees": self.elastic.degrees, "degree": self.elastic.degree,
                "slowdown": round(self.controller.slowdown, 3),
                "slo_ms": c.slo_ms, "max_batch": c.max_batch, "gflops": gflops,
                "latency_ms": self.table.to_json(), "calibration": self.calibration,
                "classes": self.classes, "num_classes": self.num_classes,
                "config": asdict(c)}
