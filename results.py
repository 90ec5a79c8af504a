"""What pretraining buys, per modality, at CPU scale: pretrain with the default preset, then train the downstream task
on a small labelled budget from the pretrained encoder and from a random one, over several seeds. Writes a markdown
table (mean and spread over seeds) and a PNG plot.

    python results.py --modality=vision             # one modality (text, vision, speech), 3 seeds
    python results.py --modality=all --seeds=5      # everything
    python results.py --modality=text               # again: finished runs are read back, unfinished ones resume

Every finished unit (one pretraining, one downstream run) leaves a JSON file under --out_dir, so a crash or Ctrl-C
loses at most the unit that was running; pretraining and fine-tuning resume from their last saved update.
"""

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import finetune
from finetune import FinetuneConfig
from text_data import DataError, read_json, write_atomic
from train import (PRESETS, CheckpointError, Config, ConfigError, load_checkpoint, parse_overrides, split_help, train,
                   usage)


@dataclass
class ResultsConfig:
    modality: str = "all"       # text | vision | speech | all
    seeds: int = 3
    out_dir: str = "results"
    device: str = "auto"


# The downstream runs per modality: (name, finetune.py overrides, metric, higher is better). The labelled budget is
# small on purpose: that is where pretraining should show (10 % of the labels; 10 minutes of labelled audio).
DOWNSTREAM: dict[str, list[tuple[str, dict, str, bool]]] = {
    "text": [("genre, linear probe, 10 % of labels", dict(mode="probe", label_fraction=0.1), "accuracy", True),
             ("genre, fine-tune, 10 % of labels", dict(mode="finetune", label_fraction=0.1), "accuracy", True),
             ("genre, linear probe, all labels", dict(mode="probe"), "accuracy", True)],
    "vision": [("digits, linear probe, 10 % of labels", dict(mode="probe", label_fraction=0.1), "accuracy", True),
               ("digits, fine-tune, 10 % of labels", dict(mode="finetune", label_fraction=0.1), "accuracy", True)],
    "speech": [("CTC, 10 min of labels, CER", dict(mode="finetune", budget_minutes=10), "cer", False)],
}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1).encode())


def pretrain(modality: str, seed: int, out: Path, device: str) -> dict:
    """The default preset with this seed; resumes an unfinished run. -> {ckpt, seconds, final eval loss, min target_var}"""
    done = out / "pretrain.json"
    if (result := read_json(done, "running it again")) is not None:
        return result
    cfg = Config(**{**PRESETS[modality]["small"], "modality": modality, "seed": seed, "device": device,
                    "out_dir": str(out / "pretrain")})
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    cfg.resume = ckpt_path.exists()
    train(cfg)
    ckpt = load_checkpoint(ckpt_path)
    history = ckpt["history"]
    # the checkpoint's training time counts every part of a resumed run
    result = dict(ckpt=str(ckpt_path), seconds=ckpt["seconds"], eval_loss=history["eval_loss"][-1],
                  min_target_var=min(history["target_var"]), hardware=hardware())
    write_json(done, result)
    return result


def downstream(modality: str, seed: int, out: Path, init_from: str, device: str) -> dict[str, dict]:
    """Every downstream run of the modality from init_from (a checkpoint or "random"). -> {name: finetune result}"""
    results = {}
    tag = "random" if init_from == "random" else "pretrained"
    for i, (name, overrides, _, _) in enumerate(DOWNSTREAM[modality]):
        done = out / f"downstream{i}_{tag}.json"
        if (result := read_json(done, "running it again")) is None:
            state = out / f"downstream{i}_{tag}"                # a fine-tuning run's state while it runs
            fc = FinetuneConfig(**{**finetune.DEFAULTS.get(modality, {}), **overrides, "modality": modality,
                                   "init_from": init_from, "seed": seed, "device": device, "out_dir": str(state),
                                   "resume": (state / "state.pt").exists()})
            result = finetune.run(fc)
            write_json(done, result)
        results[name] = result
    return results


