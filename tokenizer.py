"""Byte-level BPE (GPT-2 / RoBERTa style) as a tiktoken.Encoding, trainable offline.

A vocabulary is `mergeable_ranks`: {token bytes: rank}. Ranks 0-255 are the single bytes; every later rank is a
merge, and its bytes are the concatenation of the two merged tokens. tiktoken encodes a pre-token by merging, again
and again, the adjacent pair whose concatenation has the lowest rank, so "rank = merge order" is all a trainer must
produce. The four special tokens <s>, <pad>, </s>, <mask> always take the ids right after the last rank.

Two vocabularies: GPT-2's 50,256 ranks (RoBERTa's, SPEC §2), used when tiktoken already has its files cached (we
never download silently), or a BPE trained here on the corpus (`bpe-<vocab_size>.tiktoken`). GPT-2's own special
<|endoftext|> (id 50256) is dropped, so with GPT-2 the specials are 50256..50259 and the vocabulary has 50,260 ids.
"""

import base64
import hashlib
import heapq
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import regex  # installed with tiktoken; unlike `re` it knows \p{L} and \p{N}
import tiktoken

# GPT-2's pre-tokeniser, in tiktoken's faster but equivalent form (tiktoken_ext/openai_public.py, r50k_pat_str)
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<mask>")
KINDS = ("auto", "gpt2", "bpe")
N_BYTES = 256       # a byte-level BPE's first ranks: one per byte, so every text encodes
# Training counts a longer pre-token as pieces of this many bytes. Every merge walks each word that holds its pair, so a
# text without spaces or punctuation, one pre-token of 600 KB, had not finished after 3 minutes (in pieces: 15 s). The
# default corpus's longest pre-token has 63 bytes, so its BPE is the same; tiktoken still encodes a long one whole.
MAX_PIECE = 64
GPT2_FILES = (  # what tiktoken downloads for "gpt2"; it caches each under sha1(url)
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


class TokenizerUnavailable(Exception):
    """The requested vocabulary cannot be had (GPT-2's files are not cached and cannot be downloaded)."""


def _merge(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b), left to right, by `new`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Learn up to `vocab_size` byte-level BPE ranks (256 bytes + merges) from `text`.

    Works on the distinct pre-tokens with their counts, longer ones cut into MAX_PIECE-byte pieces. Pair counts are
    kept up to date incrementally: a merge only touches the words that contain the pair (found through a pair -> words
    index), and a max-heap with lazy deletion finds the most frequent pair (ties: the smaller pair of ids). No recount
    per merge, so 8k merges take seconds.
    """
    if vocab_size < N_BYTES:
        raise ValueError(f"vocab_size must be at least {N_BYTES} (the byte tokens), got {vocab_size}")
    pieces: Counter[bytes] = Counter()
    pre_tokens = Counter(m.group() for m in regex.finditer(PAT_STR, text))    # no list of every word of the text
    for w, count in pre_tokens.items():
        b = w.encode("utf-8")
        for i in range(0, len(b), MAX_PIECE):
            pieces[b[i:i + MAX_PIECE]] += count
    words = [list(p) for p in pieces]  # each distinct pre-token (or piece of a long one) as a list of token ids
    freqs = list(pieces.values())
    token_bytes = [bytes([i]) for i in range(N_BYTES)]
    ranks = {t: i for i, t in enumerate(token_bytes)}

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that contain (or once contained) it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size and heap:
        neg_count, (a, b) = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -neg_count:
            continue  # stale entry: the count changed and a fresh entry was pushed
        merged = token_bytes[a] + token_bytes[b]
        if merged in ranks:  # the same bytes were already made from another split: reuse that id, spend no rank
            new = ranks[merged]
        else:
            new = ranks[merged] = len(token_bytes)
            token_bytes.append(merged)
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop((a, b)):
            old = words[i]
            w = words[i] = _merge(old, a, b, new)
            if len(w) == len(old):
                continue  # stale index entry
            for pair in zip(old, old[1:]):
                delta[pair] -= freqs[i]
            for pair in zip(w, w[1:]):
                delta[pair] += freqs[i]
                where[pair].add(i)
        for pair, d in delta.items():
            if d:
                pair_counts[pair] += d
                if pair_counts[pair] > 0:
                    heapq.heappush(heap, (-pair_counts[pair], pair))
                else:
                    del pair_counts[pair]
    return ranks


def save_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """Write tiktoken's file format (base64 token, space, rank; one per line), atomically."""
    lines = b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(lines)
    except BaseException:                       # a full disk, Ctrl-C: no partial file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken-format file. Not tiktoken.load.load_tiktoken_bpe: that caches local files too, by path
    (sha1 of the path in data-gym-cache), so it would keep returning the old ranks after a file is retrained."""
    ranks = {}
    for i, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:                  # binascii.Error is one too
                raise ValueError(f"{path}:{i} is not a line `<base64 token> <rank>`") from None
    return ranks


def make_encoding(name: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """A tiktoken.Encoding with our four special tokens appended after the ranks."""
    n = len(ranks)
    specials = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def special_ids(enc: tiktoken.Encoding) -> dict[str, int]:
    """{"bos": <s>, "pad": <pad>, "eos": </s>, "mask": <mask>} ids."""
    return {key: enc.encode_single_token(tok) for key, tok in zip(("bos", "pad", "eos", "mask"), SPECIAL_TOKENS)}


def n_normal(enc: tiktoken.Encoding) -> int:
    """Number of ordinary (non-special) ids: they are 0 .. n_normal-1."""
    return enc.n_vocab - len(SPECIAL_TOKENS)


def _tiktoken_cache_dir() -> str:
    """Where tiktoken caches downloads (same rule as tiktoken/load.py); "" means caching is off."""
    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default))


def gpt2_cached() -> bool:
    """True when tiktoken can build GPT-2's vocabulary without the network."""
    cache = _tiktoken_cache_dir()
    keys = [hashlib.sha1(url.encode()).hexdigest() for url in GPT2_FILES]
    return bool(cache) and all(os.path.exists(os.path.join(cache, key)) for key in keys)


def _gpt2_ranks() -> dict[bytes, int]:
    from tiktoken_ext.openai_public import gpt2  # tiktoken's own recipe: cached files, checked against their hashes

    try:
        return gpt2()["mergeable_ranks"]
    except Exception as e:
        raise TokenizerUnavailable(
            f"GPT-2's BPE files are not in tiktoken's cache ({_tiktoken_cache_dir() or 'caching off'}) and could not "
            f"be downloaded ({type(e).__name__}); use tokenizer=bpe to train one offline, or run "
            f"`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once with internet access"
        ) from None


def get_encoding(
    data_dir: Path, corpus: str | Callable[[], str], vocab_size: int = 8192, kind: str = "auto"
) -> tiktoken.Encoding:
    """The tokenizer for `data_dir`, loaded from `<data_dir>/<name>.tiktoken` or made and saved there.

    kind: "gpt2" (GPT-2's ranks; tries tiktoken's download when they are not cached), "bpe" (train `vocab_size`
    ranks on `corpus`, a string or a function returning one, called only when training), "auto" (gpt2 when its
    files are already cached, else bpe). The Encoding's name is "gpt2" or "bpe-<vocab_size>".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    if kind == "auto":
        kind = "gpt2" if gpt2_cached() else "bpe"
    name = "gpt2" if kind == "gpt2" else f"bpe-{vocab_size}"
    path = Path(data_dir) / f"{name}.tiktoken"
    if path.exists():
        return make_encoding(name, load_ranks(path))
    if kind == "gpt2":
        ranks = _gpt2_ranks()
    else:
        text = corpus() if callable(corpus) else corpus
        print(f"tokenizer: training a {vocab_size}-type BPE on {len(text) / 1e6:.1f}M chars...", end="", flush=True)
        t0 = time.time()
        ranks = train_bpe(text, vocab_size)
        print(f" {len(ranks)} types in {time.time() - t0:.1f}s -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ranks(ranks, path)
    return make_encoding(name, ranks)
