"""Pretrain data2vec.

One process (CPU laptop or one GPU):
    python train.py --modality=text
Several GPUs on one machine (or CPU processes, gloo):
    torchrun --standalone --nproc_per_node=4 train.py --modality=text --preset=base
Several machines: torchrun's usual --nnodes/--node_rank/--master_addr/--master_port flags.

Settings: a dataclass Config below; a modality preset (`--preset=small|base|large`) applies first, then
`--key=value` overrides, each type-checked against the field. `--resume` continues the run in --out_dir exactly.
"""

import difflib
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data2vec import Data2Vec, EMATeacher, TargetConfig, collapse_stat
from encoders import TextEncoder
from masking import bert_mask
from text_data import DataError, TextPretrainData, prepare_text
from transformer import TransformerConfig

ROOT = Path(__file__).resolve().parent


@dataclass
class Config:
    # what and where
    modality: str = "text"      # text (vision and speech come from the same recipe)
    preset: str = "small"       # small: CPU in minutes; base / large: the paper's sizes (SPEC §2)
    data: str = ""              # '' = the embedded default corpus; else your .txt file or folder
    out_dir: str = ""           # '' = out-<modality>
    resume: bool = False        # continue the run in out_dir from its ckpt.pt, exactly
    # length and batch
    max_iters: int = 600
    batch_size: int = 16        # sequences per micro-step per process
    grad_accum: int = 1         # micro-steps per optimizer step, summed over all processes
    eval_interval: int = 100
    eval_iters: int = 8         # held-out batches per evaluation
    log_interval: int = 10
    ckpt_interval: int = 200
    # Transformer (transformer.TransformerConfig)
    n_layer: int = 4
    dim: int = 256
    n_head: int = 4
    ffn_dim: int = 1024
    pre_ln: bool = False
    dropout: float = 0.1
    attn_dropout: float = 0.1
    act_dropout: float = 0.0
    layerdrop: float = 0.0
    drop_path: float = 0.0
    layer_scale: float = 0.0
    k_bias: bool = True
    ln_eps: float = 1e-5
    final_ln: bool = False
    # text
    block_size: int = 128       # tokens per sequence, <s> and </s> included
    vocab_size: int = 8192      # BPE types trained on the corpus when GPT-2's files are not cached
    tokenizer: str = "auto"     # auto (gpt2 if cached, else bpe) | gpt2 | bpe
    mask_prob: float = 0.15
    # vision (VisionTask)
    # speech (SpeechTask)
    # targets and loss (data2vec.TargetConfig)
    top_k: int = 3
    target_layer: str = "ffn"   # ffn | block | attn
    target_norm: str = "layer"  # per-layer: layer | instance | none
    final_norm: str = "none"    # of the K-layer average: layer | instance | none
    loss_beta: float = 4.0      # 0 = squared error, > 0 = Smooth L1 with this beta
    loss_scale: bool = False    # scale the loss by 1/sqrt(C)
    # EMA teacher: tau from tau_0 to tau_e over tau_n updates
    tau_0: float = 0.99
    tau_e: float = 0.999
    tau_n: int = 600
    # optimiser: Adam(W), warmup then hold then decay (tri) or cosine
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-6
    schedule: str = "tri"       # tri (warmup / hold / linear decay) | cosine (warmup / cosine decay)
    warmup: float = 0.05        # fraction of max_iters
    hold: float = 0.80          # fraction of max_iters (tri only)
    grad_clip: float = 1.0      # 0 = off
    # system
    device: str = "auto"        # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"         # auto (bf16 where supported, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False       # torch.compile the student
    seed: int = 0


# Paper-exact sizes and recipes (SPEC §2) plus a small CPU preset: the same recipe, scaled down.
PRESETS: dict[str, dict[str, dict]] = {
    "text": {
        "small": dict(),
        "base": dict(
            n_layer=12, dim=768, n_head=12, ffn_dim=3072, block_size=512, batch_size=32, grad_accum=8,
            max_iters=1_000_000, top_k=10, tau_0=0.999, tau_e=0.9999, tau_n=100_000, lr=2e-4,
            warmup=0.05, hold=0.80, vocab_size=50_000, eval_interval=5000, ckpt_interval=5000, log_interval=100,
        ),
        "large": dict(
            n_layer=24, dim=1024, n_head=16, ffn_dim=4096, block_size=512, batch_size=16, grad_accum=16,
            max_iters=1_000_000, top_k=10, tau_0=0.999, tau_e=0.9999, tau_n=100_000, lr=2e-4,
            warmup=0.05, hold=0.80, vocab_size=50_000, eval_interval=5000, ckpt_interval=5000, log_interval=100,
        ),
    },
    # "vision": {...},
    # "speech": {...},
}

