"""BERT masking statistics over many draws (SPEC §2: 15 % of real tokens; 80 % <mask>, 10 % random, 10 % kept), and
its span variant (data2vec's released text config: spans of 4 tokens, 35 %, all <mask>) against a naive expansion."""

import torch

import masking
from masking import bert_mask

MASK_ID, N_NORMAL = 1003, 1000


def draw(B=400, T=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, N_NORMAL, (B, T), generator=g)
    special = torch.zeros(B, T, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True                        # <s> ... </s>
    lengths = torch.randint(10, T, (B,), generator=g)
    special |= torch.arange(T)[None, :] >= lengths[:, None]      # padding
    student, mask = bert_mask(tokens, mask_id=MASK_ID, n_normal=N_NORMAL, special=special, generator=g)
    return tokens, special, student, mask


def test_fifteen_percent_of_real_tokens():
    tokens, special, student, mask = draw()
    assert not (mask & special).any()
    frac = mask.sum() / (~special).sum()
    assert abs(frac - 0.15) < 0.005
    # per row too, up to probabilistic rounding of 0.15 * n
    n_real = (~special).sum(1).float()
    assert ((mask.sum(1) - 0.15 * n_real).abs() <= 1).all()


def test_eighty_ten_ten():
    tokens, special, student, mask = draw()
    m = mask.sum().float()
    to_mask = (student == MASK_ID) & mask
    kept = (student == tokens) & mask
    random = mask & ~to_mask & ~kept
    assert abs(to_mask.sum() / m - 0.8) < 0.01
    assert abs(random.sum() / m - 0.1) < 0.01
    # a random draw can hit the original token (1 in 1000): "kept" is 10 % plus that
    assert abs(kept.sum() / m - 0.1) < 0.01
    assert (student[random] < N_NORMAL).all()
    assert torch.equal(student[~mask], tokens[~mask])


def test_pure_function_of_generator():
    a = draw(B=8, seed=3)
    b = draw(B=8, seed=3)
    c = draw(B=8, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[3], c[3])


def test_spans_match_a_naive_expansion():
    """Each chosen start masks itself and the span - 1 tokens after it, never a special token: checked against a
    loop over the same starts (same generator state)."""
    tokens, special, _, _ = draw(B=64)
    g = torch.Generator().manual_seed(5)
    student, mask = bert_mask(tokens, mask_id=MASK_ID, n_normal=N_NORMAL, special=special, generator=g,
                              prob=0.35, span=4, replace_prob=1.0, random_prob=0.0)
    starts = masking._choose(~special, 0.35 / 4, torch.Generator().manual_seed(5))
    expected = torch.zeros_like(mask)
    for b, t in starts.nonzero().tolist():
        expected[b, t:t + 4] = True
    expected &= ~special
    assert torch.equal(mask, expected)
    assert (student[mask] == MASK_ID).all()                   # replace_prob 1: every masked token is <mask>
    assert torch.equal(student[~mask], tokens[~mask])


def test_span_fraction():
    """Starts at 0.35 / 4 of the tokens, spans of 4 merging where they overlap: 1 - (1 - 0.0875)^4 = 30.7 % masked."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, N_NORMAL, (400, 512), generator=g)
    special = torch.zeros_like(tokens, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    _, mask = bert_mask(tokens, mask_id=MASK_ID, n_normal=N_NORMAL, special=special, generator=g, prob=0.35, span=4)
    frac = mask.sum() / (~special).sum()
    assert abs(frac - (1 - (1 - 0.35 / 4) ** 4)) < 0.005
