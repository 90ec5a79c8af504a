"""Time the data2vec pretraining step and report throughput and model FLOPs utilisation (MFU).

    python bench.py --modality=text --n_layer=4 --dim=256 --n_head=4 --ffn_dim=1024 --block_size=128 --batch_size=16
    python bench.py --modality=text --preset=base --block_size=512 --batch_size=32 --dtype=bfloat16 --compile   # a GPU
    python bench.py --modality=text --profile    # then where a step's time goes, by operation (torch.profiler)

Settings are train.py's Config (same presets and --key=value overrides); --max_iters is the number of timed steps.
--profile (bench.py's own flag) profiles as many steps again, after the timing, and lists the ATen ops that take the
most time: on a CPU their own time, on a GPU the time of the kernels each launched itself.
A step is what train.py does per optimizer update: student forward + backward, teacher forward, optimizer, EMA
(without train.py's gradient clipping; --objective=mlm: no teacher forward, plus the scores over the vocabulary).
MFU = (matmul FLOPs of the step) / time / peak. The peak comes from a lookup by GPU name (dense bf16/fp16 tensor
cores), or, on a CPU, from a large fp32 matmul measured in the same run.
"""

import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from data2vec import Data2Vec, EMATeacher, TargetConfig
from mlm import MaskedLM
from text_data import DataError
from train import (TASKS, Config, ConfigError, Task, device_batch, forward_backward, out_of_memory, parse_args,
                   setup_system, split_help, usage)
from transformer import TransformerConfig

