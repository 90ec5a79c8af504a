"""data2vec: a student regresses, at masked steps, the average of the top K blocks of an EMA teacher that saw the
unmasked input (SPEC §1). This file holds the whole objective: the student model (feature encoder, Transformer,
regression head), the EMA teacher, target construction, the loss and the collapse monitors.

The teacher is a plain object, not a submodule of the student: DDP wraps only the student (SPEC §6), and the
teacher is updated from the unwrapped student after each optimizer step. The feature encoder (and, per recipe,
positions and embedding LayerNorm) lives only in the student; the teacher borrows it, so nothing is duplicated.
"""

import copy
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transformer import TARGET_LAYERS, Transformer, TransformerConfig

NORMS = ("layer", "instance", "none")    # normalize()'s kinds


@dataclass
class TargetConfig:
    top_k: int = 8                  # average the top K teacher blocks
    target_layer: str = "ffn"       # "ffn" | "block" | "attn": which tensor of each block (transformer.py)
    target_norm: str = "instance"   # per-layer norm: "instance" (over time) | "layer" (over channels) | "none"
    final_norm: str = "none"        # norm of the K-layer average: same choices
    loss_beta: float = 0.0          # 0: squared error; > 0: Smooth L1 with this beta
    loss_scale: bool = True         # scale the per-step loss by 1/sqrt(C)
    teacher_context: int = 0        # 0: the teacher attends over the whole input; odd w > 0: a window of w steps
                                    # (w x w patches) centred on each step, radius w // 2 (1: the step alone)

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: the targets average at least one block")
        if self.target_layer not in TARGET_LAYERS:
            raise ValueError(f"target_layer={self.target_layer!r}: use one of {', '.join(TARGET_LAYERS)}")
        for name in ("target_norm", "final_norm"):
            if getattr(self, name) not in NORMS:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {', '.join(NORMS)}")
        if self.teacher_context < 0 or (self.teacher_context > 0 and self.teacher_context % 2 == 0):
            raise ValueError(f"teacher_context={self.teacher_context}: 0 (the whole input) or an odd window width, "
                             "centred on each step")


def check_depth(targets: TargetConfig, n_layer: int) -> None:
    """The targets average the top K of the student's blocks, so K cannot exceed its depth."""
    if targets.top_k > n_layer:
        raise ValueError(f"top_k={targets.top_k}: the targets average the top K of the n_layer={n_layer} blocks")


def ema_tau(step: int, tau_0: float, tau_e: float, tau_n: int) -> float:
    """Linear EMA decay schedule from tau_0 to tau_e over tau_n updates, then constant (SPEC §1.7)."""
    if step >= tau_n:
        return tau_e
    return tau_e - (tau_e - tau_0) * (1 - step / tau_n)


class EMATeacher:
    """An exponential moving average of the student's Transformer, in fp32, always in eval mode, never trained."""

    def __init__(self, student: Transformer, tau_0: float, tau_e: float, tau_n: int):
        self.model = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.tau_0, self.tau_e, self.tau_n = tau_0, tau_e, tau_n

    def tau(self, step: int) -> float:
        return ema_tau(step, self.tau_0, self.tau_e, self.tau_n)

    @torch.no_grad()
    def update(self, student: Transformer, step: int) -> None:
        """teacher <- tau * teacher + (1 - tau) * student over float parameters; buffers are copied."""
        tau = self.tau(step)
        if tau >= 1:
            return
        pairs = [(t, s) for t, s in zip(self.model.parameters(), student.parameters()) if t.is_floating_point()]
        teacher_params = [t for t, _ in pairs]
        student_params = [s.detach().float() for _, s in pairs]
        torch._foreach_lerp_(teacher_params, student_params, 1 - tau)
        for t, s in zip(self.model.buffers(), student.buffers()):
            t.copy_(s)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def to(self, device: torch.device | str) -> "EMATeacher":
        self.model.to(device)
        return self


