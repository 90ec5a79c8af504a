"""Downstream training from a pretrained data2vec checkpoint (or from random weights, to see what pretraining buys).

    python finetune.py --modality=text --init_from=out-text/ckpt.pt                 # full fine-tune
    python finetune.py --modality=text --init_from=out-text/ckpt.pt --mode=probe    # linear probe, frozen encoder
    python finetune.py --modality=text --init_from=random                           # same model, no pretraining
    python finetune.py --modality=text --init_from=out-text/ckpt.pt --train=SST-2/train.tsv --test=SST-2/dev.tsv

Text: sentence/passage classification, RoBERTa's head on the first token (SPEC §3). The default task is the genre
(comedy / history / tragedy) of 100-word Shakespeare passages, split by play. GLUE tasks ship as TSV
(`sentence<TAB>label`), which --train / --test read.
"""

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from text_data import DataError, encode_texts, read_tsv
from train import (TASKS, Config, CheckpointError, ConfigError, PRESETS, load_checkpoint, load_state,
                   parse_overrides, setup_system)
from transformer import Transformer


@dataclass
class FinetuneConfig:
    modality: str = "text"
    init_from: str = ""         # a train.py checkpoint (out-text/ckpt.pt) or "random"
    preset: str = "small"       # with --init_from=random: the architecture to build
    mode: str = "finetune"      # finetune (all weights) | probe (frozen encoder, linear classifier)
    train: str = ""             # '' = the default task; else a TSV file `sentence<TAB>label`
    test: str = ""
    label_fraction: float = 1.0  # train on this fraction of the labelled examples (per class)
    max_len: int = 128
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4            # fine-tune; the probe uses probe_lr. RoBERTa sweeps {1, 2, 4, 6}e-5 at base size
    probe_lr: float = 1e-2
    probe_epochs: int = 100
    weight_decay: float = 0.01
    warmup: float = 0.06        # fraction of the steps
    dropout: float = 0.1
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


class Classifier(nn.Module):
    """Pretrained encoder + a classification head on the first token (RoBERTa: dropout, dense, tanh, dropout, out)."""

    def __init__(self, encoder: nn.Module, transformer: Transformer, n_classes: int, dropout: float):
        super().__init__()
        self.encoder, self.transformer = encoder, transformer
        C = transformer.cfg.dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(C, C), nn.Tanh(), nn.Dropout(dropout),
                                  nn.Linear(C, n_classes))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        x, pad = self.encoder.embed(tokens)                              # (B, T, C)
        h, _ = self.transformer(self.encoder(x, pad), pad)              # (B, T, C)
        return h[:, 0]                                                  # (B, C) the <s> token

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))                         # (B, classes)


def pretrained_config(fc: FinetuneConfig) -> Config:
    """The pretraining config of --init_from (or of the preset, for random weights): architecture and data."""
    if fc.init_from == "random":
        return Config(**{**PRESETS[fc.modality][fc.preset], "modality": fc.modality})
    cfg = Config(**load_checkpoint(Path(fc.init_from))["config"])
    if cfg.modality != fc.modality:
        raise CheckpointError(f"{fc.init_from} is a {cfg.modality} checkpoint; pass --modality={cfg.modality}")
    return cfg


def load_student(fc: FinetuneConfig, cfg: Config, task) -> nn.Module:
    """The pretrained student (encoder + Transformer), or the same architecture with random weights."""
    torch.manual_seed(fc.seed)
    model = task.build_model()
    if fc.init_from != "random":
        load_state(model, load_checkpoint(Path(fc.init_from))["model"], "student", Path(fc.init_from))
    return model


def subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of the examples of each class (at least one each), drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(keep).sort().values


