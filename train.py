"""Pretrain data2vec.

One process (CPU laptop or one GPU):
    python train.py --modality=text
Several GPUs on one machine (or CPU processes, gloo):
    torchrun --standalone --nproc_per_node=4 train.py --modality=text --preset=base
Several machines: torchrun's usual --nnodes/--node_rank/--master_addr/--master_port flags.

Settings: a dataclass Config below; a modality preset (`--preset=small|base|large`) applies first, then
`--key=value` overrides, each type-checked against the field. `--resume` continues the run in --out_dir exactly,
with the settings it was started with; those given again on the command line override them (a larger --max_iters).
`--help` lists every setting with the value it takes (`python train.py --modality=speech --help`: speech's preset).
Ctrl-C or SIGTERM saves the update in progress and stops; `--resume` continues from it.
"""

import difflib
import inspect
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tokenizer
from data2vec import Data2Vec, EMATeacher, TargetConfig, check_depth, collapse_stat
from encoders import ConvFeatureExtractor, PatchEncoder, SpeechEncoder, TextEncoder, conv_output_lengths
from masking import bert_mask, block_mask, span_mask
from mlm import MaskedLM
from speech_data import CORPUS_DIR, MIN_SAMPLES, SpeechData, prepare_speech
from text_data import MIN_LEN, DataError, TextPretrainData, free_mib, prepare_text
from transformer import TransformerConfig
from vision_data import ImageData

try:
    import fcntl                # POSIX: hold_dir's lock on a run's folder
except ImportError:             # Windows: runs go unguarded
    fcntl = None

ROOT = Path(__file__).resolve().parent


@dataclass
class Config:
    # what and where
    modality: str = "text"      # text | vision | speech
    preset: str = "small"       # small: CPU in minutes; base / large: the paper's sizes (SPEC §2)
    data: str = ""              # '' = the default data; else text: a .txt file or folder, vision: an image folder
                                #   (root/<class>/...), speech: a fairseq manifest .tsv
    out_dir: str = ""           # '' = out-<modality>
    resume: bool = False        # continue the run in out_dir from its ckpt.pt, exactly
    # length and batch
    max_iters: int = 600
    batch_size: int = 16        # sequences per micro-step per process
    grad_accum: int = 1         # micro-steps per optimizer step, summed over all processes
    eval_interval: int = 100
    eval_iters: int = 8         # held-out batches per evaluation
    log_interval: int = 10
    ckpt_interval: int = 200
    # Transformer (transformer.TransformerConfig)
    n_layer: int = 4
    dim: int = 256
    n_head: int = 4
    ffn_dim: int = 1024
    pre_ln: bool = False
    dropout: float = 0.1
    attn_dropout: float = 0.1
    act_dropout: float = 0.0
    layerdrop: float = 0.0
    drop_path: float = 0.0
    layer_scale: float = 0.0
    k_bias: bool = True
    ln_eps: float = 1e-5
    final_ln: bool = False
    rel_pos_per_layer: bool = False  # vision: a relative position bias table per block instead of one shared
    # text
    block_size: int = 128       # tokens per sequence, <s> and </s> included
    vocab_size: int = 8192      # BPE types trained on the corpus when GPT-2's files are not cached
    tokenizer: str = "auto"     # auto (gpt2 if cached, else bpe) | gpt2 | bpe
    positions: str = "absolute"  # absolute (RoBERTa's learned rows, shared with the teacher) | relative (a learned
                                #   bias per head and offset inside attention, BEiT's bias in 1D; no absolute rows)
    mask_prob: float = 0.15     # text: BERT's fraction of tokens; speech: span-start prob x mask_span (fairseq's 0.65)
    token_span: int = 1         # text: tokens per masked span (1 = BERT's single tokens; the released config: 4)
    mask_replace: float = 0.8   # text: of the masked tokens, the share replaced by <mask> (BERT: 0.8) ...
    mask_random: float = 0.1    # ... and the share replaced by a random token (BERT: 0.1); the rest stay unchanged
    # vision (VisionTask)
    img_size: int = 32          # images are resized to img_size^2 (the digits are 8x8, upsampled)
    patch_size: int = 4         # img_size / patch_size patches per side (224 / 16 = 14, SPEC §2)
    mask_ratio: float = 0.6     # BEiT block masking: this fraction of the patches (SPEC §2)
    min_mask_patches: int = 0   # smallest masked block; 0 = BEiT's 16 at 14x14, scaled by the grid's area
    # speech (SpeechTask)
    conv_dim: int = 512         # channels of the conv feature encoder
    conv_layers: int = 7        # the first N of its 7 layers (7: 16 kHz -> 50 Hz frames)
    pos_conv_layers: int = 5    # conv positional encoding: layers, kernel, groups (SPEC §2: 5 x k=19, 16 groups)
    pos_conv_kernel: int = 19
    pos_conv_groups: int = 16
    max_samples: int = 320_000  # longer utterances are randomly cropped to this many samples (20 s at 16 kHz)
    mask_span: int = 10         # frames per masked span; a frame starts one with p = mask_prob / mask_span
    # targets and loss (data2vec.TargetConfig)
    top_k: int = 3
    target_layer: str = "ffn"   # ffn | block | attn
    target_norm: str = "layer"  # per-layer: layer | instance | none
    final_norm: str = "none"    # of the K-layer average: layer | instance | none
    loss_beta: float = 4.0      # 0 = squared error, > 0 = Smooth L1 with this beta
    loss_scale: bool = False    # scale the loss by 1/sqrt(C)
    teacher_context: int = 0    # 0 = the teacher sees the whole input; w > 0 = each step a window of w steps around it
    objective: str = "data2vec"  # data2vec | mlm (text only: mlm.py's masked-LM baseline; the EMA teacher is kept, unread)
    # EMA teacher: tau from tau_0 to tau_e over tau_n updates
    tau_0: float = 0.99
    tau_e: float = 0.999
    tau_n: int = 600
    # optimiser: Adam(W), warmup then hold then decay (tri) or cosine
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-6
    schedule: str = "tri"       # tri (warmup / hold / linear decay) | cosine (warmup / cosine decay)
    warmup: float = 0.05        # fraction of max_iters
    hold: float = 0.80          # fraction of max_iters (tri only)
    grad_clip: float = 1.0      # 0 = off
    # system
    device: str = "auto"        # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"         # auto (bf16 where supported, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False       # torch.compile the student
    seed: int = 0


