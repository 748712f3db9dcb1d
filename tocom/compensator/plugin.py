"""The user-facing plugin: :class:`Compensator` = the arithmetic of
:class:`~tocom.compensator.bank.CompensatorBank` plus construction for a model, files and the hub.

Layering inside the package: ``bank`` (arithmetic) <- ``io`` (files) <- ``hub``; ``bank`` <- ``fit``
(shapes read off a model); this module sits on top of all four, so nothing below knows it.
"""

from __future__ import annotations

import os

from torch import nn

from tocom.compensator import hub, io
from tocom.compensator.bank import VARIANTS, CompensatorBank, PluginSpec
from tocom.compensator.fit import spec_for

__all__ = ["VARIANTS", "Compensator", "PluginSpec"]


class Compensator(CompensatorBank):
    """A ToCom plugin (see :class:`CompensatorBank` for the tensors and their arithmetic)."""

    @classmethod
    def init_for(cls, model: nn.Module, groups: int = 16, rank: int = 2, scale: float = 0.1,
                 method: str | None = None, variant: str = "standard", arch: str | None = None,
                 mode: str = "standard") -> Compensator:
        """A fresh plugin shaped for ``model`` (any supported family, recorded in ``spec.family``);
        ``method`` is the compression it compensates (None: the one ``model`` is patched for, else
        ``"tome"``), ``mode`` the compression mode it serves."""
        if method is None:
            config = getattr(model, "_tocom", None)
            method = config.method if config is not None else "tome"
        return cls(spec_for(model, groups=groups, rank=rank, scale=scale, method=method,
                            variant=variant, arch=arch, mode=mode))

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.tocom.safetensors`` file (atomically)."""
        io.save_plugin(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Compensator:
        """Read a plugin file written by :meth:`save`."""
        return io.load_plugin(path, cls)

    @classmethod
    def from_pretrained(cls, repo_or_dir: str, filename: str | None = None, **hub_kwargs) -> Compensator:
        """Load from a local folder or a Hugging Face hub repo."""
        return hub.from_pretrained(repo_or_dir, filename, cls, **hub_kwargs)

    def push_to_hub(self, repo_id: str, **hub_kwargs) -> str:
        """Upload the plugin file and a model card; returns the commit URL."""
        return hub.push_to_hub(self, repo_id, **hub_kwargs)
