"""train.py: config parsing, schedules, exact resume, gradient accumulation, DDP, and the errors a user can cause."""

import inspect
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tokenize
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

import bench
import train
from data2vec import Data2Vec, EMATeacher, TargetConfig
from encoders import PatchEncoder
from train import Config, forward_backward, lr_at, parse_args, text_data_dir
from transformer import TransformerConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--dim=32", "--n_head=2", "--ffn_dim=64", "--block_size=32", "--batch_size=4",
        "--vocab_size=320", "--top_k=2", "--eval_iters=2", "--log_interval=1", "--tau_n=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two plays of the embedded corpus as a user's .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    with tarfile.open(ROOT / "data" / "shakespeare.tar.xz") as tar:
        text = "".join(tar.extractfile(f"shakespeare/{n}.txt").read().decode() for n in ("hamlet", "tempest"))
    path.write_text(text)
    return path


def run(args: list[str], capsys=None) -> tuple[int, str]:
    code = train.main(args)
    err = capsys.readouterr().err if capsys else ""
    return code, err


def torchrun(args: list[str], max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """train.py under torchrun: 2 CPU processes (gloo), one thread each. max_file_bytes: no file they write may grow
    past it (RLIMIT_FSIZE, as a disk quota would; Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *args]
    limit = None if max_file_bytes is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)))
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit)


def history(out: Path) -> dict:
    return torch.load(out / "ckpt.pt", weights_only=True)["history"]


# ---- configuration -----------------------------------------------------------------------------------------------

def record_settings(monkeypatch: pytest.MonkeyPatch, registry: dict, modality: str) -> set[str]:
    """The settings that registry[modality] (finetune.RUNNERS or train.TASKS, called with a config first) reads from
    its config from now on, as they are read: it gets a copy of a subclass that notes each attribute it hands out."""
    read: set[str] = set()
    make = registry[modality]

    def noted(config, *args, **kwargs):
        class Noting(type(config)):
            def __getattribute__(self, name: str):
                read.add(name)
                return super().__getattribute__(name)

        return make(Noting(**vars(config)), *args, **kwargs)

    monkeypatch.setitem(registry, modality, noted)
    return read


def assert_only_lists(only: dict[str, tuple[str, str]], modality: str, read: set[str]) -> None:
    """only (finetune.ONLY or train.ONLY: the settings only some modalities read) names this modality for exactly
    the settings it read."""
    for key, (readers, _) in only.items():
        assert (key in read) == (modality in readers.split()), (
            f"{modality} {'reads' if key in read else 'does not read'} --{key}, but ONLY says {readers}")


def test_text_pretraining_reads_the_settings_only_lists_for_it(corpus, tmp_path, monkeypatch):
    read = record_settings(monkeypatch, train.TASKS, "text")
    assert train.main([*TINY, f"--data={corpus}", "--max_iters=1", f"--out_dir={tmp_path / 'run'}"]) == 0
    assert_only_lists(train.ONLY, "text", read)


def test_preset_then_overrides():
    cfg = parse_args(["--modality=text", "--preset=base", "--lr=1e-4", "--compile"])
    assert (cfg.n_layer, cfg.dim, cfg.top_k, cfg.lr, cfg.compile) == (12, 768, 10, 1e-4, True)
    assert cfg.out_dir == "out-text"


@pytest.mark.parametrize("argv, message", [
    (["--n_layers=3"], "did you mean --n_layer?"),
    (["--verbosity=3"], "--help lists the settings"),
    (["--n_layer=three"], "--n_layer takes an int"),
    (["--compile=maybe"], "--compile takes true or false"),
    (["--modality=smell"], "unknown modality"),
    (["--preset=huge"], "unknown preset"),
    (["n_layer=3"], "settings look like --key=value"),
    (["--objective=mae"], "use data2vec or mlm"),
    (["--modality=vision", "--objective=mlm"], "use it with --modality=text"),
    (["--mask_replace=0.95"], "together <= 1"),
    (["--token_span=0"], "--token_span=0: needs at least 1"),
    (["--block_size=2"], "--block_size=2: a sequence holds <s>, its tokens and </s>: use at least 3"),
    (["--modality=speech", "--mask_prob=0"], "--mask_prob=0.0: needs a value in (0, 1]"),
    (["--mask_random=-0.1"], "--mask_random=-0.1: needs a value in [0, 1]"),
    (["--positions=rotary"], "use absolute or relative"),
    (["--max_iters=0"], "--init_from=random"),
    (["--modality=vision", "--positions=relative"], "--positions does nothing for vision pretraining (only text reads "
     "it): leave it out; vision always uses BEiT's relative bias"),
    (["--modality=vision", "--block_size=256"], "vision's sequences are (img_size / patch_size)^2 patches"),
    (["--modality=speech", "--mask_ratio=0.5"], "--mask_ratio does nothing for speech pretraining (only vision "
     "reads it): leave it out; text and speech mask with --mask_prob"),
    (["--img_size=64"], "--img_size does nothing for text pretraining (only vision reads it): leave it out"),
    (["--eval_interval=0"], "--eval_interval=0: needs at least 1"),
    (["--top_k=0"], "average at least one block"),
    (["--top_k=5"], "top K of the n_layer=4 blocks"),
    (["--target_layer=fnn"], "use one of ffn, attn, block"),
    (["--final_norm=batch"], "use one of layer, instance, none"),
    (["--teacher_context=2"], "an odd window width"),
    (["--n_head=3"], "dim a multiple of n_head"),
    (["--modality=vision", "--mask_ratio=0"], "in (0, 1]"),
    (["--device=gpu"], "use auto, cpu, cuda, cuda:N or mps"),
    (["--lr=-1"], "--lr=-1.0: needs a value above 0"),
    (["--dropout=1.5"], "--dropout=1.5: needs a value in [0, 1)"),
    (["--beta2=1"], "--beta2=1.0: needs a value in [0, 1)"),
    (["--tau_0=1.5"], "--tau_0=1.5: needs a value in [0, 1]"),
    (["--grad_clip=-1"], "--grad_clip=-1.0: needs a value of at least 0"),
    (["--modality=vision", "--min_mask_patches=-1"], "--min_mask_patches=-1: needs a value of at least 0"),
    (["--modality=speech", "--pos_conv_kernel=0"], "--pos_conv_kernel=0: needs at least 1"),
    (["--warmup=0.5"], "--warmup=0.5 --hold=0.8: fractions of --max_iters, together at most 1"),
    (["--min_lr=1"], "--min_lr=1.0 exceeds --lr=0.0005"),
    (["--schedule=step"], "unknown --schedule=step: use tri or cosine"),
    (["--tokenizer=wordpiece"], "unknown --tokenizer=wordpiece: use auto, gpt2, bpe"),
    (["--vocab_size=100"], "--vocab_size=100: a byte-level BPE needs at least 256 types"),
    *([(["--device=cuda"], "torch sees no CUDA GPU: pass --device=cpu")] if not torch.cuda.is_available() else []),
    *([(["--device=mps"], "torch sees no Apple GPU (MPS): pass --device=cpu")]
      if not torch.backends.mps.is_available() else []),
])
def test_config_errors(argv, message, capsys):
    code, err = run(argv, capsys)
    assert code == 1 and message in err and "Traceback" not in err


def test_train_checks_a_config_built_in_code_before_it_starts(tmp_path):
    """ablations.py and results.py call train() with a Config of their own, not through parse_args."""
    with pytest.raises(train.ConfigError, match="needs at least one update"):
        train.train(Config(modality="vision", max_iters=0, out_dir=str(tmp_path / "run")))
    with pytest.raises(train.ConfigError, match="fractions of --max_iters"):
        train.train(Config(modality="vision", warmup=0.5, hold=0.8, out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def inline_comments(cls: type) -> dict[str, str]:
    """The comment on each field's own line of a dataclass's source, read with Python's tokenizer."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        code = lines[tok.start[0] - 1][:tok.start[1]].strip()
        if ":" in code:
            comments[code.split(":")[0]] = tok.string.lstrip("#").strip()
    return comments


def test_help_lists_every_setting_with_the_presets_value_and_its_comment(capsys):
    assert train.main(["--modality=speech", "--lr=3e-4", "--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == train.__doc__.strip().splitlines()[0]
    cfg = parse_args(["--modality=speech", "--lr=3e-4"])
    comments = {**inline_comments(TransformerConfig), **inline_comments(Config)}
    listed = [line for line in out if line.startswith("  --")]
    assert len(listed) == len(fields(Config))
    for f, line in zip(fields(Config), listed):
        value = getattr(cfg, f.name)
        assert line.split()[0] == f"--{f.name}={str(value).lower() if isinstance(value, bool) else value}", line
        assert comments.get(f.name, "") in line, (f.name, line)
    assert {"--conv_dim=64", "--lr=0.0003"} <= {line.split()[0] for line in listed}    # the preset, an override
    assert any("a fairseq manifest .tsv" in line for line in listed if line.startswith("  --data="))  # its 2nd line
    assert "targets and loss (data2vec.TargetConfig):" in out


@pytest.mark.parametrize("script", ["bench", "finetune", "diagnose", "ablations", "results"])
def test_every_script_takes_help(script, capsys):
    module = __import__(script)
    assert module.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip().splitlines()[0]) and "Settings (--key=value)" in out, out[:500]


def test_old_checkpoints_keep_bert_masking():
    """A text checkpoint from before text span masking (no token_span, mask_replace, mask_random in its config)
    reads back with BERT's masking: the new fields take their defaults."""
    old = {k: v for k, v in asdict(Config()).items() if k not in ("token_span", "mask_replace", "mask_random")}
    cfg = Config(**old)
    assert (cfg.token_span, cfg.mask_replace, cfg.mask_random) == (1, 0.8, 0.1)


def test_each_tokenizer_setting_caches_its_own_data(tmp_path):
    assert text_data_dir(Config()) == ROOT / "data" / "text"
    assert text_data_dir(Config(vocab_size=512)) == ROOT / "data" / "text-auto-512"
    assert text_data_dir(Config(tokenizer="bpe", vocab_size=512)) == ROOT / "data" / "text-bpe-512"
    corpus = tmp_path / "books.txt"
    assert text_data_dir(Config(data=str(corpus))) == tmp_path / "books-data2vec"
    assert text_data_dir(Config(data=str(corpus), vocab_size=1024)) == tmp_path / "books-data2vec-auto-1024"


# ---- schedules -----------------------------------------------------------------------------------------------

def test_lr_schedules_hit_their_endpoints():
    cfg = Config(max_iters=100, lr=1.0, min_lr=0.1, warmup=0.1, hold=0.5, schedule="tri")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == 1.0 and lr_at(59, cfg) == 1.0
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(80, cfg) == pytest.approx(1.0 - 0.9 * 20 / 40)
    cfg.schedule = "cosine"
    assert lr_at(9, cfg) == 1.0 and lr_at(10, cfg) == 1.0
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


# ---- gradient accumulation -----------------------------------------------------------------------------------------

def test_grad_accum_two_halves_equal_one_batch(corpus):
    cfg = parse_args([*TINY, f"--data={corpus}", "--dropout=0", "--attn_dropout=0"])
    cfg.batch_size = 8
    task = train.TextTask(cfg, prepare=True)
    torch.manual_seed(0)
    model = task.build_model()
    teacher = EMATeacher(model.student, 0.99, 0.99, 1)
    big = task.batch("train", torch.Generator().manual_seed(0))
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads = []
    for batches in ([big], halves):
        model.zero_grad()
        loss, n, _, _ = forward_backward(model, teacher, batches, 1, scaler, torch.autocast("cpu", enabled=False))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ---- resume --------------------------------------------------------------------------------------------------

def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path, monkeypatch, capsys):
    args = [*TINY, f"--data={corpus}", "--max_iters=8", "--ckpt_interval=4", "--eval_interval=4"]
    assert run([*args, f"--out_dir={tmp_path / 'straight'}"])[0] == 0

    class Crash(Exception):
        pass

    save = train.save_checkpoint

    def save_then_crash(path, state):
        save(path, state)
        raise Crash("simulated crash after the step-4 checkpoint")

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run([*args, f"--out_dir={tmp_path / 'resumed'}"])
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 4
    assert run([f"--out_dir={tmp_path / 'resumed'}", "--resume"])[0] == 0      # every other setting: the checkpoint's

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["history"]["eval_loss"] == b["history"]["eval_loss"]
    for part in ("model", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000
    finished = (tmp_path / "straight" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert run([*args, f"--out_dir={tmp_path / 'straight'}", "--resume"])[0] == 0     # a finished run: says so
    assert "already made 8 updates, --max_iters=8: nothing left to train" in capsys.readouterr().out
    assert (tmp_path / "straight" / "ckpt.pt").read_bytes() == finished


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_the_update_in_progress_and_resume_continues_exactly(sig, corpus, tmp_path, monkeypatch, capfd):
    """The signal arrives while update 6 is computed: the run finishes it, saves step 6 (not a checkpoint step) and
    exits with 130; --resume then ends where the uninterrupted run does, to the bit."""
    args = [*TINY, f"--data={corpus}", "--max_iters=8", "--ckpt_interval=4", "--eval_interval=4"]
    assert run([*args, f"--out_dir={tmp_path / 'straight'}"])[0] == 0
    lr_at = train.lr_at

    def lr_with_a_signal(step: int, cfg: Config) -> float:
        if step == 5 and not cfg.resume:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)           # the same Ctrl-C again: from the terminal and from torchrun
        return lr_at(step, cfg)

    monkeypatch.setattr(train, "lr_at", lr_with_a_signal)
    before = signal.getsignal(sig)
    code, err = run([*args, f"--out_dir={tmp_path / 'resumed'}"], capfd)
    assert code == 130 and "interrupted: stopped at step 6/8" in err and "--resume" in err, err
    assert err.count(f"{sig.name}: stopping after this update") == 1, err      # said at once, and once
    assert signal.getsignal(sig) == before                  # the run's handler is gone
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 6
    assert run([*args, f"--out_dir={tmp_path / 'resumed'}", "--resume"])[0] == 0

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert a["history"] == b["history"]
    for part in ("model", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    adam_a, adam_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(adam_a[i][k], adam_b[i][k]) for i in adam_a for k in adam_a[i])


def test_a_second_ctrl_c_quits_at_once(corpus, tmp_path, monkeypatch, capfd):
    """A second Ctrl-C a second after the first: no waiting for the update, and the last good checkpoint (step 4)
    stays as it was."""
    args = [*TINY, f"--data={corpus}", "--max_iters=8", "--ckpt_interval=4", f"--out_dir={tmp_path}"]
    lr_at = train.lr_at

    def lr_with_two_signals(step: int, cfg: Config) -> float:
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.1)
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, cfg)

    monkeypatch.setattr(train, "lr_at", lr_with_two_signals)
    before = signal.getsignal(signal.SIGINT)
    code, err = run(args, capfd)
    assert code == 130 and "quit at once; the last checkpoint, if any, is kept" in err, err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    assert signal.getsignal(signal.SIGINT) == before


