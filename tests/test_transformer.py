"""The hand-written Transformer against naive code written from the formulas."""

import math

import torch

import pytest

from transformer import Block, Transformer, TransformerConfig, relative_position_index, relative_position_index_1d


def naive_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def naive_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def naive_attention(attn, x, padding_mask=None, bias=None):
    """Per head, per query: softmax over the real keys of q.k / sqrt(d), weighted sum of values."""
    B, T, C = x.shape
    H = attn.n_head
    D = C // H
    Wq, Wk, Wv = attn.qkv.weight.split(C)
    bk = attn.k_bias if attn.k_bias is not None else torch.zeros(C)
    q, k, v = x @ Wq.T + attn.q_bias, x @ Wk.T + bk, x @ Wv.T + attn.v_bias
    out = torch.zeros(B, T, C)
    for b in range(B):
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            scores = q[b, :, sl] @ k[b, :, sl].T / math.sqrt(D)          # (T, T)
            if bias is not None:
                scores = scores + bias[h]
            if padding_mask is not None:
                scores[:, padding_mask[b]] = float("-inf")
            out[b, :, sl] = torch.softmax(scores, -1) @ v[b, :, sl]
    return out @ attn.proj.weight.T + attn.proj.bias


def randomize(module):
    """Random values everywhere (LayerNorm gains around 1), so no parameter hides behind its initial value."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = name.endswith("weight") and p.dim() == 1
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if gain else 0.0))
    return module


def padded_input(B=3, T=7, C=16):
    torch.manual_seed(0)
    x = torch.randn(B, T, C)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 2:] = True
    return x, pad


def test_attention_matches_naive_softmax_with_padding():
    cfg = TransformerConfig(n_layer=1, dim=16, n_head=4, ffn_dim=32, dropout=0, attn_dropout=0)
    for k_bias in (True, False):
        block = randomize(Block(TransformerConfig(**{**cfg.__dict__, "k_bias": k_bias}), 0.0)).eval()
        x, pad = padded_input()
        got = block.attn(x, ~pad[:, None, None, :])
        want = naive_attention(block.attn, x, pad)
        real = ~pad
        assert torch.allclose(got[real], want[real], atol=1e-5)


def test_post_ln_block_matches_naive():
    cfg = TransformerConfig(n_layer=1, dim=16, n_head=4, ffn_dim=32, dropout=0, attn_dropout=0, ln_eps=1e-5)
    block = randomize(Block(cfg, 0.0)).eval()
    x, pad = padded_input()
    out, ffn = block(x, ~pad[:, None, None, :], "ffn")
    a = naive_attention(block.attn, x, pad)
    x1 = naive_layer_norm(x + a, block.ln1.weight, block.ln1.bias, 1e-5)
    h = naive_gelu(x1 @ block.fc1.weight.T + block.fc1.bias) @ block.fc2.weight.T + block.fc2.bias
    want = naive_layer_norm(x1 + h, block.ln2.weight, block.ln2.bias, 1e-5)
    real = ~pad
    assert torch.allclose(out[real], want[real], atol=1e-5)
    assert torch.allclose(ffn[real], h[real], atol=1e-5)


def test_pre_ln_block_with_layer_scale_matches_naive():
    cfg = TransformerConfig(n_layer=1, dim=16, n_head=4, ffn_dim=32, dropout=0, attn_dropout=0, pre_ln=True,
                            layer_scale=1e-4, k_bias=False, ln_eps=1e-6)
    block = randomize(Block(cfg, 0.0)).eval()
    x, pad = padded_input()
    out, blk = block(x, ~pad[:, None, None, :], "block")
    a = naive_attention(block.attn, naive_layer_norm(x, block.ln1.weight, block.ln1.bias, 1e-6), pad)
    x1 = x + block.gamma1 * a
    y = naive_layer_norm(x1, block.ln2.weight, block.ln2.bias, 1e-6)
    h = naive_gelu(y @ block.fc1.weight.T + block.fc1.bias) @ block.fc2.weight.T + block.fc2.bias
    want = x1 + block.gamma2 * h
    real = ~pad
    assert torch.allclose(out[real], want[real], atol=1e-5)
    assert torch.equal(out, blk)


def test_padding_does_not_change_real_steps():
    """A padded batch gives each sequence the output it gets alone."""
    cfg = TransformerConfig(n_layer=2, dim=16, n_head=4, ffn_dim=32, dropout=0, attn_dropout=0)
    model = Transformer(cfg).eval()
    x, pad = padded_input()
    out, _ = model(x, pad)
    alone, _ = model(x[2:3, :2])
    assert torch.allclose(out[2, :2], alone[0], atol=1e-5)


def test_relative_position_index_matches_naive():
    for h, w in [(2, 3), (4, 4), (14, 14)]:
        index = relative_position_index(h, w)
        n_rel = (2 * h - 1) * (2 * w - 1)
        N = h * w
        assert index.shape == (N + 1, N + 1)
        for i in range(N):
            for j in range(0, N, max(1, N // 7)):
                dy, dx = i // w - j // w, i % w - j % w
                assert index[i + 1, j + 1] == (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
        assert index[0, 1:].eq(n_rel).all() and index[1:, 0].eq(n_rel + 1).all() and index[0, 0] == n_rel + 2
        assert index.max() == n_rel + 2


def test_relative_position_bias_matches_naive_attention():
    cfg = TransformerConfig(n_layer=1, dim=16, n_head=4, ffn_dim=32, dropout=0, attn_dropout=0, pre_ln=True,
                            rel_pos_grid=(2, 2), k_bias=False)
    model = randomize(Transformer(cfg)).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    mask = model.attn_mask(x, None)
    got = model.blocks[0].attn(x, mask)
    want = naive_attention(model.blocks[0].attn, x, bias=model.rel_pos.table[relative_position_index(2, 2)].permute(2, 0, 1))
    assert torch.allclose(got, want, atol=1e-5)


def test_1d_relative_position_bias_matches_naive_attention_at_every_length():
    """Text without absolute positions: query i and key j read the table's row for the offset i - j; a padded or shorter
    input reads the same rows as the longest one."""
    n = 6
    index = relative_position_index_1d(n)
    assert all(index[i, j] == i - j + n - 1 for i in range(n) for j in range(n))
    cfg = TransformerConfig(n_layer=1, dim=16, n_head=4, ffn_dim=32, dropout=0, attn_dropout=0, rel_pos_len=n)
    model = randomize(Transformer(cfg)).eval()
    torch.manual_seed(0)
    table = model.rel_pos.table                                                       # (2n - 1, H)
    for T in (n, 4):
        x = torch.randn(2, T, 16)
        pad = torch.zeros(2, T, dtype=torch.bool)
        pad[1, -1] = True
        bias = torch.stack([torch.stack([table[i - j + n - 1] for j in range(T)]) for i in range(T)]).permute(2, 0, 1)
        got = model.blocks[0].attn(x, model.attn_mask(x, pad))
        want = naive_attention(model.blocks[0].attn, x, padding_mask=pad, bias=bias)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1, :-1], want[1, :-1], atol=1e-5)
    with pytest.raises(ValueError, match="built for at most 6"):
        model.attn_mask(torch.randn(1, n + 1, 16), None)
    grid = Transformer(TransformerConfig(n_layer=1, dim=16, n_head=4, ffn_dim=32, rel_pos_grid=(2, 2)))
    with pytest.raises(ValueError, match="built for 5"):                                # CLS + 2 x 2 patches, no fewer
        grid.attn_mask(torch.randn(1, 4, 16), None)


def test_layerdrop_only_in_training():
    cfg = TransformerConfig(n_layer=6, dim=16, n_head=4, ffn_dim=32, layerdrop=0.5)
    model = Transformer(cfg)
    x = torch.randn(2, 5, 16)
    model.eval()
    assert len(model(x, target_layer="ffn")[1]) == 6
    model.train()
    torch.manual_seed(0)
    counts = {len(model(x, target_layer="ffn")[1]) for _ in range(20)}
    assert min(counts) < 6
