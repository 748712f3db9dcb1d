"""Fault injection against a real ``tocom serve``: worker kills, stalled uploads, malformed requests.

    python benchmarks/serve_faults.py --checkpoint runs/count_r0.safetensors --images runs/count/images/test

Starts ``tocom serve`` at a fixed r = 0 on loopback, measures its capacity (closed loop), then:

1. ``kills``: ``--seconds`` of Poisson load at that capacity, while the model worker is killed
   (SIGKILL) ``--kills`` times, evenly spaced;
2. ``stalled``: ``--stalled`` connections that send headers and then a byte a second, beside
   Poisson load at half the capacity;
3. ``malformed``: bad ``k``, bodies that are not images, a lying Content-Length, wrong methods,
   unknown paths.

Per phase: the answer codes, the longest wait, and after each kill the seconds until a request
sent after it is answered 200. Every request has a client deadline (``--deadline-s``); one that
passes it counts as "no answer". Loopback only, bounded in requests and time, stops by itself
(the service with it). Writes ``OUT.json`` and ``OUT.md`` (default ``docs/results/serve-faults``).
``--smoke`` uses a tiny random ViT and short phases (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_service_args(p: argparse.ArgumentParser, seconds: float, max_requests: int) -> None:
    """The options every fault benchmark shares: what to serve, what to send, the bounds."""
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--checkpoint", help="the checkpoint to serve (required unless --smoke)")
    p.add_argument("--images", help="a folder of images to send (searched recursively)")
    p.add_argument("--seconds", type=float, default=seconds, help="length of the loaded phase(s)")
    p.add_argument("--deadline-s", type=float, default=30.0, help="client deadline per request")
    p.add_argument("--max-requests", type=int, default=max_requests, help="cap per phase")
    p.add_argument("--slo-ms", type=float, default=500.0)
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--out", help="output path without suffix")
    p.add_argument("--smoke", action="store_true", help="a tiny random ViT and short phases")


def checked_args(p: argparse.ArgumentParser, name: str) -> argparse.Namespace:
    """Parsed options, with --checkpoint and --images required unless --smoke, and the output path
    (``docs/results/NAME``, or ``runs/..._smoke`` for a smoke run)."""
    args = p.parse_args()
    if not args.smoke and (not args.checkpoint or not args.images):
        p.error("--checkpoint and --images are required (or pass --smoke)")
    smoke = f"runs/{name.replace('-', '_')}_smoke/{name}"
    args.out = Path(args.out or ROOT / (smoke if args.smoke else f"docs/results/{name}"))
    return args


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(p, seconds=60.0, max_requests=4000)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--stalled", type=int, default=40, help="slow-upload connections")
    p.add_argument("--stall-seconds", type=float, default=15.0)
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    args = checked_args(p, "serve-faults")
    if args.smoke:
        args.seconds, args.stall_seconds, args.stalled = min(args.seconds, 20.0), 4.0, min(args.stalled, 8)
        args.kills = min(args.kills, 1)  # a restart takes seconds: one kill in the short phase
    return args


def smoke_checkpoint(folder: Path) -> tuple[str, str]:
    import timm
    import torch

    from tocom.models.loading import save_model

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=10)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    return "vit_tiny_patch16_224", str(save_model(model, folder / "tiny.safetensors", "vit_tiny_patch16_224",
                                                  kwargs))


def image_bodies(folder: str | None, n: int = 200) -> list[bytes]:
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise SystemExit(f"no .png or .jpg images under {folder}")
        return [p.read_bytes() for p in files[:n]]
    import io

    import numpy as np
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    for _ in range(32):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids() -> list[int]:
    """Processes of the model worker actor (Ray titles them ``ray::ModelWorker...``)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if "ray::ModelWorker" in line and "ps -eo" not in line]


def get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


async def post(session, url: str, body: bytes, deadline_s: float) -> tuple[int, float, str | None]:
    """Status (-1: no answer within the deadline, 0: connection failed), seconds waited, and the
    Ray node that answered (the replica's ``x-tocom-node`` header)."""
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=deadline_s)) as response:
            await response.read()
            return response.status, time.perf_counter() - start, response.headers.get("x-tocom-node")
    except asyncio.TimeoutError:
        return -1, time.perf_counter() - start, None
    except aiohttp.ClientError:
        return 0, time.perf_counter() - start, None


