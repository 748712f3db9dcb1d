"""``tocom serve``: the command line of the Ray Serve deployment."""

from __future__ import annotations

import argparse
import math
import os
import signal
import threading

from tocom.serve.calibrate import DEFAULT_DEGREES
from tocom.serve.edge import TOKEN_ENV, load_token, token_digest
from tocom.serve.images import MAX_PIXELS
from tocom.serve.service import ServeConfig


def _int_list(what: str, example: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: integers such as {example}, got {text!r}") from None
        if not values or min(values) < 0:
            raise argparse.ArgumentTypeError(f"{what} must be >= 0, got {text!r}")
        return values
    return parse


_degrees = _int_list("degrees", "0,4,8")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "none")


def parse_lead(text: str) -> float | None:
    """``--lead-ms``: milliseconds, or ``off`` (None: send a batch once the last one's answers are back)."""
    return None if text.strip().lower() == "off" else float(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``tocom``'s subparsers."""
    p = subparsers.add_parser("serve", help="HTTP service whose degree follows load (tocom[serve])")
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224, or hf:PATH (a transformers "
                                 "save_pretrained folder or hub id)")
    p.add_argument("--checkpoint", help="fine-tuned weights (.safetensors from tocom finetune, or timm's)")
    p.add_argument("--plugin", help="compensator file: degree changes fold its delta")
    p.add_argument("--source", type=int,
                   help="degree the checkpoint was fine-tuned at (default: its metadata, else 0)")
    p.add_argument("--degrees", type=_degrees, default=DEFAULT_DEGREES,
                   help="degrees to choose from (default 0,4,8,12,16)")
    p.add_argument("--fixed-degree", type=int, help="always serve at this degree (no controller)")
    p.add_argument("--scale", type=float, help="plugin scale s (default: the plugin's)")
    p.add_argument("--slo-ms", type=float, default=200.0, help="latency objective, arrival to answer")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--lead-ms", type=parse_lead, default=25.0,
                   help="send the next batch this long before the model is predicted free, to wait in "
                        "its queue; 'off': only once the last batch's answers are back")
    p.add_argument("--max-ongoing", type=int, default=32,
                   help="requests a replica holds at once; more get 503 with Retry-After")
    p.add_argument("--max-queued", type=int, default=64,
                   help="requests waiting in Ray's router; more get 503")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, help="> --replicas turns on Ray Serve autoscaling")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: --replica-cpus)")
    p.add_argument("--worker-cores", type=_int_list("cores", "1 or 2,3"),
                   help="pin the model workers to these CPU cores, e.g. 1 or 2,3 (Linux; default: any)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="run the model through tocom.compile: a static graph per degree and batch bucket, "
                        "built at start-up (minutes with inductor on a CPU; timm models only)")
    p.add_argument("--compile-backend", choices=COMPILE_BACKENDS,
                   help="with --compile: torch.compile's backend (default inductor; eager and aot_eager "
                        "trace without code generation; none: CUDA graphs of the eager forward, CUDA only)")
    p.add_argument("--compile-batch-sizes", type=_int_list("batch sizes", "1,4,16"),
                   help="with --compile: the batch buckets to build (default 1, 2, 4, ... and --max-batch); "
                        "a batch runs padded to the smallest that holds it")
    p.add_argument("--classes", help="text file of class names, one per line, in label order")
    p.add_argument("--max-body-mb", type=float, default=10.0)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="largest image, width x height, checked before decoding (default 16000000)")
    p.add_argument("--decode-threads", type=int, default=2, help="images a replica decodes at once")
    p.add_argument("--body-timeout-s", type=float, default=10.0,
                   help="time to receive a request's body; slower uploads get 408")
    p.add_argument("--request-timeout-ms", type=float,
                   help="deadline of a request once its body is in; later: 504 (default: 4x --slo-ms, "
                        "at least 2000)")
    p.add_argument("--trust-request-start", action="store_true",
                   help="count the time since the X-Request-Start stamp (only behind a front end that "
                        "sets it; clients could forge it)")
    p.add_argument("--token-file",
                   help=f"file whose first line is a token every route but /healthz needs, as "
                        f"Authorization: Bearer <token> (default: ${TOKEN_ENV}, else no token)")
    p.add_argument("--top-k", type=int, default=5, help="default k of /v1/classify")
    p.add_argument("--access-log", action="store_true", help="let Ray log a line per request")
    p.add_argument("--recalibrate", action="store_true", help="measure latencies again instead of the cache")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the service)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--address", help="Ray cluster to deploy onto (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Check the flags and turn them into a :class:`ServeConfig`."""
    max_replicas = args.max_replicas or args.replicas
    if args.replicas < 1 or max_replicas < args.replicas:
        raise ValueError(f"need 1 <= --replicas <= --max-replicas, got {args.replicas}, {max_replicas}")
    if args.max_batch < 1 or args.max_ongoing < 1 or args.max_queued < 0:
        raise ValueError("need --max-batch >= 1, --max-ongoing >= 1 and --max-queued >= 0")
    if args.lead_ms is not None and args.lead_ms < 0:
        raise ValueError(f"--lead-ms must be >= 0 or 'off', got {args.lead_ms}")
    if args.slo_ms <= 0 or args.max_body_mb <= 0:
        raise ValueError("need --slo-ms > 0 and --max-body-mb > 0")
    if args.max_pixels < 1 or args.decode_threads < 1 or args.body_timeout_s <= 0:
        raise ValueError("need --max-pixels >= 1, --decode-threads >= 1 and --body-timeout-s > 0")
    if args.request_timeout_ms is not None and args.request_timeout_ms <= 0:
        raise ValueError(f"--request-timeout-ms must be > 0, got {args.request_timeout_ms}")
    compile_options = check_compile(args)
    token = load_token(args.token_file)
    # Replicas run in other processes (other machines on a cluster): hand them absolute paths.
    absolute = lambda path: os.path.abspath(path) if path else None
    return ServeConfig(
        model=absolute_hf(args.model), checkpoint=absolute(args.checkpoint), plugin=absolute(args.plugin),
        source=args.source, degrees=tuple(args.degrees), fixed_degree=args.fixed_degree, scale=args.scale,
        slo_ms=args.slo_ms, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        lead_ms=args.lead_ms,
        max_ongoing=args.max_ongoing, max_queued=args.max_queued, replicas=args.replicas,
        max_replicas=max_replicas, replica_cpus=args.replica_cpus, threads=args.threads, device=args.device,
        worker_cores=args.worker_cores, **compile_options,
        classes=absolute(args.classes), max_body_mb=args.max_body_mb, top_k=args.top_k,
        max_pixels=args.max_pixels, decode_threads=args.decode_threads, body_timeout_s=args.body_timeout_s,
        request_timeout_ms=args.request_timeout_ms, trust_request_start=args.trust_request_start,
        token_sha256=token_digest(token) if token else None,
        recalibrate=args.recalibrate, access_log=args.access_log, host=args.host, port=args.port,
        route_prefix=args.route_prefix)


def check_compile(args: argparse.Namespace) -> dict:
    """The compile flags as :class:`ServeConfig` fields, refusing combinations that cannot work."""
    backend, sizes = args.compile_backend, args.compile_batch_sizes
    if not args.compile:
        if backend is not None or sizes is not None:
            raise ValueError("--compile-backend and --compile-batch-sizes only apply with --compile; add it")
        return {}
    if args.model.startswith("hf:"):
        raise ValueError("--compile runs timm models only (the compiled runner needs timm's forward_tokens); "
                         "serve this hf: model without --compile")
    if backend == "none" and not args.device.startswith("cuda"):
        raise ValueError(f"--compile-backend none captures CUDA graphs, which need --device cuda, not "
                         f"{args.device}; pick inductor, aot_eager or eager")
    if sizes is not None and (min(sizes) < 1 or max(sizes) > args.max_batch):
        raise ValueError(f"--compile-batch-sizes must lie in 1..--max-batch ({args.max_batch}), got "
                         f"{','.join(map(str, sizes))}")
    return {"compile": True, "compile_backend": None if backend == "none" else backend or "inductor",
            "compile_batch_sizes": tuple(sorted(set(sizes))) if sizes else None}


def absolute_hf(model: str) -> str:
    """``hf:FOLDER`` with an absolute folder (replicas run elsewhere); timm names and hub ids as given."""
    if model.startswith("hf:") and os.path.isdir(model[3:]):
        return "hf:" + os.path.abspath(model[3:])
    return model


def run(args: argparse.Namespace) -> None:
    """Deploy, print the URL, serve until interrupted, then shut down."""
    config = config_from_args(args)
    try:
        from tocom.serve import app
    except ImportError as err:
        raise ValueError(f"tocom serve needs Ray Serve ({err}); pip install 'tocom[serve]'") from None
    local_cpus = max(2, math.ceil(config.max_replicas * config.replica_cpus))
    url = app.deploy(config, address=args.address, num_cpus=local_cpus)
    auth = "; every route but /healthz needs the bearer token" if config.token_sha256 else ""
    print(f"serving {config.model} at {url}/v1/classify (info: {url}/v1/info){auth}; Ctrl-C stops",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        app.shutdown()
