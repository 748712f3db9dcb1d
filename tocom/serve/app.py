"""The Ray Serve deployment of ``tocom serve``: HTTP routes, dynamic batching, admission and metrics.

Routes (relative to the application's route prefix):

* ``POST /v1/classify?k=5`` - body: the raw bytes of a JPEG, PNG or WebP image. Answers
  ``{"predictions": [{"index", "label", "probability"}...], "degree", "gflops", "batch_size",
  "queue_ms", "compute_ms", "total_ms"}``; 400 with the reason for undecodable bodies or a bad
  ``k``; 413 over the body limit; 503 with ``Retry-After`` when the replica already holds
  ``max_ongoing`` requests, or when a request queued behind those it holds is predicted to miss
  the SLO even at the fastest degree.
* ``GET /healthz`` - ``{"status": "ok"}``.
* ``GET /v1/info`` - model, plugin, degrees, SLO, the calibrated latency table, the degree now.

Ray's own backpressure (``max_queued_requests``, requests waiting in the router for a replica)
answers 503 without ``Retry-After``, and Ray 2.60 offers no hook on that response. So Ray lets
``ROUTER_SLACK`` more requests than a replica accepts reach it, and the replica refuses the
excess itself, with ``Retry-After``; Ray's 503 remains only for requests that find no replica.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import replace

import ray
import torch
from ray import serve
from ray.serve import metrics
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tocom.serve.batcher import Batcher, Running
from tocom.serve.controller import ArrivalRate
from tocom.serve.images import BadImage
from tocom.serve.service import ModelWorker, ServeConfig, Service
from tocom.serve.upstream import HEADER as UPSTREAM_HEADER
from tocom.serve.upstream import upstream_wait_ms

ROUTES = {"/healthz": ("GET",), "/v1/info": ("GET",), "/v1/classify": ("POST",)}
ROUTER_SLACK = 64
LATENCY_BOUNDARIES_MS = [5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000]


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def cpu_split(replica_cpus: float) -> tuple[float, float]:
    """Ray CPUs of a replica's HTTP side and of its model worker (a tenth, and the rest)."""
    front = round(replica_cpus / 10, 4)
    return front, replica_cpus - front


def worker_resources(config: ServeConfig) -> dict[str, float]:
    """What a replica's model worker reserves: its CPUs, and a GPU when it runs on CUDA."""
    resources = {"CPU": cpu_split(config.replica_cpus)[1]}
    if config.device.startswith("cuda"):
        resources["GPU"] = 1
    return resources


