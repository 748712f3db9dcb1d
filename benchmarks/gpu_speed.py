"""GPU throughput of tocom against stock timm: eager, compiled and CUDA-graph runners, bf16 autocast.

    python benchmarks/gpu_speed.py                      # one GPU, at most ~8 minutes
    python benchmarks/gpu_speed.py --smoke              # the CPU, a tiny model, under a minute

Models DeiT-Ti, DeiT-S, ViT-B/16, ViT-L/16 (random weights); stock timm and tocom (ToMe, prop_attn)
at r = 0, 8, 16; batch sizes 1, 8, 32, 128 (+256 for B and L). Modes:

- ``eager``: the model's forward;
- ``graphs``: ``tocom.compile(backend=None)``, CUDA graphs of the eager forward (cheap to capture);
- ``compiled``: ``tocom.compile(graphs=False)``, inductor without CUDA graphs;
- ``compiled+graphs``: ``tocom.compile()``'s default on CUDA, inductor captured as CUDA graphs.

Every cell (model, batch size, mode) times stock and each tocom configuration in interleaved,
rotated rounds (medians); ``vs_stock`` is tocom's images/s over stock's in the same cell. In eager
and graphs mode r = 8 and 16 also run with proportional attention as a float mask (``prop_form``
"mask") beside the default one-channel form. Compiling is the slow part, so the compiled modes come
last and a time guard (``--budget``) skips the cells that no longer fit, recording each skip.
Results are rewritten after every cell to ``--out``.{json,md} (default docs/results/gpu-speed;
with --smoke a temporary folder), with the device, driver, torch version, commit, and the SDPA
kernels each configuration runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tocom  # noqa: E402
from tocom.atomic import atomic_write_text  # noqa: E402
from tocom.models.sdpa import prop_form, set_prop_form, uses_channel  # noqa: E402
from tocom.report.provenance import provenance  # noqa: E402

MODELS = {"deit_tiny_patch16_224": (1, 8, 32, 128), "deit_small_patch16_224": (1, 8, 32, 128),
          "vit_base_patch16_224": (1, 8, 32, 128, 256), "vit_large_patch16_224": (1, 8, 32, 128, 256)}
SMOKE = {"vit_tiny_patch16_224": (1, 4)}  # built at 64 px, 8 px patches, 2 blocks
SMOKE_ARGS = dict(img_size=64, patch_size=8, depth=2)
DEGREES = (0, 8, 16)
ROUND_S = 0.025  # each timed round of one configuration lasts about this long


@dataclass
class Config:
    """One thing timed in a cell: stock, or tocom at degree ``r`` with a proportional-attention form."""

    name: str
    r: int | None  # None: stock timm
    form: str = "auto"
    fn: object = None  # images -> logits
    model: torch.nn.Module | None = None  # the patched model whose degree ``r`` is set before a round

    def prepare(self) -> None:
        """Untimed, before each round: the degree and form this configuration runs at."""
        set_prop_form(self.form)
        if self.model is not None and self.r is not None:
            self.model.r = self.r


def configs(with_mask: bool) -> list[Config]:
    out = [Config("stock", None)] + [Config(f"r{r}", r) for r in DEGREES]
    return out + ([Config(f"r{r}-mask", r, "mask") for r in DEGREES if r] if with_mask else [])


def build(name: str, smoke: bool, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stock and patched copies of one random-weight model on ``device`` (initialised there)."""
    with torch.device(device):
        stock = timm.create_model(name, pretrained=False, **(SMOKE_ARGS if smoke else {})).eval()
    patched = tocom.patch(copy.deepcopy(stock), "tome", prop_attn=True)
    return stock, patched


class OutOfTime(Exception):
    """The time budget ran out while a cell was still compiling."""