# ---- errors a user can cause -----------------------------------------------------------------------------------

def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that holds `folder` as a running train.py does (train.hold_dir), until it is killed."""
    code = ("import sys, time; from pathlib import Path; import train\n"
            "with train.hold_dir(Path(sys.argv[1]), '--out_dir'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_run_on_a_folder_in_use_stops_at_once_and_a_crash_leaves_it_free(corpus, tmp_path, capsys):
    """A run holds its --out_dir while it lives: a second run there stops before any work and writes nothing. Once the
    first process is gone (killed here, as a crash or the OOM killer would end it) the folder is free again, with
    nothing to clean up."""
    out = tmp_path / "o"
    args = [*TINY, f"--data={corpus}", "--max_iters=2", f"--out_dir={out}"]
    holder = hold_in_another_process(out)
    try:
        code, err = run(args, capsys)
        assert code == 1 and err == (f"error: {out} is in use by another run that is still going: wait for it to "
                                     "end, or choose another --out_dir\n"), err
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    assert run(args)[0] == 0 and (out / "ckpt.pt").exists()


def test_an_out_dir_that_cannot_be_a_folder_stops_before_any_work(tmp_path, capsys):
    """Checked before the data (here missing too) are read, not at the first save minutes later."""
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    for out, message in ((file, f"{file} is a file, not a folder: choose another --out_dir"),
                         (file / "run", f"cannot create the folder {file / 'run'} (Not a directory): choose another "
                                        "--out_dir")):
        code, err = run([*TINY, f"--data={tmp_path / 'missing.txt'}", f"--out_dir={out}"], capsys)
        assert code == 1 and err == f"error: {message}\n", err


def test_missing_and_empty_data(tmp_path, capsys):
    code, err = run([*TINY, f"--data={tmp_path / 'nope.txt'}", f"--out_dir={tmp_path / 'o'}"], capsys)
    assert code == 1 and "nope.txt" in err
    assert not (tmp_path / "o").exists()                 # the run created its folder and failed before any save
    (tmp_path / "empty").mkdir()
    code, err = run([*TINY, f"--data={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'o'}"], capsys)
    assert code == 1 and "empty" in err and "Traceback" not in err


def test_speech_crops_shorter_than_one_frame_are_refused_before_the_data_are_read(tmp_path, capsys):
    code, err = run(["--modality=speech", f"--data={tmp_path / 'missing.tsv'}", "--max_samples=399",
                     f"--out_dir={tmp_path / 'o'}"], capsys)
    assert code == 1 and err == ("error: --max_samples=399: crops must hold the feature encoder's receptive field, "
                                 "400 samples, the shortest clip the data accept\n"), err


def test_a_batch_without_masked_steps_is_named(corpus, tmp_path, capsys):
    """<s> and </s> are never masked, so 3-token sequences hold one token that may be: with a tiny --mask_prob none
    is, and there is nothing to predict: say so, not "the loss is nan"."""
    code, err = run([*TINY, f"--data={corpus}", "--block_size=3", "--mask_prob=0.001", f"--out_dir={tmp_path}"], capsys)
    assert code == 1 and "no held-out step was masked" in err and "--mask_prob" in err


def test_resume_takes_the_checkpoints_settings_and_the_command_line_overrides_them(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run([*TINY, f"--data={corpus}", "--max_iters=2", "--lr=1e-3", "--mask_prob=0.2", f"--out_dir={out}"])[0] == 0
    capsys.readouterr()
    assert run([f"--out_dir={out}", "--resume", "--max_iters=3"])[0] == 0
    assert f"resuming {out / 'ckpt.pt'} at step 2; changed on the command line: max_iters 2 -> 3\n" in (
        capsys.readouterr().out)
    config = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert (config["max_iters"], config["lr"], config["mask_prob"], config["n_layer"]) == (3, 1e-3, 0.2, 2)
    assert parse_args([f"--out_dir={tmp_path / 'none'}", "--resume"]).n_layer == 4     # no checkpoint: the preset


def test_resume_in_another_precision(corpus, tmp_path):
    """A float32 run's checkpoint holds an empty GradScaler state; resuming it in float16 starts a fresh scaler."""
    args = [*TINY, f"--data={corpus}", f"--out_dir={tmp_path}"]
    assert run([*args, "--max_iters=2"])[0] == 0
    assert run([*args, "--max_iters=3", "--resume", "--dtype=float16"])[0] == 0
    assert history(tmp_path)["step"][-1] == 3


