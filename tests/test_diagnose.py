"""diagnose.py: the content-free inputs and token shuffles it compares against, and a run on a tiny checkpoint."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import diagnose
import train
from diagnose import content_free, embedding_norms, frequency_entropy, shuffle_tokens
from encoders import TextEncoder

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--dim=32", "--n_head=2", "--ffn_dim=64", "--block_size=32", "--batch_size=4",
        "--vocab_size=320", "--top_k=2", "--eval_iters=1", "--log_interval=1", "--max_iters=2"]


def test_shuffle_keeps_special_tokens_and_each_rows_tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([[0, 5, 6, 7, 8, 9, 2, 1, 1], [0, 10, 11, 12, 13, 14, 15, 16, 2]])   # <s> ... </s> <pad>
    special = (tokens == 0) | (tokens == 1) | (tokens == 2)
    out = shuffle_tokens(tokens, special, g)
    assert torch.equal(out[special], tokens[special])
    for row, orig in zip(out, tokens):
        assert sorted(row.tolist()) == sorted(orig.tolist())
    assert not torch.equal(out, tokens)


def test_content_free_inputs_keep_the_shape_and_the_padding():
    g = torch.Generator().manual_seed(0)
    waves, pad = torch.randn(2, 100), torch.zeros(2, 100, dtype=torch.bool)
    pad[1, 60:] = True
    noise = content_free(waves, "speech", pad, None, 0, g)
    assert noise.shape == waves.shape and (noise[pad] == 0).all() and (noise[~pad] != 0).all()
    tokens = torch.tensor([[0, 5, 6, 2, 1]])
    special = torch.tensor([[True, False, False, True, True]])
    random = content_free(tokens, "text", None, special, n_normal=50, generator=g)
    assert torch.equal(random[special], tokens[special]) and (random[~special] < 50).all()


def test_embedding_norms_read_the_normal_tokens_and_the_positions_of_a_full_passage():
    encoder = TextEncoder(vocab_size=10, dim=4, max_len=6, pad_id=8, dropout=0.0)
    with torch.no_grad():
        encoder.tokens.weight.fill_(0.0)
        encoder.tokens.weight[:7] = 0.5                     # 7 normal tokens, norm 1; the specials count nowhere
        encoder.positions.weight.fill_(3.0)                 # rows 0 and 1 (unused, padding) would pull the mean up
        encoder.positions.weight[2:] = torch.tensor([0.0, 0.0, 0.0, 2.0])
    assert embedding_norms(encoder, n_normal=7, block_size=6) == (1.0, 2.0)


def test_frequency_entropy_counts_the_normal_tokens_only():
    stream = np.array([5, 6, 7, 8, 5, 6, 7, 8, 9, 9, 9], dtype=np.uint16)     # 9 and above: special tokens
    assert frequency_entropy(stream, n_normal=9) == pytest.approx(np.log(4))
    assert frequency_entropy(np.array([3, 3, 3, 4], dtype=np.uint16), n_normal=9) == pytest.approx(
        -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))


def test_diagnose_a_tiny_text_checkpoint(tmp_path, capsys):
    with tarfile.open(ROOT / "data" / "shakespeare.tar.xz") as tar:
        (tmp_path / "plays.txt").write_text(tar.extractfile("shakespeare/tempest.txt").read().decode())
    assert train.main([*TINY, f"--data={tmp_path / 'plays.txt'}", f"--out_dir={tmp_path / 'out'}"]) == 0
    result = diagnose.diagnose(diagnose.DiagnoseConfig(ckpt=str(tmp_path / "out" / "ckpt.pt"), batches=2))
    assert -1.0 <= result["position_similarity"] <= 1.0
    assert result["loss_intact"] > 0 and result["loss_shuffled"] > 0
    assert result["token_norm_init"] == pytest.approx(0.02 * 32 ** 0.5, rel=0.3)        # std 0.02 rows of width 32
    assert result["position_norm"] != result["position_norm_init"]                         # two updates moved them
    assert diagnose.main([f"--ckpt={tmp_path / 'missing.pt'}"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_diagnose_a_masked_lm_checkpoint(tmp_path, capsys):
    with tarfile.open(ROOT / "data" / "shakespeare.tar.xz") as tar:
        (tmp_path / "plays.txt").write_text(tar.extractfile("shakespeare/tempest.txt").read().decode())
    assert train.main([*TINY, "--objective=mlm", f"--data={tmp_path / 'plays.txt'}", f"--out_dir={tmp_path / 'out'}"]) == 0
    ckpt = tmp_path / "out" / "ckpt.pt"
    result = diagnose.diagnose(diagnose.DiagnoseConfig(ckpt=str(ckpt), batches=2))
    assert "position_similarity" not in result                     # no teacher targets in a masked-LM run
    assert 0 < result["frequency_entropy"] < np.log(320)
    assert result["loss_intact"] > 0 and result["context_gain"] > 0
    assert diagnose.main([f"--ckpt={ckpt}", "--batches=1"]) == 0
    assert "a masked-LM run" in capsys.readouterr().out
