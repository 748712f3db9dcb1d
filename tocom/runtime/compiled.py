"""An elastic runner: one static compiled graph per (degree, batch bucket), chosen per call.

Under token reduction every sequence length inside a forward follows from the degree, so a graph
for one degree and one batch size is static. :func:`compile` builds them all up front (a
``torch.compile`` graph each; on CUDA that graph, or the eager forward, is also captured as a CUDA
graph), and :class:`CompiledRunner` runs each call at the model's *current* degree: it pads the
batch to the smallest bucket holding it, splits a batch larger than the largest bucket into chunks,
and slices the rows back.

A degree that was not compiled is refused (ValueError naming the compiled degrees) rather than run
eagerly: a silent slow path would hide exactly the cost a runner exists to remove.

A plugin's degree switch (:func:`tocom.set_degree`) folds its delta into W_q and W_v *in place*
(the same storage), so the compiled graphs and captured CUDA graphs read the new weights with no
recompilation or recapture. Anything that gives the model new weight tensors (``model.to(...)``, a
cast, replaced modules) needs ``runner.warmup(recapture=True)``; a CUDA-graph runner notices a move
and says so.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from tocom.models import is_patched, require_feature, state_lock
from tocom.models.state import TokensMixin

Degree = int | list[int] | tuple[int, int]
Key = tuple[int, ...] | None  # a patched model's effective schedule; None for an unpatched model
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_WARM_CALLS = 3  # CUDA: compile, autotune and initialise libraries before the capture


def _recompile_limits() -> contextlib.AbstractContextManager:
    """Room for every graph of every runner: dynamo keeps one cache per function, shared by runners."""
    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(config, n)]
    return config.patch(**{n: max(getattr(config, n), 4096) for n in names})


@contextlib.contextmanager
def _graph_mode() -> Iterator[None]:
    """The global state every graph is traced and called under (dynamo guards on it): no autograd,
    outside inference mode, no caller's autocast (a runner's own autocast lives inside its graphs)."""
    with torch.inference_mode(False), torch.no_grad(), contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _forward_at(model: nn.Module, schedule: list[int] | None, autocast: torch.dtype | None,
                device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> logits at a fixed schedule, with the weights as folded now (no live delta)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        # No cast cache: each weight is used once a forward, and a CUDA graph must re-read the
        # float32 weights on every replay, so that a degree switch's in-place fold reaches it.
        cast = torch.autocast(device_type, dtype=autocast, cache_enabled=False) if autocast else None
        with cast or contextlib.nullcontext():
            if schedule is None:
                return model(x)
            tokens, state = model._forward_tokens(x, schedule, None)
            return model.forward_head(tokens, size=state.size)

    return forward


class _Graph:
    """One (schedule, bucket): the compiled callable and, on CUDA, its captured graph."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], bucket: int):
        self.fn, self.bucket = fn, bucket
        self.cuda_graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None  # the captured graph's static output


