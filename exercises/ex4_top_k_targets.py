"""Exercise 4: data2vec's targets, the average of the teacher's top K blocks (SPEC §1.4, §2).

Read first: the data2vec paper's "Targets" paragraph and SPEC.md §1 step 4 and §2 (the K / norm row), then the
docstring of `build_targets` in data2vec.py. Check: python -m pytest exercises/ -k ex4
"""

import torch
from torch import Tensor


def top_k_targets(layers: list[Tensor], k: int, final_norm: bool) -> Tensor:
    """The regression target built from the outputs of all the teacher's blocks (text and vision recipe).

    layers: one (B, T, C) tensor per block, first block first, in any float dtype (bf16 under autocast).
    Take the last k blocks; layer-normalise each one over C (no affine parameters, eps 1e-5) in fp32;
    average the k normalised tensors; if final_norm, layer-normalise the average again (vision).
    Returns (B, T, C) float32.
    """
    raise NotImplementedError("exercise 4: implement top_k_targets")
