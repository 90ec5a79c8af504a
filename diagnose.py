"""Is a pretraining run learning content, or only where each step sits? Checks on a train.py checkpoint.

    python diagnose.py --ckpt=out-speech/ckpt.pt
    python diagnose.py --ckpt=out-text/ckpt.pt --batches=8

position_similarity: the teacher's targets for held-out inputs and for content-free inputs of the same shape
(white noise for speech and images, uniformly random tokens for text), compared step by step (mean cosine).
Near 1, the targets say where a step is and nothing about what is there: a collapse that target_var does not see,
because position still varies across the steps. The student then predicts them from positions alone (a held-out
loss far below the first evaluations is the sign) and learns nothing a downstream task can use.

context_gain and order_gain (text): what the student reads from the words it can see. context_gain is the held-out
loss when the student sees none of the passage's words (every normal token shown as <mask>, so only positions and
<s> / </s> remain) over the loss on intact passages; near 1, the visible words tell it nothing about the masked
ones. A passage of masks is an input the student never trained on, so the ratio also counts its surprise at that
and bounds what the words are worth from above. order_gain is the loss with each passage's words shuffled over the
loss on intact passages; near 1, it reads the words as a bag, without their order (the teacher sees the shuffled
passage too). A student can use the bag of words, for instance the passage's topic, and still have an order_gain
of 1.

A masked-LM checkpoint (train.py --objective=mlm, mlm.py) has no teacher targets: only the text checks apply, plus
the entropy of the training split's token frequencies, the held-out cross-entropy a model that ignores its
context can reach.

feature rank: how many directions the examples spread over, layer by layer. Each held-out example's features are
averaged over its real steps (the pooled vector a linear probe reads), at the Transformer's input (the feature
encoder's output) and after every block, for the checkpoint and for the model the run started from; the effective
rank of the examples' pooled vectors is exp(entropy of the variance shares of their principal components): d for d
equally spread directions, 1 when the examples differ along one line only. Far below its initialisation, the
pretrained model has gathered the differences between inputs into a few directions. It says how the variance is
spread, not what the weaker directions still hold (a standardised linear probe reads those too), and it cannot exceed
the number of examples less one (batches x batch size - 1).

nearest tokens (text, --words): for a few words, the token types whose embedding rows lie closest (cosine), in the
checkpoint and in word vectors counted from the training split's co-occurrences (finetune.ppmi_vectors): the
counted ones group words by topic and use (king: King, Henry, crown, England), an untrained table at random; the
students measured so far that read their neighbours group words that fill the same slot in a sentence (king:
master, liege; FINDINGS.md).

embedding norms (text): the mean L2 norm of the token rows (normal tokens) and of the position rows a full passage
reads, in the checkpoint and in the model the run started from (the same config and seed, freshly initialised).
The teacher reads the student's embeddings (shared, SPEC §2), so positions that grow while tokens stay put move
the teacher's input, and its targets, towards position.

embedding gradients (text): the median magnitude, per coordinate, of the gradient of the held-out loss (per masked
token, as train.py normalises it, before clipping) on the token rows a batch holds and on the position rows of a full
passage, in the checkpoint and at initialisation. The masked steps read `<mask>` plus their own position row, so a
position row gets the gradient of its step directly, a token row only through the attention of the steps that read it
(in a masked-LM run also through the output scores, which read the tied token embedding).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F

from data2vec import Data2Vec, EMATeacher
from encoders import TextEncoder
from finetune import mean_pool, ppmi_vectors
from text_data import DataError
from train import (TASKS, CheckpointError, Config, ConfigError, load_checkpoint, load_state, parse_overrides,
                   split_help, usage)


@dataclass
class DiagnoseConfig:
    ckpt: str = ""              # a train.py checkpoint (out-<modality>/ckpt.pt)
    batches: int = 4            # held-out batches to average over
    seed: int = 0
    words: str = "king,lord,death,the,thou"  # text: list these words' nearest token types ('' = skip)


def content_free(source: torch.Tensor, modality: str, padding: torch.Tensor | None, special: torch.Tensor | None,
                 n_normal: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs of source's shape that carry no content: unit noise (speech (B, S), zero where padding is True;
    images (B, C, H, W)), or random normal tokens (text (B, T)) with the special tokens kept where they were."""
    if modality == "text":
        tokens = torch.randint(n_normal, source.shape, generator=generator)                 # (B, T)
        return torch.where(special, source, tokens)
    noise = torch.randn(source.shape, generator=generator)
    return noise.masked_fill(padding, 0.0) if padding is not None else noise


