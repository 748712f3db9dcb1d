"""The Ray Serve deployment of ``tocom serve``: HTTP routes, dynamic batching, admission and metrics.

Routes (relative to the application's route prefix):

* ``POST /v1/classify?k=5`` - body: the raw bytes of a JPEG, PNG or WebP image. Answers
  ``{"predictions": [{"index", "label", "probability"}...], "degree", "gflops", "batch_size",
  "queue_ms", "compute_ms", "total_ms"}``; 400 with the reason for undecodable bodies or a bad
  ``k``; 408 when the body does not arrive within ``body_timeout_s``; 413 over the body limit;
  503 with ``Retry-After`` when the replica already holds ``max_ongoing`` requests, when a
  request queued behind those it holds is predicted to miss the SLO even at the fastest degree,
  or when the model worker is dead, restarting or not answering; 504 past the request deadline.
* ``GET /healthz`` - ``{"status": "ok"}`` when the model worker answers a ping, else 503.
* ``GET /v1/info`` - model, checkpoint and plugin (names and SHA-256), degrees, SLO, the
  calibrated latency table, the degree now.

With a token configured every route but ``/healthz`` needs ``Authorization: Bearer <token>``,
else 401. Every error is JSON, ``{"error": ...}``; an unexpected one is a 500 whose traceback
goes to the replica's log, not to the client.

A body is read, within ``body_timeout_s``, before the request takes one of the replica's
``max_ongoing`` places: slow uploads hold none. The model worker is a Ray actor that Ray
restarts when its process dies. When a call to it fails that way, or a batch goes unanswered
for :meth:`TocomReplica.worker_timeout_s`, the replica answers 503 with ``Retry-After`` at once
until the worker answers a ping again.

Ray's own backpressure (``max_queued_requests``, requests waiting in the router for a replica)
answers 503 without ``Retry-After``, and Ray 2.60 offers no hook on that response. So Ray lets
``ROUTER_SLACK`` more requests than a replica accepts reach it, and the replica refuses the
excess itself, with ``Retry-After``; Ray's 503 remains only for requests that find no replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tocom.serve.batcher import Batcher, Running
from tocom.serve.controller import ArrivalRate
from tocom.serve.edge import BadRequest, bearer_matches, parse_content_length, parse_k
from tocom.serve.images import BadImage
from tocom.serve.service import ModelWorker, ServeConfig, Service
from tocom.serve.upstream import HEADER as UPSTREAM_HEADER
from tocom.serve.upstream import upstream_wait_ms

logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file
ROUTES = {"/healthz": ("GET",), "/v1/info": ("GET",), "/v1/classify": ("POST",)}
OPEN_ROUTES = {"/healthz"}  # answered without a token: load balancers probe it
ROUTER_SLACK = 64
LATENCY_BOUNDARIES_MS = [5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000]
WORKER_RESTARTS = 3  # after that the health check fails and Ray Serve replaces the whole replica
WORKER_TIMEOUT_FLOOR_S = 1.0
WORKER_RETRY_AFTER_S = 5  # a restarted worker loads its model again: seconds
PROBE_EVERY_S = 0.5


class WorkerUnavailable(Exception):
    """The model worker died, is restarting or does not answer: the request may be retried."""


NODE_HEADER = "x-tocom-node"  # the first 12 hex digits of the answering replica's Ray node id


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _unavailable(why: str) -> JSONResponse:
    return _error(503, f"model worker unavailable: {why}; retry later",
                  **{"retry-after": str(WORKER_RETRY_AFTER_S)})


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

    Args:
        config: the deployment's settings.
        worker: the model worker's handle (``describe``, ``run`` and ``ping``, each with a
            ``.remote(...)`` that returns an awaitable); by default :func:`spawn_worker`'s actor.
            Tests hand in one running in this process.
    """

    async def __init__(self, config: ServeConfig, worker: Any = None):
        self.config = config
        torch.set_num_threads(1)  # this side only decodes and resizes; the worker has the threads
        self._worker = worker if worker is not None else spawn_worker(config)
        self.service = Service(config, await self._worker.describe.remote())
        # A pool, not a semaphore around to_thread: a decode given up at the deadline keeps its
        # thread until it ends, so the bound on decodes, and on their memory, holds even then.
        self._decoder = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="tocom-decode")
        self._worker_down: str | None = None  # why the worker is thought unavailable, while it is
        self._watch: asyncio.Task | None = None
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
        # Which node answered, for a cluster's operator (a load balancer's "served by"); None in
        # a test that builds a replica outside Ray, where asking would start a Ray of its own.
        self._node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else None

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose worker stays dead or hung is replaced (Serve
        waits for three failed checks, time enough for Ray to restart a worker that died)."""
        problem = await self._ping()
        if problem is not None:
            raise RuntimeError(f"the model worker is unavailable: {problem}")

    def worker_timeout_s(self) -> float:
        """How long the worker may take to answer a call before it counts as hung.

        Four times the predicted time of the slowest full batch (a call may wait behind one
        batch), at least a second, and at most half the request deadline, so that the requests
        of a batch the worker sits on get their 503 before their deadline.
        """
        controller, batch = self.service.controller, self.config.max_batch
        slowest_s = max(controller.forward_ms(d, batch) for d in self.service.degrees) / 1000
        return min(max(WORKER_TIMEOUT_FLOOR_S, 4 * slowest_s), self.config.deadline_ms / 2000)

    async def _ping(self) -> str | None:
        """None when the worker answers a ping in time (it then counts as up again), else why not."""
        timeout = self.worker_timeout_s()
        try:
            await asyncio.wait_for(self._worker.ping.remote(), timeout)
        except asyncio.TimeoutError:
            return f"it did not answer a ping within {timeout:.1f} s"
        except RayActorError as err:
            return f"it died ({type(err).__name__}); Ray restarts it"
        if self._worker_down is not None:
            logger.info("the model worker answers again (it was unavailable: %s)", self._worker_down)
            self._worker_down = None
        return None

    def _lost_worker(self, why: str) -> None:
        """Refuse requests at once, rather than queue them behind a dead worker, until it answers
        a ping (tried every ``PROBE_EVERY_S``)."""
        if self._worker_down is None:
            logger.warning("the model worker is unavailable: %s; refusing requests until it answers", why)
        self._worker_down = why
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_worker())

    async def _watch_worker(self) -> None:
        while self._worker_down is not None and await self._ping() is not None:
            await asyncio.sleep(PROBE_EVERY_S)

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        path = path.rstrip("/") or "/"
        try:
            response = await self._route(request, path)
        except Exception:  # noqa: BLE001 - the client gets JSON; the traceback stays in the log
            logger.exception("unexpected error answering %s %s", request.method, path)
            response = _error(500, "internal error; the replica's log has the details")
        if path == "/v1/classify":
            self._requests.inc(tags={"status": str(response.status_code)})
        if self._node is not None:
            response.headers[NODE_HEADER] = self._node
        return response

    async def _route(self, request: Request, path: str) -> Response:
        digest, given = self.config.token_sha256, request.headers.get("authorization")
        # before routing: without the token nothing is learnt, not even which paths exist
        if digest and path not in OPEN_ROUTES and not bearer_matches(given, digest):
            return _error(401, "missing or wrong token: send the header Authorization: Bearer <token>",
                          **{"www-authenticate": 'Bearer realm="tocom"'})
        if path not in ROUTES:
            return _error(404, f"no route {path}; routes: {', '.join(sorted(ROUTES))}")
        if request.method not in ROUTES[path]:
            return _error(405, f"{path} accepts {', '.join(ROUTES[path])}", allow=", ".join(ROUTES[path]))
        if path == "/healthz":
            problem = await self._ping()
            return JSONResponse({"status": "ok"}) if problem is None else _unavailable(problem)
        if path == "/v1/info":
            return JSONResponse(self.service.info())
        return await self._classify(request)

    async def _read_body(self, request: Request, limit: int) -> bytes | None:
        """The body, or None when it is over ``limit`` bytes (read no further than the limit)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _classify(self, request: Request) -> Response:
        c = self.config
        reached = time.perf_counter()
        # trusted, any client could stamp its requests old and force the fastest degree on all
        stamp = request.headers.get(UPSTREAM_HEADER) if c.trust_request_start else None
        upstream_ms = upstream_wait_ms(stamp, time.time())
        arrival = reached - upstream_ms / 1000  # the SLO runs from the front end's stamp, if any
        limit = int(c.max_body_mb * 2**20)
        too_big = _error(413, f"body over the {c.max_body_mb:g} MB limit; send a smaller image")
        try:
            k = parse_k(request.query_params.get("k"), c.top_k, self.service.num_classes)
            declared = parse_content_length(request.headers.get("content-length"))
        except BadRequest as err:
            return _error(400, str(err))
        if declared is not None and declared > limit:
            return too_big
        try:
            body = await asyncio.wait_for(self._read_body(request, limit), c.body_timeout_s)
        except asyncio.TimeoutError:
            return _error(408, f"the body did not arrive within {c.body_timeout_s:g} s; send it again",
                          connection="close")
        if body is None:
            return too_big
        self._arrivals.add(reached)
        if self._worker_down is not None:
            return _unavailable(self._worker_down)
        held, controller = len(self._held), self.service.controller
        waited_ms = (time.perf_counter() - arrival) * 1000  # the upload counts against the SLO too
        if held >= c.max_ongoing or not controller.admits(held, waited_ms):
            reason = (f"this replica holds {held} requests" if held >= c.max_ongoing else
                      f"behind the {held} requests held here it would miss the {c.slo_ms:g} ms SLO")
            return _error(503, f"overloaded: {reason}; retry later",
                          **{"retry-after": str(controller.retry_after_s(held))})
        rid = next(self._ids)
        self._held[rid] = arrival
        try:
            result = await asyncio.wait_for(self._answer(body, arrival, k), c.deadline_ms / 1000)
        except BadImage as err:
            return _error(400, str(err))
        except WorkerUnavailable as err:
            return _unavailable(str(err))
        except asyncio.TimeoutError:
            return _error(504, f"not answered within the {c.deadline_ms:g} ms deadline; retry later")
        finally:
            del self._held[rid]
        total_ms = (time.perf_counter() - arrival) * 1000
        result["total_ms"] = round(total_ms, 3)
        result["upstream_ms"] = round(upstream_ms, 3)
        self._latency.observe(total_ms)
        self._slo.inc(tags={"met": str(total_ms <= c.slo_ms).lower()})
        return JSONResponse(result)

    async def _answer(self, body: bytes, arrival: float, k: int) -> dict:
        """Decode ``body`` on one of the replica's decode threads, then classify it in a batch."""
        image = await asyncio.wrap_future(self._decoder.submit(self.service.preprocess, body))
        return await self._batcher.submit((image, arrival, k))

    async def _start_batch(self, items: list[tuple]) -> Running:
        """Hand a batch of ``(image (3, H, W), arrival, k)`` to the model worker; see :class:`Batcher`."""
        if self._worker_down is not None:  # answered at once, not queued behind a dead worker
            raise WorkerUnavailable(self._worker_down)
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
        timeout = self.worker_timeout_s()
        try:
            probs, compute_ms, switch_ms, ran = await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            why = f"it did not answer a batch within {timeout:.1f} s"
            self._lost_worker(why)
            raise WorkerUnavailable(why) from None
        except RayActorError as err:
            why = f"it died ({type(err).__name__}); Ray restarts it"
            self._lost_worker(why)
            raise WorkerUnavailable(why) from None
        results = self.service.answer(probs, ran, compute_ms, ks, switch_ms, asked=degree)
        self._degrees.inc(tags={"degree": str(ran)})
        self._batch_sizes.observe(len(ks))
        for result, arrival in zip(results, arrivals):
            result["queue_ms"] = round((start - arrival) * 1000, 3)
        return results


def spawn_worker(config: ServeConfig):
    """A :class:`~tocom.serve.service.ModelWorker` actor for a replica, restarted by Ray when its
    process dies (up to ``WORKER_RESTARTS`` times).

    Calls in flight when it dies fail rather than run again (``max_task_retries=0``): their
    requests are answered 503 at once. A restarted worker takes its calibration from the cache.
    """
    need = worker_resources(config)
    worker = ray.remote(ModelWorker).options(num_cpus=need["CPU"], num_gpus=need.get("GPU", 0),
                                             max_restarts=WORKER_RESTARTS, max_task_retries=0)
    return worker.remote(config)


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
