"""Reference solution of exercise 3: the EMA schedule and update, one tensor at a time."""

import torch
import torch.nn as nn


def ema_tau(step: int, tau_0: float, tau_e: float, tau_n: int) -> float:
    """See exercises/ex3_ema.py."""
    if step >= tau_n:
        return tau_e
    return tau_0 + (tau_e - tau_0) * step / tau_n


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """See exercises/ex3_ema.py. In place on the (fp32) teacher."""
    if tau >= 1:
        return
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.copy_(tau * t + (1 - tau) * s.float())
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
