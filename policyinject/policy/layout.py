"""Row indices of the q, k and v pieces inside a fused QKV projection's output features.

Shared by kernel injection (which splits a fused projection to apply rotary embedding) and tensor
parallelism (which hands each rank matching q, k and v pieces).

Example:
    >>> q, k, v = qkv_rows("per_head", num_heads=2, num_kv_heads=2, head_dim=2)
    >>> q.tolist(), k.tolist(), v.tolist()
    ([0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11])
    >>> [t.tolist() for t in qkv_rows("blocks", 2, 1, 2)]
    [[0, 1, 2, 3], [4, 5], [6, 7]]
"""

from __future__ import annotations

import torch

from .model import QKVLayout


def qkv_rows(layout: "QKVLayout | str", num_heads: int, num_kv_heads: int, head_dim: int):
    """Return three index tensors: the q rows (head-major), k rows and v rows of the fused output."""
    layout = QKVLayout(layout)
    d = head_dim
    if layout is QKVLayout.BLOCKS:
        q = torch.arange(num_heads * d)
        k = num_heads * d + torch.arange(num_kv_heads * d)
        v = (num_heads + num_kv_heads) * d + torch.arange(num_kv_heads * d)
        return q, k, v
    if layout is QKVLayout.PER_HEAD:
        if num_heads != num_kv_heads:
            raise ValueError("the per_head QKV layout needs as many kv heads as query heads")
        base = torch.arange(num_heads)[:, None] * (3 * d)
        offs = torch.arange(d)[None, :]
        return (base + offs).flatten(), (base + d + offs).flatten(), (base + 2 * d + offs).flatten()
    # PER_KV_GROUP: per kv group, its q heads then one k head then one v head.
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group evenly over {num_kv_heads} kv heads")
    g = num_heads // num_kv_heads
    group = (g + 2) * d
    base = torch.arange(num_kv_heads)[:, None] * group
    q = (base + torch.arange(g * d)[None, :]).flatten()
    k = (base + g * d + torch.arange(d)[None, :]).flatten()
    v = (base + (g + 1) * d + torch.arange(d)[None, :]).flatten()
    return q, k, v
