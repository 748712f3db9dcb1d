"""Per-image prediction records, saved next to a results JSON so that any two rows can be compared pairwise.

``NAME.predictions.npz`` (plain numpy arrays, readable with ``allow_pickle=False``):

- ``index`` ``(N,)`` int64: each image's index in its dataset split, in evaluation order;
- ``label`` ``(N,)`` int16/int32: its true class;
- ``pred`` ``(C, N)`` int16/int32: the predicted class under each of C configurations;
- ``configs``: a JSON array of C objects, one per row of ``pred`` (task, seed, source, target,
  plugin, scale, ...), stored as a 0-d unicode array.

One file holds one image set. A results JSON that covers several image sets (tasks) lists its files
under ``"predictions"`` (paths relative to the JSON); without that key it has ``NAME.predictions.npz``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from tocom.atomic import atomic_write

SUFFIX = ".predictions.npz"
_KEYS = ("index", "label", "pred", "configs")


def _class_dtype(*arrays: np.ndarray) -> type:
    top = max((int(np.abs(a).max()) for a in arrays if a.size), default=0)
    return np.int16 if top <= np.iinfo(np.int16).max else np.int32


def _json_value(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"configuration value {value!r} ({type(value).__name__}) is not JSON: use str/int/float")


def matches(config: Mapping, where: Mapping) -> bool:
    """True when ``config`` has every ``key: value`` of ``where`` (``None`` also matches a missing key)."""
    return all(config.get(key) == value for key, value in where.items())


@dataclass(frozen=True, eq=False)
class Records:
    """Predictions of C configurations on one image set. ``source`` names the file in error messages."""

    index: np.ndarray  # (N,)
    label: np.ndarray  # (N,)
    pred: np.ndarray  # (C, N)
    configs: tuple[dict, ...]  # C
    source: str = "records"

    def __post_init__(self) -> None:
        where = self.source
        for name in ("index", "label", "pred"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{where}: '{name}' must be an integer array, got "
                                 f"{getattr(arr, 'dtype', type(arr).__name__)}")
        if self.index.ndim != 1 or self.label.shape != self.index.shape:
            raise ValueError(f"{where}: 'index' and 'label' must both have shape (N,), "
                             f"got {self.index.shape} and {self.label.shape}")
        n = self.index.shape[0]
        if self.pred.ndim != 2 or self.pred.shape[1] != n:
            raise ValueError(f"{where}: 'pred' must have shape (configurations, {n} images), "
                             f"got {self.pred.shape}")
        if len(self.configs) != self.pred.shape[0]:
            raise ValueError(f"{where}: {self.pred.shape[0]} prediction rows but {len(self.configs)} "
                             "configurations; each row of 'pred' needs one entry in 'configs'")
        if not all(isinstance(c, dict) for c in self.configs):
            raise ValueError(f"{where}: every configuration must be a JSON object (dict)")
        if np.unique(self.index).size != n:
            raise ValueError(f"{where}: 'index' repeats an image; each image must appear once")

    @classmethod
    def from_runs(
        cls,
        index: ArrayLike,
        label: ArrayLike,
        runs: Iterable[tuple[Mapping, ArrayLike]],
        source: str = "records",
    ) -> Records:
        """Stack ``(config, pred (N,))`` pairs, in evaluation order, into one record set."""
        runs = list(runs)
        index, label = np.asarray(index), np.asarray(label)
        preds = [np.asarray(p) for _, p in runs]
        for (config, _), p in zip(runs, preds):
            if p.shape != label.shape:
                raise ValueError(f"{source}: predictions for {dict(config)} have shape {p.shape}, "
                                 f"expected {label.shape} (one per image)")
        pred = np.stack(preds) if preds else np.zeros((0, label.shape[0]), dtype=label.dtype)
        configs = tuple(json.loads(json.dumps(dict(c), default=_json_value)) for c, _ in runs)
        return cls(index.astype(np.int64), label, pred, configs, source)

    @property
    def n_images(self) -> int:
        return int(self.index.shape[0])

    def find(self, where: Mapping) -> list[int]:
        """Rows whose configuration matches ``where`` (see :func:`matches`)."""
        return [i for i, c in enumerate(self.configs) if matches(c, where)]

    def correct(self, rows: int | Sequence[int]) -> np.ndarray:
        """Per-image correctness: ``(N,)`` for one row, ``(len(rows), N)`` for several."""
        return self.pred[rows] == self.label

    def check_same_images(self, other: Records) -> None:
        """Raise unless ``other`` covers the same images, in the same order, with the same labels."""
        if self.index.shape != other.index.shape or not np.array_equal(self.index, other.index):
            raise ValueError(f"{self.source} and {other.source} cover different images (or a different "
                             "order); paired comparisons need the same evaluation subset and order")
        bad = np.flatnonzero(self.label != other.label)
        if bad.size:
            raise ValueError(f"{self.source} and {other.source} disagree on the label of image "
                             f"{int(self.index[bad[0]])} ({bad.size} images differ): not the same split")

    def merge(self, other: Records) -> Records:
        """Configurations of both record sets, which must share their images."""
        self.check_same_images(other)
        return Records(self.index, self.label, np.concatenate([self.pred, other.pred]),
                       self.configs + other.configs, f"{self.source}+{other.source}")


def predictions_path(results_json: str | Path) -> Path:
    """``NAME.predictions.npz`` beside ``NAME.json``."""
    path = Path(results_json)
    return path.with_name(path.name.removesuffix(".json") + SUFFIX)


def write_records(path: str | Path, records: Records) -> Path:
    """Write ``records`` atomically as a compressed npz (class arrays as int16 where they fit)."""
    dtype = _class_dtype(records.label, records.pred)
    arrays = {
        "index": records.index.astype(np.int64),
        "label": records.label.astype(dtype),
        "pred": records.pred.astype(dtype),
        "configs": np.array(json.dumps(list(records.configs), default=_json_value)),
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append its own .npz suffix
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


# Far above any evaluation tocom writes (50k images x 200 configurations of int16 is 20 MB).
MAX_RECORD_BYTES = 64 << 20


def _check_sizes(path: Path, max_bytes: int) -> None:
    """Refuse an archive whose arrays would take more than ``max_bytes``, or whose array headers
    promise more data than the archive holds, without decompressing any array."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            total = sum(info.file_size for info in infos)
            if total > max_bytes:
                raise ValueError(f"{path}: its arrays take {total / 2**20:.0f} MB, over the "
                                 f"{max_bytes / 2**20:.0f} MB limit (read_records(max_bytes=...) raises it)")
            for info in infos:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member, max_header_size=10_000)
                if dtype.hasobject:
                    raise ValueError(f"{path}: array {info.filename} holds Python objects, which are not "
                                     "read without pickle; rewrite it with plain arrays")
                if math.prod(shape) * dtype.itemsize > info.file_size:
                    raise ValueError(f"{path}: array {info.filename} declares {shape} {dtype}, more than "
                                     "the archive holds")
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path}: not readable as a predictions npz ({err}); rerun the evaluation") from err


