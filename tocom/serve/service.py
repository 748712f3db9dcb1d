"""What one replica does, without Ray: load the model, calibrate, pick a degree per batch, answer.

A :class:`ModelWorker` holds the model; a :class:`Service` holds the rest (preprocessing, the
degree controller, the answers) and either owns a worker in its own process or is told about one
running elsewhere. :mod:`tocom.serve.app` wraps them in a Ray Serve deployment; anything else that
can form batches (a plain asyncio server, a queue worker) can drive them the same way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tocom.data import transform_from_record
from tocom.finetuned import recorded_preprocessing
from tocom.models.hf_load import class_names as hf_class_names
from tocom.models.hf_load import hf_preprocessing, is_hf
from tocom.serve.calibrate import DEFAULT_DEGREES, batch_sizes_up_to, calibrate, distinct_degrees
from tocom.serve.controller import DegreeController, LatencyTable
from tocom.serve.edge import file_identity
from tocom.serve.elastic import ElasticModel
from tocom.serve.images import MAX_PIXELS, class_names, decode_image

logger = logging.getLogger(__name__)
# A request's deadline once its body is in, unless configured: a few SLOs, so that a request that
# has already missed its SLO still gets its answer, but never less than a slow machine's cold start.
DEADLINE_SLOS = 4
DEADLINE_FLOOR_MS = 2000.0


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
    lead_ms: float | None = 25.0  # next batch sent this long before the model is free (None: after)
    max_ongoing: int = 32  # requests a replica holds (running or batched) before refusing
    max_queued: int = 64  # requests waiting for a replica in Ray's router (a backstop)
    replicas: int = 1
    max_replicas: int = 1
    replica_cpus: float = 1.0
    threads: int | None = None  # torch threads per replica (default: its CPUs)
    worker_cores: tuple[int, ...] | None = None  # Linux CPU cores the model workers are pinned to
    device: str = "cpu"
    compile: bool = False  # run the forwards through a tocom.compile runner (graphs per degree, bucket)
    compile_backend: str | None = "inductor"  # torch.compile's backend; None: CUDA graphs of eager
    compile_batch_sizes: tuple[int, ...] | None = None  # the runner's buckets (default: calibration's)
    classes: str | None = None
    max_body_mb: float = 10.0
    max_pixels: int = MAX_PIXELS  # images over it are refused from their header, before decoding
    decode_threads: int = 2  # images a replica decodes at once (each holds all its pixels)
    body_timeout_s: float = 10.0  # to receive a body; slower uploads get 408, and held no slot
    request_timeout_ms: float | None = None  # body in -> answer, else 504 (default: deadline_ms)
    trust_request_start: bool = False  # take X-Request-Start from clients (only behind a front end)
    token_sha256: str | None = None  # SHA-256 of the bearer token every path but /healthz needs
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

    @property
    def deadline_ms(self) -> float:
        """How long a request may take once its body is in (decoding, queueing, the forward)."""
        if self.request_timeout_ms is not None:
            return self.request_timeout_ms
        return max(DEADLINE_SLOS * self.slo_ms, DEADLINE_FLOOR_MS)

    def public(self) -> dict[str, Any]:
        """The settings as ``/v1/info`` shows them: file names, not paths; no token digest."""
        out = asdict(self)
        del out["token_sha256"]
        out["auth"] = self.token_sha256 is not None
        for key in ("checkpoint", "plugin", "classes"):
            out[key] = os.path.basename(out[key]) if out[key] else None
        return out


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
    if is_hf(config.model):
        from tocom.peft.hf import load_finetuned_hf

        model = load_finetuned_hf(config.model, config.checkpoint)
    else:
        model = load_model(config.model, config.checkpoint)
    model = model.to(config.device).eval()
    plugin = Compensator.load(config.plugin) if config.plugin else None
    if plugin is None:
        degrees = distinct_degrees(model, degrees) if len(degrees) > 1 else degrees
    return ElasticModel(model, degrees, plugin, source, config.scale), meta


def pin_thread(cores: Sequence[int]) -> None:
    """Pin the calling thread, and threads it starts later, to ``cores`` (Linux CPU numbers).

    On a small machine the forward shares cores with the HTTP proxy, the clients and the
    replica's own request handling; the scheduler's preemptions cost a DeiT-Tiny r = 0 forward a
    fifth of its speed under load (2-core CPU), which pinning the model to a core of its own
    gives back.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning the model worker to cores needs Linux (os.sched_setaffinity)")
    cpus = os.cpu_count() or 1
    if not cores or not all(0 <= c < cpus for c in cores):
        raise ValueError(f"cannot pin to cores {sorted(cores)}: this machine has cores 0 to {cpus - 1}")
    try:
        os.sched_setaffinity(0, set(cores))
    except OSError as err:
        raise ValueError(f"cannot pin to cores {sorted(cores)}: {err}") from None


def restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray restarted after it died (False outside Ray)."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return False
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not knowing only costs a calibration
        logger.warning("could not tell whether this worker was restarted", exc_info=True)
        return False


class ModelWorker:
    """The model side of a replica: the elastic model, its latency table, and forwards.

    Under Ray it runs in a process of its own (:mod:`tocom.serve.app`): a forward at high degree
    is many small operations dispatched from Python, and sharing an interpreter (its GIL) with
    the HTTP side slowed it by half under load.
    """

    def __init__(self, config: ServeConfig):
        if config.worker_cores:
            pin_thread(config.worker_cores)  # Ray runs its tasks on this thread
        if config.threads:
            torch.set_num_threads(config.threads)
        self.elastic, meta = load_elastic(config)
        model = self.elastic.model
        compiled = self._compile(config) if config.compile else None
        # Restarted after a crash, the worker takes the table measured before it (from the cache):
        # measuring again would hold the replica's requests for seconds, on the same machine.
        refresh = config.recalibrate and not restarted_actor()
        table, calibration = calibrate(model, self.elastic.degrees, config.max_batch,
                                       set_degree=self.elastic.switch, refresh=refresh,
                                       runner=self.elastic.runner)
        if is_hf(config.model):  # its folder's image processor and id2label, unless the checkpoint says
            preprocessing = hf_preprocessing(config.model, meta)
            names = hf_class_names(model)
            meta = {**meta, "classes": json.dumps(names)} if names and "classes" not in meta else meta
        else:
            preprocessing = recorded_preprocessing(meta, model)
        self.description = {
            "files": {"checkpoint": file_identity(config.checkpoint), "plugin": file_identity(config.plugin)},
            "meta": meta, "preprocessing": preprocessing,
            "num_classes": int(getattr(model, "num_classes", 0)), "table": table.to_json(),
            "calibration": calibration, "gflops": dict(self.elastic.gflops),
            "degrees": list(self.elastic.degrees), "source": self.elastic.source,
            "degree": self.elastic.degree, "compiled": compiled}

    def _compile(self, config: ServeConfig) -> dict[str, Any]:
        """Build the runner's graphs (before calibrating, which then times them); what ``/v1/info``
        says of them: backend, buckets, and the seconds each (degree, bucket) took to build."""
        buckets = config.compile_batch_sizes or tuple(batch_sizes_up_to(config.max_batch))
        runner = self.elastic.compile(buckets, config.compile_backend)
        seconds = {f"{d}/{b}": round(s, 3) for (d, b), s in runner.capture_seconds.items()}
        return {"backend": config.compile_backend, "batch_sizes": list(runner.batch_sizes),
                "cuda_graphs": runner.graphs, "capture_seconds": seconds,
                "total_seconds": round(sum(runner.capture_seconds.values()), 2)}

    def ping(self) -> bool:
        """Liveness, for health checks: an answer means the worker runs calls (it runs them in
        order, so a ping waits behind the batches it holds)."""
        return True

    def describe(self) -> dict[str, Any]:
        """What the front side needs: checkpoint metadata, preprocessing record, latency table..."""
        return self.description

    def run(self, images: np.ndarray | torch.Tensor, degree: int) -> tuple[np.ndarray, float, float, int]:
        """``images`` (B, 3, H, W) -> (class probabilities (B, num_classes), milliseconds of the
        call, milliseconds of it spent switching the degree, the degree it ran at: ``degree``, or
        the one before when switching failed, see :meth:`ElasticModel.run_timed`)."""
        start = time.perf_counter()
        if isinstance(images, np.ndarray):  # Ray hands arrays over read-only; torch wants to own one
            images = torch.from_numpy(np.require(images, requirements="W"))
        probs, switch_ms, ran = self.elastic.run_timed(images, degree)
        return probs.numpy(), (time.perf_counter() - start) * 1000, switch_ms, ran


