"""Exercise 3: the EMA teacher: its decay schedule and its update (SPEC §1.7, §6).

Read first: SPEC.md §1 step 7, §2 (the tau row) and §6 (integer buffers), the data2vec paper's "Teacher
parameterization" paragraph, and the docstring of `EMATeacher` in data2vec.py.
Check: python -m pytest exercises/ -k ex3
"""

import torch.nn as nn


def ema_tau(step: int, tau_0: float, tau_e: float, tau_n: int) -> float:
    """The EMA decay at optimizer step `step`: rises linearly from tau_0 at step 0 to tau_e at step tau_n,
    then stays at tau_e. A pure function of `step`, so a resumed run gets the same taus."""
    raise NotImplementedError("exercise 3: implement ema_tau")


def ema_update(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """In place: teacher <- tau * teacher + (1 - tau) * student, parameter by parameter.

    teacher and student have the same architecture; the teacher is fp32, the student may be in any float dtype
    (bf16 included): do the arithmetic in fp32. Buffers (e.g. BatchNorm's running statistics and its integer
    `num_batches_tracked`) are copied from the student, never averaged. When tau >= 1 nothing changes at all.
    """
    raise NotImplementedError("exercise 3: implement ema_update")
