"""Masking policies: which steps the student must predict.

Each policy is a small pure function of (shape or tokens, generator): the same generator state gives the same mask,
so a run that resumes at step N draws exactly the masks the uninterrupted run drew (train.py seeds a generator per
step and micro-batch). Convention everywhere: mask (B, T) bool, True = masked (the student predicts it).
"""

import torch
import torch.nn.functional as F
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
    span: int = 1,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """BERT masking (SPEC §2, text): choose `prob` of the real tokens; of those 80 % -> <mask>, 10 % -> a random
    token, 10 % unchanged. The student predicts every chosen step, whatever it was replaced with.

    span > 1: spans of `span` tokens instead of single ones (fairseq's mask_multiple_length, the masking of
    data2vec's released text config: prob 0.35, span 4, replace_prob 1). Spans start at prob / span of the real
    tokens, run to the right, merge where they overlap and never cover a special token, so prob 0.35 with span 4
    masks about 30 % of a long row.

    tokens: (B, T) long. special: (B, T) bool, True where a token may never be chosen (padding, <s>, </s>).
    n_normal: random replacements are drawn from ids [0, n_normal), i.e. never a special token.
    Returns (student_tokens (B, T) long, mask (B, T) bool).
    """
    starts = _choose(~special, prob / span, generator)                        # (B, T); span 1: the masked tokens
    # token t is masked when a span starts in (t - span, t]: a difference of running counts of starts
    count = starts.long().cumsum(1)                                           # (B, T)
    before = F.pad(count, (span, 0))[:, :count.shape[1]]                      # (B, T) count at t - span
    mask = (count > before) & ~special                                        # (B, T)
    u = torch.rand(tokens.shape, generator=generator)                         # (B, T)
    to_mask = mask & (u < replace_prob)
    to_random = mask & (u >= replace_prob) & (u < replace_prob + random_prob)
    random_tokens = torch.randint(n_normal, tokens.shape, generator=generator)
    student = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    student = torch.where(to_random, random_tokens, student)
    return student, mask


