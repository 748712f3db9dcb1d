"""PiToMe and ToFu behind ``tocom.patch(method=...)``, checked against naive loop references.

The references below restate each rule token by token with Python lists (energy, margin, matching,
MLERP, ToFu's prune/merge switch) from the papers as written in the module docstrings of
``tocom.compress.pitome`` and ``tocom.compress.tofu``; ToFu's matching reuses the naive ToMe
matching of tests/reference_tome.py. Nothing here calls tocom's own reduction code.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_tome import naive_merge

import tocom
from tocom.compensator import Compensator, DistillObjective, attach, detach, set_degree
from tocom.compress import (
    bipartite_matching,
    energy_score,
    initial_source,
    merge_mlerp,
    parse_schedule,
    pitome_matching,
    pitome_source,
    pitome_wavg,
    tofu_prune,
    tokens_per_layer,
    unmerge,
)
from tocom.compress.pitome import pitome_block_plan

NEW = ("pitome", "tofu")
TOL = dict(rtol=1e-5, atol=1e-5)  # one image's float32 sums against batched kernels


# ---------------------------------------------------------------- naive references, one image each

def naive_energy(metric: torch.Tensor, margin: float) -> list[float]:
    """metric (P, C) -> energy of each token: mean over j of f(cos_ij - margin), f an ELU (alpha 1)."""
    n = metric.shape[0]
    out = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            cos = float(metric[i] @ metric[j] / (metric[i].norm() * metric[j].norm()))
            d = cos - margin
            total += d if d >= 0 else math.exp(d) - 1.0
        out.append(total / n)
    return out


def naive_pitome(metric, x, size, r, num_prefix, margin, bipartite=False):
    """One image: metric (N, Cm), x (N, C), size (N,) -> merged x, sizes and member lists in output
    order (prefix first, then surviving patch tokens in original order). The energy rule pairs the
    top 2r tokens by energy rank; ``bipartite`` alternates A/B over all of them and keeps the r
    A tokens whose best B partner is most similar."""
    n = x.shape[0]
    patches = list(range(num_prefix, n))
    energy = naive_energy(metric[num_prefix:], margin)
    ranked = [patches[i] for i in sorted(range(len(patches)), key=lambda i: -energy[i])]
    if bipartite:
        set_a, set_b = ranked[0::2], ranked[1::2]
    else:
        set_a, set_b = ranked[: 2 * r : 2], ranked[1 : 2 * r : 2]
    best = {}  # A token -> (similarity, its most similar B token)
    for a in set_a:
        cos = [float(metric[a] @ metric[b] / (metric[a].norm() * metric[b].norm())) for b in set_b]
        j = max(range(len(cos)), key=lambda i: cos[i])
        best[a] = (cos[j], set_b[j])
    merged = sorted(set_a, key=lambda a: -best[a][0])[:r] if bipartite else set_a
    groups = {t: [t] for t in range(n)}
    for a in merged:
        groups[best[a][1]].append(a)
    order = list(range(num_prefix)) + sorted(t for t in patches if t not in merged)
    members = [sorted(groups[t]) for t in order]
    out_x = torch.stack([(x[m] * size[m, None]).sum(0) / size[m].sum() for m in members])
    return out_x, torch.stack([size[m].sum() for m in members]), members


def naive_tofu(metric, x, size, r, num_prefix, merges):
    """One image of ToFu: ToMe's matching; MLERP (size-weighted mean, largest member norm) when
    ``merges``, else each group keeps its destination (the set-B member, at an odd position)."""
    _, out_size, members = naive_merge(metric, x, size, r, num_prefix)
    rows = []
    for m in members:
        if merges:
            mean = (x[m] * size[m, None]).sum(0) / size[m].sum()
            rows.append(mean / mean.norm() * max(float(x[t].norm()) for t in m))
        else:
            rows.append(x[[t for t in m if t % 2 == 1][0] if len(m) > 1 else m[0]])
    return torch.stack(rows), out_size, members


def naive_vit(model, images, schedule, reduce_one):
    """Logits of a tiny timm ViT (class token, no layer scale) image by image, with an explicit
    softmax and proportional attention; ``reduce_one(layer, keys, x, size, r)`` reduces tokens."""
    outputs = []
    for img in images:
        x = model._pos_embed(model.patch_embed(img[None]))[0]
        size = torch.ones(x.shape[0])
        for layer, (blk, r) in enumerate(zip(model.blocks, schedule)):
            attn, h = blk.attn, blk.norm1(x)
            q, k, v = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            logits = q @ k.transpose(-1, -2) * attn.head_dim ** -0.5 + size.log()[None, None, :]
            w = torch.exp(logits - logits.amax(-1, keepdim=True))
            x = x + attn.proj(((w / w.sum(-1, keepdim=True)) @ v).transpose(0, 1).reshape(h.shape[0], -1))
            if r:
                x, size, _ = reduce_one(layer, k.mean(0), x, size, r)
            x = x + blk.mlp(blk.norm2(x))
        outputs.append(model.forward_head(model.norm(x[None]))[0])
    return torch.stack(outputs)


def pitome_layer(depth, bsm_blocks=None):
    # The authors' ViT setting: margin 0.75 (1 - l / L), the bipartite variant in the first
    # ceil(L / 2) blocks (0-based l < ceil(L / 2)), the energy rule after.
    bsm = math.ceil(depth / 2) if bsm_blocks is None else bsm_blocks
    return lambda layer, keys, x, size, r: naive_pitome(keys, x, size, r, 1, 0.75 * (1 - layer / depth),
                                                        bipartite=layer < bsm)


def tofu_layer(depth):
    # ToFu's switch: the first half of the blocks (0-based l <= L // 2) prune, the rest merge.
    return lambda layer, keys, x, size, r: naive_tofu(keys, x, size, r, 1, layer > depth // 2)


def sample(batch=2, n=17, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, c, generator=g)
    x = torch.randn(batch, n, 12, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    return metric, x, size


def images(n=2, px=32):
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- the pure functions

def test_energy_matches_naive():
    metric = sample()[0]
    for margin in (0.9, 0.3, 0.0):
        got = energy_score(metric, margin)
        for b in range(metric.shape[0]):
            torch.testing.assert_close(got[b], torch.tensor(naive_energy(metric[b], margin)), **TOL)


@pytest.mark.parametrize("bipartite", [False, True])
@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("r", [1, 4, 7])
def test_pitome_matches_naive(bipartite, num_prefix, r):
    metric, x, size = sample(n=15 + num_prefix)  # an odd count: set A is one larger than set B
    plan = pitome_matching(metric, r, num_prefix, margin=0.45, bipartite=bipartite)
    got_x, got_size = pitome_wavg(plan, x, size)
    source = pitome_source(plan, initial_source(x.shape[0], x.shape[1]))
    for b in range(x.shape[0]):
        want_x, want_size, members = naive_pitome(metric[b], x[b], size[b, :, 0], r, num_prefix, 0.45,
                                                  bipartite)
        torch.testing.assert_close(got_x[b], want_x, **TOL)
        torch.testing.assert_close(got_size[b, :, 0], want_size, **TOL)
        assert [row.nonzero().flatten().tolist() for row in source[b]] == members


@pytest.mark.parametrize("bsm_blocks", [None, 0, 1])
def test_block_plan_follows_the_schedule(bsm_blocks):
    metric, x, size = sample(n=17)
    depth, r = 5, 6  # 5 blocks: ceil(5 / 2) = 3 bipartite blocks by default
    reference = pitome_layer(depth, bsm_blocks)
    plans = []
    for layer in range(depth):
        plan = pitome_block_plan(metric, r, 1, layer, depth, bsm_blocks=bsm_blocks)
        plans.append(plan.src_idx)
        got_x, got_size = pitome_wavg(plan, x, size)
        for b in range(x.shape[0]):
            want_x, want_size, _ = reference(layer, metric[b], x[b], size[b, :, 0], r)
            torch.testing.assert_close(got_x[b], want_x, **TOL)
            torch.testing.assert_close(got_size[b, :, 0], want_size, **TOL)
    # The two variants pick different tokens here, so the schedule is visible in the plans.
    energy_only = pitome_block_plan(metric, r, 1, 0, depth, bsm_blocks=0).src_idx
    bipartite = pitome_block_plan(metric, r, 1, 0, depth, bsm_blocks=1).src_idx
    assert not torch.equal(energy_only, bipartite)


def test_block_plan_checks():
    metric = sample()[0]
    with pytest.raises(ValueError, match="block 4 does not exist in a model of depth 4"):
        pitome_block_plan(metric, 2, 1, 4, 4)
    with pytest.raises(ValueError, match="bsm_blocks=-1 is negative"):
        pitome_block_plan(metric, 2, 1, 0, 4, bsm_blocks=-1)


@pytest.mark.parametrize("merges", [False, True])
@pytest.mark.parametrize("num_prefix", [1, 2])
def test_tofu_matches_naive(merges, num_prefix):
    metric, x, size = sample()
    r = 5
    plan = bipartite_matching(metric, r, num_prefix)
    if merges:
        got_x, got_size = merge_mlerp(plan, x, size)
    else:
        got_x = tofu_prune(plan, x)
        got_size = tocom.compress.tofu_reduce(plan, x, size, False)[1]
    for b in range(x.shape[0]):
        want_x, want_size, _ = naive_tofu(metric[b], x[b], size[b, :, 0], r, num_prefix, merges)
        torch.testing.assert_close(got_x[b], want_x, **TOL)
        torch.testing.assert_close(got_size[b, :, 0], want_size, **TOL)


def test_mlerp_keeps_the_largest_norm_and_prune_keeps_values_exactly():
    metric, x, size = sample()
    plan = bipartite_matching(metric, 6, 1)
    merged, _ = merge_mlerp(plan, x, size)
    averaged, _ = tocom.compress.merge_wavg(plan, x, size)
    assert (merged.norm(dim=-1) >= averaged.norm(dim=-1) - 1e-5).all()
    pruned = tofu_prune(plan, x)
    rows = {tuple(row.tolist()) for row in x.flatten(0, 1)}
    assert all(tuple(row.tolist()) in rows for row in pruned.flatten(0, 1))  # no value is recomputed


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3), st.integers(2, 20), st.data())
def test_pitome_plan_partitions_the_tokens(num_prefix, patches, data):
    r = data.draw(st.integers(0, patches // 2))
    seed = data.draw(st.integers(0, 2**16))
    metric = torch.randn(2, num_prefix + patches, 4, generator=torch.Generator().manual_seed(seed))
    plan = pitome_matching(metric, r, num_prefix, margin=data.draw(st.floats(0.0, 1.0)),
                           bipartite=data.draw(st.booleans()))
    for b in range(2):
        keep, src, dst = (t[b, :, 0].tolist() for t in (plan.keep_idx, plan.src_idx, plan.dst_idx))
        assert keep[:num_prefix] == list(range(num_prefix)) and keep == sorted(keep)
        assert sorted(keep + src) == list(range(num_prefix + patches))  # survivors and merged: all, once
        assert set(dst) <= set(keep[num_prefix:])  # destinations survive and are never prefix tokens


def test_pitome_refuses_too_many():
    with pytest.raises(ValueError, match="cannot merge r=9"):
        pitome_matching(sample()[0], 9, 1)


# ---------------------------------------------------------------- patched models

@pytest.mark.parametrize("method", NEW)
@torch.no_grad()
def test_r0_identical_and_unpatch_exact(method):
    model, x = tiny_vit(), images()
    before = model(x)
    tocom.patch(model, method, trace_source=True)
    model.r = 0
    assert torch.equal(model(x), before)
    model.r = 4
    assert not torch.allclose(model(x), before, atol=1e-4)
    tocom.unpatch(model)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("method,reference", [("pitome", pitome_layer), ("tofu", tofu_layer)])
@pytest.mark.parametrize("schedule", [[3, 2, 2, 1], [0, 4, 3, 2]])
@torch.no_grad()
def test_model_forward_matches_naive(method, reference, schedule):
    model, x = tiny_vit(), images()
    want = naive_vit(model, x, schedule, reference(len(model.blocks)))
    if method == "pitome":  # the default schedule is visible: energy-only blocks give other logits
        energy_only = naive_vit(model, x, schedule, pitome_layer(len(model.blocks), bsm_blocks=0))
        assert not torch.allclose(want, energy_only, atol=1e-3)
    tocom.patch(model, method)
    model.r = schedule
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tome = tocom.patch(tiny_vit(), "tome")
    tome.r = schedule
    assert not torch.allclose(got, tome(x), atol=1e-3)  # a different rule, not ToMe under another name


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}])
@torch.no_grad()
def test_sizes_and_sources_partition_the_patches(method, kwargs):
    model, x = tiny_vit(**kwargs), images()
    tocom.patch(model, method, trace_source=True)
    model.r = 3
    out = model.forward_features(x)
    state = model.last_state
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    assert state.source.shape == (2, out.shape[1], n0)
    assert ((state.source == 0) | (state.source == 1)).all()
    assert torch.equal(state.source.sum(1), torch.ones(2, n0))  # every original token in one group
    torch.testing.assert_close(state.size[..., 0], state.source.sum(-1))
    assert torch.equal(state.size.sum(1), torch.full((2, 1), float(n0)))
    assert unmerge(out, state.source).shape == (2, n0, out.shape[-1])


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("schedule", [2, [4, 0, 3, 1], (3, -0.5), "flops=0.6"])
@torch.no_grad()
def test_token_counts_equal_tome(method, schedule):
    model, x = tiny_vit(), images(1)
    if isinstance(schedule, str):  # a schedule derived from a FLOPs target, as the CLI parses it
        schedule = parse_schedule(schedule, tocom.dims_of(model))
    tocom.patch(model, "tome")
    model.r = schedule
    model(x)
    tome_tokens = model.last_state.tokens
    tocom.patch(model, method)
    model.r = schedule
    model(x)
    assert model.last_state.tokens == tome_tokens
    assert tocom.schedule_report(model)["tokens"] == tome_tokens
    n, p = model.patch_embed.num_patches + 1, 1
    assert tokens_per_layer(model.last_state.schedule, n, p) == tome_tokens


def test_patch_checks():
    model = tiny_vit()
    with pytest.raises(ValueError, match="dense mode.*no pitome version"):
        tocom.patch(model, "pitome", mode="dense")
    with pytest.raises(ValueError, match="method must be one of"):
        tocom.patch(model, "pitom")
    tocom.patch(tiny_vit(class_token=False, global_pool="avg"), "tofu")  # no class token needed
    with pytest.raises(ValueError, match="no class token"):
        tocom.patch(tiny_vit(class_token=False, global_pool="avg"), "evit")


@pytest.mark.parametrize("method", NEW)
@torch.no_grad()
def test_plugin_records_its_method(method, tmp_path):
    model = tocom.patch(tiny_vit(), method)
    plugin = Compensator.init_for(model, groups=8, method=method)
    assert plugin.spec.method == method
    plugin.save(tmp_path / "p.tocom.safetensors")
    assert Compensator.load(tmp_path / "p.tocom.safetensors").spec.method == method
    with pytest.raises(ValueError, match=f"trained for {method} but the model is patched for tome"):
        attach(tocom.patch(tiny_vit(), "tome"), plugin, source=4)
    attach(model, plugin, source=4)
    assert model._tocom.method == method and model.r == 4


@pytest.mark.parametrize("method", NEW)
def test_plugin_live_delta_matches_folded_and_distils(method):
    model, x = tiny_vit(), images()
    tocom.patch(model, method)
    plugin = Compensator.init_for(model, groups=4, method=method)
    torch.nn.init.normal_(plugin.B, std=0.5)
    with torch.no_grad():
        attach(model, plugin, source=1)
        set_degree(model, 3)
        folded = model(x)
        detach(model)
        tokens, state = model.forward_tokens(x, r=3, qv_delta=plugin.live_delta(1, 3))
        torch.testing.assert_close(model.forward_head(tokens, size=state.size), folded, rtol=1e-4, atol=1e-4)
    loss = DistillObjective(model, plugin, max_r=3).pair_loss(x, torch.zeros(2, dtype=torch.long), 1, 3)
    loss.backward()
    assert loss.item() > 0 and plugin.B.grad.abs().sum() > 0


# ---------------------------------------------------------------- the other families

FAMILIES = ["eva", "beit", "hf-vit", "hf-dinov2-reg"]
@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_every_family(name, method):
    from test_families import build, run
    from test_families import images as family_images

    model, x = build(name), family_images()
    before = run(model, x)
    tocom.patch(model, "tome")
    model.r = [3, 2]
    run(model, x)
    tome_tokens = model.last_state.tokens
    tocom.patch(model, method, trace_source=True)
    model.r = 0
    assert torch.equal(run(model, x), before)
    model.r = [3, 2]
    out = run(model, x)
    assert out.shape == before.shape and not torch.allclose(out, before, atol=1e-4)
    state = model.last_state
    assert state.tokens == tome_tokens
    n0 = state.source.shape[-1]
    assert torch.equal(state.source.sum(1), torch.ones(2, n0))
    assert torch.equal(state.size.sum(1), torch.full((2, 1), float(n0)))
    tocom.unpatch(model)
    assert torch.equal(run(model, x), before)


def naive_hf_vit(model, images, schedule, reduce_one):
    """HF ViTForImageClassification image by image (class token protected), explicit softmax."""
    outputs = []
    for img in images:
        x = model.vit.embeddings(img[None])[0]
        size = torch.ones(x.shape[0])
        for layer, (block, r) in enumerate(zip(model.vit.layers, schedule)):
            attn, h = block.attention, block.layernorm_before(x)
            q, k, v = (proj(h).reshape(h.shape[0], attn.num_attention_heads, -1).transpose(0, 1)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + size.log()[None, None, :]
            w = torch.exp(logits - logits.amax(-1, keepdim=True))
            x = x + attn.o_proj(((w / w.sum(-1, keepdim=True)) @ v).transpose(0, 1).reshape(h.shape[0], -1))
            if r:
                x, size, _ = reduce_one(layer, k.mean(0), x, size, r)
            x = x + block.mlp(block.layernorm_after(x))
        outputs.append(model.classifier(model.vit.layernorm(x)[0]))
    return torch.stack(outputs)


@pytest.mark.parametrize("method,reference", [("pitome", pitome_layer), ("tofu", tofu_layer)])
@torch.no_grad()
def test_hf_vit_matches_naive(method, reference):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                    image_size=16, patch_size=4, intermediate_size=64, num_labels=5,
                                    attn_implementation="sdpa")
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    x = images(px=16)
    schedule = [3, 2, 2, 1]
    want = naive_hf_vit(model, x, schedule, reference(4))
    tocom.patch(model, method)
    model.r = schedule
    torch.testing.assert_close(model(x).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method,reference", [("pitome", pitome_layer), ("tofu", tofu_layer)])
@torch.no_grad()
def test_deit_tiny_matches_naive(shared, method, reference):
    from test_real_weights import imagenet_batch, load_deit

    model = load_deit(shared)
    x, _ = imagenet_batch(shared, model, limit=2)
    want = naive_vit(model, x, [8] * 12, reference(12))
    tocom.patch(model, method)
    model.r = 8
    torch.testing.assert_close(model(x), want, rtol=1e-3, atol=1e-3)
