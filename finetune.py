"""Downstream training from a pretrained data2vec checkpoint (or from random weights, to see what pretraining buys).

    python finetune.py --modality=text --init_from=out-text/ckpt.pt                 # full fine-tune
    python finetune.py --modality=text --init_from=out-text/ckpt.pt --mode=probe    # linear probe, frozen encoder
    python finetune.py --modality=text --init_from=random                           # same model, no pretraining
    python finetune.py --modality=text --init_from=random --like=out-x/ckpt.pt      # random, that run's architecture
    python finetune.py --modality=text --init_from=bag --mode=probe                 # no encoder: word counts
    python finetune.py --modality=text --init_from=ppmi --mode=probe                # no encoder: counted word vectors
    python finetune.py --modality=text --init_from=out-text/ckpt.pt --train=SST-2/train.tsv --test=SST-2/dev.tsv

    python finetune.py --modality=vision --init_from=out-vision/ckpt.pt --label_fraction=0.1    # 10 % of the labels
    python finetune.py --modality=speech --init_from=out-speech/ckpt.pt --budget_minutes=10     # 10 min of labels
    python finetune.py --modality=speech --init_from=facebook/data2vec-audio-base --save=out-ctc/ctc.pt  # official

Fine-tuning saves its state every --ckpt_interval updates and when Ctrl-C or SIGTERM stops it (in --out_dir,
out-finetune-<modality> by default); the same command with --resume continues exactly, and so does --resume with
only the --out_dir (settings left out come from the saved state). The probe keeps nothing.

--init_from also takes an official checkpoint (a Hugging Face save_pretrained folder, or a hub name when online):
hf.py converts it into the same modules, so it fine-tunes exactly like one of ours (text: with its own tokenizer).

Text: sentence/passage classification, RoBERTa's head on the first token (SPEC §3). The default task is the genre
(comedy / history / tragedy) of 100-word Shakespeare passages, split by play. GLUE tasks ship as TSV
(`sentence<TAB>label`), which --train / --test read.
Vision: image classification, mean of the patch tokens -> LayerNorm -> Linear (SPEC §3), on the held-out split of
the pretraining images (the digits, or the class folders of train.py's --data). Fine-tuning augments the training
images and follows BEiT: layer-wise lr decay, label smoothing.
Speech: letters with CTC on the frames, greedy decoding, CER and WER (SPEC §3). The default corpus is the espeak-ng
Shakespeare corpus, tested on voices never heard in training; --train / --test read fairseq manifests with `.ltr`.
"""

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import hf
from ctc import BLANK, VOCAB, cer, greedy_decode, ids_to_text, wer
from data2vec import Data2Vec
from masking import span_mask
from speech_data import CORPUS_DIR, Batch, SpeechData, prepare_speech
from text_data import MIN_LEN, DataError, encode_texts, prepare_text, read_tsv
from train import (ABOVE_0, ABOVE_0_TO_1, AT_LEAST_0, BELOW_1, IN_0_1, TASKS, Config, CheckpointError,
                   ConfigError, Interrupted, PRESETS, changed_settings, check_compatible, check_numbers, check_read,
                   hold_dir, load_checkpoint, load_state, lr_at, make_dir, out_of_memory, parse_overrides,
                   rng_state, save_checkpoint, set_rng_state, setup_system, speech_model, split_help, stop_requests,
                   text_data_dir, usage, with_saved_settings)
from transformer import Transformer
from vision_data import UNLABELLED


@dataclass
class FinetuneConfig:
    modality: str = "text"
    init_from: str = ""         # a train.py checkpoint (out-text/ckpt.pt), "random", or an official one (hf.py):
                                # a save_pretrained folder or a hub name (facebook/data2vec-audio-base);
                                # text probe only, references with no encoder: "bag", the passage's token counts;
                                # "ppmi", the mean of its word vectors counted on the pretraining split
    preset: str = "small"       # with --init_from=random: the architecture to build ...
    like: str = ""              # ... or a train.py checkpoint's (its model and data settings, fresh random weights)
    mode: str = "finetune"      # finetune (all weights) | probe (frozen encoder, linear classifier)
    train: str = ""             # '' = the default task; else a TSV file `sentence<TAB>label`
    test: str = ""
    label_fraction: float = 1.0  # train on this fraction of the labelled examples (per class)
    data: str = ""              # vision: an image folder (root/<class>/...); '' = the checkpoint's pretraining data
    max_len: int = 128
    epochs: int = 3
    batch_size: int = 32        # also the frozen encoder's batch for the probe's features (its classifier: 8x)
    lr: float = 1e-4            # fine-tune; the probe uses probe_lr. RoBERTa sweeps {1, 2, 4, 6}e-5 at base size
    probe_lr: float = 1e-2
    probe_epochs: int = 100
    probe_layer: int = -1       # probe: pool this layer's output: 0 = the Transformer's input (the embeddings), k = block
                                # k's output; -1 = the encoder's final output, as fine-tuning reads it
    weight_decay: float = 0.01
    warmup: float = 0.06        # text, vision: fraction of the steps (speech: tri-stage 10 / 40 / 50 %, SPEC §3)
    layer_decay: float = 1.0    # block i of L trains at lr x layer_decay^(L - i), the encoder at ^(L + 1); 1 = off
    label_smoothing: float = 0.0
    dropout: float = 0.1        # text: the dropout of RoBERTa's classification head
    # speech (run_speech)
    budget_minutes: float = 0.0  # train on a random subset of this many minutes of labelled audio; 0 = all of it
    max_samples: int = 320_000  # longer labelled training utterances are left out (20 s at 16 kHz); the test set
                                # is read whole
    mask_prob: float = 0.65     # span masking while fine-tuning (fairseq: 0.65, spans of the pretraining length)
    freeze: float = 0.0         # fraction of the updates that train only the CTC head, the pretrained body frozen
                                # (fairseq's freeze_finetune_updates: 10k of 13k updates for 10 min of labels)
    save: str = ""              # speech: write the fine-tuned CTC model here (transcribe.py reads it); '' = don't
    # stopping and resuming (fine-tuning; the probe keeps nothing: most of its time goes into features it recomputes)
    out_dir: str = ""           # state.pt here every ckpt_interval updates and on Ctrl-C or SIGTERM, deleted when the
                                # run ends; '' = out-finetune-<modality>
    ckpt_interval: int = 200
    resume: bool = False        # continue the stopped fine-tuning run in out_dir, exactly
    # the run
    log_interval: int = 50      # fine-tuning: a progress line every this many updates
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