def test_checkpoint_errors_never_overwrite_the_last_good_one(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, f"--data={corpus}", "--max_iters=2", f"--out_dir={out}"]
    assert run(args)[0] == 0
    good = (out / "ckpt.pt").read_bytes()

    code, err = run(args, capsys)                                   # a fresh run into a used out_dir
    assert code == 1 and "--resume" in err

    code, err = run([*args, "--resume", "--n_layer=3", "--max_iters=4"], capsys)   # mismatched settings
    assert code == 1 and "n_layer=2" in err
    assert (out / "ckpt.pt").read_bytes() == good
    code, err = run(["--preset=base", "--resume", f"--out_dir={out}"], capsys)        # another preset
    assert code == 1 and f"{out / 'ckpt.pt'} was trained with other settings: preset='small' (now 'base'), " in err
    code, err = run(["--modality=vision", "--resume", f"--out_dir={out}"], capsys)   # another modality
    assert code == 1 and err == (f"error: {out / 'ckpt.pt'} is a text run: leave --modality out to resume it (the "
                                 "saved run's settings are used), or choose another --out_dir\n")
    assert (out / "ckpt.pt").read_bytes() == good

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(good[: len(good) // 2])              # truncated file
    code, err = run([*TINY, f"--data={corpus}", f"--out_dir={tmp_path / 'bad'}", "--resume"], capsys)
    assert code == 1 and "corrupt" in err and "Traceback" not in err

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)          # an older version's optimizer groups
    groups = ckpt["optimizer"]["param_groups"]
    groups[0]["params"].append(groups[1]["params"].pop())
    torch.save(ckpt, tmp_path / "bad" / "ckpt.pt")
    code, err = run([*TINY, f"--data={corpus}", f"--out_dir={tmp_path / 'bad'}", "--resume"], capsys)
    assert code == 1 and err.startswith(f"error: {tmp_path / 'bad' / 'ckpt.pt'}: its optimizer state does not fit "
                                        "this model's parameter groups (")
    assert err.endswith("start the run afresh with another --out_dir\n")


def test_weight_decay_spares_biases_norms_and_the_cls_token():
    """BEiT's and data2vec_vision's rule: no decay on 1-D parameters and on the CLS token, decay on the rest."""
    cfg = TransformerConfig(n_layer=2, dim=16, n_head=2, ffn_dim=32, pre_ln=True, layer_scale=0.1, k_bias=False,
                            rel_pos_grid=(4, 4))
    model = Data2Vec(PatchEncoder(1, 16, 4), cfg, TargetConfig(top_k=2), head_hidden=False)
    decay, no_decay = train.weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == (
        {n for n, p in model.named_parameters() if p.dim() == 1} | {"encoder.cls_token"})
    assert {n for n, p in model.named_parameters() if p.dim() > 1} - {"encoder.cls_token"} == (
        {names[id(p)] for p in decay["params"]})                        # the mask token, the relative bias, ...


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    forward = train.Data2Vec.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        loss, pred, y = forward(self, *a, **k)
        calls["n"] += self.training
        return (loss * float("nan") if calls["n"] > 6 else loss), pred, y          # the 7th training step fails

    monkeypatch.setattr(train.Data2Vec, "forward", poisoned)
    code, err = run([*TINY, f"--data={corpus}", "--max_iters=10", "--ckpt_interval=2", "--eval_interval=100",
                     f"--out_dir={out}"], capsys)
    assert code == 1 and "the loss is nan" in err and "last good checkpoint" in err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6


def overflow_first(n: int, monkeypatch) -> None:
    """The first n optimizer steps of the next run get an infinite gradient, as float16 overflow gives them."""
    forward_backward = train.forward_backward
    calls = {"n": 0}

    def overflowing(model, *a, **k):
        out = forward_backward(model, *a, **k)
        calls["n"] += 1
        if calls["n"] <= n:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(train, "forward_backward", overflowing)


def test_a_float16_update_whose_gradients_overflow_does_not_count(corpus, tmp_path, monkeypatch, capsys):
    """GradScaler skips an update with inf gradients: the step counter, lr, tau and the teacher must not move on, and
    the same batches go again at the halved scale (fairseq's rule), so the run equals one without the overflows."""
    args = [*TINY, f"--data={corpus}", "--dtype=float16", "--device=cpu", "--max_iters=4", "--eval_interval=100",
            "--dropout=0", "--attn_dropout=0", "--act_dropout=0"]
    assert run([*args, f"--out_dir={tmp_path / 'plain'}"], capsys)[0] == 0
    overflow_first(3, monkeypatch)
    assert run([*args, f"--out_dir={tmp_path / 'overflow'}"], capsys)[0] == 0
    plain, overflow = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("plain", "overflow"))
    assert overflow["step"] == 4 and overflow["history"]["step"] == [1, 2, 3, 4]
    assert overflow["history"]["eval_step"] == [0, 4]                   # the held-out loss once at step 0, not again
    assert overflow["scaler"]["scale"] == plain["scaler"]["scale"] / 8
    assert overflow["history"]["loss"] == pytest.approx(plain["history"]["loss"], rel=1e-4)
    for part in ("model", "teacher"):
        for name, want in plain[part].items():
            assert torch.allclose(overflow[part][name], want, rtol=1e-3, atol=1e-5), (part, name)


