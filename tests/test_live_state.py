"""State under live use (issue 11): each test here failed before its fix.

The model's weights are the truth, switching is atomic w.r.t. forwards on other threads, a call
can run at its own degree, and the readings of schedules, plugins and sizes are unambiguous.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import random_plugin, tiny_vit

import tocom
from tocom.compensator import attachment
from tocom.compress import prune, prune_plan, resolve_schedule

D = 64  # tiny_vit's attention dim



def images(n=2, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def qv_rows(model, block=1):
    w = model.blocks[block].attn.qkv.weight.detach()
    return w[:D].clone(), w[2 * D:].clone()


# 1. attach must not keep a stale copy of W_q / W_v ---------------------------------------------
def test_weights_loaded_after_attach_are_the_truth():
    model = tiny_vit()
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    new = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new)  # e.g. a better checkpoint loaded into the served model
    tocom.set_degree(model, 4)
    q, v = qv_rows(model)
    delta = plugin.deltas(0, 4)[1]
    torch.testing.assert_close(q, new["blocks.1.attn.qkv.weight"][:D] + delta[0])
    torch.testing.assert_close(v, new["blocks.1.attn.qkv.weight"][2 * D:] + delta[1])
    tocom.detach(model)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, new["blocks.1.attn.qkv.weight"])


def test_optimizer_step_and_peft_fold_after_attach_survive_a_switch():
    model = tiny_vit()
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 4)
    w = model.blocks[1].attn.qkv.weight
    before = w.detach().clone()
    step = 1e-2 * torch.randn_like(w)
    with torch.no_grad():
        w.add_(step)  # what an optimizer does, in place
    tocom.set_degree(model, 0)
    # Pre-plugin weights = current - applied delta, so the step survives the switch to 0.
    expected = before + step
    expected[:D] -= plugin.deltas(0, 4)[1, 0]
    expected[2 * D:] -= plugin.deltas(0, 4)[1, 1]
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)

    tocom.peft.add_lora(model, rank=2, targets=("q", "v"))
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.lora_B.normal_(0, 0.1)
    lora = model.blocks[1].attn.qkv.delta_weight()
    folded_at0 = model.blocks[1].attn.qkv.base.weight.detach() + lora
    tocom.peft.fold(model)
    tocom.set_degree(model, 6)
    tocom.set_degree(model, 0)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight.detach(), folded_at0, rtol=0, atol=1e-6)


# 2. unpatch detaches first ----------------------------------------------------------------------
def test_unpatch_removes_the_folded_delta():
    model = tiny_vit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tocom.attach(model, random_plugin(model), source=0)
    tocom.set_degree(model, 4)
    tocom.unpatch(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    with pytest.raises(ValueError, match="no compensator"):
        attachment(model)


# 3. an evaluation sweep leaves the model as it found it ---------------------------------------
def test_sweep_restores_attachment_degree_and_scale():
    from torch.utils.data import TensorDataset

    from tocom.jobs.evaluate import make_loader, sweep

    model = tiny_vit()
    plugin = random_plugin(model)
    loader = make_loader(TensorDataset(images(4), torch.tensor([0, 1, 2, 3])), batch_size=2)
    tocom.patch(model)
    model.r = 1
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sweep(model, loader, [0, 2], source=0, plugin=plugin, scales=[0.0, 0.5], progress=False)
    assert "_tocom_compensator" not in model.__dict__ and model.r == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k

    tocom.attach(model, plugin, source=0, scale=0.3)
    tocom.set_degree(model, 2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sweep(model, loader, [0, 4], source=0, plugin=plugin, scales=[0.0, 0.5], progress=False)
    att = attachment(model)
    assert (att.degree, att.scale, model.r) == (2, 0.3, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


# 4. the live delta follows the input's device (CPU proxy: the meta device) -----------------------
def test_live_delta_follows_the_input_device_and_dtype():
    model = tiny_vit()
    plugin = random_plugin(model).to("meta")
    delta = plugin.live_delta(0, 4)
    dq, dv = delta(1, torch.empty(2, 17, 64, device="meta", dtype=torch.bfloat16))
    assert dq.device.type == "meta" and dq.dtype == torch.bfloat16 and dv.shape == (2, 17, D)


# 5. methods must agree; re-patching is checked like patching ------------------------------------
def test_plugin_method_must_match_the_model():
    model = tocom.patch(tiny_vit(), "evit")
    with pytest.raises(ValueError, match="tome.*evit|evit.*tome"):
        tocom.attach(model, random_plugin(model, method="tome"), source=0)
    tocom.attach(model, random_plugin(model, method="evit"), source=0)  # a matching plugin is fine
    with pytest.raises(ValueError, match="attached"):
        tocom.patch(model, "tome")


def test_repatching_checks_the_class_token_and_pyra():
    model = tocom.patch(tiny_vit(class_token=False, global_pool="avg"), "tome")
    with pytest.raises(ValueError, match="class token"):
        tocom.patch(model, "evit")
    assert model._tocom.method == "tome"

    from tocom.pyra import add_pyra

    model = tocom.patch(tiny_vit(), "tome")
    model.r = 2
    add_pyra(model)
    with pytest.raises(ValueError, match="PYRA"):
        tocom.patch(model, "evit")
    assert model._tocom.method == "tome"


# 6. tuples are (r, inflection), lists are per block ---------------------------------------------
def test_tuple_is_always_r_and_inflection():
    assert resolve_schedule((16, 1), 5) == resolve_schedule((16, 1.0), 5) == [0, 8, 16, 24, 32]
    assert resolve_schedule([16, 1], 5) == [16, 1, 0, 0, 0]
    with pytest.raises(TypeError, match="list"):
        resolve_schedule((4, 3, 2), 5)
    with pytest.raises(TypeError, match="int"):
        resolve_schedule([4, 1.0], 5)


# 7. forward_head takes sizes explicitly ---------------------------------------------------------
def test_forward_head_does_not_read_sizes_of_another_call():
    model = tocom.patch(tiny_vit(class_token=False, global_pool="avg"))
    model.r = 3
    a, b = images(seed=1), images(seed=2)
    with torch.no_grad():
        expected = model(a)
        tokens_a, state_a = model.forward_tokens(a)
        model.forward_features(b)  # a later call on the same model (maybe another thread)
        torch.testing.assert_close(model.forward_head(tokens_a, size=state_a.size), expected)
        with pytest.raises(ValueError, match="size"):
            model.forward_head(tokens_a)


# 8. EViT fusing under proportional attention counts sizes once ----------------------------------
def test_evit_fuse_weights_by_attention_that_already_includes_size():
    # Proportional attention adds log(size) to the logits, so a token's class attention is already
    # the attention its `size` patches would get together; weighting by size again counts it twice.
    attn = torch.tensor([[0.40, 0.05, 0.30, 0.10, 0.15]])
    x = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0]).view(1, 5, 1)
    size = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0]).view(1, 5, 1)
    plan = prune_plan(attn, 1, num_prefix=1, fuse=True)  # drops tokens 1 and 3, fuses them
    kept, new_size = prune(plan, x, size, attn_includes_size=True)
    by_hand = (0.05 * 10.0 + 0.10 * 30.0) / (0.05 + 0.10)
    assert kept[0, :, 0].tolist()[:3] == [0.0, 20.0, 40.0]
    assert kept[0, 3, 0].item() == pytest.approx(by_hand)
    assert new_size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 5.0]
    # Without proportional attention each token's attention is that of one patch: weight by size.
    kept, _ = prune(plan, x, size, attn_includes_size=False)
    assert kept[0, 3, 0].item() == pytest.approx((0.05 * 3 * 10.0 + 0.10 * 2 * 30.0) / (0.15 + 0.2))


# 9. switching is atomic w.r.t. forwards on other threads; a call can have its own degree -----------
def test_switch_waits_for_a_running_forward():
    model = tiny_vit()
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 4)
    x = images()
    with torch.no_grad():
        at4 = model(x)
    started = threading.Event()
    hook = model.blocks[0].attn.qkv.register_forward_hook(
        lambda *_: started.set() or time.sleep(0.3))
    result = {}

    def serve():
        with torch.no_grad():
            result["out"] = model(x)

    worker = threading.Thread(target=serve)
    worker.start()
    assert started.wait(5)
    tocom.set_degree(model, 8)  # must not change weights under the running forward
    worker.join(5)
    hook.remove()
    assert torch.equal(result["out"], at4)
    assert attachment(model).degree == 8 and model.r == 8


def test_per_call_degree_leaves_shared_state_alone():
    model = tiny_vit()
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=2)
    tocom.set_degree(model, 4)
    x = images()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        at8 = model(x, r=8)
        assert model.r == 4 and attachment(model).degree == 4
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), k
        tocom.set_degree(model, 8)
        torch.testing.assert_close(at8, model(x), rtol=1e-4, atol=1e-5)
    plain = tocom.patch(tiny_vit())
    plain.r = 1
    with torch.no_grad():
        once = plain(x, r=3)
        plain.r = 3
        assert torch.equal(once, plain(x))


def test_a_switch_that_waits_for_running_forwards_logs_it(caplog):
    import logging
    import threading

    from tocom.models.lock import StateLock

    lock, inside, release = StateLock(), threading.Event(), threading.Event()

    def forward():
        with lock.shared():
            inside.set()
            release.wait(5)

    reader = threading.Thread(target=forward)
    reader.start()
    assert inside.wait(5)
    threading.Timer(0.05, release.set).start()
    with caplog.at_level(logging.DEBUG, logger="tocom.models.lock"), lock.exclusive():
        pass
    reader.join(5)
    assert "waited" in caplog.text and "for 1 running forwards" in caplog.text
