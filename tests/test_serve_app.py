"""A real Ray Serve deployment of a tiny random-weight ViT with a plugin, on loopback.

One Ray start-up for the module; skipped when Ray Serve (``tocom[serve]``) is not installed.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_vit
from PIL import Image
from test_compensator import random_plugin

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'tocom[serve]')")
pytestmark = pytest.mark.serve

NAME = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4)
CLASSES = ["ant", "bee", "cat", "dog", "eel"]
MAX_ONGOING = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(fmt: str = "PNG", size=(45, 30), mode: str = "RGBA", seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], len(mode)), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    from tocom.models.loading import save_model
    from tocom.serve.app import build_app, start_serve
    from tocom.serve.service import ServeConfig

    tmp = tmp_path_factory.mktemp("serve")
    os.environ["TOCOM_CACHE"] = str(tmp / "cache")  # inherited by the local Ray's workers
    checkpoint = save_model(tiny_vit(), tmp / "tiny.safetensors", NAME, KWARGS,
                            metadata={"classes": json.dumps(CLASSES)})
    plugin = random_plugin(tiny_vit(), groups=4)
    plugin.save(tmp / "plugin.tocom.safetensors")
    port = free_port()
    # Batches wait 100 ms to fill up to 8 but a replica holds only 4 requests: a burst piles up.
    # (Ray's router queue, max_queued, counts requests while it picks a replica: a burst of 32
    # past a small one gets Ray's own 503, which has no Retry-After.)
    config = ServeConfig(model=NAME, checkpoint=str(checkpoint), plugin=str(tmp / "plugin.tocom.safetensors"),
                         degrees=(0, 2, 4), slo_ms=2000, max_batch=8, batch_wait_ms=100,
                         max_ongoing=MAX_ONGOING, max_queued=64, replica_cpus=0.5, threads=1,
                         max_body_mb=0.05, port=port, trust_request_start=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start_serve("127.0.0.1", port)
        serve.run(build_app(config), name="tiny", route_prefix="/")
        yield {"port": port, "config": config}
    finally:
        serve.shutdown()
        ray.shutdown()


def request(port: int, method: str, path: str, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def reference_probs(config, data: bytes, degree: int) -> torch.Tensor:
    """What the service should answer, computed here with the public API."""
    import tocom
    from tocom.compensator import Compensator
    from tocom.finetuned import load_model
    from tocom.serve.images import decode_image

    model = load_model(NAME, config.checkpoint).eval()
    tocom.attach(model, Compensator.load(config.plugin), source=0)
    tocom.set_degree(model, degree)
    from tocom.data import eval_transform

    x = eval_transform(model)(decode_image(data))
    with torch.no_grad():
        return model(x[None]).softmax(-1)[0]


def check_answer(config, data: bytes, answer: dict, k: int = 5) -> None:
    fields = {"predictions", "degree", "gflops", "queue_ms", "compute_ms", "total_ms", "batch_size"}
    assert set(answer) >= fields
    assert answer["degree"] in (0, 2, 4) and answer["gflops"] > 0
    assert answer["queue_ms"] >= 0 and answer["compute_ms"] > 0 and answer["total_ms"] >= answer["compute_ms"]
    expected = reference_probs(config, data, answer["degree"])
    top = expected.topk(k)
    assert [p["index"] for p in answer["predictions"]] == top.indices.tolist()
    assert [p["label"] for p in answer["predictions"]] == [CLASSES[i] for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([p["probability"] for p in answer["predictions"]]),
                               top.values, rtol=0, atol=1e-4)


def test_classify_answers_documented_fields(service):
    port, config = service["port"], service["config"]
    data = image_bytes("JPEG", size=(300, 200), mode="RGB")
    status, _, body = request(port, "POST", "/v1/classify?k=3", data)
    assert status == 200, body
    check_answer(config, data, json.loads(body), k=3)
    status, _, body = request(port, "POST", "/v1/classify", image_bytes("WEBP", mode="RGB"))
    assert status == 200 and len(json.loads(body)["predictions"]) == 5


def test_time_before_the_replica_counts_when_a_front_end_stamps_it(service):
    import time

    port = service["port"]
    data = image_bytes("PNG", mode="RGB")
    stamp = {"X-Request-Start": f"t={time.time() - 1.5:.3f}"}  # 1.5 s in a front end's queue
    status, _, body = request(port, "POST", "/v1/classify", data, stamp)
    answer = json.loads(body)
    assert status == 200 and answer["upstream_ms"] >= 1500 and answer["total_ms"] >= answer["upstream_ms"]
    assert answer["queue_ms"] >= 1500  # the request's wait, as the degree controller sees it
    # 2.5 s already spent of the 2 s SLO: refused at once rather than answered late
    late = {"X-Request-Start": str(int((time.time() - 2.5) * 1000))}  # Heroku's milliseconds
    status, headers, body = request(port, "POST", "/v1/classify", data, late)
    assert status == 503 and "retry-after" in headers and b"SLO" in body
    status, _, body = request(port, "POST", "/v1/classify", data, {"X-Request-Start": "t=yesterday"})
    assert status == 200 and json.loads(body)["upstream_ms"] == 0  # an unreadable stamp is ignored


def test_health_info_and_unknown_routes(service):
    port, config = service["port"], service["config"]
    assert request(port, "GET", "/healthz")[:1] == (200,)
    status, _, body = request(port, "GET", "/v1/info")
    info = json.loads(body)
    assert status == 200 and info["degrees"] == [0, 2, 4] and info["slo_ms"] == 2000
    assert set(info["latency_ms"]) == {"0", "2", "4"} and info["classes"] == CLASSES
    # names and hashes, not where the files lie
    assert info["checkpoint"]["name"] == "tiny.safetensors" and len(info["checkpoint"]["sha256"]) == 64
    assert info["plugin"]["name"] == "plugin.tocom.safetensors"
    assert os.path.dirname(config.checkpoint) not in body.decode()
    assert request(port, "GET", "/nowhere")[0] == 404
    status, headers, _ = request(port, "GET", "/v1/classify")
    assert status == 405 and headers["allow"] == "POST"


def test_bad_bodies_get_400_and_413(service):
    port = service["port"]
    status, _, body = request(port, "POST", "/v1/classify", b"this is not an image")
    assert status == 400 and "not a decodable image" in json.loads(body)["error"]
    status, _, body = request(port, "POST", "/v1/classify", image_bytes()[:60])  # truncated PNG
    assert status == 400, body
    assert request(port, "POST", "/v1/classify?k=0", image_bytes())[0] == 400
    # digits that str.isdigit() takes but int() does not, and a k that int() would take long over
    for query in ("k=%C2%B2", "k=%D9%A3", "k=" + "9" * 5000):
        status, _, body = request(port, "POST", f"/v1/classify?{query}", image_bytes())
        assert status == 400 and json.loads(body)["error"].startswith("k must be an integer from 1 to 5")
    big = os.urandom(80 * 1024)  # over the 50 KB limit of this service
    status, _, body = request(port, "POST", "/v1/classify", big)
    assert status == 413 and "limit" in json.loads(body)["error"]
    # An iterable body goes out chunked, with no Content-Length to trust.
    chunked = (big[i:i + 8192] for i in range(0, len(big), 8192))
    assert request(port, "POST", "/v1/classify", chunked)[0] == 413


def test_bad_requests_do_not_fail_good_ones_beside_them(service):
    port, config = service["port"], service["config"]
    good = [image_bytes(seed=i) for i in range(2)]
    bodies = [good[0], b"GIF89a nonsense", good[1], b""]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: request(port, "POST", "/v1/classify", b), bodies))
    assert [r[0] for r in results] == [200, 400, 200, 400]
    for data, (_, _, body) in zip(good, (results[0], results[2])):
        check_answer(config, data, json.loads(body))


def test_burst_past_the_limit_gets_503_then_service_recovers(service):
    port, config = service["port"], service["config"]
    data = image_bytes(seed=7)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: request(port, "POST", "/v1/classify", data), range(32)))
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert MAX_ONGOING <= statuses.count(200) < 32 and statuses.count(503) > 0, statuses
    for status, headers, body in results:
        if status == 503:
            assert int(headers.get("retry-after", 0)) >= 1, body
            assert "overloaded" in json.loads(body)["error"]
        else:
            check_answer(config, data, json.loads(body))
    status, _, body = request(port, "POST", "/v1/classify", data)
    assert status == 200
    check_answer(config, data, json.loads(body))


def test_deployment_options_turn_on_autoscaling_past_replicas():
    from tocom.serve.app import ROUTER_SLACK, deployment_options
    from tocom.serve.service import ServeConfig

    fixed = deployment_options(ServeConfig(model=NAME, replicas=2, max_ongoing=10))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 10 + ROUTER_SLACK
    scaled = deployment_options(ServeConfig(model=NAME, replicas=1, max_replicas=4))
    assert "num_replicas" not in scaled
    autoscaling = scaled["autoscaling_config"]
    assert autoscaling["min_replicas"] == 1 and autoscaling["max_replicas"] == 4
    # each replica and its model worker reserve the replica's CPUs together, on one node
    options = deployment_options(ServeConfig(model=NAME, replica_cpus=2.0))
    assert options["placement_group_bundles"] == [{"CPU": 0.2}, {"CPU": 1.8}]
    assert options["ray_actor_options"]["num_cpus"] == 0.2
    assert options["placement_group_strategy"] == "STRICT_PACK"
    cuda = deployment_options(ServeConfig(model=NAME, replica_cpus=1.0, device="cuda"))
    assert cuda["placement_group_bundles"] == [{"CPU": 0.1}, {"CPU": 0.9, "GPU": 1}]