# Dense bf16 tensor-core peak FLOP/s by device name (vendor data sheets; SXM parts unless named)
GPU_PEAK = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def gpu_peak(name: str) -> float | None:
    for key, flops in GPU_PEAK.items():      # longer names first where they overlap ("H100 PCIe" before "H100")
        if key in name:
            return flops
    return None


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical peak of this machine."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_steps(step: Callable[[int], None], n: int, device: torch.device) -> tuple[float, list[tuple[str, float]]]:
    """Run n steps under torch.profiler. Returns the profiled step's wall time (the profiler slows it) and
    (op, seconds per step) for each ATen op, most time first: on a CPU its self time, on a GPU the time of the
    kernels it launched itself (not through the ops it called, so no kernel counts twice)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        sync(device)
        wall = (time.perf_counter() - t0) / n
    rows = [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total)
            for e in prof.key_averages() if e.device_type == DeviceType.CPU]        # kernels are events of their own
    return wall, sorted(((name, us / 1e6 / n) for name, us in rows if us > 0), key=lambda r: -r[1])


def print_profile(wall: float, rows: list[tuple[str, float]], flops: float, device: torch.device,
                  top: int = 12) -> None:
    what = "GPU time of the kernels each launched" if device.type == "cuda" else "own time"
    print(f"profiled step {wall * 1e3:.1f} ms (torch.profiler's overhead included); the {top} ATen ops that take "
          f"the most time ({what}):")
    for name, sec in rows[:top]:
        print(f"  {sec * 1e3:8.1f} ms {100 * sec / wall:5.1f} %  {name[:90]}")
    rest = sum(sec for _, sec in rows[top:])
    print(f"  {rest * 1e3:8.1f} ms {100 * rest / wall:5.1f} %  the other {len(rows[top:])}")
    mm = sum(sec for name, sec in rows if name in MATMUL_OPS)
    if mm > 0:
        print(f"matmuls ({', '.join(MATMUL_OPS)}): {mm * 1e3:.1f} ms = {100 * mm / wall:.1f} % of the profiled step; "
              f"the step's matmul FLOPs over this time: {flops / mm / 1e12:.3f} TFLOP/s (an upper bound: the sum "
              "leaves out the attention that runs inside SDPA kernels)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(model: Data2Vec, batch: dict, steps_per_sample: int) -> float:
    """Matmul FLOPs of one step: the Transformer (student forward + backward = 3 x forward, teacher 1 x forward)
    and the regression head on masked steps (forward + backward). The masked LM runs no teacher and scores every
    masked step against the whole vocabulary (the tied embedding)."""
    B = batch["mask"].shape[0]
    n_masked = int(batch["mask"].sum())
    mlm = isinstance(model, MaskedLM)
    transformer = (3 if mlm else 4) * B * steps_per_sample * model.student.flops_per_token(steps_per_sample)
    head_weights = sum(p.numel() for n, p in model.head.named_parameters() if n.endswith("weight"))
    if mlm:
        head_weights += model.encoder.tokens.weight.numel()
    return transformer + 3 * n_masked * 2 * head_weights


def main(argv: list[str]) -> int:
    profiling = "--profile" in argv
    argv = [a for a in argv if a != "--profile"]
    try:
        if any(a.startswith("--profile=") for a in argv):
            raise ConfigError("--profile takes no value: pass --profile to list where the step's time goes")
        asked, argv = split_help(argv)
        cfg = parse_args(["--max_iters=10", *argv])
        if asked:
            print(usage(__doc__, cfg, also=(TransformerConfig, TargetConfig)))
            return 0
        _, _, device, dtype = setup_system(cfg)
        task = TASKS[cfg.modality](cfg, prepare=True)
        torch.manual_seed(cfg.seed)
        model = task.build_model().to(device)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        measure(cfg, task, model, device, dtype, profiling)
    except RuntimeError as e:
        if (what := out_of_memory(e)) is None:
            raise
        print(f"error: {what}: lower --batch_size and raise --grad_accum by the same factor, which times the same "
              "number of tokens per step", file=sys.stderr)
        return 1
    return 0


def measure(cfg: Config, task: Task, model: Data2Vec | MaskedLM, device: torch.device, dtype: torch.dtype,
            profiling: bool) -> None:
    """Time cfg.max_iters steps after 3 warm-up steps, print the step's time, throughput, MFU and the EMA's share;
    with profiling, then where a profiled step's time goes."""
    teacher = EMATeacher(model.student, cfg.tau_0, cfg.tau_e, cfg.tau_n).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    run_model = torch.compile(model) if cfg.compile else model
    batches = [[device_batch(task, model, "train", torch.Generator().manual_seed(i * 100 + m), device)
                for m in range(cfg.grad_accum)] for i in range(4)]

    def step(i: int) -> None:
        forward_backward(run_model, teacher, batches[i % len(batches)], 1, scaler, autocast)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        teacher.update(model.student, i)

    for i in range(3):                       # warm-up (and compilation)
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(cfg.max_iters):
        step(i)
    sync(device)
    dt = (time.perf_counter() - t0) / cfg.max_iters

    t0 = time.perf_counter()
    for i in range(cfg.max_iters):
        teacher.update(model.student, i)
    sync(device)
    dt_ema = (time.perf_counter() - t0) / cfg.max_iters

    flops = sum(step_flops(model, b, task.steps_per_sample) for b in batches[0])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name) or measured_matmul_peak(device, torch.bfloat16, n=8192)
        peak_src = f"{name}, {'data sheet' if gpu_peak(name) else 'measured bf16 matmul'}"
    else:
        peak = measured_matmul_peak(device, torch.float32)
        peak_src = f"measured fp32 2048^3 matmul on {torch.get_num_threads()} threads"
    tokens = cfg.batch_size * cfg.grad_accum * task.steps_per_sample
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.modality}: {cfg.n_layer} layers x {cfg.dim}, {cfg.n_head} heads, {task.steps_per_sample} steps x "
          f"batch {cfg.batch_size * cfg.grad_accum}, {n_params / 1e6:.1f}M params, {device}, {dtype}, "
          f"compile={cfg.compile}")
    print(f"step {dt * 1e3:.1f} ms | {tokens / dt:,.0f} tokens/s | {flops / dt / 1e12:.3f} TFLOP/s | "
          f"peak {peak / 1e12:.3f} TFLOP/s ({peak_src}) | MFU {100 * flops / dt / peak:.1f} % | "
          f"EMA {dt_ema * 1e3:.2f} ms = {100 * dt_ema / dt:.1f} % of the step")
    if profiling:
        print_profile(*profile_steps(step, cfg.max_iters, device), flops, device)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
