"""Checks of the exercises against the project's own implementation (masking.py, data2vec.py).

Each check takes the student's function(s), runs them next to the project's on several inputs and raises an
AssertionError that says what differs at the first disagreement. Random policies are compared by their statistics
over many draws, not draw by draw: the exercises leave the order of the random draws free. Tolerances are about five
standard deviations of the sampling noise, so a correct answer fails with a probability below 1 in 1000.
"""

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.testing import assert_close

import masking
from data2vec import EMATeacher, TargetConfig, build_targets, ema_tau, normalize


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_pure_function_of_generator(fn: Callable[..., Tensor], *args: object, **kwargs: object) -> None:
    """The same generator state gives the same output; another state gives another output (the global RNG is
    not used instead)."""
    a, b = fn(*args, generator=seeded(10), **kwargs), fn(*args, generator=seeded(10), **kwargs)
    assert torch.equal(a, b), "two calls with generators in the same state gave different masks"
    assert not torch.equal(a, fn(*args, generator=seeded(11), **kwargs)), "the mask ignores the generator"


def check_bool_mask(mask: Tensor, shape: tuple[int, ...]) -> None:
    assert isinstance(mask, Tensor) and mask.dtype == torch.bool, f"expected a bool tensor, got {mask!r:.80}"
    assert mask.shape == shape, f"expected shape {shape}, got {tuple(mask.shape)}"


# --- exercise 1: span masking -----------------------------------------------------------------------------------------


def check_span_mask(span_mask: Callable[..., Tensor]) -> None:
    """Against masking.span_mask: padding, short rows, the per-frame profile of long rows, mean fractions."""
    T = 200
    groups = {"L=200": [200] * 6000, "L=100 padded to 200": [100] * 6000, "L=1..60": [*range(1, 61)] * 100}
    lengths = torch.tensor([L for rows in groups.values() for L in rows])    # (B,)
    ours = span_mask(lengths, T, generator=seeded(0))
    ref = masking.span_mask(lengths, T, generator=seeded(1))                  # (B, T)
    check_bool_mask(ours, (len(lengths), T))
    real = torch.arange(T) < lengths[:, None]                                 # (B, T)
    assert not (ours & ~real).any(), "a padded frame (t >= lengths[b]) is masked"
    assert (ours.sum(1) >= 1).all(), "a row has no masked frame (min_spans = 1)"
    short = lengths <= 10
    assert (ours[short].sum(1) == lengths[short]).all(), "a row of at most `span` frames is not fully masked"
    last = ours[~short].gather(1, lengths[~short, None] - 1)                 # (B', 1) the last real frame
    assert not last.any(), "the last real frame of a row longer than `span` is masked: starts are < L - span"

    first = 0
    for name, rows in groups.items():
        group = slice(first, first + len(rows))
        first += len(rows)
        n_real = real[group].sum()
        counts = ours[group].sum(1).float(), ref[group].sum(1).float()        # (n,) masked frames per row, twice
        got, want = (c.sum() / n_real for c in counts)
        tol = 5 * (len(rows) * (counts[0].var() + counts[1].var())).sqrt() / n_real
        assert abs(got - want) < tol, f"rows {name}: {got:.4f} of the real frames masked, expected {want:.4f}"
    # per frame of the long rows: fewer masks near the start and the end (fewer spans cover them, and only start
    # 0 covers frame 0), none on the last frame
    n = len(groups["L=200"])
    got, want = ours[:n].float().mean(0), ref[:n].float().mean(0)             # (T,) P(frame t masked)
    p = (got + want) / 2
    excess = (got - want).abs() - 5 * (2 * p * (1 - p) / n).sqrt() - 1e-3     # (T,) beyond 5 standard deviations
    worst = int(excess.argmax())
    assert excess[worst] < 0, (
        f"rows L=200: frame {worst} is masked with frequency {got[worst]:.3f}, expected {want[worst]:.3f}"
    )

    one = span_mask(torch.full((300,), 100), 100, prob=0.0, span=7, generator=seeded(2))  # min_spans: one span
    check_bool_mask(one, (300, 100))
    assert (one.sum(1) == 7).all(), "prob=0, span=7: expected exactly one span of 7 frames per row"
    n_runs = (one[:, 1:] & ~one[:, :-1]).sum(1) + one[:, 0]                   # (300,) masked runs per row
    assert (n_runs == 1).all(), "prob=0, span=7: the 7 masked frames are not contiguous"
    check_pure_function_of_generator(span_mask, torch.tensor([200, 120, 40]), 200)


