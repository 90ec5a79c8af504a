"""span_mask against the exact expectation of fairseq's algorithm and the properties the SPEC asks for."""

from math import comb

import torch

from masking import span_mask


def expected_profile(L: int, prob: float = 0.65, span: int = 10) -> torch.Tensor:
    """P(frame t is masked) for t < L under fairseq's static span masking, computed exactly (no sampling).

    k = int(prob * L / span + u) starts, drawn without replacement from the N = L - span starts [0, N);
    frame t is masked unless none of the w_t starts in (t - span, t] is drawn: 1 - C(N - w_t, k) / C(N, k).
    """
    N, c = L - span, prob * L / span
    profile = torch.zeros(L, dtype=torch.float64)
    for k, p_k in ((int(c), 1 - (c - int(c))), (int(c) + 1, c - int(c))):
        for t in range(L):
            w = min(t, N - 1) - max(t - span + 1, 0) + 1
            profile[t] += p_k * (1 - comb(N - w, k) / comb(N, k))
    return profile


def test_long_rows_mask_about_49_percent_with_fairseq_profile():
    g = torch.Generator().manual_seed(0)
    mask = span_mask(torch.full((4000,), 500), 500, generator=g)             # (4000, 500)
    profile = expected_profile(500)
    assert abs(profile.mean() - 0.49) < 0.01                                 # the paper's ~49 %
    assert abs(mask.float().mean() - profile.mean()) < 0.004
    assert (mask.float().mean(0) - profile).abs().max() < 0.04               # per frame, incl. both ends
    assert not mask[:, -1].any()                                             # fairseq's start range [0, L - span)


def test_padded_rows_keep_their_own_statistics_and_padding_is_never_masked():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([500, 200] * 2000)                                # every other row padded to 500
    mask = span_mask(lengths, 500, generator=g)
    assert not mask[1::2, 200:].any()
    # no fairseq "same mask count per row" trimming: a short row masks what it would alone
    assert abs(mask[1::2, :200].float().mean() - expected_profile(200).mean()) < 0.005
    assert abs(mask[0::2].float().mean() - expected_profile(500).mean()) < 0.005


def test_every_row_gets_a_span_even_when_short():
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 60, (3000,))
    mask = span_mask(lengths, 60, generator=g)
    assert (mask.sum(1) >= 1).all()
    assert not (mask & (torch.arange(60) >= lengths[:, None])).any()
    short = lengths <= 10                                                    # one span from frame 0 covers the row
    assert (mask[short].sum(1) == lengths[short]).all()
    assert (span_mask(torch.tensor([0]), 5, generator=g) == 0).all()         # an empty row stays empty


def test_single_span_is_contiguous_and_span_long():
    g = torch.Generator().manual_seed(3)
    mask = span_mask(torch.full((500,), 100), 100, prob=0.0, span=7, generator=g)  # min_spans = 1 span per row
    assert (mask.sum(1) == 7).all()
    first = mask.float().argmax(1)
    assert all(mask[b, first[b] : first[b] + 7].all() for b in range(500))


def test_same_generator_state_same_mask():
    lengths = torch.tensor([300, 120, 40])
    a = span_mask(lengths, 300, generator=torch.Generator().manual_seed(4))
    b = span_mask(lengths, 300, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
