"""The masked language model baseline (mlm.py) against a naive cross-entropy written out here."""

import math

import torch

from data2vec import TargetConfig
from encoders import TextEncoder
from mlm import MaskedLM
from test_data2vec import tiny_batch           # 3 sequences, one padded, 2 masked steps each
from transformer import TransformerConfig


def tiny_mlm() -> MaskedLM:
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=50, dim=16, max_len=12, pad_id=1, dropout=0.0)
    cfg = TransformerConfig(n_layer=2, dim=16, n_head=2, ffn_dim=32, dropout=0.0, attn_dropout=0.0)
    return MaskedLM(enc, cfg, TargetConfig(top_k=2), head_hidden=True)


def test_loss_is_the_cross_entropy_of_the_masked_tokens():
    model, b = tiny_mlm().eval(), tiny_batch()
    loss, pred, emb = model(**b)
    table = model.encoder.tokens.weight.detach()                       # the naive sum needs no gradient
    naive = 0.0
    for p, tok in zip(pred, b["source"][b["mask"]]):
        scores = [float(p @ table[v]) for v in range(table.shape[0])]
        top = max(scores)
        naive += top + math.log(sum(math.exp(s - top) for s in scores)) - scores[int(tok)]
    assert torch.allclose(loss, torch.tensor(naive), rtol=1e-5)
    assert torch.equal(emb, table[b["source"][b["mask"]]].detach())


def test_only_the_masked_tokens_are_predicted():
    model, b = tiny_mlm().eval(), tiny_batch()
    unmasked_changed = torch.where(b["mask"], b["source"], (b["source"] + 1) % 50)
    unmasked_changed[1, 7:] = 1                                          # keep the padding where it was
    masked_changed = torch.where(b["mask"], (b["source"] + 1) % 50, b["source"])
    loss = model(**b)[0]
    assert torch.equal(loss, model(**dict(b, source=unmasked_changed))[0])   # the answers at unmasked steps never count
    assert not torch.equal(loss, model(**dict(b, source=masked_changed))[0])
