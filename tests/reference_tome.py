"""A deliberately naive, loop-based restatement of the original ToMe algorithm for tests.

It works one image at a time with Python lists and an explicit softmax, so it shares no code
(and no vectorisation tricks) with tocom's implementation.
"""

from __future__ import annotations

import math

import torch


def naive_merge(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, num_prefix: int):
    """One image. metric (N, Cm), x (N, C), size (N,). Returns merged x, size and a group list."""
    n = x.shape[0]
    r = min(r, (n - num_prefix) // 2)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    set_a = list(range(0, n, 2))
    set_b = list(range(1, n, 2))
    best = []
    for a in set_a:
        if a < num_prefix:
            best.append((-math.inf, a, None))
            continue
        scores = [(float(unit[a] @ unit[b]), b) for b in set_b if b >= num_prefix]
        score, partner = max(scores, key=lambda s: s[0])
        best.append((score, a, partner))
    ranked = sorted(best, key=lambda s: -s[0])
    merged = {a: b for _, a, b in ranked[:r]}
    groups = {b: [b] for b in set_b}
    for a, b in merged.items():
        groups[b].append(a)
    kept_a = [a for a in set_a if a not in merged]
    prefix = list(range(num_prefix))
    order = prefix + [a for a in kept_a if a >= num_prefix] + [b for b in set_b if b >= num_prefix]
    out_x, out_size, out_groups = [], [], []
    for t in order:
        members = groups.get(t, [t])
        w = size[members]
        out_x.append((x[members] * w[:, None]).sum(0) / w.sum())
        out_size.append(w.sum())
        out_groups.append(sorted(members))
    return torch.stack(out_x), torch.stack(out_size), out_groups


def naive_vit_forward(model, images: torch.Tensor, schedule: list[int], prop_attn: bool = True):
    """Logits of a timm ViT (no layer scale, no q/k norm) with naive ToMe, image by image."""
    outputs = []
    for img in images:
        x = model._pos_embed(model.patch_embed(img[None]))[0]
        size = torch.ones(x.shape[0])
        p = model.num_prefix_tokens
        for blk, r in zip(model.blocks, schedule):
            h = blk.norm1(x)
            attn = blk.attn
            qkv = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            logits = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
            if prop_attn:
                logits = logits + size.log()[None, None, :]
            w = torch.exp(logits - logits.amax(-1, keepdim=True))
            w = w / w.sum(-1, keepdim=True)
            o = (w @ v).transpose(0, 1).reshape(h.shape[0], -1)
            x = x + attn.proj(o)
            if r > 0:
                x, size, _ = naive_merge(k.mean(0), x, size, r, p)
            x = x + blk.mlp(blk.norm2(x))
        x = model.norm(x[None])
        outputs.append(model.forward_head(x)[0] if model.global_pool == "token" else None)
    return torch.stack(outputs)
