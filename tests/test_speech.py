"""Speech: the conv feature encoder's frame arithmetic, padding, span masks from frame lengths, a tiny pretraining and
CTC fine-tuning run, and the errors a user can cause."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import finetune
import train
import transcribe
from ctc import text_to_ltr
from encoders import ConvFeatureExtractor, SpeechEncoder, conv_output_lengths
from speech_data import write_manifest
from tests.test_finetune import nan_loss_from_call, signal_at_update
from tests.test_train import assert_only_lists, record_settings

KERNELS, STRIDES = ConvFeatureExtractor.KERNELS, ConvFeatureExtractor.STRIDES
TINY = ["--modality=speech", "--n_layer=2", "--dim=32", "--n_head=2", "--ffn_dim=64", "--top_k=2", "--conv_dim=16",
        "--batch_size=2", "--max_samples=12000", "--eval_iters=1", "--log_interval=1", "--tau_n=4"]


def tiny_encoder(pos_layers: int = 5, pos_kernel: int = 19) -> SpeechEncoder:
    torch.manual_seed(0)
    return SpeechEncoder(dim=32, channels=16, depth=7, pos_layers=pos_layers, pos_kernel=pos_kernel, pos_groups=16,
                         dropout=0.1).eval()


def padded(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)                    # (B, S)
    return batch, torch.arange(batch.shape[1]) >= lengths[:, None]                     # (B, S), (B, S)


# ---- frames ----------------------------------------------------------------------------------------------------

def test_one_second_gives_49_frames_at_the_base_config():
    """16 kHz -> 50 Hz with a 400-sample receptive field: 1 s gives (16000 - 400) / 320 + 1 = 49 frames (SPEC §2)."""
    encoder = SpeechEncoder(dim=768).eval()
    with torch.no_grad():
        x, pad = encoder.embed(torch.randn(1, 16000), torch.zeros(1, 16000, dtype=torch.bool))
    assert x.shape == (1, 49, 768) and not pad.any()
    assert conv_output_lengths(torch.tensor([16000, 400, 399, 720, 719]), KERNELS, STRIDES).tolist() == [49, 1, 0, 2, 1]


@pytest.mark.parametrize("depth", [7, 4])
def test_length_formula_matches_the_conv_stack(depth):
    torch.manual_seed(0)
    stack = ConvFeatureExtractor(channels=4, depth=depth)
    for n in (400, 401, 719, 720, 1000, 4321, 16000):
        with torch.no_grad():
            T = stack(torch.randn(1, n)).shape[1]
        assert conv_output_lengths(torch.tensor([n]), KERNELS[:depth], STRIDES[:depth]).item() == T


@pytest.mark.parametrize("kernel", [19, 16, 3])
def test_pos_conv_keeps_the_length_for_odd_and_even_kernels(kernel):
    encoder = tiny_encoder(pos_kernel=kernel)
    x = torch.randn(2, 37, 32)
    assert encoder(x, None).shape == (2, 37, 32)


# ---- padding -----------------------------------------------------------------------------------------------------

def test_padded_batch_gives_each_utterance_its_own_frames():
    """The conv stack normalises each frame over channels, so every real frame of a padded row equals the row alone.
    The pos conv sees its neighbours: padded frames are zeroed before it (as fairseq and HF do), so with one pos conv
    layer all real frames still match; with 5 layers, the outputs of layer 1 at padded frames reach back 9 frames per
    further layer, and only the frames more than 4 x 9 frames before the end match."""
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=g) for n in (48000, 32000, 24000)]
    batch, pad = padded(waves)
    for pos_layers, exact_to_the_end in ((1, True), (5, False)):
        encoder = tiny_encoder(pos_layers=pos_layers)
        with torch.no_grad():
            x, frame_pad = encoder.embed(batch, pad)                                    # (B, T, C), (B, T)
            h = encoder(x, frame_pad)
            for b, w in enumerate(waves):
                x1, pad1 = encoder.embed(w[None], torch.zeros(1, len(w), dtype=torch.bool))
                h1 = encoder(x1, pad1)[0]                                               # (T_b, C)
                T_b = h1.shape[0]
                assert (~frame_pad[b]).sum() == T_b
                assert torch.allclose(x[b, :T_b], x1[0], atol=1e-5)
                reach = T_b if exact_to_the_end else T_b - 4 * 9
                assert torch.allclose(h[b, :reach], h1[:reach], atol=1e-5)
                if b > 0 and not exact_to_the_end:
                    assert not torch.allclose(h[b, :T_b], h1, atol=1e-5)    # the tail does differ: test is sharp


def test_task_batches_mask_real_frames_only(speech_corpus):
    cfg = train.parse_args([*TINY, f"--data={speech_corpus}"])
    task = train.SpeechTask(cfg, prepare=True)
    encoder = task.build_model().encoder.eval()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        b = task.batch("train", g)
        with torch.no_grad():
            _, frame_pad = encoder.embed(b["source"], b["padding_mask"])
        assert b["mask"].shape == frame_pad.shape
        assert not (b["mask"] & frame_pad).any() and b["mask"].any()
    a, b = (task.batch("train", torch.Generator().manual_seed(3)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)                                      # all randomness from g


# ---- end to end ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def speech_corpus(tmp_path_factory) -> Path:
    """Twelve 0.5-1.2 s clips of chirps and noise with letter transcripts: train.tsv and valid.tsv."""
    root = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("valid", 4)):
        files = []
        for i in range(n):
            samples = int(rng.integers(8000, 19200))
            t = np.arange(samples) / 16000
            wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * i) * t * (1 + t)) + 0.05 * rng.standard_normal(samples)
            files.append(Path(split) / f"{i}.wav")
            (root / "audio" / split).mkdir(parents=True, exist_ok=True)
            sf.write(str(root / "audio" / files[-1]), wave, 16000, subtype="PCM_16")
        ltr = [text_to_ltr("one two" if i % 2 else "three") for i in range(n)]
        write_manifest(root / "audio", files, root / f"{split}.tsv", ltr)
    return root / "train.tsv"


def test_tiny_pretraining_then_ctc_finetuning(speech_corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    read = record_settings(monkeypatch, train.TASKS, "speech")
    assert train.main([*TINY, f"--data={speech_corpus}", "--max_iters=4", "--eval_interval=2",
                       f"--out_dir={out}"]) == 0
    assert_only_lists(train.ONLY, "speech", read)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(v > 0.1 for v in ckpt["history"]["target_var"])
    assert "encoder.pos_conv_embed.layers.0.conv.weight" in ckpt["model"]    # the small preset: one layer
    assert "encoder.feature_extractor.conv_layers.6.layer_norm.weight" in ckpt["model"]
    capsys.readouterr()
    valid = speech_corpus.with_name("valid.tsv")
    args = ["--modality=speech", f"--train={speech_corpus}", f"--test={valid}", "--epochs=2", "--batch_size=2"]
    read = record_settings(monkeypatch, finetune.RUNNERS, "speech")
    for init in (out / "ckpt.pt", "random"):
        # --max_samples=15000 leaves out 6 of the 8 training clips (14,038-18,208 samples), none of the 4 test clips
        assert finetune.main([*args, f"--init_from={init}", f"--out_dir={tmp_path / 'ft'}", *(
            ["--preset=small", "--budget_minutes=60"] if init == "random" else ["--max_samples=15000"])]) == 0
        out_text = capsys.readouterr().out
        assert f"min of labelled audio, 4 utterances of {valid})" in out_text
        assert ("--budget_minutes=60: the training set holds 0.1 min, all of which is used" in out_text) == (
            init == "random")
    assert not (tmp_path / "ft").exists()                      # a finished run leaves no state behind
    assert_only_lists(finetune.ONLY, "speech", read)
    wav = str(speech_corpus.parent / "audio" / "train" / "0.wav")
    assert transcribe.main([f"--ckpt={out / 'ckpt.pt'}", wav]) == 1           # pretrained, no letter head
    assert "a pretraining checkpoint, not a CTC one" in capsys.readouterr().err


def test_ctrl_c_saves_ctc_fine_tuning_and_resume_ends_where_the_straight_run_does(speech_corpus, tmp_path,
                                                                                    monkeypatch, capfd):
    """8 updates; Ctrl-C during update 3: the run saves it and exits with 130, and --resume ends with the straight
    run's weights, to the bit, and its printed losses (their sums since the last line are part of the state)."""
    assert train.main([*TINY, f"--data={speech_corpus}", "--max_iters=1", f"--out_dir={tmp_path / 'pre'}"]) == 0
    args = ["--modality=speech", f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}", f"--train={speech_corpus}",
            f"--test={speech_corpus.with_name('valid.tsv')}", "--epochs=2", "--batch_size=2", "--ckpt_interval=2",
            "--log_interval=4"]
    weights = []
    transcribe = finetune.transcribe

    def transcribe_and_keep_the_weights(model, *rest):
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return transcribe(model, *rest)

    monkeypatch.setattr(finetune, "transcribe", transcribe_and_keep_the_weights)
    assert finetune.main([*args, f"--out_dir={tmp_path / 'straight'}"]) == 0
    straight_out = capfd.readouterr().out
    signal_at_update(monkeypatch, 3)
    out_dir = tmp_path / "resumed"
    assert finetune.main([*args, f"--out_dir={out_dir}"]) == 130
    assert "interrupted: stopped at update 3/8" in capfd.readouterr().err
    assert finetune.main([*args, f"--out_dir={out_dir}", "--resume"]) == 0
    resumed_out = capfd.readouterr().out
    assert all(torch.equal(weights[0][k], weights[-1][k]) for k in weights[0])
    losses = lambda out: [line.split(" | lr")[0] for line in out.splitlines() if "| ctc loss" in line]
    assert losses(resumed_out) == losses(straight_out) and len(losses(straight_out)) == 2
    assert not out_dir.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_failed_save_keeps_the_trained_model_and_resume_writes_it(speech_corpus, tmp_path, monkeypatch, capsys):
    """--save's file cannot be written (it goes to /dev/full, a device that is always full): the run's state at its
    last update stays, and --resume writes --save without training again."""
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, "/dev/full" if str(f).endswith("ctc.tmp") else f))
    args = ["--modality=speech", "--init_from=random", "--preset=small", f"--train={speech_corpus}",
            f"--test={speech_corpus.with_name('valid.tsv')}", "--epochs=1", "--batch_size=2",
            f"--out_dir={tmp_path / 'ft'}", f"--save={tmp_path / 'ctc.pt'}"]
    assert finetune.main(args) == 1
    assert capsys.readouterr().err.endswith(f"The trained model is kept in {tmp_path / 'ft' / 'state.pt'}: the same "
                                            "command with --resume writes --save without training again\n")
    monkeypatch.setattr(torch, "save", save)
    assert finetune.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "ctc loss" not in out and f"CTC checkpoint: {tmp_path / 'ctc.pt'}" in out       # no update trained again
    assert transcribe.load_ctc(str(tmp_path / "ctc.pt")) is not None and not (tmp_path / "ft").exists()


