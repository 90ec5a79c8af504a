"""BEiT block masking: exact count, block shape, and statistics against a naive copy of BEiT's MaskingGenerator."""

import math
import random

import pytest
import torch

from masking import block_mask


def components(mask: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected masked regions of one (h, w) bool mask, by naive flood fill."""
    h, w = mask.shape
    todo = {(i, j) for i in range(h) for j in range(w) if mask[i, j]}
    sizes = []
    while todo:
        stack, size = [todo.pop()], 0
        while stack:
            i, j = stack.pop()
            size += 1
            for n in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if n in todo:
                    todo.remove(n)
                    stack.append(n)
        sizes.append(size)
    return sizes


def beit_reference(h: int, w: int, num_masking: int, min_patches: int) -> torch.Tensor:
    """BEiT's MaskingGenerator as published (python `random`, may stop short of num_masking). (h, w) bool."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    while count < num_masking:
        budget, delta = num_masking - count, 0
        for _ in range(10):
            area = random.uniform(min_patches, budget)
            aspect = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = random.randint(0, h - bh), random.randint(0, w - bw)
                new = bh * bw - int(mask[top : top + bh, left : left + bw].sum())
                if 0 < new <= budget:
                    mask[top : top + bh, left : left + bw] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def neighbour_agreement(masks: torch.Tensor) -> float:
    """P(right or lower neighbour masked | patch masked), over (N, h, w) masks: 0.6 for i.i.d. masking."""
    right = (masks[:, :, :-1] & masks[:, :, 1:]).sum() / masks[:, :, :-1].sum()
    down = (masks[:, :-1] & masks[:, 1:]).sum() / masks[:, :-1].sum()
    return float(right + down) / 2


@pytest.mark.parametrize("grid, n", [((14, 14), 2000), ((8, 8), 500), ((4, 4), 500), ((7, 10), 300)])
def test_exact_count_and_min_block_size(grid, n):
    h, w = grid
    masks = block_mask(n, grid, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (n, h * w) and masks.dtype == torch.bool
    assert (masks.sum(1) == round(0.6 * h * w)).all()
    min_patches = max(1, round(16 * h * w / 196))
    for m in masks[:300].view(-1, h, w):
        assert min(components(m)) >= min_patches


def test_other_ratio_and_min_patches():
    g = torch.Generator().manual_seed(1)
    masks = block_mask(200, (14, 14), ratio=0.4, min_patches=9, generator=g)
    assert (masks.sum(1) == round(0.4 * 196)).all()
    assert all(min(components(m)) >= 9 for m in masks.view(-1, 14, 14))
    tiny = block_mask(50, (14, 14), ratio=0.05, generator=g)                 # budget 10 < 16: one grown region
    assert (tiny.sum(1) == 10).all()
    assert all(components(m) == [10] for m in tiny.view(-1, 14, 14))


def test_matches_beit_statistics():
    """Same blockiness and same centre-heavy placement as BEiT's own generator, to within sampling noise."""
    n = 2000
    ours = block_mask(n, (14, 14), generator=torch.Generator().manual_seed(2)).view(n, 14, 14)
    random.seed(2)
    ref = torch.stack([beit_reference(14, 14, 118, 16) for _ in range(n)])
    assert abs(ref.float().sum((1, 2)).mean() / 196 - 0.6) < 0.02
    assert neighbour_agreement(ours) > 0.85                                   # i.i.d. masking would give 0.6
    assert abs(neighbour_agreement(ours) - neighbour_agreement(ref)) < 0.02
    assert (ours.float().mean(0) - ref.float().mean(0)).abs().max() < 0.1


def test_deterministic_given_generator():
    a = block_mask(16, (14, 14), generator=torch.Generator().manual_seed(3))
    b = block_mask(16, (14, 14), generator=torch.Generator().manual_seed(3))
    c = block_mask(16, (14, 14), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])                                        # rows differ within a batch