def read_records(path: str | Path, max_bytes: int = MAX_RECORD_BYTES) -> Records:
    """Load and validate a predictions file; errors name the file and what is wrong with it.

    ``max_bytes`` bounds what the arrays may occupy once read, checked from the archive's
    directory and each array's header before anything is decompressed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no predictions file {path}: rerun the evaluation that writes it")
    _check_sizes(path, max_bytes)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an npz archive")
        with data:
            names = list(data.files)
            arrays = {k: data[k] for k in _KEYS if k in names}
    except (OSError, EOFError, ValueError) as err:  # truncated, foreign or pickled content
        raise ValueError(f"{path}: not readable as a predictions npz without pickle ({err})") from err
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: not a predictions file, missing {missing} (has {names})")
    configs = arrays.pop("configs")
    try:
        configs = json.loads(str(configs)) if configs.ndim == 0 and configs.dtype.kind == "U" else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: 'configs' is not valid JSON ({err})") from err
    if not isinstance(configs, list):
        raise ValueError(f"{path}: 'configs' must be a JSON array of configuration objects")
    return Records(**arrays, configs=tuple(configs), source=str(path))


def load_results(results_json: str | Path) -> tuple[dict, list[Records]]:
    """A results JSON and its prediction records (the files under ``"predictions"``, else the default)."""
    path = Path(results_json)
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(results, dict):
        raise ValueError(f"{path}: a results file must hold a JSON object")
    files = results.get("predictions")
    paths = [path.parent / f for f in files] if files is not None else [predictions_path(path)]
    return results, [read_records(p) for p in paths]
