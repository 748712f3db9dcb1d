"""A replica's HTTP edge and its answers to faults, in this process: no Ray cluster, no sockets.

The replica (:class:`tocom.serve.app.TocomReplica`) gets ASGI requests built here and a model
worker running in this process (a tiny random-weight ViT with a plugin), whose calls can be made
to fail as a dead actor's do, or never to answer, as a hung one's.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from dataclasses import replace

import pytest
import torch
from conftest import random_plugin, tiny_vit
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFile
from starlette.requests import Request

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'tocom[serve]')")

from ray.exceptions import ActorDiedError  # noqa: E402

from tocom.serve import edge  # noqa: E402
from tocom.serve.app import WORKER_RETRY_AFTER_S, TocomReplica  # noqa: E402
from tocom.serve.edge import BadRequest, bearer_matches, load_token, parse_content_length, parse_k  # noqa: E402
from tocom.serve.images import BadImage, decode_image  # noqa: E402
from tocom.serve.service import ModelWorker, ServeConfig  # noqa: E402

NAME = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=5)
TOKEN = "s3cret-Token_0123456789"
LIMIT_S = 30  # no test here may take longer, whatever the replica does


def png(seed: int = 0, size=(45, 30)) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, "PNG")
    return buf.getvalue()


class Remote:
    """One method of the worker, called as a Ray actor's is: ``.remote(...)`` starts it at once."""

    def __init__(self, worker: LocalWorker, name: str):
        self.worker, self.name = worker, name

    def remote(self, *args):
        loop = asyncio.get_running_loop()
        if self.worker.fault == "hung":
            return loop.create_future()  # never answered
        if self.worker.fault == "dead":
            died = loop.create_future()
            died.set_exception(ActorDiedError())
            return died
        return asyncio.ensure_future(asyncio.to_thread(getattr(self.worker.model, self.name), *args))


