"""Speech data: audio checks, manifests, batching, resampling and the espeak-ng corpus."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import speech_data
from ctc import encode_ltr, normalize_text, text_to_ltr
from speech_data import (DataError, SpeechData, check_manifest, folder_manifest, librispeech_manifest, load_audio,
                         normalize_wave, prepare_speech, read_manifest, resample, shakespeare_lines, write_manifest)
from text_data import one_at_a_time

ROOT = Path(__file__).resolve().parent.parent


def tone(n: int, rate: int = 16000, channels: int = 1) -> np.ndarray:
    wave = 0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / rate) + 0.05
    return np.stack([wave] * channels, 1) if channels > 1 else wave


def write(path: Path, n: int, rate: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(n, rate, channels), rate)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Eight clips of 0.1-0.8 s under tmp_path/audio with a manifest and letter transcripts."""
    files = [write(tmp_path / "audio" / f"spk{i % 2}" / f"{i}.wav", 1600 * (i + 1)).relative_to(tmp_path / "audio")
             for i in range(8)]
    ltr = [text_to_ltr(f"word {'a' * (i + 1)}") for i in range(8)]
    write_manifest(tmp_path / "audio", files, tmp_path / "audio" / "train.tsv", ltr)
    return tmp_path / "audio" / "train.tsv"


def test_manifest_round_trip_and_relocation(corpus: Path, tmp_path: Path):
    root, entries, ltr = read_manifest(corpus)
    assert corpus.read_text().splitlines()[:2] == [".", "spk0/0.wav\t1600"]
    assert [n for _, n in entries] == [1600 * (i + 1) for i in range(8)]
    assert ltr[2] == "W O R D | A A A |"
    moved = shutil.move(str(corpus.parent), str(tmp_path / "moved"))       # root relative to the manifest
    assert check_manifest(Path(moved) / "train.tsv")[1] == entries


def test_absolute_root_outside_the_manifest_folder(tmp_path: Path):
    write(tmp_path / "audio" / "a.wav", 800)
    write_manifest(tmp_path / "audio", ["a.wav"], tmp_path / "lists" / "x.tsv")
    root, entries, ltr = check_manifest(tmp_path / "lists" / "x.tsv")
    assert root == (tmp_path / "audio").resolve() and entries == [("a.wav", 800)] and ltr is None