async def capacity(url: str, bodies: list[bytes], seconds: float = 8.0, clients: int = 8) -> float:
    import aiohttp

    done, stop = 0, time.perf_counter() + seconds

    async def client(i: int, session) -> None:
        nonlocal done
        k = i
        while time.perf_counter() < stop:
            status, _, _ = await post(session, url, bodies[k % len(bodies)], 30.0)
            done += status == 200
            k += clients
            if status == 503:
                await asyncio.sleep(0.2)

    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return done / (time.perf_counter() - start)


def kill_workers(what: str) -> dict:
    """SIGKILL every model worker process; what was killed, for the record."""
    pids = worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return {"pids": pids}


async def poisson(url: str, bodies: list[bytes], rate: float, seconds: float, cap: int, deadline_s: float,
                  seed: int, events: list[tuple[float, str]] | None = None, act=kill_workers) -> list[dict]:
    """Open-loop arrivals; ``events``: (seconds from start, name), each ``act(name)`` at its time."""
    import aiohttp

    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds and len(arrivals) < cap:
        arrivals.append(t)
        t += rng.expovariate(rate)
    records: list[dict] = []

    async def one(at: float, body: bytes, session) -> None:
        status, wait, node = await post(session, url, body, deadline_s)
        records.append({"sent": at, "status": status, "wait_s": wait, "node": node})

    async def inject(start: float) -> None:
        for at, what in events or ():
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            records.append({"event": what, "at": time.perf_counter() - start, **act(what)})

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        tasks = [asyncio.create_task(inject(start))]
        for i, at in enumerate(arrivals):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(at, bodies[i % len(bodies)], session)))
        await asyncio.gather(*tasks)
    return records


async def stalled_uploads(port: int, count: int, seconds: float) -> list[dict]:
    """Connections that declare a body and send it a byte a second; what each one is answered."""
    async def one() -> dict:
        start = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\n\r\n")
            await writer.drain()
            answer = b""
            while time.perf_counter() - start < seconds + 30:
                try:
                    answer = await asyncio.wait_for(reader.read(200), timeout=1.0)
                    break
                except asyncio.TimeoutError:
                    writer.write(b"x")
                    await writer.drain()
            writer.close()
            status = int(answer.split()[1]) if answer.startswith(b"HTTP/") else -1
        except (OSError, ValueError, IndexError):
            status = 0
        return {"status": status, "wait_s": time.perf_counter() - start}

    return await asyncio.gather(*(one() for _ in range(count)))


MALFORMED = [  # (method, path, body, headers)
    ("POST", "/v1/classify?k=%C2%B2", "image", {}), ("POST", "/v1/classify?k=" + "9" * 5000, "image", {}),
    ("POST", "/v1/classify?k=0", "image", {}), ("POST", "/v1/classify?k=-1", "image", {}),
    ("POST", "/v1/classify?k=abc", "image", {}), ("POST", "/v1/classify", "garbage", {}),
    ("POST", "/v1/classify", "empty", {}), ("POST", "/v1/classify", "truncated", {}),
    ("GET", "/v1/classify", "empty", {}), ("POST", "/healthz", "empty", {}), ("GET", "/nowhere", "empty", {}),
    ("POST", "/v1/classify", "image", {"X-Request-Start": "t=0"}),
    ("POST", "/v1/classify", "image", {"X-Request-Start": "t=nan"}),
]


