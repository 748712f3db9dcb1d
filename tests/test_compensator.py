"""Layer 4: plugin arithmetic, attach/detach, files and fit checks."""

from __future__ import annotations

import pytest
import torch
from conftest import random_plugin, tiny_vit

import tocom
from tocom.compensator import Compensator


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("variant", ["standard", "shared", "no_inversion"])
def test_deltas_add_up_and_invert(variant):
    plugin = random_plugin(tiny_vit(), variant=variant)
    d = lambda s, t: plugin.deltas(s, t, dtype=torch.float64)
    torch.testing.assert_close(d(0, 4) + d(4, 8), d(0, 8), rtol=0, atol=1e-12)
    assert torch.equal(d(5, 5), torch.zeros_like(d(5, 5)))
    assert d(0, 8).abs().sum() > 0
    if variant != "no_inversion":
        torch.testing.assert_close(d(8, 0), -d(0, 8), rtol=0, atol=1e-12)
    else:  # separate groups for lowering: not the negation of raising
        assert not torch.allclose(d(8, 0), -d(0, 8))
        torch.testing.assert_close(d(8, 4) + d(4, 0), d(8, 0), rtol=0, atol=1e-12)


def test_standard_delta_is_signed_sum_of_groups():
    plugin = random_plugin(tiny_vit())
    a, b = plugin.A.double(), plugin.B.double()
    expected = 0.1 * sum(b[1, 0, i] @ a[1, 0, i] for i in range(2, 6))
    torch.testing.assert_close(plugin.deltas(2, 6, dtype=torch.float64)[1, 0], expected)
    torch.testing.assert_close(plugin.deltas(6, 2, dtype=torch.float64)[1, 0], -expected)


def test_attach_set_degree_detach_exact():
    model = tiny_vit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    x = images()
    with torch.no_grad():
        at0 = model(x)
        tocom.set_degree(model, 4)
        assert model.r == 4
        at4 = model(x)
        w = model.blocks[1].attn.qkv.weight
        d = 64
        w0 = original["blocks.1.attn.qkv.weight"]
        torch.testing.assert_close(w[:d] - w0[:d], plugin.deltas(0, 4)[1, 0])
        torch.testing.assert_close(w[2 * d:] - w0[2 * d:], plugin.deltas(0, 4)[1, 1])  # v rows
        a, b = plugin.A.double()[1, 1], plugin.B.double()[1, 1]  # block 1, projection v, by hand
        by_hand = 0.1 * sum(b[i] @ a[i] for i in range(4))
        torch.testing.assert_close((w[2 * d:] - w0[2 * d:]).double(), by_hand, rtol=1e-4, atol=1e-6)
        assert torch.equal(w[d:2 * d], w0[d:2 * d])  # k untouched
        for t in (8, 2, 7, 4):
            tocom.set_degree(model, t)
        assert torch.equal(model(x), at4)  # switching back and forth never drifts
        tocom.set_degree(model, 0)
        assert torch.equal(model(x), at0)
    tocom.detach(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_set_degree_matches_live_delta():
    model = tiny_vit()
    plugin = random_plugin(model)
    x = images()
    tocom.attach(model, plugin, source=2)
    with torch.no_grad():
        tocom.set_degree(model, 6)
        folded = model(x)
    tocom.detach(model)
    with torch.no_grad():
        tokens, state = model.forward_tokens(x, r=6, qv_delta=plugin.live_delta(2, 6))
        live = model.forward_head(tokens, size=state.size)
    assert model.r == 2  # the live delta is per call: nothing stays on the model
    torch.testing.assert_close(live, folded, rtol=1e-4, atol=1e-5)


def test_degree_out_of_range_and_double_attach():
    model = tiny_vit()
    plugin = random_plugin(model, groups=8)
    tocom.attach(model, plugin, source=0)
    with pytest.raises(ValueError, match="0..8"):
        tocom.set_degree(model, 9)
    with pytest.raises(ValueError, match="already attached"):
        tocom.attach(model, plugin, source=0)
    with pytest.raises(ValueError, match="outside"):
        tocom.attach(tiny_vit(), plugin, source=-1)
    with pytest.raises(ValueError, match="no compensator"):
        tocom.set_degree(tiny_vit(), 2)


def test_plugin_that_does_not_fit_is_refused():
    plugin = random_plugin(tiny_vit())
    with pytest.raises(ValueError, match="depth 4, model has 6"):
        tocom.attach(tiny_vit(depth=6), plugin, source=0)
    with pytest.raises(ValueError, match="embed dim 64, model has 96"):
        tocom.attach(tiny_vit(embed_dim=96), plugin, source=0)


def test_save_load_round_trip_and_metadata(tmp_path):
    model = tiny_vit()
    plugin = random_plugin(model, variant="no_inversion")
    plugin.spec.recipe.update({"steps": 10})
    path = tmp_path / "p.tocom.safetensors"
    plugin.save(path)
    loaded = Compensator.load(path)
    assert loaded.spec == plugin.spec
    assert torch.equal(loaded.A, plugin.A) and torch.equal(loaded.B, plugin.B)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for key in ("arch", "embed_dim", "depth", "num_heads", "groups", "rank", "scale", "method",
                "max_degree", "recipe", "variant"):
        assert key in meta
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.tocom.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable plugin"):
        Compensator.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"A": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a tocom compensator"):
        Compensator.load(other)
    with pytest.raises(FileNotFoundError):
        Compensator.load(tmp_path / "missing.safetensors")


def test_from_pretrained_local_folder_and_push(tmp_path, monkeypatch):
    plugin = random_plugin(tiny_vit())
    plugin.save(tmp_path / "compensator.tocom.safetensors")
    loaded = Compensator.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.B, plugin.B)

    uploaded = {}

    class FakeApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["card"] = (Path(folder_path) / "README.md").read_text()
            uploaded["plugin"] = Compensator.load(Path(folder_path) / "compensator.tocom.safetensors")
            return "https://hub/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert plugin.push_to_hub("me/plugin") == "https://hub/commit/1"
    assert uploaded["repo"] == "me/plugin"
    assert uploaded["files"] == ["README.md", "compensator.tocom.safetensors"]
    assert "Token Compensator" in uploaded["card"] and torch.equal(uploaded["plugin"].A, plugin.A)


def test_from_pretrained_uses_hub_download(tmp_path, monkeypatch):
    plugin = random_plugin(tiny_vit())
    path = tmp_path / "cache" / "compensator.tocom.safetensors"
    plugin.save(path)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = Compensator.from_pretrained("someone/deit-tiny-tocom")
    assert calls == [("someone/deit-tiny-tocom", "compensator.tocom.safetensors")]
    assert torch.equal(loaded.A, plugin.A)


def test_evit_plugin_folds_switches_and_detaches():
    model = tocom.patch(tiny_vit(), "evit", fuse=True)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = Compensator.init_for(model, groups=8, rank=2, scale=0.1, method="evit")
    with torch.no_grad():
        plugin.B.normal_(0, 0.05)
    tocom.attach(model, plugin, source=1)
    x = images()
    with torch.no_grad():
        live = model(x, r=5)
        tocom.set_degree(model, 5)
        folded = model(x)
        assert model.last_state.tokens[0] == 17 - 5  # pruning, with one fused token, at the new degree
    torch.testing.assert_close(live, folded, rtol=1e-4, atol=1e-5)
    tocom.detach(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