# Paper-exact sizes and recipes (SPEC §2) plus a small CPU preset: the same recipe, scaled down.
# v1 vision (BEiT's model and optimiser: AdamW betas (0.9, 0.999), eps 1e-8; no dropout, drop-path instead)
VISION = dict(
    pre_ln=True, layer_scale=1e-4, k_bias=False, ln_eps=1e-6, final_ln=True, dropout=0.0, attn_dropout=0.0,
    target_layer="block", target_norm="layer", final_norm="layer", loss_beta=2.0, loss_scale=False,
    tau_0=0.9998, tau_e=0.9998, tau_n=1, weight_decay=0.05, beta2=0.999, adam_eps=1e-8, schedule="cosine",
)
SPEECH = dict(
    pre_ln=False, dropout=0.1, attn_dropout=0.1, layerdrop=0.05, target_layer="ffn", target_norm="instance",
    final_norm="none", loss_beta=0.0, loss_scale=True, tau_0=0.999, tau_e=0.9999, lr=5e-4, weight_decay=0.01,
    beta1=0.9, beta2=0.98, adam_eps=1e-6, schedule="tri", warmup=0.03, hold=0.90, mask_prob=0.65, mask_span=10,
)
PRESETS: dict[str, dict[str, dict]] = {
    "text": {
        "small": dict(),
        "base": dict(
            n_layer=12, dim=768, n_head=12, ffn_dim=3072, block_size=512, batch_size=32, grad_accum=8,
            max_iters=1_000_000, top_k=10, tau_0=0.999, tau_e=0.9999, tau_n=100_000, lr=2e-4,
            warmup=0.05, hold=0.80, vocab_size=50_000, eval_interval=5000, ckpt_interval=5000, log_interval=100,
        ),
        "large": dict(
            n_layer=24, dim=1024, n_head=16, ffn_dim=4096, block_size=512, batch_size=16, grad_accum=16,
            max_iters=1_000_000, top_k=10, tau_0=0.999, tau_e=0.9999, tau_n=100_000, lr=2e-4,
            warmup=0.05, hold=0.80, vocab_size=50_000, eval_interval=5000, ckpt_interval=5000, log_interval=100,
        ),
    },
    # v1 vision recipe (SPEC §2): pre-LN with layer scale and no k bias, block outputs of the top half of the blocks,
    # layer norm per layer and of the average, Smooth L1 beta 2, EMA tau constant, AdamW wd 0.05, cosine.
    "vision": {
        # 32x32 digits in 4x4 patches: an 8x8 grid, K = half the depth
        "small": dict(VISION, n_layer=4, dim=128, n_head=4, ffn_dim=512, top_k=2, batch_size=64, max_iters=600,
                      drop_path=0.1, lr=1e-3, warmup=0.05,
                      # the base tau 0.9998 averages over ~5000 updates: in 600 the teacher would stay near its
                      # random initialisation, so the small run uses a constant tau with a ~100-update horizon
                      tau_0=0.99, tau_e=0.99, eval_interval=200, ckpt_interval=200, log_interval=50),
        "base": dict(VISION, img_size=224, patch_size=16, n_layer=12, dim=768, n_head=12, ffn_dim=3072, top_k=6,
                     # global batch 2048; 800 epochs of ImageNet-1k's 1.28M images at 2048 per update = 500k
                     # updates, warmup 40 epochs = 5 %. lr 1e-3 is the paper's; data2vec_vision's command line used 2e-3
                     batch_size=64, grad_accum=32, max_iters=500_000, warmup=0.05, lr=1e-3, drop_path=0.2,
                     eval_interval=5000, ckpt_interval=5000, log_interval=100),
        "large": dict(VISION, img_size=224, patch_size=16, n_layer=24, dim=1024, n_head=16, ffn_dim=4096, top_k=6,
                      # the base recipe at ViT-L size; the paper pretrains ViT-L for 1600 epochs (1M updates)
                      batch_size=32, grad_accum=64, max_iters=1_000_000, warmup=0.05, lr=1e-3, drop_path=0.2,
                      eval_interval=5000, ckpt_interval=5000, log_interval=100),
    },
    # v1 speech recipe (SPEC §2): post-LN, FFN outputs of the top 2/3 of the blocks, instance norm per layer, no
    # final norm, L2 loss x 1/sqrt(C), spans of 10 frames, layerdrop 0.05, Adam(0.9, 0.98), tri-stage 3/90/7 %.
    "speech": {
        # CPU in ~10 minutes: a narrow conv encoder (64 channels, still 7 layers: 50 Hz frames), 4 blocks of 256,
        # K = 3 of 4 (the base 8 of 12), crops of 4 s; the teacher's horizon scaled to the 400 updates.
        # One positional conv layer instead of 5: the 5-layer stack sees 91 frames (1.8 s) and its zero padding tells
        # every frame of a 1-5 s utterance where the edges are; the teacher's targets then drift to that position
        # signal (targets of white noise matched speech's at cosine 0.998 after 400 updates) and the student
        # learns nothing else. One layer sees 19 frames, as on LibriSpeech's 12 s utterances most frames see no edge.
        "small": dict(SPEECH, n_layer=4, dim=256, n_head=4, ffn_dim=1024, top_k=3, conv_dim=64, max_samples=64_000,
                      pos_conv_layers=1, batch_size=8, max_iters=400, tau_0=0.99, tau_e=0.999, tau_n=400,
                      eval_interval=100, eval_iters=4, log_interval=20, ckpt_interval=200),
        # 400k updates of up to 63 min of audio (paper: 16 GPUs x 3.8M samples); here 288 crops of <= 20 s
        # (LibriSpeech utterances average 12 s, so ~1 h per update)
        "base": dict(SPEECH, n_layer=12, dim=768, n_head=12, ffn_dim=3072, top_k=8, conv_dim=512, batch_size=12,
                     grad_accum=24, max_iters=400_000, tau_n=30_000, eval_interval=5000, ckpt_interval=5000,
                     log_interval=100),
        # the base recipe at the size of wav2vec 2.0 / data2vec large
        "large": dict(SPEECH, n_layer=24, dim=1024, n_head=16, ffn_dim=4096, top_k=8, conv_dim=512, batch_size=6,
                      grad_accum=48, max_iters=400_000, tau_n=30_000, eval_interval=5000, ckpt_interval=5000,
                      log_interval=100),
    },
}

# Fields that fix the model or the data; a resumed run must agree with its checkpoint on these.
ARCH_FIELDS = [f.name for f in fields(TransformerConfig) if f.name not in ("rel_pos_grid", "rel_pos_len")] + [
    "modality", "objective", "data", "block_size", "vocab_size", "tokenizer", "positions", "seed", "img_size",
    "patch_size", "conv_dim", "conv_layers", "pos_conv_layers", "pos_conv_kernel", "pos_conv_groups", "max_samples"]


class ConfigError(Exception):
    pass


class CheckpointError(Exception):
    pass


MIN_LOSS_SCALE = 1e-4      # float16: a run whose gradients overflow even below this loss scale stops (fairseq's floor)
NO_MASK_FIX = "raise --mask_prob (vision: --mask_ratio) or use longer inputs (text: --block_size)"


# -----------------------------------------------------------------------------
# configuration