class TocomReplica:
    """One replica: a :class:`~tocom.serve.service.Service` behind HTTP (see :func:`build_app`).

    The model runs in a Ray actor of its own, a :class:`~tocom.serve.service.ModelWorker` owned
    by the replica (it dies with it) in the replica's placement group (so on the same node). In
    one process, the HTTP side's Python held the GIL often enough to slow the forwards by half
    under load: a forward at r = 16 is hundreds of small operations, each retaking the GIL.
    """

    async def __init__(self, config: ServeConfig):
        self.config = config
        torch.set_num_threads(1)  # this side only decodes and resizes; the worker has the threads
        need = worker_resources(config)
        worker = ray.remote(ModelWorker).options(num_cpus=need["CPU"], num_gpus=need.get("GPU", 0))
        self._worker = worker.remote(config)
        self.service = Service(config, await self._worker.describe.remote())
        # not @serve.batch: it forms batches while one runs, so a busy replica ran batches of 1-2
        self._batcher = Batcher(max_batch=config.max_batch, wait_s=config.batch_wait_ms / 1000,
                                start=self._start_batch, lead_s=(config.lead_ms or 0) / 1000)
        self._arrivals = ArrivalRate()  # every classify request, refused ones too: the load offered
        self._held: dict[int, float] = {}  # request id -> arrival (perf_counter) of requests accepted here
        self._ids = itertools.count()
        self._requests = metrics.Counter("tocom_requests", "classify requests by HTTP status",
                                         tag_keys=("status",))
        self._degrees = metrics.Counter("tocom_batches", "batches by the degree they ran at",
                                        tag_keys=("degree",))
        self._slo = metrics.Counter("tocom_slo", "answered requests by whether they met the SLO",
                                    tag_keys=("met",))
        self._latency = metrics.Histogram("tocom_latency_ms",
                                          "arrival (X-Request-Start, else at the replica) to answer",
                                          boundaries=LATENCY_BOUNDARIES_MS)
        self._batch_sizes = metrics.Histogram("tocom_batch_size", "requests per batch",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64])

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose model worker died is replaced."""
        await self._worker.ping.remote()

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        path = path.rstrip("/") or "/"
        if path not in ROUTES:
            return _error(404, f"no route {path}; routes: {', '.join(sorted(ROUTES))}")
        if request.method not in ROUTES[path]:
            return _error(405, f"{path} accepts {', '.join(ROUTES[path])}", allow=", ".join(ROUTES[path]))
        if path == "/healthz":
            return JSONResponse({"status": "ok"})
        if path == "/v1/info":
            return JSONResponse(self.service.info())
        response = await self._classify(request)
        self._requests.inc(tags={"status": str(response.status_code)})
        return response

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None when it is over the limit (read no further than the limit)."""
        limit = int(self.config.max_body_mb * 2**20)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _classify(self, request: Request) -> Response:
        reached = time.perf_counter()
        upstream_ms = upstream_wait_ms(request.headers.get(UPSTREAM_HEADER), time.time())
        arrival = reached - upstream_ms / 1000  # the SLO runs from the front end's stamp, if any
        self._arrivals.add(reached)
        held, controller = len(self._held), self.service.controller
        if held >= self.config.max_ongoing or not controller.admits(held, upstream_ms):
            reason = (f"this replica holds {held} requests" if held >= self.config.max_ongoing else
                      f"behind the {held} requests held here it would miss the {self.config.slo_ms:g} ms SLO")
            return _error(503, f"overloaded: {reason}; retry later",
                          **{"retry-after": str(controller.retry_after_s(held))})
        rid = next(self._ids)
        self._held[rid] = arrival
        try:
            k = request.query_params.get("k", str(self.config.top_k))
            num_classes = self.service.num_classes
            if not k.isdigit() or not 1 <= int(k) <= num_classes:
                return _error(400, f"k must be an integer from 1 to {num_classes}, got {k!r}")
            body = await self._read_body(request)
            if body is None:
                limit = self.config.max_body_mb
                return _error(413, f"body over the {limit:g} MB limit; send a smaller image")
            try:
                image = await asyncio.to_thread(self.service.preprocess, body)
            except BadImage as err:
                return _error(400, str(err))
            result = await self._batcher.submit((image, arrival, int(k)))
        finally:
            del self._held[rid]
        total_ms = (time.perf_counter() - arrival) * 1000
        result["total_ms"] = round(total_ms, 3)
        result["upstream_ms"] = round(upstream_ms, 3)
        self._latency.observe(total_ms)
        self._slo.inc(tags={"met": str(total_ms <= self.config.slo_ms).lower()})
        return JSONResponse(result)

    async def _start_batch(self, items: list[tuple]) -> Running:
        """Hand a batch of ``(image (3, H, W), arrival, k)`` to the model worker; see :class:`Batcher`."""
        start = time.perf_counter()
        waits = [(start - t) * 1000 for t in self._held.values()]
        images, arrivals, ks = zip(*items)
        controller = self.service.controller
        degree = self.service.choose(waits, self._arrivals.rate(start))
        batch = await asyncio.to_thread(lambda: torch.stack(images).numpy())
        answer = self._worker.run.remote(batch, degree)  # queued behind the batch the worker runs now
        busy_s = math.inf if self.config.lead_ms is None else controller.forward_ms(degree, len(items)) / 1000
        return Running(self._answer_batch(answer, degree, arrivals, ks, start), busy_s)

    async def _answer_batch(self, answer, degree: int, arrivals, ks, start: float) -> list[dict]:
        probs, compute_ms, switch_ms = await answer
        results = self.service.answer(probs, degree, compute_ms, ks, switch_ms)
        self._degrees.inc(tags={"degree": str(degree)})
        self._batch_sizes.observe(len(ks))
        for result, arrival in zip(results, arrivals):
            result["queue_ms"] = round((start - arrival) * 1000, 3)
        return results


def deployment_options(config: ServeConfig) -> dict:
    """Ray Serve options of the deployment (replicas, autoscaling, backpressure, CPUs)."""
    front = cpu_split(config.replica_cpus)[0]
    options = {
        # Room for the excess, so that replicas refuse it with Retry-After instead of Ray's router.
        "max_ongoing_requests": config.max_ongoing + ROUTER_SLACK,
        "max_queued_requests": config.max_queued,
        "ray_actor_options": {"num_cpus": front},
        # the replica in the first bundle, its model worker (a child actor) in the second, one node
        "placement_group_bundles": [{"CPU": front}, worker_resources(config)],
        "placement_group_strategy": "STRICT_PACK",
        "health_check_period_s": 5,
        # Ray logs a line per request to files unless told not to; requests write nothing by default.
        "logging_config": {"enable_access_log": config.access_log},
    }
    if config.max_replicas > config.replicas:
        options["autoscaling_config"] = {
            "min_replicas": config.replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.max_batch, "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        options["num_replicas"] = config.replicas
    return options


def build_app(config: ServeConfig):
    """The Ray Serve application serving ``config``."""
    if config.threads is None:  # a replica's torch threads follow the CPUs Ray gives it
        config = replace(config, threads=max(1, math.floor(config.replica_cpus)))
    deployment = serve.deployment(TocomReplica, name="TocomReplica", **deployment_options(config))
    return deployment.bind(config)


def start_ray(address: str | None, num_cpus: float | None = None) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one in-process."""
    import os

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def start_serve(host: str, port: int, access_log: bool = False) -> None:
    """Start Serve's HTTP proxy on ``host:port`` (a Serve already running keeps its own options)."""
    serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": access_log})


def deploy(config: ServeConfig, address: str | None = None, num_cpus: float | None = None) -> str:
    """Start (or join) Ray and Serve, deploy ``config``; returns the base URL (blocks until ready)."""
    start_ray(address, num_cpus)
    start_serve(config.host, config.port, config.access_log)
    serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
    prefix = "" if config.route_prefix == "/" else config.route_prefix
    return f"http://{config.host}:{config.port}{prefix}"


def shutdown() -> None:
    """Tear down Serve and, if this process started it, Ray."""
    serve.shutdown()
    ray.shutdown()
