"""The Transformer encoder, written by hand: one Block class that is post-LN (RoBERTa, wav2vec 2.0) or pre-LN
(BEiT) by config, multi-head attention through F.scaled_dot_product_attention, and BEiT's shared relative position
bias for images (2D) and, optionally, text (1D).

Every block can hand back the tensor that data2vec builds its targets from (SPEC §1.4, §2):
  "ffn"   the FFN output (fc2) before dropout, residual and LayerNorm   (speech, text; the paper's choice)
  "attn"  the self-attention output before dropout and residual          (an ablation: it gives no usable model)
  "block" the block's output after the residual (and LayerNorm if post-LN) (the official vision recipe)
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TARGET_LAYERS = ("ffn", "attn", "block")    # what a block can hand back for the targets (above)


@dataclass
class TransformerConfig:
    n_layer: int = 12
    dim: int = 768
    n_head: int = 12
    ffn_dim: int = 3072
    pre_ln: bool = False          # False: post-LN (RoBERTa, wav2vec 2.0); True: pre-LN (BEiT)
    dropout: float = 0.1          # on the attention and FFN outputs before the residual
    attn_dropout: float = 0.1     # on the attention probabilities
    act_dropout: float = 0.0      # after the FFN's GELU
    layerdrop: float = 0.0        # probability of skipping a whole block while training (wav2vec 2.0)
    drop_path: float = 0.0        # stochastic depth, rising linearly to this value in the last block (BEiT)
    layer_scale: float = 0.0      # > 0: per-channel residual scale initialised to this value (BEiT: 1e-4)
    k_bias: bool = True           # BEiT has q and v biases but no k bias
    ln_eps: float = 1e-5
    final_ln: bool = False        # LayerNorm after the last block (pre-LN models need one)
    rel_pos_grid: tuple[int, int] | None = None  # (h, w) patch grid: BEiT's shared relative position bias
    rel_pos_len: int = 0          # > 0: a 1D relative position bias for sequences of up to this many steps (text)
    rel_pos_per_layer: bool = False  # with either: one bias table per block instead (BEiT's fine-tuned models)

    def __post_init__(self):
        if min(self.n_layer, self.dim, self.n_head, self.ffn_dim) < 1 or self.dim % self.n_head:
            raise ValueError(f"n_layer={self.n_layer} dim={self.dim} n_head={self.n_head} ffn_dim={self.ffn_dim}: "
                             "each at least 1, and dim a multiple of n_head")
        if self.rel_pos_grid and self.rel_pos_len:
            raise ValueError("a relative position bias is 2D (rel_pos_grid) or 1D (rel_pos_len), not both")


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, attn_dropout: float, k_bias: bool):
        super().__init__()
        assert dim % n_head == 0, f"dim {dim} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim)) if k_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        k_bias = self.k_bias if self.k_bias is not None else torch.zeros_like(self.q_bias)
        qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, k_bias, self.v_bias]))  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)      # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))                              # (B, T, C)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device, dtype=x.dtype) >= p   # (B, 1, 1)
    return x * keep / (1 - p)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, drop_path: float):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.drop_path = drop_path
        self.attn = Attention(cfg.dim, cfg.n_head, cfg.attn_dropout, cfg.k_bias)
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.act_drop = nn.Dropout(cfg.act_dropout)
        if cfg.layer_scale > 0:
            self.gamma1 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale))
            self.gamma2 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale))
        else:
            self.gamma1 = self.gamma2 = None
        self.rel_pos = RelativePositionBias.of(cfg) if cfg.rel_pos_per_layer else None

    def ffn(self, x: Tensor) -> Tensor:
        return self.fc2(self.act_drop(F.gelu(self.fc1(x))))

    def forward(self, x: Tensor, attn_mask: Tensor | None, target_layer: str | None = None) -> tuple[Tensor, Tensor | None]:
        if self.rel_pos is not None:
            attn_mask = add_bias(attn_mask, self.rel_pos(x.shape[1]).unsqueeze(0).to(x.dtype))  # (B or 1, H, T, T)
        if self.pre_ln:
            a = self.attn(self.ln1(x), attn_mask)
            x = x + drop_path(self._scale(self.drop(a), self.gamma1), self.drop_path, self.training)
            h = self.ffn(self.ln2(x))
            out = x + drop_path(self._scale(self.drop(h), self.gamma2), self.drop_path, self.training)
        else:
            a = self.attn(x, attn_mask)
            x = self.ln1(x + self.drop(a))
            h = self.ffn(x)
            out = self.ln2(x + self.drop(h))
        target = {"ffn": h, "attn": a, "block": out, None: None}[target_layer]
        return out, target

    @staticmethod
    def _scale(x: Tensor, gamma: Tensor | None) -> Tensor:
        return x if gamma is None else x * gamma


def relative_position_index(h: int, w: int) -> Tensor:
    """BEiT's index into the relative position bias table, for a CLS token followed by an h x w patch grid.

    Patch pairs index (dy + h - 1) * (2w - 1) + (dx + w - 1); the last three rows of the table are
    CLS-to-patch, patch-to-CLS and CLS-to-CLS. Returns (h*w + 1, h*w + 1) long.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]                                                     # (2, N, N)
    patch_index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)                                   # (N, N)
    n_rel = (2 * h - 1) * (2 * w - 1)
    index = torch.empty(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, :] = n_rel          # CLS attends to patches
    index[:, 0] = n_rel + 1      # patches attend to CLS
    index[0, 0] = n_rel + 2      # CLS to CLS
    return index