def test_a_non_finite_ctc_loss_stops_at_once(speech_corpus, tmp_path, monkeypatch, capsys):
    assert train.main([*TINY, f"--data={speech_corpus}", "--max_iters=1", f"--out_dir={tmp_path / 'pre'}"]) == 0
    nan_loss_from_call(monkeypatch, "ctc_loss", 2)
    args = ["--modality=speech", f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}", f"--train={speech_corpus}",
            f"--test={speech_corpus.with_name('valid.tsv')}", "--batch_size=2", f"--out_dir={tmp_path / 'ft'}"]
    assert finetune.main(args) == 1
    assert "the fine-tuning loss is nan by update 2: stopping; no state was saved" in capsys.readouterr().err


def test_finetuning_trains_all_but_the_conv_feature_encoder(speech_corpus):
    cfg = train.parse_args([*TINY, f"--data={speech_corpus}"])
    student = train.SpeechTask(cfg, prepare=True).build_model()
    model = finetune.CTCModel(student.encoder, student.student, 32)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("encoder.feature_extractor.")}
    assert "encoder.feature_projection.projection.weight" not in frozen


def test_frozen_steps_train_only_the_ctc_head(speech_corpus):
    """--freeze (fairseq's freeze_finetune_updates): while frozen, the loss reaches the letter head and nothing else."""
    cfg = train.parse_args([*TINY, f"--data={speech_corpus}"])
    student = train.SpeechTask(cfg, prepare=True).build_model()
    model = finetune.CTCModel(student.encoder, student.student, 32)
    waves = torch.randn(2, 8000)
    for frozen in (True, False):
        model.zero_grad(set_to_none=True)
        logits, _ = model(waves, torch.zeros_like(waves, dtype=torch.bool), frozen=frozen)  # (B, T, 32)
        logits.square().mean().backward()
        trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
        assert trained == ({"lm_head"} if frozen else {"lm_head", "encoder", "transformer"})


