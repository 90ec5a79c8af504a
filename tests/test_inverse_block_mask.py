"""data2vec 2.0's inverse block masking: exact count, shape, determinism, and statistics against a naive copy of
fairseq's `compute_block_mask_2d` (inverse_mask=True, require_same_masks=True)."""

import random

import pytest
import torch

from masking import inverse_block_mask


def fairseq_reference(h: int, w: int, ratio: float, block: int, adjust: float) -> torch.Tensor:
    """One mask, the way fairseq builds it (python `random` instead of torch): block centres with replacement, each
    window's indices clamped to the grid, then random patches dropped or added to the exact kept count. (h, w) bool,
    True = masked."""
    L = h * w
    keep = torch.zeros(h, w, dtype=torch.bool)
    offset = block // 2
    for _ in range(int(L * (1 - ratio + adjust) / block**2)):
        c = random.randrange(L)
        for i in range(block):
            for j in range(block):
                keep[min(max(c // w + i - offset, 0), h - 1), min(max(c % w + j - offset, 0), w - 1)] = True
    flat = keep.view(-1)
    n_keep, kept = L - round(ratio * L), flat.nonzero().flatten().tolist()
    if len(kept) > n_keep:
        flat[random.sample(kept, len(kept) - n_keep)] = False
    else:
        flat[random.sample((~flat).nonzero().flatten().tolist(), n_keep - len(kept))] = True
    return ~keep


def kept_neighbour_agreement(masks: torch.Tensor) -> float:
    """P(right or lower neighbour kept | patch kept) over (N, h, w) masks: the kept fraction for i.i.d. masking."""
    keep = ~masks
    right = (keep[:, :, :-1] & keep[:, :, 1:]).sum() / keep[:, :, :-1].sum()
    down = (keep[:, :-1] & keep[:, 1:]).sum() / keep[:, :-1].sum()
    return float(right + down) / 2


@pytest.mark.parametrize(
    "grid, ratio, block", [((14, 14), 0.8, 3), ((8, 8), 0.8, 3), ((7, 10), 0.6, 2), ((5, 5), 0.9, 5)]
)
def test_shape_and_exact_count(grid, ratio, block):
    h, w = grid
    masks = inverse_block_mask(300, grid, ratio=ratio, block=block, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (300, h * w) and masks.dtype == torch.bool
    assert (masks.sum(1) == round(ratio * h * w)).all()


def test_fourteen_by_fourteen_keeps_39_patches_in_blocks():
    masks = inverse_block_mask(2000, (14, 14), generator=torch.Generator().manual_seed(1)).view(-1, 14, 14)
    assert (masks.sum((1, 2)) == 157).all()                                   # ~80 % masked (SPEC §4)
    # kept patches come in 3x3 islands: an i.i.d. mask would give 39 / 196 = 0.2
    assert kept_neighbour_agreement(masks) > 0.5


@pytest.mark.parametrize(
    "grid, ratio, block, adjust", [((14, 14), 0.8, 3, 0.07), ((8, 8), 0.8, 3, 0.07), ((9, 12), 0.6, 2, 0.0)]
)
def test_matches_fairseq_statistics(grid, ratio, block, adjust):
    """Same blockiness and same border-light placement as fairseq's algorithm, to within sampling noise."""
    h, w = grid
    n = 2000
    g = torch.Generator().manual_seed(2)
    ours = inverse_block_mask(n, grid, ratio=ratio, block=block, adjust=adjust, generator=g).view(n, h, w)
    random.seed(2)
    ref = torch.stack([fairseq_reference(h, w, ratio, block, adjust) for _ in range(n)])
    assert torch.equal(ours.sum((1, 2)), ref.sum((1, 2)))
    assert abs(kept_neighbour_agreement(ours) - kept_neighbour_agreement(ref)) < 0.02
    # per patch: P(kept) ~ 0.2, so the difference of two 2000-draw means has a standard deviation of ~0.013
    assert ((~ours).float().mean(0) - (~ref).float().mean(0)).abs().max() < 0.06


def test_extreme_ratios_and_determinism():
    g = torch.Generator().manual_seed(3)
    assert inverse_block_mask(4, (6, 6), ratio=1.0, generator=g).all()
    assert not inverse_block_mask(4, (6, 6), ratio=0.0, generator=g).any()
    a = inverse_block_mask(16, (14, 14), generator=torch.Generator().manual_seed(4))
    b = inverse_block_mask(16, (14, 14), generator=torch.Generator().manual_seed(4))
    c = inverse_block_mask(16, (14, 14), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])                                        # rows differ within a batch
