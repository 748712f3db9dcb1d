"""Compensator plugins carry over between timm and Hugging Face ViTs; the timm -> HF converter.

A tiny random timm DeiT is converted with :func:`tocom.models.hf_convert.from_timm`; the two models
compute the same function (float32, 1e-5), a plugin trained on either folds into the same W_q / W_v
rows of both (biases untouched, detach exact) and gives the same outputs, and plugins whose
architecture differs (blocks, heads, prefix tokens) or whose family has another block (Eva, BEiT)
are refused, naming what differs.
"""

from __future__ import annotations

import pytest
import timm
import torch

import tocom
from tocom.compensator import Compensator, PluginSpec, attach, detach, set_degree

transformers = pytest.importorskip("transformers")
from tocom.models.hf_convert import from_timm  # noqa: E402  (needs transformers)

D = 32  # attention dim of the tiny models


def tiny_timm(name="deit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=D, num_heads=2, num_classes=5)
    args.update(kwargs)
    model = timm.create_model(name, **args).eval()
    with torch.no_grad():  # random weights so large that merging visibly changes outputs
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    return model


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def plugin_for(model, seed=0):
    plugin = Compensator.init_for(model, groups=4, rank=2)
    with torch.no_grad():
        plugin.B.copy_(torch.randn(plugin.B.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return plugin


def qv_rows(timm_model, hf_model, block):
    """(timm W_q, timm W_v, HF W_q, HF W_v) of one block."""
    qkv = timm_model.blocks[block].attn.qkv.weight.detach()
    attn = hf_model.vit.layers[block].attention
    return qkv[:D], qkv[2 * D:], attn.q_proj.weight.detach(), attn.v_proj.weight.detach()


@torch.no_grad()
def test_converted_model_computes_the_same_function():
    timm_model, x = tiny_timm(), images()
    hf_model = from_timm(timm_model, id2label={i: f"class {i}" for i in range(5)})
    assert isinstance(hf_model, transformers.ViTForImageClassification)
    c = hf_model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (D, 2, 2, 128)
    assert (c.patch_size, c.image_size, c.layer_norm_eps, c.hidden_act) == (8, 32, 1e-6, "gelu")
    assert c.qkv_bias
    assert c._attn_implementation == "sdpa" and c.id2label[4] == "class 4"
    qkv = timm_model.blocks[1].attn.qkv
    attn = hf_model.vit.layers[1].attention
    assert torch.equal(attn.k_proj.weight, qkv.weight[D:2 * D])
    assert torch.equal(attn.v_proj.bias, qkv.bias[2 * D:])
    torch.testing.assert_close(hf_model(pixel_values=x).logits, timm_model(x), rtol=1e-5, atol=1e-5)
    tocom.patch(timm_model)
    tocom.patch(hf_model)
    for r in (3, [4, 2]):
        timm_model.r = hf_model.r = r
        torch.testing.assert_close(hf_model(pixel_values=x).logits, timm_model(x), rtol=1e-5, atol=1e-5)
        assert hf_model.last_state.tokens == timm_model.last_state.tokens


@torch.no_grad()
def test_converted_model_saves_and_loads_without_the_hub(tmp_path):
    timm_model, x = tiny_timm(), images()
    hf_model = from_timm(timm_model.state_dict(), num_heads=2)
    hf_model.save_pretrained(tmp_path)
    again = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert again.config._attn_implementation == "sdpa"
    assert torch.equal(again(pixel_values=x).logits, hf_model(pixel_values=x).logits)


@pytest.mark.parametrize("trained_on", ["timm", "hf"])
@torch.no_grad()
def test_plugin_folds_into_the_same_rows_of_both(trained_on):
    timm_model, x = tiny_timm(), images()
    hf_model = from_timm(timm_model)
    plugin = plugin_for(timm_model if trained_on == "timm" else hf_model)
    assert plugin.spec.family == ("timm-vit" if trained_on == "timm" else "hf-vit")
    assert plugin.spec.num_prefix == 1
    before = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("timm", timm_model), ("hf", hf_model))}
    attach(timm_model, plugin, source=0)
    attach(hf_model, plugin, source=0)
    set_degree(timm_model, 3)
    set_degree(hf_model, 3)
    delta = plugin.deltas(0, 3)
    for block in range(2):
        tq, tv, hq, hv = qv_rows(timm_model, hf_model, block)
        torch.testing.assert_close(hq, tq, rtol=0, atol=1e-6)
        torch.testing.assert_close(hv, tv, rtol=0, atol=1e-6)
        q0 = before["hf"][f"vit.layers.{block}.attention.q_proj.weight"]
        torch.testing.assert_close(hq, q0 + delta[block, 0], rtol=0, atol=1e-6)
        # biases hold no delta: never written, in either layout
        assert torch.equal(hf_model.vit.layers[block].attention.q_proj.bias,
                           before["hf"][f"vit.layers.{block}.attention.q_proj.bias"])
        assert torch.equal(timm_model.blocks[block].attn.qkv.bias,
                           before["timm"][f"blocks.{block}.attn.qkv.bias"])
    folded = timm_model(x)
    torch.testing.assert_close(hf_model(pixel_values=x).logits, folded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_model(pixel_values=x, r=2).logits, timm_model(x, r=2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(folded, timm_model(x, r=0), atol=1e-3)  # the plugin mattered
    detach(timm_model)
    detach(hf_model)
    for name, m in (("timm", timm_model), ("hf", hf_model)):
        assert all(torch.equal(v, before[name][k]) for k, v in m.state_dict().items())


def hf_vit(**overrides):
    kw = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * D,
              image_size=32, patch_size=8, num_labels=5, attn_implementation="sdpa")
    kw.update(overrides)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**kw)).eval()