def shuffle_tokens(tokens: torch.Tensor, special: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row's normal tokens in a random order; special tokens stay in place. tokens, special: (B, T)."""
    out = tokens.clone()
    for row, keep in zip(out, special):
        idx = (~keep).nonzero().squeeze(1)                                                  # (n,)
        row[idx] = row[idx[torch.randperm(len(idx), generator=generator)]]
    return out


def passage_rows(table: torch.Tensor, block_size: int) -> torch.Tensor:
    """The rows of a position table (or of its gradient) that a full passage reads: 2 .. block_size + 1, RoBERTa's
    offset (encoders.TextEncoder). -> (block_size, C)"""
    return table[2:block_size + 2]


def embedding_norms(encoder: TextEncoder, n_normal: int, block_size: int) -> tuple[float, float | None]:
    """-> mean L2 norm of the normal tokens' embedding rows, of the position rows a full passage reads (passage_rows;
    None for an encoder without them, --positions=relative)."""
    tokens = encoder.tokens.weight[:n_normal]                                              # (n_normal, C)
    if encoder.positions is None:
        return tokens.norm(dim=1).mean().item(), None
    positions = passage_rows(encoder.positions.weight, block_size)                         # (block_size, C)
    return tokens.norm(dim=1).mean().item(), positions.norm(dim=1).mean().item()


def embedding_gradients(model: Data2Vec, teacher: EMATeacher, source: torch.Tensor, mask: torch.Tensor,
                        student_source: torch.Tensor, n_normal: int, block_size: int) -> tuple[float, float | None]:
    """-> the median |gradient| per coordinate of the loss per masked token (source, student_source: (B, T) ids; mask:
    (B, T) bool) on the embedding rows of the normal tokens in student_source, and on the position rows 2 ..
    block_size + 1 (passage_rows; None for an encoder without them). The model's gradients are left cleared."""
    encoder = model.encoder
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss, _, _ = model(source, mask, teacher, student_source=student_source)
        (loss / mask.sum()).backward()
    held = student_source.unique()
    held = held[held < n_normal]                                                            # (n_held,)
    median = lambda g: float(np.median(g.abs().cpu().numpy()))
    token = median(encoder.tokens.weight.grad[held])                                        # over (n_held, C)
    position = None
    if encoder.positions is not None:
        position = median(passage_rows(encoder.positions.weight.grad, block_size))
    model.zero_grad(set_to_none=True)
    return token, position


def frequency_entropy(stream: np.ndarray, n_normal: int) -> float:
    """Entropy in nats of the frequencies of the normal tokens (ids below n_normal) in a token stream."""
    counts = np.bincount(stream[stream < n_normal], minlength=n_normal).astype(np.float64)        # (n_normal,)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nearest_tokens(table: torch.Tensor, query: int, k: int) -> list[int]:
    """The k rows of an embedding table (n, C) closest to row `query` by cosine, after centring the table (its mean
    row would make every pair look alike), the query itself left out."""
    rows = F.normalize(table.float() - table.float().mean(0), dim=1)                       # (n, C)
    sims = rows @ rows[query]                                                               # (n,)
    sims[query] = -float("inf")
    return sims.topk(k).indices.tolist()


def word_list(words: str) -> list[str]:
    """The words of a comma-separated --words value."""
    return [w.strip() for w in words.split(",") if w.strip()]


def word_neighbours(words: str, enc: tiktoken.Encoding, tables: dict[str, torch.Tensor],
                    k: int = 5) -> dict[str, dict[str, list[str]]]:
    """{word: {table name: its k nearest token types}} for each comma-separated word that is one token of `enc` (as
    it appears mid-sentence, after a space); other words are left out."""
    result = {}
    for word in word_list(words):
        ids = enc.encode_ordinary(" " + word)
        if len(ids) == 1:
            result[word] = {name: [enc.decode([i]) for i in nearest_tokens(t, ids[0], k)] for name, t in tables.items()}
    return result


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy of the variance shares of the principal components) of features (N, C), N examples."""
    centred = features.double() - features.double().mean(0)                               # (N, C)
    var = torch.linalg.svdvals(centred) ** 2                                                # (min(N, C),)
    share = var[var > var.sum() * 1e-12] / var.sum()
    return float(torch.exp(-(share * share.log()).sum()))


def pooled_layers(model: Data2Vec, source: torch.Tensor, padding_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each example's mean over its real steps (a prefix such as CLS left out) of the Transformer's input and of
    every block's output -> 1 + n_layer tensors (B, C)."""
    x, pad = model.embed(source, padding_mask)                                              # (B, T, C), (B, T') or None
    h = model.encoder(x, pad)                                                               # (B, T', C)
    _, blocks = model.student(h, pad, target_layer="block")                                 # n_layer x (B, T', C)
    prefix = model.encoder.n_prefix
    steps_pad = None if pad is None else pad[:, prefix:]                                   # (B, T) or None
    return [mean_pool(layer, steps_pad, prefix) for layer in (h, *blocks)]                  # (B, C) each