def make_fns(mode: str, cells: list[Config], stock, patched, batch: int, backend: str,
             deadline: float) -> float:
    """Set each configuration's callable for ``mode``; returns the seconds spent compiling/capturing."""
    if mode == "eager":
        def eager(model, r):
            def run(x):
                with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
                    return model(x) if r is None else model(x, r=r)
            return run
        for c in cells:
            c.fn = eager(stock if c.r is None else patched, c.r)
        return 0.0
    options = dict(batch_sizes=(batch,), autocast=torch.bfloat16, graphs=mode.endswith("graphs"),
                   backend=None if mode == "graphs" else backend)
    spent = 0.0
    for c in cells:
        if time.perf_counter() > deadline:
            raise OutOfTime
        set_prop_form(c.form)  # a graph keeps the form it was traced or captured with
        if c.r is None:
            runner = tocom.compile(stock, degrees=(0,), **options)
        else:
            c.model = patched
            patched.r = c.r
            runner = tocom.compile(patched, degrees=(c.r,), **options)
        spent += sum(runner.capture_seconds.values())
        c.fn = runner
    set_prop_form("auto")
    return spent


def form_of(c: Config, device: torch.device) -> str:
    """The proportional-attention form a configuration ran with ("auto" resolved on ``device``)."""
    if c.form != "auto":
        return c.form
    with prop_form("auto"):
        return "channel" if uses_channel(device) else "mask"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cell(cells: list[Config], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median images/s of each configuration over interleaved rounds, rotating the order."""
    device = x.device
    for c in cells:  # warm (and size the rounds by stock's time)
        c.prepare()
        for _ in range(2):
            c.fn(x)
    sync(device)
    cells[0].prepare()
    start = time.perf_counter()
    cells[0].fn(x)
    sync(device)
    iters = max(1, min(200, int(ROUND_S / max(time.perf_counter() - start, 1e-6))))
    rates: dict[str, list[float]] = {c.name: [] for c in cells}
    for i in range(rounds):
        for c in cells[i % len(cells):] + cells[:i % len(cells)]:
            c.prepare()
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                c.fn(x)
            sync(device)
            rates[c.name].append(iters * x.shape[0] / (time.perf_counter() - start))
    set_prop_form("auto")
    return {name: statistics.median(v) for name, v in rates.items()}


def sdpa_kernels(stock, patched, device: torch.device, image_size: int) -> dict[str, list[str]]:
    """The SDPA ops (``aten::_scaled_dot_product_*``) and GPU attention kernels one eager bf16 forward
    runs, per configuration."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    x = torch.randn(8, 3, image_size, image_size, device=device)
    found = {}
    for name, model, r, form in [("stock", stock, None, "auto"), ("r8-channel", patched, 8, "channel"),
                                 ("r8-mask", patched, 8, "mask")]:
        set_prop_form(form)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x) if r is None else model(x, r=r)  # warm, outside the trace
            sync(device)
            with profile(activities=activities) as prof:
                model(x) if r is None else model(x, r=r)
                sync(device)
        keys = {e.key for e in prof.key_averages()}
        ops = sorted(k for k in keys if k.startswith("aten::_scaled_dot_product"))
        kernels = sorted(k[:80] for k in keys if not k.startswith("aten::") and any(
            s in k.lower() for s in ("flash", "fmha", "cudnn", "attention", "sdpa")))
        found[name] = ops + kernels
    set_prop_form("auto")
    return found


def device_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        facts["name"] = torch.cuda.get_device_name(device)
        try:
            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            facts["driver"] = None
    else:
        facts["name"], facts["driver"] = "cpu", None
    return facts