@pytest.mark.parametrize("plugin_model,model,message", [
    (lambda: tiny_timm(), lambda: hf_vit(num_hidden_layers=3), "depth 2, model has 3"),
    (lambda: hf_vit(num_attention_heads=4), lambda: tiny_timm(), "heads 4, model has 2"),
    (lambda: tiny_timm("deit_tiny_distilled_patch16_224"), lambda: hf_vit(), "prefix tokens 2, model has 1"),
    (lambda: hf_vit(), lambda: tiny_timm(reg_tokens=4), "prefix tokens 1, model has 5"),
])
def test_architecture_mismatch_is_refused_naming_it(plugin_model, model, message):
    plugin = plugin_for(plugin_model())
    with pytest.raises(ValueError, match=message):
        attach(model(), plugin, source=0)


def eva():
    return timm.create_model("eva02_tiny_patch14_224", img_size=16, patch_size=4, depth=2, embed_dim=D,
                             num_heads=2, num_classes=5)


def beit():
    return timm.create_model("beitv2_base_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=D,
                             num_heads=2, num_classes=5)


@pytest.mark.parametrize("plugin_model,model,family", [
    (eva, hf_vit, "timm-eva"), (beit, hf_vit, "timm-beit"), (hf_vit, eva, "hf-vit"), (hf_vit, beit, "hf-vit"),
])
def test_other_families_stay_refused(plugin_model, model, family):
    plugin = plugin_for(plugin_model())
    with pytest.raises(ValueError, match=f"trained on a {family} model"):
        attach(model(), plugin, source=0)


@torch.no_grad()
def test_plugin_file_without_prefix_record_still_carries_over(tmp_path):
    timm_model, x = tiny_timm(), images()
    hf_model = from_timm(timm_model)
    meta = plugin_for(timm_model).spec.to_metadata()
    del meta["num_prefix"]  # a file written before plugins recorded it
    spec = PluginSpec.from_metadata(meta)
    assert spec.num_prefix is None
    plugin = Compensator(spec)
    plugin.load_state_dict(plugin_for(timm_model).state_dict())
    plugin.save(tmp_path / "old.tocom.safetensors")
    plugin = Compensator.load(tmp_path / "old.tocom.safetensors")
    attach(hf_model, plugin, source=0)
    set_degree(hf_model, 2)
    attach(timm_model, plugin, source=0)
    set_degree(timm_model, 2)
    torch.testing.assert_close(hf_model(pixel_values=x).logits, timm_model(x), rtol=1e-5, atol=1e-5)


def test_converter_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="distillation token"):
        from_timm(tiny_timm("deit_tiny_distilled_patch16_224"))
    with pytest.raises(ValueError, match="pools by 'avg'"):  # no fc_norm: only the model can tell
        from_timm(tiny_timm("vit_tiny_patch16_224", global_pool="avg", fc_norm=False))
    with pytest.raises(ValueError, match="fc_norm"):
        from_timm(tiny_timm("vit_tiny_patch16_224", global_pool="avg").state_dict(), num_heads=2)
    with pytest.raises(ValueError, match="register tokens"):
        from_timm(tiny_timm("vit_tiny_patch16_224", reg_tokens=4).state_dict(), num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        from_timm(tiny_timm().state_dict())
    with pytest.raises(ValueError, match="patch_size 16, weights have 8"):
        config = transformers.ViTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=4 * D, image_size=32, patch_size=16, num_labels=5)
        from_timm(tiny_timm(), config=config)
    with pytest.raises(ValueError, match="cannot map timm keys"):
        state = tiny_timm().state_dict()
        state["extra.weight"] = torch.zeros(1)
        from_timm(state, num_heads=2)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        from_timm(hf_vit())


def test_processor_config_is_timms_eval_transform():
    """The converter's processor reads back (as an ``hf:`` folder's preprocessing is read) as timm's
    evaluation transform: same resize side, crop, interpolation, mean and std; the pixels it gives
    equal timm's wherever the centre crop's offset is whole (transformers rounds it down, torchvision
    to nearest)."""
    from PIL import Image

    from tocom.data.transforms import eval_transform, hf_record, transform_from_record
    from tocom.models.hf_convert import processor_config

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    record = hf_record(processor_config(model))
    assert (record["resize"], record["size"], record["resize_size"]) == ("crop", 224, 248)  # floor(224 / 0.9)
    assert record["interpolation"] == "bicubic"
    assert record["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert record["std"] == pytest.approx([0.229, 0.224, 0.225])
    pixels = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (300, 248, 3), generator=pixels, dtype=torch.uint8).numpy())
    # the shorter side is already 248; 300 - 224 and 248 - 224 are even, so both crop at one offset
    torch.testing.assert_close(transform_from_record(record)(image), eval_transform(model)(image),
                               rtol=0, atol=1e-6)