# Fields that fix the model or the data; a resumed run must agree with its checkpoint on these.
ARCH_FIELDS = [f.name for f in fields(TransformerConfig) if f.name != "rel_pos_grid"] + [
    "modality", "data", "block_size", "vocab_size", "tokenizer", "seed"]


class ConfigError(Exception):
    pass


class CheckpointError(Exception):
    pass


# -----------------------------------------------------------------------------
# configuration

def parse_value(field_type: type, key: str, text: str):
    if field_type is bool:
        if text.lower() in ("1", "true", "yes", ""):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--{key} takes true or false, not {text!r}")
    try:
        return field_type(text)
    except ValueError:
        raise ConfigError(f"--{key} takes a{'n' if field_type is int else ''} {field_type.__name__}, not {text!r}") from None


def parse_overrides(cls: type, argv: list[str]) -> dict:
    """--key=value (or --flag for true) into {key: typed value}, checked against the dataclass cls's fields."""
    types = {f.name: f.type for f in fields(cls)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: settings look like --key=value")
        key, _, value = arg[2:].partition("=")
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f"; did you mean --{close[0]}?" if close else f"; the settings are the fields of {cls.__name__}"
            raise ConfigError(f"unknown setting --{key}{hint}")
        overrides[key] = parse_value(types[key], key, value)
    return overrides


def parse_args(argv: list[str]) -> Config:
    """--key=value overrides on top of the modality's preset. Unknown keys get a suggestion."""
    overrides = parse_overrides(Config, argv)
    modality = overrides.get("modality", Config.modality)
    preset = overrides.get("preset", Config.preset)
    if modality not in PRESETS:
        raise ConfigError(f"unknown modality {modality!r}: choose one of {', '.join(PRESETS)}")
    if preset not in PRESETS[modality]:
        raise ConfigError(f"unknown preset {preset!r} for {modality}: choose one of {', '.join(PRESETS[modality])}")
    cfg = Config(**{**PRESETS[modality][preset], **overrides})
    if not cfg.out_dir:
        cfg.out_dir = f"out-{cfg.modality}"
    return cfg


def sub_config(cls: type, cfg: Config):
    """Pick the fields of a sub-config (TransformerConfig, TargetConfig) out of the flat Config."""
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


# -----------------------------------------------------------------------------
# modalities: each Task prepares its data, builds its model and draws pretraining batches

class TextTask:
    """Text: BPE tokens, RoBERTa embeddings, BERT masking (SPEC §2)."""

    def __init__(self, cfg: Config, prepare: bool):
        self.cfg = cfg
        self.data_dir = text_data_dir(cfg)
        if prepare:
            prepare_text(Path(cfg.data) if cfg.data else None, self.data_dir, cfg.vocab_size, cfg.tokenizer)
        self.data = TextPretrainData(self.data_dir, cfg.block_size)
        self.steps_per_sample = cfg.block_size          # for tokens/s

    def build_model(self) -> Data2Vec:
        cfg = self.cfg
        encoder = TextEncoder(self.data.vocab_size, cfg.dim, cfg.block_size, self.data.pad_id, cfg.dropout, cfg.ln_eps)
        return Data2Vec(encoder, sub_config(TransformerConfig, cfg), sub_config(TargetConfig, cfg), head_hidden=True)

    def batch(self, split: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        d = self.data
        tokens = d.batch(split, self.cfg.batch_size, generator)                              # (B, T)
        special = (tokens == d.bos_id) | (tokens == d.eos_id) | (tokens == d.pad_id)
        student, mask = bert_mask(tokens, mask_id=d.mask_id, n_normal=d.n_normal, special=special,
                                  generator=generator, prob=self.cfg.mask_prob)
        return dict(source=tokens, mask=mask, student_source=student)


def text_data_dir(cfg: Config) -> Path:
    """Where the tokenized data and tokenizer are cached: data/text for the default corpus, else beside the data."""
    if not cfg.data:
        return ROOT / "data" / "text"
    source = Path(cfg.data).resolve()
    return source.parent / f"{source.stem}-data2vec"


TASKS = {"text": TextTask}


def batch_seed(seed: int, step: int, index: int) -> int:
    """Each (step, global micro-batch index) draws its own data and masks: a pure function of the step, so resume
    is exact, and N processes with 1 micro-step see the batches 1 process with N micro-steps sees."""
    return (seed * 1_000_003 + step) * 10_007 + index


# -----------------------------------------------------------------------------
# schedules (pure functions of the step)

def lr_at(step: int, cfg: Config) -> float:
    warm = int(cfg.warmup * cfg.max_iters)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "tri":
        hold_end = warm + int(cfg.hold * cfg.max_iters)
        if step < hold_end:
            return cfg.lr
        frac = (step - hold_end) / max(1, cfg.max_iters - hold_end)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)
    if cfg.schedule == "cosine":
        frac = min(1.0, (step - warm) / max(1, cfg.max_iters - warm))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
    raise ConfigError(f"unknown --schedule={cfg.schedule}: use tri or cosine")


# -----------------------------------------------------------------------------
# system: processes, device, precision

def setup_system(cfg: Config) -> tuple[int, int, torch.device, torch.dtype]:
    """The one place that decides rank, device and dtype."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    else:
        device = cfg.device
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32   # CPUs without native bf16 are slower in bf16 than in fp32
    else:
        dtype = getattr(torch, cfg.dtype, None)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"--dtype={cfg.dtype}: use auto, float32, bfloat16 or float16")
    if cfg.grad_accum % world:
        raise ConfigError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    return rank, world, device, dtype


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write never replaces the last good checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: train without --resume first, or point --out_dir at a run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or not a checkpoint of "
                              f"this project; delete it or use another --out_dir") from None


def check_compatible(ckpt: dict, cfg: Config, path: Path) -> None:
    saved = ckpt.get("config", {})
    diff = [f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in ARCH_FIELDS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"{path} was trained with other settings: {', '.join(diff)}. Resume with the same "
                              f"settings, or start a new run in another --out_dir")


def load_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    """Strict loading with a readable list of what does not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}: the {what} does not fit this model; missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}")
    module.load_state_dict(state)


