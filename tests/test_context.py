"""Can the objective teach the student to use its context at all? A sanity check independent of any corpus: on a
Markov chain whose next token is a fixed function of the current one, a masked token is given away by its
neighbours, so a student that learned anything from its context predicts the teacher's targets far better in intact
sequences than in the same tokens shuffled. Nothing here is text-specific beyond the RoBERTa embeddings and BERT
masking; the data2vec pieces are the project's own (Data2Vec, EMATeacher, bert_mask).
"""

import pytest
import torch

from data2vec import Data2Vec, EMATeacher, TargetConfig
from encoders import TextEncoder
from masking import bert_mask
from transformer import TransformerConfig

V, T, B = 64, 32, 32     # token types, sequence length, batch


def chain(successor: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    """(B, T) token ids: each token is successor[previous], or with probability noise a uniformly random one."""
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0] = torch.randint(V, (B,), generator=g)
    for i in range(1, T):
        jump = torch.rand(B, generator=g) < noise
        x[:, i] = torch.where(jump, torch.randint(V, (B,), generator=g), successor[x[:, i - 1]])
    return x


def context_ratio(seed: int, noise: float, steps: int = 1000, lr: float = 2e-3) -> float:
    """Train a 2-block student for `steps` updates on the chain; -> held-out loss on shuffled / intact sequences."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(V, generator=g)
    pad, mask_id = V, V + 1
    model = Data2Vec(TextEncoder(V + 2, 64, T, pad, dropout=0.1),
                     TransformerConfig(n_layer=2, dim=64, n_head=4, ffn_dim=256, dropout=0.1, attn_dropout=0.1),
                     TargetConfig(top_k=2), head_hidden=True)
    teacher = EMATeacher(model.student, 0.99, 0.999, steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

    def loss(shuffle: bool) -> torch.Tensor:
        x = chain(successor, noise, g)                                       # (B, T)
        if shuffle:
            x = x[:, torch.randperm(T, generator=g)]
        student, mask = bert_mask(x, mask_id=mask_id, n_normal=V, special=torch.zeros_like(x, dtype=torch.bool),
                                  generator=g)
        total, _, _ = model(x, mask, teacher, student_source=student)
        return total / mask.sum()

    for step in range(steps):
        opt.zero_grad()
        loss(False).backward()
        opt.step()
        teacher.update(model.student, step)
    model.eval()
    with torch.no_grad():
        intact = sum(loss(False).item() for _ in range(8))
        shuffled = sum(loss(True).item() for _ in range(8))
    return shuffled / intact


@pytest.mark.slow
def test_the_student_learns_to_use_context_on_a_markov_chain():
    """Measured (2-core AMD EPYC, one thread, ~30 s a run), shuffled / intact loss after 1000 updates at lr 2e-3:
    a chain with 10 % random jumps 1.94, 2.22, 2.27 (seeds 0-2); every token random (nothing to learn from the
    neighbours) 0.94, 1.06. A student whose attention is restricted to each step itself (patched in, seed 0) scores
    1.09 on the chain and fails the first assertion. At lr 5e-4 the same run scores 1.035: the targets
    drift to something the student predicts without context (intact loss 0.07 against 0.30-0.49 at lr 2e-3) before
    it learns to read the neighbours, the race the text preset loses (README, "Position instead of content")."""
    assert context_ratio(seed=0, noise=0.1) > 1.5
    assert context_ratio(seed=0, noise=1.0) < 1.2
