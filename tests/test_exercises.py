"""The classroom exercises (exercises/): every check passes on the reference solution and fails on the untouched stub
and on deliberately wrong answers, so a student whose check passes has the concept right."""

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from exercises import checks, ex1_span_mask, ex2_instance_norm, ex3_ema, ex4_top_k_targets, ex5_inverse_block_mask
from exercises.solutions import ex1_span_mask as sol1
from exercises.solutions import ex2_instance_norm as sol2
from exercises.solutions import ex3_ema as sol3
from exercises.solutions import ex4_top_k_targets as sol4
from exercises.solutions import ex5_inverse_block_mask as sol5

# --- wrong answers, one concept wrong each ---------------------------------------------------------------------------


def span_mask_into_padding(lengths: Tensor, T: int, **kwargs) -> Tensor:
    return sol1.span_mask(torch.full_like(lengths, T), T, **kwargs)            # treats every row as T frames long


def span_mask_iid_frames(lengths: Tensor, T: int, *, prob: float = 0.65, generator: torch.Generator, **_) -> Tensor:
    """The right fraction (~49 %), but frame by frame instead of in spans."""
    real = torch.arange(T) < lengths[:, None]
    return real & (torch.rand(len(lengths), T, generator=generator) < 0.49 * prob / 0.65)


def span_mask_global_rng(lengths: Tensor, T: int, *, generator: torch.Generator, **kwargs) -> Tensor:
    return sol1.span_mask(lengths, T, generator=torch.Generator().manual_seed(torch.seed()), **kwargs)


def span_mask_drawing_starts(draw: Callable[[int, int, torch.Generator], Tensor]) -> Callable[..., Tensor]:
    """The solution, with its k distinct starts of 0 .. n - 1 replaced by draw(n, k, generator)."""
    def span_mask(lengths: Tensor, T: int, *, prob: float = 0.65, span: int = 10, generator: torch.Generator,
                  min_spans: int = 1) -> Tensor:
        mask = torch.zeros(len(lengths), T, dtype=torch.bool)
        for b, L in enumerate(lengths.tolist()):
            n_starts = max(L - span, 1)
            k = min(max(int(prob * L / span + torch.rand(1, generator=generator).item()), min_spans), n_starts)
            for s in draw(n_starts, k, generator).tolist():
                mask[b, s : min(s + span, L)] = True
        return mask
    span_mask.__name__ = draw.__name__
    return span_mask


def starts_never_at_0(n: int, k: int, g: torch.Generator) -> Tensor:
    return 1 + torch.randperm(max(n - 1, 1), generator=g)[:k] if n > 1 else torch.zeros(1, dtype=torch.long)


def starts_one_short(n: int, k: int, g: torch.Generator) -> Tensor:
    return torch.randperm(max(n - 1, 1), generator=g)[:k]                     # 0 .. n - 2


def starts_with_replacement(n: int, k: int, g: torch.Generator) -> Tensor:
    return torch.randint(n, (k,), generator=g)


def instance_norm_over_padding(y: Tensor, padding_mask: Tensor | None, eps: float = 1e-5) -> Tensor:
    return F.instance_norm(y.transpose(1, 2), eps=eps).transpose(1, 2)        # statistics include padded frames


def instance_norm_unbiased(y: Tensor, padding_mask: Tensor | None, eps: float = 1e-5) -> Tensor:
    out = y.clone()
    for b in range(len(y)):
        real = y[b] if padding_mask is None else y[b][~padding_mask[b]]        # (L, C)
        var = ((real - real.mean(0)) ** 2).sum(0) / max(len(real) - 1, 1)       # divides by L - 1
        out[b] = (y[b] - real.mean(0)) / torch.sqrt(var + eps)
    return out


