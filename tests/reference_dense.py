"""A naive, loop-based restatement of dense-mode ToMe for tests: one image at a time, attention
with an explicit softmax on the full sequence, the naive ToMe merge of ``reference_tome`` before
the MLP, and the MLP output copied back to every member of each merged group by a Python loop."""

from __future__ import annotations

import torch
from reference_tome import naive_merge


def naive_dense_tokens(model, images: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """Final normalised tokens (B, N, C) of a timm ViT (no layer scale, no q/k norm) in dense mode."""
    outputs = []
    for img in images:
        x = model._pos_embed(model.patch_embed(img[None]))[0]
        n, p = x.shape[0], model.num_prefix_tokens
        for blk, r in zip(model.blocks, schedule):
            h = blk.norm1(x)
            attn = blk.attn
            qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            logits = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5  # all sizes are 1: no log term
            w = torch.exp(logits - logits.amax(-1, keepdim=True))
            w = w / w.sum(-1, keepdim=True)
            x = x + attn.proj((w @ v).transpose(0, 1).reshape(n, -1))
            r = min(r, (n - p) // 2)
            if r == 0:
                x = x + blk.mlp(blk.norm2(x))
                continue
            merged, _, groups = naive_merge(k.mean(0), x, torch.ones(n), r, p)
            y = blk.mlp(blk.norm2(merged))
            update = torch.empty_like(x)
            for row, members in enumerate(groups):
                for m in members:
                    update[m] = y[row]
            x = x + update
        outputs.append(model.norm(x[None])[0])
    return torch.stack(outputs)