class CompiledRunner:
    """Runs ``model`` at its current degree through precompiled static graphs; see :func:`compile`.

    Attributes:
        degrees: the degrees compiled, as given.
        batch_sizes: the batch buckets, ascending.
        capture_seconds: (degree, bucket) -> seconds its graph took to compile (and capture); a
            degree whose schedule equals an earlier one's shares that graph and has no entry.
        graphs: whether CUDA graphs are captured and replayed.
    """

    def __init__(self, model: nn.Module, degrees: Sequence[Degree], batch_sizes: Sequence[int],
                 backend: str | None, mode: str | None, graphs: bool | None, autocast: torch.dtype | None,
                 input_shape: tuple[int, int, int] | None, fullgraph: bool):
        param = next(model.parameters(), None)
        if param is None:
            raise ValueError("the model has no parameters to run")
        self.model, self.device, self.patched = model, param.device, is_patched(model)
        self.dtype = torch.float32 if autocast is not None else param.dtype
        self.degrees = tuple(degrees)
        self.batch_sizes = _buckets(batch_sizes)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.backend, self.mode, self.autocast, self.fullgraph = backend, mode, autocast, fullgraph
        self._check_options()  # first: a model it cannot run is refused for that, not for its image size
        self.input_shape = tuple(input_shape) if input_shape is not None else _image_shape(model)
        self._keys = {_hashable(d): self._schedule_of(d) for d in self.degrees}
        self._graphs: dict[tuple[Key, int], _Graph] = {}
        self._inputs: dict[int, torch.Tensor] = {}  # CUDA graphs: one static input per bucket
        self._pool = None
        self._weights: tuple[torch.Tensor, int] | None = None  # CUDA graphs: (a weight, its address)
        self._keep: list[torch.Tensor] = []  # the captured weights' storage, never freed under a graph
        self._replay = threading.Lock()
        self.capture_seconds: dict[tuple[Degree, int], float] = {}

    def _check_options(self) -> None:
        if self.model.training:
            raise ValueError("tocom.compile runs inference graphs; call model.eval() first")
        if not self.degrees:
            raise ValueError("give at least one degree to compile, e.g. degrees=(0, 8, 16)")
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {self.device}; "
                             "pass graphs=False (or move the model to the GPU)")
        if self.graphs and self.mode in _CUDAGRAPH_MODES:
            raise ValueError(f"mode={self.mode!r} captures CUDA graphs itself; with graphs=True use "
                             "mode=None or 'max-autotune-no-cudagraphs'")
        if self.backend is None and not self.graphs:
            raise ValueError("backend=None (no torch.compile) only makes sense with CUDA graphs: "
                             "pass graphs=True or a backend")
        if self.patched:
            require_feature(self.model, "per_call", "tocom.compile")
            if not isinstance(self.model, TokensMixin):  # the graphs call its _forward_tokens
                raise ValueError(f"tocom.compile needs timm's call API (forward_tokens, forward_head); "
                                 f"{type(self.model).__name__} lacks it")
        elif any(_hashable(d) != 0 for d in self.degrees):
            raise ValueError(f"an unpatched model runs at degree 0 only, got degrees {self.degrees}; "
                             "tocom.patch(model) first")

    def _schedule_of(self, degree: Degree) -> Key:
        return tuple(self.model.effective_schedule(None, degree)) if self.patched else None

    def warmup(self, recapture: bool = False) -> dict[tuple[Degree, int], float]:
        """Compile (and on CUDA capture) every graph not built yet, or all of them with ``recapture``;
        returns :attr:`capture_seconds`. Call it again after the model's weights were replaced."""
        if recapture:
            self._graphs, self._inputs, self.capture_seconds = {}, {}, {}
            self._pool, self._weights, self._keep = None, None, []
        if self.graphs and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        lock = state_lock(self.model).shared() if self.patched else contextlib.nullcontext()
        with lock, _graph_mode(), _recompile_limits():
            for degree in self.degrees:
                key = self._keys[_hashable(degree)]
                for bucket in self.batch_sizes:
                    if (key, bucket) not in self._graphs:
                        start = time.perf_counter()
                        self._graphs[key, bucket] = self._build(key, bucket)
                        self.capture_seconds[degree, bucket] = time.perf_counter() - start
        if self.graphs:
            weight = next(self.model.parameters())
            self._weights = (weight, weight.data_ptr())
            self._keep = [t.detach() for t in (*self.model.parameters(), *self.model.buffers())]
        return self.capture_seconds

    def _build(self, key: Key, bucket: int) -> _Graph:
        fn = _forward_at(self.model, None if key is None else list(key), self.autocast, self.device.type)
        if self.backend is not None:
            fn = torch.compile(fn, backend=self.backend, mode=self.mode, dynamic=False,
                               fullgraph=self.fullgraph)
        graph = _Graph(fn, bucket)
        x = self._example(bucket)
        if not self.graphs:
            fn(x)  # compiles now, not at the first request
            return graph
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(_WARM_CALLS):
                fn(x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph.cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.cuda_graph, pool=self._pool):
            graph.output = fn(x)
        torch.cuda.synchronize(self.device)
        return graph

    def _example(self, bucket: int) -> torch.Tensor:
        """Images to build with (seeded, leaving the caller's random state alone); on CUDA the bucket's
        static input, allocated outside any capture so that no graph's pool holds it."""
        if bucket in self._inputs:
            return self._inputs[bucket]
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(bucket, *self.input_shape, generator=g, device=self.device, dtype=self.dtype)
        if self.graphs:
            self._inputs[bucket] = x
        return x

    def bucket_for(self, n: int) -> int:
        """The smallest bucket holding ``n`` images (the largest, for a chunk of a bigger batch)."""
        return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

    def _current(self) -> Key:
        if not self.patched:
            return None
        r = self.model.r
        key = self._keys.get(_hashable(r))
        if key is None:  # another spelling of a compiled schedule (e.g. [8] * depth for 8)
            key = self._schedule_of(r)
            if key not in self._keys.values():
                compiled = ", ".join(str(d) for d in self.degrees)
                raise ValueError(f"the model runs at degree {r!r}, which this runner has not compiled "
                                 f"(compiled: {compiled}); switch to one of those or build a runner "
                                 "with tocom.compile(model, degrees=...) that includes it")
        return key

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> outputs (B, ...) of the model at its current degree, any B >= 1."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"this runner was compiled for images (B, {shape}), got {tuple(images.shape)}; "
                             "build one with input_shape=... to serve another size")
        if images.shape[0] == 0:
            raise ValueError("an empty batch: give at least one image")
        if not self._graphs:
            raise ValueError("the runner has no graphs yet: call runner.warmup()")
        lock = state_lock(self.model).shared() if self.patched else contextlib.nullcontext()
        with lock, _graph_mode():  # the degree and weights stay put until every chunk has run
            key = self._current()
            images = images.to(self.device, self.dtype)
            top = self.batch_sizes[-1]
            outs = [self._run(key, images[i:i + top]) for i in range(0, images.shape[0], top)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, key: Key, chunk: torch.Tensor) -> torch.Tensor:
        n = chunk.shape[0]
        graph = self._graphs[key, self.bucket_for(n)]
        if graph.cuda_graph is None:
            if n < graph.bucket:
                chunk = torch.cat([chunk, chunk.new_zeros(graph.bucket - n, *chunk.shape[1:])])
            elif chunk.is_inference():  # an inference tensor would not match the traced guards
                chunk = chunk.clone()
            return graph.fn(chunk)[:n]
        self._check_weights()
        with self._replay:  # one static input per bucket, one memory pool: one replay at a time
            self._inputs[graph.bucket][:n].copy_(chunk)  # rows past n keep older images; sliced off
            graph.cuda_graph.replay()
            return graph.output[:n].clone()

    def _check_weights(self) -> None:
        weight, address = self._weights
        if weight.data_ptr() != address:
            raise ValueError("the model's weights moved since its CUDA graphs were captured (model.to(), a "
                             "cast or new parameters); call runner.warmup(recapture=True)")


