"""Reference solution of exercise 1: span masking, one row and one span at a time."""

import torch
from torch import Tensor


def span_mask(
    lengths: Tensor,
    T: int,
    *,
    prob: float = 0.65,
    span: int = 10,
    generator: torch.Generator,
    min_spans: int = 1,
) -> Tensor:
    """See exercises/ex1_span_mask.py. Returns (B, T) bool, True = masked."""
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)                     # (B, T)
    for b, L in enumerate(lengths.tolist()):
        n_starts = max(L - span, 1)
        u = torch.rand(1, generator=generator).item()
        k = min(max(int(prob * L / span + u), min_spans), n_starts)
        starts = torch.randperm(n_starts, generator=generator)[:k]           # k distinct starts
        for s in starts.tolist():
            mask[b, s : min(s + span, L)] = True                              # never past the real frames
    return mask
