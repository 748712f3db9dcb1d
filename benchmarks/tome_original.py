"""A baseline with the structure of the original ToMe timm patch, for `tocom bench --baseline`.

Written from the ToMe paper's description, not copied: a hand-written softmax attention that
adds log(size) to the logits, closures for merge and per-forward state held on the model.
It is here only to be timed against tocom; it is not part of the package.
"""

from __future__ import annotations

import math

import torch


def _matching(metric, r):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, mode):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def forward(model, x, r: int):
    """Logits of a timm ViT with one class token under ToMe at constant r, original style."""
    x = model._pos_embed(model.patch_embed(x))
    size = None
    for blk in model.blocks:
        attn = blk.attn
        h = blk.norm1(x)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + attn.proj(out)
        rr = min(r, (n - 1) // 2)
        if rr > 0:
            with torch.no_grad():
                merge = _matching(k.mean(1), rr)
            if size is None:
                size = torch.ones_like(x[..., 0, None])
            x = merge(x * size, "sum")
            size = merge(size, "sum")
            x = x / size
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))
