"""The paper's ablations (data2vec §5) at CPU scale, on three tasks. tests/test_ablations.py asserts the ones that
show at this scale.

    python ablations.py                                 # every setting, seeds 0-2 -> a markdown table
    python ablations.py --settings=ffn,attn --seeds=1   # some of them
    python ablations.py --settings=recipe,local --iters=600   # longer runs
    python ablations.py --task=hmm --settings=recipe,k1,local   # the hidden Markov task
    python ablations.py --task=topic --settings=recipe,local    # the topic task
    python ablations.py --jobs=1                        # one run after another (default: side by side, one per core)

The setting `untrained` (in the default list) gives the same probe on an untrained encoder of the same layout: the
baseline that pretraining has to beat.

digits: tiny vision pretraining runs on the embedded digits, each scored by a linear probe on the held-out digits.
Each run is the small vision recipe shortened to 200 updates of 32 images (~45 s on one core), with the layer scale
off: at 200 updates BEiT's 1e-4 layer scale keeps every block of the teacher close to the identity, so block, FFN
and attention outputs all reduce to the patch embedding and no target variant can differ from another.

hmm: sequences where context decides the answer. A hidden Markov chain of 32 states (each state's successor a fixed
permutation, 10 % random jumps) emits token state // 2, so a token names its state only up to a pair and the state
is read from the neighbours. A 4-block student (the text recipe's targets: FFN outputs, layer norm, Smooth L1 beta 4;
RoBERTa embeddings, BERT masking) pretrains 600 updates of 32 sequences of 32 tokens (~25 s on 2 threads); a linear
probe then reads the hidden state from its final output on intact sequences. The recipe averages all K = 4 blocks.

topic: sequences where the context that decides the answer is the whole sequence. Each sequence draws one of 8
topics, then its 32 tokens independently from that topic's distribution over 32 types, so one token says little
about the topic. The same student and recipe pretrain 1,200 updates (~60 s on one thread); the probe reads the
topic from the final output at every interior step.
"""

import contextlib
import io
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

import finetune
from data2vec import Data2Vec, EMATeacher, TargetConfig, collapse_stat
from encoders import TextEncoder
from masking import bert_mask
from train import PRESETS, Config, ConfigError, load_checkpoint, parse_overrides, split_help, train, usage
from transformer import TransformerConfig

TINY = dict(PRESETS["vision"]["small"], modality="vision", max_iters=200, batch_size=32, log_interval=10,
            eval_interval=10**6, ckpt_interval=10**6, eval_iters=2, layer_scale=0.0)

# name -> (what it is, train.py overrides; for the hmm and topic tasks, TargetConfig overrides; iters: the setting's
# own number of updates)
RECIPES = {"digits": "block outputs, top K = 2 of 4 blocks (the vision recipe)",
           "hmm": "FFN outputs, top K = 4 of 4 blocks (the text recipe's targets)",
           "topic": "FFN outputs, top K = 4 of 4 blocks (the text recipe's targets)"}
SETTINGS: dict[str, tuple[str, dict]] = {
    "recipe": ("the task's recipe", {}),
    "k1": ("top K = 1", dict(top_k=1)),
    "k4": ("top K = 4", dict(top_k=4)),
    "ffn": ("FFN outputs", dict(target_layer="ffn")),
    "attn": ("self-attention outputs", dict(target_layer="attn")),
    "local": ("the teacher sees only the step itself (a patch, a token)", dict(teacher_context=1)),
    "local3": ("the teacher sees a window of 3 steps (3 tokens, 3 x 3 patches)", dict(teacher_context=3)),
    "raw": ("no target normalisation", dict(target_norm="none", final_norm="none")),
    "untrained": ("no pretraining: the untrained encoder, the baseline", dict(iters=0)),
}


@dataclass
class AblationConfig:
    task: str = "digits"                   # digits | hmm | topic
    settings: str = ",".join(SETTINGS)   # comma-separated names of SETTINGS
    seeds: int = 3
    iters: int = 0                         # updates per pretraining run; 0 = the task's (digits 200, hmm 600,
                                           # topic 1200)
    jobs: int = 0                          # runs side by side, one torch thread each; 0 = one per core (digits
                                           # on a GPU: 1), 1 = one after another on all threads (the same
                                           # numbers either way)


def pretrain(out: Path, **overrides: object) -> dict:
    """Pretrain TINY with the overrides into out -> {path: the checkpoint, history: its log (target_var per line)}."""
    with contextlib.redirect_stdout(io.StringIO()):
        ckpt = train(Config(**{**TINY, **overrides, "out_dir": str(out)}))
    return dict(path=ckpt, history=load_checkpoint(ckpt)["history"])


