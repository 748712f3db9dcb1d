"""Layer 1: schedules, matching, merging, pruning, unmerge and FLOPs on small tensors."""

from __future__ import annotations

import pytest
import torch
from reference_tome import naive_merge

from tocom.compress import (
    ViTDims,
    bipartite_matching,
    clamp_schedule,
    gflops,
    initial_source,
    merge_source,
    merge_wavg,
    modulate_sources,
    prune,
    prune_plan,
    ratio_schedule,
    resolve_schedule,
    schedule_from_flops,
    tokens_per_layer,
    unmerge,
)


def test_schedule_forms():
    assert resolve_schedule(3, 4) == [3, 3, 3, 3]
    assert resolve_schedule([1, 2], 4) == [1, 2, 0, 0]
    assert resolve_schedule((8, 0.0), 4) == [8, 8, 8, 8]
    # ToMe's "decreasing" schedule: starts at 2r, ends at 0, mean r.
    assert resolve_schedule((8, -1.0), 5) == [16, 12, 8, 4, 0]
    assert resolve_schedule((8, 1.0), 5) == [0, 4, 8, 12, 16]


@pytest.mark.parametrize("bad", [-1, [1, -2], (4, 2.0), (-3, 0.5)])
def test_schedule_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        resolve_schedule(bad, 4)


def test_schedule_rejects_wrong_length_and_type():
    with pytest.raises(ValueError, match="4 blocks"):
        resolve_schedule([1] * 5, 4)
    with pytest.raises(TypeError):
        resolve_schedule("8", 4)


def test_clamp_schedule_caps_each_layer():
    # 17 tokens, 1 protected: at most 8 then 4 then 2 then 1 then 0.
    assert clamp_schedule([100] * 6, 17, 1) == [8, 4, 2, 1, 0, 0]
    assert tokens_per_layer([100] * 6, 17, 1) == [9, 5, 3, 2, 2, 2]
    assert clamp_schedule([2, 2], 17, 1) == [2, 2]


def test_ratio_schedule_matches_eq1():
    # F/f = 2 makes g linear: every layer removes (T - t) / L.
    assert ratio_schedule(0.5, 4, 196, 100) == [24, 24, 24, 24]
    # A smaller ratio front-loads the reduction.
    s = ratio_schedule(0.25, 12, 196, 10)
    assert s == sorted(s, reverse=True) and s[0] > s[-1]


def test_schedule_from_flops_hits_target():
    dims = ViTDims(depth=12, embed_dim=384, mlp_hidden=1536, num_patches=196, num_prefix=1)
    full = gflops(dims, [0] * 12)
    assert 4.5 < full < 4.7  # DeiT-S is 4.6 GFLOPs
    s = schedule_from_flops(dims, 0.5)
    assert abs(gflops(dims, s) / full - 0.5) < 0.02
    assert clamp_schedule(s, 197, 1) == s


def _random_tokens(batch=3, n=11, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, c, generator=g), torch.randn(batch, n, 5, generator=g)


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3])
@pytest.mark.parametrize("r", [1, 3, 4])
def test_merge_equals_naive_reference(num_prefix, r):
    x, metric = _random_tokens()
    size = torch.rand(3, 11, 1) + 0.5
    plan = bipartite_matching(metric, r, num_prefix)
    merged, new_size = merge_wavg(plan, x, size)
    for i in range(3):
        ref_x, ref_size, _ = naive_merge(metric[i], x[i], size[i, :, 0], r, num_prefix)
        torch.testing.assert_close(merged[i], ref_x)
        torch.testing.assert_close(new_size[i, :, 0], ref_size)


def test_prefix_tokens_preserved_and_first():
    x, metric = _random_tokens(n=13)
    # Make the prefix tokens identical to patch tokens, the most tempting merge partners.
    metric[:, 0] = metric[:, 2]
    metric[:, 1] = metric[:, 3]
    plan = bipartite_matching(metric, 5, num_prefix=2)
    merged, size = merge_wavg(plan, x, None)
    torch.testing.assert_close(merged[:, :2], x[:, :2])
    assert torch.all(size[:, :2] == 1)


def test_sizes_and_sources_account_for_every_token():
    x, metric = _random_tokens(n=17)
    size, source = None, initial_source(3, 17)
    for r in (4, 3, 2):
        plan = bipartite_matching(metric, r, 1)
        source = merge_source(plan, source)
        metric, _ = merge_wavg(plan, metric, size)
        x, size = merge_wavg(plan, x, size)
    assert x.shape[1] == 17 - 9
    assert torch.all(size.sum(1) == 17)
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)
    assert torch.all(source.sum(1) == 1)  # each original token belongs to exactly one group


def test_unmerge_broadcasts_groups():
    x, metric = _random_tokens(n=9)
    source = initial_source(3, 9)
    plan = bipartite_matching(metric, 3, 1)
    source = merge_source(plan, source)
    merged, _ = merge_wavg(plan, x, None)
    full = unmerge(merged, source)
    assert full.shape == (3, 9, 8)
    for i in range(3):
        for j in range(9):
            owner = int(source[i, :, j].argmax())
            torch.testing.assert_close(full[i, j], merged[i, owner])
    with pytest.raises(ValueError, match="does not match"):
        unmerge(merged[:, :2], source)


def test_gradients_flow_through_merge():
    x, metric = _random_tokens()
    x.requires_grad_(True)
    merged, _ = merge_wavg(bipartite_matching(metric, 3, 1), x, None)
    merged.sum().backward()
    assert x.grad is not None and torch.all(x.grad != 0)


def test_modulate_sources_changes_only_sources():
    x, metric = _random_tokens()
    plan = bipartite_matching(metric, 3, 1)
    out = modulate_sources(plan, x, lambda s, d: s + d)
    changed = (out != x).any(-1)
    assert torch.all(changed.sum(1) == 3)
    a_src = (2 * plan.src_idx[..., 0])
    assert torch.all(changed.gather(1, a_src))


def test_matching_rejects_impossible_r():
    with pytest.raises(ValueError):
        bipartite_matching(torch.randn(1, 9, 4), 5, 1)


def test_evit_keeps_highest_attention_tokens():
    attn = torch.tensor([[0.5, 0.01, 0.2, 0.02, 0.1, 0.03, 0.14]])
    x = torch.arange(7.0).view(1, 7, 1)
    plan = prune_plan(attn, 3, num_prefix=1)
    kept, size = prune(plan, x, None)
    assert kept[0, :, 0].tolist() == [0.0, 2.0, 4.0, 6.0]
    assert size is None


def test_evit_fuse_keeps_count_and_weights():
    attn = torch.tensor([[0.5, 0.01, 0.2, 0.02, 0.1, 0.03, 0.14]])
    x = torch.arange(7.0).view(1, 7, 1)
    plan = prune_plan(attn, 2, num_prefix=1, fuse=True)
    kept, size = prune(plan, x, None)
    assert kept.shape[1] == 5  # net r = 2
    w = torch.tensor([0.01, 0.02, 0.03])
    expected = float((w * torch.tensor([1.0, 3.0, 5.0])).sum() / w.sum())
    assert kept[0, :4, 0].tolist() == [0.0, 2.0, 4.0, 6.0]
    assert kept[0, 4, 0].item() == pytest.approx(expected)
    assert size[0, :, 0].tolist() == [1, 1, 1, 1, 3]
