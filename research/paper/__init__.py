"""The papers' experiments: the evidence run and the miniatures, beside the library.

Run from a clone as ``python -m research.paper``; the installed package never imports this.
"""

from research.paper.suite import EXPERIMENTS, run_experiment

__all__ = ["EXPERIMENTS", "run_experiment"]