def load_task(fc: FinetuneConfig, data_dir: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    if bool(fc.train) != bool(fc.test):
        raise ConfigError("pass both --train and --test (TSV files), or neither for the default genre task")
    train_path = Path(fc.train) if fc.train else data_dir / "genre" / "train.tsv"
    test_path = Path(fc.test) if fc.test else data_dir / "genre" / "test.tsv"
    if not fc.train and not train_path.exists():
        raise DataError(f"{train_path} is missing: run `python train.py --modality=text` first (it prepares the data)")
    return (*read_tsv(train_path), *read_tsv(test_path))


@torch.no_grad()
def accuracy(predict, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for i in range(0, len(tokens), batch_size):
        correct += (predict(tokens[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / len(tokens)


def run(fc: FinetuneConfig) -> dict:
    if not fc.init_from:
        raise ConfigError(f"pass --init_from=<checkpoint> (e.g. out-{fc.modality}/ckpt.pt) or --init_from=random")
    if fc.mode not in ("finetune", "probe"):
        raise ConfigError(f"--mode={fc.mode}: use finetune or probe")
    if fc.modality not in RUNNERS:
        raise ConfigError(f"unknown modality {fc.modality!r}: choose one of {', '.join(RUNNERS)}")
    cfg = pretrained_config(fc)
    _, _, device, dtype = setup_system(Config(device=fc.device, dtype=fc.dtype))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    t0 = time.time()
    result = RUNNERS[fc.modality](fc, cfg, device, autocast)
    result.update(modality=fc.modality, mode=fc.mode, init_from=fc.init_from, seconds=time.time() - t0)
    return result


def run_text(fc: FinetuneConfig, cfg: Config, device: torch.device, autocast) -> dict:
    """Passage classification: default genre task, or --train / --test TSV files."""
    task = TASKS["text"](cfg, prepare=True)
    meta, enc = task.data.meta, task.data.enc
    tr_text, tr_label, te_text, te_label = load_task(fc, task.data_dir)
    classes = sorted(set(tr_label))
    unknown = sorted(set(te_label) - set(classes))
    if unknown:
        raise DataError(f"test labels {unknown[:5]} never occur in the training file")
    y_train = torch.tensor([classes.index(l) for l in tr_label])
    y_test = torch.tensor([classes.index(l) for l in te_label])
    x_train = encode_texts(enc, tr_text, fc.max_len, meta)             # (N, T)
    x_test = encode_texts(enc, te_text, fc.max_len, meta)
    keep = subset(y_train, fc.label_fraction, fc.seed)
    x_train, y_train = x_train[keep], y_train[keep]
    if cfg.block_size < fc.max_len:
        raise ConfigError(f"--max_len={fc.max_len} exceeds the encoder's {cfg.block_size} positions")
    student = load_student(fc, cfg, task)
    model = Classifier(student.encoder, student.student, len(classes), fc.dropout).to(device)
    print(f"{fc.mode} on {len(x_train)} training / {len(x_test)} test examples, {len(classes)} classes {classes}, "
          f"encoder from {fc.init_from}")
    if fc.mode == "probe":
        acc = probe(model, fc, x_train.to(device), y_train.to(device), x_test.to(device), y_test.to(device), autocast)
    else:
        acc = finetune(model, fc, x_train.to(device), y_train.to(device), x_test.to(device), y_test.to(device), autocast)
    print(f"test accuracy {acc:.4f} ({fc.mode}, init {fc.init_from}, {len(x_train)} labelled examples)")
    return dict(accuracy=acc, n_train=len(x_train), n_test=len(x_test))


def probe(model: Classifier, fc: FinetuneConfig, x_train, y_train, x_test, y_test, autocast) -> float:
    """Linear probe: features of the frozen encoder, computed once, standardised, then a logistic regression."""
    model.eval()
    with torch.no_grad(), autocast:
        f_train = torch.cat([model.features(x_train[i:i + 64]).float() for i in range(0, len(x_train), 64)])
        f_test = torch.cat([model.features(x_test[i:i + 64]).float() for i in range(0, len(x_test), 64)])
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    linear = nn.Linear(f_train.shape[1], int(y_train.max()) + 1).to(f_train.device)
    opt = torch.optim.AdamW(linear.parameters(), lr=fc.probe_lr, weight_decay=fc.weight_decay)
    g = torch.Generator().manual_seed(fc.seed)
    for epoch in range(fc.probe_epochs):
        for idx in torch.randperm(len(f_train), generator=g).split(fc.batch_size * 8):
            loss = F.cross_entropy(linear(f_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return accuracy(linear, f_test, y_test, 1024)


def finetune(model: Classifier, fc: FinetuneConfig, x_train, y_train, x_test, y_test, autocast) -> float:
    """All weights train: AdamW, linear warmup then linear decay, accuracy after each epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=fc.lr, weight_decay=fc.weight_decay, betas=(0.9, 0.98), eps=1e-6)
    steps = fc.epochs * math.ceil(len(x_train) / fc.batch_size)
    warm = max(1, int(fc.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    g = torch.Generator().manual_seed(fc.seed)

    def predict(x):
        with autocast:
            return model(x)

    acc = 0.0
    for epoch in range(fc.epochs):
        model.train()
        t0, total = time.time(), 0.0
        for idx in torch.randperm(len(x_train), generator=g).split(fc.batch_size):
            with autocast:
                loss = F.cross_entropy(model(x_train[idx]).float(), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        acc = accuracy(predict, x_test, y_test, 128)
        print(f"epoch {epoch + 1}/{fc.epochs} | train loss {total / len(x_train):.4f} | test accuracy {acc:.4f} | "
              f"{time.time() - t0:.0f}s")
    return acc


RUNNERS = {"text": run_text}


def main(argv: list[str]) -> int:
    try:
        run(FinetuneConfig(**parse_overrides(FinetuneConfig, argv)))
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