@torch.no_grad()
def diagnose(dc: DiagnoseConfig) -> dict[str, float | int | list[float] | dict]:
    """The checks over dc.batches held-out batches -> position_similarity (not for a masked-LM run), and for text
    loss_intact, loss_shuffled, loss_blank (per masked token, every masked token shown as <mask>; for loss_blank
    every normal token), context_gain = loss_blank / loss_intact, order_gain = loss_shuffled / loss_intact, the
    embedding norms token_norm, position_norm (checkpoint) and token_norm_init, position_norm_init, the embedding
    gradients token_grad, position_grad and token_grad_init, position_grad_init (median over batches), and for a
    masked-LM run frequency_entropy, and with dc.words neighbours (word_neighbours of the checkpoint's token
    embeddings and of counted word vectors); for every modality feature_rank and feature_rank_init (effective rank
    of the pooled features per layer, the Transformer's input first) and examples (how many they pool)."""
    if not dc.ckpt:
        raise ConfigError("pass --ckpt=<a train.py checkpoint>, e.g. --ckpt=out-speech/ckpt.pt")
    if dc.batches < 1:
        raise ConfigError(f"--batches={dc.batches}: needs at least 1")
    path = Path(dc.ckpt)
    ckpt = load_checkpoint(path, "pass the ckpt.pt of a train.py run, e.g. --ckpt=out-text/ckpt.pt")
    if "teacher" not in ckpt:
        raise CheckpointError(f"{path} holds no EMA teacher, so it is not a pretraining checkpoint (it looks like "
                              "finetune.py's --save, a fine-tuned model): pass the ckpt.pt of a train.py run")
    cfg = Config(**ckpt["config"])
    task = TASKS[cfg.modality](cfg, prepare=True)
    model = task.build_model()
    load_state(model, ckpt["model"], "student", path)
    teacher = EMATeacher(model.student, cfg.tau_0, cfg.tau_e, cfg.tau_n)
    load_state(teacher.model, ckpt["teacher"], "teacher", path)
    model.eval()
    with torch.random.fork_rng():                         # train.py's initial weights, without reseeding the caller
        torch.manual_seed(cfg.seed)
        initial = task.build_model().eval()
    initial_teacher = EMATeacher(initial.student, cfg.tau_0, cfg.tau_e, cfg.tau_n)
    g = torch.Generator().manual_seed(dc.seed)
    text = cfg.modality == "text"
    targets_too = cfg.objective != "mlm"                  # a masked-LM run has no teacher targets to compare
    sims, losses, pooled = [], {"intact": [], "shuffled": [], "blank": []}, {"": [], "_init": []}
    grads = {"": [], "_init": []}                                     # per batch: (token rows, position rows)
    for _ in range(dc.batches):
        b = task.batch("val", g)
        special = task.data.special(b["source"]) if text else None                        # (B, T)
        n_normal = task.data.n_normal if text else 0
        pad = b.get("padding_mask")
        for suffix, m in (("", model), ("_init", initial)):
            pooled[suffix].append(pooled_layers(m, b["source"], pad))
        if targets_too:
            targets = []
            for source in (b["source"], content_free(b["source"], cfg.modality, pad, special, n_normal, g)):
                x, frame_pad = model.embed(source, pad)                                   # (B, T, C), (B, T')
                targets.append(model.teacher_targets(teacher, x, frame_pad))              # (B, T', C)
            real = torch.ones(targets[0].shape[:2], dtype=torch.bool) if frame_pad is None else ~frame_pad  # (B, T')
            sims.append(F.cosine_similarity(targets[0], targets[1], dim=-1)[real].mean().item())  # (B, T')[real]
        if text:
            shuffled = shuffle_tokens(b["source"], special, g)                                # (B, T)
            for name, source, hidden in (("intact", b["source"], b["mask"]), ("shuffled", shuffled, b["mask"]),
                                         ("blank", b["source"], ~special)):
                student = source.masked_fill(hidden, task.data.mask_id)                       # (B, T)
                loss, _, _ = model(source, b["mask"], teacher, student_source=student)
                losses[name].append(loss.item() / b["mask"].sum().item())
            student = b["source"].masked_fill(b["mask"], task.data.mask_id)                  # (B, T)
            for suffix, m, t in (("", model, teacher), ("_init", initial, initial_teacher)):
                grads[suffix].append(embedding_gradients(m, t, b["source"], b["mask"], student, n_normal,
                                                         cfg.block_size))
    result = {"position_similarity": sum(sims) / len(sims)} if targets_too else {}
    for suffix, per_batch in pooled.items():
        layers = [torch.cat(layer) for layer in zip(*per_batch)]                            # (1 + n_layer) x (N, C)
        result[f"feature_rank{suffix}"] = [effective_rank(f) for f in layers]
    result["examples"] = len(layers[0])
    if text:
        intact, shuffled, blank = (sum(losses[k]) / len(losses[k]) for k in ("intact", "shuffled", "blank"))
        result.update(loss_intact=intact, loss_shuffled=shuffled, loss_blank=blank, context_gain=blank / intact,
                      order_gain=shuffled / intact)
        for suffix, encoder in (("", model.encoder), ("_init", initial.encoder)):
            token, position = embedding_norms(encoder, task.data.n_normal, cfg.block_size)
            result.update({f"token_norm{suffix}": token, f"position_norm{suffix}": position})
        for suffix, per_batch in grads.items():
            token, position = zip(*per_batch)
            result[f"token_grad{suffix}"] = float(np.median(token))
            result[f"position_grad{suffix}"] = None if position[0] is None else float(np.median(position))
        if dc.words:
            n_normal = task.data.n_normal
            with torch.random.fork_rng():                         # the randomised SVD, without reseeding the caller
                torch.manual_seed(dc.seed)
                counted = ppmi_vectors(task.data.data["train"], n_normal, cfg.dim)           # (n_normal, C)
            tables = {"checkpoint": model.encoder.tokens.weight[:n_normal], "counted": counted}
            result["neighbours"] = word_neighbours(dc.words, task.data.enc, tables)
        if not targets_too:
            result["frequency_entropy"] = frequency_entropy(np.asarray(task.data.data["train"]), task.data.n_normal)
    return result