# ---- errors a user can cause -----------------------------------------------------------------------------------

def test_bad_speech_data_is_one_clear_error(speech_corpus, tmp_path, capsys):
    code = train.main([*TINY, f"--data={tmp_path / 'nope.tsv'}", f"--out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 1 and "nope.tsv: no such manifest" in err and len(err.strip().splitlines()) == 1
    wav = speech_corpus.parent / "audio" / "train" / "0.wav"
    for data, message in ((tmp_path, "is a folder, not a manifest"), (".", ". is a folder, not a manifest"),
                          (wav, "0.wav is an audio file, not a manifest")):
        code = train.main([*TINY, f"--data={data}", f"--out_dir={tmp_path / 'o'}"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err

    sf.write(str(tmp_path / "stereo.wav"), np.zeros((8000, 2)), 16000)
    (tmp_path / "bad.tsv").write_text(f"{tmp_path}\nstereo.wav\t8000\n")
    code = train.main([*TINY, f"--data={tmp_path / 'bad.tsv'}", f"--out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 1 and "2 channels" in err and "Traceback" not in err
    assert f"{tmp_path / 'bad.tsv'}:2 lists it, relative to the root folder on the manifest's first line" in err

    no_ltr = tmp_path / "unlabelled.tsv"
    write_manifest(speech_corpus.parent / "audio", [Path("train/0.wav")], no_ltr)
    code = finetune.main(["--modality=speech", "--init_from=random", f"--train={no_ltr}", f"--test={no_ltr}"])
    err = capsys.readouterr().err
    assert code == 1 and "no transcripts" in err

    code = finetune.main(["--modality=speech", "--init_from=random", f"--train={speech_corpus}"])
    assert code == 1 and "pass both --train and --test" in capsys.readouterr().err

    code = finetune.main(["--modality=speech", "--init_from=random", "--freeze=1.5"])
    assert code == 1 and "--freeze=1.5" in capsys.readouterr().err
