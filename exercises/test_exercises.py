"""What students run: python -m pytest exercises/ (every exercise) or python -m pytest exercises/ -k ex1 (one).

Each test checks your code in exercises/ex*.py against the project's own implementation (exercises/checks.py).
They fail with NotImplementedError until you fill in the stubs.
"""

from exercises import checks, ex1_span_mask, ex2_instance_norm, ex3_ema, ex4_top_k_targets, ex5_inverse_block_mask


def test_ex1_span_mask():
    checks.check_span_mask(ex1_span_mask.span_mask)


def test_ex2_instance_norm():
    checks.check_instance_norm(ex2_instance_norm.instance_norm)


def test_ex3_ema():
    checks.check_ema(ex3_ema.ema_tau, ex3_ema.ema_update)


def test_ex4_top_k_targets():
    checks.check_top_k_targets(ex4_top_k_targets.top_k_targets)


def test_ex5_inverse_block_mask():
    checks.check_inverse_block_mask(ex5_inverse_block_mask.inverse_block_mask)
