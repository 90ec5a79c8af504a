"""Text data: a token stream for pretraining and a labelled passage task for fine-tuning.

`prepare_text` turns a corpus into `out_dir/`: the tokenizer file, `train.bin` / `val.bin` (flat token ids, nanoGPT
style, read back with np.memmap) and `meta.json`, written last so that a crash never leaves a dir that looks ready.
meta.json records each file's size, and a dir whose files no longer have them (cut short by a full disk or a copy) is
prepared again.
The default corpus is the embedded Shakespeare (data/shakespeare.tar.xz: 37 plays, 5 poem collections). Its
fine-tuning task is the First Folio genre of a 100-word passage (comedy / history / tragedy), split by play into
`out_dir/genre/{train,test}.tsv`; the test plays are also the pretraining val split, so pretraining never sees them.

`TextPretrainData` draws random blocks `<s> ... </s>`; `read_tsv` + `encode_texts` feed any GLUE-style TSV task.

The data helpers every modality shares live here too: DataError, the lock `one_at_a_time`, `write_atomic`,
`prepared_meta` / `write_meta` (a prepared folder's meta.json with its files' sizes) and `write_error`.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tiktoken
import torch

from tokenizer import TokenizerUnavailable, get_encoding, load_ranks, make_encoding, n_normal, special_ids

try:
    import fcntl                # POSIX: one process at a time prepares a data folder
except ImportError:             # Windows: no such guard
    fcntl = None

CORPUS = Path(__file__).parent / "data" / "shakespeare.tar.xz"
FORMAT = 2  # bump when the prepared layout changes: older dirs then re-prepare
VAL_FRACTION = 0.05  # user corpora: the last 5 % of the token stream is val
PASSAGE_WORDS = 100
MIN_LEN = 3  # the shortest sequence: <s>, one token, </s>

# Genre of each play as the First Folio (1623) groups them. Troilus and Cressida, printed between the histories
# and the tragedies, counts as a tragedy (its Folio title is "The Tragedie of Troylus and Cressida"); so does
# Cymbeline, which the Folio prints last among the tragedies. Pericles is not in the Folio: a late romance, like
# The Winter's Tale and The Tempest, so a comedy. The poems have no genre.
GENRE = {
    "alls_well_that_ends_well": "comedy", "as_you_like_it": "comedy", "comedy_of_errors": "comedy",
    "loves_labours_lost": "comedy", "measure_for_measure": "comedy", "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy", "midsummer_nights_dream": "comedy", "much_ado_about_nothing": "comedy",
    "pericles": "comedy", "taming_of_the_shrew": "comedy", "tempest": "comedy", "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy", "winters_tale": "comedy",
    "henry_iv_part_1": "history", "henry_iv_part_2": "history", "henry_v": "history", "henry_vi_part_1": "history",
    "henry_vi_part_2": "history", "henry_vi_part_3": "history", "henry_viii": "history", "john": "history",
    "richard_ii": "history", "richard_iii": "history",
    "antony_and_cleopatra": "tragedy", "coriolanus": "tragedy", "cymbeline": "tragedy", "hamlet": "tragedy",
    "julius_caesar": "tragedy", "lear": "tragedy", "macbeth": "tragedy", "othello": "tragedy",
    "romeo_and_juliet": "tragedy", "timon_of_athens": "tragedy", "titus_andronicus": "tragedy",
    "troilus_and_cressida": "tragedy",
}
TEST_PLAYS = ("midsummer_nights_dream", "twelfth_night", "henry_v", "richard_iii", "hamlet", "macbeth")


class DataError(Exception):
    """A problem with the user's data or paths, explained in one line (train.py prints it without a traceback)."""