def probe_accuracy(ckpt: Path, seed: int = 0, untrained: bool = False) -> float:
    """Linear-probe accuracy of the checkpoint's encoder on the held-out digits, all training labels; untrained: of
    a random encoder of the checkpoint's layout instead."""
    source = dict(init_from="random", like=str(ckpt)) if untrained else dict(init_from=str(ckpt))
    with contextlib.redirect_stdout(io.StringIO()):
        fc = finetune.FinetuneConfig(modality="vision", mode="probe", seed=seed, **source)
        return finetune.run(fc)["accuracy"]


def digits_run(out: Path, seed: int, iters: int = TINY["max_iters"], **overrides: object) -> dict:
    """The digits task: pretrain TINY into out, then probe -> probe accuracy, min target_var. iters = 0: the probe
    on an untrained encoder of the same layout (finetune.py's --init_from=random --like=<a one-update run>)."""
    ckpt = pretrain(out, seed=seed, max_iters=max(iters, 1), **overrides)
    if iters == 0:
        return dict(accuracy=probe_accuracy(ckpt["path"], seed, untrained=True), min_target_var=float("nan"))
    return dict(accuracy=probe_accuracy(ckpt["path"], seed), min_target_var=min(ckpt["history"]["target_var"]))


# ---- running independent runs side by side ---------------------------------------------------------------------------

T = TypeVar("T")


def in_parallel(calls: Sequence[Callable[[], T]], jobs: int = 0) -> Iterator[T]:
    """The results of calls, in order, each as soon as it and the calls before it are done. The calls must pickle
    (module-level functions, or functools.partial of them) and seed their own randomness, as every run here does.
    They run in jobs worker processes (0: one per core this process may use), one torch thread each: the tiny models
    here use a second thread poorly (on 2 cores two topic_runs side by side take 65 s, one after the other at two
    threads 96 s), and the results are the same. One job, or one call, runs here, one after another. The workers are
    spawned, not forked, so none inherits this process's thread pools or random state."""
    workers = min(len(calls), jobs or cores())
    if workers <= 1:
        yield from (call() for call in calls)
        return
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=start_worker, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(call): i for i, call in enumerate(calls)}
        results, next_i = {}, 0
        for f in as_completed(futures):
            results[futures[f]] = f.result()                # a failed run raises here, whichever it is
            while next_i in results:
                yield results.pop(next_i)
                next_i += 1
    except BaseException:               # a run failed, Ctrl-C, or the caller stopped reading: end the runs still going
        for worker in set(multiprocessing.active_children()) - before:
            worker.kill()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def start_worker(parent: int) -> None:
    """A worker's set-up: one torch thread; a process group of its own, so that Ctrl-C at the terminal reaches only
    the parent, which ends the workers; and a watch on the parent, so that a worker whose parent was killed ends too
    instead of waiting for runs forever."""
    torch.set_num_threads(1)
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()


def exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:                 # an orphan's parent becomes another process
        time.sleep(1)
    os._exit(1)


def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """call() and the seconds it took, measured where it runs."""
    t0 = time.time()
    return call(), time.time() - t0


# ---- the sequence tasks: hidden Markov and topic (and the pieces tests/test_context.py shares) ----------------------

N_STATES, SEQ_LEN, BATCH, HMM_ITERS = 32, 32, 32, 600
N_TOPICS, N_WORDS, TOPIC_ITERS = 8, 32, 1200
HMM_TARGETS = dict(top_k=4, target_layer="ffn", target_norm="layer", final_norm="none", loss_beta=4.0, loss_scale=False)


