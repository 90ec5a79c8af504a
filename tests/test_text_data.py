"""Tests for tokenizer.py and text_data.py. Fast (a few seconds) except the one marked slow (the full corpus)."""

import errno
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken.load
import torch

from text_data import (CORPUS, GENRE, TEST_PLAYS, DataError, TextPretrainData, _pieces, encode_stream, encode_texts,
                       genre_passages, one_at_a_time, prepare_text, read_tsv)
from tokenizer import (MAX_PIECE, PAT_STR, get_encoding, load_ranks, make_encoding, n_normal, save_ranks, special_ids,
                       train_bpe)

UNICODE = "naïve café — Straße, 東京 🙂!\n\tTabs,   spaces\r\n and <s> <mask> typed by a user.\n\n"


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    with tarfile.open(CORPUS) as tar:
        return {Path(m.name).stem: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def sonnet_ranks(plays) -> dict[bytes, int]:
    return train_bpe(plays["sonnets"] + UNICODE, 1000)


def naive_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """Reference for tiktoken's algorithm: a whole pre-token that is a token stays whole; else merge, again and
    again, the leftmost adjacent pair whose concatenation has the lowest rank."""
    out = []
    for piece in regex.findall(PAT_STR, text):
        parts = [bytes([b]) for b in piece.encode()]
        if piece.encode() in ranks:
            parts = [piece.encode()]
        while len(parts) > 1:
            cands = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
            if not cands:
                break
            _, i = min(cands)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


def test_bpe_learns_the_textbook_merges():
    # Wikipedia's BPE example "aaabdaaabac": aa, then ab (ties go to the smaller pair of ids), then aa+ab
    ranks = train_bpe("aaabdaaabac", 259)
    assert {t: r for t, r in ranks.items() if r >= 256} == {b"aa": 256, b"ab": 257, b"aaab": 258}


def test_bpe_matches_a_full_recount_trainer(plays):
    # the incremental pair counts must pick the same merges as recounting every pair after every merge
    text = plays["hamlet"][20000:32000]
    words = [list(w.encode()) for w in regex.findall(PAT_STR, text)]
    ranks = {bytes([i]): i for i in range(256)}
    id_bytes = list(ranks)
    while len(ranks) < 500:
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = id_bytes[a] + id_bytes[b]
        if merged not in ranks:
            ranks[merged] = len(id_bytes)
            id_bytes.append(merged)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [ranks[merged]]
                i += 1
    assert train_bpe(text, 500) == ranks


def test_a_long_pre_token_is_counted_as_pieces():
    """A text with no spaces is one pre-token; training counts it as MAX_PIECE-byte pieces, as if a newline (a
    pre-token of one byte, so no pair) stood between them, and learns no longer token."""
    whole = "ab" * 1000                                                     # 2,000 bytes
    pieces = [whole[i:i + MAX_PIECE] for i in range(0, len(whole), MAX_PIECE)]
    ranks = train_bpe(whole + " cd", 300)
    assert ranks == train_bpe("\n".join(pieces) + " cd", 300)
    assert max(len(t) for t in ranks) == MAX_PIECE


def test_pat_str_is_gpt2s():
    from tiktoken_ext.openai_public import r50k_pat_str

    assert PAT_STR == r50k_pat_str


def test_round_trip_unicode(sonnet_ranks):
    enc = make_encoding("t", sonnet_ranks)
    for text in (UNICODE, "Shall I compare thee to a summer's day?", "", " ", "\x00\xff\u200b"):
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_ranks_file_loads_in_tiktoken_and_compresses(sonnet_ranks, tmp_path, monkeypatch):
    path = tmp_path / "r.tiktoken"
    save_ranks(sonnet_ranks, path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own reader, without copying the file into its cache
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == load_ranks(path) == sonnet_ranks
    assert sorted(sonnet_ranks.values()) == list(range(1000))
    held_out = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    assert len(make_encoding("t", load_ranks(path)).encode_ordinary(held_out)) < len(held_out.encode()) / 2


def test_tiktoken_matches_naive_reference(sonnet_ranks, plays):
    for t, r in sonnet_ranks.items():  # every merged token is two earlier tokens
        assert r < 256 or any(t[:i] in sonnet_ranks and t[i:] in sonnet_ranks and
                              max(sonnet_ranks[t[:i]], sonnet_ranks[t[i:]]) < r for i in range(1, len(t)))
    enc = make_encoding("t", sonnet_ranks)
    for text in (UNICODE, plays["hamlet"][5000:8000], "aaaaaaa bbbbbb thee thee'll 12345"):
        assert enc.encode_ordinary(text) == naive_encode(sonnet_ranks, text)


def test_encoding_in_pieces_gives_the_ids_of_the_whole(plays):
    """encode_stream cuts long texts at newlines between two words; with pieces of ~40 characters every such newline
    of a play is a cut, and trailing spaces, blank lines, CRLF, tabs and unicode sit right beside them."""
    lines = plays["tempest"][:6000].splitlines(keepends=True)
    ends = ("  \n", "\r\n", "  \n\n", "\n\t", "\n")
    text = "".join(line.rstrip("\n") + ends[i % 5] for i, line in enumerate(lines))
    enc = make_encoding("t", train_bpe(text, 600))        # merges across "  \n" too, learned from "  \n\n"
    texts = [text + UNICODE * 3, "x" * 500, "", UNICODE]                   # "x" * 500: no cut, one piece
    ids = encode_stream(enc, texts, size=40)
    assert ids.dtype == np.uint32 and ids.tolist() == [i for t in texts for i in enc.encode_ordinary(t)]
    assert sum(1 for _ in _pieces(text, 40)) > 20


def test_special_ids_are_the_last_four(sonnet_ranks):
    enc = make_encoding("t", sonnet_ranks)
    assert special_ids(enc) == {"bos": 1000, "pad": 1001, "eos": 1002, "mask": 1003}
    assert n_normal(enc) == 1000 and enc.n_vocab == 1004
    assert enc.decode([1000, 1003]) == "<s><mask>"
    assert max(enc.encode_ordinary("<s> <pad> </s> <mask>")) < 1000  # typed specials are plain text


def test_auto_trains_bpe_without_gpt2_cache_then_loads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    enc = get_encoding(tmp_path, "hello world, hello there " * 20, vocab_size=270)
    assert enc.name == "bpe-270" and (tmp_path / "bpe-270.tiktoken").exists()

    def no_training():
        raise AssertionError("the cached tokenizer should have been loaded")

    again = get_encoding(tmp_path, no_training, vocab_size=270, kind="bpe")
    assert again.encode_ordinary("hello there") == enc.encode_ordinary("hello there")


def test_auto_uses_gpt2_when_cached(tmp_path, monkeypatch, sonnet_ranks):
    # no network here: stand-ins for tiktoken's cached GPT-2 files
    import tiktoken_ext.openai_public
    import tokenizer

    monkeypatch.setattr(tokenizer, "gpt2_cached", lambda: True)
    monkeypatch.setattr(tiktoken_ext.openai_public, "gpt2", lambda: {"mergeable_ranks": sonnet_ranks})
    enc = get_encoding(tmp_path, "unused", vocab_size=300)
    assert enc.name == "gpt2" and load_ranks(tmp_path / "gpt2.tiktoken") == sonnet_ranks
    assert special_ids(enc)["bos"] == len(sonnet_ranks)


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (src / "sub" / "b.txt").write_text("Über den Wolken muss die Freiheit wohl grenzenlos sein. " * 40)
    return src


def test_prepare_tiny_folder(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe")
    enc = make_encoding("t", load_ranks(out / meta["tokenizer_file"]))
    total = len(enc.encode_ordinary((tiny_corpus / "a.txt").read_text())) + \
        len(enc.encode_ordinary((tiny_corpus / "sub" / "b.txt").read_text()))
    train, val = (np.memmap(out / f"{s}.bin", dtype=meta["dtype"], mode="r") for s in ("train", "val"))
    assert meta["dtype"] == "uint16" and len(train) + len(val) == total == meta["train_tokens"] + meta["val_tokens"]
    assert val.size == total - int(total * 0.95)
    assert enc.decode(val.tolist()) in (tiny_corpus / "sub" / "b.txt").read_text()
    assert meta["vocab_size"] == meta["n_normal"] + 4 and meta["mask_id"] == meta["vocab_size"] - 1
    assert meta["genre"] is None and not (out / "genre").exists()


def test_prepare_skips_when_up_to_date_and_redoes_when_changed(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    first = prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe")
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe") == first
    assert "up to date" in capsys.readouterr().out and (out / "train.bin").stat().st_mtime_ns == stamp
    (tiny_corpus / "c.txt").write_text("A new file. " * 50)
    assert prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe")["train_tokens"] > first["train_tokens"]


def test_a_damaged_prepared_dir_is_prepared_again(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    first = prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe")
    written = {f: (out / f).read_bytes() for f in first["sizes"]}
    assert sorted(written) == ["bpe-300.tiktoken", "train.bin", "val.bin"]
    n_train = len(written["train.bin"])
    damages = [
        (lambda: (out / "train.bin").write_bytes(written["train.bin"][:11]),
         f"train.bin has 11 bytes, not the {n_train:,} written; preparing {out} again"),
        (lambda: (out / "val.bin").write_bytes(b""), "val.bin has 0 bytes"),
        (lambda: (out / "bpe-300.tiktoken").unlink(), "bpe-300.tiktoken is missing"),
        (lambda: (out / "meta.json").write_text('{"request": '), f"meta.json is damaged; preparing {out} again"),
        (lambda: (out / "meta.json").write_text("[]"), "meta.json is damaged"),
    ]
    for damage, warning in damages:
        damage()
        capsys.readouterr()
        assert prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe") == first
        assert warning in capsys.readouterr().err
        assert {f: (out / f).read_bytes() for f in first["sizes"]} == written
    # the same size, other bytes: only reading the tokenizer finds it
    (out / "bpe-300.tiktoken").write_bytes(written["bpe-300.tiktoken"].replace(b" ", b"!", 1))
    prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe")
    with pytest.raises(DataError, match=r"bpe-300.tiktoken:1 is not a line .*damaged; delete .*out and run again"):
        TextPretrainData(out, block_size=16)


def test_a_second_process_waits_for_the_folder_being_prepared_and_uses_it(tiny_corpus, tmp_path):
    """Two runs started at once on a fresh clone: the second must not delete the first one's tokenizer while the
    first one tokenizes. The test holds the lock as the first would, prepares elsewhere and moves that in place."""
    out = tmp_path / "out"
    code = ("import sys; from pathlib import Path; from text_data import prepare_text; "
            "prepare_text(Path(sys.argv[1]), Path(sys.argv[2]), vocab_size=300, tokenizer='bpe')")
    with one_at_a_time(tmp_path / "out.lock", "preparing it"):
        second = subprocess.Popen([sys.executable, "-c", code, str(tiny_corpus), str(out)],
                                  cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
        try:
            assert second.stdout.readline() == f"waiting for another process that is preparing {out} ...\n"
            meta = prepare_text(tiny_corpus, tmp_path / "elsewhere", vocab_size=300, tokenizer="bpe")
            (tmp_path / "elsewhere").rename(out)                                 # the first one's work, done
        except BaseException:
            second.kill()
            raise
    stdout, _ = second.communicate(timeout=120)
    assert second.returncode == 0
    assert stdout == f"prepare_text: {out} is up to date ({meta['train_tokens']:,} train tokens)\n"


FULL = r"; [\d,]+ MiB free there\): free some space there, or copy .* to a disk with room: its prepared data are"
READ_ONLY = r"\): copy .* to a folder you can write to: its prepared data are written beside it"


@pytest.mark.parametrize("code, failing, left, fix", [(errno.ENOSPC, "train.bin", ["bpe-300.tiktoken"], FULL),
                                                       (errno.ENOSPC, "bpe-300.tiktoken", [], FULL),
                                                       (errno.EROFS, "train.bin", ["bpe-300.tiktoken"], READ_ONLY)])
def test_a_write_that_fails_leaves_no_partial_file_and_says_what_to_do(tiny_corpus, tmp_path, monkeypatch, code,
                                                                        failing, left, fix):
    fail_writing(monkeypatch, failing, OSError(code, os.strerror(code)))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"could not write the prepared data in {out} \\({os.strerror(code)}" + fix):
        prepare_text(tiny_corpus, out, vocab_size=300, tokenizer="bpe")
    assert sorted(f.name for f in out.iterdir()) == left                     # no partial file, no meta.json


def test_ctrl_c_while_writing_leaves_no_partial_file(tiny_corpus, tmp_path, monkeypatch):
    fail_writing(monkeypatch, "val.bin", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare_text(tiny_corpus, tmp_path / "out", vocab_size=300, tokenizer="bpe")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["bpe-300.tiktoken", "train.bin"]


def fail_writing(monkeypatch: pytest.MonkeyPatch, name: str, error: BaseException) -> None:
    """Path.write_bytes writes 10 bytes of a file whose name starts with `name`, then raises `error`."""
    write_bytes = Path.write_bytes

    def fail(path: Path, data: bytes) -> int:
        if path.name.startswith(name):
            write_bytes(path, data[:10])
            raise error
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", fail)


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        prepare_text(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        prepare_text(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "blank.txt").write_text(" \n")
    with pytest.raises(DataError, match="every .txt file in .* is empty"):
        prepare_text(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="blank.txt is empty: pass a text"):
        prepare_text(tmp_path / "empty" / "blank.txt", tmp_path / "out")
    (tmp_path / "empty" / "blank.txt").write_text("h")
    with pytest.raises(DataError, match="too few"):
        prepare_text(tmp_path / "empty", tmp_path / "out", vocab_size=256, tokenizer="bpe")
    with pytest.raises(DataError, match="unknown tokenizer"):
        prepare_text(tmp_path / "empty", tmp_path / "out", tokenizer="gtp2")
    (tmp_path / "empty" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(DataError, match=r"cannot read .*gone.txt \(No such file or directory\): fix it or move it out"):
        prepare_text(tmp_path / "empty", tmp_path / "out")


def test_a_folder_named_like_a_text_is_searched_not_read(tiny_corpus, tmp_path):
    before = prepare_text(tiny_corpus, tmp_path / "before", vocab_size=300, tokenizer="bpe")
    (tiny_corpus / "sub").rename(tiny_corpus / "sub.txt")
    meta = prepare_text(tiny_corpus, tmp_path / "out", vocab_size=300, tokenizer="bpe")
    assert (meta["train_tokens"], meta["val_tokens"]) == (before["train_tokens"], before["val_tokens"])  # b.txt too


def test_non_utf8_warns_and_replaces(tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café crème ".encode("latin-1") * 30)
    meta = prepare_text(f, tmp_path / "out", vocab_size=260, tokenizer="bpe")
    assert capsys.readouterr().err == (f"warning: {f}: 60 bytes are not valid UTF-8 and were replaced by U+FFFD; "
                                       "re-save it as UTF-8\n")
    assert meta["train_tokens"] > 0


def test_batches_are_a_function_of_the_generator(tiny_corpus, tmp_path):
    prepare_text(tiny_corpus, tmp_path / "out", vocab_size=300, tokenizer="bpe")
    data = TextPretrainData(tmp_path / "out", block_size=16)
    x = data.batch("train", 8, torch.Generator().manual_seed(0))                          # (8, 16)
    assert x.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x, data.batch("train", 8, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, data.batch("train", 8, torch.Generator().manual_seed(1)))
    assert (x[:, 0] == data.bos_id).all() and (x[:, -1] == data.eos_id).all()
    assert (x[:, 1:-1] < data.n_normal).all()
    assert data.batch("val", 3, torch.Generator().manual_seed(0)).shape == (3, 16)
    with pytest.raises(DataError, match="fewer than one block"):
        TextPretrainData(tmp_path / "out", block_size=10_000)


def test_genre_split_by_play(plays):
    assert set(GENRE) | {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
                         "sonnets"} == set(plays)
    assert sorted(GENRE[p] for p in TEST_PLAYS) == ["comedy", "comedy", "history", "history", "tragedy", "tragedy"]
    for name in ("hamlet", "john", "sonnets"):
        rows = genre_passages({name: plays[name]})
        assert sum(map(bool, rows.values())) == (name != "sonnets")  # a play's passages all land in one split
    rows = genre_passages(plays)
    for split in ("train", "test"):
        assert {label for _, label in rows[split]} == {"comedy", "history", "tragedy"}
    assert not {s for s, _ in rows["train"]} & {s for s, _ in rows["test"]}
    assert all(len(s.split()) == 100 and "\t" not in s for s, _ in rows["test"])
    assert rows["test"][0][0].startswith("ACT I.")  # the cast list is skipped


def test_read_tsv_skips_another_header_with_a_warning(tmp_path, capsys):
    """A header other than `sentence<TAB>label` must not become a class of one example in training and testing."""
    f = tmp_path / "train.tsv"
    f.write_text("text\tlabel\ngood\tpos\nbad\tneg\nfine\tpos\n")
    assert read_tsv(f) == (["good", "bad", "fine"], ["pos", "neg", "pos"])
    assert capsys.readouterr().err == f"warning: {f}:1 is taken for a header and skipped: its label 'label' is on no " \
                                      "other line\n"
    f.write_text("good\tpos\nbad\tneg\nfine\tpos\n")                     # line 1's label repeats: an example
    assert read_tsv(f)[1] == ["pos", "neg", "pos"]
    f.write_text("\nbad\tneg\ngood\tpos\nfine\tpos\n")                  # the first example is not on line 1
    assert read_tsv(f)[1] == ["neg", "pos", "pos"] and capsys.readouterr().err == ""


def test_read_tsv(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text("sentence\tlabel\nit 's a charming journey . \t1\n\nunfunny and tedious\t0\n")
    assert read_tsv(f) == (["it 's a charming journey . ", "unfunny and tedious"], ["1", "0"])
    f.write_text("no header here\tcomedy\n")
    assert read_tsv(f) == (["no header here"], ["comedy"])
    f.write_text("fine\t1\nawful\t0\n")                                   # each label once: no header to see
    assert read_tsv(f) == (["fine", "awful"], ["1", "0"])
    f.write_text("sentence\tlabel\nno tab here\n")
    with pytest.raises(DataError, match="dev.tsv:2"):
        read_tsv(f)
    with pytest.raises(DataError, match="missing.tsv"):
        read_tsv(tmp_path / "missing.tsv")
    with pytest.raises(DataError, match="is a folder: pass a TSV file"):
        read_tsv(tmp_path)
    f.write_text("\ufeffsentence\tlabel\nhi\t1\n", encoding="utf-8")          # a spreadsheet's byte-order mark
    assert read_tsv(f) == (["hi"], ["1"])
    f.write_bytes("café\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_tsv(f)
    f.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="no `sentence<TAB>label` lines"):
        read_tsv(f)


def test_encode_texts(sonnet_ranks):
    enc = make_encoding("t", sonnet_ranks)
    meta = {f"{k}_id": v for k, v in special_ids(enc).items()}
    x = encode_texts(enc, ["Shall I compare thee", "", "to a summer's day? " * 20], 8, meta)  # (3, 8)
    n = len(enc.encode_ordinary("Shall I compare thee"))
    assert x.shape == (3, 8) and (x[:, 0] == 1000).all()
    assert x[0, n + 1] == 1002 and (x[0, n + 2:] == 1001).all()
    assert x[1].tolist() == [1000, 1002] + [1001] * 6
    assert x[2, -1] == 1002 and (x[2, 1:-1] < 1000).all()


@pytest.mark.slow
def test_prepare_default_corpus(tmp_path, plays):
    meta = prepare_text(None, tmp_path, vocab_size=8192)
    enc = make_encoding("t", load_ranks(tmp_path / meta["tokenizer_file"]))
    val = np.memmap(tmp_path / "val.bin", dtype=meta["dtype"], mode="r")
    assert val.tolist() == [t for p in sorted(TEST_PLAYS) for t in enc.encode_ordinary(plays[p])]
    assert meta["train_tokens"] > 4 * meta["val_tokens"] and meta["vocab_size"] == enc.n_vocab
    labels = read_tsv(tmp_path / "genre" / "test.tsv")[1]
    assert len(labels) == meta["genre"]["test_passages"] and set(labels) == {"comedy", "history", "tragedy"}
