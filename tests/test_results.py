"""results.py: per-seed units, resume from what is finished, the table and the plot."""

import json
import os
import signal

import pytest
import torch

import results
import train
from tests.test_finetune import signal_at_update

TINY = dict(n_layer=1, dim=32, n_head=2, ffn_dim=64, top_k=1, img_size=16, patch_size=4, batch_size=8, max_iters=3,
            eval_iters=1, log_interval=1, eval_interval=100, ckpt_interval=100)


@pytest.fixture
def tiny(monkeypatch):
    """A tiny vision preset and quick downstream runs; counts the pretraining runs."""
    monkeypatch.setitem(train.PRESETS["vision"], "small", {**train.PRESETS["vision"]["small"], **TINY})
    monkeypatch.setitem(results.DOWNSTREAM, "vision", [
        ("probe", dict(mode="probe", label_fraction=0.1, probe_epochs=2), "accuracy", True),
        ("fine-tune", dict(mode="finetune", label_fraction=0.1, epochs=1), "accuracy", True)])
    calls = []
    monkeypatch.setattr(results, "train", lambda cfg: calls.append(cfg) or train.train(cfg))
    return calls


def test_results_table_plot_and_resume(tiny, tmp_path, capsys):
    args = ["--modality=vision", "--seeds=2", f"--out_dir={tmp_path}"]
    assert results.main(args) == 0
    assert len(tiny) == 2                                                    # one pretraining per seed
    table = (tmp_path / "results.md").read_text()
    assert "| vision |" in table and "| probe |" in table and "| fine-tune |" in table
    assert (tmp_path / "results.png").stat().st_size > 0
    summary = json.loads((tmp_path / "vision" / "summary.json").read_text())
    assert [len(summary["rows"]["probe"][k]) for k in ("pretrained", "random")] == [2, 2]

    # a lost downstream unit is redone, everything finished is read back
    (tmp_path / "vision" / "seed1" / "downstream1_random.json").unlink()
    assert results.main(args) == 0
    assert len(tiny) == 2
    assert (tmp_path / "vision" / "seed1" / "downstream1_random.json").exists()

    # so is a damaged one, with a warning
    done = tmp_path / "vision" / "seed0" / "downstream0_pretrained.json"
    done.write_text('{"accuracy": 0.')
    capsys.readouterr()
    assert results.main(args) == 0
    assert f"warning: {done} is damaged; running it again\n" in capsys.readouterr().err
    assert len(tiny) == 2 and 0 <= json.loads(done.read_text())["accuracy"] <= 1


def test_unfinished_pretraining_resumes(tiny, tmp_path):
    out = tmp_path / "vision" / "seed0"
    cfg = train.Config(**{**train.PRESETS["vision"]["small"], "modality": "vision", "max_iters": 2,
                          "out_dir": str(out / "pretrain")})
    train.train(cfg)                                                         # a run stopped at step 2 of 3
    result = results.pretrain("vision", 0, out, "cpu")
    assert tiny[-1].resume
    assert train.load_checkpoint(out / "pretrain" / "ckpt.pt")["step"] == 3
    assert result["min_target_var"] > 0


def test_ctrl_c_in_pretraining_keeps_the_update_and_the_same_command_resumes(tiny, tmp_path, monkeypatch, capsys):
    lr_at = train.lr_at

    def lr_with_ctrl_c(step: int, cfg: train.Config) -> float:
        if step == 1 and not cfg.resume:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, cfg)

    monkeypatch.setattr(train, "lr_at", lr_with_ctrl_c)
    args = ["--modality=vision", "--seeds=1", f"--out_dir={tmp_path}"]
    assert results.main(args) == 130
    assert "the same command continues" in capsys.readouterr().err
    assert train.load_checkpoint(tmp_path / "vision" / "seed0" / "pretrain" / "ckpt.pt")["step"] == 2
    assert results.main(args) == 0 and tiny[-1].resume


def test_ctrl_c_in_fine_tuning_keeps_the_update_and_the_same_command_resumes(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "vision" / "seed0"
    results.pretrain("vision", 0, out, "cpu")
    signal_at_update(monkeypatch, 2)            # the first update that clips: the pretrained encoder's fine-tuning
    args = ["--modality=vision", "--seeds=1", f"--out_dir={tmp_path}"]
    assert results.main(args) == 130
    assert "the same command continues" in capsys.readouterr().err
    state = out / "downstream1_pretrained" / "state.pt"
    assert torch.load(state, weights_only=True)["loop"]["step"] == 2
    assert results.main(args) == 0
    assert f"resuming {state} at update 2" in capsys.readouterr().out and not state.parent.exists()


def test_bad_arguments():
    assert results.main(["--modality=audio"]) == 1
    assert results.main(["--seeds=0"]) == 1


def test_one_seed_has_no_spread_in_the_table():
    """A single seed's spread is unknown: the table gives the value alone, not '± 0.000'; two seeds give the sample
    standard deviation."""
    assert results.mean_text([0.5, 0.7]) == "0.600 ± 0.141" and results.mean_text([0.61]) == "0.610"
    run = lambda value: dict(value=value, seconds=60.0)
    summary = dict(pretrain=[dict(seconds=120.0, eval_loss=10.5, min_target_var=0.72)],
                   rows={name: {"pretrained": [run(0.6)], "random": [run(0.5)]}
                         for name, *_ in results.DOWNSTREAM["vision"]})
    table = results.table({"vision": summary})
    assert "held-out loss 10.50, min target_var 0.72" in table and "| **0.600** | 0.500 | 1 |" in table
    assert "±" not in table