@pytest.mark.parametrize("problem, needle", [
    ("missing", "no such file"),
    ("rate", "8000 Hz"),
    ("stereo", "2 channels"),
    ("short", "fewer than min_samples=400"),
    ("empty", "0 samples"),
    ("garbage", "not readable audio"),
    ("nan", "1,000 samples are not numbers"),
])
def test_bad_audio_raises_data_error_naming_the_file(tmp_path: Path, problem: str, needle: str):
    path = tmp_path / "bad.wav"
    if problem == "rate":
        write(path, 8000, rate=8000)
    elif problem == "stereo":
        write(path, 1000, channels=2)
    elif problem in ("short", "empty"):
        write(path, 399 if problem == "short" else 0)
    elif problem == "garbage":
        path.write_text("not a wav file")
    elif problem == "nan":                                  # a float wav, damaged
        sf.write(str(path), np.full(1000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(DataError, match=needle) as error:
        load_audio(path)
    assert str(path) in str(error.value)


def test_manifest_problems_raise_data_error(corpus: Path, tmp_path: Path):
    write(corpus.parent / "spk1" / "1.wav", 1234)                           # the file changed after the manifest
    with pytest.raises(DataError, match=r"1\.wav: 1234 samples but .* lists 3200"):
        check_manifest(corpus)
    with pytest.raises(DataError, match="no such manifest"):
        read_manifest(tmp_path / "nothing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text(".\na.wav 1600\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: expected"):
        read_manifest(bad)
    corpus.with_suffix(".ltr").write_text("A |\n")
    with pytest.raises(DataError, match="1 lines but"):
        read_manifest(corpus)
    with pytest.raises(DataError, match="is a folder, not a manifest: list the audio under it with `python "
                                         f"speech_data.py {tmp_path} {tmp_path / 'train.tsv'}`"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match=r"0\.wav is an audio file, not a manifest"):
        read_manifest(corpus.parent / "spk0" / "0.wav")
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\xff\xfe\x00RIFF")
    with pytest.raises(DataError, match=r"binary\.tsv: not a manifest \(not UTF-8 text\)"):
        read_manifest(binary)


def test_transcripts_in_words_and_too_few_utterances_raise_data_error(corpus: Path):
    ltr = corpus.with_suffix(".ltr")
    ltr.write_text("".join(f"WORD {'A' * (i + 1)} |\n" for i in range(8)))  # words, not `W O R D |` letters
    with pytest.raises(DataError, match=r"train\.ltr:1: 'WORD' is not a letter symbol"):
        SpeechData(corpus, max_samples=8000, targets=True)
    with pytest.raises(DataError, match="raise --max_samples"):
        SpeechData(corpus, max_samples=100, targets=True)
    with pytest.raises(DataError, match="--batch_size=9 exceeds the 8 utterances"):
        SpeechData(corpus, max_samples=8000).batch(9, torch.Generator())


def test_a_labelled_budget_is_a_random_subset_of_at_most_that_many_minutes(corpus: Path):
    data = SpeechData(corpus, max_samples=16000, targets=True)          # clips of 1,600 x (1 ... 8) samples
    assert data.minutes == pytest.approx(1600 * 36 / 16000 / 60)
    budget = 1600 * 10 / 16000 / 60                                     # room for 10 of the 36 units
    parts = [data.subset(budget, torch.Generator().manual_seed(seed)) for seed in range(6)]
    for part in parts:
        waves = [part.wave(j) for j in range(len(part))]
        assert 0 < part.minutes <= budget and part.lengths.tolist() == [len(w) for w in waves]
        for wave, target in zip(waves, part.targets):                   # each clip keeps its own transcript
            i = data.lengths.tolist().index(len(wave))
            assert torch.equal(wave, data.wave(i)) and torch.equal(target, data.targets[i])
        assert part.lengths[part.by_length].tolist() == sorted(part.lengths.tolist())
    assert len({tuple(sorted(p.lengths.tolist())) for p in parts}) > 1  # the seed draws which clips
    assert len(data.subset(0.0001, torch.Generator())) == 1             # at least one utterance
    assert data.subset(100, torch.Generator()).minutes == data.minutes


def test_normalize_wave():
    wave = normalize_wave(torch.from_numpy(tone(5000)).float())
    assert abs(wave.mean()) < 1e-5 and abs(wave.std(unbiased=False) - 1) < 1e-3


def test_pretraining_batches_bucket_crop_and_pad(corpus: Path):
    data = SpeechData(corpus, max_samples=8000)
    batch = data.batch(2, torch.Generator().manual_seed(0))
    assert batch.waves.shape == (2, int(batch.lengths.max())) and batch.targets is None
    again = data.batch(2, torch.Generator().manual_seed(0))
    assert torch.equal(batch.waves, again.waves)                              # randomness only from the generator
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(200):
        b = data.batch(2, g)
        assert (b.lengths <= 8000).all() and b.lengths.min() >= 1600
        for row, n in zip(b.waves, b.lengths):
            assert (row[n:] == 0).all() and abs(row[:n].mean()) < 0.2           # normalised, zero-padded
            seen.add(round(float(row[0]), 4))
        assert b.lengths.max() - b.lengths.min() <= 1600                      # neighbours in length only
    assert len(seen) > 20                                                     # long clips cropped at random offsets


def test_finetuning_batches_carry_targets_and_skip_long_clips(corpus: Path):
    data = SpeechData(corpus, max_samples=8000, targets=True)
    assert len(data) == 5                                                     # 9600+ sample clips left out
    batches = list(data.iterate(2))
    assert sum(len(b.lengths) for b in batches) == 5 and batches[0].lengths.tolist() == [1600, 3200]
    b, expected = batches[1], [encode_ltr(text_to_ltr(f"word {'a' * n}")) for n in (3, 4)]
    assert b.target_lengths.tolist() == [len(e) for e in expected]
    assert b.targets[0, : b.target_lengths[0]].tolist() == expected[0]
    assert b.targets[0, b.target_lengths[0]:].eq(0).all()


def test_librispeech_manifest(tmp_path: Path):
    chapter = tmp_path / "dev-clean" / "84" / "121123"
    for i in range(2):
        sf.write(str(write(chapter / f"84-121123-000{i}.wav", 1000 + i).with_suffix(".flac")), tone(1000 + i), 16000)
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS\n")
    tsv = librispeech_manifest(tmp_path / "dev-clean", tmp_path / "manifests", "dev_clean")
    root, entries, ltr = check_manifest(tsv, min_samples=1)
    assert entries == [("84/121123/84-121123-0000.flac", 1000), ("84/121123/84-121123-0001.flac", 1001)]
    assert ltr == ["G O | D O | Y O U | H E A R |", "B U T | I N | L E S S |"]
    assert tsv.with_suffix(".wrd").read_text() == "GO DO YOU HEAR\nBUT IN LESS\n"
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n")
    with pytest.raises(DataError, match="84-121123-0001.flac: no transcript"):
        librispeech_manifest(tmp_path / "dev-clean", tmp_path / "manifests", "dev_clean")


def test_folder_manifest_lists_every_audio_file_under_the_folder(tmp_path: Path, capsys):
    """Your own audio, at any depth, becomes a manifest without transcripts that SpeechData reads; other files are
    left out; `python speech_data.py AUDIO_DIR OUT_TSV` does the same."""
    audio = tmp_path / "my audio"
    write(audio / "b.wav", 1000)
    write(audio / "deep" / "er" / "a.wav", 1200)
    sf.write(str(audio / "c.FLAC"), tone(1300), 16000)
    (audio / "notes.txt").write_text("not audio")
    tsv = folder_manifest(audio, tmp_path / "lists" / "mine.tsv")
    root, entries, ltr = check_manifest(tsv, min_samples=1)
    assert root.resolve() == audio.resolve() and ltr is None
    assert entries == [("b.wav", 1000), ("c.FLAC", 1300), ("deep/er/a.wav", 1200)]
    assert speech_data.main([str(audio), str(audio / "train.tsv")]) == 0
    assert capsys.readouterr().out == f"{audio / 'train.tsv'}\n"
    assert (audio / "train.tsv").read_text().splitlines()[0] == "."            # inside the folder: it can move
    assert len(SpeechData(audio / "train.tsv", 16000, min_samples=1)) == 3
    for args, message in ((["nowhere", "x.tsv"], "nowhere: no such folder"),
                          ([str(audio), str(tmp_path / "lists")], "name the manifest file to write, ending in .tsv"),
                          ([str(tmp_path / "lists"), "x.tsv"], "no .wav / .flac / .ogg files under it")):
        assert speech_data.main(args) == 1 and message in capsys.readouterr().err
    (tmp_path / "lists" / "mine.ltr").write_text("A |\n")
    with pytest.raises(DataError, match=r"mine\.ltr would be read as the new manifest's transcripts"):
        folder_manifest(audio, tmp_path / "lists" / "mine.tsv")
    write(audio / "stereo.wav", 1000, channels=2)
    with pytest.raises(DataError, match=r"stereo\.wav: 2 channels"):
        folder_manifest(audio, tmp_path / "again.tsv")
    assert not (tmp_path / "again.tsv").exists()


def test_resample_keeps_tones_and_removes_aliases():
    t = torch.arange(22050) / 22050
    for hz, expected in ((440, 1.0), (3000, 1.0), (10000, 0.0)):              # 10 kHz is above the new Nyquist
        out = resample(torch.sin(2 * math.pi * hz * t), 22050, 16000)
        assert len(out) == 16000
        reference = expected * torch.sin(2 * math.pi * hz * torch.arange(16000) / 16000)
        assert (out - reference)[200:-200].abs().max() < 0.03


def test_shakespeare_lines_are_clean():
    lines = shakespeare_lines(Path(speech_data.__file__).parent / "data" / "shakespeare.tar.xz")
    assert len(lines) > 50_000
    for text, words in lines[::500]:
        assert words == normalize_text(text) and 3 <= len(words.split()) <= 15
        assert set(words) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")


def test_missing_espeak_says_how_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install -y espeak-ng"):
        prepare_speech(tmp_path / "speech")


def test_a_full_disk_leaves_no_partial_corpus_and_says_what_to_do(tmp_path: Path, monkeypatch):
    def speak(job: dict, out_dir: Path) -> float:
        (out_dir / job["file"]).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / job["file"]).write_bytes(b"RIFF")                            # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(speech_data, "_speak", speak)
    with pytest.raises(DataError, match=r"could not write the prepared data in .*speech \(No space left on device; "
                                        r"[\d,]+ MiB free there\): free some space there, or clone the project"):
        prepare_speech(tmp_path / "speech", n_utts=4, n_test=1, n_test_voices=1)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["speech.lock"]      # no speech.tmp with the part


def test_a_second_process_waits_for_the_corpus_being_built_and_uses_it(tmp_path: Path):
    """Two runs started at once on a fresh clone: the second must not build the corpus again over the first one's
    half-written files. The test holds the lock as the first builder would, then 'finishes' a build."""
    out = tmp_path / "speech"
    built = {s: {"utterances": n, "hours": 0.01, "voices": ["en+m1"]} for s, n in (("train", 2), ("test", 1))}
    code = ("import json, sys; from pathlib import Path; from speech_data import prepare_speech; "
            "print(json.dumps(prepare_speech(Path(sys.argv[1]))))")
    with one_at_a_time(tmp_path / "speech.lock", "building it"):
        second = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert second.stdout.readline() == f"waiting for another process that is synthesising {out} ...\n"
            (tmp_path / "elsewhere").mkdir()
            (tmp_path / "elsewhere" / "stats.json").write_text(json.dumps(built))
            (tmp_path / "elsewhere").rename(out)                             # the first builder's last step
        except BaseException:
            second.kill()
            raise
    stdout, _ = second.communicate(timeout=120)
    found, returned = stdout.splitlines()
    assert second.returncode == 0 and json.loads(returned) == built
    assert found == f"prepare_speech: {out} is up to date (train 2 utterances / 0.6 min / 1 voices, test 1 utterances " \
                    "/ 0.6 min / 1 voices)"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install -y espeak-ng)")
def test_tiny_espeak_corpus(tmp_path: Path):
    stats = prepare_speech(tmp_path / "speech", n_utts=3, n_test=1, n_test_voices=1)
    assert stats["train"]["utterances"] == 2 and stats["test"]["utterances"] == 1
    assert not set(stats["train"]["voices"]) & set(stats["test"]["voices"])
    assert prepare_speech(tmp_path / "speech", n_utts=3, n_test=1, n_test_voices=1) == stats   # done: skipped
    assert not (tmp_path / "speech.tmp").exists()
    data = SpeechData(tmp_path / "speech" / "train.tsv", max_samples=16000 * 20, targets=True)
    assert len(data) == 2 and data.lengths.min() > 16000 // 2                 # 3+ words last over half a second


def test_command_line_on_a_built_corpus_says_what_it_holds(tmp_path, capsys):
    """`python speech_data.py` on a corpus built before prints one line on it instead of nothing."""
    out = tmp_path / "speech"
    out.mkdir()
    stats = {s: {"utterances": n, "hours": h, "voices": ["en+m1", "en+f1"][:v]}
             for s, n, h, v in (("train", 3, 0.05, 2), ("test", 1, 0.01, 1))}
    (out / "stats.json").write_text(json.dumps(stats))
    assert speech_data.main([str(out)]) == 0
    assert capsys.readouterr().out == (f"prepare_speech: {out} is up to date (train 3 utterances / 3.0 min / 2 "
                                       "voices, test 1 utterances / 0.6 min / 1 voices)\n")
    for damaged in ('{"train": {"utt', '{"train": 3}'):                       # cut short; another shape
        (out / "stats.json").write_text(damaged)
        assert speech_data.main([str(out)]) == 1
        assert capsys.readouterr().err == (f"error: {out / 'stats.json'} is damaged: delete {out} and run again to "
                                           "synthesise the corpus afresh\n")


def test_command_line_help_and_bad_arguments(tmp_path, monkeypatch, capsys):
    """--help explains; a flag or the wrong number of arguments gets the usage; none of them builds a corpus."""
    monkeypatch.chdir(tmp_path)
    assert speech_data.main(["--help"]) == 0 and "usage: python speech_data.py" in capsys.readouterr().out
    assert speech_data.main(["--out=x"]) == 2 and "--out=x is not an argument" in capsys.readouterr().err
    assert speech_data.main(["a", "b", "c", "d"]) == 2 and "usage:" in capsys.readouterr().err
    assert speech_data.main(["a", "b.tsv"]) == 1 and "a: no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