def _hashable(degree: Degree) -> int | tuple[int, ...]:
    return tuple(degree) if isinstance(degree, (list, tuple)) else degree


def _buckets(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sorted(set(batch_sizes)))
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive ints, e.g. (1, 8, 32), got {tuple(batch_sizes)}")
    return sizes


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    proj = getattr(embed, "proj", None)
    if size is None or not hasattr(proj, "in_channels"):
        raise ValueError(f"cannot tell the image size that {type(model).__name__} takes; "
                         "pass input_shape=(C, H, W)")
    return (proj.in_channels, *size)


def compile(model: nn.Module, degrees: Sequence[Degree] = (0, 8, 16), batch_sizes: Sequence[int] = (1, 8, 32),
            *, backend: str | None = "inductor", mode: str | None = None, graphs: bool | None = None,
            autocast: torch.dtype | None = None, input_shape: tuple[int, int, int] | None = None,
            fullgraph: bool = False, warmup: bool = True) -> CompiledRunner:
    """An elastic runner for ``model`` (eval mode, patched with :func:`tocom.patch` or stock at degree 0).

    ``runner(images)`` runs at the model's current degree (``model.r``, or :func:`tocom.set_degree`
    with a plugin attached), which must be one of ``degrees``.

    Args:
        degrees: degrees (ints or schedules) to build graphs for.
        batch_sizes: batch buckets; a call pads to the smallest that holds it.
        backend, mode, fullgraph: passed to ``torch.compile`` (always ``dynamic=False``); ``backend=None``
            skips it (CUDA graphs of the eager forward).
        graphs: capture CUDA graphs (default: on CUDA, yes); not with a mode that captures its own.
        autocast: e.g. ``torch.bfloat16``: the graphs run under autocast to that dtype (inputs float32).
        input_shape: (C, H, W) of the images (default: the model's ``patch_embed``).
        warmup: build every graph now (else at :meth:`CompiledRunner.warmup`); timed per graph in
            ``runner.capture_seconds``.
    """
    runner = CompiledRunner(model, degrees, batch_sizes, backend, mode, graphs, autocast, input_shape,
                            fullgraph)
    if warmup:
        runner.warmup()
    return runner
