"""Floor 8: elastic serving. The degree controller and calibration are plain Python (no Ray);
:mod:`tocom.serve.app` (the Ray Serve deployment) needs the ``serve`` extra: ``pip install tocom[serve]``."""

from tocom.serve.batcher import Batcher, Running
from tocom.serve.calibrate import DEFAULT_DEGREES, cache_dir, calibrate, degree_for_latency
from tocom.serve.controller import ArrivalRate, DegreeController, LatencyTable, completion_ms
from tocom.serve.elastic import ElasticModel

__all__ = [
    "DEFAULT_DEGREES", "ArrivalRate", "Batcher", "DegreeController", "ElasticModel", "LatencyTable",
    "Running", "cache_dir", "calibrate", "completion_ms", "degree_for_latency",
]