# -----------------------------------------------------------------------------
# the training loop

def forward_backward(model, teacher: EMATeacher, batches: list[dict], world: int, scaler, autocast):
    """Gradients of one optimizer step over this process's micro-batches, normalised by the masked-step count of
    the whole global batch (SPEC §1.6, §6): the result equals one big batch, however it is split into micro-steps
    and processes. Returns (loss sum over all processes, global masked count, predictions, targets)."""
    n_masked = all_reduce(sum(b["mask"].sum() for b in batches).float())     # masked steps in the global batch
    loss_sum = torch.zeros((), device=n_masked.device)
    preds, targets = [], []
    for m, b in enumerate(batches):
        if world > 1:
            # sync gradients only on the last micro-step; must be set before its forward
            model.require_backward_grad_sync = m == len(batches) - 1
        with autocast:
            loss, pred, y = model(**b, teacher=teacher)
        # DDP averages gradients over processes; scaling by world makes the result sum / global count
        scaler.scale(loss * world / n_masked).backward()
        loss_sum += loss.detach().float()
        preds.append(pred)
        targets.append(y)
    return all_reduce(loss_sum), n_masked, preds, targets


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def plot_history(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(history["step"], history["loss"], label="train", lw=1)
    ax[0].plot(history["eval_step"], history["eval_loss"], "o-", label="held-out")
    ax[0].set(xlabel="step", ylabel="loss", title="data2vec loss")
    ax[0].legend()
    ax[1].plot(history["step"], history["target_var"], label="target_var")
    ax[1].plot(history["step"], history["pred_var"], label="pred_var")
    ax[1].set(xlabel="step", title="collapse monitors (std over masked steps)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: Config) -> Path:
    rank, world, device, dtype = setup_system(cfg)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if not cfg.resume and ckpt_path.exists():
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out_dir")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None:
        check_compatible(ckpt, cfg, ckpt_path)

    # ---- data (rank 0 prepares, the others wait) ----
    if master:
        task = TASKS[cfg.modality](cfg, prepare=True)
    if dist.is_initialized():
        dist.barrier()
    if not master:
        task = TASKS[cfg.modality](cfg, prepare=False)

    # ---- model, teacher, optimiser ----
    torch.manual_seed(cfg.seed)             # the same initial weights in every process (teacher included)
    model = task.build_model().to(device)
    teacher = EMATeacher(model.student, cfg.tau_0, cfg.tau_e, cfg.tau_n).to(device)
    torch.manual_seed(cfg.seed + rank)      # each process its own dropout stream
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0
    history = {"step": [], "loss": [], "target_var": [], "pred_var": [], "eval_step": [], "eval_loss": []}
    if ckpt is not None:
        load_state(model, ckpt["model"], "student", ckpt_path)
        load_state(teacher.model, ckpt["teacher"], "teacher", ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, history = ckpt["step"], ckpt["history"]
        set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
        say(f"resuming {ckpt_path} at step {step}")
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def batch(split: str, step: int, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(batch_seed(cfg.seed, step, index))
        return {k: v.to(device, non_blocking=True) for k, v in task.batch(split, g).items()}

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, device=device)              # loss sum, masked-step count
        for i in range(rank, cfg.eval_iters, world):
            b = batch("val", -1, i)
            with autocast:
                loss, _, _ = model(**b, teacher=teacher)
            total += torch.stack([loss.float(), b["mask"].sum().float()])
        model.train()
        total = all_reduce(total)
        return (total[0] / total[1]).item()

    def state() -> dict:
        return dict(model=raw_model.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=asdict(cfg), history=history,
                    rng=gather_rng_states(world))

    micro = cfg.grad_accum // world
    tokens_per_step = cfg.batch_size * cfg.grad_accum * task.steps_per_sample
    n_params = sum(p.numel() for p in raw_model.parameters())
    say(f"data2vec {cfg.modality}/{cfg.preset}: {n_params / 1e6:.2f}M parameters, {world} process(es) on {device}, "
        f"{dtype}, global batch {cfg.batch_size * cfg.grad_accum} x {task.steps_per_sample} steps, {cfg.max_iters} updates")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    t_start, t_last, last_step = time.time(), time.time(), step
    while step < cfg.max_iters:
        if step % cfg.eval_interval == 0:
            ev = evaluate()
            history["eval_step"].append(step)
            history["eval_loss"].append(ev)
            say(f"step {step}: held-out loss {ev:.4f}")

        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [batch("train", step, rank * micro + m) for m in range(micro)]
        loss_sum, n_masked, preds, targets = forward_backward(model, teacher, batches, world, scaler, autocast)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        teacher.update(raw_model.student, step)

        loss_value = (loss_sum / n_masked).item()
        if not math.isfinite(loss_value):
            kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written"
            raise FloatingPointError(f"the loss is {loss_value} at step {step}: stopping; {kept}. "
                                     f"Lower --lr (now {cfg.lr:g}) or check the data")
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            target_var = collapse_stat(torch.cat(targets))
            pred_var = collapse_stat(torch.cat(preds))
            history["step"].append(step)
            history["loss"].append(loss_value)
            history["target_var"].append(target_var)
            history["pred_var"].append(pred_var)
            now = time.time()
            dt = (now - t_last) / max(1, step - last_step)
            t_last, last_step = now, step
            say(f"step {step}/{cfg.max_iters} | loss {loss_value:.4f} | target_var {target_var:.3f} | "
                f"pred_var {pred_var:.3f} | tau {teacher.tau(step):.4f} | lr {lr:.2e} | "
                f"{tokens_per_step / dt:,.0f} tok/s | eta {format_eta(dt * (cfg.max_iters - step))}")
        if step % cfg.ckpt_interval == 0 or step == cfg.max_iters:
            if step == cfg.max_iters:
                ev = evaluate()
                history["eval_step"].append(step)
                history["eval_loss"].append(ev)
                say(f"step {step}: held-out loss {ev:.4f}")
            st = state()
            if master:
                save_checkpoint(ckpt_path, st)

    if master:
        plot_history(history, out_dir / "loss.png")
        say(f"done in {format_eta(time.time() - t_start)}; checkpoint: {ckpt_path} (loss curve: {out_dir / 'loss.png'})")
    return ckpt_path


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world: int) -> list[dict[str, torch.Tensor]]:
    """Every process's RNG state (dropout, layerdrop), so a resumed run continues each stream exactly."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def main(argv: list[str]) -> int:
    try:
        train(parse_args(argv))
    except (ConfigError, CheckpointError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