def test_gradients_that_overflow_at_every_loss_scale_stop_the_run(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    overflow_first(10**6, monkeypatch)
    code, err = run([*TINY, f"--data={corpus}", "--dtype=float16", "--device=cpu", "--max_iters=4",
                     "--eval_interval=100", f"--out_dir={out}"], capsys)
    assert code == 1 and "the float16 gradients overflow even at loss scale 0.0001" in err
    assert "no checkpoint was written" in err and "Traceback" not in err
    assert not (out / "ckpt.pt").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")   # torch's own
def test_a_compiled_run_matches_the_eager_one_and_resumes_without_compile(corpus, tmp_path, capsys):
    """--compile trains the same model (no dropout: inductor draws its own random numbers), and its checkpoint holds
    the plain module's keys (no `_orig_mod.` prefix), so an eager run resumes it."""
    args = [*TINY, f"--data={corpus}", "--dropout=0", "--attn_dropout=0", "--act_dropout=0", "--eval_interval=2"]
    assert run([*args, "--max_iters=4", f"--out_dir={tmp_path / 'eager'}"])[0] == 0
    assert run([*args, "--max_iters=4", "--compile", f"--out_dir={tmp_path / 'compiled'}"])[0] == 0
    eager, compiled = history(tmp_path / "eager"), history(tmp_path / "compiled")
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-4)
    ckpt = torch.load(tmp_path / "compiled" / "ckpt.pt", weights_only=True)
    assert ckpt["model"].keys() == torch.load(tmp_path / "eager" / "ckpt.pt", weights_only=True)["model"].keys()
    capsys.readouterr()
    assert run([*args, "--max_iters=6", "--resume", "--compile=false", f"--out_dir={tmp_path / 'compiled'}"])[0] == 0
    assert "changed on the command line: max_iters 4 -> 6, compile True -> False\n" in capsys.readouterr().out
    assert len(history(tmp_path / "compiled")["loss"]) == 6


