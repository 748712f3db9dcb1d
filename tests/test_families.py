"""Every supported family beyond timm's VisionTransformer: timm Eva (RoPE), timm Beit, Hugging Face ViTs.

For each: r = 0 is bit-identical, unpatch restores exactly, a compensator attaches, switches and
detaches exactly, forwards hold the state lock, and (for one model per family) r > 0 matches a naive
image-by-image reference written here from the documented rules, with merging from
tests/reference_tome.py. Eva and Beit also take a per-call degree and a per-call q/v delta (so they
can be distilled; the Hugging Face family's are tested in tests/test_hf_percall.py), and every new
family refuses dense mode.
"""

from __future__ import annotations

import pytest
import timm
import torch
from reference_tome import naive_merge

import tocom
from tocom.compensator import Compensator, DistillObjective, PluginSpec, attach, detach, set_degree
from tocom.models import state_lock


def eva():
    return timm.create_model("eva02_tiny_patch14_224", img_size=16, patch_size=4, depth=2, embed_dim=32,
                             num_heads=2, num_classes=5)


def beit():
    return timm.create_model("beitv2_base_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32,
                             num_heads=2, num_classes=5)


def hf(cls_name: str, config_name: str, **extra):
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
              attn_implementation="sdpa", **extra)
    return getattr(transformers, cls_name)(getattr(transformers, config_name)(**kw))


BUILDERS = {
    "eva": eva,
    "beit": beit,
    "hf-vit": lambda: hf("ViTForImageClassification", "ViTConfig", num_labels=5, intermediate_size=64),
    "hf-deit": lambda: hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=5,
                          intermediate_size=64),
    "hf-dinov2": lambda: hf("Dinov2ForImageClassification", "Dinov2Config", num_labels=5),
    "hf-dinov2-reg": lambda: hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                num_register_tokens=2),
    "hf-clip": lambda: hf("CLIPVisionModel", "CLIPVisionConfig", intermediate_size=64),
    "hf-siglip": lambda: hf("SiglipVisionModel", "SiglipVisionConfig", intermediate_size=64),
}


def build(name: str):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # random weights so large that merging visibly changes outputs
        for name_, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
            elif "gamma" in name_ or "lambda1" in name_:  # layer scale: make the blocks matter
                p.fill_(1.0)
    return model


def run(model, x):
    is_hf = "transformers" in getattr(type(model), "_tocom_base", type(model)).__module__
    out = model(pixel_values=x) if is_hf else model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output


def images(n=2):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(BUILDERS))
@torch.no_grad()
def test_r0_identical_unpatch_exact(name):
    model, x = build(name), images()
    ref = run(model, x)
    tocom.patch(model)
    assert torch.equal(run(model, x), ref)
    model.r = 3
    reduced = run(model, x)
    assert model.last_state.tokens == [17 + tocom.dims_of(model).num_prefix - 1 - 3,
                                       17 + tocom.dims_of(model).num_prefix - 1 - 6]
    assert not torch.allclose(reduced, ref, atol=1e-4)
    tocom.unpatch(model)
    assert torch.equal(run(model, x), ref)
    assert not hasattr(model, "_tocom")


TIMM = ["eva", "beit"]
HF = [name for name in BUILDERS if name.startswith("hf-")]