def markov_chain(successor: torch.Tensor, n: int, length: int, g: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """(n, length) ids: each is successor[previous], or with probability noise a uniformly random one."""
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(len(successor), (n,), generator=g)
    for i in range(1, length):
        jump = torch.rand(n, generator=g) < noise
        ids[:, i] = torch.where(jump, torch.randint(len(successor), (n,), generator=g), successor[ids[:, i - 1]])
    return ids


def sequence_student(n_types: int, seq_len: int, n_layer: int, targets: TargetConfig,
                     positions: str = "absolute") -> Data2Vec:
    """A width-64 text student over ids 0 .. n_types - 1, with <pad> = n_types and <mask> = n_types + 1; positions as
    train.py's --positions (absolute: RoBERTa's learned rows; relative: a 1D bias in attention)."""
    relative = positions == "relative"
    return Data2Vec(TextEncoder(n_types + 2, 64, seq_len, n_types, dropout=0.1, positions=not relative),
                    TransformerConfig(n_layer=n_layer, dim=64, n_head=4, ffn_dim=256, dropout=0.1, attn_dropout=0.1,
                                      rel_pos_len=seq_len if relative else 0),
                    targets, head_hidden=True)


def masked_loss(model: Data2Vec, teacher: EMATeacher, tokens: torch.Tensor,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-mask tokens (B, T) with g -> (loss per masked step, the targets (N, C))."""
    n_types = model.encoder.pad_id
    corrupted, mask = bert_mask(tokens, mask_id=n_types + 1, n_normal=n_types,
                                special=torch.zeros_like(tokens, dtype=torch.bool), generator=g)
    loss, _, y = model(tokens, mask, teacher, student_source=corrupted)
    return loss / mask.sum(), y


def pretrain_sequences(model: Data2Vec, sample: Callable[[], torch.Tensor], iters: int, lr: float, g: torch.Generator,
                       tau: tuple[float, float] = (0.99, 0.999)) -> tuple[EMATeacher, list[float]]:
    """iters updates of the text recipe's optimiser on batches sample(), the teacher's tau rising from tau[0] to
    tau[1] over them (the small text preset's default; the paper's: 0.999, 0.9999) -> (teacher, target_var per
    update)."""
    teacher = EMATeacher(model.student, *tau, max(iters, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    target_var = []
    for step in range(iters):
        loss, y = masked_loss(model, teacher, sample(), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(model.student, step)
        target_var.append(collapse_stat(y))
    return teacher, target_var


def linear_probe(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                 l2: float = 1e-3) -> float:
    """Multinomial logistic regression on standardised features, fitted to convergence (L-BFGS) -> test accuracy."""
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    w = torch.zeros(f_train.shape[1], int(y_train.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(f_train @ w + b, y_train) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((f_test @ w + b).argmax(-1) == y_test).float().mean().item()


Draw = Callable[[int], tuple[torch.Tensor, torch.Tensor]]   # n -> (tokens (n, SEQ_LEN), labels (n, SEQ_LEN))


def sequence_run(seed: int, iters: int, lr: float, n_types: int, draw: Draw, g: torch.Generator,
                 overrides: dict) -> dict:
    """Pretrain the 4-block student on a sequence task with HMM_TARGETS updated by overrides (TargetConfig fields),
    then probe each interior step's label from its final output on intact sequences. draw(n) -> (tokens
    (n, SEQ_LEN), labels (n, SEQ_LEN)) takes its randomness from g, as do the masks. -> probe accuracy, min
    target_var (iters = 0: the untrained student)."""
    unknown = set(overrides) - set(TargetConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"the sequence tasks sweep only target settings, not {', '.join(sorted(unknown))}")
    torch.manual_seed(seed)
    model = sequence_student(n_types, SEQ_LEN, n_layer=4, targets=TargetConfig(**{**HMM_TARGETS, **overrides}))
    _, target_var = pretrain_sequences(model, lambda: draw(BATCH)[0], iters, lr, g)
    model.eval()
    features = []
    with torch.no_grad():
        for n in (2000, 1000):                                                           # probe train, test
            tokens, labels = draw(n)                                                     # (n, T), (n, T)
            x, pad_mask = model.encoder.embed(tokens)                                    # (n, T, C)
            h, _ = model.student(model.encoder(x, pad_mask), pad_mask)                   # (n, T, C)
            # the first and last steps have one neighbour only: (n * (T - 2), C) features, (n * (T - 2),) labels
            features += [h[:, 1:-1].reshape(-1, h.shape[-1]), labels[:, 1:-1].reshape(-1)]
    return dict(accuracy=linear_probe(*features), min_target_var=min(target_var, default=float("nan")))


def hmm_run(seed: int, iters: int = HMM_ITERS, lr: float = 2e-3, **overrides: object) -> dict:
    """The hidden Markov task: the label of a step is its hidden state; its token, state // 2, names the state up to
    a pair, so the neighbours decide."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(N_STATES, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        states = markov_chain(successor, n, SEQ_LEN, g)                                  # (n, T)
        return states // 2, states

    return sequence_run(seed, iters, lr, N_STATES // 2, draw, g, overrides)


def topic_run(seed: int, iters: int = TOPIC_ITERS, lr: float = 2e-3, **overrides: object) -> dict:
    """The topic task: the label of every step is its sequence's topic. Each of N_TOPICS topics has its own
    distribution over N_WORDS token types (softmax of N(0, 1) logits); a sequence draws a topic, then each of its
    tokens independently, so one token says little about the topic and the whole sequence a lot."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(N_TOPICS, N_WORDS, generator=g).softmax(-1)                     # (topics, types)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        topic = torch.randint(N_TOPICS, (n,), generator=g)                               # (n,)
        tokens = torch.multinomial(probs[topic], SEQ_LEN, replacement=True, generator=g)  # (n, T)
        return tokens, topic[:, None].expand(n, SEQ_LEN)

    return sequence_run(seed, iters, lr, N_WORDS, draw, g, overrides)


def default_jobs(task: str) -> int:
    """One run per core; the digits runs train on the GPU where there is one (train.py's --device=auto), where
    side by side they would only share it, so there one after another."""
    return 1 if task == "digits" and torch.cuda.is_available() else cores()


def is_the_recipe(task: str, setting: str) -> bool:
    """A setting that changes nothing on this task (k4 and ffn on hmm and topic, whose recipe they are)."""
    recipe = TINY if task == "digits" else HMM_TARGETS
    return setting != "recipe" and all(recipe.get(k) == v for k, v in SETTINGS[setting][1].items())


def task_run(task: str, setting: str, seed: int, iters: int, tmp: Path) -> dict:
    """One run of the task with the named setting (digits: its checkpoint under tmp) -> probe accuracy, min
    target_var."""
    overrides = dict(SETTINGS[setting][1])
    iters = overrides.pop("iters", iters)
    if task == "digits":
        return digits_run(tmp / f"{setting}{seed}", seed, iters, **overrides)
    return (hmm_run if task == "hmm" else topic_run)(seed, iters, **overrides)


def main(argv: list[str]) -> int:
    try:
        asked, argv = split_help(argv)
        ac = AblationConfig(**parse_overrides(AblationConfig, argv))
        if asked:
            print(usage(__doc__, ac))
            return 0
        names = ac.settings.split(",")
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}: choose from {', '.join(SETTINGS)}")
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError(f"--settings names {twice[0]!r} more than once: name each setting once")
        if ac.task not in RECIPES:
            raise ConfigError(f"unknown task {ac.task!r}: choose from {', '.join(RECIPES)}")
        if same := [n for n in names if is_the_recipe(ac.task, n)]:
            names = [n for n in names if n not in same]
            if not names:
                raise ConfigError(f"{', '.join(same)}: the {ac.task} task's recipe itself ({RECIPES[ac.task]}); "
                                  "name another setting, or recipe")
            print(f"{', '.join(same)}: the {ac.task} task's recipe itself, so not run again")
        if ac.iters < 0 or ac.seeds < 1 or ac.jobs < 0:
            raise ConfigError("--iters, --seeds and --jobs take a positive number (--iters=0: the task's default; "
                              "--jobs=0: one per core)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    iters = ac.iters or {"digits": TINY["max_iters"], "hmm": HMM_ITERS, "topic": TOPIC_ITERS}[ac.task]
    runs = [(seed, name) for seed in range(ac.seeds) for name in names]
    jobs = min(len(runs), ac.jobs or default_jobs(ac.task))
    print(f"{len(runs)} {ac.task} runs of {iters} updates, " +
          ("one after another" if jobs == 1 else f"{jobs} side by side, one thread each"), flush=True)
    rows = {n: [] for n in names}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            calls = [partial(timed, partial(task_run, ac.task, name, seed, iters, Path(tmp))) for seed, name in runs]
            for (seed, name), (run, seconds) in zip(runs, in_parallel(calls, jobs)):
                rows[name].append(run["accuracy"])
                tvar = run["min_target_var"]                           # nan: no update, no target
                trained = "" if math.isnan(tvar) else f", min target_var {tvar:.3f}"
                print(f"{name:9s} seed {seed}: probe {run['accuracy']:.3f}{trained} ({seconds:.0f} s)", flush=True)
    except KeyboardInterrupt:
        print("interrupted: the runs finished so far are above; none is kept", file=sys.stderr)
        return 130
    print(f"\n| {ac.task}, {iters} updates | " + " | ".join(f"seed {s}" for s in range(ac.seeds)) + " |")
    print("|---|" + "---|" * ac.seeds)
    for name in names:
        what = RECIPES[ac.task] if name == "recipe" else SETTINGS[name][0]
        print(f"| {what} | " + " | ".join(f"{a:.3f}" for a in rows[name]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
