"""The baseline data2vec replaces for text: BERT/RoBERTa's masked language model on the same student.

The student, its input (BERT's corrupted ids) and its head are data2vec's; only the objective differs: at masked
steps the head's output scores every token type through the tied token embedding, and the loss is the cross-entropy
of the original token. No teacher is read. `python train.py --modality=text --objective=mlm` trains it with the same
recipe, so the two objectives can be compared at equal budget (FINDINGS.md).
RoBERTa's own LM head is dense -> GELU -> LayerNorm -> tied decoder + bias; data2vec's text head
(Linear(C, 2C) -> GELU -> Linear(2C, C)) stands in for it here, so that the two models have the same weights.
train.py still keeps and checkpoints its EMA teacher (the update is about 0.1 % of a step); nothing reads it.
"""

import torch.nn.functional as F
from torch import Tensor

from data2vec import Data2Vec, EMATeacher


class MaskedLM(Data2Vec):
    """Data2Vec's student, scored by masked-token cross-entropy instead of regression to teacher targets."""

    def forward(
        self,
        source: Tensor,
        mask: Tensor,
        teacher: EMATeacher | None = None,
        padding_mask: Tensor | None = None,
        student_source: Tensor | None = None,
        mask_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """source: (B, T) token ids; mask: (B, T) bool, True = masked; student_source: BERT's corrupted ids;
        mask_rows: as in Data2Vec.forward.

        Returns (cross-entropy summed over masked steps, predictions (N, C), the embeddings of the masked tokens
        (N, C)) with N = mask.sum(), the same contract as Data2Vec.forward, so train.py's loop and collapse monitors
        run unchanged (target_var is then the spread of the masked tokens' embeddings).
        """
        if student_source is None:
            raise ValueError("the masked language model reads BERT's corrupted ids (text only)")
        # BERT masking never touches padding, so the corrupted ids pad where the source does
        xs, padding_mask = self.embed(student_source, padding_mask)             # (B, T, C), (B, T)
        h, _ = self.student(self.encoder(xs, padding_mask), padding_mask)       # (B, T, C)
        rows = self.masked_rows(mask) if mask_rows is None else mask_rows       # (N,)
        pred = self.head(h.flatten(0, 1)[rows])                                 # (N, C)
        answers = source.flatten()[rows]                                        # (N,)
        table = self.encoder.tokens.weight                                      # (V, C)
        logits = pred.float() @ table.float().t()                               # (N, V)
        loss = F.cross_entropy(logits, answers, reduction="sum")
        return loss, pred.detach(), table[answers].detach()
