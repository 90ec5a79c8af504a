"""Reference solution of exercise 2: instance norm of each sample on its real steps only."""

import torch
from torch import Tensor


def instance_norm(y: Tensor, padding_mask: Tensor | None, eps: float = 1e-5) -> Tensor:
    """See exercises/ex2_instance_norm.py. y: (B, T, C); padding_mask: (B, T) bool or None. Returns (B, T, C)."""
    out = y.clone()
    for b in range(y.shape[0]):
        real = y[b] if padding_mask is None else y[b][~padding_mask[b]]       # (L, C): the real steps
        mean = real.mean(0)                                                   # (C,)
        var = ((real - mean) ** 2).mean(0)                                    # (C,) biased
        out[b] = (y[b] - mean) / torch.sqrt(var + eps)
    return out