# --- exercise 2: instance norm over time with padding -----------------------------------------------------------------


def check_instance_norm(instance_norm: Callable[..., Tensor]) -> None:
    """Against data2vec.normalize(y, "instance", padding_mask), at the real steps, with and without padding."""
    g = seeded(0)
    for B, T, C in [(1, 5, 1), (3, 7, 4), (4, 50, 16)]:
        y = torch.randn(B, T, C, generator=g) * 3 + torch.randn(1, 1, C, generator=g) * 5   # (B, T, C)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0], lengths[-1] = T, 1                                        # a full row, a single real step
        pad = torch.arange(T) >= lengths[:, None]                             # (B, T) True = padded
        y[pad] = 100.0                                                        # padding that would skew statistics
        before = y.clone()
        got = instance_norm(y, pad)
        assert torch.equal(y, before), "instance_norm modified its input y"
        assert got.shape == y.shape, f"expected shape {tuple(y.shape)}, got {tuple(got.shape)}"
        want = normalize(y, "instance", pad)
        assert_close(got[~pad], want[~pad], msg=lambda m: f"padded batch, lengths {lengths.tolist()}:\n{m}")
        clean = torch.randn(B, T, C, generator=g) * 3 + torch.randn(B, 1, C, generator=g) * 5  # no padding
        assert_close(instance_norm(clean, None), normalize(clean, "instance"), msg=lambda m: f"no padding:\n{m}")


# --- exercise 3: the EMA schedule and update --------------------------------------------------------------------------


def tiny_net(dtype: torch.dtype) -> nn.Module:
    """Float parameters, float buffers (BatchNorm's running statistics), an integer buffer (num_batches_tracked)."""
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 2)).to(dtype)


