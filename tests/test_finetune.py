"""finetune.py on a tiny pretrained checkpoint: both modes run, report accuracy, and reject bad input clearly."""

import os
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import finetune
import train
import transcribe
from encoders import TextEncoder
from finetune import subset
from tests.test_train import assert_only_lists, hold_in_another_process, record_settings
from transformer import Transformer, TransformerConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--dim=32", "--n_head=2", "--ffn_dim=64", "--block_size=32", "--batch_size=4",
        "--vocab_size=320", "--top_k=2", "--eval_iters=2", "--log_interval=1", "--max_iters=3"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-step checkpoint on two plays, and a two-class TSV task (which play a line comes from)."""
    tmp = tmp_path_factory.mktemp("ft")
    with tarfile.open(ROOT / "data" / "shakespeare.tar.xz") as tar:
        plays = {n: tar.extractfile(f"shakespeare/{n}.txt").read().decode() for n in ("hamlet", "tempest")}
    (tmp / "plays.txt").write_text("".join(plays.values()))
    assert train.main([*TINY, f"--data={tmp / 'plays.txt'}", f"--out_dir={tmp / 'out'}"]) == 0
    for split, lines in (("train", slice(100, 400)), ("test", slice(400, 500))):
        rows = ["sentence\tlabel"]
        for name, text in plays.items():
            rows += [f"{line.strip()}\t{name}" for line in text.splitlines()[lines] if len(line.split()) > 3]
        (tmp / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return tmp / "out" / "ckpt.pt", tmp


@pytest.mark.parametrize("mode", ["probe", "finetune"])
def test_modes_report_accuracy(pretrained, mode, tmp_path, capsys):
    ckpt, tmp = pretrained
    args = [f"--init_from={ckpt}", f"--mode={mode}", f"--train={tmp / 'train.tsv'}", f"--test={tmp / 'test.tsv'}",
            "--max_len=32", "--epochs=1", "--probe_epochs=5", f"--out_dir={tmp_path / 'ft'}", "--log_interval=2"]
    result = finetune.run(finetune.FinetuneConfig(**train.parse_overrides(finetune.FinetuneConfig, args)))
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n_test"] > 50
    progress = {"probe": ["examples from the frozen encoder ... 32 each, in", "probe epoch 5/5"],
                "finetune": ["update 2/", "update 4/", "so far this epoch | lr", "epoch 1/1 | train loss"]}[mode]
    out = capsys.readouterr().out
    assert all(line in out for line in progress), out          # long work says how far it is
    assert not (tmp_path / "ft").exists()                      # a finished run leaves no state behind


def test_text_reads_the_settings_only_lists_for_it_and_refuses_the_others(pretrained, monkeypatch, capsys):
    ckpt, tmp = pretrained
    read = record_settings(monkeypatch, finetune.RUNNERS, "text")
    args = [f"--init_from={ckpt}", f"--train={tmp / 'train.tsv'}", f"--test={tmp / 'test.tsv'}", "--max_len=32",
            "--epochs=1", "--probe_epochs=1"]
    for mode in ("probe", "finetune"):
        assert finetune.main([*args, f"--mode={mode}"]) == 0
    # one command line for both modes runs, and each names what it does not read
    assert capsys.readouterr().err == ("warning: --mode=probe does not read --epochs (the probe's are --probe_epochs)\n"
                                       "warning: --mode=finetune does not read --probe_epochs (fine-tuning's are "
                                       "--epochs)\n")
    assert_only_lists(finetune.ONLY, "text", read)
    for setting, message in (("--data=corpus.txt", "--data does nothing for text fine-tuning (only vision reads it): "
                              "leave it out; text and speech read --train and --test"),
                             ("--budget_minutes=10", "--budget_minutes does nothing for text fine-tuning (only "
                              "speech reads it): leave it out")):
        assert finetune.main([*args, setting]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert finetune.main(["--modality=vision", "--init_from=random", f"--train={tmp / 'train.tsv'}"]) == 1
    assert "--train does nothing for vision fine-tuning (only text and speech read it)" in capsys.readouterr().err
    assert finetune.main(["--modality=speech", "--init_from=random", "--warmup=0.1"]) == 1
    assert "speech's lr schedule is tri-stage" in capsys.readouterr().err


def test_the_probe_reads_batch_size_examples_at_a_time(pretrained, monkeypatch):
    """Out of memory names --batch_size as the fix, so the frozen encoder's features follow it too."""
    ckpt, tmp = pretrained
    features, sizes = finetune.Classifier.features, []

    def recorded(self, source):
        sizes.append(len(source))
        return features(self, source)

    monkeypatch.setattr(finetune.Classifier, "features", recorded)
    args = [f"--init_from={ckpt}", "--mode=probe", f"--train={tmp / 'train.tsv'}", f"--test={tmp / 'test.tsv'}",
            "--max_len=32", "--probe_epochs=1", "--batch_size=5"]
    result = finetune.run(finetune.FinetuneConfig(**train.parse_overrides(finetune.FinetuneConfig, args)))
    assert max(sizes) == 5 and sum(sizes) == result["n_train"] + result["n_test"]


