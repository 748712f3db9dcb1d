"""The papers' experiments in miniature (layer 6 and up: uses the engine)."""

from tocom.experiments.suite import EXPERIMENTS, run_experiment

__all__ = ["EXPERIMENTS", "run_experiment"]
