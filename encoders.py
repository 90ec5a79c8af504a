"""Feature encoders: the modality-specific front end that turns raw input into a sequence x of shape (B, T, C).

Every encoder has the same three steps, so data2vec.py treats all modalities alike:
  embed(source, pad)     local features, computed once per batch and shared by student and teacher
  apply_mask(x, mask)    the student's view: masked steps replaced by a learned mask embedding
                         (text instead embeds BERT's corrupted ids, see TextEncoder)
  forward(x, padding)    what comes after masking and before the Transformer: positions, LayerNorm, CLS token
`n_prefix` says how many steps forward() puts in front of the sequence (a CLS token), which are never masked.
"""

import torch
import torch.nn as nn
from torch import Tensor


class TextEncoder(nn.Module):
    """RoBERTa's embeddings: token embedding + learned positions + LayerNorm (SPEC §2, §5).

    Positions follow RoBERTa: position id = (count of real tokens so far) + 1, so the first token reads row 2
    and padding reads row 1 (fairseq's padding_idx + 1 offset); the table has max_len + 2 rows.
    There is no apply_mask: the student's view is BERT's corrupted token ids (masking.bert_mask), which
    data2vec.py embeds with embed().
    """

    n_prefix = 0

    def __init__(self, vocab_size: int, dim: int, max_len: int, pad_id: int, dropout: float, ln_eps: float = 1e-5):
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.positions = nn.Embedding(max_len + 2, dim, padding_idx=1)
        self.ln = nn.LayerNorm(dim, eps=ln_eps)
        self.drop = nn.Dropout(dropout)
        for emb in (self.tokens, self.positions):
            nn.init.normal_(emb.weight, std=0.02)
            emb.weight.data[emb.padding_idx].zero_()

    def embed(self, tokens: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens: (B, T) long -> x (B, T, C), padding_mask (B, T) bool (read from the pad id)."""
        return self.tokens(tokens), tokens == self.pad_id

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        keep = (~padding_mask).long()                                # (B, T)
        position_ids = torch.cumsum(keep, dim=1) * keep + 1          # (B, T): 2, 3, ... for tokens, 1 for padding
        return self.drop(self.ln(x + self.positions(position_ids)))