def instance_norm_over_channels(y: Tensor, padding_mask: Tensor | None, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(y, y.shape[-1:], eps=eps)                              # layer norm, not instance norm


def ema_tau_reversed(step: int, tau_0: float, tau_e: float, tau_n: int) -> float:
    return sol3.ema_tau(step, tau_e, tau_0, tau_n)                             # falls from tau_e to tau_0


def ema_update_wrong_side(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    sol3.ema_update(teacher, student, 1 - tau)                                 # teacher <- (1 - tau) t + tau s


@torch.no_grad()
def ema_update_averaging_buffers(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    if tau >= 1:
        return
    for t, s in zip([*teacher.parameters(), *teacher.buffers()], [*student.parameters(), *student.buffers()]):
        t.copy_(tau * t + (1 - tau) * s.float() if t.is_floating_point() else s)


def top_k_plus_one(layers: list[Tensor], k: int, final_norm: bool) -> Tensor:
    return sol4.top_k_targets(layers, min(k + 1, len(layers)), final_norm)


def bottom_k(layers: list[Tensor], k: int, final_norm: bool) -> Tensor:
    return sol4.top_k_targets(layers[:k], k, final_norm)


def top_k_norm_after_average_only(layers: list[Tensor], k: int, final_norm: bool) -> Tensor:
    y = sum(x.float() for x in layers[-k:]) / k
    return F.layer_norm(y, y.shape[-1:])


def top_k_norm_in_input_dtype(layers: list[Tensor], k: int, final_norm: bool) -> Tensor:
    y = sum(F.layer_norm(x, x.shape[-1:]) for x in layers[-k:]) / k            # bf16 blocks normalised in bf16
    return (F.layer_norm(y, y.shape[-1:]) if final_norm else y).float()


def inverse_block_mask_not_inverted(*args, **kwargs) -> Tensor:
    return ~sol5.inverse_block_mask(*args, **kwargs)                           # masks the blocks, keeps the rest


def inverse_block_mask_iid(batch: int, grid: tuple[int, int], *, ratio: float = 0.8, generator, **_) -> Tensor:
    """The right count, but patches chosen one by one instead of in blocks."""
    L = grid[0] * grid[1]
    rank = torch.rand(batch, L, generator=generator).argsort(1).argsort(1)
    return rank >= L - round(ratio * L)


def inverse_block_mask_shifted_windows(batch: int, grid: tuple[int, int], **kwargs) -> Tensor:
    """Even blocks start at their centre instead of block // 2 before it (flipping the grid swaps the two)."""
    return sol5.inverse_block_mask(batch, grid, **kwargs).view(batch, *grid).flip(1, 2).reshape(batch, -1)


# --- the tests -------------------------------------------------------------------------------------------------------

EXERCISES = {  # name: (check, the solution's functions, the stub's functions, wrong answers)
    "ex1": (
        checks.check_span_mask,
        (sol1.span_mask,),
        (ex1_span_mask.span_mask,),
        [(span_mask_into_padding,), (span_mask_iid_frames,), (span_mask_global_rng,),
         *[(span_mask_drawing_starts(d),) for d in (starts_never_at_0, starts_one_short, starts_with_replacement)]],
    ),
    "ex2": (
        checks.check_instance_norm,
        (sol2.instance_norm,),
        (ex2_instance_norm.instance_norm,),
        [(instance_norm_over_padding,), (instance_norm_unbiased,), (instance_norm_over_channels,)],
    ),
    "ex3": (
        checks.check_ema,
        (sol3.ema_tau, sol3.ema_update),
        (ex3_ema.ema_tau, ex3_ema.ema_update),
        [
            (ema_tau_reversed, sol3.ema_update),
            (sol3.ema_tau, ema_update_wrong_side),
            (sol3.ema_tau, ema_update_averaging_buffers),
        ],
    ),
    "ex4": (
        checks.check_top_k_targets,
        (sol4.top_k_targets,),
        (ex4_top_k_targets.top_k_targets,),
        [(top_k_plus_one,), (bottom_k,), (top_k_norm_after_average_only,), (top_k_norm_in_input_dtype,)],
    ),
    "ex5": (
        checks.check_inverse_block_mask,
        (sol5.inverse_block_mask,),
        (ex5_inverse_block_mask.inverse_block_mask,),
        [(inverse_block_mask_not_inverted,), (inverse_block_mask_iid,), (inverse_block_mask_shifted_windows,)],
    ),
}


@pytest.mark.parametrize("name", EXERCISES)
def test_check_passes_on_the_reference_solution(name):
    check, solution, _, _ = EXERCISES[name]
    check(*solution)


@pytest.mark.parametrize("name", EXERCISES)
def test_check_fails_on_the_untouched_stub(name):
    check, _, stub, _ = EXERCISES[name]
    with pytest.raises(NotImplementedError):
        check(*stub)


@pytest.mark.parametrize(
    "name, wrong", [(name, wrong) for name, (*_, wrongs) in EXERCISES.items() for wrong in wrongs],
    ids=lambda x: x if isinstance(x, str) else "-".join(f.__name__ for f in x),
)
def test_check_fails_on_a_wrong_answer(name, wrong):
    check = EXERCISES[name][0]
    with pytest.raises(AssertionError):
        check(*wrong)