class Service:
    """One replica's front side: preprocessing, the degree controller and the answers.

    Args:
        config: the deployment's settings.
        description: a :class:`ModelWorker`'s :meth:`~ModelWorker.describe`, when the worker runs
            elsewhere (the caller then runs the forwards); without it a worker is built here and
            :meth:`classify` runs it in this process.
    """

    def __init__(self, config: ServeConfig, description: dict[str, Any] | None = None):
        self.config = config
        self.worker = ModelWorker(config) if description is None else None
        d = self.worker.describe() if description is None else description
        # exactly what the checkpoint was validated with (squash for VTAB fine-tunes)
        self.transform = transform_from_record(d["preprocessing"])
        self.num_classes = d["num_classes"]
        self.classes = class_names(d["meta"], config.classes, self.num_classes)
        self.table, self.calibration = LatencyTable.from_json(d["table"]), d["calibration"]
        self.gflops, self.degrees, self.source = d["gflops"], d["degrees"], d["source"]
        self.controller = DegreeController(self.table, config.slo_ms, config.max_batch, margin=config.margin,
                                           hysteresis=config.hysteresis, patience=config.patience)
        self.degree = d["degree"]  # the degree the worker's weights are folded for
        self.switch_failures = 0  # batches that ran at another degree than asked (the switch failed)
        self.files = {**d.get("files", {}), "classes": file_identity(config.classes)}
        self.compiled = d.get("compiled")  # the compiled runner's graphs, None when forwards run eagerly

    def preprocess(self, body: bytes) -> torch.Tensor:
        """Image bytes -> (3, H, W) model input; :class:`~tocom.serve.images.BadImage` when undecodable."""
        return self.transform(decode_image(body, self.config.max_pixels))

    def choose(self, waits_ms: Sequence[float], rate_rps: float = 0.0) -> int:
        """The degree of the next batch. ``waits_ms``: every held request's wait so far (this
        batch's and those queued behind it); ``rate_rps``: requests arriving per second lately."""
        return self.controller.choose(waits_ms, rate_rps)

    def answer(self, probs: np.ndarray | torch.Tensor, degree: int, compute_ms: float,
               top_k: Sequence[int], switch_ms: float = 0.0,
               asked: int | None = None) -> list[dict[str, Any]]:
        """The answers of a batch run at ``degree``: ``probs`` (B, num_classes), ``top_k`` per image.

        ``compute_ms``: the batch as the worker timed it, of which ``switch_ms`` went to switching
        the degree. The controller learns the forward's speed and the switch's cost apart (not
        from the round trip: a pipelined batch also waits in the worker for the one before it).
        ``asked``: the degree the batch was sent at, when the worker may have run it at another
        (its switch failed); such batches are counted in ``/v1/info``'s ``switch_failures``.
        """
        if asked is not None and asked != degree:  # the worker logged why
            self.switch_failures += 1
        self.controller.observe(degree, len(probs), compute_ms - switch_ms)
        if switch_ms > 0:
            self.controller.observe_switch(switch_ms)
        self.degree = degree
        probs = torch.tensor(np.asarray(probs))  # a copy: arrays from Ray are read-only
        out = []
        for p, k in zip(probs, top_k):
            values, indices = p.topk(min(k, p.numel()))
            preds = [{"index": int(i), "label": self.classes[int(i)] if self.classes else None,
                      "probability": round(float(v), 6)} for v, i in zip(values, indices)]
            out.append({"predictions": preds, "degree": degree, "gflops": round(self.gflops[degree], 4),
                        "batch_size": len(probs), "compute_ms": round(compute_ms, 3)})
        return out

    def classify(self, images: Sequence[torch.Tensor], waits_ms: Sequence[float], top_k: Sequence[int],
                 rate_rps: float = 0.0) -> list[dict[str, Any]]:
        """Answer one batch in this process: ``images`` (3, H, W) each; see :meth:`choose`."""
        if self.worker is None:
            raise RuntimeError("this Service's model runs elsewhere; run the batch there and call answer()")
        degree = self.choose(waits_ms, rate_rps)
        probs, compute_ms, switch_ms, ran = self.worker.run(torch.stack(list(images)), degree)
        return self.answer(probs, ran, compute_ms, top_k, switch_ms, asked=degree)

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/info`` answers. Files appear as names and SHA-256 hashes: a client may check
        which weights answer it, but learns nothing of the server's file system."""
        c = self.config
        gflops = {str(d): round(g, 4) for d, g in self.gflops.items()}
        calibration = dict(self.calibration)
        if calibration.get("path"):
            calibration["path"] = os.path.basename(calibration["path"])
        files = self.files
        return {"model": c.model, "checkpoint": files.get("checkpoint"), "plugin": files.get("plugin"),
                "classes_file": self.files.get("classes"), "switch_failures": self.switch_failures,
                "source": self.source, "degrees": self.degrees, "degree": self.degree,
                "slowdown": round(self.controller.slowdown, 3),
                "switch_ms": round(self.controller.switch_ms, 3),
                "slo_ms": c.slo_ms, "max_batch": c.max_batch, "gflops": gflops,
                "latency_ms": self.table.to_json(), "calibration": calibration,
                "compiled": self.compiled, "classes": self.classes, "num_classes": self.num_classes,
                "config": c.public()}