def parse_value(field_type: type, key: str, text: str) -> object:
    if field_type is bool:
        if text.lower() in ("1", "true", "yes", ""):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--{key} takes true or false, not {text!r}")
    try:
        return field_type(text)
    except ValueError:
        raise ConfigError(f"--{key} takes a{'n' if field_type is int else ''} {field_type.__name__}, not {text!r}") from None


def parse_overrides(cls: type, argv: list[str]) -> dict:
    """--key=value (or --flag for true) into {key: typed value}, checked against the dataclass cls's fields."""
    types = {f.name: f.type for f in fields(cls)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: settings look like --key=value")
        key, _, value = arg[2:].partition("=")
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; --help lists the settings"
            raise ConfigError(f"unknown setting --{key}{hint}")
        overrides[key] = parse_value(types[key], key, value)
    return overrides


def split_help(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether -h or --help is among the arguments, and the other arguments."""
    rest = [a for a in argv if a not in ("-h", "--help")]
    return len(rest) < len(argv), rest


def field_comments(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """The comments beside (and under) each field of a dataclass in its source, and the section comments above
    fields: ({field: comment}, {first field of a section: its title})."""
    names = {f.name for f in fields(cls)}
    comments: dict[str, str] = {}
    sections: dict[str, str] = {}
    last, title = None, None
    source = inspect.getsource(cls).splitlines()
    body = next(i for i, line in enumerate(source) if line.startswith("class ")) + 1
    for line in source[body:]:
        code, _, comment = line.partition("#")
        indent, comment = len(code) - len(code.lstrip()), comment.strip()
        if indent == 4 and code.split(":")[0].strip() in names:            # a field, maybe with its comment
            last = code.split(":")[0].strip()
            comments[last] = comment
            if title:
                sections[last], title = title, None
        elif code.strip():                                                  # other code (a method): no field's
            last = None
        elif comment and indent > 4 and last:                               # the comment goes on under its field
            comments[last] += " " + comment
        elif comment:                                                       # a section title
            title, last = comment, None
    return comments, sections


def usage(doc: str, config: object, also: tuple[type, ...] = ()) -> str:
    """A script's help: its docstring, then each setting of the dataclass instance config with the value it takes
    here (preset and overrides applied) and the comment beside its field in the source, under the source's section
    comments. A field without a comment takes the one of the same field in a dataclass of `also`."""
    comments, sections = field_comments(type(config))
    for cls in also:
        for name, comment in field_comments(cls)[0].items():
            comments[name] = comments.get(name) or comment
    lines = [doc.strip(), "", "Settings (--key=value), with the values they take here:"]
    for f in fields(config):
        if f.name in sections:
            lines.append(f"{sections[f.name]}:")
        value = getattr(config, f.name)
        value = str(value).lower() if isinstance(value, bool) else value
        lines.append(f"{f'  --{f.name}={value}':32} {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


# Where each number must lie, checked before anything runs (check_numbers): the counts ...
COUNTS = ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "block_size",
          "img_size", "patch_size", "conv_dim", "pos_conv_kernel", "pos_conv_groups", "max_samples", "mask_span",
          "token_span")
# ... and the other numbers, each in one of these ranges
IN_0_1, ABOVE_0_TO_1, BELOW_1, ABOVE_0, AT_LEAST_0 = "in [0, 1]", "in (0, 1]", "in [0, 1)", "above 0", "of at least 0"
WITHIN = {IN_0_1: lambda x: 0 <= x <= 1, ABOVE_0_TO_1: lambda x: 0 < x <= 1, BELOW_1: lambda x: 0 <= x < 1,
          ABOVE_0: lambda x: x > 0, AT_LEAST_0: lambda x: x >= 0}
LIMITS = {
    **dict.fromkeys(("dropout", "attn_dropout", "act_dropout", "layerdrop", "drop_path", "beta1", "beta2"), BELOW_1),
    **dict.fromkeys(("tau_0", "tau_e", "warmup", "hold", "mask_replace", "mask_random"), IN_0_1),
    **dict.fromkeys(("mask_prob", "mask_ratio"), ABOVE_0_TO_1),
    **dict.fromkeys(("lr", "adam_eps", "ln_eps"), ABOVE_0),
    **dict.fromkeys(("min_lr", "weight_decay", "grad_clip", "loss_beta", "layer_scale", "tau_n", "min_mask_patches",
                     "pos_conv_layers"), AT_LEAST_0),
}


def check_numbers(cfg: object, counts: Sequence[str], limits: dict[str, str]) -> None:
    """Each count of cfg is at least 1 and each other number in its range (limits: field -> one of WITHIN's ranges),
    or a ConfigError names the setting."""
    for key in counts:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: needs at least 1")
    for key, limit in limits.items():
        if not WITHIN[limit](getattr(cfg, key)):
            raise ConfigError(f"--{key}={getattr(cfg, key)}: needs a value {limit}")


def check_read(cfg: object, only: dict[str, tuple[str, str]], run: str) -> None:
    """Refuse a setting, changed from its default, that cfg's modality does not read: `only` maps each setting that
    only some modalities read to (those modalities, what the others do instead). Elsewhere it would do nothing."""
    default = type(cfg)()
    for key, (readers, instead) in only.items():
        names = readers.split()
        if cfg.modality not in names and getattr(cfg, key) != getattr(default, key):
            who = f"{' and '.join(names)} {'reads' if len(names) == 1 else 'read'}"
            raise ConfigError(f"--{key} does nothing for {cfg.modality} {run} (only {who} it): leave it out" +
                              (f"; {instead}" if instead else ""))


# The settings only some modalities read, by the Config's sections: (those that read it, what the others do instead)
ONLY = {
    "block_size": ("text", "vision's sequences are (img_size / patch_size)^2 patches, speech's up to max_samples"),
    **dict.fromkeys(("vocab_size", "tokenizer"), ("text", "")),
    "positions": ("text", "vision always uses BEiT's relative bias, speech its positional convolution"),
    "mask_prob": ("text speech", "vision masks --mask_ratio of its patches"),
    **dict.fromkeys(("token_span", "mask_replace", "mask_random"), ("text", "")),
    **dict.fromkeys(("img_size", "patch_size", "min_mask_patches"), ("vision", "")),
    "mask_ratio": ("vision", "text and speech mask with --mask_prob"),
    **dict.fromkeys(("conv_dim", "conv_layers", "pos_conv_layers", "pos_conv_kernel", "pos_conv_groups", "mask_span"),
                    ("speech", "")),
    "max_samples": ("speech", "text's sequences are --block_size tokens"),
}


def parse_args(argv: list[str]) -> Config:
    """--key=value overrides on top of the modality's preset. Unknown keys get a suggestion."""
    overrides = parse_overrides(Config, argv)
    if overrides.get("resume"):
        overrides = with_saved_settings(run_dir(Config(**overrides)) / "ckpt.pt", Config, overrides)
    modality = overrides.get("modality", Config.modality)
    preset = overrides.get("preset", Config.preset)
    if modality not in PRESETS:
        raise ConfigError(f"unknown modality {modality!r}: choose one of {', '.join(PRESETS)}")
    if preset not in PRESETS[modality]:
        raise ConfigError(f"unknown preset {preset!r} for {modality}: choose one of {', '.join(PRESETS[modality])}")
    cfg = Config(**{**PRESETS[modality][preset], **overrides})
    check_config(cfg)
    cfg.out_dir = str(run_dir(cfg))
    return cfg


def run_dir(cfg: Config) -> Path:
    """The run's folder: --out_dir, or out-<modality> when it is left empty."""
    return Path(cfg.out_dir or f"out-{cfg.modality}")


# the run's folder and the request to resume it are the command's own, never the saved run's
NOT_RESUMED = ("out_dir", "resume")


def with_saved_settings(path: Path, cls: type, overrides: dict) -> dict:
    """--resume: the command line's overrides, completed by the settings of the saved run at `path` (train.py's
    ckpt.pt, finetune.py's state.pt; cls: the script's config dataclass), so `--resume --out_dir=X` continues run X as
    it was started and a setting given again overrides it. Unchanged when there is no such file, a corrupt one, or
    when the command names another modality or preset: the run, which reads the file again, then says what is wrong."""
    if not path.is_file():
        return overrides
    try:    # mmap: the config without reading the tensors (every torchrun process parses the command line)
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    except Exception:
        return overrides
    if any(k in overrides and overrides[k] != saved.get(k, overrides[k]) for k in ("modality", "preset")):
        return overrides
    names = {f.name for f in fields(cls)} - set(NOT_RESUMED)
    return {**{k: v for k, v in saved.items() if k in names}, **overrides}


def changed_settings(saved: dict, cfg: object) -> str:
    """For the resuming line: the settings of cfg that differ from the saved run's config."""
    changed = [f"{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in saved.items()
               if k not in NOT_RESUMED and hasattr(cfg, k) and v != getattr(cfg, k)]
    return f"; changed on the command line: {', '.join(changed)}" if changed else ""


def check_config(cfg: Config) -> None:
    """Settings that no run can use, as one ConfigError naming the fix: the command line's and train()'s
    callers' (ablations.py, results.py) alike."""
    if cfg.max_iters < 1:
        raise ConfigError(f"--max_iters={cfg.max_iters}: pretraining needs at least one update (an untrained encoder "
                          "is finetune.py --init_from=random)")
    check_numbers(cfg, COUNTS, LIMITS)
    check_read(cfg, ONLY, "pretraining")
    if cfg.schedule not in ("tri", "cosine"):
        raise ConfigError(f"unknown --schedule={cfg.schedule}: use tri or cosine")
    if cfg.schedule == "tri" and cfg.warmup + cfg.hold > 1:
        raise ConfigError(f"--warmup={cfg.warmup} --hold={cfg.hold}: fractions of --max_iters, together at most 1 (the "
                          "rest decays)")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min_lr={cfg.min_lr} exceeds --lr={cfg.lr}: the schedule decays to min_lr")
    try:
        check_depth(sub_config(TargetConfig, cfg), sub_config(TransformerConfig, cfg).n_layer)
    except ValueError as e:
        raise ConfigError(f"bad setting: {e}") from None
    if cfg.positions not in ("absolute", "relative"):
        raise ConfigError(f"unknown --positions={cfg.positions}: use absolute or relative")
    if cfg.tokenizer not in tokenizer.KINDS:
        raise ConfigError(f"unknown --tokenizer={cfg.tokenizer}: use {', '.join(tokenizer.KINDS)}")
    if cfg.modality == "text" and cfg.block_size < MIN_LEN:
        raise ConfigError(f"--block_size={cfg.block_size}: a sequence holds <s>, its tokens and </s>: use at least "
                          f"{MIN_LEN}")
    if cfg.tokenizer != "gpt2" and cfg.vocab_size < tokenizer.N_BYTES:
        raise ConfigError(f"--vocab_size={cfg.vocab_size}: a byte-level BPE needs at least {tokenizer.N_BYTES} types, "
                          "one per byte")
    if cfg.objective not in ("data2vec", "mlm"):
        raise ConfigError(f"unknown --objective={cfg.objective}: use data2vec or mlm")
    if cfg.objective == "mlm" and cfg.modality != "text":
        raise ConfigError("--objective=mlm is the text baseline (token cross-entropy); use it with --modality=text")
    if cfg.mask_replace + cfg.mask_random > 1:
        raise ConfigError(f"--mask_replace={cfg.mask_replace} --mask_random={cfg.mask_random}: shares of the masked "
                          f"tokens, each >= 0 and together <= 1 (BERT: 0.8 and 0.1)")


T = TypeVar("T")


def sub_config(cls: type[T], cfg: Config) -> T:
    """Pick the fields of a sub-config (TransformerConfig, TargetConfig) out of the flat Config."""
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


# -----------------------------------------------------------------------------
# modalities: each Task prepares its data, builds its model and draws pretraining batches

class TextTask:
    """Text: BPE tokens, RoBERTa embeddings, BERT masking (SPEC §2)."""

    def __init__(self, cfg: Config, prepare: bool):
        self.cfg = cfg
        self.data_dir = text_data_dir(cfg)
        if prepare:
            prepare_text(Path(cfg.data) if cfg.data else None, self.data_dir, cfg.vocab_size, cfg.tokenizer)
        self.data = TextPretrainData(self.data_dir, cfg.block_size)
        self.steps_per_sample = cfg.block_size          # for tokens/s

    def build_model(self) -> Data2Vec:
        cfg = self.cfg
        relative = cfg.positions == "relative"
        encoder = TextEncoder(self.data.vocab_size, cfg.dim, cfg.block_size, self.data.pad_id, cfg.dropout, cfg.ln_eps,
                              positions=not relative)
        transformer = sub_config(TransformerConfig, cfg)
        transformer.rel_pos_len = cfg.block_size if relative else 0
        model = MaskedLM if cfg.objective == "mlm" else Data2Vec
        return model(encoder, transformer, sub_config(TargetConfig, cfg), head_hidden=True)

    def batch(self, split: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        d = self.data
        tokens = d.batch(split, self.cfg.batch_size, generator)                              # (B, T)
        special = d.special(tokens)                                                          # (B, T)
        student, mask = bert_mask(tokens, mask_id=d.mask_id, n_normal=d.n_normal, special=special,
                                  generator=generator, prob=self.cfg.mask_prob, span=self.cfg.token_span,
                                  replace_prob=self.cfg.mask_replace, random_prob=self.cfg.mask_random)
        return dict(source=tokens, mask=mask, student_source=student)


def text_data_dir(cfg: Config) -> Path:
    """Where the tokenized data and tokenizer are cached: data/text for the default corpus, else beside the data
    (<name>-data2vec). Other tokenizer settings than the defaults get their own folder (data/text-bpe-512), so runs
    with different settings never re-tokenize the data under each other."""
    default = Config()
    same = (cfg.tokenizer, cfg.vocab_size) == (default.tokenizer, default.vocab_size)
    suffix = "" if same else f"-{cfg.tokenizer}-{cfg.vocab_size}"
    if not cfg.data:
        return ROOT / "data" / f"text{suffix}"
    source = Path(cfg.data).resolve()
    return source.parent / f"{source.stem}-data2vec{suffix}"


class VisionTask:
    """Vision: patch embedding with a CLS token, BEiT block masking, BEiT's augmentations (SPEC §2). The data are the
    bundled digits (data/digits), or --data=<folder> with one subfolder of images per class, or the images straight
    in it (pretraining reads no labels)."""

    def __init__(self, cfg: Config, prepare: bool):
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size:
            raise ConfigError(f"--img_size={cfg.img_size} must be a multiple of --patch_size={cfg.patch_size}")
        side = cfg.img_size // cfg.patch_size
        self.grid = (side, side)
        self.steps_per_sample = side * side                       # patches per image, for patches/s
        if cfg.data:
            self.data = ImageData.folder(Path(cfg.data), cfg.img_size)
        else:
            self.data = ImageData.digits(ROOT / "data" / "digits", cfg.img_size)   # prepared once, on first use

    def build_model(self) -> Data2Vec:
        cfg = self.cfg
        encoder = PatchEncoder(self.data.in_chans, cfg.dim, cfg.patch_size)
        transformer = sub_config(TransformerConfig, cfg)
        transformer.rel_pos_grid = self.grid
        return Data2Vec(encoder, transformer, sub_config(TargetConfig, cfg), head_hidden=False)

    def batch(self, split: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Augmented training images, or plain held-out ones for the val loss; a fresh block mask either way."""
        cfg = self.cfg
        images, _ = self.data.batch("train" if split == "train" else "test", cfg.batch_size, generator,
                                    augment=split == "train")                                    # (B, C, S, S)
        mask = block_mask(len(images), self.grid, ratio=cfg.mask_ratio, min_patches=cfg.min_mask_patches or None,
                          generator=generator)                                                   # (B, h*w)
        return dict(source=images, mask=mask)


class SpeechTask:
    """Speech: raw 16 kHz waveforms, the wav2vec 2.0 conv feature encoder, span masking (SPEC §2). The data are the
    espeak-ng corpus (data/speech, synthesised on first use), or --data=<manifest.tsv> in fairseq's layout; the
    held-out loss reads valid.tsv beside it (else test.tsv, else the training manifest itself)."""

    def __init__(self, cfg: Config, prepare: bool):
        self.cfg = cfg
        if not 1 <= cfg.conv_layers <= len(ConvFeatureExtractor.KERNELS):
            raise ConfigError(f"--conv_layers={cfg.conv_layers}: the feature encoder has 1 to 7 layers")
        if cfg.dim % cfg.pos_conv_groups:
            raise ConfigError(f"--dim={cfg.dim} must be a multiple of --pos_conv_groups={cfg.pos_conv_groups}")
        if cfg.max_samples < MIN_SAMPLES:
            raise ConfigError(f"--max_samples={cfg.max_samples}: crops must hold the feature encoder's receptive field, "
                              f"{MIN_SAMPLES} samples, the shortest clip the data accept")
        if cfg.data:
            train_tsv = Path(cfg.data)
        else:
            train_tsv = CORPUS_DIR / "train.tsv"
            if prepare:
                prepare_speech(train_tsv.parent)
        train_data = SpeechData(train_tsv, cfg.max_samples)                 # first: it checks what --data names
        held_out = [p for p in (train_tsv.with_name("valid.tsv"), train_tsv.with_name("test.tsv")) if p.is_file()]
        val_tsv = held_out[0] if held_out and held_out[0].resolve() != train_tsv.resolve() else train_tsv
        self.data = {"train": train_data, "val": SpeechData(val_tsv, cfg.max_samples)}
        for tsv, data in ((train_tsv, self.data["train"]), (val_tsv, self.data["val"])):
            if len(data) < cfg.batch_size:
                raise DataError(f"{tsv}: {len(data)} utterances, fewer than --batch_size={cfg.batch_size}; "
                                f"lower --batch_size or add audio")
        fe = ConvFeatureExtractor
        self.kernels, self.strides = fe.KERNELS[:cfg.conv_layers], fe.STRIDES[:cfg.conv_layers]
        crops = self.data["train"].lengths.clamp(max=cfg.max_samples)                       # (N,)
        # frames of the average cropped training utterance, for frames/s
        self.steps_per_sample = round(conv_output_lengths(crops, self.kernels, self.strides).float().mean().item())

    def build_model(self) -> Data2Vec:
        return speech_model(self.cfg)

    def batch(self, split: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Cropped, zero-padded waveforms with their sample-level padding and a span mask over the real frames."""
        b = self.data[split].batch(self.cfg.batch_size, generator)
        S = b.waves.shape[1]
        padding_mask = b.padding_mask()                                                     # (B, S)
        frames = conv_output_lengths(b.lengths, self.kernels, self.strides)                 # (B,)
        T = int(conv_output_lengths(torch.tensor([S]), self.kernels, self.strides))
        mask = span_mask(frames, T, prob=self.cfg.mask_prob, span=self.cfg.mask_span, generator=generator)  # (B, T)
        return dict(source=b.waves, padding_mask=padding_mask, mask=mask)


def speech_model(cfg: Config) -> Data2Vec:
    """The speech student; it needs no data, so CTC fine-tuning (finetune.py) builds it without the corpus."""
    encoder = SpeechEncoder(cfg.dim, cfg.conv_dim, cfg.conv_layers, cfg.pos_conv_layers, cfg.pos_conv_kernel,
                            cfg.pos_conv_groups, cfg.dropout, cfg.ln_eps)
    return Data2Vec(encoder, sub_config(TransformerConfig, cfg), sub_config(TargetConfig, cfg), head_hidden=False)


TASKS = {"text": TextTask, "vision": VisionTask, "speech": SpeechTask}
Task = TextTask | VisionTask | SpeechTask


def batch_seed(seed: int, step: int, index: int) -> int:
    """Each (step, global micro-batch index) draws its own data and masks: a pure function of the step, so resume
    is exact, and N processes with 1 micro-step see the batches 1 process with N micro-steps sees."""
    return (seed * 1_000_003 + step) * 10_007 + index


def device_batch(task: Task, model: Data2Vec, split: str, generator: torch.Generator,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """One micro-batch of the task on the device, with the masked rows (model.masked_rows) computed on the CPU where
    the mask was drawn, so the forward pass never waits for the device to find them."""
    b = task.batch(split, generator)
    b["mask_rows"] = model.masked_rows(b["mask"])                                                  # (N,)
    if device.type == "cuda":
        # from pinned memory the copy is queued behind the device's work instead of waiting for it to finish
        b = {k: v.pin_memory() for k, v in b.items()}
    b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
    torch._dynamo.mark_dynamic(b["mask_rows"], 0)          # N varies: torch.compile compiles one graph for any N
    return b


# -----------------------------------------------------------------------------
# schedules (pure functions of the step)

def lr_at(step: int, cfg: Config) -> float:
    warm = int(cfg.warmup * cfg.max_iters)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "tri":
        hold_end = warm + int(cfg.hold * cfg.max_iters)
        if step < hold_end:
            return cfg.lr
        frac = (step - hold_end) / max(1, cfg.max_iters - hold_end)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)
    if cfg.schedule == "cosine":
        frac = min(1.0, (step - warm) / max(1, cfg.max_iters - warm))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
    raise ConfigError(f"unknown --schedule={cfg.schedule}: use tri or cosine")


# -----------------------------------------------------------------------------
# system: processes, device, precision

def setup_system(cfg: Config) -> tuple[int, int, torch.device, torch.dtype]:
    """The one place that decides rank, device and dtype."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    else:
        device = cfg.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device={cfg.device}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device}, but torch sees no CUDA GPU: pass --device=cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device={cfg.device}, but torch sees no Apple GPU (MPS): pass --device=cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)   # plain "cuda": each torchrun process its own GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32   # CPUs without native bf16 are slower in bf16 than in fp32
    else:
        dtype = getattr(torch, cfg.dtype, None)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"--dtype={cfg.dtype}: use auto, float32, bfloat16 or float16")
    if cfg.grad_accum % world:
        # every process does the same number of micro-steps: round the global count up, and say so
        accum = -(-cfg.grad_accum // world) * world
        if rank == 0:
            print(f"--grad_accum={cfg.grad_accum} raised to {accum}, a multiple of the {world} processes "
                  f"(global batch {cfg.batch_size * accum})")
        cfg.grad_accum = accum
    return rank, world, device, dtype


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def on_rank0(work: Callable[[], T], master: bool, errors: tuple[type[Exception], ...]) -> T | None:
    """Run `work` in rank 0 only (master) and return its result there (None elsewhere). One of `errors` raised by it
    is raised in every process, so a problem only rank 0 can see stops them all with its message, not the others
    with a broken connection."""
    result, failure = None, None
    if master:
        try:
            result = work()
        except errors as e:
            failure = e
    if dist.is_initialized():
        verdict = [failure]
        dist.broadcast_object_list(verdict, src=0)
        failure = verdict[0]
    if failure is not None:
        raise failure
    return result


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether the flag is set in any process: every process gets the same answer."""
    if not dist.is_initialized():
        return flag
    return all_reduce(torch.tensor([float(flag)], device=device)).item() > 0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a whole update, whose checkpoint is saved."""


@contextmanager
def stop_requests(announce: bool) -> Iterator[Callable[[], bool]]:
    """While the training loop runs, the first Ctrl-C (SIGINT) or SIGTERM (a scheduler preempting the job, torchrun
    stopping its workers) asks it to stop after the update in progress and save it; a second Ctrl-C quits at once.
    Yields a function that says whether a stop was asked for; announce: say so on stderr when asked. Signals reach
    only the main thread, so elsewhere nothing is installed."""
    asked_at = None

    def handler(signum: int, frame: object) -> None:
        nonlocal asked_at
        if asked_at is None:
            asked_at = time.monotonic()
            if announce:        # os.write: a print here could land inside the print the signal interrupted
                os.write(2, f"{signal.Signals(signum).name}: stopping after this update to save it (Ctrl-C again to "
                            "quit at once)\n".encode())
        elif signum == signal.SIGINT and time.monotonic() - asked_at > 1.0:
            # within a second it is the same Ctrl-C again: the terminal sends it to the whole process group, and
            # torchrun forwards it to its workers as well
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: asked_at is not None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -----------------------------------------------------------------------------
# checkpoints and the folders that hold them

def make_dir(path: Path, flag: str) -> None:
    """Create the folder a run writes to before the run spends any time, so a bad path gets one line now instead of
    a traceback at the first save. flag: the setting that named it, for the message."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{path} is a file, not a folder: choose another {flag}") from None
    except OSError as e:
        raise ConfigError(f"cannot create the folder {path} ({e.strerror}): choose another {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"no permission to write in {path}: choose another {flag}")


def lock_dir(path: Path, flag: str) -> int | None:
    """Take the OS's lock on the folder (flock): the descriptor that holds it, None where the file system has no such
    lock (Windows, some network file systems). The lock ends with the process however it ends."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{path} is in use by another run that is still going: wait for it to end, or choose "
                          f"another {flag}") from None
    except OSError:
        os.close(fd)
        return None
    return fd


@contextmanager
def hold_dir(path: Path, flag: str, master: bool = True) -> Iterator[None]:
    """Create the run's folder (make_dir) and hold it while the run lives (lock_dir): a second run started on the same
    folder stops with one line instead of overwriting this one's files, and a crash leaves no lock behind. A folder
    that this hold created and the run left empty (it failed before its first save) is removed. Under torchrun rank 0
    (master) holds it and every process stops on its verdict."""
    def take() -> int | None:
        make_dir(path, flag)
        return lock_dir(path, flag)

    created = master and not path.exists()
    fd = on_rank0(take, master, (ConfigError,))
    try:
        yield
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if fd is not None:
            os.close(fd)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write never replaces the last good checkpoint. A write that fails (a full disk, a quota)
    leaves no partial file and is a CheckpointError naming the file and the space left there."""
    tmp = path.with_suffix(".tmp")
    try:
        if not path.parent.is_dir():             # removed while the run was going: keep the run's work all the same
            print(f"warning: {path.parent} was removed while the run was going; making it again for {path.name}",
                  file=sys.stderr)
            path.parent.mkdir(parents=True)
        torch.save(state, tmp)
    except (OSError, RuntimeError) as e:         # a full disk: torch's "unexpected pos ..." or OSError ENOSPC
        tmp.unlink(missing_ok=True)
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"could not write {path} ({reason}; {free_mib(path.parent):,.0f} MiB free there): free "
                              "some space, or choose another folder; the last good checkpoint, if any, is kept"
                              ) from None
    os.replace(tmp, path)


def load_checkpoint(path: Path, fix: str | None = None) -> dict:
    """A checkpoint of this project (a dict with its config), or a CheckpointError that ends with `fix`: what the
    caller's user should do when the file is missing or unreadable (None: the advice for train.py's --resume)."""
    missing = fix or "train without --resume first, or point --out_dir at a run"
    unreadable = fix or "delete it or use another --out_dir"
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: pass the ckpt.pt inside it")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or not a checkpoint of "
                              f"this project; {unreadable}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise CheckpointError(f"{path} holds no config, so it is not a checkpoint of this project; {unreadable}")
    return ckpt


def check_compatible(ckpt: dict, cfg: object, path: Path, keys: Sequence[str] = ARCH_FIELDS) -> None:
    """The checkpoint's config agrees with cfg (a dataclass: train.py's Config, finetune.py's) on the fields `keys`."""
    config = ckpt.get("config", {})
    if "modality" in keys and config.get("modality", cfg.modality) != cfg.modality:
        # every other setting would differ too
        raise CheckpointError(f"{path} is a {config['modality']} run: leave --modality out to resume it (the "
                              f"saved run's settings are used), or choose another --out_dir")
    defaults = {f.name: f.default for f in fields(cfg)}           # a field added since the checkpoint: its default
    saved = {k: config.get(k, defaults[k]) for k in keys}
    diff = [f"{k}={saved[k]!r} (now {getattr(cfg, k)!r})" for k in keys if saved[k] != getattr(cfg, k)]
    if diff and "preset" not in keys and config.get("preset", cfg.preset) != cfg.preset:
        # the preset chose most of them: the likeliest fix
        diff.insert(0, f"preset={config['preset']!r} (now {cfg.preset!r})")
    if diff:
        raise CheckpointError(f"{path} was trained with other settings: {', '.join(diff)}. Leave those out to "
                              f"resume with the saved values, or start a new run in another --out_dir")


def load_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    """Strict loading with a readable list of what does not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}: the {what} does not fit this model; missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}")
    module.load_state_dict(state)


# -----------------------------------------------------------------------------
# the training loop

def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: weight decay on the matrices (linear weights, embedding tables, the relative position
    bias, vision's mask token), none on biases, norms and vision's CLS token (BEiT's and data2vec_vision's rule)."""
    groups: list[dict] = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    for name, p in model.named_parameters():
        groups[p.dim() < 2 or name.endswith("cls_token")]["params"].append(p)
    return groups


def forward_backward(model: torch.nn.Module, teacher: EMATeacher, batches: list[dict], world: int,
                     scaler: torch.amp.GradScaler,
                     autocast: AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Gradients of one optimizer step over this process's micro-batches, normalised by the masked-step count of
    the whole global batch (SPEC §1.6, §6): the result equals one big batch, however it is split into micro-steps
    and processes. Returns (loss sum over all processes, global masked count, predictions, targets)."""
    n_masked = all_reduce(sum(b["mask"].sum() for b in batches).float())     # masked steps in the global batch
    loss_sum = torch.zeros((), device=n_masked.device)
    preds, targets = [], []
    for m, b in enumerate(batches):
        if world > 1:
            # sync gradients only on the last micro-step; must be set before its forward
            model.require_backward_grad_sync = m == len(batches) - 1
        with autocast:
            loss, pred, y = model(**b, teacher=teacher)
        # DDP averages gradients over processes; scaling by world makes the result sum / global count
        scaler.scale(loss * world / n_masked).backward()
        loss_sum += loss.detach().float()
        preds.append(pred)
        targets.append(y)
    return all_reduce(loss_sum), n_masked, preds, targets


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def plot_history(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(history["step"], history["loss"], label="train", lw=1)
    ax[0].plot(history["eval_step"], history["eval_loss"], "o-", label="held-out")
    ax[0].set(xlabel="step", ylabel="loss", title="data2vec loss")
    ax[0].legend()
    ax[1].plot(history["step"], history["target_var"], label="target_var")
    ax[1].plot(history["step"], history["pred_var"], label="pred_var")
    ax[1].set(xlabel="step", title="collapse monitors (std over masked steps)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: Config) -> Path:
    """Pretrain as cfg says, holding --out_dir for the run (hold_dir). -> the checkpoint's path"""
    check_config(cfg)
    rank, world, device, dtype = setup_system(cfg)
    with hold_dir(Path(cfg.out_dir), "--out_dir", master=rank == 0):
        return run(cfg, rank, world, device, dtype)


def run(cfg: Config, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> Path:
    """The pretraining run itself, in a folder that train() holds. -> the checkpoint's path"""
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if not cfg.resume and ckpt_path.exists():
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out_dir")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None:
        check_compatible(ckpt, cfg, ckpt_path)

    # ---- data (rank 0 prepares, the others wait) ----
    task = on_rank0(lambda: TASKS[cfg.modality](cfg, prepare=True), master, (ConfigError, DataError))
    if not master:
        task = TASKS[cfg.modality](cfg, prepare=False)

    # ---- model, teacher, optimiser ----
    torch.manual_seed(cfg.seed)             # the same initial weights in every process (teacher included)
    model = task.build_model().to(device)
    teacher = EMATeacher(model.student, cfg.tau_0, cfg.tau_e, cfg.tau_n).to(device)
    torch.manual_seed(cfg.seed + rank)      # each process its own dropout stream
    optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0
    history = {"step": [], "loss": [], "target_var": [], "pred_var": [], "eval_step": [], "eval_loss": []}
    if ckpt is not None:
        load_state(model, ckpt["model"], "student", ckpt_path)
        load_state(teacher.model, ckpt["teacher"], "teacher", ckpt_path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:                         # groups of another size: a checkpoint of an older version
            raise CheckpointError(f"{ckpt_path}: its optimizer state does not fit this model's parameter groups ({e}); "
                                  "start the run afresh with another --out_dir") from None
        if scaler.is_enabled() and ckpt["scaler"]:      # empty when the run so far was not fp16
            scaler.load_state_dict(ckpt["scaler"])
        step, history = ckpt["step"], ckpt["history"]
        set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
        say(f"resuming {ckpt_path} at step {step}{changed_settings(ckpt['config'], cfg)}")
        if step >= cfg.max_iters:
            say(f"the run has already made {step} updates, --max_iters={cfg.max_iters}: nothing left to train; "
                "a larger --max_iters trains on")
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model          # not DDP's wrapper: its forward syncs buffers, a collective that ranks without an
                                # eval batch (eval_iters < world) would never join
    if world > 1:
        # layerdrop skips blocks, whose parameters then get no gradient in that step
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.layerdrop > 0)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def batch(split: str, step: int, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(batch_seed(cfg.seed, step, index))
        return device_batch(task, raw_model, split, g, device)

    def draw(at: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of update `at`."""
        return [batch("train", at, rank * micro + m) for m in range(micro)]

    @torch.no_grad()
    def evaluate() -> float:
        eval_model.eval()
        total = torch.zeros(2, device=device)              # loss sum, masked-step count
        for i in range(rank, cfg.eval_iters, world):
            b = batch("val", -1, i)
            with autocast:
                loss, _, _ = eval_model(**b, teacher=teacher)
            total += torch.stack([loss.float(), b["mask"].sum().float()])
        eval_model.train()
        loss_sum, n_masked = all_reduce(total).tolist()
        if n_masked == 0:
            raise ConfigError(f"no held-out step was masked: {NO_MASK_FIX}")
        return loss_sum / n_masked

    def held_out() -> float:
        """Evaluate, log and record the held-out loss. Returns the seconds it took, which tok/s and eta leave out."""
        t0 = time.time()
        ev = evaluate()
        history["eval_step"].append(step)
        history["eval_loss"].append(ev)
        say(f"step {step}: held-out loss {ev:.4f}")
        return time.time() - t0

    def kept() -> str:
        return f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written"

    def state() -> dict:
        return dict(model=raw_model.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=asdict(cfg), history=history,
                    rng=gather_rng_states(world), seconds=seconds_before + time.time() - t_start)

    micro = cfg.grad_accum // world
    tokens_per_step = cfg.batch_size * cfg.grad_accum * task.steps_per_sample
    n_params = sum(p.numel() for p in raw_model.parameters())
    say(f"data2vec {cfg.modality}/{cfg.preset}: {n_params / 1e6:.2f}M parameters, {world} process(es) on {device}, "
        f"{dtype}, global batch {cfg.batch_size * cfg.grad_accum} x {task.steps_per_sample} steps, {cfg.max_iters} updates")
    model.train()
    t_start, t_last, last_step = time.time(), time.time(), step
    seconds_before = ckpt.get("seconds", 0.0) if ckpt is not None else 0.0     # the run's time before this resume
    batches = draw(step)
    stop, evaluated_at = False, None
    with stop_requests(announce=master) as stop_requested:
        while step < cfg.max_iters:
            if step % cfg.eval_interval == 0 and step != evaluated_at:
                t_last += held_out()
                evaluated_at = step

            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, n_masked, preds, targets = forward_backward(model, teacher, batches, world, scaler, autocast)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scaler.get_scale() < scale and math.isfinite((loss_sum / n_masked).item()):
                # fp16 only: inf or NaN gradients of a finite loss, so GradScaler skipped the update and halved its
                # scale. Like fairseq, the update does not count: the same batches go again at the lower scale.
                if scaler.get_scale() < MIN_LOSS_SCALE:
                    raise FloatingPointError(f"the float16 gradients overflow even at loss scale {scale:g} (update "
                                             f"{step + 1}): stopping; {kept()}. Lower --lr (now {cfg.lr:g}), or use "
                                             "--dtype=bfloat16 where the GPU has it")
                continue
            step += 1
            teacher.update(raw_model.student, step)
            if step < cfg.max_iters:
                batches = draw(step)        # on the CPU while the device still works through this step's queue

            loss_value = (loss_sum / n_masked).item()
            if not math.isfinite(loss_value):
                if n_masked.item() == 0:
                    raise ConfigError(f"update {step} masked no step: stopping; {kept()}. To mask some: {NO_MASK_FIX}")
                raise FloatingPointError(f"the loss is {loss_value} at step {step}: stopping; {kept()}. "
                                         f"Lower --lr (now {cfg.lr:g}) or check the data")
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                target_var = collapse_stat(torch.cat(targets))
                pred_var = collapse_stat(torch.cat(preds))
                history["step"].append(step)
                history["loss"].append(loss_value)
                history["target_var"].append(target_var)
                history["pred_var"].append(pred_var)
                now = time.time()
                dt = (now - t_last) / max(1, step - last_step)
                t_last, last_step = now, step
                say(f"step {step}/{cfg.max_iters} | loss {loss_value:.4f} | target_var {target_var:.3f} | "
                    f"pred_var {pred_var:.3f} | tau {teacher.tau(step):.4f} | lr {lr:.2e} | "
                    f"{tokens_per_step / dt:,.0f} tok/s | eta {format_eta(dt * (cfg.max_iters - step))}")
            stop = step < cfg.max_iters and any_process(stop_requested(), device)  # Ctrl-C or SIGTERM: save, stop
            if step % cfg.ckpt_interval == 0 or step == cfg.max_iters or stop:
                t0 = time.time()
                if step == cfg.max_iters:
                    held_out()
                st = state()                        # a collective: every process gathers its RNG state
                # a full disk: every process stops with rank 0's message
                on_rank0(lambda: save_checkpoint(ckpt_path, st), master, (CheckpointError,))
                t_last += time.time() - t0
            if stop:
                break

    if master:
        plot_history(history, out_dir / "loss.png")
    if stop:
        raise Interrupted(f"stopped at step {step}/{cfg.max_iters}; checkpoint: {ckpt_path}. The same command with "
                          "--resume continues exactly")
    say(f"done in {format_eta(time.time() - t_start)}; checkpoint: {ckpt_path} (loss curve: {out_dir / 'loss.png'})")
    return ckpt_path


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world: int) -> list[dict[str, torch.Tensor]]:
    """Every process's RNG state (dropout, layerdrop), so a resumed run continues each stream exactly."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def leave_together() -> None:
    """Under torchrun, no process exits before all have finished: a rank exiting early aborts another still using
    gloo ("terminate called without an active exception", once in five 2-process test runs), and a rank that exits
    with an error code has torchrun stop the others, here rank 0 while it still wrote its loss plot and message."""
    if dist.is_initialized():
        dist.barrier()


def out_of_memory(e: RuntimeError) -> str | None:
    """What ran out, for an allocation that failed (a GPU's OutOfMemoryError, or the CPU allocator's error when the
    system refuses the memory), or None for any other error. Torch's own message says how much it tried to get."""
    text = str(e)
    if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in text:
        return None
    where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
    size = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", text, re.IGNORECASE)
    if size is None:
        return f"out of {where} memory"
    amount = f"{float(size[1]) / 2 ** 30:,.2f} GiB" if size[2] == "bytes" else f"{size[1]} {size[2]}"
    return f"out of {where} memory (an allocation of {amount} failed)"


def main(argv: list[str]) -> int:
    try:
        asked, argv = split_help(argv)
        if asked:
            print(usage(__doc__, parse_args(argv), also=(TransformerConfig, TargetConfig)))
            return 0
        train(parse_args(argv))
        leave_together()
    except (ConfigError, CheckpointError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if (what := out_of_memory(e)) is None:
            raise
        print(f"error: {what}: lower --batch_size and raise --grad_accum by the same factor, which keeps the global "
              "batch; the last checkpoint, if any, is kept, and --resume continues from it with the new settings",
              file=sys.stderr)
        return 1
    except Interrupted as e:                    # every process stops after the same update (any_process)
        print(f"interrupted: {e}", file=sys.stderr)
        leave_together()
        return 130                              # the shell's code for a run stopped by Ctrl-C
    except KeyboardInterrupt:
        print("interrupted: quit at once; the last checkpoint, if any, is kept", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
