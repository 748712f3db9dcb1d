"""Prediction records (npz next to a results JSON), provenance and content hashes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tocom
from tocom.report.provenance import content_hash, provenance, sha256_file, sha256_tree
from tocom.report.records import Records, load_results, predictions_path, read_records, write_records


def _records(source: str = "records") -> Records:
    index = np.array([3, 0, 7, 5])
    label = np.array([1, 2, 0, 9])
    runs = [
        ({"task": "cifar10", "seed": 0, "target": 16, "plugin": None}, np.array([1, 2, 1, 9])),
        ({"task": "cifar10", "seed": 0, "target": 16, "plugin": "p.safetensors", "scale": 0.2},
         np.array([1, 2, 0, 9])),
        ({"task": "cifar10", "seed": np.int64(1), "target": 16, "plugin": None}, np.array([0, 2, 0, 1])),
    ]
    return Records.from_runs(index, label, runs, source)


def test_round_trip_is_plain_numpy(tmp_path: Path):
    path = write_records(predictions_path(tmp_path / "gains.json"), _records())
    assert path == tmp_path / "gains.predictions.npz"
    with np.load(path, allow_pickle=False) as raw:  # no pickled objects anywhere
        assert raw["pred"].dtype == np.int16 and raw["pred"].shape == (3, 4)
        assert json.loads(str(raw["configs"]))[2]["seed"] == 1
    back = read_records(path)
    original = _records()
    assert np.array_equal(back.index, original.index) and np.array_equal(back.pred, original.pred)
    assert back.configs == original.configs and back.source == str(path)
    assert back.find({"plugin": None}) == [0, 2]
    assert back.find({"seed": 0, "scale": 0.2}) == [1]
    assert back.correct(1).tolist() == [True, True, True, True]
    assert back.correct([0, 2]).sum(axis=1).tolist() == [3, 2]


def test_large_class_indices_widen_to_int32(tmp_path: Path):
    r = Records.from_runs([0, 1], [40_000, 2], [({"seed": 0}, np.array([40_000, 1]))])
    back = read_records(write_records(tmp_path / "x.predictions.npz", r))
    assert back.pred.dtype == np.int32 and back.label.tolist() == [40_000, 2]


def test_bad_files_are_refused_naming_the_file(tmp_path: Path):
    ok = _records()
    bad = tmp_path / "bad.predictions.npz"

    def save(**change):
        configs = np.array(json.dumps(ok.configs))
        arrays = {"index": ok.index, "label": ok.label, "pred": ok.pred, "configs": configs}
        np.savez(bad, **{k: v for k, v in {**arrays, **change}.items() if v is not None})

    save(pred=ok.pred[:, :3])
    with pytest.raises(ValueError, match=r"bad\.predictions\.npz.*'pred' must have shape"):
        read_records(bad)
    save(configs=np.array(json.dumps(ok.configs[:2])))
    with pytest.raises(ValueError, match=r"bad\.predictions\.npz: 3 prediction rows but 2 configurations"):
        read_records(bad)
    save(pred=None)
    with pytest.raises(ValueError, match=r"missing \['pred'\]"):
        read_records(bad)
    save(configs=np.array(list(ok.configs), dtype=object))
    with pytest.raises(ValueError, match="without pickle"):
        read_records(bad)
    save(index=np.array([1, 1, 2, 3]))
    with pytest.raises(ValueError, match="repeats an image"):
        read_records(bad)
    save(configs=np.array("{not json"))
    with pytest.raises(ValueError, match="not valid JSON"):
        read_records(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.predictions.npz"):
        read_records(bad)
    with pytest.raises(FileNotFoundError, match="rerun the evaluation"):
        read_records(tmp_path / "absent.predictions.npz")
    with pytest.raises(ValueError, match="shape"):
        Records.from_runs([0, 1], [0, 1], [({"seed": 0}, np.array([0, 1, 1]))])


def test_merge_needs_the_same_images_in_the_same_order():
    a = _records("a.npz")
    merged = a.merge(_records("b.npz"))
    assert merged.pred.shape == (6, 4) and len(merged.configs) == 6
    shuffled = Records(a.index[::-1].copy(), a.label[::-1].copy(), a.pred[:, ::-1].copy(), a.configs, "c.npz")
    with pytest.raises(ValueError, match="a.npz and c.npz cover different images"):
        a.merge(shuffled)
    relabelled = Records(a.index, a.label + 1, a.pred, a.configs, "d.npz")
    with pytest.raises(ValueError, match="disagree on the label of image 3"):
        a.merge(relabelled)


def test_load_results_reads_the_listed_prediction_files(tmp_path: Path):
    write_records(tmp_path / "exp.cifar10.predictions.npz", _records())
    write_records(tmp_path / "exp.count.predictions.npz", _records())
    (tmp_path / "exp.json").write_text(json.dumps(
        {"rows": [], "predictions": ["exp.cifar10.predictions.npz", "exp.count.predictions.npz"]}))
    results, records = load_results(tmp_path / "exp.json")
    assert results["rows"] == [] and [Path(r.source).name for r in records] == [
        "exp.cifar10.predictions.npz", "exp.count.predictions.npz"]
    (tmp_path / "lone.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lone\.predictions\.npz"):
        load_results(tmp_path / "lone.json")


def test_hashes_match_hashlib_and_track_content_and_names(tmp_path: Path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    blob = bytes(range(256)) * 9000  # > 1 MiB, so streaming crosses a block boundary
    (data / "sub" / "b.bin").write_bytes(blob)
    (data / "a.txt").write_text("cat")
    assert sha256_file(data / "sub" / "b.bin") == hashlib.sha256(blob).hexdigest()
    expected = hashlib.sha256(
        f"a.txt\0{hashlib.sha256(b'cat').hexdigest()}\n"
        f"sub/b.bin\0{hashlib.sha256(blob).hexdigest()}\n".encode()).hexdigest()
    assert sha256_tree(data) == expected == content_hash(data)
    (data / "a.txt").rename(data / "c.txt")
    assert sha256_tree(data) != expected
    (data / "c.txt").rename(data / "a.txt")
    assert sha256_tree(data) == expected
    (data / "a.txt").write_text("cut")
    assert sha256_tree(data) != expected
    with pytest.raises(FileNotFoundError, match="not a folder"):
        sha256_tree(tmp_path / "nope")


def test_provenance_names_commit_versions_and_device():
    info = provenance("cpu")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True).stdout.strip()
    assert info["commit"] == (head or None)
    assert isinstance(info["dirty"], bool) or info["commit"] is None
    assert info["versions"]["numpy"] == np.__version__ and set(info["versions"]) >= {"torch", "timm", "scipy"}
    assert info["versions"]["tocom"] == tocom.__version__
    assert info["device"].startswith("cpu") and info["python"].count(".") == 2
    json.dumps(info)


def test_an_archive_that_expands_past_the_bound_is_refused_before_reading(tmp_path: Path):
    """A few kilobytes of compressed zeros that would take 400 MB, and an array header that
    promises more than its member holds: both refused from the archive's directory and headers."""
    import zipfile

    bomb = tmp_path / "bomb.predictions.npz"
    ok = _records()
    with open(bomb, "wb") as f:
        np.savez_compressed(f, index=ok.index, label=ok.label, pred=np.zeros((1000, 100_000), np.int32),
                            configs=np.array(json.dumps(ok.configs)))
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(ValueError, match=r"bomb\.predictions\.npz: its arrays take 381 MB, over the 64 MB"):
        read_records(bomb)
    liar = tmp_path / "liar.predictions.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i4", "fortran_order": False,
                                                  "shape": (100_000, 100_000)})
    with zipfile.ZipFile(liar, "w") as archive:
        archive.writestr("pred.npy", header.getvalue() + b"\0" * 64)  # the header has the magic
    with pytest.raises(ValueError, match=r"array pred\.npy declares \(100000, 100000\)"):
        read_records(liar)
