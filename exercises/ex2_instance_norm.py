"""Exercise 2: instance-normalised targets over time, on a padded batch (SPEC §1.4, §6).

Read first: SPEC.md §1 step 4 and §6 ("Instance norm over padded frames ... changes targets on padded batches"),
the data2vec paper's "Training targets" section, and how `normalize` is called in data2vec.py's `build_targets`.
Check: python -m pytest exercises/ -k ex2
"""

import torch
from torch import Tensor


def instance_norm(y: Tensor, padding_mask: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise each sample's channels over time, ignoring padded steps; no learned parameters.

    y: (B, T, C) float. padding_mask: (B, T) bool, True = padded step, or None (no padding); every sample has
    at least one real step. Do not modify y.
    For every sample b and channel c, with mean and variance taken over the real (unpadded) steps only:
        out[b, t, c] = (y[b, t, c] - mean) / sqrt(var + eps),   var biased (divide by the number of real steps),
    exactly what F.instance_norm would give on the unpadded sequence alone. Values at padded steps are not
    checked (they never become targets). Returns (B, T, C).
    """
    raise NotImplementedError("exercise 2: implement instance_norm")