@contextmanager
def one_at_a_time(lock_file: Path, what: str) -> Iterator[None]:
    """Hold the OS's lock on `lock_file` (flock; the empty file is created and stays) while inside: a second process
    that prepares the same data meanwhile (two runs started at once on a fresh clone) waits for the first and then
    finds them ready, instead of deleting its half-written files. The lock ends with the process however it ends;
    where the file system has none, there is no guard."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that is {what} ...", flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def free_mib(path: Path) -> float:
    """MiB free on the disk that holds path, or would hold it: the nearest folder of it that exists."""
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free / 2 ** 20


def write_error(e: OSError, out_dir: Path, source: Path | None = None) -> DataError:
    """What to tell the user when prepared data cannot be written to out_dir (a full disk, a quota, a read-only
    folder). source: the user's data they are prepared from, beside it; None: the project's own data/ folder."""
    reason = e.strerror or str(e)
    if full := e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):   # no quotas on Windows
        reason += f"; {free_mib(out_dir):,.0f} MiB free there"
    room = "a disk with room" if full else "a folder you can write to"
    fix = f"clone the project to {room}" if source is None else \
        f"copy {source} to {room}: its prepared data are written beside it"
    if full:
        fix = f"free some space there, or {fix}"
    return DataError(f"could not write the prepared data in {out_dir} ({reason}): {fix}")


def _source_files(source: Path | None) -> tuple[Path, list[Path]]:
    """(root, files): the folder the names are relative to, and the source files in sorted order."""
    if source is None:
        return CORPUS.parent, [CORPUS]
    source = Path(source)
    if not source.exists():
        raise DataError(f"text source {source} does not exist: pass a .txt file or a folder of .txt files")
    if source.is_file():
        return source.parent, [source]
    files = sorted(f for f in source.rglob("*.txt") if not f.is_dir())      # rglob looks inside a folder x.txt
    if not files:
        raise DataError(f"no .txt files under {source}: put UTF-8 text files named *.txt there")
    return source, files


def _fingerprint(root: Path, files: list[Path]) -> str:
    """Hash of the source files' names and bytes."""
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(f"{f.relative_to(root)}\0{f.stat().st_size}\0".encode())
            h.update(f.read_bytes())
        except OSError as e:                    # a link to nothing, no permission
            raise DataError(f"cannot read {f} ({e.strerror}): fix it or move it out of {root}") from None
    return h.hexdigest()[:16]


def _decode(raw: bytes, name: str) -> str:
    text = raw.decode("utf-8", errors="replace")
    n_bad = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))  # "ignore" drops exactly the bad bytes
    if n_bad:
        print(f"warning: {name}: {n_bad} bytes are not valid UTF-8 and were replaced by U+FFFD; re-save it as UTF-8",
              file=sys.stderr)
    return text


def _read_docs(source: Path | None, root: Path, files: list[Path]) -> dict[str, str]:
    """{name: text} of the non-empty texts; the embedded corpus names each text by its file stem ("hamlet")."""
    if source is None:
        with tarfile.open(CORPUS) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".txt")), key=lambda m: m.name)
            return {Path(m.name).stem: tar.extractfile(m).read().decode("utf-8") for m in members}
    docs = {str(f.relative_to(root)): _decode(f.read_bytes(), str(f)) for f in files}
    docs = {name: text for name, text in docs.items() if text.strip()}
    if not docs:
        what = f"{source} is empty" if source.is_file() else f"every .txt file in {source} is empty"
        raise DataError(f"{what}: pass a text with some words in it")
    return docs


