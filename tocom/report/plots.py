"""Plots of accuracy against compression degree (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def accuracy_plot(curves: Mapping[str, Sequence[tuple[int, float]]], out: str | Path, title: str = "",
                  xlabel: str = "target degree r (tokens merged per block)",
                  ylabel: str | None = None) -> Path:
    """Save a line plot with one curve per label; each curve is a list of (r, accuracy in [0, 1]).

    With ``ylabel`` the values are plotted as given under that label (a loss, say), not as %.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: CI and servers have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    factor = 100 if ylabel is None else 1
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [factor * p[1] for p in points], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or "top-1 accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
