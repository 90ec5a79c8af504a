"""Masking policies: which steps the student must predict.

Each policy is a small pure function of (shape or tokens, generator): the same generator state gives the same mask,
so a run that resumes at step N draws exactly the masks the uninterrupted run drew (train.py seeds a generator per
step and micro-batch). Convention everywhere: mask (B, T) bool, True = masked (the student predicts it).
"""

import torch
from torch import Tensor


def _choose(candidates: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Per row, mark round(prob * n_candidates) of the candidate steps, uniformly at random.

    candidates: (B, T) bool. Probabilistic rounding (fairseq's `int(p * n + rand)`) keeps the expected fraction
    exactly `prob` even for short rows. Returns (B, T) bool, a subset of candidates.
    """
    B, T = candidates.shape
    n = candidates.sum(1).float()                                             # (B,)
    k = (prob * n + torch.rand(B, generator=generator)).floor().long()        # (B,)
    noise = torch.rand(B, T, generator=generator)                             # (B, T)
    noise[~candidates] = 2.0                                                  # non-candidates sort last
    rank = noise.argsort(1).argsort(1)                                        # (B, T) rank of each step in its row
    return rank < k[:, None]


def bert_mask(
    tokens: Tensor,
    *,
    mask_id: int,
    n_normal: int,
    special: Tensor,
    generator: torch.Generator,
    prob: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """BERT masking (SPEC §2, text): choose `prob` of the real tokens; of those 80 % -> <mask>, 10 % -> a random
    token, 10 % unchanged. The student predicts every chosen step, whatever it was replaced with.

    tokens: (B, T) long. special: (B, T) bool, True where a token may never be chosen (padding, <s>, </s>).
    n_normal: random replacements are drawn from ids [0, n_normal), i.e. never a special token.
    Returns (student_tokens (B, T) long, mask (B, T) bool).
    """
    mask = _choose(~special, prob, generator)                                 # (B, T)
    u = torch.rand(tokens.shape, generator=generator)                         # (B, T)
    to_mask = mask & (u < replace_prob)
    to_random = mask & (u >= replace_prob) & (u < replace_prob + random_prob)
    random_tokens = torch.randint(n_normal, tokens.shape, generator=generator)
    student = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    student = torch.where(to_random, random_tokens, student)
    return student, mask
