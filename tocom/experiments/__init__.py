"""The papers' experiments in miniature (the top floor: uses the jobs, the training loop and the reports)."""

from tocom.experiments.suite import EXPERIMENTS, run_experiment

__all__ = ["EXPERIMENTS", "run_experiment"]