@functools.lru_cache(maxsize=16)
def local_window(n: int, radius: int, grid: tuple[int, int] | None = None, prefix: int = 0,
                 device: torch.device | str = "cpu") -> Tensor:
    """Which keys each query may attend to when attention is restricted to a local window (the paper's ablation of
    contextualised targets, §5): those at most radius steps away. Steps are a sequence of n (text, speech) or an
    h x w patch grid in row-major order (vision), where the window is a square; prefix tokens (CLS) see only themselves,
    so no information travels around the window through them. Returns (prefix + n, prefix + n) bool, True = attend;
    cached, as the teacher asks for the same window every step (callers must not modify it).
    """
    if grid is not None:
        assert grid[0] * grid[1] == n, f"grid {grid} does not hold {n} steps"
        coords = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")).flatten(1)
    else:
        coords = torch.arange(n).unsqueeze(0)                                       # (1, n)
    dist = (coords[:, :, None] - coords[:, None, :]).abs().amax(0)                  # (n, n) Chebyshev distance
    allowed = torch.eye(prefix + n, dtype=torch.bool)
    allowed[prefix:, prefix:] = dist <= radius
    return allowed.to(device)


def normalize(y: Tensor, kind: str, padding_mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Parameter-free normalisation of targets, y: (B, T, C).

    "layer": over channels per step. "instance": per sample and channel over time, excluding padded steps, so a
    padded batch gives the same targets as each utterance alone (SPEC §6). "none": unchanged.
    """
    if kind == "layer":
        return F.layer_norm(y, y.shape[-1:], eps=eps)
    if kind == "instance":
        if padding_mask is None:
            return F.instance_norm(y.transpose(1, 2), eps=eps).transpose(1, 2)
        valid = (~padding_mask).unsqueeze(-1).to(y.dtype)                          # (B, T, 1)
        n = valid.sum(1, keepdim=True).clamp(min=1)                                 # (B, 1, 1)
        mean = (y * valid).sum(1, keepdim=True) / n                                 # (B, 1, C)
        var = ((y - mean) ** 2 * valid).sum(1, keepdim=True) / n                    # (B, 1, C) biased, as F.instance_norm
        return (y - mean) / torch.sqrt(var + eps)
    if kind == "none":
        return y
    raise ValueError(f"unknown norm {kind!r}: use one of {', '.join(NORMS)}")


def build_targets(layers: list[Tensor], cfg: TargetConfig, padding_mask: Tensor | None = None,
                  prefix: int = 0) -> Tensor:
    """Average of the top K teacher layers, each normalised in fp32, then the optional final norm. -> (B, T, C)

    Instance norm's statistics leave out padded steps and the first `prefix` steps (the encoder's CLS), which are
    never targets."""
    if prefix and "instance" in (cfg.target_norm, cfg.final_norm):        # layer norm reads no statistics over time
        B, T = layers[0].shape[:2]
        skip = padding_mask.clone() if padding_mask is not None else torch.zeros(B, T, dtype=torch.bool,
                                                                                 device=layers[0].device)
        skip[:, :prefix] = True                                                 # (B, T)
        padding_mask = skip
    top = layers[-cfg.top_k:]
    y = sum(normalize(t.float(), cfg.target_norm, padding_mask) for t in top) / len(top)
    return normalize(y, cfg.final_norm, padding_mask)


def regression_loss(pred: Tensor, target: Tensor, beta: float, scale: bool) -> Tensor:
    """Summed over channels and steps: squared error (beta = 0) or Smooth L1 (beta > 0); pred, target: (N, C)."""
    if beta == 0:
        loss = F.mse_loss(pred.float(), target, reduction="none")
    else:
        loss = F.smooth_l1_loss(pred.float(), target, reduction="none", beta=beta)
    loss = loss.sum()
    return loss / pred.shape[-1] ** 0.5 if scale else loss


class Data2Vec(nn.Module):
    """The student: feature encoder -> Transformer -> regression head, trained against an EMATeacher."""

    def __init__(self, encoder: nn.Module, cfg: TransformerConfig, targets: TargetConfig, head_hidden: bool):
        super().__init__()
        check_depth(targets, cfg.n_layer)
        self.encoder = encoder
        self.student = Transformer(cfg)
        self.targets = targets
        C = cfg.dim
        # text: Linear(C, 2C) -> GELU -> Linear(2C, C) (data2vec text); speech, vision: Linear(C, C)
        self.head = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C)) if head_hidden else nn.Linear(C, C)

    def embed(self, source: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The shared features x (B, T, C) of the raw batch, and the padding mask over the steps the Transformer
        sees, (B, T') with T' = n_prefix + T (the encoder's prefix, e.g. CLS, is never padding), or None."""
        x, padding_mask = self.encoder.embed(source, padding_mask)
        prefix = self.encoder.n_prefix
        if padding_mask is not None and prefix:
            padding_mask = F.pad(padding_mask, (prefix, 0), value=False)        # (B, T')
        return x, padding_mask

    def masked_rows(self, mask: Tensor) -> Tensor:
        """mask: (B, T) bool over feature steps -> (N,) rows of the masked steps in the flattened (B * T', C)
        features, T' = n_prefix + T, in the order of boolean indexing. train.py computes them on the CPU, where the
        masks are drawn: on a GPU, mask.nonzero() would make the host wait for the device twice a micro-step."""
        B, T = mask.shape
        b, t = mask.nonzero(as_tuple=True)                                      # (N,), (N,)
        prefix = self.encoder.n_prefix
        return b * (prefix + T) + prefix + t

    @torch.no_grad()
    def teacher_targets(self, teacher: EMATeacher, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The teacher reads the unmasked features through the (shared) encoder tail, in eval mode like the teacher
        itself (SPEC §1.3): no dropout on its input. -> (B, T', C) fp32"""
        training = self.encoder.training
        h = self.encoder.eval()(x, padding_mask)                                # (B, T', C)
        self.encoder.train(training)
        allowed = None
        if self.targets.teacher_context > 0:
            prefix = self.encoder.n_prefix
            allowed = local_window(h.shape[1] - prefix, self.targets.teacher_context // 2, teacher.model.cfg.rel_pos_grid,
                                   prefix, h.device)                            # (T', T')
        _, layers = teacher.model(h, padding_mask, self.targets.target_layer, allowed)
        return build_targets(layers, self.targets, padding_mask, self.encoder.n_prefix)

    def forward(
        self,
        source: Tensor,
        mask: Tensor,
        teacher: EMATeacher,
        padding_mask: Tensor | None = None,
        student_source: Tensor | None = None,
        mask_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """source: the raw batch (tokens, images or waveforms); mask: (B, T) bool over feature steps, True = masked.
        student_source: text only, BERT's corrupted ids (the student embeds them instead of a mask embedding).
        mask_rows: masked_rows(mask), precomputed; None = computed here.

        Returns (loss summed over masked steps, predictions (N, C), targets (N, C)) with N = mask.sum();
        train.py divides the sum by the masked-step count of the whole global batch (SPEC §1.6).
        """
        x, padding_mask = self.embed(source, padding_mask)                      # (B, T, C), (B, T') or None
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the {tuple(x.shape[:2])} feature steps of "
                             "this batch")
        if student_source is not None:
            xs = self.encoder.embed(student_source)[0]
        else:
            xs = self.encoder.apply_mask(x, mask)
        rows = self.masked_rows(mask) if mask_rows is None else mask_rows       # (N,)

        y = self.teacher_targets(teacher, x, padding_mask).flatten(0, 1)[rows]  # (N, C)
        h, _ = self.student(self.encoder(xs, padding_mask), padding_mask)      # (B, T', C)
        pred = self.head(h.flatten(0, 1)[rows])                                 # (N, C)
        loss = regression_loss(pred, y, self.targets.loss_beta, self.targets.loss_scale)
        return loss, pred.detach(), y


def collapse_stat(y: Tensor) -> float:
    """Mean over channels of the standard deviation over steps, sqrt(var + 1e-6), over all ranks (SPEC §1.8).

    y: (N, C). target_var near 0 means the teacher maps every input to the same vector: collapse.
    """
    y = y.float()
    stats = torch.cat([y.sum(0), (y * y).sum(0), y.new_tensor([y.shape[0]])])  # (2C + 1,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    C = y.shape[1]
    s, ss, n = stats[:C], stats[C:2 * C], stats[-1]
    var = (ss - s * s / n) / (n - 1).clamp(min=1)
    return torch.sqrt(var.clamp(min=0) + 1e-6).mean().item()
