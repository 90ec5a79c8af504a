"""Reference solution of exercise 5: inverse block masking, one sample and one block at a time."""

import torch
from torch import Tensor


def inverse_block_mask(
    batch: int,
    grid: tuple[int, int],
    *,
    ratio: float = 0.8,
    block: int = 3,
    adjust: float = 0.07,
    generator: torch.Generator,
) -> Tensor:
    """See exercises/ex5_inverse_block_mask.py. Returns (batch, h * w) bool, True = masked."""
    h, w = grid
    n_keep = h * w - round(ratio * h * w)
    n_blocks = int(h * w * (1 - ratio + adjust) / block**2)
    masks = []
    for _ in range(batch):
        keep = torch.zeros(h, w, dtype=torch.bool)                            # (h, w)
        for c in torch.randint(h * w, (n_blocks,), generator=generator).tolist():
            top, left = c // w - block // 2, c % w - block // 2
            keep[max(top, 0) : top + block, max(left, 0) : left + block] = True  # slicing clips at h and w
        keep = keep.flatten()                                                 # (h * w,)
        kept, other = keep.nonzero().flatten(), (~keep).nonzero().flatten()
        if len(kept) > n_keep:
            drop = kept[torch.randperm(len(kept), generator=generator)[: len(kept) - n_keep]]
            keep[drop] = False
        else:
            add = other[torch.randperm(len(other), generator=generator)[: n_keep - len(kept)]]
            keep[add] = True
        masks.append(~keep)
    return torch.stack(masks)                                                 # (batch, h * w)
