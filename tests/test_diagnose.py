"""diagnose.py: the content-free inputs and token shuffles it compares against, the effective rank of pooled features,
and runs on tiny checkpoints."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diagnose
import train
from data2vec import Data2Vec, EMATeacher, TargetConfig
from diagnose import (content_free, effective_rank, embedding_gradients, embedding_norms, frequency_entropy,
                      nearest_tokens, pooled_layers, shuffle_tokens)
from encoders import TextEncoder
from transformer import TransformerConfig

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


def test_embedding_gradients_against_finite_differences_of_the_student_loss():
    # ids 0-7 normal tokens, then <s> 8, <pad> 9, </s> 10, <mask> 11 (text_data's order)
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layer=2, dim=8, n_head=2, ffn_dim=16, dropout=0.0, attn_dropout=0.0)
    model = Data2Vec(TextEncoder(12, 8, 6, pad_id=9, dropout=0.0), cfg, TargetConfig(top_k=2, target_norm="layer",
                     loss_beta=4.0, loss_scale=False), head_hidden=True).double().eval()
    teacher = EMATeacher(model.student, 0.99, 0.999, 10)
    teacher.model.double()
    source = torch.tensor([[8, 5, 6, 7, 3, 10], [8, 2, 5, 4, 10, 9]])                 # (B, T), one row padded
    mask = torch.tensor([[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    student = source.masked_fill(mask, 11)
    # the position rows of the first 3 steps (2, 3, 4): fewer rows than the table holds, so a wrong offset would show
    token, position = embedding_gradients(model, teacher, source, mask, student, n_normal=8, block_size=3)
    assert all(p.grad is None for p in model.parameters())

    with torch.no_grad():                                   # naive: the targets fixed, the student's loss by hand
        x, pad = model.embed(source)
        y = model.teacher_targets(teacher, x, pad)[mask]                                  # (N, C)

    def loss() -> float:
        h, _ = model.student(model.encoder(model.encoder.tokens(student), pad), pad)      # (B, T, C)
        return float(F.smooth_l1_loss(model.head(h[mask]), y, beta=4.0, reduction="sum") / mask.sum())

    def finite_differences(table: torch.Tensor, rows: list[int], eps: float = 1e-6) -> list[float]:
        out = []
        with torch.no_grad():
            for r in rows:
                for c in range(table.shape[1]):
                    table[r, c] += eps
                    up = loss()
                    table[r, c] -= 2 * eps
                    down = loss()
                    table[r, c] += eps
                    out.append(abs(up - down) / (2 * eps))
        return out

    held = [2, 3, 4, 6]                                      # the normal tokens the student sees (5, 7: always masked)
    assert token == pytest.approx(float(np.median(finite_differences(model.encoder.tokens.weight, held))), rel=1e-4)
    assert position == pytest.approx(float(np.median(finite_differences(model.encoder.positions.weight,
                                                                          [2, 3, 4]))), rel=1e-4)


def test_frequency_entropy_counts_the_normal_tokens_only():
    stream = np.array([5, 6, 7, 8, 5, 6, 7, 8, 9, 9, 9], dtype=np.uint16)     # 9 and above: special tokens
    assert frequency_entropy(stream, n_normal=9) == pytest.approx(np.log(4))
    assert frequency_entropy(np.array([3, 3, 3, 4], dtype=np.uint16), n_normal=9) == pytest.approx(
        -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))


def test_effective_rank_against_the_covariance_eigenvalues_and_known_spreads():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 8, generator=g) * torch.linspace(0.1, 2.0, 8)                 # (N, C), unequal spreads
    eig = np.linalg.eigvalsh(np.cov(f.numpy(), rowvar=False))                          # naive: covariance eigenvalues
    share = eig / eig.sum()
    assert effective_rank(f) == pytest.approx(np.exp(-(share * np.log(share)).sum()), rel=1e-6)
    axes = torch.eye(6)[:3]                                                             # 3 orthogonal directions
    assert effective_rank(torch.cat([axes, -axes]) * 5 + 1) == pytest.approx(3.0)      # equal spread: 3
    line = torch.randn(20, 1, generator=g) * torch.randn(1, 6, generator=g)            # every example on one line
    assert effective_rank(line) == pytest.approx(1.0)


def test_pooled_layers_average_the_real_steps_of_each_layer():
    torch.manual_seed(0)
    model = Data2Vec(TextEncoder(40, 16, 10, pad_id=1, dropout=0.0),
                     TransformerConfig(n_layer=2, dim=16, n_head=2, ffn_dim=32), TargetConfig(top_k=2),
                     head_hidden=True).eval()
    tokens = torch.randint(4, 40, (3, 10))
    tokens[1, 6:] = 1                                                                   # a padded passage
    with torch.no_grad():
        layers = pooled_layers(model, tokens, None)
        x, pad = model.embed(tokens)
        h = model.encoder(x, pad)                                                       # (B, T, C)
        out, _ = model.student(h, pad)                                                  # (B, T, C)
        alone, _ = model.student(model.encoder(*model.embed(tokens[1:2, :6])), None)    # the padded row, unpadded
    assert len(layers) == 3
    torch.testing.assert_close(layers[0][0], h[0].mean(0))
    torch.testing.assert_close(layers[-1][2], out[2].mean(0))
    torch.testing.assert_close(layers[-1][1], alone[0].mean(0), atol=1e-5, rtol=1e-5)


def test_nearest_tokens_against_a_loop_over_rows():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(12, 5, generator=g)
    table[7] = 2 * table[3] + 0.01                                      # row 7 points where row 3 does
    centred = table - table.mean(0)
    cosine = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    naive = sorted((j for j in range(12) if j != 3), key=lambda j: -cosine(centred[3], centred[j]))[:4]
    assert nearest_tokens(table, 3, 4) == naive
    assert nearest_tokens(table, 3, 1) == [7]


def test_diagnose_a_tiny_text_checkpoint(tmp_path, capsys):
    with tarfile.open(ROOT / "data" / "shakespeare.tar.xz") as tar:
        (tmp_path / "plays.txt").write_text(tar.extractfile("shakespeare/tempest.txt").read().decode())
    assert train.main([*TINY, f"--data={tmp_path / 'plays.txt'}", f"--out_dir={tmp_path / 'out'}"]) == 0
    result = diagnose.diagnose(diagnose.DiagnoseConfig(ckpt=str(tmp_path / "out" / "ckpt.pt"), batches=2,
                                                       words="the,Prospero-not-one-token"))
    assert -1.0 <= result["position_similarity"] <= 1.0
    assert list(result["neighbours"]) == ["the"]                                            # one token in the BPE
    assert [len(v) for v in result["neighbours"]["the"].values()] == [5, 5]                 # checkpoint, counted
    assert min(result["loss_intact"], result["loss_shuffled"], result["loss_blank"]) > 0
    assert result["context_gain"] == pytest.approx(result["loss_blank"] / result["loss_intact"])
    assert result["order_gain"] == pytest.approx(result["loss_shuffled"] / result["loss_intact"])
    assert result["token_norm_init"] == pytest.approx(0.02 * 32 ** 0.5, rel=0.3)        # std 0.02 rows of width 32
    assert result["position_norm"] != result["position_norm_init"]                         # two updates moved them
    assert result["position_grad_init"] > result["token_grad_init"] > 0                     # positions: the direct path
    assert result["examples"] == 8                                                          # 2 batches of 4
    assert len(result["feature_rank"]) == len(result["feature_rank_init"]) == 3             # input, 2 blocks
    assert all(1 <= r <= 7 for r in result["feature_rank"] + result["feature_rank_init"])
    capsys.readouterr()
    assert diagnose.main([f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", "--batches=1", "--words=the, zzyzx ,,"]) == 0
    out = capsys.readouterr().out
    assert "nearest token types to 'the'" in out and "not one token of this vocabulary (as a word after a space): " \
        "zzyzx\n" in out
    assert diagnose.main([f"--ckpt={tmp_path / 'missing.pt'}"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert diagnose.main([f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", "--batches=0"]) == 1
    assert "--batches=0: needs at least 1" in capsys.readouterr().err
    saved = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    torch.save(dict(model=saved["model"], config=saved["config"]), tmp_path / "finetuned.pt")   # --save's keys
    assert diagnose.main([f"--ckpt={tmp_path / 'finetuned.pt'}"]) == 1
    assert "finetuned.pt holds no EMA teacher, so it is not a pretraining checkpoint" in capsys.readouterr().err


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