def relative_position_index_1d(n: int) -> Tensor:
    """The 1D analogue for a sequence of n steps: query i, key j read row i - j + n - 1 of a (2n - 1)-row table.
    Returns (n, n) long."""
    steps = torch.arange(n)
    return steps[:, None] - steps[None, :] + n - 1


def add_bias(mask: Tensor | None, bias: Tensor) -> Tensor:
    """An SDPA mask (None; bool, True = attend; or additive float) plus an additive bias (1, H, T, T)."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


class RelativePositionBias(nn.Module):
    """One learned bias per (head, relative offset), shared by all blocks (BEiT, data2vec vision), or one per block
    (rel_pos_per_layer: BEiT's and data2vec's fine-tuned image classifiers). index: (N, N) rows of the table for
    each (query, key) pair of the longest input; with `shorter`, a sequence of T < N steps reads its top-left (T, T)
    corner (a patch grid has exactly N steps)."""

    def __init__(self, index: Tensor, n_rows: int, n_head: int, shorter: bool):
        super().__init__()
        self.shorter = shorter
        self.table = nn.Parameter(torch.zeros(n_rows, n_head))
        self.register_buffer("index", index, persistent=False)

    @classmethod
    def of(cls, cfg: TransformerConfig) -> "RelativePositionBias | None":
        """The bias a config asks for: BEiT's over an h x w grid with a CLS token, a 1D one, or None."""
        if cfg.rel_pos_grid is not None:
            h, w = cfg.rel_pos_grid
            return cls(relative_position_index(h, w), (2 * h - 1) * (2 * w - 1) + 3, cfg.n_head, shorter=False)
        if cfg.rel_pos_len > 0:
            return cls(relative_position_index_1d(cfg.rel_pos_len), 2 * cfg.rel_pos_len - 1, cfg.n_head, shorter=True)
        return None

    def forward(self, T: int) -> Tensor:
        N = self.index.shape[0]
        if T > N or (T < N and not self.shorter):
            raise ValueError(f"an input of {T} steps does not fit the relative position bias, built for "
                             f"{'at most ' if self.shorter else ''}{N}")
        return self.table[self.index[:T, :T]].permute(2, 0, 1)   # (H, T, T)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        rates = torch.linspace(0, cfg.drop_path, cfg.n_layer).tolist()
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.rel_pos = None if cfg.rel_pos_per_layer else RelativePositionBias.of(cfg)
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps) if cfg.final_ln else None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # BERT's initialisation (fairseq init_bert_params): N(0, 0.02) weights, zero biases
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def attn_mask(self, x: Tensor, padding_mask: Tensor | None, allowed: Tensor | None = None) -> Tensor | None:
        """Combine the key-padding mask, an optional (T, T) mask of allowed query-key pairs and the relative
        position bias into one SDPA mask (bool: True = attend, or additive float)."""
        bias = self.rel_pos(x.shape[1]).unsqueeze(0).to(x.dtype) if self.rel_pos is not None else None  # (1, H, T, T)
        keep = None
        if padding_mask is not None:
            keep = ~padding_mask[:, None, None, :]                                              # (B, 1, 1, T)
        if allowed is not None:
            keep = allowed if keep is None else keep & allowed
            # every query keeps its own key, so no row is fully masked (a padded query would give NaN)
            keep = keep | torch.eye(x.shape[1], dtype=torch.bool, device=x.device)             # (B, 1, T, T) or (T, T)
        if keep is None or bias is None:
            return bias if keep is None else keep
        return bias.masked_fill(~keep, float("-inf"))                                           # (B, H, T, T)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        target_layer: str | None = None,
        allowed: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """x: (B, T, C), padding_mask: (B, T) bool, True = padding; allowed: (T, T) bool, True where query i may
        attend to key j (data2vec.local_window: a teacher restricted to a local context), None = everywhere.

        Returns the final output (B, T, C) and, when target_layer is given, the list of each block's target
        tensor (B, T, C), bottom block first. Layerdrop skips blocks only in training (never in the teacher).
        """
        mask = self.attn_mask(x, padding_mask, allowed)
        targets = []
        for block in self.blocks:
            if self.training and self.cfg.layerdrop > 0 and torch.rand(()) < self.cfg.layerdrop:
                continue
            x, t = block(x, mask, target_layer)
            if target_layer is not None:
                targets.append(t)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return x, targets

    def flops_per_token(self, T: int) -> int:
        """Forward matmul FLOPs per token: projections, FFN, and attention scores + weighted sum over T keys."""
        C, F_ = self.cfg.dim, self.cfg.ffn_dim
        per_layer = 2 * (4 * C * C + 2 * C * F_) + 2 * 2 * T * C
        return self.cfg.n_layer * per_layer