def test_bf16_autocast_on_a_cpu_keeps_fp32_weights_and_follows_the_fp32_run(corpus, tmp_path):
    args = [*TINY, f"--data={corpus}", "--max_iters=4", "--eval_interval=2"]
    assert run([*args, f"--out_dir={tmp_path / 'fp32'}"])[0] == 0
    assert run([*args, "--dtype=bfloat16", f"--out_dir={tmp_path / 'bf16'}"])[0] == 0
    ckpt = torch.load(tmp_path / "bf16" / "ckpt.pt", weights_only=True)
    assert {t.dtype for t in ckpt["model"].values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in ckpt["teacher"].values() if t.is_floating_point()} == {torch.float32}
    fp32 = history(tmp_path / "fp32")["loss"]
    assert ckpt["history"]["loss"] != fp32 and ckpt["history"]["loss"] == pytest.approx(fp32, rel=0.01)  # 4e-4 here


def test_out_of_memory_names_the_fix_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    """The 7th training step asks for more memory than the machine has (torch's real CPU allocator error)."""
    out = tmp_path / "run"
    forward = train.Data2Vec.forward
    calls = {"n": 0}

    def greedy(self, *a, **k):
        calls["n"] += self.training
        if calls["n"] > 6:
            torch.empty(2 ** 50)                                       # 4 PiB of float32
        return forward(self, *a, **k)

    monkeypatch.setattr(train.Data2Vec, "forward", greedy)
    code, err = run([*TINY, f"--data={corpus}", "--max_iters=10", "--ckpt_interval=2", "--eval_interval=100",
                     f"--out_dir={out}"], capsys)
    assert code == 1 and err == ("error: out of CPU memory (an allocation of 4,194,304.00 GiB failed): lower "
                                 "--batch_size and raise --grad_accum by the same factor, which keeps the global "
                                 "batch; the last checkpoint, if any, is kept, and --resume continues from it with the "
                                 "new settings\n")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    """From the second save on, the write stops part-way: the start of the file lands, the rest goes to /dev/full, a
    device that is always full (torch's real error)."""
    out = tmp_path / "run"
    save, calls = torch.save, [0]

    def onto_a_full_disk(obj, f):
        calls[0] += 1
        if calls[0] > 1:
            Path(f).write_bytes(b"PK\x03\x04 the first bytes of a zip")
            f = "/dev/full"
        save(obj, f)

    monkeypatch.setattr(torch, "save", onto_a_full_disk)
    code, err = run([*TINY, f"--data={corpus}", "--max_iters=6", "--ckpt_interval=2", "--eval_interval=100",
                     f"--out_dir={out}"], capsys)
    assert code == 1 and err.startswith(f"error: could not write {out / 'ckpt.pt'} (") and err.endswith(
        " MiB free there): free some space, or choose another folder; the last good checkpoint, if any, is kept\n")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2 and not (out / "ckpt.tmp").exists()