def mean_pool(h: torch.Tensor, padding_mask: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """The mean over each example's real (not padded) steps after a prefix such as CLS: h (B, prefix + T, C),
    padding_mask (B, T) over the steps after the prefix, True = padding, or None -> (B, C)."""
    h = h[:, prefix:]                                                   # (B, T, C)
    if padding_mask is None:
        return h.mean(1)
    keep = (~padding_mask).unsqueeze(-1).to(h.dtype)                    # (B, T, 1)
    return (h * keep).sum(1) / keep.sum(1).clamp(min=1)


class Classifier(nn.Module):
    """Pretrained encoder + Transformer + a classification head on one pooled vector per example.

    pool "first": the first step (text: <s>, RoBERTa). "mean": the mean over the real (not padded) steps after the
    encoder's prefix (vision: the patch tokens without CLS, SPEC §3). layer: which output is pooled: -1 the final one,
    0 the Transformer's input, k block k's output (before a pre-LN model's final LayerNorm).
    """

    def __init__(self, encoder: nn.Module, transformer: Transformer, head: nn.Module, pool: str, layer: int = -1):
        super().__init__()
        n_layer = len(transformer.blocks)
        if not -1 <= layer <= n_layer:
            raise ConfigError(f"--probe_layer={layer}: the encoder has layers 0 (its input) to {n_layer}, or -1 (its "
                              "final output)")
        self.encoder, self.transformer, self.head, self.pool, self.layer = encoder, transformer, head, pool, layer

    def features(self, source: torch.Tensor) -> torch.Tensor:
        x, pad = self.encoder.embed(source)                             # (B, T, C)
        h = self.encoder(x, pad)                                        # (B, T', C), T' = n_prefix + T
        if self.layer < 0:
            h, _ = self.transformer(h, pad)                             # (B, T', C)
        elif self.layer > 0:
            h = self.transformer(h, pad, target_layer="block")[1][self.layer - 1]  # (B, T', C)
        if self.pool == "first":
            return h[:, 0]                                              # (B, C)
        return mean_pool(h, pad, self.encoder.n_prefix)                 # (B, C)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(source))                         # (B, classes)


REFERENCES = {"bag": "token counts", "ppmi": "word vectors counted on the pretraining split"}


class BagOfTokens(nn.Module):
    """The text probe's reference without an encoder: log(1 + count) of each normal token type in the passage
    (special tokens and padding, ids >= n_types, left out): what a linear classifier reads from word choice alone."""

    def __init__(self, n_types: int):
        super().__init__()
        self.n_types = n_types

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.clamp(max=self.n_types)                            # (B, T) every special id -> one spare column
        counts = torch.zeros(tokens.shape[0], self.n_types + 1, device=tokens.device)             # (B, n_types + 1)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
        return counts[:, :-1].log1p()                                   # (B, n_types)


class WordVectors(nn.Module):
    """The text probe's reference for learned word meaning without a network: a passage is the mean of its normal
    tokens' vectors (ppmi_vectors of the pretraining split; special ids, >= n_types, left out)."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("vectors", vectors)                        # (n_types, C)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        n_types = self.vectors.shape[0]
        v = self.vectors[tokens.clamp(max=n_types - 1)]                 # (B, T, C)
        return mean_pool(v, tokens >= n_types, prefix=0)                # (B, C) special ids count as padding


def ppmi_vectors(stream: np.ndarray, n_types: int, dim: int, window: int = 5, max_types: int = 8192) -> torch.Tensor:
    """Word vectors by counting (Levy, Goldberg & Dagan 2015): how often each pair of normal tokens (ids below
    n_types) lies within `window` tokens of each other in `stream`, as positive pointwise mutual information with the
    context frequencies raised to 0.75, factored by a truncated SVD -> (n_types, dim) = U sqrt(S). Only the max_types
    most frequent types are counted (the matrix is max_types^2), the others keep zero vectors. Randomised SVD: seed
    torch first for the same vectors every time."""
    ids = torch.from_numpy(np.asarray(stream).astype(np.int64))        # (N,)
    freq = torch.bincount(ids[ids < n_types], minlength=n_types)       # (n_types,)
    kept = freq.argsort(descending=True)[:min(max_types, int((freq > 0).sum()))]   # (K,) the types that get vectors
    K = len(kept)
    index = torch.full((n_types + 1,), -1, dtype=torch.long)           # type -> row in the count matrix, -1 = not kept
    index[kept] = torch.arange(K)
    rows = index[ids.clamp(max=n_types)]                               # (N,) special ids map to the spare -1 entry
    counts = torch.zeros(K * K, dtype=torch.float64)                   # (K^2,) pair counts, both orders
    for d in range(1, window + 1):
        a, b = rows[:-d], rows[d:]
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        counts += torch.bincount(a * K + b, minlength=K * K)
        counts += torch.bincount(b * K + a, minlength=K * K)
    counts = counts.view(K, K)
    if counts.sum() == 0:
        raise DataError(f"the token stream has no two normal tokens within {window} of each other")
    word = counts.sum(1, keepdim=True) / counts.sum()                  # (K, 1)
    context = counts.sum(0, keepdim=True) ** 0.75                      # (1, K)
    context = context / context.sum()
    pmi = torch.log(counts / counts.sum() / (word * context))          # (K, K); -inf or nan where unseen
    ppmi = torch.nan_to_num(pmi, nan=0.0, neginf=0.0).clamp(min=0).float()
    u, s, _ = torch.svd_lowrank(ppmi, q=min(dim, K), niter=4)          # (K, q), (q,)
    vectors = torch.zeros(n_types, dim)
    vectors[kept, :len(s)] = u * s.sqrt()
    return vectors


Probed = Classifier | BagOfTokens | WordVectors     # what the probe reads features from
View = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]  # stored inputs -> a model batch (augmented
                                                                       # when given a generator)


def roberta_head(dim: int, n_classes: int, dropout: float) -> nn.Module:
    """RoBERTa's sentence head: dropout, dense, tanh, dropout, out."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(dim, n_classes))


def trained(modality: str) -> str:
    """The fix for a missing or unreadable pretraining checkpoint."""
    return f"pass the ckpt.pt of a train.py run (python train.py --modality={modality} writes out-{modality}/ckpt.pt)"


def pretraining_config(ckpt: dict, path: Path, modality: str) -> Config:
    """The train.py settings a checkpoint was trained with; a CheckpointError for a file that holds other ones
    (a fine-tuning run's state.pt or --save file)."""
    unknown = sorted(set(ckpt["config"]) - {f.name for f in fields(Config)})
    if unknown:
        what = ("holds a finetune.py run's settings" if "init_from" in unknown else
                f"holds settings train.py does not have ({', '.join(unknown[:3])})")
        raise CheckpointError(f"{path} {what}, so it is not a pretraining checkpoint: {trained(modality)}")
    return Config(**ckpt["config"])


def pretrained(fc: FinetuneConfig) -> tuple[Config, dict | None]:
    """The pretraining config (architecture and data) and weights of --init_from, read once: `encoder.*` and
    `transformer.*` (plus an official checkpoint's task head, `lm_head.*` or `head.*`); for random weights, the
    preset's config (or --like's checkpoint's) and None."""
    if fc.like:
        if fc.init_from != "random":
            raise ConfigError(f"--like={fc.like} gives random weights a checkpoint's architecture: pass "
                              "--init_from=random with it")
        cfg = pretraining_config(load_checkpoint(Path(fc.like), trained(fc.modality)), Path(fc.like), fc.modality)
        if cfg.modality != fc.modality:
            raise CheckpointError(f"{fc.like} is a {cfg.modality} checkpoint; pass --modality={cfg.modality}")
        return cfg, None
    if fc.init_from in ("random", *REFERENCES):
        if fc.preset not in PRESETS[fc.modality]:
            raise ConfigError(f"unknown --preset={fc.preset} for {fc.modality}: choose one of "
                              f"{', '.join(PRESETS[fc.modality])}")
        return Config(**{**PRESETS[fc.modality][fc.preset], "modality": fc.modality}), None
    if hf.is_hf_source(fc.init_from):
        model = hf.from_pretrained(fc.init_from)
        cfg, state = model.config, model.state_dict()
    else:
        ckpt = load_checkpoint(Path(fc.init_from), trained(fc.modality))
        cfg = pretraining_config(ckpt, Path(fc.init_from), fc.modality)
        # the student's regression head (head.*) serves pretraining only; its Transformer is `student.*` there
        state = {"transformer." + k.removeprefix("student.") if k.startswith("student.") else k: v
                 for k, v in ckpt["model"].items() if not k.startswith("head.")}
    if cfg.modality != fc.modality:
        raise CheckpointError(f"{fc.init_from} is a {cfg.modality} checkpoint; pass --modality={cfg.modality}")
    return cfg, state


def init_student(fc: FinetuneConfig, build: Callable[[], nn.Module],
                 state: dict | None) -> tuple[nn.Module, Transformer]:
    """build() the student (a Data2Vec, or an hf.Pretrained) and load the pretrained feature encoder and
    Transformer, strictly, or keep their random weights. Returns (feature encoder, Transformer)."""
    torch.manual_seed(fc.seed)
    model = build()
    body = nn.ModuleDict(dict(encoder=model.encoder,
                              transformer=model.student if isinstance(model, Data2Vec) else model.transformer))
    if state is not None:
        load_state(body, {k: v for k, v in state.items() if k.startswith(("encoder.", "transformer."))},
                   "encoder and Transformer", Path(fc.init_from))
    return body.encoder, body.transformer


class RunFile:
    """A fine-tuning run's state on disk (--out_dir/state.pt): saved every --ckpt_interval updates, at the last one
    and when Ctrl-C or SIGTERM stops the run; read back by --resume; deleted once the run has reported its result."""

    FREE = ("out_dir", "ckpt_interval", "resume", "log_interval", "device", "save")    # may differ on --resume

    def __init__(self, fc: FinetuneConfig):
        self.fc = fc
        self.path = state_dir(fc) / "state.pt"
        self.saved = None
        self.last_step = None                   # the update of the state on disk
        if not fc.resume:
            if self.path.exists():
                raise ConfigError(f"{self.path} holds the state of a fine-tuning run that did not end (stopped, or "
                                  "still running in another process): pass --resume to continue a stopped one, or "
                                  "choose another --out_dir, or delete it")
            return
        if not self.path.exists():
            raise CheckpointError(f"--resume: no stopped fine-tuning run in {self.path.parent} (no state.pt): run "
                                  "without --resume, or point --out_dir at the stopped run's folder")
        self.saved = load_checkpoint(self.path, "delete it to start afresh, or point --out_dir at another run")
        check_compatible(self.saved, fc, self.path, [f.name for f in fields(fc) if f.name not in self.FREE])

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                generator: torch.Generator) -> dict:
        """Put the saved weights, optimiser, schedule and random streams in place. -> the loop's own fields, {} when
        the run starts afresh"""
        if self.saved is None:
            return {}
        load_state(model, self.saved["model"], "fine-tuned model", self.path)
        opt.load_state_dict(self.saved["optimizer"])
        sched.load_state_dict(self.saved["schedule"])
        set_rng_state(self.saved["rng"])                                # dropout
        generator.set_state(self.saved["generator"])                    # data order, augmentation, masks
        loop = self.saved["loop"]
        self.last_step = loop["step"]
        print(f"resuming {self.path} at update {loop['step']}{changed_settings(self.saved['config'], self.fc)}")
        return loop

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
             generator: torch.Generator, **loop: object) -> None:
        """loop: what the training loop needs to go on from here (its step first)."""
        save_checkpoint(self.path, dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                        schedule=sched.state_dict(), rng=rng_state(), generator=generator.get_state(),
                                        loop=loop, config=asdict(self.fc)))
        self.last_step = loop["step"]

    def stopped(self, step: int, steps: int) -> Interrupted:
        return Interrupted(f"stopped at update {step}/{steps}; state: {self.path}. The same command with --resume "
                           "continues exactly")

    def diverged(self, loss: float, step: int) -> FloatingPointError:
        kept = (f"the last good state {self.path} (update {self.last_step}) is kept" if self.last_step is not None
                else "no state was saved")
        return FloatingPointError(f"the fine-tuning loss is {loss} by update {step}: stopping; {kept}. Lower --lr "
                                  f"(now {self.fc.lr:g}) or check the data")

    def finish(self) -> None:
        """The run has reported its result: delete the state, and the folder when that leaves it empty."""
        self.path.unlink(missing_ok=True)
        if not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def state_dir(fc: FinetuneConfig) -> Path:
    return Path(fc.out_dir or f"out-finetune-{fc.modality}")


