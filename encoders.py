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
import torch.nn.functional as F
from torch import Tensor


class TextEncoder(nn.Module):
    """RoBERTa's embeddings: token embedding + learned positions + LayerNorm (SPEC §2, §5).

    Positions follow RoBERTa: position id = (count of real tokens so far) + 1, so the first token reads row 2
    and padding reads row 1 (fairseq's padding_idx + 1 offset); the table has max_len + 2 rows.
    There is no apply_mask: the student's view is BERT's corrupted token ids (masking.bert_mask), which
    data2vec.py embeds with embed(). positions=False leaves the table out: the Transformer's relative position bias
    (rel_pos_len) then carries word order, and nothing about where a step sits reaches the targets from here.
    """

    n_prefix = 0

    def __init__(self, vocab_size: int, dim: int, max_len: int, pad_id: int, dropout: float, ln_eps: float = 1e-5,
                 positions: bool = True):
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.positions = nn.Embedding(max_len + 2, dim, padding_idx=1) if positions else None
        self.ln = nn.LayerNorm(dim, eps=ln_eps)
        self.drop = nn.Dropout(dropout)
        for emb in (self.tokens, self.positions):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
                emb.weight.data[emb.padding_idx].zero_()

    def embed(self, tokens: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens: (B, T) long -> x (B, T, C), padding_mask (B, T) bool (read from the pad id)."""
        return self.tokens(tokens), tokens == self.pad_id

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        if self.positions is None:
            return self.drop(self.ln(x))
        keep = (~padding_mask).long()                                # (B, T)
        position_ids = torch.cumsum(keep, dim=1) * keep + 1          # (B, T): 2, 3, ... for tokens, 1 for padding
        return self.drop(self.ln(x + self.positions(position_ids)))


class PatchEncoder(nn.Module):
    """BEiT's patch embedding (data2vec vision, SPEC §2): a Conv2d with kernel = stride = patch size, a CLS token in
    front, a learned mask embedding for the student. No absolute positions: the Transformer's shared relative
    position bias (rel_pos_grid) carries them. Names follow Hugging Face's Data2VecVisionModel, whose
    `embeddings.{cls_token, mask_token, patch_embeddings.projection}` map onto `{cls_token, mask_token, projection}`.
    """

    n_prefix = 1

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.projection = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # BEiT: truncated normal, std 0.02, for both tokens
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def embed(self, images: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, None]:
        """images: (B, C_in, H, W) -> x (B, h*w, C) in row-major patch order (block_mask's order); no padding."""
        return self.projection(images).flatten(2).transpose(1, 2), None

    def apply_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, N, C), mask: (B, N) bool, True = masked -> the mask embedding there."""
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, N, C) -> (B, 1 + N, C) with the CLS token first."""
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


def conv_output_lengths(lengths: Tensor, kernels: tuple[int, ...], strides: tuple[int, ...]) -> Tensor:
    """Frames of a stack of unpadded convolutions: each layer maps L samples to floor((L - k) / s) + 1.

    A frame exists only where the layer's whole receptive field lies inside the real samples, so the frames of a
    padded row that this formula counts are exactly the frames the row would give alone. lengths: (B,) long.
    """
    for k, s in zip(kernels, strides):
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return lengths


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels (affine) -> GELU: wav2vec 2.0's "layer_norm" extractor mode."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=False)
        self.layer_norm = nn.LayerNorm(out_dim)
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)                                                        # (B, C, T')
        return F.gelu(self.layer_norm(x.transpose(1, 2)).transpose(1, 2))      # per frame, so padding stays apart


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0's feature encoder: the first `depth` of 7 conv layers (SPEC §2). All 7: 16 kHz -> 50 Hz,
    receptive field 400 samples (25 ms), hop 320 (20 ms)."""

    KERNELS = (10, 3, 3, 3, 3, 2, 2)
    STRIDES = (5, 2, 2, 2, 2, 2, 2)

    def __init__(self, channels: int, depth: int):
        super().__init__()
        assert 1 <= depth <= len(self.KERNELS), f"conv depth {depth} must be in 1..{len(self.KERNELS)}"
        self.kernels, self.strides = self.KERNELS[:depth], self.STRIDES[:depth]
        dims = [1] + [channels] * depth
        self.conv_layers = nn.ModuleList(
            [ConvLayer(dims[i], dims[i + 1], k, s) for i, (k, s) in enumerate(zip(self.kernels, self.strides))])

    def forward(self, wave: Tensor) -> Tensor:
        x = wave.unsqueeze(1)                                                   # (B, 1, S)
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)                                                # (B, T, channels)


class FeatureProjection(nn.Module):
    """LayerNorm(channels) -> Linear(channels, dim): conv features to the Transformer's width."""

    def __init__(self, channels: int, dim: int, ln_eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(channels, eps=ln_eps)
        self.projection = nn.Linear(channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.layer_norm(x))


class PosConvLayer(nn.Module):
    """Conv1d(dim, dim, k, groups) -> LayerNorm (no affine) -> GELU; 'same' length for odd and even kernels
    (an even kernel with padding k // 2 gives one extra frame, which is cut off as Hugging Face's pad layer does)."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.trim = 1 - kernel % 2
        # wav2vec 2.0's initialisation of its single pos conv (fairseq's make_conv_pos): N(0, sqrt(4 / (kernel * dim))),
        # zero bias. fairseq's multi-layer block (data2vec audio's 5 layers) keeps PyTorch's default instead; every
        # layer count here keeps this one, with which the README's speech runs were measured
        nn.init.normal_(self.conv.weight, std=(4 / (kernel * dim)) ** 0.5)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)                                                        # (B, C, T + 1 - k % 2)
        x = x[:, :, : x.shape[2] - self.trim]                                   # (B, C, T)
        return F.gelu(self.layer_norm(x.transpose(1, 2)).transpose(1, 2))


class PosConv(nn.Module):
    def __init__(self, dim: int, n_layers: int, kernel: int, groups: int):
        super().__init__()
        self.layers = nn.ModuleList([PosConvLayer(dim, kernel, groups) for _ in range(n_layers)])

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)                                                   # (B, C, T)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)                                                # (B, T, C)


class SpeechEncoder(nn.Module):
    """data2vec audio's front end (SPEC §2, speech): conv feature encoder -> LayerNorm -> Linear(channels, dim);
    the student's masked frames get one learned embedding; then the conv positional encoding (added), LayerNorm
    and dropout. The teacher borrows all of it (fairseq's ema_transformer_only).

    Parameter names follow Hugging Face's Data2VecAudioModel: `feature_extractor.conv_layers.{i}.{conv,layer_norm}`,
    `feature_projection.{layer_norm,projection}` and `masked_spec_embed` map one to one; HF's
    `encoder.pos_conv_embed.layers.{i}.conv` and `encoder.layer_norm` are this module's `pos_conv_embed.layers.{i}.conv`
    and `layer_norm` (this module sits at `encoder.` in Data2Vec, so the full keys even coincide).
    """

    n_prefix = 0

    def __init__(self, dim: int, channels: int = 512, depth: int = 7, pos_layers: int = 5, pos_kernel: int = 19,
                 pos_groups: int = 16, dropout: float = 0.1, ln_eps: float = 1e-5):
        super().__init__()
        self.feature_extractor = ConvFeatureExtractor(channels, depth)
        self.feature_projection = FeatureProjection(channels, dim, ln_eps)
        # fairseq and HF: uniform [0, 1) initialisation
        self.masked_spec_embed = nn.Parameter(torch.rand(dim))
        self.pos_conv_embed = PosConv(dim, pos_layers, pos_kernel, pos_groups)
        self.layer_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Samples per row (B,) -> frames per row (B,)."""
        fe = self.feature_extractor
        return conv_output_lengths(lengths, fe.kernels, fe.strides)

    def embed(self, wave: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """wave: (B, S) normalised waveforms, padding_mask: (B, S) bool, True = padded sample.

        Returns x (B, T, dim) and the frame-level padding mask (B, T) bool (None when the batch is unpadded).
        """
        x = self.feature_projection(self.feature_extractor(wave))              # (B, T, dim)
        if padding_mask is None:
            return x, None
        frames = self.frame_lengths((~padding_mask).sum(1))                     # (B,)
        return x, torch.arange(x.shape[1], device=x.device) >= frames[:, None]  # (B, T)

    def apply_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, T, C), mask: (B, T) bool, True = masked -> the mask embedding there."""
        return torch.where(mask.unsqueeze(-1), self.masked_spec_embed.to(x.dtype), x)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if padding_mask is not None:
            # padded frames are zeroed before the pos conv (fairseq, HF), so its first layer sees what an
            # unpadded row sees; later layers still see their neighbours' outputs there (tests/test_speech.py)
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)                  # (B, T, C)
        x = x + self.pos_conv_embed(x)
        return self.drop(self.layer_norm(x))