def block_mask(
    batch: int,
    grid: tuple[int, int],
    *,
    ratio: float = 0.6,
    min_patches: int | None = None,
    min_aspect: float = 0.3,
    generator: torch.Generator,
) -> Tensor:
    """BEiT block-wise masking (SPEC §2, vision; BEiT's `MaskingGenerator`): cover a (h, w) patch grid with
    rectangles until exactly round(ratio * h * w) patches are masked.

    Each rectangle has an area drawn uniformly in [min_patches, patches still to mask], a log-uniform aspect
    ratio in [min_aspect, 1 / min_aspect] and a uniform position; it is kept if it masks at least one new patch
    and no more than the remaining budget, and a block gets 10 attempts before the loop gives up (as in BEiT).
    BEiT's loop can stop short of the target; we then grow the mask one patch at a time next to masked patches,
    so the count is exact and no isolated patch appears. Unlike BEiT we reject rectangles whose rounded sides
    give fewer than min_patches, so every connected masked region has at least min_patches patches, and we let a
    side span the whole grid (BEiT's `w < width` check forbids it). min_patches defaults to BEiT's 16 at 14x14,
    scaled by the grid area. At 14x14 and ratio 0.6 this masks 118 patches (data2vec_vision's command line: 120).
    Returns (B, h * w) bool, row-major.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio}: the masked share of the patches, in (0, 1]")
    h, w = grid
    target = round(ratio * h * w)
    if min_patches is None:
        min_patches = max(1, round(16 * h * w / 196))
    masks = [_one_block_mask(h, w, target, min_patches, min_aspect, generator) for _ in range(batch)]
    return torch.stack(masks).view(batch, h * w)                             # (B, h*w)


def _one_block_mask(h: int, w: int, target: int, min_patches: int, min_aspect: float, g: torch.Generator) -> Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)                                # (h, w)
    count = 0
    while count < target:
        added = _place_block(mask, target - count, min_patches, min_aspect, g)
        if added == 0:
            break
        count += added
    for _ in range(target - count):
        _grow(mask, g)
    return mask


def _place_block(mask: Tensor, budget: int, min_patches: int, min_aspect: float, g: torch.Generator) -> int:
    """Try 10 rectangles; mask the first that adds between 1 and `budget` new patches. Returns the number added."""
    h, w = mask.shape
    for _ in range(10):
        u_area, u_aspect, u_top, u_left = torch.rand(4, generator=g).tolist()
        area = min_patches + u_area * max(budget - min_patches, 0)
        aspect = min_aspect ** (1 - 2 * u_aspect)                             # log-uniform in [a, 1/a]
        bh, bw = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if bh * bw < min_patches or bh > h or bw > w:
            continue
        top, left = int(u_top * (h - bh + 1)), int(u_left * (w - bw + 1))
        block = mask[top : top + bh, left : left + bw]                        # (bh, bw) view into mask
        added = bh * bw - int(block.sum())
        if 0 < added <= budget:
            block.fill_(True)
            return added
    return 0


def _grow(mask: Tensor, g: torch.Generator) -> None:
    """Mask one uniformly chosen unmasked patch that touches the mask (any patch if the mask is empty)."""
    near = torch.zeros_like(mask)                                             # (h, w) 4-neighbours of the mask
    near[1:] |= mask[:-1]
    near[:-1] |= mask[1:]
    near[:, 1:] |= mask[:, :-1]
    near[:, :-1] |= mask[:, 1:]
    frontier = ~mask & near if mask.any() else ~mask
    noise = torch.rand(mask.shape, generator=g)
    noise[~frontier] = 2.0
    mask.view(-1)[noise.argmin()] = True


def span_mask(
    lengths: Tensor,
    T: int,
    *,
    prob: float = 0.65,
    span: int = 10,
    generator: torch.Generator,
    min_spans: int = 1,
) -> Tensor:
    """wav2vec 2.0 span masking (SPEC §2, speech; fairseq's `compute_mask_indices`, mask_type "static").

    A row of L = lengths[b] real frames gets int(prob * L / span + u) spans (u ~ U[0, 1), probabilistic rounding),
    at least min_spans. Span starts are drawn without replacement from [0, L - span), fairseq's range (so the last
    frame of a long row is never masked); each span covers `span` frames and overlapping spans merge, so prob 0.65
    masks ~49 % of a long row, not 65 %. A row of at most `span` frames gets a single span at 0 (fully masked).
    Spans stop at L: padding is never masked. Unlike fairseq (require_same_masks) we do not trim every row down to
    the smallest mask count in the batch, which would make a row's mask depend on the other rows' padding (SPEC §6).
    lengths: (B,) long, each <= T. Returns (B, T) bool.
    """
    B = lengths.shape[0]
    steps = torch.arange(T)                                                   # (T,)
    n_starts = (lengths - span).clamp(min=1)                                  # (B,) candidate span starts
    k = (prob * lengths / span + torch.rand(B, generator=generator)).long()   # (B,) spans per row
    k = k.clamp(min=min_spans).minimum(n_starts)
    noise = torch.rand(B, T, generator=generator)                             # (B, T)
    noise[steps >= n_starts[:, None]] = 2.0                                   # non-candidates sort last
    starts = noise.argsort(1).argsort(1) < k[:, None]                         # (B, T) True where a span starts
    # frame t is masked when a span starts in (t - span, t]: a difference of running counts of starts
    count = starts.long().cumsum(1)                                           # (B, T)
    before = torch.cat([count.new_zeros(B, span), count], 1)[:, :T]           # (B, T) count at t - span
    return (count > before) & (steps < lengths[:, None])


def inverse_block_mask(
    batch: int,
    grid: tuple[int, int],
    *,
    ratio: float = 0.8,
    block: int = 3,
    adjust: float = 0.07,
    generator: torch.Generator,
) -> Tensor:
    """data2vec 2.0's inverse block masking (SPEC §4, image; fairseq's `compute_block_mask_2d` with inverse_mask):
    choose square blocks of patches to KEEP and mask everything else, so the student sees a few visible islands.

    int(h * w * (1 - ratio + adjust) / block**2) block centres are drawn uniformly, with replacement, per sample;
    each keeps the block x block window that starts block // 2 patches above and left of its centre (centred for
    odd blocks), clipped at the grid's border. `adjust` (fairseq's mask_prob_adjust, 0.07) adds centres to make
    up for overlaps. Then every row is brought to exactly h * w - round(ratio * h * w) kept patches, as fairseq's
    require_same_masks does: uniformly chosen kept patches are dropped, or uniformly chosen others added. At 14x14
    and ratio 0.8: 5 blocks, 39 kept, 157 masked (fairseq floors the kept count, int(L * (1 - ratio)), which
    differs from ours by one patch on some grids). Returns (B, h * w) bool, row-major, True = masked.
    """
    h, w = grid
    L = h * w
    n_keep = L - round(ratio * L)
    n_blocks = int(L * (1 - ratio + adjust) / block**2)
    centres = torch.zeros(batch, 1, h, w)                                     # (B, 1, h, w)
    idx = torch.randint(L, (batch, n_blocks), generator=generator)            # (B, n_blocks), with replacement
    centres.view(batch, L).scatter_(1, idx, 1.0)
    # patch p is kept when a centre lies in [p - (block - 1 - block // 2), p + block // 2] along both axes:
    # a max-pool over the centres, padded so that windows are clipped at the border
    before, after = block - 1 - block // 2, block // 2
    covered = F.max_pool2d(F.pad(centres, (before, after, before, after)), block, stride=1)  # (B, 1, h, w)
    covered = covered.view(batch, L) > 0                                      # (B, L)
    # exactly n_keep per row: covered patches first, in random order, then the others, in random order
    priority = covered.float() + torch.rand(batch, L, generator=generator)   # (B, L) covered in [1, 2), others [0, 1)
    rank = priority.argsort(1, descending=True).argsort(1)                    # (B, L) 0 = highest priority
    return rank >= n_keep
