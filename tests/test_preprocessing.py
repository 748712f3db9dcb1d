"""A fine-tuned checkpoint records the preprocessing it was validated with, and evaluation uses it.

Regression test for the bug where VTAB models trained and validated on squashed images were
evaluated on timm's resize-and-centre-crop (11 points lost at r = 0 on a held-out task).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_distill import tiny_checkpoint

from tocom.cli import main
from tocom.data import (
    eval_transform,
    preprocessing_record,
    train_transform,
    transform_from_record,
    write_vtab,
)
from tocom.finetuned import checkpoint_metadata, eval_transform_for, load_model, recorded_preprocessing

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    write_vtab("shape", root / "task", seed=0, image_size=32, n_train=8, n_val=12, n_test=4)
    out = root / "full.safetensors"
    main(["finetune", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint(root)), "--data",
          str(root / "task"), "--method", "full", "--r", "2", "--epochs", "1", "--batch-size", "4",
          "--workers", "0", "--out", str(out)])
    return out, root / "task"


def test_checkpoint_records_squash_and_evaluation_uses_it(finetuned):
    out, _ = finetuned
    model = load_model("vit_tiny_patch16_224", out)
    meta = checkpoint_metadata(out)
    assert json.loads(meta["preprocessing"])["resize"] == "squash"  # the small preset validates squashed
    used = eval_transform_for(out, model)(IMAGE)
    assert torch.equal(used, train_transform("squash", model_or_cfg=model)(IMAGE))
    assert not torch.equal(used, eval_transform(model)(IMAGE))  # the old, mismatched evaluation
    crop = eval_transform_for(out, model, resize="crop")(IMAGE)  # explicit override still possible
    assert torch.equal(crop, eval_transform(model)(IMAGE))


def test_tocom_eval_reproduces_the_validation_accuracy_recorded_at_fine_tuning(finetuned, capsys):
    out, task = finetuned
    capsys.readouterr()
    recorded = json.loads(checkpoint_metadata(out)["recipe"])["val_acc"]
    main(["eval", "vit_tiny_patch16_224", "--checkpoint", str(out), "--data", str(task), "--split", "val",
          "--target", "2", "--json", "--workers", "0"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows[0]["accuracy"] == pytest.approx(recorded, abs=1e-9)


def test_older_checkpoints_are_read_by_their_recipe_and_plain_ones_crop():
    from conftest import tiny_vit

    model = tiny_vit()
    squash = recorded_preprocessing({"recipe": json.dumps({"augment": "squash"})}, model)
    assert squash == preprocessing_record("squash", model)
    assert recorded_preprocessing({}, model)["resize"] == "crop"


def test_records_round_trip_and_bad_records_are_refused():
    from conftest import tiny_vit

    model = tiny_vit()
    for resize in ("crop", "squash"):
        record = json.loads(json.dumps(preprocessing_record(resize, model)))  # as stored in metadata
        assert transform_from_record(record)(IMAGE).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="missing"):
        transform_from_record({"resize": "squash"})
    with pytest.raises(ValueError, match="unknown resize"):
        preprocessing_record("pad", model)