def check_ema(ema_tau_fn: Callable[[int, float, float, int], float], ema_update: Callable[..., None]) -> None:
    """Against data2vec.ema_tau and EMATeacher.update, on fp32 and bf16 students, buffers included."""
    for tau_0, tau_e, tau_n in [(0.999, 0.9999, 100), (0.9998, 0.9998, 10), (0.5, 1.0, 7)]:
        for step in [0, 1, tau_n // 3, tau_n - 1, tau_n, tau_n + 1, 10 * tau_n]:
            got, want = ema_tau_fn(step, tau_0, tau_e, tau_n), ema_tau(step, tau_0, tau_e, tau_n)
            assert abs(got - want) < 1e-12, f"ema_tau({step}, {tau_0}, {tau_e}, {tau_n}) = {got}, expected {want}"

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for tau in (0.0, 0.9, 0.999, 1.0):
            student = tiny_net(dtype)
            ref = EMATeacher(student, tau, tau, 1)                            # fp32 copy; constant tau
            ours = copy.deepcopy(ref.model)
            with torch.no_grad():
                for p in student.parameters():
                    p.add_(torch.randn_like(p))
                for b in student.buffers():
                    b.add_(3)
            ref.update(student, step=0)
            ema_update(ours, student, tau)
            where = f"{dtype} student, tau {tau}"
            for (name, got), want in zip(ours.named_parameters(), ref.model.parameters()):
                assert got.dtype == torch.float32, f"{where}: teacher parameter {name} became {got.dtype}"
                assert_close(got, want, msg=lambda m: f"{where}, parameter {name}:\n{m}")
            for (name, got), want in zip(ours.named_buffers(), ref.model.buffers()):
                assert_close(got, want, msg=lambda m: f"{where}, buffer {name} (copied, never averaged):\n{m}")


# --- exercise 4: top-K targets ----------------------------------------------------------------------------------------


def check_top_k_targets(top_k_targets: Callable[..., Tensor]) -> None:
    """Against data2vec.build_targets with layer norm per block and optionally on the average, fp32 and bf16 blocks."""
    g = seeded(0)
    # blocks with their own scale and offset, as real Transformer blocks have: normalising each one matters
    layers = [torch.randn(2, 5, 8, generator=g) * (i + 1) + i for i in range(6)]   # 6 x (B, T, C)
    for dtype in (torch.float32, torch.bfloat16):
        blocks = [x.to(dtype) for x in layers]
        for k in (1, 3, 6):
            for final_norm in (False, True):
                cfg = TargetConfig(top_k=k, target_norm="layer", final_norm="layer" if final_norm else "none")
                got = top_k_targets(blocks, k, final_norm)
                assert all(torch.equal(x, y.to(dtype)) for x, y in zip(blocks, layers)), "the blocks were modified"
                want = build_targets(blocks, cfg)
                where = f"{dtype} blocks, k={k}, final_norm={final_norm}"
                assert got.dtype == torch.float32, f"{where}: expected a float32 target, got {got.dtype}"
                assert_close(got, want, msg=lambda m: f"{where}:\n{m}")


# --- exercise 5: inverse block masking --------------------------------------------------------------------------------


def kept_neighbour_agreement(masks: Tensor) -> float:
    """P(right or lower neighbour kept | patch kept) over (N, h, w) masks: the kept fraction for i.i.d. masking."""
    keep = ~masks
    right = (keep[:, :, :-1] & keep[:, :, 1:]).sum() / keep[:, :, :-1].sum()
    down = (keep[:, :-1] & keep[:, 1:]).sum() / keep[:, :-1].sum()
    return float(right + down) / 2


def check_inverse_block_mask(inverse_block_mask: Callable[..., Tensor]) -> None:
    """Against masking.inverse_block_mask: exact counts, blockiness, and where patches are kept."""
    cases = [((14, 14), {}, 1500), ((8, 8), {}, 1000), ((6, 9), dict(ratio=0.6, block=2, adjust=0.0), 2000)]
    for grid, kwargs, n in cases:
        h, w = grid
        where = f"grid {grid}, {kwargs or 'defaults'}"
        ours = inverse_block_mask(n, grid, generator=seeded(0), **kwargs)
        ref = masking.inverse_block_mask(n, grid, generator=seeded(1), **kwargs)   # (n, h * w)
        check_bool_mask(ours, (n, h * w))
        counts = ours.sum(1)
        assert (counts == ref[0].sum()).all(), (
            f"{where}: expected exactly {int(ref[0].sum())} masked patches in every row, got {counts.unique().tolist()}"
        )
        ours, ref = ours.view(n, h, w), ref.view(n, h, w)
        got, want = kept_neighbour_agreement(ours), kept_neighbour_agreement(ref)
        assert abs(got - want) < 0.03, (
            f"{where}: a kept patch has a kept right/lower neighbour with frequency {got:.3f}, expected {want:.3f}"
        )
        got, want = (~ours).float().mean(0), (~ref).float().mean(0)           # (h, w) P(patch kept)
        worst = divmod(int((got - want).abs().argmax()), w)
        assert (got - want).abs().max() < 5 * (0.5 / n) ** 0.5, (
            f"{where}: patch {worst} is kept with frequency {got[worst]:.3f}, expected {want[worst]:.3f}"
        )
    check_pure_function_of_generator(inverse_block_mask, 4, (14, 14))