def markdown(result: dict) -> str:
    facts = result["device"]
    lines = [f"# GPU speed: tocom against stock timm ({facts['name']})", "",
             f"driver {facts['driver']}, torch {facts['torch']} (CUDA {facts['cuda']}), commit "
             f"{result['provenance']['commit']}; bf16 autocast, random weights, images/s (median of "
             f"{result['rounds']} interleaved rounds); `benchmarks/gpu_speed.py`.", "",
             "| model | batch | mode | config | prop. attention | images/s | vs stock |",
             "|---|---|---|---|---|---|---|"]
    for rec in result["records"]:
        lines.append(f"| {rec['model']} | {rec['batch_size']} | {rec['mode']} | {rec['config']} | "
                     f"{rec['prop_form'] or '-'} | {rec['images_per_s']:.1f} | {rec['vs_stock']:.3f} |")
    if result["skipped"]:
        lines += ["", "Skipped cells:", ""]
        lines += [f"- {s['model']} batch {s['batch_size']} {s['mode']}: {s['why']}"
                  for s in result["skipped"]]
    lines += ["", "SDPA ops and kernels (eager, batch 8):", ""]
    for model, per in result["sdpa"].items():
        for name, kernels in per.items():
            lines.append(f"- {model} {name}: {', '.join(kernels) or 'none found'}")
    lines += ["", f"Compile/capture seconds per cell: {json.dumps(result['compile_seconds'])}",
              f"Total {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the CPU, a tiny 2-block model, under a minute")
    p.add_argument("--out", type=Path, default=None,
                   help="path without suffix (default docs/results/gpu-speed; --smoke: a temporary folder)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which remaining cells are skipped (default 330; --smoke 40)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per cell (default 7; --smoke 3)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled modes")
    args = p.parse_args()
    began = time.perf_counter()
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; spinning ones slow it down
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_speed.py needs a CUDA device; --smoke runs on the CPU")
    out = args.out or (Path(tempfile.mkdtemp()) / "gpu-speed" if smoke else Path("docs/results/gpu-speed"))
    budget = args.budget if args.budget is not None else (40.0 if smoke else 330.0)
    rounds = args.rounds or (3 if smoke else 7)
    backend = "eager" if smoke else args.backend  # no C++ compile in a one-minute CPU smoke run
    models = SMOKE if smoke else MODELS
    result = {"device": device_facts(device), "provenance": provenance(str(device)), "smoke": smoke,
              "rounds": rounds, "budget_s": budget, "backend": backend, "records": [], "skipped": [],
              "sdpa": {}, "compile_seconds": {}, "seconds": 0.0}

    def save() -> None:
        result["seconds"] = time.perf_counter() - began
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
        atomic_write_text(out.with_suffix(".md"), markdown(result))

    built = {name: build(name, smoke, device) for name in models}
    for name, (stock, patched) in built.items():
        result["sdpa"][name] = sdpa_kernels(stock, patched, device, stock.patch_embed.img_size[0])
    cheap = ["eager"] + (["graphs"] if device.type == "cuda" else [])
    costly = ["compiled"] + (["compiled+graphs"] if device.type == "cuda" else [])
    # the cheap modes over every cell first, then the compiled ones in the order that fits the most
    # cells (each compiles 4 graphs); compiled+graphs right after compiled reuses inductor's cache
    plan = [(m, n, b) for m in cheap for n, bs in models.items() for b in bs]
    plan += [(m, n, b) for b in (1, 32, 8, 128, 256, 4) for n, bs in models.items() if b in bs
             for m in costly]
    if device.type != "cuda":
        result["skipped"] += [{"model": n, "batch_size": b, "mode": m, "why": "CUDA graphs need a GPU"}
                              for m in ("graphs", "compiled+graphs") for n, bs in models.items() for b in bs]
    last_compile: dict[tuple[str, str], float] = {}  # (model, mode) -> seconds its last cell compiled
    for mode, name, batch in plan:
        left = budget - (time.perf_counter() - began)
        if left <= last_compile.get((name, mode), 0.0):
            result["skipped"].append({"model": name, "batch_size": batch, "mode": mode,
                                      "why": f"time budget of {budget:.0f} s spent"})
            continue
        stock, patched = built[name]
        size = stock.patch_embed.img_size[0]
        x = torch.randn(batch, 3, size, size, device=device)
        todo = configs(with_mask=mode in cheap)
        try:
            spent = make_fns(mode, todo, stock, patched, batch, backend, began + budget)
        except OutOfTime:
            result["skipped"].append({"model": name, "batch_size": batch, "mode": mode,
                                      "why": f"time budget of {budget:.0f} s spent while compiling"})
            continue
        finally:
            set_prop_form("auto")
        last_compile[name, mode] = spent
        result["compile_seconds"][f"{name}/{batch}/{mode}"] = round(spent, 2)
        rates = time_cell(todo, x, rounds)
        for c in todo:
            result["records"].append({"model": name, "batch_size": batch, "mode": mode, "config": c.name,
                                      "r": c.r, "prop_form": None if c.r is None else form_of(c, device),
                                      "images_per_s": rates[c.name],
                                      "vs_stock": rates[c.name] / rates["stock"]})
        del todo
        torch._dynamo.reset()  # this cell's graphs are done with
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
        print(f"{time.perf_counter() - began:6.0f} s  {name} batch {batch} {mode}: "
              + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items()), flush=True)
    save()
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
