"""The paper's ablations (data2vec §5) at CPU scale: tiny vision pretraining runs on the embedded digits, each scored
by a linear probe on the held-out digits. tests/test_ablations.py asserts the ones that show at this scale.

    python ablations.py                                 # every setting, seeds 0-2 -> a markdown table
    python ablations.py --settings=ffn,attn --seeds=1   # some of them
    python ablations.py --settings=recipe,local --iters=600   # longer runs

Each run is the small vision recipe shortened to 200 updates of 32 images (~45 s on one core), with the layer scale
off: at 200 updates BEiT's 1e-4 layer scale keeps every block of the teacher close to the identity, so block, FFN
and attention outputs all reduce to the patch embedding and no target variant can differ from another.
"""

import contextlib
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import finetune
from train import PRESETS, Config, ConfigError, load_checkpoint, parse_overrides, train

TINY = dict(PRESETS["vision"]["small"], modality="vision", max_iters=200, batch_size=32, log_interval=10,
            eval_interval=10**6, ckpt_interval=10**6, eval_iters=2, layer_scale=0.0)

# name -> (what it is, train.py overrides)
SETTINGS: dict[str, tuple[str, dict]] = {
    "recipe": ("block outputs, top K = 2 of 4 blocks (the vision recipe)", {}),
    "k1": ("top K = 1", dict(top_k=1)),
    "k4": ("top K = 4", dict(top_k=4)),
    "ffn": ("FFN outputs", dict(target_layer="ffn")),
    "attn": ("self-attention outputs", dict(target_layer="attn")),
    "local": ("the teacher sees only the patch itself", dict(teacher_context=1)),
    "raw": ("no target normalisation", dict(target_norm="none", final_norm="none")),
}


@dataclass
class AblationConfig:
    settings: str = ",".join(SETTINGS)   # comma-separated names of SETTINGS
    seeds: int = 3
    iters: int = TINY["max_iters"]         # updates per pretraining run


def pretrain(out: Path, **overrides) -> dict:
    """Pretrain TINY with the overrides into out; -> the checkpoint (its history holds target_var per log line)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ckpt = train(Config(**{**TINY, **overrides, "out_dir": str(out)}))
    return dict(path=ckpt, history=load_checkpoint(ckpt)["history"])


def probe_accuracy(ckpt: Path, seed: int = 0) -> float:
    """Linear-probe accuracy of the checkpoint's encoder on the held-out digits, all training labels."""
    with contextlib.redirect_stdout(io.StringIO()):
        fc = finetune.FinetuneConfig(modality="vision", init_from=str(ckpt), mode="probe", seed=seed)
        return finetune.run(fc)["accuracy"]


def main(argv: list[str]) -> int:
    try:
        ac = AblationConfig(**parse_overrides(AblationConfig, argv))
        names = ac.settings.split(",")
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}: choose from {', '.join(SETTINGS)}")
        if ac.iters < 1 or ac.seeds < 1:
            raise ConfigError("--iters and --seeds take a positive number")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(ac.seeds):
            for name in names:
                t0 = time.time()
                run = pretrain(Path(tmp) / f"{name}{seed}", seed=seed, max_iters=ac.iters, **SETTINGS[name][1])
                acc = probe_accuracy(run["path"], seed)
                rows[name].append(acc)
                print(f"{name:7s} seed {seed}: probe {acc:.3f}, min target_var {min(run['history']['target_var']):.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    print("\n| setting | " + " | ".join(f"seed {s}" for s in range(ac.seeds)) + " |")
    print("|---|" + "---|" * ac.seeds)
    for name in names:
        print(f"| {SETTINGS[name][0]} | " + " | ".join(f"{a:.3f}" for a in rows[name]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
