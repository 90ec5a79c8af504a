"""Letters and CTC: the letter vocabulary, greedy CTC decoding and error rates for speech recognition.

Transcripts use fairseq's `.ltr` format: upper-case letters separated by spaces, `|` ending every word
("HELLO WORLD" -> "H E L L O | W O R L D |"). The vocabulary is the 32-entry `vocab.json` of the official
Hugging Face CTC checkpoints (facebook/data2vec-audio-base-960h, facebook/wav2vec2-base-960h), in the same order,
so their `lm_head` rows line up with our ids. The CTC blank is id 0 (`<pad>` in Hugging Face's tokenizer).
"""

import re

import torch
from torch import Tensor

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]
BLANK, UNK = 0, 3
LETTER_ID = {symbol: i for i, symbol in enumerate(VOCAB)}


def normalize_text(text: str) -> str:
    """Upper-case words of letters and apostrophes, single spaces: "O'er the hill-top!" -> "O'ER THE HILL TOP"."""
    return " ".join(re.sub(r"[^A-Z']+", " ", text.upper()).split())


def text_to_ltr(text: str) -> str:
    """"hello world" -> "H E L L O | W O R L D |" (fairseq's libri_labels.py layout)."""
    return " ".join(" ".join(word) + " |" for word in normalize_text(text).split())


def ltr_to_text(ltr: str) -> str:
    """"H E L L O | W O R L D |" -> "HELLO WORLD"."""
    return " ".join("".join(ltr.split()).replace("|", " ").split())


def encode_ltr(ltr: str) -> list[int]:
    """Letter ids of an `.ltr` line; symbols outside the vocabulary become <unk>."""
    return [LETTER_ID.get(symbol, UNK) for symbol in ltr.split()]


def ids_to_text(ids: list[int]) -> str:
    """Letter ids -> words, dropping the special symbols (blank, <s>, </s>, <unk>): a target back to its transcript."""
    return ltr_to_text(" ".join(VOCAB[i] for i in ids if i > UNK))


def greedy_decode(logits: Tensor, lengths: Tensor | None = None) -> list[str]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks, `|` -> space.

    logits: (T, V) or (B, T, V); lengths: (B,) long, the real frames per row (default: all T).
    A letter repeated in the transcript survives only when the model put a blank between the two copies.
    Returns one string of words per row.
    """
    if logits.dim() == 2:
        logits = logits[None]                                                 # (1, T, V)
    B, T, _ = logits.shape
    best = logits.argmax(-1)                                                  # (B, T)
    lengths = torch.full((B,), T) if lengths is None else lengths
    texts = []
    for b in range(B):
        runs = best[b, : lengths[b]].unique_consecutive()                    # (runs,) one id per run of frames
        texts.append(ids_to_text(runs[runs != BLANK].tolist()))
    return texts


def edit_distance(a: str | list, b: str | list) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) between two sequences."""
    row = list(range(len(b) + 1))                                             # distances from a[:0] to b[:j]
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def cer(refs: list[str], hyps: list[str]) -> float:
    """Character error rate over a corpus: total edit distance / total reference characters (spaces included)."""
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / max(sum(len(r) for r in refs), 1)


def wer(refs: list[str], hyps: list[str]) -> float:
    """Word error rate over a corpus: total word-level edit distance / total reference words."""
    errors = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True))
    return errors / max(sum(len(r.split()) for r in refs), 1)