def test_a_run_whose_folder_is_removed_makes_it_again_and_keeps_its_work(corpus, tmp_path, monkeypatch, capsys):
    """rm -rf of --out_dir while the run is going (after its first save): the next save says so and writes the
    checkpoint into the folder made again, instead of a traceback that loses the run."""
    out = tmp_path / "run"
    save, calls = train.save_checkpoint, [0]

    def then_removed(path, state):
        save(path, state)
        calls[0] += 1
        if calls[0] == 1:
            shutil.rmtree(out)

    monkeypatch.setattr(train, "save_checkpoint", then_removed)
    code, err = run([*TINY, f"--data={corpus}", "--max_iters=4", "--ckpt_interval=2", "--eval_interval=100",
                     f"--out_dir={out}"], capsys)
    assert code == 0 and err == f"warning: {out} was removed while the run was going; making it again for ckpt.pt\n"
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4 and (out / "loss.png").is_file()


def test_out_of_memory_tells_allocation_failures_from_other_errors():
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 "
                                 "GiB of which 1.50 GiB is free.")
    assert train.out_of_memory(gpu) == "out of GPU memory (an allocation of 2.00 GiB failed)"
    assert train.out_of_memory(torch.OutOfMemoryError("out of memory")) == "out of GPU memory"
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2 ** 50)
    assert train.out_of_memory(cpu.value) == "out of CPU memory (an allocation of 4,194,304.00 GiB failed)"
    with pytest.raises(RuntimeError) as other:
        torch.ones(2) @ torch.ones(3)
    assert train.out_of_memory(other.value) is None


