"""Load benchmark of ``tocom serve``: fixed r=0, fixed r=16 and elastic under open-loop Poisson load.

All three services serve the same CIFAR-10 DeiT-Tiny fine-tuned at r=0, side by side in one local
Ray Serve instance on loopback; elastic adds the shipped plugin. Each is loaded in turn (never two
at once, so they do not share the CPU) at 0.5x, 1x, 1.5x and 2x the measured capacity of fixed
r=0, with labelled CIFAR-10 test images sent over HTTP; each step is split into ``--blocks``
blocks that rotate the services' order, all three getting the same arrivals in each block.
Bounded in requests and time; stops by itself. Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.

Compiled workers (``tocom serve --compile``): ``--compile`` compiles every service's worker; naming
``fixed16c`` in ``--order`` adds a fourth service, fixed r=16 through the compiled runner, loaded
in the same rotated blocks as eager fixed r=16 (same arrivals), which is the fair comparison:

    python benchmarks/serve_load.py --checkpoint runs/cifar10_r0.safetensors \\
        --order fixed0,fixed16,fixed16c,elastic

Make the checkpoint first (VTAB-1k CIFAR-10, fine-tuned at r=0):

    tocom finetune deit_tiny_patch16_224 --checkpoint ../shared/weights/deit_tiny_patch16_224.safetensors \\
        --data ../shared/data/vtab-1k/cifar10 --r 0 --out runs/cifar10_r0.safetensors

then, on a quiet machine:

    python benchmarks/serve_load.py --checkpoint runs/cifar10_r0.safetensors

``--smoke`` runs the whole pipeline on a tiny random-weight ViT in under a minute (its numbers
mean nothing; it writes to runs/serve_smoke/ unless --out is given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

LOADS = (0.5, 1.0, 1.5, 2.0)
SERVICES = ("fixed r=0", "fixed r=16", "fixed r=16 compiled", "elastic")
PREFIXES = {"fixed r=0": "/fixed0", "fixed r=16": "/fixed16", "fixed r=16 compiled": "/fixed16c",
            "elastic": "/elastic"}


def parse_args() -> argparse.Namespace:
    from tocom.serve.cli import parse_lead

    root = Path(__file__).resolve().parents[1]
    shared = Path(os.environ.get("TOCOM_SHARED", root.parent / "shared"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--checkpoint", help="CIFAR-10 checkpoint fine-tuned at r=0 (required unless --smoke)")
    p.add_argument("--plugin", default=str(root / "plugins" / "deit_tiny_patch16_224.tocom.safetensors"))
    p.add_argument("--data", default=str(shared / "data" / "vtab-1k" / "cifar10"))
    p.add_argument("--degrees", default="0,4,8,12,16", help="elastic's degrees")
    p.add_argument("--slo-ms", type=float, help="default: --slo-factor x r=0 latency of a full batch")
    p.add_argument("--slo-factor", type=float, default=2.5)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-ongoing", type=int, default=24, help="requests a replica holds before 503")
    p.add_argument("--margin", type=float, default=0.85, help="elastic: share of the SLO predictions may use")
    p.add_argument("--patience", type=int, default=3, help="elastic: batches of slack before stepping down")
    p.add_argument("--lead-ms", type=parse_lead, default=25.0,
                   help="send a batch this long before the model is predicted free ('off': after)")
    # One of the two cores of a small machine is left to the HTTP path (client, proxy, decoding):
    # with both given to torch, that path, not the model, bounded every service alike.
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--pin", action="store_true",
                   help="model workers on the last CPU core, this client and the rest of Ray on the others")
    p.add_argument("--no-request-start", action="store_true",
                   help="do not send X-Request-Start (replicas then see only their own share of the latency)")
    p.add_argument("--save-records", action="store_true",
                   help="also write each request's record (status, ms, degree, batch...) to OUT.records.json")
    p.add_argument("--blocks", type=int, default=3,
                   help="each step's duration is split into this many blocks, the services rotating "
                        "their order from block to block")
    p.add_argument("--order", default="fixed0,fixed16,elastic",
                   help="the order the services are loaded in at each load (fixed0, fixed16, elastic; "
                        "fixed16c adds fixed r=16 with a compiled worker)")
    p.add_argument("--compile", action="store_true",
                   help="compile every service's worker (tocom serve --compile); fixed16c always is")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="torch.compile backend of compiled workers (eager: tracing only, for --smoke)")
    p.add_argument("--compile-batch-sizes",
                   help="compiled workers' batch buckets, e.g. 1,4,8 (default 1, 2, 4, ... --max-batch)")
    p.add_argument("--loads", default=",".join(map(str, LOADS)), help="multiples of r=0 capacity")
    p.add_argument("--duration-s", type=float, default=30.0, help="arrivals per step")
    p.add_argument("--capacity-s", type=float, default=15.0, help="closed-loop time to measure capacity")
    p.add_argument("--max-requests", type=int, default=3000, help="cap on the requests of one step")
    p.add_argument("--images", type=int, default=2000, help="test images used (cycled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output path without suffix (default docs/results/serving)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, seconds per step")
    args = p.parse_args()
    if args.smoke:
        args.duration_s, args.capacity_s = min(args.duration_s, 2.0), min(args.capacity_s, 2.0)
        args.max_requests, args.images, args.threads = min(args.max_requests, 150), min(args.images, 64), 1
        args.slo_ms = args.slo_ms or 150.0  # the tiny model's compute is far below HTTP's own cost
    elif not args.checkpoint:
        p.error("--checkpoint is required (see the docstring for how to make one), or pass --smoke")
    if args.blocks < 1:
        p.error(f"--blocks must be at least 1, got {args.blocks}")
    names = args.order.split(",")
    if sorted(n for n in names if n != "fixed16c") != ["elastic", "fixed0", "fixed16"] or names.count(
            "fixed16c") > 1:
        p.error(f"--order must name fixed0, fixed16 and elastic once each (and fixed16c at most once), "
                f"got {args.order!r}")
    if args.compile_batch_sizes:
        try:
            args.compile_batch_sizes = tuple(sorted({int(b) for b in args.compile_batch_sizes.split(",")}))
        except ValueError:
            p.error(f"--compile-batch-sizes: integers such as 1,4,8, got {args.compile_batch_sizes!r}")
        if args.compile_batch_sizes[0] < 1 or args.compile_batch_sizes[-1] > args.max_batch:
            p.error(f"--compile-batch-sizes must lie in 1..--max-batch ({args.max_batch})")
    args.out = Path(args.out or root / ("runs/serve_smoke/serving" if args.smoke else "docs/results/serving"))
    return args


def smoke_assets(folder: Path) -> tuple[str, str, str]:
    """A tiny random ViT checkpoint (10 classes) and a random plugin for it."""
    import timm
    import torch

    from tocom.compensator import Compensator
    from tocom.models.loading import save_model

    torch.manual_seed(0)
    kwargs = dict(img_size=64, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=10)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    save_model(model, folder / "tiny.safetensors", "vit_tiny_patch16_224", kwargs)
    plugin = Compensator.init_for(model, groups=16)
    torch.nn.init.normal_(plugin.B, std=0.02)
    plugin.save(folder / "tiny.tocom.safetensors")
    return "vit_tiny_patch16_224", str(folder / "tiny.safetensors"), str(folder / "tiny.tocom.safetensors")


def load_requests(data: str, n: int, smoke: bool) -> list[tuple[bytes, int]]:
    """(file bytes, label) of the first ``n`` test images (random PNGs in smoke mode without data)."""
    from tocom.data import VTAB1k

    if Path(data).is_dir():
        samples = VTAB1k(data, "test").samples[:n]
        return [(path.read_bytes(), label) for path, label in samples]
    if not smoke:
        raise FileNotFoundError(f"CIFAR-10 folder {data} not found; pass --data or set TOCOM_SHARED")
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append((buf.getvalue(), i % 10))
    return out


async def post(session, url: str, body: bytes, stamp: bool = True) -> tuple[int, float, dict | None]:
    """Status, milliseconds and the JSON answer (for a 503: ``{"retry_after": s}``).

    ``stamp``: send ``X-Request-Start`` (the send time), as a load balancer in front would, so the
    replica counts the time spent in Ray's proxy and router against the SLO.
    """
    start = time.perf_counter()
    headers = {"X-Request-Start": f"t={time.time():.6f}"} if stamp else None
    try:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            status = response.status
            retry = response.headers.get("retry-after", "1")
    except Exception:  # a refused or dropped connection counts as a failed request
        return 0, (time.perf_counter() - start) * 1000, None
    ms = (time.perf_counter() - start) * 1000
    if status == 503:
        return status, ms, {"retry_after": float(retry) if retry.replace(".", "", 1).isdigit() else 1.0}
    return status, ms, json.loads(payload) if status == 200 else None


async def closed_loop(url: str, requests, concurrency: int, seconds: float, stamp: bool = True) -> float:
    """Answered requests per second with ``concurrency`` clients sending back to back.

    A client told 503 waits the ``Retry-After`` it is given, as a well-behaved client does: resending
    at once would spend the CPU the model needs on refusals, on a machine this small.
    """
    import aiohttp

    done, stop = 0, time.perf_counter() + seconds

    async def client(i: int, session) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            body = requests[(i * 7919 + done) % len(requests)][0]
            status, _, answer = await post(session, url, body, stamp)
            done += status == 200
            if status == 503:
                await asyncio.sleep(min(answer["retry_after"], max(0.0, stop - time.perf_counter())))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))  # warm-up
        done, stop = 0, time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
        return done / (time.perf_counter() - start)


async def open_loop(url: str, requests, rate: float, seconds: float, max_requests: int, seed: int,
                    stamp: bool = True) -> list[dict]:
    """Poisson arrivals at ``rate``/s for ``seconds`` (at most ``max_requests``); a record per request."""
    import aiohttp

    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds and len(arrivals) < max_requests:
        arrivals.append(t)
        t += rng.expovariate(rate)
    order = [rng.randrange(len(requests)) for _ in arrivals]
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.perf_counter()
        tasks = []
        for at, index in zip(arrivals, order):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(post(session, url, requests[index][0], stamp)))
        results = await asyncio.gather(*tasks)
    records = []
    for (status, ms, answer), index in zip(results, order):
        ok = status == 200
        top = answer["predictions"][0]["index"] if ok else None
        records.append({"status": status, "ms": ms, "correct": top == requests[index][1],
                        "degree": answer["degree"] if ok else None,
                        "batch_size": answer["batch_size"] if ok else None,
                        "compute_ms": answer["compute_ms"] if ok else None,
                        "replica_ms": answer["total_ms"] - answer["upstream_ms"] if ok else None})
    return records


def summarize(records: list[dict], slo_ms: float, seconds: float) -> dict:
    answered = [r for r in records if r["status"] == 200]
    ms = np.array([r["ms"] for r in answered]) if answered else np.array([np.nan])
    met = sum(r["ms"] <= slo_ms for r in answered)
    degrees: dict[str, int] = {}
    for r in answered:
        degrees[str(r["degree"])] = degrees.get(str(r["degree"]), 0) + 1
    return {"requests": len(records), "answered": len(answered),
            "rejected_503": sum(r["status"] == 503 for r in records),
            "failed": sum(r["status"] not in (200, 503) for r in records),
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            # reaching the replica to answer; the rest of "ms" is the client, the proxy and the wire
            "p95_replica_ms": float(np.percentile([r["replica_ms"] for r in answered], 95))
            if answered else None,
            "slo_attainment": met / max(1, len(records)),  # over all offered requests: a 503 misses
            "goodput_rps": met / seconds,
            "accuracy": sum(r["correct"] for r in answered) / max(1, len(answered)),
            # where the time goes: a batch's forward against the latency the client saw
            "mean_batch": float(np.mean([r["batch_size"] for r in answered])) if answered else None,
            "compute_ms_per_image": float(np.mean([r["compute_ms"] / r["batch_size"] for r in answered]))
            if answered else None,
            "degrees": dict(sorted(degrees.items(), key=lambda kv: int(kv[0])))}


def commit() -> str:
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                        check=True).stdout.strip()
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_outputs(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    steps = result["steps"]
    smoke = " (SMOKE: tiny random model, numbers mean nothing)" if result["smoke"] else ""
    lines = [f"# Serving under load{smoke}",
             "", f"Model `{result['model']}`, SLO {result['slo_ms']:.0f} ms, r=0 capacity "
             f"{result['capacity_rps']:.1f} req/s, max batch {result['max_batch']}, "
             f"commit `{result['commit']}`.",
             "SLO attainment and goodput count every offered request (a 503 is a miss).", "",
             "| load | service | req/s | p50 ms | p95 ms | p99 ms | SLO met | goodput/s | 503 | accuracy "
             "| degrees | mean batch | forward ms/image | p95 at replica ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        degrees = " ".join(f"{d}:{n}" for d, n in s["degrees"].items())
        lines.append(f"| {s['load']}x | {s['service']} | {s['rate_rps']:.1f} | {s['p50_ms']:.0f} "
                     f"| {s['p95_ms']:.0f} | {s['p99_ms']:.0f} | {100 * s['slo_attainment']:.1f}% "
                     f"| {s['goodput_rps']:.1f} "
                     f"| {s['rejected_503']} | {100 * s['accuracy']:.2f}% | {degrees} "
                     f"| {_fmt(s.get('mean_batch'))} | {_fmt(s.get('compute_ms_per_image'))} "
                     f"| {_fmt(s.get('p95_replica_ms'))} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, (ax_lat, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(s["service"] for s in steps):
        rows = [s for s in steps if s["service"] == name]
        loads = [s["load"] for s in rows]
        ax_lat.plot(loads, [s["p95_ms"] for s in rows], marker="o", label=name)
        ax_acc.plot(loads, [100 * s["accuracy"] for s in rows], marker="o", label=name)
    ax_lat.axhline(result["slo_ms"], color="grey", linestyle="--", label="SLO")
    ax_lat.set(xlabel="load (x r=0 capacity)", ylabel="p95 latency (ms)", yscale="log")
    ax_acc.set(xlabel="load (x r=0 capacity)", ylabel="accuracy of answered requests (%)")
    ax_lat.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    args = parse_args()
    import ray
    from ray import serve

    from tocom.serve.app import build_app, start_ray, start_serve
    from tocom.serve.service import ServeConfig

    tmp = tempfile.TemporaryDirectory(prefix="tocom-serve-load-")
    if args.smoke:
        model, checkpoint, plugin = smoke_assets(Path(tmp.name))
    else:  # replicas are other processes: absolute paths
        model, checkpoint, plugin = args.model, os.path.abspath(args.checkpoint), os.path.abspath(args.plugin)
    requests = load_requests(args.data, args.images, args.smoke)
    degrees = tuple(int(d) for d in args.degrees.split(","))
    base = ServeConfig(model=model, checkpoint=checkpoint, max_batch=args.max_batch, batch_wait_ms=5,
                       max_ongoing=args.max_ongoing, max_queued=64, replica_cpus=0.5, threads=args.threads,
                       slo_ms=args.slo_ms or 1000.0, max_body_mb=1, margin=args.margin,
                       patience=args.patience, lead_ms=args.lead_ms, compile=args.compile,
                       compile_backend=args.compile_backend,
                       compile_batch_sizes=args.compile_batch_sizes or None)
    worker_cores = None
    if args.pin:  # set before Ray starts: its processes inherit this process's cores
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise SystemExit("--pin needs at least 2 CPU cores")
        worker_cores = (cores[-1],)
        os.sched_setaffinity(0, cores[:-1])
        base = replace(base, worker_cores=worker_cores)
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ray(None, num_cpus=2)
    start_serve("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    result: dict = {"smoke": args.smoke, "model": model, "checkpoint": checkpoint, "plugin": plugin,
                    "commit": commit(), "machine": {"node": platform.node(), "cpus": os.cpu_count()},
                    "ray": ray.__version__, "threads": args.threads, "worker_cores": worker_cores,
                    "max_batch": args.max_batch,
                    "max_ongoing": args.max_ongoing, "margin": args.margin, "patience": args.patience,
                    "lead_ms": base.lead_ms, "order": args.order, "blocks": args.blocks,
                    "request_start": not args.no_request_start, "compile": args.compile,
                    "compile_backend": args.compile_backend, "compile_batch_sizes": args.compile_batch_sizes,
                    "duration_s": args.duration_s, "steps": []}
    try:
        by_key = {prefix.strip("/"): name for name, prefix in PREFIXES.items()}
        order = [by_key[key] for key in args.order.split(",")]
        prefixes = {name: PREFIXES[name] for name in SERVICES if name in order}
        stamp = not args.no_request_start
        all_records: list[dict] = []
        fixed0 = lambda slo: build_app(replace(base, fixed_degree=0, slo_ms=slo))
        serve.run(fixed0(base.slo_ms), name="fixed0", route_prefix="/fixed0")
        info = json.loads(_get(f"{url}/fixed0/v1/info"))
        slo = args.slo_ms or args.slo_factor * info["latency_ms"]["0"][str(args.max_batch)]
        if not args.slo_ms:  # again with the SLO it reports (calibration comes from the cache)
            serve.run(fixed0(slo), name="fixed0", route_prefix="/fixed0")
        serve.run(build_app(replace(base, fixed_degree=16, slo_ms=slo)), name="fixed16",
                  route_prefix="/fixed16")
        if "fixed r=16 compiled" in prefixes:
            serve.run(build_app(replace(base, fixed_degree=16, slo_ms=slo, compile=True)),
                      name="fixed16c", route_prefix="/fixed16c")
        serve.run(build_app(replace(base, plugin=plugin, source=0, degrees=degrees, slo_ms=slo)),
                  name="elastic", route_prefix="/elastic")
        result["slo_ms"] = slo
        result["calibration"] = {n: json.loads(_get(f"{url}{p}/v1/info"))["latency_ms"]
                                 for n, p in prefixes.items()}
        for prefix in prefixes.values():  # warm every replica (and the proxy's route to it) alike
            asyncio.run(closed_loop(f"{url}{prefix}/v1/classify", requests, args.max_batch, 1.0, stamp))
        capacity = asyncio.run(closed_loop(f"{url}/fixed0/v1/classify", requests, 2 * args.max_batch,
                                           args.capacity_s, stamp))
        result["capacity_rps"] = capacity
        print(f"SLO {slo:.0f} ms, r=0 capacity {capacity:.1f} req/s", flush=True)
        for load in (float(x) for x in args.loads.split(",")):
            # Each service gets the same arrivals (seeded per block), in blocks that rotate the
            # order: the machine's speed drifts over minutes, and three services loaded 30 s each
            # in turn compared the third with the first under a different machine.
            records = {name: [] for name in order}
            for block in range(args.blocks):
                for name in order[block % len(order):] + order[:block % len(order)]:
                    records[name] += asyncio.run(open_loop(
                        f"{url}{prefixes[name]}/v1/classify", requests, load * capacity,
                        args.duration_s / args.blocks, args.max_requests // args.blocks,
                        args.seed + int(10 * load) + 1000 * block, stamp))
                    time.sleep(1.0)  # let the previous service's stragglers finish
            for name in order:
                row = {"load": load, "service": name, "rate_rps": load * capacity,
                       **summarize(records[name], slo, args.duration_s),
                       # the controller's measured / calibrated forward time at the end of the step
                       "slowdown": json.loads(_get(f"{url}{prefixes[name]}/v1/info"))["slowdown"]}
                result["steps"].append(row)
                if args.save_records:
                    all_records.append({"load": load, "service": name, "records": records[name]})
                print(f"{load}x {name}: p95 {row['p95_ms']:.0f} ms, "
                      f"SLO met {100 * row['slo_attainment']:.1f}%, 503 {row['rejected_503']}, "
                      f"acc {100 * row['accuracy']:.1f}%, degrees {row['degrees']}, "
                      f"batch {row['mean_batch'] or 0:.1f}, {row['compute_ms_per_image'] or 0:.1f} ms/image, "
                      f"p95 at replica {row['p95_replica_ms'] or 0:.0f} ms, slowdown {row['slowdown']:.2f}",
                      flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    write_outputs(args.out, result)
    if args.save_records:
        args.out.with_suffix(".records.json").write_text(json.dumps(all_records))
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png")


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


if __name__ == "__main__":
    main()
