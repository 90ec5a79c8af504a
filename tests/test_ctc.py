"""Letter vocabulary, greedy CTC decoding and error rates on hand-worked examples."""

import torch

from ctc import BLANK, VOCAB, cer, edit_distance, encode_ltr, greedy_decode, ids_to_text, ltr_to_text, text_to_ltr, wer

# vocab.json of facebook/data2vec-audio-base-960h and facebook/wav2vec2-base-960h, as published
HF_VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8, "N": 9, "I": 10,
            "H": 11, "S": 12, "R": 13, "D": 14, "L": 15, "U": 16, "M": 17, "W": 18, "C": 19, "F": 20, "G": 21, "Y": 22,
            "P": 23, "B": 24, "V": 25, "K": 26, "'": 27, "X": 28, "J": 29, "Q": 30, "Z": 31}


def frames(symbols: str) -> torch.Tensor:
    """One-hot logits (T, V) for a frame string where '_' is the blank, ' ' the word separator."""
    ids = [BLANK if s == "_" else VOCAB.index("|" if s == " " else s) for s in symbols]
    return torch.nn.functional.one_hot(torch.tensor(ids), len(VOCAB)).float()


def test_vocabulary_matches_the_official_ctc_checkpoints():
    assert {s: i for i, s in enumerate(VOCAB)} == HF_VOCAB and BLANK == HF_VOCAB["<pad>"]


def test_ltr_format_round_trip():
    assert text_to_ltr("hello world") == "H E L L O | W O R L D |"
    assert text_to_ltr("  O'er the hill-top!  ") == "O ' E R | T H E | H I L L | T O P |"
    assert ltr_to_text("H E L L O | W O R L D |") == "HELLO WORLD"
    assert encode_ltr("H E L L O |") == [11, 5, 15, 15, 8, 4]
    assert encode_ltr("H 7 |") == [11, 3, 4]                                 # unknown symbol -> <unk>
    assert ids_to_text(encode_ltr(text_to_ltr("we'll go"))) == "WE'LL GO"


def test_greedy_decode_collapses_repeats_and_keeps_letters_split_by_blank():
    assert greedy_decode(frames("HHEE_LLL_LO")) == ["HELLO"]
    assert greedy_decode(frames("HHEELLLLO")) == ["HELO"]                    # no blank: the double L collapses
    assert greedy_decode(frames("_HI__  __YO_U_ ")) == ["HI YOU"]
    assert greedy_decode(frames("____")) == [""]


def test_greedy_decode_batch_respects_lengths():
    logits = torch.stack([frames("AB_B__"), frames("NO_OOO")])               # (2, 6, V)
    assert greedy_decode(logits, torch.tensor([4, 3])) == ["ABB", "NO"]


def test_edit_distance_and_error_rates():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("", "") == 0
    assert edit_distance("the cat sat".split(), "the bat sat down".split()) == 2
    assert wer(["THE CAT SAT"], ["THE CAT SAT DOWN"]) == 1 / 3
    assert wer(["THE CAT SAT", "HI"], ["A CAT", "HI"]) == 2 / 4               # a substitution and a deletion
    assert cer(["ABC", "DE"], ["ABD", "DE"]) == 1 / 5
    assert cer(["A B"], ["AB"]) == 1 / 3                                     # spaces count as characters