def signal_at_update(monkeypatch: pytest.MonkeyPatch, update: int) -> None:
    """Send SIGINT twice (the same Ctrl-C, from the terminal and a launcher) while update `update` is computed: its
    gradient clipping is the signal."""
    clip, calls = torch.nn.utils.clip_grad_norm_, [0]

    def clip_with_a_signal(*args, **kwargs):
        calls[0] += 1
        if calls[0] == update:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_a_signal)


def keep_test_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Each accuracy finetune.py computes also appends the model's logits on those inputs, (N, classes), to the list
    returned."""
    logits, score = [], finetune.accuracy

    def accuracy_and_logits(predict, inputs, labels, batch_size):
        logits.append(predict(inputs))
        return score(predict, inputs, labels, batch_size)

    monkeypatch.setattr(finetune, "accuracy", accuracy_and_logits)
    return logits


@pytest.mark.parametrize("where", ["mid-epoch", "end of epoch"])
def test_ctrl_c_saves_fine_tuning_and_resume_ends_where_the_straight_run_does(pretrained, where, tmp_path,
                                                                                monkeypatch, capfd):
    """Two epochs; Ctrl-C during an update in the middle of epoch 1 or at its last batch: the run saves that update
    and exits with 130, and --resume ends with the straight run's printed losses and test logits, to the bit."""
    ckpt, tmp = pretrained
    args = [f"--init_from={ckpt}", f"--train={tmp / 'train.tsv'}", f"--test={tmp / 'test.tsv'}", "--max_len=32",
            "--epochs=2", "--batch_size=64", "--ckpt_interval=3"]
    logits = keep_test_logits(monkeypatch)
    assert finetune.main([*args, f"--out_dir={tmp_path / 'straight'}"]) == 0
    straight, straight_out = logits[-1], capfd.readouterr().out
    batches = -(-int(straight_out.split("finetune on ")[1].split(" training")[0]) // 64)     # per epoch
    stop = 2 if where == "mid-epoch" else batches
    signal_at_update(monkeypatch, stop)
    out_dir = tmp_path / "resumed"
    before = signal.getsignal(signal.SIGINT)
    assert finetune.main([*args, f"--out_dir={out_dir}"]) == 130
    err = capfd.readouterr().err
    assert f"interrupted: stopped at update {stop}/{2 * batches}; state: {out_dir / 'state.pt'}" in err, err
    assert err.count("SIGINT: stopping after this update") == 1, err
    assert signal.getsignal(signal.SIGINT) == before                    # the run's handler is gone
    assert torch.load(out_dir / "state.pt", weights_only=True)["loop"]["step"] == stop

    # the same command with --resume, or --out_dir and --resume alone (the other settings: the saved run's)
    resume = [*args, f"--out_dir={out_dir}"] if where == "mid-epoch" else [f"--out_dir={out_dir}", "--log_interval=7"]
    assert finetune.main([*resume, "--resume"]) == 0
    resumed_out = capfd.readouterr().out
    changed = "" if where == "mid-epoch" else "; changed on the command line: log_interval 50 -> 7"
    assert f"resuming {out_dir / 'state.pt'} at update {stop}{changed}\n" in resumed_out
    assert torch.equal(logits[-1], straight)
    epoch_lines = lambda out: [line.rsplit(" | ", 1)[0] for line in out.splitlines() if line.startswith("epoch ")]
    assert epoch_lines(resumed_out) == epoch_lines(straight_out)[-len(epoch_lines(resumed_out)):]
    assert len(epoch_lines(resumed_out)) == 2                           # the stopped epoch is reported once resumed
    assert not out_dir.exists()                                         # the finished run deletes its state


def test_fine_tuning_state_errors(pretrained, tmp_path, capsys):
    """A stopped run's state is never overwritten by a fresh run; --resume needs one, with the same settings."""
    ckpt, tmp = pretrained
    out_dir = tmp_path / "ft"
    args = [f"--init_from={ckpt}", f"--train={tmp / 'train.tsv'}", f"--test={tmp / 'test.tsv'}", "--max_len=32",
            "--epochs=1", f"--out_dir={out_dir}"]
    assert finetune.main([*args, "--resume"]) == 1
    assert "no stopped fine-tuning run in" in capsys.readouterr().err
    assert finetune.main([*args, "--mode=probe", "--resume"]) == 1
    assert "the probe keeps no state" in capsys.readouterr().err
    assert finetune.main([*args, "--ckpt_interval=0"]) == 1
    assert "--ckpt_interval=0" in capsys.readouterr().err
    out_dir.mkdir()
    (out_dir / "state.pt").write_bytes(b"not a checkpoint")
    assert finetune.main(args) == 1
    assert "did not end" in capsys.readouterr().err and (out_dir / "state.pt").read_bytes() == b"not a checkpoint"
    assert finetune.main([*args, "--resume"]) == 1
    assert "corrupt" in (err := capsys.readouterr().err) and "delete it to start afresh" in err
    (out_dir / "state.pt").unlink()
    fc = finetune.FinetuneConfig(**train.parse_overrides(finetune.FinetuneConfig, args))
    finetune.RunFile(fc).save(torch.nn.Linear(1, 1), *optimiser_and_schedule(), torch.Generator(), step=1)
    assert finetune.main([*args, "--resume", "--lr=0.5"]) == 1
    assert "other settings: lr=0.0001 (now 0.5)" in capsys.readouterr().err
    state = out_dir / "state.pt"                                        # the state, where a ckpt.pt belongs
    for wrong in ([f"--init_from={state}"], ["--init_from=random", f"--like={state}"]):
        assert finetune.main([*wrong, "--mode=probe"]) == 1
        assert capsys.readouterr().err == (f"error: {state} holds a finetune.py run's settings, so it is not a "
                                           "pretraining checkpoint: pass the ckpt.pt of a train.py run (python "
                                           "train.py --modality=text writes out-text/ckpt.pt)\n")


def test_a_fine_tune_on_a_folder_in_use_is_refused_and_output_paths_are_checked_first(pretrained, tmp_path, capsys):
    """A fine-tuning run holds its --out_dir as train.py does; a bad --save fails at once, not after the run; a run
    that fails leaves no empty state folder behind."""
    ckpt, tmp = pretrained
    out_dir = tmp_path / "ft"
    args = [f"--init_from={ckpt}", f"--train={tmp / 'train.tsv'}", f"--test={tmp / 'test.tsv'}", "--max_len=32",
            "--epochs=1", f"--out_dir={out_dir}"]
    holder = hold_in_another_process(out_dir)
    try:
        assert finetune.main(args) == 1
        assert f"{out_dir} is in use by another run that is still going" in capsys.readouterr().err
        assert finetune.main([*args, "--mode=probe"]) == 0          # the probe writes nothing, so holds nothing
    finally:
        holder.kill()
        holder.wait()
    out_dir.rmdir()
    assert finetune.main([*args[:1], f"--train={tmp / 'missing.tsv'}", *args[2:]]) == 1
    assert "missing.tsv" in capsys.readouterr().err and not out_dir.exists()
    assert finetune.main([*args, f"--save={tmp_path / 'ctc.pt'}"]) == 1
    assert "--save does nothing for text fine-tuning (only speech reads it)" in capsys.readouterr().err
    speech = ["--modality=speech", "--init_from=random", f"--out_dir={out_dir}"]
    assert finetune.main([*speech, f"--save={tmp_path}"]) == 1
    assert f"--save={tmp_path} is a folder: name the file to write, e.g. {tmp_path / 'ctc.pt'}" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a folder")
    assert finetune.main([*speech, f"--save={tmp_path / 'notes.txt' / 'ctc.pt'}"]) == 1
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder: choose another --save" in capsys.readouterr().err
    assert not out_dir.exists()


def nan_loss_from_call(monkeypatch: pytest.MonkeyPatch, fn: str, call: int) -> None:
    """torch.nn.functional.<fn> returns NaN from its call `call` on, as a diverged run's loss would."""
    loss_fn, calls = getattr(torch.nn.functional, fn), [0]

    def nan_later(*args, **kwargs):
        calls[0] += 1
        return loss_fn(*args, **kwargs) * (float("nan") if calls[0] >= call else 1.0)

    monkeypatch.setattr(torch.nn.functional, fn, nan_later)


def test_out_of_memory_in_fine_tuning_names_the_fix(pretrained, tmp_path, monkeypatch, capsys):
    ckpt, tmp = pretrained
    cross_entropy = torch.nn.functional.cross_entropy

    def greedy(*args, **kwargs):
        torch.empty(2 ** 50)                                           # 4 PiB of float32: torch's real CPU error
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", greedy)
    for mode in ("probe", "finetune"):
        assert finetune.main([f"--init_from={ckpt}", f"--mode={mode}", f"--train={tmp / 'train.tsv'}",
                              f"--test={tmp / 'test.tsv'}", "--max_len=32", f"--out_dir={tmp_path / 'ft'}"]) == 1
        assert capsys.readouterr().err == ("error: out of CPU memory (an allocation of 4,194,304.00 GiB failed): lower "
                                           "--batch_size\n")


def test_a_non_finite_loss_stops_fine_tuning_and_keeps_the_last_good_state(pretrained, tmp_path, monkeypatch, capsys):
    """The loss turns NaN at update 4; it is read (no sync per update) at the next save, update 6, which it must not
    overwrite the update-3 state with."""
    ckpt, tmp = pretrained
    out_dir = tmp_path / "ft"
    args = [f"--init_from={ckpt}", f"--train={tmp / 'train.tsv'}", f"--test={tmp / 'test.tsv'}", "--max_len=32",
            "--epochs=1", "--batch_size=16", "--ckpt_interval=3", f"--out_dir={out_dir}"]
    nan_loss_from_call(monkeypatch, "cross_entropy", 4)
    assert finetune.main(args) == 1
    err = capsys.readouterr().err
    assert "the fine-tuning loss is nan by update 6: stopping" in err, err
    assert f"the last good state {out_dir / 'state.pt'} (update 3) is kept. Lower --lr" in err
    assert torch.load(out_dir / "state.pt", weights_only=True)["loop"]["step"] == 3


def optimiser_and_schedule() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_bad_input(pretrained, tmp_path, capsys):
    ckpt, tmp = pretrained
    assert finetune.main([f"--init_from={tmp_path / 'none.pt'}"]) == 1
    assert "no checkpoint" in (err := capsys.readouterr().err) and "ckpt.pt of a train.py run" in err
    assert finetune.main([f"--init_from={ckpt}", f"--train={tmp / 'train.tsv'}"]) == 1
    assert "both --train and --test" in capsys.readouterr().err
    assert finetune.main([f"--init_from={ckpt}", "--modality=vision"]) == 1
    assert "text checkpoint" in capsys.readouterr().err
    assert finetune.main(["--init_from=random", "--mode=linear"]) == 1
    assert "--mode=linear" in capsys.readouterr().err
    assert finetune.main(["--init_from=bag"]) == 1
    assert "reference for the text probe" in capsys.readouterr().err
    assert finetune.main(["--init_from=ppmi", "--modality=vision", "--mode=probe"]) == 1
    assert "--init_from=ppmi (word vectors" in capsys.readouterr().err
    assert finetune.main(["--init_from=random", "--probe_layer=0"]) == 1
    assert "pass --mode=probe" in capsys.readouterr().err
    assert finetune.main(["--init_from=bag", "--mode=probe", "--probe_layer=2"]) == 1
    assert capsys.readouterr().err == "error: --probe_layer=2: --init_from=bag has no layers; leave it out\n"
    for setting, message in (("--label_fraction=0", "--label_fraction=0.0: needs a value in (0, 1]"),
                             ("--epochs=0", "--epochs=0: needs at least 1"),
                             ("--max_len=2", "--max_len=2: a passage holds <s>, its tokens and </s>: use at least 3"),
                             ("--lr=-1", "--lr=-1.0: needs a value above 0"),
                             ("--dropout=1", "--dropout=1.0: needs a value in [0, 1)")):
        assert finetune.main(["--init_from=random", setting]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert finetune.main([f"--init_from={ckpt}", f"--like={ckpt}"]) == 1
    assert "pass --init_from=random with it" in capsys.readouterr().err
    assert finetune.main(["--init_from=random", f"--like={ckpt}", "--modality=vision"]) == 1
    assert "text checkpoint" in capsys.readouterr().err
    args = [f"--init_from={ckpt}", "--mode=probe", "--probe_layer=3", "--max_len=32", f"--train={tmp / 'train.tsv'}",
            f"--test={tmp / 'test.tsv'}"]
    assert finetune.main(args) == 1
    assert "layers 0 (its input) to 2" in capsys.readouterr().err
    (tmp_path / "one.tsv").write_text("To be, or not to be\thamlet\nFull fathom five\thamlet\n")
    for mode in ("probe", "finetune"):                 # one class: 100 % for any classifier, which says nothing
        assert finetune.main([f"--init_from={ckpt}", f"--mode={mode}", f"--train={tmp_path / 'one.tsv'}",
                              f"--test={tmp_path / 'one.tsv'}", "--max_len=32", f"--out_dir={tmp_path / 'ft'}"]) == 1
        assert capsys.readouterr().err == (f"error: {tmp_path / 'one.tsv'}: every training example is of class "
                                           "'hamlet', and a classifier needs two classes or more: add examples of "
                                           "another class\n")
        assert not (tmp_path / "ft").exists()
    swapped = tmp_path / "swapped.tsv"                 # label first: every line its own class, a silent 0-2 %
    swapped.write_text("".join(f"{label}\t{sentence}\n" for sentence, label in
                               (line.rsplit("\t", 1) for line in (tmp / "train.tsv").read_text().splitlines()[1:])))
    assert finetune.main([f"--init_from={ckpt}", "--mode=probe", f"--train={swapped}", f"--test={tmp / 'test.tsv'}",
                          "--max_len=32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {swapped}: ") and "have a label no other line has" in err and err.count("\n") == 1


def test_a_run_on_other_text_reads_the_default_task_from_the_embedded_corpus(pretrained, capsys):
    """Pretrained on --data (two plays) and fine-tuned without --train / --test: the genre task's passages come from
    the embedded corpus (prepared there if need be), encoded with the checkpoint's own tokenizer."""
    ckpt, _ = pretrained
    args = [f"--init_from={ckpt}", "--mode=probe", "--max_len=32", "--label_fraction=0.05", "--probe_epochs=1"]
    assert finetune.main(args) == 0
    out = capsys.readouterr().out
    assert "classes ['comedy', 'history', 'tragedy']" in out and "test accuracy" in out


def test_transcribe_names_what_a_text_checkpoint_is(pretrained, tmp_path, capsys):
    ckpt, _ = pretrained
    sf.write(str(tmp_path / "a.wav"), np.zeros(1600, dtype=np.float32), 16000)
    assert transcribe.main([f"--ckpt={ckpt}", str(tmp_path / "a.wav")]) == 1
    assert capsys.readouterr().err == (f"error: {ckpt} is a text checkpoint; transcribe.py needs a speech model "
                                       "fine-tuned for CTC (finetune.py --modality=speech --save=out-ctc/ctc.pt)\n")
    assert transcribe.main([f"--ckpt={ckpt}", "--device=gpu", str(tmp_path / "a.wav")]) == 1
    assert capsys.readouterr().err == "error: --device=gpu: use auto, cpu, cuda, cuda:N or mps\n"


def test_random_like_a_checkpoint_builds_its_architecture_with_fresh_weights(pretrained):
    """--init_from=random --like=CKPT: the checkpoint's model settings (not the preset's), none of its weights."""
    ckpt, _ = pretrained
    fc = finetune.FinetuneConfig(init_from="random", like=str(ckpt))
    cfg, state = finetune.pretrained(fc)
    assert state is None and (cfg.n_layer, cfg.dim, cfg.block_size) == (2, 32, 32)
    encoder, transformer = finetune.init_student(fc, train.TASKS["text"](cfg, prepare=False).build_model, state)
    saved = torch.load(ckpt, weights_only=True)["model"]
    fresh = {**{"encoder." + k: v for k, v in encoder.state_dict().items()},
             **{"student." + k: v for k, v in transformer.state_dict().items()}}
    assert fresh.keys() <= saved.keys() and fresh["student.blocks.0.fc1.weight"].shape == (64, 32)
    assert not torch.equal(fresh["student.blocks.0.fc1.weight"], saved["student.blocks.0.fc1.weight"])


def test_bag_of_tokens_counts_normal_tokens():
    """The no-encoder reference: log(1 + count) per normal type, against collections.Counter; special ids
    (>= n_types: <s>, </s>, <pad>, <mask>) are not counted."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 24, (5, 40), generator=g)                # ids 20-23 play the special tokens
    features = finetune.BagOfTokens(20).features(tokens)               # (5, 20)
    for row, f in zip(tokens.tolist(), features):
        counts = Counter(t for t in row if t < 20)
        expected = torch.tensor([float(counts[t]) for t in range(20)]).log1p()
        torch.testing.assert_close(f, expected)


def test_ppmi_vectors_factor_a_naive_ppmi_matrix():
    """Against pair counts from a Python loop, PPMI written out entry by entry and numpy's full SVD: at full rank the
    vectors' Gram matrix is U S U^T (signs drop out). Special ids (>= n_types) are neither words nor contexts."""
    rng = np.random.default_rng(0)
    n, window = 6, 2
    stream = rng.integers(0, n + 2, 400)                              # ids 6 and 7 play the special tokens
    counts = np.zeros((n, n))
    for i in range(len(stream)):
        for j in range(i + 1, min(i + window + 1, len(stream))):
            if stream[i] < n and stream[j] < n:
                counts[stream[i], stream[j]] += 1
                counts[stream[j], stream[i]] += 1
    total, context = counts.sum(), counts.sum(0) ** 0.75
    ppmi = np.zeros((n, n))
    for w in range(n):
        for c in range(n):
            if counts[w, c]:
                pmi = np.log(counts[w, c] / total / (counts[w].sum() / total * context[c] / context.sum()))
                ppmi[w, c] = max(pmi, 0.0)
    u, s, _ = np.linalg.svd(ppmi)
    torch.manual_seed(0)
    vectors = finetune.ppmi_vectors(stream, n, dim=n, window=window)  # (n, n)
    expected = torch.tensor(u * s @ u.T, dtype=torch.float32)                 # (n, n)
    torch.testing.assert_close(vectors @ vectors.T, expected, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    capped = finetune.ppmi_vectors(stream, n, dim=3, window=window, max_types=3)       # the 3 most frequent types only
    freq = np.bincount(stream[stream < n], minlength=n)
    zero = (capped.abs().sum(1) == 0).numpy()
    assert capped.shape == (n, 3) and zero.sum() == n - 3 and freq[zero].max() <= freq[~zero].min()
    with pytest.raises(finetune.DataError, match="no two normal tokens"):
        finetune.ppmi_vectors(np.array([6, 7, 6, 7]), n, dim=3)        # special ids only


def test_word_vectors_average_the_normal_tokens():
    vectors = torch.randn(5, 3)
    tokens = torch.tensor([[0, 1, 6, 7], [4, 4, 4, 5]])                # 5 and up are special ids
    features = finetune.WordVectors(vectors).features(tokens)         # (2, 3)
    torch.testing.assert_close(features, torch.stack([vectors[[0, 1]].mean(0), vectors[4]]))


def test_label_subset_is_stratified():
    labels = torch.tensor([0] * 90 + [1] * 10)
    keep = subset(labels, 0.1, seed=0)
    assert (labels[keep] == 0).sum() == 9 and (labels[keep] == 1).sum() == 1
    assert torch.equal(keep, subset(labels, 0.1, seed=0))


def test_mean_pool_ignores_padding():
    """The probe's mean over tokens: a padded batch gives each passage the mean of its own unpadded outputs."""
    torch.manual_seed(0)
    encoder = TextEncoder(vocab_size=50, dim=32, max_len=16, pad_id=1, dropout=0.0)
    transformer = Transformer(TransformerConfig(n_layer=2, dim=32, n_head=2, ffn_dim=64, dropout=0.0, attn_dropout=0.0))
    clf = finetune.Classifier(encoder, transformer, torch.nn.Identity(), "mean").eval()
    pad = encoder.pad_id
    short, long = torch.tensor([[0, 7, 8, 2]]), torch.tensor([[0, 9, 10, 11, 12, 13, 2]])
    batch = torch.full((2, 7), pad)
    batch[0, :4], batch[1] = short[0], long[0]
    with torch.no_grad():
        pooled = clf.features(batch)                                    # (2, C)
        expected = torch.cat([clf.features(short), clf.features(long)])  # (2, C)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_probe_layer_pools_the_chosen_layer():
    """Layer 0 is the Transformer's input, layer k block k's output; the last block's is the default's (post-LN)."""
    torch.manual_seed(0)
    encoder = TextEncoder(vocab_size=50, dim=32, max_len=16, pad_id=1, dropout=0.0)
    transformer = Transformer(TransformerConfig(n_layer=2, dim=32, n_head=2, ffn_dim=64, dropout=0.0, attn_dropout=0.0))
    tokens = torch.tensor([[0, 7, 8, 9, 2]])
    clf = lambda layer: finetune.Classifier(encoder, transformer, torch.nn.Identity(), "mean", layer).eval()
    with torch.no_grad():
        h = encoder(*encoder.embed(tokens))                              # (1, T, C)
        first = transformer.blocks[0](h, None)[0]                        # (1, T, C)
        torch.testing.assert_close(clf(0).features(tokens), h.mean(1))
        torch.testing.assert_close(clf(1).features(tokens), first.mean(1))
        torch.testing.assert_close(clf(2).features(tokens), clf(-1).features(tokens))