def main(argv: list[str]) -> int:
    try:
        asked, argv = split_help(argv)
        dc = DiagnoseConfig(**parse_overrides(DiagnoseConfig, argv))
        if asked:
            print(usage(__doc__, dc))
            return 0
        result = diagnose(dc)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "position_similarity" in result:
        print(f"{dc.ckpt}: targets of real vs content-free inputs, mean cosine per step: "
              f"{result['position_similarity']:.3f} (near 1: the targets encode position, not content)")
    else:
        print(f"{dc.ckpt}: a masked-LM run (mlm.py), no teacher targets to compare; a model that ignores its "
              f"context reaches the entropy of the token frequencies, {result['frequency_entropy']:.3f} nats")
    if "context_gain" in result:
        print(f"held-out loss per masked token: intact {result['loss_intact']:.3f}; every word hidden "
              f"{result['loss_blank']:.3f}, ratio {result['context_gain']:.3f} (near 1: the visible words tell the "
              f"student nothing); words shuffled {result['loss_shuffled']:.3f}, ratio {result['order_gain']:.3f} "
              "(near 1: it ignores their order)")
        positions = ("none (relative positions)" if result["position_norm"] is None else
                     f"{result['position_norm_init']:.3f} -> {result['position_norm']:.3f}")
        print(f"embedding norms, mean per row: tokens {result['token_norm_init']:.3f} at initialisation -> "
              f"{result['token_norm']:.3f}, positions {positions}")
        position_grads = ("none" if result["position_grad"] is None else
                          f"{result['position_grad_init']:.1e} -> {result['position_grad']:.1e}")
        print(f"embedding gradients, median per coordinate: tokens {result['token_grad_init']:.1e} at initialisation "
              f"-> {result['token_grad']:.1e}, positions {position_grads} (positions far above tokens: the loss "
              "reaches the position rows directly, the token rows only through context)")
    for word, lists in result.get("neighbours", {}).items():
        print(f"nearest token types to {word!r}: in the checkpoint's embeddings {lists['checkpoint']}; in word "
              f"vectors counted on the training split (finetune.ppmi_vectors) {lists['counted']}")
    left_out = [w for w in word_list(dc.words) if "neighbours" in result and w not in result["neighbours"]]
    if left_out:
        print(f"--words left out, not one token of this vocabulary (as a word after a space): {', '.join(left_out)}")
    rank = lambda key: " / ".join(f"{r:.1f}" for r in result[key])
    print(f"pooled features of {result['examples']} held-out examples, effective rank at the Transformer's input, then "
          f"after each block: {rank('feature_rank')} (at initialisation: {rank('feature_rank_init')}; far below it: "
          "the differences between inputs gather in a few directions)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
