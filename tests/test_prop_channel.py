"""Proportional attention as one extra q/k channel (tocom.models.sdpa) against the float-mask form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

import tocom
from tocom.models.adapter import attend
from tocom.models.sdpa import get_prop_form, prop_form, proportional_sdpa, set_prop_form, uses_channel

TOL = dict(rtol=1e-12, atol=1e-12)  # float64: the two forms differ only in summation order


def qkv_size(head_dim, batch=2, heads=3, n=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    size = torch.randint(1, 6, (batch, n, 1), generator=g).double()
    return q, k, v, size


def naive(q, k, v, size, scale=None, bias=None):
    """softmax(scale q k^T + log(size of each key) [+ bias]) v, written out."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = scale * q @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


@pytest.fixture
def sdpa_widths(monkeypatch):
    """The head dims SDPA was called with (the channel form pads them to a multiple of 8)."""
    widths, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        widths.append(q.shape[-1])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return widths


@pytest.mark.parametrize("head_dim", [12, 20, 64])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_channel_form_equals_mask_form_and_the_naive_formula(head_dim, scale, sdpa_widths):
    q, k, v, size = qkv_size(head_dim)
    with prop_form("channel"):
        channel = proportional_sdpa(q, k, v, size, scale=scale)
    with prop_form("mask"):
        mask = proportional_sdpa(q, k, v, size, scale=scale)
    assert sdpa_widths == [head_dim + 1 + (-(head_dim + 1) % 8), head_dim]
    assert sdpa_widths[0] % 8 == 0
    assert channel.shape == q.shape
    torch.testing.assert_close(channel, mask, **TOL)
    torch.testing.assert_close(channel, naive(q, k, v, size, scale), **TOL)


@pytest.mark.parametrize("head_dim", [12, 64])
def test_forms_agree_with_dropout_under_the_same_seed(head_dim):
    q, k, v, size = qkv_size(head_dim)
    outs = []
    for form in ("channel", "mask"):
        torch.manual_seed(7)
        with prop_form(form):
            outs.append(proportional_sdpa(q, k, v, size, dropout_p=0.3))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    assert not torch.allclose(outs[0], naive(q, k, v, size))  # dropout did act


def test_channel_form_gradients_equal_mask_form():
    grads = []
    for form in ("channel", "mask"):
        q, k, v, size = qkv_size(20)
        for t in (q, k, v):
            t.requires_grad_(True)
        with prop_form(form):
            proportional_sdpa(q, k, v, size).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_without_sizes_or_with_a_bias_the_mask_call_is_kept(sdpa_widths):
    q, k, v, size = qkv_size(20)
    bias = torch.randn(1, 3, 17, 17, dtype=torch.float64)
    with prop_form("channel"):
        plain = proportional_sdpa(q, k, v, None)
        biased = proportional_sdpa(q, k, v, size, bias=bias)
    assert sdpa_widths == [20, 20]  # neither padded
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(biased, naive(q, k, v, size, bias=bias), **TOL)


@pytest.mark.parametrize("need", ["keys", "cls_attn"])
def test_attend_metric_is_the_same_in_both_forms(need):
    q, k, v, size = qkv_size(12)
    results = {}
    for form in ("channel", "mask"):
        with prop_form(form):
            results[form] = attend(q, k, v, size, need)
    torch.testing.assert_close(results["channel"][0], results["mask"][0], **TOL)
    torch.testing.assert_close(results["channel"][1], results["mask"][1], **TOL)
    if need == "keys":
        assert torch.equal(results["channel"][1], k.mean(1))  # the un-padded keys
    else:
        logits = 12 ** -0.5 * q[:, :, :1] @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
        torch.testing.assert_close(results["channel"][1], logits.softmax(-1).mean(1)[:, 0], **TOL)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_patched_model_at_r8_agrees_between_forms_in_float64(method, sdpa_widths):
    model = tiny_vit(img_size=64).double()  # 64 patches of 8 px, head dim 16
    tocom.patch(model, method, prop_attn=True, fuse=method == "evit")  # EViT has sizes only when fusing
    model.r = 8
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        with prop_form("channel"):
            channel = model(x)
        padded = sorted(set(sdpa_widths))
        with prop_form("mask"):
            mask = model(x)
    assert padded == [16, 24]  # block 0 sees no sizes yet; later blocks take the channel
    torch.testing.assert_close(channel, mask, **TOL)


def test_r0_is_bit_identical_to_the_unpatched_model_in_the_channel_form():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), prop_form("channel"):
        stock = model(x)
        tocom.patch(model, prop_attn=True)
        assert torch.equal(model(x), stock)


def test_auto_form_is_channel_on_cuda_only_and_bad_forms_are_refused():
    assert get_prop_form() == "auto"
    assert uses_channel(torch.device("cuda")) and not uses_channel(torch.device("cpu"))
    with prop_form("mask"):
        assert not uses_channel(torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown proportional-attention form 'flash'; use one of"):
        set_prop_form("flash")
    assert get_prop_form() == "auto"


@pytest.mark.slow
def test_real_deit_tiny_at_r16_gives_the_same_logits_in_both_forms(shared):
    from test_real_weights import imagenet_batch, load_deit

    model = tocom.patch(load_deit(shared))
    model.r = 16
    x, _ = imagenet_batch(shared, model, limit=16)
    with torch.no_grad():
        with prop_form("channel"):
            channel = model(x)
        with prop_form("mask"):
            mask = model(x)
    # float32; on the CPU the extra channel is the last term of each dot product, so the two forms
    # round alike (measured: equal); on other kernels they agree to float32 rounding
    torch.testing.assert_close(channel, mask, rtol=1e-4, atol=1e-4)
    top2 = mask.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # a near-tie may flip under another summation order
    assert clear.any() and torch.equal(channel.argmax(1)[clear], mask.argmax(1)[clear])
