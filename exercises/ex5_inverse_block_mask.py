"""Exercise 5: data2vec 2.0's inverse block masking of image patches (SPEC §4).

Read first: the "Inverse block masking" paragraph of the data2vec 2.0 paper (arXiv 2212.07525), SPEC.md §4
(Masks), and the BEiT block masking it inverts (`block_mask` in masking.py). Check: python -m pytest exercises/ -k ex5
"""

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
    """Choose blocks of patches to KEEP in an (h, w) patch grid and mask all the others.

    For each of the `batch` samples:
      - draw n_blocks = int(h * w * (1 - ratio + adjust) / block**2) block centres uniformly among the h * w
        patches, with replacement (`adjust` makes up for blocks that overlap);
      - a centre at (i, j) keeps the patches of rows i - block // 2 .. i - block // 2 + block - 1 and of the
        same columns around j, clipped at the border of the grid (for block 3: the 3x3 square around it);
      - then make the number of kept patches exactly n_keep = h * w - round(ratio * h * w): if more are kept,
        un-keep uniformly chosen kept patches; if fewer, keep uniformly chosen extra patches.
    Draw every random number from `generator`. Any order of draws is fine: the checks compare statistics.
    Returns (batch, h * w) bool, row-major (patch (i, j) at i * w + j), True = masked.
    """
    raise NotImplementedError("exercise 5: implement inverse_block_mask")
