"""A real Ray Serve deployment under faults, on loopback: a hung and a killed model worker, slow
uploads, and the edge's token and untrusted stamps as they pass through Ray's HTTP proxy.

One Ray start-up for the module, a tiny random-weight ViT with a plugin; skipped without Ray Serve.
The worker is made to hang with SIGSTOP and to die with SIGKILL: what a stuck forward and a
crashed process look like from outside.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import random_plugin, tiny_vit
from test_serve_app import KWARGS, NAME, free_port, image_bytes, request

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'tocom[serve]')")
pytestmark = pytest.mark.serve

TOKEN = "faults-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    from tocom.models.loading import save_model
    from tocom.serve.app import build_app, start_serve
    from tocom.serve.edge import token_digest
    from tocom.serve.service import ServeConfig

    tmp = tmp_path_factory.mktemp("faults")
    os.environ["TOCOM_CACHE"] = str(tmp / "cache")  # inherited by the local Ray's workers
    checkpoint = save_model(tiny_vit(), tmp / "tiny.safetensors", NAME, KWARGS)
    random_plugin(tiny_vit(), groups=4).save(tmp / "plugin.tocom.safetensors")
    port = free_port()
    # --recalibrate: the first start measures; a restarted worker must take the cache instead
    config = ServeConfig(model=NAME, checkpoint=str(checkpoint), plugin=str(tmp / "plugin.tocom.safetensors"),
                         degrees=(0, 2, 4), slo_ms=1000, max_batch=4, batch_wait_ms=5, max_ongoing=4,
                         replica_cpus=0.5, threads=1, body_timeout_s=BODY_TIMEOUT_S, recalibrate=True,
                         token_sha256=token_digest(TOKEN), port=port)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start_serve("127.0.0.1", port)
        serve.run(build_app(config), name="faults", route_prefix="/")
        yield {"port": port, "cache": tmp / "cache"}
    finally:
        serve.shutdown()
        ray.shutdown()


def worker_pid() -> int:
    """The model worker's process: titled ``ray::ModelWorker``, a child of this test's raylet."""
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ray::ModelWorker" in (entry / "cmdline").read_bytes() \
                    and parent(parent(int(entry.name))) == os.getpid():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # a process that ended while we looked
    assert len(found) == 1, f"expected one model worker of this test's Ray, found {found}"
    return found[0]


def wait_until_healthy(port: int, limit_s: float = 60) -> list[int]:
    """Poll /healthz until 200; the statuses seen on the way."""
    seen, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = request(port, "GET", "/healthz")[0]
        seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"not healthy again within {limit_s} s: {seen[-5:]}")


def classify(port: int, **kwargs):
    return request(port, "POST", "/v1/classify", image_bytes(), {**AUTH, **kwargs})


def test_token_and_untrusted_stamps_through_the_proxy(service):
    port = service["port"]
    status, headers, body = request(port, "POST", "/v1/classify", image_bytes())
    assert status == 401 and "bearer" in headers["www-authenticate"].lower() and b"Authorization" in body
    assert request(port, "GET", "/v1/info", headers={"Authorization": "Bearer nope"})[0] == 401
    assert request(port, "GET", "/healthz")[0] == 200
    status, _, body = classify(port)
    assert status == 200, body
    # without --trust-request-start a stamp of 1.5 s (past most of the 1 s SLO) changes nothing
    status, _, body = classify(port, **{"X-Request-Start": f"t={time.time() - 1.5:.3f}"})
    assert status == 200 and json.loads(body)["upstream_ms"] == 0


def test_slow_uploads_get_408_and_others_are_served_meanwhile(service):
    port = service["port"]
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Length: 1000\r\n\r\n").encode() + b"\x89PNG\r\n\x1a\n"
    stalled = []
    try:
        for _ in range(6):  # more than the replica's 4 places
            s = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 20)
            s.sendall(head)
            stalled.append(s)
        time.sleep(0.3)
        status, _, body = classify(port)
        assert status == 200, body  # before the fix: 503, every place held by a stalled upload
        start = time.monotonic()
        for s in stalled:
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - start < BODY_TIMEOUT_S + 10
    finally:
        for s in stalled:
            s.close()


def test_a_hung_worker_gives_503_and_healthz_says_so(service):
    port = service["port"]
    pid = worker_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        status, headers, body = classify(port)
        assert status == 503 and int(headers["retry-after"]) >= 1, body
        assert b"model worker unavailable" in body and time.monotonic() - start < 10
        status, headers, body = request(port, "GET", "/healthz")
        assert status == 503 and "retry-after" in headers, body
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until_healthy(port)
    assert classify(port)[0] == 200


def test_a_killed_worker_gives_503s_then_ray_restarts_it_with_its_calibration(service):
    port, cache = service["port"], service["cache"]
    tables = {p: p.stat().st_mtime_ns for p in cache.glob("latency/*.json")}
    assert tables  # measured at start-up (--recalibrate)
    pid = worker_pid()
    os.kill(pid, signal.SIGSTOP)  # so that a batch is surely in it when it dies
    answers = []
    sender = threading.Thread(target=lambda: answers.append(classify(port)))
    sender.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    sender.join(30)
    status, headers, body = answers[0]
    assert status == 503 and "retry-after" in headers, body
    statuses, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        status = classify(port)[0]
        statuses.append(status)
        if status == 200:
            break
        time.sleep(0.5)
    assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses
    assert worker_pid() != pid  # Ray restarted it (max_restarts)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("latency/*.json")} == tables  # not measured again
    status, _, body = request(port, "GET", "/v1/info", headers=AUTH)
    assert status == 200 and json.loads(body)["degrees"] == [0, 2, 4]
