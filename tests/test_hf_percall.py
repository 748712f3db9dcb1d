"""Hugging Face ViTs (family hf-vit) take a per-call degree and a per-call q/v delta.

Every class the adapter serves, built from a tiny config with random weights: ``model(x, r=t)``
equals setting ``model.r = t`` (the same computation, so bit for bit), r = 0 per call is
bit-identical to the unpatched model, the per-call delta equals the same delta folded by a plugin
(float32, 1e-4), heads that average tokens weight them by size (against a sum written here), and a
few distillation steps train the plugin and nothing else.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tocom
from tocom.compensator import Compensator, DistillObjective, attach, detach, set_degree

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
             intermediate_size=64)


def config(name: str, **extra):
    return getattr(transformers, name)(attn_implementation="sdpa", **SMALL, **extra)


def two_towers(name: str, vision: str, text: str, **extra):
    """CLIPConfig / SiglipConfig with a tiny vision tower (the text tower is never run)."""
    text_cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return getattr(transformers, name)(vision_config=config(vision).to_dict(), text_config=text_cfg,
                                       attn_implementation="sdpa", **extra)


CONFIGS = {
    "ViTModel": lambda: config("ViTConfig"),
    "ViTForImageClassification": lambda: config("ViTConfig", num_labels=5),
    "DeiTModel": lambda: config("DeiTConfig"),
    "DeiTForImageClassification": lambda: config("DeiTConfig", num_labels=5),
    "DeiTForImageClassificationWithTeacher": lambda: config("DeiTConfig", num_labels=5),
    "Dinov2Model": lambda: config("Dinov2Config"),
    "Dinov2ForImageClassification": lambda: config("Dinov2Config", num_labels=5),
    "Dinov2WithRegistersModel": lambda: config("Dinov2WithRegistersConfig", num_register_tokens=2),
    "Dinov2WithRegistersForImageClassification": lambda: config("Dinov2WithRegistersConfig",
                                                                num_register_tokens=2, num_labels=5),
    "CLIPVisionModel": lambda: config("CLIPVisionConfig"),
    "CLIPVisionModelWithProjection": lambda: config("CLIPVisionConfig", projection_dim=8),
    "CLIPForImageClassification": lambda: two_towers("CLIPConfig", "CLIPVisionConfig", "CLIPTextConfig",
                                                     num_labels=5),
    "SiglipVisionModel": lambda: config("SiglipVisionConfig"),
    "SiglipForImageClassification": lambda: two_towers("SiglipConfig", "SiglipVisionConfig",
                                                       "SiglipTextConfig", num_labels=5),
}
NAMES = list(CONFIGS)
AVERAGING = ["Dinov2WithRegistersForImageClassification", "CLIPForImageClassification",
             "SiglipForImageClassification"]


def build(name: str):
    torch.manual_seed(0)
    model = getattr(transformers, name)(CONFIGS[name]()).eval()
    with torch.no_grad():  # random weights so large that merging visibly changes outputs
        for key, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
            elif "lambda1" in key:  # DINOv2 layer scale: make the blocks matter
                p.fill_(1.0)
    return model


def main(out) -> torch.Tensor:
    """The tensor a user reads from an HF output: logits, image_embeds or the pooled output."""
    for key in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out.last_hidden_state


def images(n=2):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_every_adapter_class_is_covered():
    from tocom.models.hf_vit import _MODELS

    assert set(NAMES) == set(_MODELS)
    assert "per_call" in tocom.models.adapter_for(build("ViTModel")).features


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_r0_per_call_bit_identical_to_unpatched(name):
    model, x = build(name), images()
    ref = model(pixel_values=x)
    tocom.patch(model)
    for out in (model(pixel_values=x), model(pixel_values=x, r=0), model(x, r=0)):
        assert type(out) is type(ref)
        fields = [k for k, v in ref.items() if v is not None]
        assert fields and fields == [k for k, v in out.items() if v is not None]
        assert all(torch.equal(out[k], ref[k]) for k in fields)
    tokens, state = model.forward_tokens(x, r=0)
    assert torch.equal(tokens, ref.last_hidden_state if "last_hidden_state" in ref else tokens)
    assert torch.equal(model.forward_head(tokens, size=state.size), main(ref))
    tocom.unpatch(model)
    assert torch.equal(main(model(pixel_values=x)), main(ref))


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_per_call_degree_equals_setting_r(name):
    model, x = build(name), images()
    tocom.patch(model)
    for degree in (3, [4, 2]):
        model.r = degree
        at_r = main(model(pixel_values=x))
        tokens_at_r = list(model.last_state.tokens)
        model.r = 0
        per_call = model(pixel_values=x, r=degree)
        assert torch.equal(main(per_call), at_r) and model.r == 0
        assert model.last_state.tokens == tokens_at_r
        tokens, state = model.forward_tokens(x, r=degree)
        assert torch.equal(model.forward_head(tokens, size=state.size), at_r)
    assert not torch.allclose(at_r, main(model(pixel_values=x)), atol=1e-4)  # the degree mattered


@pytest.mark.parametrize("name", NAMES)
def test_per_call_delta_equals_folded_delta(name):
    model, x = build(name), images()
    plugin = Compensator.init_for(model, groups=4, rank=2)
    torch.nn.init.normal_(plugin.B, std=0.5)
    with torch.no_grad():
        plain = main(tocom.patch(model)(pixel_values=x, r=3))  # no plugin: only the degree moves
        attach(model, plugin, source=1)
        from_source = main(model(pixel_values=x, r=3))  # at 1, so delta(1 -> 3) on the fly
        set_degree(model, 3)
        folded = main(model(pixel_values=x))
        torch.testing.assert_close(from_source, folded, rtol=1e-4, atol=1e-4)
        per_call = main(model(pixel_values=x, r=2))  # the plugin's live delta(3 -> 2) on the fly
        assert model.r == 3
        set_degree(model, 2)
        torch.testing.assert_close(per_call, main(model(pixel_values=x)), rtol=1e-4, atol=1e-4)
        detach(model)
        tokens, state = model.forward_tokens(x, r=3, qv_delta=plugin.live_delta(1, 3))
        live = model.forward_head(tokens, size=state.size)
    torch.testing.assert_close(live, folded, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(live, plain, atol=1e-3)  # the delta changed the outputs


@pytest.mark.parametrize("name", AVERAGING)
@torch.no_grad()
def test_averaging_heads_weight_tokens_by_size(name):
    model, x = build(name), images()
    tocom.patch(model)
    tokens, state = model.forward_tokens(x, r=3)
    p, size = state.num_prefix, state.size[..., 0]
    mean = (tokens[:, p:] * size[:, p:, None]).sum(1) / size[:, p:].sum(1, keepdim=True)
    features = torch.cat([tokens[:, 0], mean], 1) if name.startswith("Dinov2") else mean
    expected = model.classifier(features)
    torch.testing.assert_close(model(pixel_values=x, r=3).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs their sizes"):
        model.forward_head(tokens)


@torch.no_grad()
def test_labels_give_hf_loss_and_bad_calls_are_refused():
    model, x = build("ViTForImageClassification"), images()
    tocom.patch(model)
    labels = torch.tensor([1, 4])
    out = model(pixel_values=x, labels=labels, r=3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert torch.equal(model(x, labels, r=3).logits, out.logits)  # positional labels, as in HF
    assert torch.equal(model(pixel_values=x, r=3, return_dict=False)[0], out.logits)
    with pytest.raises(ValueError, match="output_attentions"):
        model(pixel_values=x, output_attentions=True)
    with pytest.raises(ValueError, match="attention masks"):
        model(pixel_values=x, attention_mask=torch.ones(2, 17))
    with pytest.raises(ValueError, match="schedule|degree|r "):
        model(pixel_values=x, r=[1, 2, 3])  # three degrees for two layers


@pytest.mark.parametrize("name,loss", [("ViTForImageClassification", "kd"),
                                       ("DeiTForImageClassificationWithTeacher", "feat"),
                                       ("CLIPVisionModel", "kd")])
def test_distillation_trains_only_the_plugin(name, loss):
    model, x = build(name), images(4)
    plugin = Compensator.init_for(model, groups=4, rank=2)
    torch.nn.init.normal_(plugin.B, std=0.1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    start = [p.detach().clone() for p in plugin.parameters()]
    objective = DistillObjective(model, plugin, max_r=3, loss=loss)
    assert objective.headless == (name == "CLIPVisionModel")
    opt = torch.optim.SGD(objective.parameters(), lr=0.05)
    assert {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad} == {
        id(p) for p in plugin.parameters()}
    for src, tgt in ((0, 3), (3, 1), (1, 2)):
        opt.zero_grad()
        value = objective.pair_loss(x, torch.zeros(4, dtype=torch.long), src, tgt)
        value.backward()
        opt.step()
        assert torch.isfinite(value) and value.item() > 0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(not torch.equal(p.detach(), s) for p, s in zip(plugin.parameters(), start))
    # The kd loss of a pair against KL computed here from two ordinary calls, the student with its
    # delta folded by the plugin instead of added live.
    if loss == "kd" and not objective.headless:
        with torch.no_grad():
            got = objective.pair_loss(x, None, 1, 3)
            teacher = model(pixel_values=x, r=1).logits.log_softmax(-1)
            attach(model, plugin, source=1)
            set_degree(model, 3)
            student = model(pixel_values=x).logits.log_softmax(-1)
            detach(model)
        expected = (teacher.exp() * (teacher - student)).sum(-1).mean()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