class LocalWorker:
    """A :class:`ModelWorker` in this process behind an actor-like handle, with faults to order."""

    def __init__(self, model: ModelWorker):
        self.model = model
        self.fault: str | None = None  # None, "dead" or "hung"
        self.describe, self.run, self.ping = (Remote(self, n) for n in ("describe", "run", "ping"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tocom.models.loading import save_model

    tmp = tmp_path_factory.mktemp("edge")
    checkpoint = save_model(tiny_vit(), tmp / "tiny.safetensors", NAME, KWARGS)
    random_plugin(tiny_vit(), groups=4).save(tmp / "plugin.tocom.safetensors")
    (tmp / "classes.txt").write_text("ant\nbee\ncat\ndog\neel\n")
    return {"dir": tmp, "checkpoint": str(checkpoint), "plugin": str(tmp / "plugin.tocom.safetensors"),
            "classes": str(tmp / "classes.txt")}


@pytest.fixture(scope="module")
def base(files):
    mp = pytest.MonkeyPatch()
    mp.setenv("TOCOM_CACHE", str(files["dir"] / "cache"))
    config = ServeConfig(model=NAME, checkpoint=files["checkpoint"], plugin=files["plugin"],
                         classes=files["classes"], degrees=(0, 2, 4), slo_ms=2000, max_batch=4,
                         batch_wait_ms=5, max_ongoing=4, threads=1, max_body_mb=0.05, body_timeout_s=0.5)
    yield config, ModelWorker(config)
    mp.undo()


def make_request(method: str, path: str, body: bytes = b"", query: str = "", headers: dict | None = None,
                 stall: bool = False) -> Request:
    """An ASGI request; ``stall``: the client sends a first piece of the body and then nothing."""
    headers = {"content-length": str(len(body)), **(headers or {})}
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": query.encode(),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 50000)}
    messages = [{"type": "http.request", "body": body[:10] if stall else body, "more_body": stall}]

    async def receive():
        if messages:
            return messages.pop(0)
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    return Request(scope, receive)


async def start_replica(config: ServeConfig, worker) -> TocomReplica:
    replica = TocomReplica.__new__(TocomReplica)  # its __init__ is async, as Ray Serve allows
    await TocomReplica.__init__(replica, config, worker)
    return replica


async def call(replica: TocomReplica, method: str, path: str, **kwargs) -> tuple[int, dict, dict]:
    response = await replica(make_request(method, path, **kwargs))
    return response.status_code, dict(response.headers), json.loads(response.body)


def run(test, config: ServeConfig, model: ModelWorker, worker: LocalWorker | None = None):
    """Run ``await test(replica, worker)`` on a fresh replica, bounded in time."""
    worker = worker or LocalWorker(model)

    async def main():
        replica = await start_replica(config, worker)
        try:
            return await asyncio.wait_for(test(replica, worker), LIMIT_S)
        finally:
            replica._decoder.shutdown(wait=False, cancel_futures=True)

    return asyncio.run(main())


# --- item 4: the HTTP edge -------------------------------------------------------------------

@pytest.mark.parametrize("k", ["²", "٣", "9" * 5000, "+3", " 3", "3 ", "3.0", "", "0", "6", "-1", "0x3"])
def test_k_other_than_ascii_digits_in_range_is_one_clear_400(k):
    with pytest.raises(BadRequest, match=r"^k must be an integer from 1 to 5, got '"):
        parse_k(k, 5, 5)


def test_k_in_range_and_its_default():
    assert parse_k("3", 5, 5) == 3 and parse_k("005", 5, 5) == 5
    assert parse_k(None, 5, 5) == 5 and parse_k(None, 5, 2) == 2  # the default fits a small head


@given(st.text(max_size=12))
def test_any_k_parses_or_gives_bad_request(text):
    try:
        k = parse_k(text, 5, 1000)
    except BadRequest as err:
        assert len(str(err)) < 300  # a long k is not quoted back whole
        return
    assert 1 <= k <= 1000 and text.isascii() and text.isdigit()


def test_content_length_is_parsed_strictly():
    assert parse_content_length(None) is None and parse_content_length("0012") == 12
    for bad in ("²", "١٢", "12a", "-1", "1e3", "9" * 19, ""):
        with pytest.raises(BadRequest, match="Content-Length must be a byte count"):
            parse_content_length(bad)


def test_bad_k_and_content_length_get_400_not_500(base):
    config, model = base

    async def test(replica, _):
        for query in ("k=%C2%B2", "k=" + "9" * 5000, "k=6"):  # ² percent-encoded, as a client sends it
            status, _, body = await call(replica, "POST", "/v1/classify", body=png(), query=query)
            assert status == 400 and body["error"].startswith("k must be an integer from 1 to 5"), body
            assert len(body["error"]) < 100
        status, _, body = await call(replica, "POST", "/v1/classify", body=png(),
                                     headers={"content-length": "²"})
        assert status == 400 and "Content-Length" in body["error"]
        status, _, body = await call(replica, "POST", "/v1/classify", body=png(), query="k=2")
        assert status == 200 and len(body["predictions"]) == 2

    run(test, config, model)


def test_request_start_is_ignored_unless_trusted(base):
    config, model = base
    old = {"x-request-start": f"t={time.time() - 1.5:.3f}"}  # 1.5 s "in a front end's queue"

    async def test(replica, _):
        status, _, body = await call(replica, "POST", "/v1/classify", body=png(), headers=old)
        return status, body

    status, body = run(test, config, model)
    assert status == 200 and body["upstream_ms"] == 0 and body["total_ms"] < 1500
    status, body = run(test, replace(config, trust_request_start=True), model)
    assert status == 200 and body["upstream_ms"] >= 1500


def test_token_is_needed_on_every_route_but_healthz(base, monkeypatch):
    config, model = base
    compared = []
    real = edge.hmac.compare_digest
    monkeypatch.setattr(edge.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    secured = replace(config, token_sha256=edge.token_digest(TOKEN))

    async def test(replica, _):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                        {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"}):
            for method, path in (("POST", "/v1/classify"), ("GET", "/v1/info"), ("GET", "/nowhere")):
                status, got, body = await call(replica, method, path, body=png(), headers=headers)
                assert status == 401 and got["www-authenticate"].startswith("Bearer"), (headers, path)
                assert "Authorization: Bearer" in body["error"] and TOKEN not in json.dumps(body)
        assert (await call(replica, "GET", "/healthz"))[0] == 200  # load balancers probe it bare
        ok = {"authorization": f"bearer  {TOKEN} "}  # the scheme is case-insensitive
        status, _, body = await call(replica, "POST", "/v1/classify", body=png(), headers=ok)
        assert status == 200 and body["predictions"]
        status, _, info = await call(replica, "GET", "/v1/info", headers=ok)
        assert status == 200 and info["config"]["auth"] is True
        text = json.dumps(info)
        assert TOKEN not in text and edge.token_digest(TOKEN) not in text

    run(test, secured, model)
    assert compared  # the comparison went through hmac.compare_digest
    assert TOKEN not in repr(secured)


def test_token_comes_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\nignored\n")
    assert load_token(str(path), {}) == TOKEN
    assert load_token(None, {edge.TOKEN_ENV: f" {TOKEN}\n"}) == TOKEN
    assert load_token(str(path), {edge.TOKEN_ENV: "other"}) == TOKEN  # the flag wins
    assert load_token(None, {}) is None
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_token(str(path), {})
    path.write_text("two words\n")
    with pytest.raises(ValueError, match="cannot send in a header") as err:
        load_token(str(path), {})
    assert "two words" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read the token file"):
        load_token(str(tmp_path / "absent"), {})
    digest = edge.token_digest(TOKEN)
    assert bearer_matches(f"Bearer {TOKEN}", digest) and not bearer_matches(None, digest)
    assert not bearer_matches("Bearer é", digest)


def test_info_shows_file_names_and_hashes_not_paths(base, files):
    config, model = base

    async def test(replica, _):
        return (await call(replica, "GET", "/v1/info"))[2]

    info = run(test, config, model)
    for key, name in (("checkpoint", "tiny.safetensors"), ("plugin", "plugin.tocom.safetensors"),
                      ("classes_file", "classes.txt")):
        path = files["checkpoint" if key == "checkpoint" else "plugin" if key == "plugin" else "classes"]
        with open(path, "rb") as f:
            assert info[key] == {"name": name, "sha256": hashlib.sha256(f.read()).hexdigest()}
    assert info["config"]["checkpoint"] == "tiny.safetensors"
    assert str(files["dir"]) not in json.dumps(info)  # no absolute path, not even the cache's


# --- item 3: serving under faults --------------------------------------------------------------

def test_a_slow_upload_gets_408_and_holds_no_place(base):
    config, model = base

    async def test(replica, _):
        stalled = [asyncio.ensure_future(call(replica, "POST", "/v1/classify", body=png(), stall=True))
                   for _ in range(config.max_ongoing + 2)]
        await asyncio.sleep(0.05)
        status, _, body = await call(replica, "POST", "/v1/classify", body=png())
        assert status == 200, body  # the stalled uploads hold none of the replica's places
        start = time.perf_counter()
        for status, headers, body in await asyncio.gather(*stalled):
            assert status == 408 and "did not arrive within 0.5 s" in body["error"]
            assert headers["connection"] == "close"
        assert time.perf_counter() - start < config.body_timeout_s + 2

    run(test, config, model)


def test_a_request_past_its_deadline_gets_504(base):
    config, model = base
    assert ServeConfig(model=NAME, slo_ms=200).deadline_ms == 2000  # the floor
    assert ServeConfig(model=NAME, slo_ms=1000).deadline_ms == 4000  # a few SLOs
    assert ServeConfig(model=NAME, request_timeout_ms=300).deadline_ms == 300

    async def test(replica, _):
        real = replica.service.preprocess
        replica.service.preprocess = lambda body: time.sleep(1.0) or real(body)
        start = time.perf_counter()
        status, _, body = await call(replica, "POST", "/v1/classify", body=png())
        assert status == 504 and "deadline" in body["error"], body
        assert time.perf_counter() - start < 0.9
        assert len(replica._held) == 0  # the place it held is free again

    run(test, replace(config, request_timeout_ms=300), model)


def test_a_dead_worker_gives_503_with_retry_after_then_recovers(base):
    config, model = base

    async def test(replica, worker):
        worker.fault = "dead"
        for _ in range(2):  # the batch that finds it dead, then one refused at once
            status, headers, body = await call(replica, "POST", "/v1/classify", body=png())
            assert status == 503 and int(headers["retry-after"]) == WORKER_RETRY_AFTER_S, body
            assert "model worker unavailable" in body["error"] and "died" in body["error"]
        status, headers, body = await call(replica, "GET", "/healthz")
        assert status == 503 and "retry-after" in headers, body
        worker.fault = None  # Ray restarted it
        while replica._worker_down is not None:  # the replica pings it twice a second
            await asyncio.sleep(0.1)
        assert (await call(replica, "GET", "/healthz"))[0] == 200
        assert (await call(replica, "POST", "/v1/classify", body=png()))[0] == 200

    run(test, config, model)


def test_a_hung_worker_gives_503_not_a_hang(base):
    config, model = base

    async def test(replica, worker):
        worker.fault = "hung"
        timeout = replica.worker_timeout_s()
        assert timeout == 1.0  # the floor: a tiny model's batches take milliseconds
        start = time.perf_counter()
        status, headers, body = await call(replica, "POST", "/v1/classify", body=png())
        assert status == 503 and "retry-after" in headers and "did not answer" in body["error"], body
        assert time.perf_counter() - start < timeout + 1
        start = time.perf_counter()
        status, _, body = await call(replica, "GET", "/healthz")
        assert status == 503 and "did not answer a ping" in body["error"]
        assert time.perf_counter() - start < timeout + 1
        with pytest.raises(RuntimeError, match="unavailable"):  # Ray Serve's check: replace the replica
            await replica.check_health()
        worker.fault = None
        while replica._worker_down is not None:
            await asyncio.sleep(0.1)
        assert (await call(replica, "POST", "/v1/classify", body=png()))[0] == 200

    run(test, config, model)


def test_an_unexpected_error_is_a_json_500_without_traceback(base, caplog):
    config, model = base

    async def test(replica, _):
        def broken(*args, **kwargs):
            raise RuntimeError("internal detail /secret/path")

        replica.service.answer = broken
        status, _, body = await call(replica, "POST", "/v1/classify", body=png())
        assert status == 500 and body == {"error": "internal error; the replica's log has the details"}
        assert (await call(replica, "GET", "/healthz"))[0] == 200  # the replica itself goes on

    with caplog.at_level("ERROR", logger="ray.serve"):
        run(test, config, model)
    assert "internal detail /secret/path" in caplog.text  # the operator sees it; the client does not


def test_decoding_is_bounded_by_decode_threads(base):
    config, model = base
    lock, now, most = threading.Lock(), [0], [0]

    async def test(replica, _):
        real = replica.service.preprocess

        def counting(body):
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            time.sleep(0.1)
            with lock:
                now[0] -= 1
            return real(body)

        replica.service.preprocess = counting
        answers = await asyncio.gather(*(call(replica, "POST", "/v1/classify", body=png(i))
                                         for i in range(6)))
        assert [a[0] for a in answers] == [200] * 6

    run(test, replace(config, decode_threads=2, max_ongoing=8), model)
    assert most[0] == 2


def test_the_pixel_cap_is_configurable_and_checked_before_decoding(base, monkeypatch):
    config, model = base
    data = png(size=(45, 30))  # 1350 pixels
    assert decode_image(data).size == (45, 30)

    def no_decoding(self):
        raise AssertionError("decoded pixels of an image over the cap")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        with pytest.raises(BadImage, match="over the 1000 pixel limit"):
            decode_image(data, max_pixels=1000)

    async def test(replica, _):
        return await call(replica, "POST", "/v1/classify", body=data)

    status, _, body = run(test, replace(config, max_pixels=1000), model)
    assert status == 400 and "pixel limit" in body["error"]


def test_a_failed_switch_keeps_the_previous_degree_and_says_so(base, monkeypatch, caplog):
    from tocom.serve import elastic as elastic_module

    config, model = base
    x = torch.rand(2, 3, 32, 32)
    elastic = model.elastic
    at0 = elastic.run(x, 0)
    real = elastic_module.set_degree

    def failing(m, degree):
        raise RuntimeError("injected fold failure")

    monkeypatch.setattr(elastic_module, "set_degree", failing)
    with caplog.at_level("ERROR", logger="tocom.serve.elastic"):
        probs, _, ran = elastic.run_timed(x, 4)
        _, _, again = elastic.run_timed(x, 4)
    assert ran == again == 0 and elastic.degree == 0 and elastic.switch_failures == 2
    torch.testing.assert_close(probs, at0, rtol=0, atol=0)  # the previous degree's weights, whole
    logged = [r for r in caplog.records if "switching from degree 0 to 4 failed" in r.getMessage()]
    assert len(logged) == 1 and "injected fold failure" in caplog.text  # once a minute, not per batch

    async def test(replica, _):
        replica.service.choose = lambda *args: 4
        status, _, body = await call(replica, "POST", "/v1/classify", body=png())
        assert status == 200 and body["degree"] == 0  # answered, at the degree it really ran at
        info = (await call(replica, "GET", "/v1/info"))[2]
        assert info["switch_failures"] == 1 and info["degree"] == 0

    run(test, config, model)
    monkeypatch.setattr(elastic_module, "set_degree", real)
    assert elastic.run_timed(x, 4)[2] == 4  # the next switch that works goes through
    elastic.switch(0)


def test_a_restarted_worker_reuses_the_calibration(base, monkeypatch):
    from tocom.serve import service as service_module

    config, _ = base
    assert service_module.restarted_actor() is False  # not a Ray actor
    monkeypatch.setattr(service_module, "restarted_actor", lambda: True)
    worker = ModelWorker(replace(config, recalibrate=True))
    assert worker.describe()["calibration"]["cached"] is True  # not measured again