def genre_passages(docs: dict[str, str], words: int = PASSAGE_WORDS) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(passage, genre)], "test": [...]}: consecutive `words`-word passages of every play, from its first
    "ACT" heading on (skips the cast list), whitespace collapsed; the plays in TEST_PLAYS go to "test"."""
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for name, text in docs.items():
        if name not in GENRE:
            continue
        act = re.search(r"^act\b", text, re.IGNORECASE | re.MULTILINE)
        w = text[act.start() if act else 0:].split()
        split = "test" if name in TEST_PLAYS else "train"
        rows[split] += [(" ".join(w[i:i + words]), GENRE[name]) for i in range(0, len(w) - words + 1, words)]
    return rows


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it: a crash, a full disk or Ctrl-C never leaves a
    partial `path`, and only a hard kill leaves the temporary file."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
    except BaseException:                       # a full disk, Ctrl-C: no partial file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    write_atomic(path, "".join(f"{s}\t{label}\n" for s, label in [("sentence", "label"), *rows]).encode("utf-8"))


def read_tsv(path: Path) -> tuple[list[str], list[str]]:
    """(sentences, labels) of a GLUE-style `sentence<TAB>label` file such as SST-2's train.tsv / dev.tsv.
    The header line `sentence\\tlabel` is optional; blank lines are skipped; the label follows the last tab.
    Another header (`text<TAB>label`) would read as an example of a class of its own: a first line whose label no
    other line has, where other labels repeat, is taken for a header and skipped with a warning."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder: pass a TSV file of lines `sentence<TAB>label`")
    if not path.is_file():
        raise DataError(f"TSV file {path} does not exist: expected lines `sentence<TAB>label`")
    try:
        text = path.read_text(encoding="utf-8-sig")                     # -sig: a spreadsheet's byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    sentences, labels, first = [], [], 0       # first: the line number of the first example
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (i == 1 and line.strip().lower() == "sentence\tlabel"):
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{i}: no tab in this line; expected `sentence<TAB>label`")
        sentence, label = line.rsplit("\t", 1)
        sentences.append(sentence)
        labels.append(label.strip())
        first = first or i
    counts = Counter(labels)
    if first == 1 and counts[labels[0]] == 1 and max(counts.values()) > 1:
        print(f"warning: {path}:1 is taken for a header and skipped: its label {labels[0]!r} is on no other line",
              file=sys.stderr)
        sentences, labels = sentences[1:], labels[1:]
    if not sentences:
        raise DataError(f"{path} has no `sentence<TAB>label` lines")
    return sentences, labels


def load_prepared(out_dir: Path) -> tuple[dict, tiktoken.Encoding]:
    """(meta, tokenizer) of a prepared dir."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").exists():
        raise DataError(f"{out_dir} is not a prepared text dir (no meta.json): run prepare_text first")
    meta = json.loads((out_dir / "meta.json").read_text())
    tok_file = out_dir / meta["tokenizer_file"]
    try:
        ranks = load_ranks(tok_file)
    except ValueError as e:                     # a damaged file of the right size: bad base64 or a missing rank
        raise DataError(f"{e}: the tokenizer file is damaged; delete {out_dir} and run again to prepare it afresh") \
            from None
    return meta, make_encoding(tok_file.stem, ranks)


def read_json(path: Path, if_damaged: str) -> dict | None:
    """The JSON object in `path`; None where there is none, or where the file is damaged (not JSON, or not an
    object), which then says `warning: <path> is damaged; <if_damaged>` on stderr: what the caller does instead."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:                          # not JSON, or not UTF-8
        record = None
    if not isinstance(record, dict):
        print(f"warning: {path} is damaged; {if_damaged}", file=sys.stderr)
        return None
    return record


def prepared_meta(out_dir: Path, request: dict | None = None) -> dict | None:
    """The meta.json of a folder that write_meta finished for `request`, if every file it lists still has the size
    it was written with; else None, and the caller prepares the folder (again). A damaged folder (a file cut short by
    a full disk or a copy, or missing; a damaged meta.json) says so on stderr; one made for another request does not."""
    meta = read_json(out_dir / "meta.json", f"preparing {out_dir} again")
    if meta is None or meta.get("request") != request:
        return None
    if (damage := _damage(out_dir, meta.get("sizes"))) is not None:
        print(f"warning: {damage}; preparing {out_dir} again", file=sys.stderr)
        return None
    return meta


def write_meta(out_dir: Path, meta: dict, files: list[str]) -> None:
    """Write out_dir/meta.json, the last file of a prepared folder, with the size of each of `files` (relative to
    out_dir) for prepared_meta to check."""
    meta["sizes"] = {f: (out_dir / f).stat().st_size for f in files}
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=1).encode())


def _damage(out_dir: Path, sizes: dict[str, int] | None) -> str | None:
    """What is wrong with a prepared dir whose files should have these sizes in bytes, or None when they do."""
    if not isinstance(sizes, dict):
        return f"{out_dir / 'meta.json'} lists no file sizes"
    for name, size in sizes.items():
        path = out_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, not the {size:,} written"
    return None