def test_bench_out_of_memory_is_one_line(corpus, monkeypatch, capsys):
    def greedy(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ...")

    monkeypatch.setattr(bench, "forward_backward", greedy)
    assert bench.main([*TINY, f"--data={corpus}", "--max_iters=2"]) == 1
    assert capsys.readouterr().err == ("error: out of GPU memory (an allocation of 20.00 MiB failed): lower "
                                       "--batch_size and raise --grad_accum by the same factor, which times the same "
                                       "number of tokens per step\n")


# ---- DDP ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_processes_match_one_process(corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo), 1 micro-step each == 1 process with 2 micro-steps."""
    args = [*TINY, f"--data={corpus}", "--max_iters=20", "--grad_accum=2", "--dropout=0", "--attn_dropout=0",
            "--eval_interval=10"]
    assert run([*args, f"--out_dir={tmp_path / 'one'}"])[0] == 0
    proc = torchrun([*args, f"--out_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert len(one["loss"]) == len(two["loss"]) == 20
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_ddp_evaluates_with_fewer_held_out_batches_than_processes(corpus, tmp_path):
    """A model with a buffer (the relative position index) and --eval_iters=1 under 2 processes: the rank without a
    held-out batch must not wait in a collective that the other rank never joins (DDP's buffer sync)."""
    proc = torchrun([*TINY, f"--data={corpus}", "--max_iters=3", "--grad_accum=2", "--positions=relative",
                     "--eval_iters=1", "--eval_interval=2", f"--out_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert history(tmp_path)["eval_step"] == [0, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["bad data", "folder in use", "full disk"])
def test_ddp_a_problem_only_rank_0_sees_stops_every_process_with_its_message(corpus, tmp_path, problem):
    """Rank 0 holds --out_dir, prepares the data and writes the checkpoint; when any of them fails, rank 1 stops with
    the same message, not a broken connection."""
    out = tmp_path / "o"
    holder = hold_in_another_process(out) if problem == "folder in use" else None
    data, message = {"bad data": (tmp_path / "nope.txt", "error: text source"),
                     "folder in use": (corpus, f"error: {out} is in use by another run"),
                     "full disk": (corpus, f"error: could not write {out / 'ckpt.pt'} (")}[problem]
    if problem == "full disk":                                 # the data prepared first: only the checkpoint is big
        assert run([*TINY, f"--data={corpus}", "--max_iters=1", f"--out_dir={tmp_path / 'prepare'}"])[0] == 0
    try:
        proc = torchrun([*TINY, f"--data={data}", f"--out_dir={out}"],
                        max_file_bytes=64 * 1024 if problem == "full disk" else None)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count(message) == 2 and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_after_name = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields_after_name[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_ddp_a_signal_to_one_process_stops_both_at_the_same_update(corpus, tmp_path):
    """SIGTERM to one worker only (a scheduler preempting one node): the other learns of it through the per-update
    all-reduce, both stop after the same update, and the checkpoint holds that update."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *TINY, f"--data={corpus}", "--max_iters=100000", f"--out_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:                          # rank 0 logs every update (TINY: --log_interval=1)
            if line.startswith("step 3/"):
                break
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped = [line for line in err.splitlines() if "interrupted: stopped at step" in line]
    assert len(stopped) == 2 and stopped[0].split("interrupted: ")[1] == stopped[1].split("interrupted: ")[1], err[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split("/")[0])
    # step 3 when the signal beats rank 1's check after update 3, which rank 0 has just logged
    assert step >= 3 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step
    # every process reads the stopped run's settings from its checkpoint; only --max_iters is new
    proc = torchrun([f"--out_dir={tmp_path}", "--resume", f"--max_iters={step + 2}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"changed on the command line: max_iters 100000 -> {step + 2}\n" in proc.stdout
    assert history(tmp_path)["step"][-1] == step + 2


def test_bench_times_the_training_step(corpus, capsys):
    """bench.py builds its micro-batches the way train.py does (device_batch) and reports throughput, MFU, EMA share."""
    assert bench.main([*TINY, f"--data={corpus}", "--max_iters=2", "--grad_accum=2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    mfu = float(last.split("MFU ")[1].split(" %")[0])
    # 0.0 % is possible: a tiny model on a busy machine rounds to it
    assert "tokens/s" in last and "of the step" in last and 0 <= mfu < 100, last


def test_bench_profile_lists_where_the_step_goes(corpus, capsys):
    """--profile: the ops' own times are parts of the profiled step, so they add up to at most its wall time, and
    the matmul line sums exactly the matmul rows."""
    wall, rows = bench.profile_steps(lambda i: torch.randn(64, 64) @ torch.randn(64, 64), 3, torch.device("cpu"))
    names = [name for name, _ in rows]
    assert "aten::mm" in names and "aten::randn" in names and 0 < sum(sec for _, sec in rows) <= wall, rows
    assert bench.main([*TINY, f"--data={corpus}", "--max_iters=2", "--profile"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("  ") and " ms " in line]
    shares = [float(line.split(" ms ")[1].split(" %")[0]) for line in listed]
    matmul = float(out.split("matmuls (")[1].split("): ")[1].split(" ms")[0])
    mm_rows = sum(float(line.split(" ms")[0]) for line in listed if line.split("%  ")[1] in bench.MATMUL_OPS)
    assert len(listed) == 13 and 0 < sum(shares) <= 101 and shares[:12] == sorted(shares[:12], reverse=True), out
    assert 0 < mm_rows <= matmul + 0.1, out      # rows past the top 12 may hold more matmul time
    assert bench.main([*TINY, f"--data={corpus}", "--profil"]) == 1     # a typo is still an unknown key
    assert bench.main([*TINY, f"--data={corpus}", "--profile=5"]) == 1
    assert "--profile takes no value" in capsys.readouterr().err
