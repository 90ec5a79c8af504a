"""The paper's ablations (data2vec §5) as tiny vision pretraining runs on the embedded digits, asserting the paper's
direction with a margin chosen from measured runs (numbers in each docstring: 2-core Intel Xeon, fp32, one thread,
seeds 0-2). The switches are plain config fields: --target_norm, --final_norm, --top_k, --target_layer,
--teacher_context.
"""

import contextlib
import io
from pathlib import Path

import pytest

from train import PRESETS, Config, load_checkpoint, train

# the small vision recipe, shortened: 200 updates of 32 images (~30-60 s on 2 cores)
BASE = dict(PRESETS["vision"]["small"], modality="vision", max_iters=200, batch_size=32, log_interval=10,
            eval_interval=10**6, ckpt_interval=10**6, eval_iters=2)


def target_vars(out: Path, **overrides) -> list[float]:
    """Pretrain BASE with the overrides; -> target_var every 10 updates."""
    with contextlib.redirect_stdout(io.StringIO()):
        ckpt = train(Config(**{**BASE, **overrides, "out_dir": str(out)}))
    return load_checkpoint(ckpt)["history"]["target_var"]


@pytest.mark.slow
def test_without_target_normalisation_the_targets_collapse(tmp_path):
    """Measured min target_var over 200 updates (seeds 0, 1, 2): with layer norm per block and of the average (the
    vision recipe) 0.795, 0.800 (seed 2 not run); with target_norm=none and final_norm=none 0.279, 0.306, 0.286.
    Forcing no normalisation on both sides fails the first assertion."""
    normalised = target_vars(tmp_path / "norm")
    raw = target_vars(tmp_path / "raw", target_norm="none", final_norm="none")
    assert min(normalised) > 0.6
    assert min(raw) < 0.45