@pytest.mark.parametrize("name", list(BUILDERS))
@torch.no_grad()
def test_compensator_round_trip(name):
    model, x = build(name), images()
    plugin = Compensator.init_for(model, groups=4, rank=2)
    assert plugin.spec.family == tocom.models.family_of(model)
    torch.nn.init.normal_(plugin.B, std=0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    attach(model, plugin, source=0)
    at0 = run(model, x)
    set_degree(model, 3)
    assert model.r == 3
    moved = run(model, x)
    set_degree(model, 0)
    assert torch.equal(run(model, x), at0)
    set_degree(model, 3)
    tocom.unpatch(model)  # detaches first
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # The delta landed on W_q and W_v: run the unpatched-then-repatched model with the delta added by hand.
    delta = plugin.deltas(0, 3)
    adapter = tocom.models.adapter_for(model)
    for (qv, d) in zip(adapter.qv_projections(model), delta):
        for proj, dw in zip((qv.q, qv.v), d):
            proj.linear.weight[proj.rows] += dw
    tocom.patch(model)
    model.r = 3
    torch.testing.assert_close(run(model, x), moved, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TIMM)
def test_distillation_live_delta_matches_folded(name):
    model, x = build(name), images()
    plugin = Compensator.init_for(model, groups=4, rank=2)
    torch.nn.init.normal_(plugin.B, std=0.5)
    with torch.no_grad():
        attach(model, plugin, source=1)
        set_degree(model, 3)
        tokens, state = model.forward_tokens(x)
        folded = model.forward_head(tokens, size=state.size)
        per_call = model(x, r=2)  # a per-call degree with a plugin attached: its live delta
        set_degree(model, 2)
        torch.testing.assert_close(per_call, run(model, x), rtol=1e-4, atol=1e-4)
        assert model.r == 2
        detach(model)
    objective = DistillObjective(model, plugin, max_r=3)
    with torch.no_grad():
        tokens, state = model.forward_tokens(x, r=3, qv_delta=plugin.live_delta(1, 3))
        live = model.forward_head(tokens, size=state.size)
    torch.testing.assert_close(live, folded, rtol=1e-4, atol=1e-4)
    loss = objective.pair_loss(x, torch.zeros(2, dtype=torch.long), 1, 3)
    loss.backward()
    assert loss.item() > 0 and plugin.B.grad.abs().sum() > 0


@pytest.mark.parametrize("name", TIMM)
@torch.no_grad()
def test_per_call_degree_and_explicit_sizes(name):
    model, x = build(name), images()
    tocom.patch(model)
    model.r = 2
    at2 = run(model, x)
    model.r = 0
    assert torch.equal(model(x, r=2), at2) and model.r == 0
    tokens, state = model.forward_tokens(x, r=2)
    torch.testing.assert_close(model.forward_head(tokens, size=state.size), at2)
    with pytest.raises(ValueError, match="needs their sizes"):
        model.forward_head(tokens)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_dense_refused(name):
    with pytest.raises(ValueError, match=f"dense.*{tocom.models.family_of(build(name))}"):
        tocom.patch(build(name), mode="dense")


@pytest.mark.parametrize("name", list(BUILDERS))
@torch.no_grad()
def test_forward_holds_the_state_lock(name):
    model, x = build(name), images()
    tocom.patch(model)
    mlp = tocom.models.adapter_for(model).blocks(model)[0].mlp  # called as a module by every family

    def switch(*_):
        model.r = 1

    mlp.register_forward_pre_hook(switch)
    with pytest.raises(RuntimeError, match="inside a forward"):
        run(model, x)
    with state_lock(model).exclusive():  # the lock is free again and reachable from the model
        pass


def test_plugin_family_recorded_in_files(tmp_path):
    plugin = Compensator.init_for(build("beit"), groups=2)
    plugin.save(tmp_path / "p.tocom.safetensors")
    assert Compensator.load(tmp_path / "p.tocom.safetensors").spec.family == "timm-beit"
    meta = plugin.spec.to_metadata()
    del meta["family"]  # a file written before plugins recorded their family
    assert PluginSpec.from_metadata(meta).family == "timm-vit"


def test_family_mismatch_refused():
    plugin = Compensator.init_for(build("eva"), groups=2)
    other = build("beit")
    with pytest.raises(ValueError, match="timm-eva"):
        attach(other, plugin, source=0)


def test_unsupported_rope_refused():
    model = timm.create_model("vit_small_patch16_rope_mixed_224", img_size=16, patch_size=4, depth=1,
                              embed_dim=32, num_heads=2)
    with pytest.raises(TypeError, match="RotaryEmbeddingMixed"):
        tocom.patch(model)


# ----- independent references -----------------------------------------------------------------
def softmax_attend(q, k, v, size, bias=None):
    """q, k, v (H, N, d); explicit softmax with log-size and an optional (H, N, N) bias."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + size.log()[None, None, :]
    if bias is not None:
        logits = logits + bias
    w = torch.exp(logits - logits.amax(-1, keepdim=True))
    return (w / w.sum(-1, keepdim=True)) @ v


def rotate(t, angles):
    """Rotate consecutive pairs of t (H, N, d) by angles (N, d/2)."""
    pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def reference_eva(model, img, schedule):
    """Eva-02 with ToMe: merged tokens rotate by the mean position of their patches."""
    x = model._pos_embed(model.patch_embed(img[None]))[0][0]
    p, rope = model.num_prefix_tokens, model.rope
    g = model.patch_embed.grid_size
    coords = torch.tensor([[i, j] for i in range(g[0]) for j in range(g[1])], dtype=torch.float32)
    coords = torch.cat([torch.zeros(p, 2), coords / torch.tensor(g) * torch.tensor(rope.ref_feat_shape)])
    size = torch.ones(x.shape[0])
    for blk, r in zip(model.blocks, schedule):
        attn, h = blk.attn, blk.norm1(x)
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        qkv = (h @ attn.qkv.weight.T + bias).reshape(h.shape[0], 3, attn.num_heads, -1)
        q, k, v = qkv.permute(1, 2, 0, 3)
        metric = k.mean(0)
        angles = (coords[p:, :, None] * rope.bands).flatten(1)  # (N - p, dim/4 * 2): one angle per pair
        q = torch.cat([q[:, :p], rotate(q[:, p:], angles)], 1)
        kr = torch.cat([k[:, :p], rotate(k[:, p:], angles)], 1)
        o = attn.norm(softmax_attend(q, kr, v, size).transpose(0, 1).reshape(h.shape[0], -1))
        x = x + blk.gamma_1 * attn.proj(o) if blk.gamma_1 is not None else x + attn.proj(o)
        if r:
            both, size, _ = naive_merge(metric, torch.cat([x, coords], -1), size, r, p)
            x, coords = both[:, :-2], both[:, -2:]
        x = x + blk.mlp(blk.norm2(x))
    x = model.norm(x)[p:]
    return model.head(model.fc_norm((x * size[p:, None]).sum(0) / size[p:].sum()))


def reference_beit(model, img, schedule):
    """BEiT with ToMe: the bias between two tokens is the mean over their original members."""
    x = model.patch_embed(img[None])
    x = torch.cat([model.cls_token.expand(1, -1, -1), x], 1)[0]
    groups = [[i] for i in range(x.shape[0])]
    size = torch.ones(x.shape[0])
    for blk, r in zip(model.blocks, schedule):
        attn, h = blk.attn, blk.norm1(x)
        full = attn._get_rel_pos_bias()[0]
        bias = torch.stack([torch.stack([full[:, gi][:, :, gj].mean((1, 2)) for gj in groups], -1)
                            for gi in groups], 1)
        qkv_bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        qkv = (h @ attn.qkv.weight.T + qkv_bias).reshape(h.shape[0], 3, attn.num_heads, -1)
        q, k, v = qkv.permute(1, 2, 0, 3)
        o = softmax_attend(q, k, v, size, bias).transpose(0, 1).reshape(h.shape[0], -1)
        x = x + blk.gamma_1 * attn.proj(o)
        if r:
            x, size, merged = naive_merge(k.mean(0), x, size, r, 1)
            groups = [sum((groups[m] for m in members), []) for members in merged]
        x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    x = model.norm(x)[1:]
    return model.head(model.fc_norm((x * size[1:, None]).sum(0) / size[1:].sum()))


def reference_hf_vit(model, img, schedule):
    """HF ViTForImageClassification with ToMe (class token protected)."""
    x = model.vit.embeddings(img[None])[0]
    size = torch.ones(x.shape[0])
    for layer, r in zip(model.vit.layers, schedule):
        attn, h = layer.attention, layer.layernorm_before(x)
        q, k, v = (proj(h).reshape(h.shape[0], attn.num_attention_heads, -1).transpose(0, 1)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        x = x + attn.o_proj(softmax_attend(q, k, v, size).transpose(0, 1).reshape(h.shape[0], -1))
        if r:
            x, size, _ = naive_merge(k.mean(0), x, size, r, 1)
        x = x + layer.mlp(layer.layernorm_after(x))
    return model.classifier(model.vit.layernorm(x)[0])


@pytest.mark.parametrize("name,reference", [("eva", reference_eva), ("beit", reference_beit),
                                            ("hf-vit", reference_hf_vit)])
@torch.no_grad()
def test_reduced_matches_reference(name, reference):
    model, x = build(name), images()
    schedule = [3, 2]
    expected = torch.stack([reference(model, img, schedule) for img in x])
    tocom.patch(model)
    model.r = schedule
    got = run(model, x)
    assert not torch.allclose(got, run(tocom.unpatch(model), x), atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