@contextmanager
def run_state(fc: FinetuneConfig) -> Iterator[RunFile | None]:
    """Fine-tuning's RunFile, its folder held for the run (train.hold_dir: a second run on it is refused); None for
    the probe, which keeps nothing."""
    if fc.mode != "finetune":
        yield None
        return
    with hold_dir(state_dir(fc), "--out_dir"):
        yield RunFile(fc)


def subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of the examples of each class (at least one each), drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(keep).sort().values


def genre_dir(fc: FinetuneConfig) -> Path:
    """The embedded corpus's prepared folder, whose genre/ holds the default task (prepared here unless --train and
    --test name other files): for a checkpoint pretrained on other text (--data) or an official one."""
    data_dir = text_data_dir(Config())
    if not fc.train:
        prepare_text(None, data_dir)
    return data_dir


def load_task(fc: FinetuneConfig, data_dir: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    if bool(fc.train) != bool(fc.test):
        raise ConfigError("pass both --train and --test (TSV files), or neither for the default genre task")
    train_path = Path(fc.train) if fc.train else data_dir / "genre" / "train.tsv"
    test_path = Path(fc.test) if fc.test else data_dir / "genre" / "test.tsv"
    sentences, labels = read_tsv(train_path)
    counts = Counter(labels)
    once = [label for label, n in counts.items() if n == 1]
    if len(counts) > 10 and 2 * len(once) > len(labels):
        # a label column holding text (columns swapped, or a TSV of another layout): every line its own class
        raise DataError(f"{train_path}: {len(once)} of its {len(labels)} lines have a label no other line has (e.g. "
                        f"{once[0][:40]!r}): is the label in another column? Each line is read as "
                        "`sentence<TAB>label`, the label after the last tab")
    return sentences, labels, *read_tsv(test_path)


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, labels: torch.Tensor,
             batch_size: int) -> float:
    correct = 0
    for i in range(0, len(tokens), batch_size):
        correct += (predict(tokens[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / len(tokens)


def warn_unread(fc: FinetuneConfig, given: Iterable[str]) -> None:
    """One warning naming the settings on the command line (`given`) that the chosen --mode does not read
    (MODE_ONLY): a command line shared by both modes still runs, and a probe given --lr says it ignores it."""
    unread = [f"--{key}" + (f" ({MODE_ONLY[key][1]})" if MODE_ONLY[key][1] else "") for key in MODE_ONLY
              if key in given and MODE_ONLY[key][0] != fc.mode]
    if unread:
        print(f"warning: --mode={fc.mode} does not read {', '.join(unread)}", file=sys.stderr)


def run(fc: FinetuneConfig, given: Iterable[str] = ()) -> dict:
    """The fine-tuning or probe run of fc; given: the settings on the command line (warn_unread)."""
    if not fc.init_from:
        raise ConfigError(f"pass --init_from=<checkpoint> (e.g. out-{fc.modality}/ckpt.pt) or --init_from=random")
    if fc.mode not in ("finetune", "probe"):
        raise ConfigError(f"--mode={fc.mode}: use finetune or probe")
    if fc.modality not in RUNNERS:
        raise ConfigError(f"unknown modality {fc.modality!r}: choose one of {', '.join(RUNNERS)}")
    check_read(fc, ONLY, "fine-tuning")
    if fc.init_from in REFERENCES and (fc.modality, fc.mode) != ("text", "probe"):
        raise ConfigError(f"--init_from={fc.init_from} ({REFERENCES[fc.init_from]}, no encoder) is a reference for the "
                          "text probe: pass --modality=text --mode=probe")
    if fc.resume and fc.mode != "finetune":
        raise ConfigError("--resume continues a stopped fine-tuning run; the probe keeps no state: run it again "
                          "without --resume")
    if fc.probe_layer != -1 and fc.mode != "probe":
        raise ConfigError(f"--probe_layer={fc.probe_layer} chooses what the probe reads: pass --mode=probe")
    if fc.probe_layer != -1 and fc.init_from in REFERENCES:
        raise ConfigError(f"--probe_layer={fc.probe_layer}: --init_from={fc.init_from} has no layers; leave it out")
    check_numbers(fc, COUNTS, LIMITS)
    if fc.max_len < MIN_LEN:
        raise ConfigError(f"--max_len={fc.max_len}: a passage holds <s>, its tokens and </s>: use at least {MIN_LEN}")
    warn_unread(fc, given)
    if fc.save:
        # checked now, not when the run has ended
        if Path(fc.save).is_dir():
            raise ConfigError(f"--save={fc.save} is a folder: name the file to write, e.g. {Path(fc.save) / 'ctc.pt'}")
        make_dir(Path(fc.save).parent, "--save")
    with run_state(fc) as run_file:
        cfg, state = pretrained(fc)
        _, _, device, dtype = setup_system(Config(device=fc.device, dtype=fc.dtype))
        if dtype == torch.float16:
            # fp16 gradients need a GradScaler; these models are small enough for fp32 on a GPU without bf16
            if fc.dtype != "auto":
                raise ConfigError("--dtype=float16: fine-tuning runs in bfloat16 or float32 (pass one, or auto)")
            dtype = torch.float32
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        t0 = time.time()
        result = RUNNERS[fc.modality](fc, cfg, state, device, autocast, run_file)
    result.update(modality=fc.modality, mode=fc.mode, init_from=fc.init_from, seconds=time.time() - t0)
    return result


def run_text(fc: FinetuneConfig, cfg: Config, state: dict | None, device: torch.device,
             autocast: torch.autocast, run_file: RunFile | None) -> dict:
    """Passage classification: default genre task, or --train / --test TSV files."""
    if hf.is_hf_source(fc.init_from):
        # an official checkpoint reads its own tokenizer's ids (RoBERTa's BPE); the default task's TSVs come from
        # preparing the default corpus
        tok = hf.tokenizer(fc.init_from)
        if tok.pad_token_id != hf.TEXT_PAD_ID:
            raise ConfigError(f"{fc.init_from}: the tokenizer pads with id {tok.pad_token_id}, the model with "
                              f"{hf.TEXT_PAD_ID}")
        data_dir = genre_dir(fc)
        encode = lambda texts: tok(texts, max_length=fc.max_len, truncation=True, padding="max_length",
                                   return_tensors="pt")["input_ids"]                       # (N, max_len)
        build = lambda: hf.build(cfg)
    else:
        task = TASKS["text"](cfg, prepare=True)
        data_dir, build = (genre_dir(fc) if cfg.data else task.data_dir), task.build_model
        encode = lambda texts: encode_texts(task.data.enc, texts, fc.max_len, task.data.meta)  # (N, max_len)
    tr_text, tr_label, te_text, te_label = load_task(fc, data_dir)
    if cfg.block_size < fc.max_len:
        raise ConfigError(f"--max_len={fc.max_len} exceeds the encoder's {cfg.block_size} positions")
    classes = sorted(set(tr_label))
    unknown = sorted(set(te_label) - set(classes))
    if unknown:
        raise DataError(f"test labels {unknown[:5]} never occur in the training file")
    y_train = torch.tensor([classes.index(l) for l in tr_label])
    y_test = torch.tensor([classes.index(l) for l in te_label])
    x_train, x_test = encode(tr_text), encode(te_text)                 # (N, T)
    keep = subset(y_train, fc.label_fraction, fc.seed)
    x_train, y_train = x_train[keep], y_train[keep]
    if fc.init_from in REFERENCES:
        torch.manual_seed(fc.seed)                                       # the SVD's and the probe's initial weights
        n_normal = task.data.n_normal
        reference = (BagOfTokens(n_normal) if fc.init_from == "bag" else
                     WordVectors(ppmi_vectors(task.data.data["train"], n_normal, cfg.dim)))
        return fit_and_test(reference, fc, (x_train, y_train), (x_test, y_test), autocast,
                            view=lambda x, g: x.to(device), classes=classes, device=device, run_file=None)
    encoder, transformer = init_student(fc, build, state)
    # fine-tuning: RoBERTa's head on <s>. The probe averages the tokens instead: data2vec regresses targets at masked
    # tokens only, so nothing trains <s>'s output to summarise the passage (measured on the genre task, 100 % of
    # labels: pretrained first token 0.46, mean 0.50; random init 0.47-0.50 either way)
    pool = "mean" if fc.mode == "probe" else "first"
    model = Classifier(encoder, transformer, roberta_head(cfg.dim, len(classes), fc.dropout), pool, fc.probe_layer)
    return fit_and_test(model.to(device), fc, (x_train, y_train), (x_test, y_test), autocast,
                        view=lambda x, g: x.to(device), classes=classes, device=device, run_file=run_file)


def run_vision(fc: FinetuneConfig, cfg: Config, state: dict | None, device: torch.device,
               autocast: torch.autocast, run_file: RunFile | None) -> dict:
    """Image classification on the held-out split of the pretraining images (digits, or train.py's --data folder)."""
    if fc.data:
        cfg = replace(cfg, data=fc.data)
    task = TASKS["vision"](cfg, prepare=True)
    data = task.data
    if data.class_names == [UNLABELLED]:
        raise DataError(f"{cfg.data} holds images without class subfolders, enough to pretrain but not to train a "
                        f"classifier: lay them out as {cfg.data}/<class name>/<image>.png")
    keep = subset(data.labels["train"], fc.label_fraction, fc.seed)
    x_train, y_train = data.images["train"][keep], data.labels["train"][keep]     # (N, C, h, w) uint8, (N,)
    encoder, transformer = init_student(fc, task.build_model, state)
    head = nn.Sequential(nn.LayerNorm(cfg.dim, eps=cfg.ln_eps), nn.Linear(cfg.dim, data.num_classes))
    model = Classifier(encoder, transformer, head, "mean", fc.probe_layer)
    # fine-tuning sees augmented training images (the generator given); the probe and the test, plain ones
    return fit_and_test(model.to(device), fc, (x_train, y_train), (data.images["test"], data.labels["test"]),
                        autocast, view=lambda x, g: data.view(x, g).to(device), classes=data.class_names, device=device,
                        run_file=run_file)


def fit_and_test(model: Probed, fc: FinetuneConfig, train: tuple, test: tuple, autocast: torch.autocast, view: View,
                 classes: list, device: torch.device, run_file: RunFile | None) -> dict:
    """Probe or fine-tune on train = (inputs, labels), report top-1 accuracy on test. view(inputs, generator) turns
    stored inputs into a model batch on the device (augmented when a generator is given). run_file: fine-tuning's
    state on disk (None for the probe)."""
    (x_train, y_train), (x_test, y_test) = train, test
    present = y_train.unique()
    if len(present) < 2:
        # one class: any classifier scores 100 %, which says nothing
        where = fc.train or fc.data or "the training data"
        raise DataError(f"{where}: every training example is of class {classes[int(present[0])]!r}, and a "
                        "classifier needs two classes or more: add examples of another class")
    print(f"{fc.mode} on {len(x_train)} training / {len(x_test)} test examples, {len(classes)} classes "
          f"{classes[:10]}, encoder from {fc.init_from}")
    if fc.mode == "probe":
        acc = probe(model, fc, x_train, y_train.to(device), x_test, y_test.to(device), autocast, view)
    else:
        acc = finetune(model, fc, x_train, y_train.to(device), x_test, y_test.to(device), autocast, view, run_file)
    print(f"test accuracy {acc:.4f} ({fc.mode}, init {fc.init_from}, {len(x_train)} labelled examples)")
    if run_file is not None:
        run_file.finish()
    return dict(accuracy=acc, n_train=len(x_train), n_test=len(x_test))


def probe(model: Probed, fc: FinetuneConfig, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
          y_test: torch.Tensor, autocast: torch.autocast, view: View) -> float:
    """Linear probe: features of the frozen encoder, computed once, standardised, then a logistic regression."""
    model.eval()
    t0 = time.time()
    print(f"features of {len(x_train) + len(x_test)} examples from the frozen encoder ...", end="", flush=True)
    with torch.no_grad(), autocast:        # --batch_size examples at a time, so a lower one needs less memory
        f_train, f_test = (torch.cat([model.features(view(b, None)).float() for b in x.split(fc.batch_size)])
                           for x in (x_train, x_test))                      # (N, D) each
    print(f" {f_train.shape[1]} each, in {time.time() - t0:.0f}s")
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6                 # (D,), f_train: (N, D)
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    linear = nn.Linear(f_train.shape[1], int(y_train.max()) + 1).to(f_train.device)
    opt = torch.optim.AdamW(linear.parameters(), lr=fc.probe_lr, weight_decay=fc.weight_decay)
    g = torch.Generator().manual_seed(fc.seed)
    t0 = time.time()
    for epoch in range(fc.probe_epochs):
        total = torch.zeros((), device=f_train.device)               # summed on the device, read when printed
        for idx in torch.randperm(len(f_train), generator=g).split(fc.batch_size * 8):
            loss = F.cross_entropy(linear(f_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        if (epoch + 1) % max(1, fc.probe_epochs // 4) == 0 or epoch + 1 == fc.probe_epochs:
            print(f"probe epoch {epoch + 1}/{fc.probe_epochs} | train loss {total.item() / len(f_train):.4f} | "
                  f"{time.time() - t0:.0f}s")
    return accuracy(linear, f_test, y_test, 1024)


def layer_groups(model: Classifier, fc: FinetuneConfig) -> list[dict]:
    """Optimizer groups for layer-wise lr decay (BEiT): the head, final LayerNorm and shared relative position bias
    train at lr, block i of L at lr x decay^(L - i), the encoder (embeddings, CLS and mask tokens) at decay^(L + 1)."""
    L = len(model.transformer.blocks)

    def depth(name: str) -> int:
        if name.startswith("encoder."):
            return 0
        if name.startswith("transformer.blocks."):
            return int(name.split(".")[2]) + 1
        return L + 1

    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        groups.setdefault(fc.layer_decay ** (L + 1 - depth(name)), []).append(p)
    return [dict(params=params, lr=fc.lr * scale) for scale, params in groups.items()]


def finetune(model: Classifier, fc: FinetuneConfig, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
             y_test: torch.Tensor, autocast: torch.autocast, view: View, run_file: RunFile) -> float:
    """All weights train: AdamW, linear warmup then linear decay, accuracy after each epoch. Saves its state to
    run_file (and stops when Ctrl-C or SIGTERM asks), and goes on from it when resumed."""
    opt = torch.optim.AdamW(layer_groups(model, fc), lr=fc.lr, weight_decay=fc.weight_decay, betas=(0.9, 0.98), eps=1e-6)
    steps = fc.epochs * math.ceil(len(x_train) / fc.batch_size)
    warm = max(1, int(fc.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(fc.seed)
    loop = run_file.restore(model, opt, sched, g)
    step, acc = loop.get("step", 0), 0.0

    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(view(x, None))

    with stop_requests(announce=True) as stop_requested:
        for epoch in range(loop.get("epoch", 0), fc.epochs):
            model.train()
            t0 = time.time()
            # a resumed epoch goes on with its own order from where it stopped
            order, start, total = ((loop["order"], loop["done"], loop["total"]) if loop.get("epoch") == epoch else
                                   (torch.randperm(len(x_train), generator=g), 0, 0.0))
            batches = order.split(fc.batch_size)
            for done in range(start + 1, len(batches) + 1):                # done: batches of this epoch trained
                idx = batches[done - 1]
                with autocast:
                    loss = F.cross_entropy(model(view(x_train[idx], g)).float(), y_train[idx],
                                           label_smoothing=fc.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                total += loss.detach() * len(idx)
                stop = step < steps and stop_requested()
                logged = step % fc.log_interval == 0 and done < len(batches)
                saved = stop or step % fc.ckpt_interval == 0 or step == steps
                if logged or saved or done == len(batches):     # the loss is read only here: no sync per update
                    loss_sum = float(total)
                    if not math.isfinite(loss_sum):
                        raise run_file.diverged(loss_sum, step)
                if logged:
                    print(f"update {step}/{steps} | train loss {loss_sum / (done * fc.batch_size):.4f} so far this "
                          f"epoch | lr {max(sched.get_last_lr()):.2e} | {time.time() - t0:.0f}s")
                if saved:
                    run_file.save(model, opt, sched, g, step=step, epoch=epoch, order=order, done=done, total=loss_sum)
                if stop:
                    raise run_file.stopped(step, steps)
            model.eval()
            acc = accuracy(predict, x_test, y_test, 128)
            print(f"epoch {epoch + 1}/{fc.epochs} | train loss {total / len(x_train):.4f} | test accuracy {acc:.4f} | "
                  f"{time.time() - t0:.0f}s")
    return acc


class CTCModel(nn.Module):
    """Pretrained speech encoder + Transformer + a letter classifier per frame, trained with CTC (SPEC §3).
    `lm_head` is Hugging Face's name for it (Data2VecAudioForCTC)."""

    def __init__(self, encoder: nn.Module, transformer: Transformer, n_letters: int):
        super().__init__()
        self.encoder, self.transformer = encoder, transformer
        self.lm_head = nn.Linear(transformer.cfg.dim, n_letters)
        # the conv feature encoder stays as pretrained (fairseq's feature_grad_mult 0, HF's freeze_feature_encoder)
        self.encoder.feature_extractor.requires_grad_(False)

    def forward(self, waves: torch.Tensor, padding_mask: torch.Tensor, mask: torch.Tensor | None = None,
                frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """waves, padding_mask: (B, S); mask: (B, T) frames for the mask embedding, or None; frozen: no gradient
        into the encoder and Transformer (only lm_head learns). Returns logits (B, T, letters) and the frame
        padding mask (B, T)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x, pad = self.encoder.embed(waves, padding_mask)              # (B, T, C)
            if mask is not None:
                x = self.encoder.apply_mask(x, mask)
            h, _ = self.transformer(self.encoder(x, pad), pad)           # (B, T, C)
        return self.lm_head(h), pad


def speech_batch(b: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A speech_data.Batch's waveforms (B, S) and sample-level padding mask (B, S), on device."""
    return b.waves.to(device), b.padding_mask().to(device)


@torch.no_grad()
def transcribe(model: CTCModel, data: SpeechData, batch_size: int, device: torch.device,
               autocast: torch.autocast) -> tuple[float, float]:
    """Greedy CTC decoding of every utterance of `data`; returns (CER, WER) against its transcripts."""
    model.eval()
    refs, hyps = [], []
    for b in data.iterate(batch_size):
        waves, padding_mask = speech_batch(b, device)
        with autocast:
            logits, pad = model(waves, padding_mask)                       # (B, T, V)
        hyps += greedy_decode(logits.float().cpu(), (~pad).sum(1).cpu())
        refs += [ids_to_text(t[:n].tolist()) for t, n in zip(b.targets, b.target_lengths)]
    model.train()
    return cer(refs, hyps), wer(refs, hyps)


def run_speech(fc: FinetuneConfig, cfg: Config, state: dict | None, device: torch.device,
               autocast: torch.autocast, run_file: RunFile | None) -> dict:
    """CTC speech recognition (SPEC §3): default espeak-ng corpus (test voices never heard in training), or
    --train / --test manifests with `.ltr` transcripts. --budget_minutes limits the labelled training audio."""
    if fc.mode != "finetune":
        raise ConfigError("speech has --mode=finetune only (CTC)")
    if bool(fc.train) != bool(fc.test):
        raise ConfigError("pass both --train and --test (manifests with .ltr transcripts), or neither for the default")
    if not fc.train:
        prepare_speech(CORPUS_DIR)
    train_set = SpeechData(Path(fc.train) if fc.train else CORPUS_DIR / "train.tsv", fc.max_samples, targets=True)
    # every test utterance counts, however long: --max_samples bounds the training batches only
    test_set = SpeechData(Path(fc.test) if fc.test else CORPUS_DIR / "test.tsv", sys.maxsize, targets=True)
    if fc.budget_minutes > 0:
        if fc.budget_minutes >= train_set.minutes:
            print(f"--budget_minutes={fc.budget_minutes:g}: the training set holds {train_set.minutes:.1f} min, all "
                  "of which is used")
        train_set = train_set.subset(fc.budget_minutes, torch.Generator().manual_seed(fc.seed))
    encoder, transformer = init_student(fc, lambda: speech_model(cfg), state)   # needs no pretraining data
    model = CTCModel(encoder, transformer, len(VOCAB))
    if state is not None and "lm_head.weight" in state:
        # an official CTC checkpoint (-960h): its letters are ctc.VOCAB, so its head carries on
        load_state(model.lm_head, {k.removeprefix("lm_head."): v for k, v in state.items() if k.startswith("lm_head.")},
                   "CTC head", Path(fc.init_from))
    model.to(device)
    steps = fc.epochs * math.ceil(len(train_set) / fc.batch_size)
    frozen_steps = round(fc.freeze * steps)
    print(f"CTC fine-tuning on {len(train_set)} utterances ({train_set.minutes:.1f} min) for {steps} updates "
          f"(the first {frozen_steps} train the head only), {len(test_set)} test utterances, "
          f"encoder from {fc.init_from}")

    opt = torch.optim.AdamW(layer_groups(model, fc), lr=fc.lr, weight_decay=fc.weight_decay, betas=(0.9, 0.98), eps=1e-6)
    # tri-stage (SPEC §3): 10 % warmup, 40 % hold, 50 % linear decay to 5 % of the peak (fairseq's final_lr_scale)
    schedule = Config(max_iters=steps, lr=fc.lr, min_lr=0.05 * fc.lr, warmup=0.1, hold=0.4, schedule="tri")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, schedule) / fc.lr)
    g = torch.Generator().manual_seed(fc.seed)
    loop = run_file.restore(model, opt, sched, g)
    # the loss sums since the last log line; the seconds count the run's earlier parts too
    total, n, t0 = loop.get("total", 0.0), loop.get("n", 0), time.time() - loop.get("seconds", 0.0)
    with stop_requests(announce=True) as stop_requested:
        for step in range(loop.get("step", 0), steps):
            b = train_set.batch(fc.batch_size, g)
            waves, padding_mask = speech_batch(b, device)
            frames = model.encoder.frame_lengths(b.lengths)                                      # (B,)
            T = int(model.encoder.frame_lengths(torch.tensor([waves.shape[1]])))
            # masking stays on while fine-tuning (SPEC §3), with the pretraining span length
            mask = span_mask(frames, T, prob=fc.mask_prob, span=cfg.mask_span, generator=g).to(device)  # (B, T)
            with autocast:
                logits, _ = model(waves, padding_mask, mask, frozen=step < frozen_steps)          # (B, T, V)
            log_probs = logits.float().log_softmax(-1).transpose(0, 1)                           # (T, B, V)
            loss = F.ctc_loss(log_probs, b.targets.to(device), frames.to(device), b.target_lengths.to(device),
                              blank=BLANK, zero_infinity=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if not math.isfinite(loss_value := loss.item()):
                raise run_file.diverged(loss_value, step + 1)
            total, n = total + loss_value, n + 1
            if (step + 1) % fc.log_interval == 0 or step + 1 == steps:
                print(f"step {step + 1}/{steps} | ctc loss {total / n:.4f} | lr {lr_at(step, schedule):.2e} | "
                      f"{time.time() - t0:.0f}s")
                total, n = 0.0, 0
            stop = step + 1 < steps and stop_requested()
            if stop or (step + 1) % fc.ckpt_interval == 0 or step + 1 == steps:
                run_file.save(model, opt, sched, g, step=step + 1, total=total, n=n, seconds=time.time() - t0)
            if stop:
                raise run_file.stopped(step + 1, steps)
    char_err, word_err = transcribe(model, test_set, fc.batch_size, device, autocast)
    if fc.save:
        # what transcribe.py needs: the weights, the architecture and the letters the head's rows stand for
        try:
            save_checkpoint(Path(fc.save), dict(model=model.state_dict(), config=asdict(cfg), vocab=VOCAB))
        except CheckpointError as e:            # the run's state at its last update is still on disk
            raise CheckpointError(f"{e}. The trained model is kept in {run_file.path}: the same command with --resume "
                                  "writes --save without training again") from None
        print(f"CTC checkpoint: {fc.save}")
    print(f"test CER {char_err:.4f} | WER {word_err:.4f} (init {fc.init_from}, {train_set.minutes:.1f} min of labelled "
          f"audio, {len(test_set)} utterances of {fc.test or 'held-out voices'})")
    run_file.finish()
    return dict(cer=char_err, wer=word_err, n_train=len(train_set), train_minutes=train_set.minutes,
                n_test=len(test_set))


RUNNERS = {"text": run_text, "vision": run_vision, "speech": run_speech}

# Where each number must lie (train.check_numbers): the counts, and the other numbers' ranges
COUNTS = ("max_len", "epochs", "batch_size", "probe_epochs", "max_samples", "log_interval", "ckpt_interval")
LIMITS = {
    **dict.fromkeys(("lr", "probe_lr"), ABOVE_0),
    **dict.fromkeys(("label_fraction", "layer_decay"), ABOVE_0_TO_1),
    **dict.fromkeys(("warmup", "mask_prob", "freeze"), IN_0_1),
    **dict.fromkeys(("label_smoothing", "dropout"), BELOW_1),
    **dict.fromkeys(("weight_decay", "budget_minutes"), AT_LEAST_0),
}

# The settings only some modalities read: (those that read it, what the others do instead); run() refuses one given
# to another modality (train.check_read)
ONLY = {
    "data": ("vision", "text and speech read --train and --test"),
    **dict.fromkeys(("train", "test"), ("text speech", "vision reads --data (or the pretraining run's --data)")),
    "max_len": ("text", ""),
    "dropout": ("text", "it is the dropout of text's classification head"),
    "label_fraction": ("text vision", "speech limits its labels with --budget_minutes"),
    "warmup": ("text vision", "speech's lr schedule is tri-stage, 10 / 40 / 50 % (SPEC §3)"),
    "label_smoothing": ("text vision", "speech trains with CTC"),
    **dict.fromkeys(("probe_lr", "probe_epochs", "probe_layer"), ("text vision", "speech has no probe")),
    **dict.fromkeys(("budget_minutes", "max_samples", "mask_prob", "freeze"), ("speech", "")),
    "save": ("speech", "text and vision report their accuracy and keep no model"),
}

# The settings only one --mode reads: (that mode, what the other reads instead); warn_unread names them in the other.
# Both read --batch_size and --weight_decay; the probe writes nothing into --out_dir; --probe_layer elsewhere is an error.
MODE_ONLY = {
    "lr": ("finetune", "the probe's is --probe_lr"),
    "epochs": ("finetune", "the probe's are --probe_epochs"),
    **dict.fromkeys(("warmup", "layer_decay", "label_smoothing", "ckpt_interval", "log_interval"), ("finetune", "")),
    "dropout": ("finetune", "the probe's linear classifier has none"),
    "probe_lr": ("probe", "fine-tuning's is --lr"),
    "probe_epochs": ("probe", "fine-tuning's are --epochs"),
}

# Per-modality defaults, applied before the command line (as train.py's presets). Vision: BEiT's fine-tuning recipe
# (layer decay 0.65, label smoothing 0.1, wd 0.05, SPEC §3) at an lr, batch and length for the small digits model
# (with 10 % of the labels, 143 images, 180 updates).
DEFAULTS = {
    "vision": dict(lr=3e-3, epochs=20, batch_size=16, layer_decay=0.65, label_smoothing=0.1, weight_decay=0.05),
    # speech: CTC for the small model's scale (SPEC §3: 3e-5 for 100 h at base size); 60 epochs of 10 min of labels
    # = 1,620 updates: at 540 both inits can still sit on the all-blank plateau (README, speech)
    "speech": dict(lr=1e-3, epochs=60, batch_size=8),
}


def parse_config(argv: list[str]) -> FinetuneConfig:
    overrides = parse_overrides(FinetuneConfig, argv)
    if overrides.get("resume"):
        overrides = with_saved_settings(state_dir(FinetuneConfig(**overrides)) / "state.pt", FinetuneConfig, overrides)
    modality = overrides.get("modality", FinetuneConfig.modality)
    return FinetuneConfig(**{**DEFAULTS.get(modality, {}), **overrides})


def main(argv: list[str]) -> int:
    try:
        asked, argv = split_help(argv)
        if asked:
            print(usage(__doc__, parse_config(argv)))
            return 0
        run(parse_config(argv), given=parse_overrides(FinetuneConfig, argv))
    except (ConfigError, CheckpointError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if (what := out_of_memory(e)) is None:
            raise
        print(f"error: {what}: lower --batch_size", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130                              # the shell's code for a run stopped by Ctrl-C
    except KeyboardInterrupt:
        print("interrupted: quit at once; a fine-tuning run keeps its last saved state (--resume), a probe nothing",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