def malformed(base: str, image: bytes) -> list[dict]:
    bodies = {"image": image, "garbage": os.urandom(512), "empty": b"", "truncated": image[: len(image) // 3]}
    out = []
    for method, path, body, headers in MALFORMED:
        request = urllib.request.Request(base + path, data=bodies[body] if method == "POST" else None,
                                         method=method, headers=headers)
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as err:
            status = err.code
        except OSError:
            status = 0
        out.append({"request": f"{method} {path[:40]} ({body})", "status": status,
                    "wait_s": time.perf_counter() - start})
    return out


def recovery(records: list[dict]) -> list[float | None]:
    """Per kill, seconds from it to the first 200 answer of a request sent after it."""
    kills = [r["at"] for r in records if r.get("event") == "kill"]
    answered = sorted((r["sent"] + r["wait_s"], r["sent"]) for r in records if r.get("status") == 200)
    return [next((end - at for end, sent in answered if sent >= at), None) for at in kills]


def summary(records: list[dict]) -> dict:
    requests = [r for r in records if "status" in r]
    codes = Counter(str(r["status"]) for r in requests)
    return {"requests": len(requests), "codes": dict(sorted(codes.items())),
            "longest_wait_s": round(max((r["wait_s"] for r in requests), default=0.0), 3),
            "answers_500": codes.get("500", 0), "no_answer": codes.get("-1", 0) + codes.get("0", 0)}


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    names = {"-1": "no answer in time", "0": "connection failed"}
    lines = ["# Fault injection against `tocom serve` (generated by `benchmarks/serve_faults.py`)", "",
             f"Model `{result['model']}`, fixed r = 0, capacity {result['capacity_rps']:.1f} req/s "
             f"(closed loop), client deadline {result['deadline_s']:.0f} s; commit {result['commit']}.", "",
             "| phase | requests | answers | longest wait (s) | 500s | no answer |",
             "|---|---|---|---|---|---|"]
    for phase in ("kills", "stalled_load", "stalled_uploads", "malformed"):
        s = result[phase]
        codes = ", ".join(f"{names.get(k, k)}: {v}" for k, v in s["codes"].items())
        lines.append(f"| {phase} | {s['requests']} | {codes} | {s['longest_wait_s']} | {s['answers_500']} | "
                     f"{s['no_answer']} |")
    rec = ", ".join("none" if r is None else f"{r:.1f} s" for r in result["recovery_s"])
    lines += ["", f"Worker kills: {result['kills_done']} (worker processes found: {result['kill_pids']}); "
              f"time until a request sent after each kill was answered 200: {rec}.", "",
              "| malformed request | status | wait (s) |", "|---|---|---|"]
    lines += [f"| `{m['request']}` | {m['status']} | {m['wait_s']:.2f} |" for m in result["malformed_detail"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    args = parse_args()
    tmp = tempfile.TemporaryDirectory()
    model, checkpoint = smoke_checkpoint(Path(tmp.name)) if args.smoke else (args.model, args.checkpoint)
    bodies = image_bodies(args.images)
    port = args.port or free_port()
    base, url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1/classify?k=1"
    cmd = [sys.executable, "-m", "tocom", "serve", model, "--checkpoint", checkpoint, "--fixed-degree", "0",
           "--port", str(port), "--max-batch", "8", "--slo-ms", str(args.slo_ms)]
    server = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        stop = time.time() + args.start_timeout_s
        while get(base + "/healthz") != 200:
            if server.poll() is not None or time.time() > stop:
                raise SystemExit(f"tocom serve did not come up: {server.stderr.read().decode()[-2000:]}")
            time.sleep(1.0)
        rate = asyncio.run(capacity(url, bodies))
        kill_at = [args.seconds * (i + 1) / (args.kills + 1) for i in range(args.kills)]
        kills = asyncio.run(poisson(url, bodies, rate, args.seconds, args.max_requests, args.deadline_s, 0,
                                    [(t, "kill") for t in kill_at]))
        time.sleep(2.0)

        async def stalled_phase():
            return await asyncio.gather(stalled_uploads(port, args.stalled, args.stall_seconds),
                                        poisson(url, bodies, rate / 2, args.stall_seconds, args.max_requests,
                                                args.deadline_s, 1))
        uploads, beside = asyncio.run(stalled_phase())
        bad = malformed(base, bodies[0])
        result = {"model": model, "checkpoint": Path(checkpoint).name, "commit": commit(),
                  "capacity_rps": rate, "deadline_s": args.deadline_s, "seconds": args.seconds,
                  "kills": summary(kills), "kills_done": sum(r.get("event") == "kill" for r in kills),
                  "kill_pids": [r["pids"] for r in kills if r.get("event") == "kill"],
                  "recovery_s": recovery(kills), "stalled_load": summary(beside),
                  "stalled_uploads": summary(uploads), "malformed": summary(bad), "malformed_detail": bad,
                  "healthz_after": get(base + "/healthz")}
        write(args.out, result)
        print(args.out.with_suffix(".md").read_text())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        tmp.cleanup()


if __name__ == "__main__":
    main()
