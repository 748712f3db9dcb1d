"""Floor 3: running a patched model fast, through precompiled static graphs per degree and batch bucket.

:func:`compile` builds a :class:`CompiledRunner` (``torch.compile`` graphs; CUDA graphs on a GPU);
see ``docs/gpu.md``.
"""

from tocom.runtime.compiled import CompiledRunner, compile

__all__ = ["CompiledRunner", "compile"]
