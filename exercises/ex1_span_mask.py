"""Exercise 1: wav2vec 2.0 span masking, the speech masking policy of data2vec (SPEC §2, speech).

Read first: SPEC.md §2 (masking row) and §6 (fairseq's "same mask count per row"), then the docstring of
`span_mask` in masking.py (do not read its body yet). Check: python -m pytest exercises/ -k ex1
"""

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
    """Mask spans of `span` frames in each row of a padded batch of B rows of T frames.

    lengths: (B,) long, the number of real frames L of each row (L <= T; frames L..T-1 are padding).
    For each row:
      - the number of spans is k = int(prob * L / span + u), u ~ U[0, 1) drawn from `generator`
        (probabilistic rounding), at least min_spans, at most the number of candidate starts;
      - the candidate starts are 0 .. max(L - span, 1) - 1; draw k of them without replacement, uniformly;
      - each span masks the frames s .. s + span - 1 that are real (< L): padding is never masked;
        overlapping spans simply merge.
    Draw every random number from `generator` (never the global RNG), so the same generator state gives the
    same mask. Any order of draws is fine: the checks compare statistics, not exact draws.
    Returns (B, T) bool, True = masked.
    """
    raise NotImplementedError("exercise 1: implement span_mask")