def prepare_text(source: Path | None, out_dir: Path, vocab_size: int = 8192, tokenizer: str = "auto") -> dict:
    """Tokenize `source` (None: the embedded Shakespeare; else a .txt file or a folder searched for *.txt) into
    `out_dir`, or do nothing when `out_dir/meta.json` says it holds this very source and settings. Returns the meta.

    Splits: Shakespeare's val split is the genre task's test plays, train all other texts (poems included); a user
    corpus (files in sorted order) is one token stream, its last VAL_FRACTION is val. The BPE, if trained, sees
    the train split only for Shakespeare, all the text for a user corpus. One process at a time prepares a folder
    (a lock file beside it, `<out_dir>.lock`): a second one started meanwhile waits, then finds it ready.
    """
    out_dir = Path(out_dir)
    root, files = _source_files(source)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with one_at_a_time(out_dir.with_name(out_dir.name + ".lock"), f"preparing {out_dir}"):
            return _prepare(source, root, files, out_dir, vocab_size, tokenizer)
    except OSError as e:                        # writing: a full disk, a quota, a read-only folder
        raise write_error(e, out_dir, source) from None


def _prepare(source: Path | None, root: Path, files: list[Path], out_dir: Path, vocab_size: int,
             tokenizer: str) -> dict:
    """prepare_text's work, done by one process at a time."""
    fingerprint = _fingerprint(root, files)
    request = {"format": FORMAT, "fingerprint": fingerprint, "vocab_size": vocab_size, "tokenizer": tokenizer}
    if (meta := prepared_meta(out_dir, request)) is not None:
        print(f"prepare_text: {out_dir} is up to date ({meta['train_tokens']:,} train tokens)")
        return meta

    docs = _read_docs(source, root, files)
    where = CORPUS if source is None else source
    print(f"prepare_text: read {len(docs)} texts ({sum(map(len, docs.values())) / 1e6:.1f}M characters) from {where}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # from here on the dir is not ready until the new meta.json lands
    for old in out_dir.glob("*.tiktoken"):
        old.unlink()  # a tokenizer trained on the old source
    val_names = [n for n in docs if n in TEST_PLAYS] if source is None else []
    train_names = [n for n in docs if n not in val_names]
    try:
        enc = get_encoding(out_dir, lambda: "\n".join(docs[n] for n in train_names), vocab_size, tokenizer)
    except (TokenizerUnavailable, ValueError) as e:  # no GPT-2 files, or a bad kind / vocab_size
        raise DataError(str(e)) from None

    train = encode_stream(enc, (docs[n] for n in train_names))
    if source is None:
        val = encode_stream(enc, (docs[n] for n in val_names))
    else:
        cut = int(len(train) * (1 - VAL_FRACTION))
        train, val = train[:cut], train[cut:]
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{where} has only {len(train) + len(val)} tokens: too few for a train and a val split")
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    for split, ids in (("train", train), ("val", val)):
        write_atomic(out_dir / f"{split}.bin", ids.astype(dtype).tobytes())
    files = [f"{enc.name}.tiktoken", "train.bin", "val.bin"]
    meta = {
        "request": request, "source": str(where), "tokenizer": "gpt2" if enc.name == "gpt2" else "bpe",
        "tokenizer_file": f"{enc.name}.tiktoken", "vocab_size": enc.n_vocab, "n_normal": n_normal(enc),
        **{f"{k}_id": v for k, v in special_ids(enc).items()}, "dtype": np.dtype(dtype).name,
        "train_tokens": len(train), "val_tokens": len(val),
        "val_split": "texts " + ", ".join(val_names) if val_names else f"last {VAL_FRACTION:.0%} of the tokens",
        "genre": None,
    }
    print(f"prepare_text: {enc.name} tokenizer, {enc.n_vocab} ids | train {len(train):,} | val {len(val):,} tokens")
    if source is None:
        (out_dir / "genre").mkdir(exist_ok=True)
        rows = genre_passages(docs)
        for split, split_rows in rows.items():
            _write_tsv(out_dir / "genre" / f"{split}.tsv", split_rows)
        files += ["genre/train.tsv", "genre/test.tsv"]
        meta["genre"] = {"labels": sorted(set(GENRE.values())), "test_plays": list(TEST_PLAYS),
                         **{f"{split}_passages": len(r) for split, r in rows.items()}}
        print(f"prepare_text: genre task | train {len(rows['train'])} passages | test {len(rows['test'])} passages")
    write_meta(out_dir, meta, files)
    return meta


class TextPretrainData:
    """Random contiguous blocks of a prepared token stream, each row `<s>` + block_size-2 tokens + `</s>`."""

    def __init__(self, out_dir: Path, block_size: int):
        self.meta, self.enc = load_prepared(out_dir)
        self.block_size = block_size
        self.vocab_size: int = self.meta["vocab_size"]
        self.n_normal: int = self.meta["n_normal"]
        self.bos_id: int = self.meta["bos_id"]
        self.pad_id: int = self.meta["pad_id"]
        self.eos_id: int = self.meta["eos_id"]
        self.mask_id: int = self.meta["mask_id"]
        self.data = {s: np.memmap(Path(out_dir) / f"{s}.bin", dtype=self.meta["dtype"], mode="r")
                     for s in ("train", "val")}
        for split, data in self.data.items():
            if len(data) < block_size - 2:
                raise DataError(f"the {split} split of {out_dir} has {len(data)} tokens, fewer than one block "
                                f"({block_size - 2} + <s> </s>): use a smaller block_size or more text")

    def special(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: True at <s>, </s> and <pad>, the tokens masking never picks."""
        return (tokens == self.bos_id) | (tokens == self.eos_id) | (tokens == self.pad_id)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B, block_size) long; the offsets come from `generator` only, so a batch is a function of its state."""
        data, n = self.data[split], self.block_size - 2
        starts = torch.randint(len(data) - n + 1, (batch_size,), generator=generator)             # (B,)
        body = torch.from_numpy(np.stack([data[s:s + n] for s in starts.tolist()]).astype(np.int64))  # (B, n)
        bos = torch.full((batch_size, 1), self.bos_id)                                           # (B, 1)
        eos = torch.full((batch_size, 1), self.eos_id)                                           # (B, 1)
        return torch.cat([bos, body, eos], 1)                                                    # (B, block_size)


# a newline between two non-space characters: GPT-2's pre-tokeniser makes it a pre-token of its own, at the end of a
# text as well, so a text cut after it encodes to the same ids as the whole
CUT = re.compile(r"(?<=\S)\n(?=\S)")
CHUNK_CHARS = 1 << 22   # encode_stream's pieces: about 4M characters


def _pieces(text: str, size: int) -> Iterator[str]:
    """text in pieces of about `size` characters, each cut at a CUT newline (a text with none stays whole)."""
    start = 0
    while len(text) - start > size and (m := CUT.search(text, start + size)):
        yield text[start:m.end()]
        start = m.end()
    yield text[start:]


def encode_stream(enc: tiktoken.Encoding, texts: Iterable[str], size: int = CHUNK_CHARS) -> np.ndarray:
    """(n_tokens,) uint32: the ids of the texts one after another, as `encode_ordinary` gives them for each text.
    Long texts are cut into pieces of about `size` characters, and the pieces go to tiktoken's threads in batches of
    about 8 x size characters, so memory holds the ids as 4-byte numbers plus one batch of Python lists, not a list
    for the whole corpus (and many small files still make few batches)."""
    out, batch, chars = [np.zeros(0, np.uint32)], [], 0
    for piece in (piece for text in texts for piece in _pieces(text, size)):
        batch.append(piece)
        chars += len(piece)
        if chars >= 8 * size:
            out += [np.array(ids, dtype=np.uint32) for ids in enc.encode_ordinary_batch(batch)]
            batch, chars = [], 0
    out += [np.array(ids, dtype=np.uint32) for ids in enc.encode_ordinary_batch(batch)]
    return np.concatenate(out)


def encode_texts(enc: tiktoken.Encoding, texts: list[str], max_len: int, meta: dict) -> torch.Tensor:
    """(N, max_len) long: `<s>` + the text's tokens, cut to fit, + `</s>`, right-padded with <pad>.
    `meta`: anything with bos_id / eos_id / pad_id keys, e.g. the dict prepare_text returns."""
    if max_len < MIN_LEN:
        raise ValueError(f"max_len must leave room for <s>, a token and </s>, got {max_len}")
    out = torch.full((len(texts), max_len), meta["pad_id"], dtype=torch.long)                 # (N, max_len)
    for i, ids in enumerate(enc.encode_ordinary_batch(texts)):
        row = [meta["bos_id"], *ids[: max_len - 2], meta["eos_id"]]
        out[i, : len(row)] = torch.tensor(row)
    return out