def run_modality(modality: str, rc: ResultsConfig) -> dict:
    """All seeds of one modality. -> summary with per-seed values"""
    rows = {name: {"pretrained": [], "random": []} for name, *_ in DOWNSTREAM[modality]}
    pre = []
    for seed in range(rc.seeds):
        out = Path(rc.out_dir) / modality / f"seed{seed}"
        print(f"==== {modality}, seed {seed + 1}/{rc.seeds}: pretraining")
        p = pretrain(modality, seed, out, rc.device)
        pre.append(p)
        for init_from, tag in [(p["ckpt"], "pretrained"), ("random", "random")]:
            print(f"==== {modality}, seed {seed + 1}/{rc.seeds}: downstream from {tag}")
            for name, result in downstream(modality, seed, out, init_from, rc.device).items():
                metric = next(m for n, _, m, _ in DOWNSTREAM[modality] if n == name)
                rows[name][tag].append(dict(value=result[metric], seconds=result["seconds"]))
    return dict(pretrain=pre, rows=rows)


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; None for a single seed, whose spread is unknown (not 0)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def mean_text(values: list[float], digits: int = 3) -> str:
    """'mean ± sample standard deviation', or the mean alone for a single seed."""
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def table(summaries: dict[str, dict]) -> str:
    """Markdown: one row per downstream run, mean ± std over seeds, pretrained vs random init."""
    lines = ["| modality | pretraining (default preset) | downstream | pretrained | random init | seeds | wall time |",
             "|---|---|---|---|---|---|---|"]
    for modality, s in summaries.items():
        pre_min = statistics.mean(p["seconds"] for p in s["pretrain"]) / 60
        loss = mean_text([p["eval_loss"] for p in s["pretrain"]], digits=2)
        tvar = min(p["min_target_var"] for p in s["pretrain"])
        first = (modality, f"{pre_min:.1f} min per seed, held-out loss {loss}, min target_var {tvar:.2f}")
        for name, _, _, higher in DOWNSTREAM[modality]:
            row = s["rows"][name]
            pretrained, random = ([r["value"] for r in row[k]] for k in ("pretrained", "random"))
            pm, rm = statistics.mean(pretrained), statistics.mean(random)
            better = pm > rm if higher else pm < rm
            p_text, r_text = mean_text(pretrained), mean_text(random)
            p_text, r_text = (f"**{p_text}**", r_text) if better else (p_text, f"**{r_text}**")
            minutes = sum(r["seconds"] for k in row for r in row[k]) / 60
            lines.append(f"| {first[0]} | {first[1]} | {name} | {p_text} | {r_text} | {len(row['pretrained'])} | "
                         f"{minutes:.1f} min (downstream, all seeds) |")
            first = ("", "")                        # modality and pretraining in its first row only
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict], path: Path) -> None:
    """One panel per downstream run: pretrained vs random init, bars at the mean, one dot per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(m, name, higher) for m, s in summaries.items() for name, _, _, higher in DOWNSTREAM[m]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (modality, name, higher) in zip(axes[0], panels):
        row = summaries[modality]["rows"][name]
        for x, (tag, color) in enumerate([("pretrained", "tab:blue"), ("random", "tab:gray")]):
            values = [r["value"] for r in row[tag]]
            mean, spread = mean_spread(values)
            ax.bar(x, mean, yerr=spread, color=color, alpha=0.7, capsize=4)
            ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks([0, 1], ["pretrained", "random"])
        ax.set_title(f"{modality}: {name}", fontsize=8)
        ax.set_ylabel("accuracy (higher is better)" if higher else "CER (lower is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    try:
        asked, argv = split_help(argv)
        rc = ResultsConfig(**parse_overrides(ResultsConfig, argv))
        if asked:
            print(usage(__doc__, rc))
            return 0
        modalities = list(DOWNSTREAM) if rc.modality == "all" else [rc.modality]
        if rc.modality != "all" and rc.modality not in DOWNSTREAM:
            raise ConfigError(f"unknown modality {rc.modality!r}: choose text, vision, speech or all")
        if rc.seeds < 1:
            raise ConfigError(f"--seeds={rc.seeds}: run at least one seed (3 give a spread)")
        t0 = time.time()
        for modality in modalities:
            summary = run_modality(modality, rc)
            write_json(Path(rc.out_dir) / modality / "summary.json", summary)
    except (ConfigError, CheckpointError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # pretraining and fine-tuning saved the update they were in; a probe starts again
        print("interrupted: the same command continues where this one stopped", file=sys.stderr)
        return 130
    # the table and plot cover every modality finished so far, also from earlier invocations
    summaries = {m: s for m in DOWNSTREAM
                 if (s := read_json(Path(rc.out_dir) / m / "summary.json", "leaving it out of the table")) is not None}
    out = Path(rc.out_dir)
    # the machines the pretraining runs had (threads included), not the one writing the table
    machines = sorted({p.get("hardware", "not recorded") for s in summaries.values() for p in s["pretrain"]})
    (out / "results.md").write_text(f"Hardware: {'; '.join(machines)}\n\n" + table(summaries))
    plot(summaries, out / "results.png")
    print((out / "results.md").read_text())
    print(f"done in {(time.time() - t0) / 60:.1f} min; table: {out / 'results.md'}, plot: {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
