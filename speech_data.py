"""Speech data: 16 kHz mono audio for pre-training and CTC fine-tuning.

- Audio files are read with soundfile and checked; every problem raises DataError naming the file and the fix.
- Every utterance is normalised to zero mean and unit variance (`normalize_wave`), in pre-training and fine-tuning
  alike (SPEC §6: fine-tuning must normalise exactly as pre-training did).
- A corpus is a fairseq manifest: `<split>.tsv` (first line the root folder, then `relative/path<TAB>samples`) with a
  parallel `<split>.ltr` of letter transcripts (ctc.py) and `<split>.wrd` of word transcripts.
- `SpeechData` serves length-bucketed, cropped, zero-padded batches; randomness comes only from a torch.Generator.
- The default corpus is synthesised offline with espeak-ng from the Shakespeare plays in data/ (`prepare_speech`).

    python speech_data.py                                            # default corpus -> data/speech
    python speech_data.py my_audio my_audio/train.tsv                # a manifest of your own audio (no transcripts)
    python speech_data.py LibriSpeech/dev-clean data/librispeech dev_clean   # manifests for a LibriSpeech split
"""

import copy
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ctc import BLANK, LETTER_ID, encode_ltr, normalize_text, text_to_ltr
# the data helpers every modality shares; DataError: bad user data, which train.py and finetune.py catch
from text_data import DataError, one_at_a_time, write_error

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")                          # what audio_files lists
CORPUS_DIR = Path(__file__).resolve().parent / "data" / "speech"      # where the espeak-ng corpus is built
MIN_SAMPLES = 400  # receptive field of the base feature encoder (25 ms): a shorter clip gives no frame at all


# ----------------------------------------------------------------------------------------------------------------
# reading and normalising audio


def audio_samples(path: Path, min_samples: int = MIN_SAMPLES) -> int:
    """Check that `path` is readable 16 kHz mono audio of at least min_samples samples; return its length.

    Stereo is an error rather than a silent downmix: a second channel often means the wrong file.
    """
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file; check the path")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.SoundFileError) as e:
        raise DataError(f"{path}: not readable audio ({e}); convert it to 16 kHz mono wav or flac") from e
    if info.samplerate != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {info.samplerate} Hz, expected {SAMPLE_RATE}; "
                        f"resample it, e.g. `sox in.wav -r {SAMPLE_RATE} out.wav`")
    if info.channels != 1:
        raise DataError(f"{path}: {info.channels} channels, expected mono; downmix it, e.g. `sox in.wav -c 1 out.wav`")
    if info.frames < min_samples:
        raise DataError(f"{path}: {info.frames} samples, fewer than min_samples={min_samples} "
                        f"(the feature encoder's receptive field); use a longer clip")
    return info.frames


def load_audio(path: Path, min_samples: int = MIN_SAMPLES) -> Tensor:
    """The checked waveform of a 16 kHz mono file, (S,) float32 in [-1, 1], not normalised."""
    audio_samples(path, min_samples)
    wave = torch.from_numpy(sf.read(str(path), dtype="float32")[0])                         # (S,)
    if bad := int((~wave.isfinite()).sum()):    # a float wav can hold them; the model would output NaN, silently
        raise DataError(f"{path}: {bad:,} samples are not numbers (NaN or infinite): the file is damaged; export it "
                        "again")
    return wave


def normalize_wave(wave: Tensor) -> Tensor:
    """Zero mean, unit variance over one whole utterance (fairseq's `normalize: true`: layer norm, eps 1e-5).

    wave: (S,), a single unpadded utterance (padding would skew the statistics). Returns (S,).
    """
    return F.layer_norm(wave, wave.shape)


# ----------------------------------------------------------------------------------------------------------------
# fairseq manifests


def write_manifest(root: Path, files: list[Path], out_tsv: Path, ltr: list[str] | None = None) -> None:
    """Write `out_tsv` listing `files` (paths under `root`) with their sample counts, and `ltr` (one `.ltr` line
    per file) to the parallel `.ltr` file. Every file is checked with `audio_samples`.

    The root is written relative to the manifest's folder when it lies inside it (so the corpus can move),
    absolute otherwise (as fairseq writes it).
    """
    root, out_tsv = Path(root).resolve(), Path(out_tsv)
    if ltr is not None and len(ltr) != len(files):
        raise ValueError(f"{len(files)} files but {len(ltr)} transcripts")
    out_tsv.parent.mkdir(parents=True, exist_ok=True)
    here = out_tsv.parent.resolve()
    lines = [str(root.relative_to(here)) if root.is_relative_to(here) else str(root)]
    for f in files:
        path = root / f                                                      # an absolute f stays as it is
        lines.append(f"{path.relative_to(root)}\t{audio_samples(path, min_samples=1)}")
    out_tsv.write_text("\n".join(lines) + "\n")
    if ltr is not None:
        out_tsv.with_suffix(".ltr").write_text("".join(line + "\n" for line in ltr))


def audio_files(root: Path) -> list[Path]:
    """Every audio file (AUDIO_EXTENSIONS, any case) under the folder root, at any depth, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass the folder that holds your audio files")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{root}: no {' / '.join(AUDIO_EXTENSIONS)} files under it")
    return files


def folder_manifest(audio_dir: Path, out_tsv: Path) -> Path:
    """A manifest without transcripts of every audio file under audio_dir (audio_files), for pre-training on your
    own audio: writes out_tsv (write_manifest checks every file) and returns its path."""
    root, out_tsv = Path(audio_dir), Path(out_tsv)
    if out_tsv.suffix != ".tsv" or out_tsv.is_dir():
        raise DataError(f"{out_tsv}: name the manifest file to write, ending in .tsv (e.g. {root / 'train.tsv'})")
    if out_tsv.with_suffix(".ltr").exists():
        raise DataError(f"{out_tsv.with_suffix('.ltr')} would be read as the new manifest's transcripts: choose "
                        "another name for it")
    write_manifest(root, [p.relative_to(root) for p in audio_files(root)], out_tsv)
    return out_tsv


def read_manifest(tsv: Path) -> tuple[Path, list[tuple[str, int]], list[str] | None]:
    """Read a manifest: (root folder, [(relative path, samples)], `.ltr` lines or None when there is no `.ltr`).
    A relative root is taken relative to the manifest's folder."""
    tsv = Path(tsv)
    if tsv.is_dir():
        raise DataError(f"{tsv} is a folder, not a manifest: list the audio under it with "
                        f"`python speech_data.py {tsv} {tsv / 'train.tsv'}` and pass that file")
    if not tsv.is_file():
        raise DataError(f"{tsv}: no such manifest; `python speech_data.py --help` shows how to write one")
    if tsv.suffix.lower() in AUDIO_EXTENSIONS:
        raise DataError(f"{tsv} is an audio file, not a manifest: list your audio files in one with "
                        f"`python speech_data.py <their folder> train.tsv` and pass that file")
    try:
        lines = tsv.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{tsv}: not a manifest (not UTF-8 text); `python speech_data.py --help` shows how to write "
                        "one") from None
    if not lines:
        raise DataError(f"{tsv}: empty manifest; its first line must be the root folder of the audio files")
    entries = []
    for number, line in enumerate(lines[1:], 2):
        rel, _, samples = line.partition("\t")
        if not samples.isdigit():
            raise DataError(f"{tsv}:{number}: expected `relative/path<TAB>samples`, got {line!r}")
        entries.append((rel, int(samples)))
    ltr_path = tsv.with_suffix(".ltr")
    ltr = ltr_path.read_text().splitlines() if ltr_path.is_file() else None
    if ltr is not None and len(ltr) != len(entries):
        raise DataError(f"{ltr_path}: {len(ltr)} lines but {tsv} lists {len(entries)} files; regenerate both together")
    return tsv.parent / lines[0], entries, ltr


def check_manifest(tsv: Path, min_samples: int = MIN_SAMPLES) -> tuple[Path, list[tuple[str, int]], list[str] | None]:
    """read_manifest, then check every file (readable, 16 kHz, mono, long enough, length as listed)."""
    root, entries, ltr = read_manifest(tsv)
    for number, (rel, samples) in enumerate(entries, 2):
        try:
            found = audio_samples(root / rel, min_samples)
        except DataError as e:
            raise DataError(f"{e} ({tsv}:{number} lists it, relative to the root folder on the manifest's first "
                            f"line, {root}; fix the file or drop the line)") from None
        if found != samples:
            raise DataError(f"{root / rel}: {found} samples but {tsv} lists {samples}; "
                            f"the file changed after the manifest was written: regenerate the manifest")
    return root, entries, ltr


def librispeech_manifest(librispeech_dir: Path, out_dir: Path, split_name: str) -> Path:
    """Manifests for one LibriSpeech split folder (`<speaker>/<chapter>/*.flac` + `*.trans.txt`):
    writes `<split_name>.tsv`, `.ltr` and `.wrd` into out_dir and returns the `.tsv` path."""
    root = Path(librispeech_dir).resolve()
    words = {}                                                               # utterance id -> transcript
    for trans in root.glob("*/*/*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt, _, text = line.partition(" ")
            words[utt] = text
    flacs = sorted(root.glob("*/*/*.flac"))
    if not flacs:
        raise DataError(f"{root}: no <speaker>/<chapter>/*.flac files; pass a split folder like LibriSpeech/dev-clean")
    for flac in flacs:
        if flac.stem not in words:
            raise DataError(f"{flac}: no transcript line in {flac.parent}/*.trans.txt; restore the split's files")
    tsv = Path(out_dir) / f"{split_name}.tsv"
    write_manifest(root, flacs, tsv, [text_to_ltr(words[f.stem]) for f in flacs])
    tsv.with_suffix(".wrd").write_text("".join(words[f.stem] + "\n" for f in flacs))
    return tsv


# ----------------------------------------------------------------------------------------------------------------
# batches


class Batch(NamedTuple):
    waves: Tensor                       # (B, S) float32, each row normalised, zero-padded after its length
    lengths: Tensor                     # (B,) long, real samples per row
    targets: Tensor | None              # (B, U) long letter ids (ctc.py), padded with the blank id
    target_lengths: Tensor | None       # (B,) long

    def padding_mask(self) -> Tensor:
        """(B, S) bool, True at the zero-padded samples."""
        return torch.arange(self.waves.shape[1]) >= self.lengths[:, None]


class SpeechData:
    """A manifest's utterances, read from disk and normalised when a batch takes them: memory holds a batch, not the
    corpus (float32 would be 230 MB per hour of audio, in every process of a DDP run).

    targets=False (pre-training): an utterance longer than max_samples is randomly cropped to it in `batch`.
    targets=True (CTC fine-tuning): the `.ltr` transcripts come with every batch; as a crop would cut the transcript,
    utterances longer than max_samples are left out instead (the count is printed).
    """

    def __init__(self, manifest: Path, max_samples: int, min_samples: int = MIN_SAMPLES, targets: bool = False):
        root, entries, ltr = check_manifest(manifest, min_samples)
        if targets and ltr is None:
            raise DataError(f"{Path(manifest).with_suffix('.ltr')}: no transcripts for {manifest}; "
                            f"write them with write_manifest(..., ltr=...)")
        keep = [i for i, (_, n) in enumerate(entries) if not targets or n <= max_samples]
        if len(keep) < len(entries):
            print(f"{manifest}: left out {len(entries) - len(keep)} utterances longer than max_samples={max_samples}")
        if not keep:
            raise DataError(f"{manifest}: no utterance of at most max_samples={max_samples} samples "
                            f"({'none listed' if not entries else 'raise --max_samples'})")
        if targets:
            # letters are single symbols; a longer unknown one means the line holds words (symbols such as a
            # stray digit become <unk>, as fairseq's dictionary does)
            for i in keep:
                word = next((s for s in ltr[i].split() if len(s) > 1 and s not in LETTER_ID), None)
                if word is not None:
                    raise DataError(f"{Path(manifest).with_suffix('.ltr')}:{i + 1}: {word!r} is not a letter symbol; "
                                    "lines look like 'H E L L O | W O R L D |' (ctc.text_to_ltr writes them)")
        self.max_samples, self.min_samples = max_samples, min_samples
        self.paths = [root / entries[i][0] for i in keep]
        self.lengths = torch.tensor([entries[i][1] for i in keep])           # (N,) samples, as checked
        self.targets = [torch.tensor(encode_ltr(ltr[i])) for i in keep] if targets else None
        self.by_length = self.lengths.argsort()                              # (N,) utterance ids, shortest first

    def __len__(self) -> int:
        return len(self.paths)

    def wave(self, i: int) -> Tensor:
        """Utterance i, normalised (fairseq's `normalize: true`), (S,)."""
        return normalize_wave(load_audio(self.paths[i], self.min_samples))

    @property
    def minutes(self) -> float:
        """The audio's length in minutes."""
        return self.lengths.sum().item() / SAMPLE_RATE / 60

    def subset(self, minutes: float, generator: torch.Generator) -> "SpeechData":
        """A random subset of the utterances holding at most `minutes` of audio (at least one utterance):
        fine-tuning with a small labelled budget (the paper's 10 min / 1 h / 10 h splits)."""
        order = torch.randperm(len(self), generator=generator)               # (N,)
        total = self.lengths[order].cumsum(0)                                 # (N,) samples so far
        ids = order[: max(1, int((total <= minutes * 60 * SAMPLE_RATE).sum()))].tolist()
        part = copy.copy(self)
        part.paths = [self.paths[i] for i in ids]
        part.lengths = self.lengths[ids]
        part.targets = [self.targets[i] for i in ids] if self.targets is not None else None
        part.by_length = part.lengths.argsort()
        return part

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A random batch of utterances of similar lengths, cropped at random to max_samples.

        Bucketing: draw a pool of 8 batches' worth of distinct utterances, sort it by length, cut it into batches
        and return one of them at random, so every utterance is equally likely and padding stays small.
        """
        if batch_size > len(self):
            raise DataError(f"--batch_size={batch_size} exceeds the {len(self)} utterances: lower it, or give more "
                            f"audio (finetune.py: --budget_minutes)")
        pool_size = min(8 * batch_size, len(self)) // batch_size * batch_size
        pool = torch.randperm(len(self), generator=generator)[:pool_size]   # (pool,)
        pool = pool[self.lengths[pool].argsort()]
        chunk = int(torch.randint(pool_size // batch_size, (), generator=generator))
        ids = pool[chunk * batch_size : (chunk + 1) * batch_size]           # (B,)
        slack = (self.lengths[ids] - self.max_samples).clamp(min=0)          # (B,) croppable samples
        starts = (torch.rand(batch_size, generator=generator) * (slack + 1)).long()  # (B,)
        return self._collate(ids.tolist(), starts.tolist())

    def iterate(self, batch_size: int) -> Iterator[Batch]:
        """Every utterance once, shortest first, without randomness (evaluation); long ones keep their start."""
        for i in range(0, len(self), batch_size):
            ids = self.by_length[i : i + batch_size].tolist()
            yield self._collate(ids, [0] * len(ids))

    def _collate(self, ids: list[int], starts: list[int]) -> Batch:
        crops = [self.wave(i)[s : s + self.max_samples] for i, s in zip(ids, starts)]
        waves = pad_sequence(crops, batch_first=True)                        # (B, S)
        lengths = torch.tensor([len(c) for c in crops])                       # (B,)
        if self.targets is None:
            return Batch(waves, lengths, None, None)
        targets = [self.targets[i] for i in ids]
        padded = pad_sequence(targets, batch_first=True, padding_value=BLANK)  # (B, U)
        return Batch(waves, lengths, padded, torch.tensor([len(t) for t in targets]))


# ----------------------------------------------------------------------------------------------------------------
# the default corpus: Shakespeare read by espeak-ng

ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]


def shakespeare_lines(tar_path: Path) -> list[tuple[str, str]]:
    """Short clean lines of the plays as (text to speak, normalised transcript), in corpus order, no duplicates.

    Kept: 3-15 words of plain letters and punctuation; dropped: stage directions, headings and all-caps words
    (speaker names, roman numerals that espeak would read as ordinals), and apostrophes used as quotes.
    """
    lines, seen = [], set()
    with tarfile.open(tar_path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.name.endswith(".txt"):
                continue
            for line in tar.extractfile(member).read().decode("utf-8").splitlines():
                line = line.strip()
                if not re.fullmatch(r"[A-Za-z' ,.;:!?-]+", line) or re.match(r"(Enter|Exit|Exeunt|Re-enter)\b", line):
                    continue
                transcript = normalize_text(line)
                words = transcript.split()
                if (not 3 <= len(words) <= 15 or any(w.startswith("'") or w.endswith("'") for w in words)
                        or any(len(w) > 1 and w.isupper() for w in re.findall(r"[A-Za-z']+", line))):
                    continue
                if transcript not in seen:
                    seen.add(transcript)
                    lines.append((line, transcript))
    return lines


def resample(wave: Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 8) -> Tensor:
    """Band-limited resampling with a Hann-windowed sinc filter, in polyphase form.

    Output sample j sits at input time t = j * down / up (in input samples); it is the sum of x[i] * h(t - i) with h
    a low-pass at 97 % of the lower Nyquist frequency, truncated after `zero_crossings` zeros on each side.
    As t - i repeats every `up` outputs, one filter per output phase p is a strided conv1d.
    wave: (S,) -> (ceil(S * new_rate / orig_rate),).
    """
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g                                 # 22050 -> 16000: up 320, down 441
    cutoff = 0.97 * 0.5 * min(1.0, up / down)                                # cycles per input sample
    reach = math.ceil(zero_crossings / (2 * cutoff))                         # filter half-width in input samples
    offsets = torch.arange(-reach, down + reach, dtype=torch.float64)         # (K,) input i - q * down
    tau = torch.arange(up, dtype=torch.float64)[:, None] * down / up - offsets  # (up, K) t - i per phase
    window = torch.cos(math.pi * tau * cutoff / zero_crossings).square() * (tau.abs() * 2 * cutoff < zero_crossings)
    kernel = (2 * cutoff * torch.sinc(2 * cutoff * tau) * window).float()   # (up, K)
    n_out = math.ceil(len(wave) * up / down)
    blocks = math.ceil(n_out / up)
    padded = F.pad(wave, (reach, (blocks - 1) * down + kernel.shape[1] - reach - len(wave)))
    out = F.conv1d(padded[None, None], kernel[:, None], stride=down)        # (1, up, blocks)
    return out[0].T.reshape(-1)[:n_out]


def _speak(job: dict, out_dir: Path) -> float:
    """Synthesise one utterance with espeak-ng, resample it to 16 kHz, write it; return its duration in seconds."""
    args = ["espeak-ng", "-v", job["voice"], "-s", str(job["rate"]), "-p", str(job["pitch"]), "--stdout", job["text"]]
    result = subprocess.run(args, capture_output=True, check=True)
    wave, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    wave = resample(torch.from_numpy(wave), rate, SAMPLE_RATE)
    path = out_dir / job["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = io.BytesIO()
    sf.write(wav, wave.clamp(-1, 1).numpy(), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    path.write_bytes(wav.getvalue())            # a full disk is then an OSError, not libsndfile's "System error."
    return len(wave) / SAMPLE_RATE


def prepare_speech(
    out_dir: Path = CORPUS_DIR,
    n_utts: int = 1200,
    n_test: int = 200,
    n_test_voices: int = 16,
    corpus: Path = Path(__file__).parent / "data" / "shakespeare.tar.xz",
    seed: int = 0,
) -> dict:
    """Synthesise the default speech corpus (skipped when out_dir is already complete); returns its statistics.

    Voices are espeak-ng accents x variants (8 x 12 = 96); n_test_voices of them speak only the test split, and
    test sentences never occur in train, so the test error measures new voices on new text. Each utterance draws
    a speaking rate (130-210 words per minute) and a pitch (20-80). espeak-ng's 22050 Hz output is resampled to
    16 kHz and written as 16-bit wav with `train.tsv/.ltr/.wrd` and `test.tsv/.ltr/.wrd`.
    The folder is built under a temporary name and renamed when complete, so an interrupted run leaves no corpus.
    """
    out_dir = Path(out_dir)
    if (out_dir / "stats.json").is_file():
        return built_corpus(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with one_at_a_time(out_dir.with_name(out_dir.name + ".lock"), f"synthesising {out_dir}"):
            if (out_dir / "stats.json").is_file():                          # the other process has just built it
                return built_corpus(out_dir)
            try:
                return _synthesise(out_dir, n_utts, n_test, n_test_voices, corpus, seed)
            except OSError:                                                 # a full disk: free what the part holds
                shutil.rmtree(out_dir.with_name(out_dir.name + ".tmp"), ignore_errors=True)
                raise
    except OSError as e:                                                    # a full disk, a read-only folder
        raise write_error(e, out_dir) from None


def built_corpus(out_dir: Path) -> dict:
    """The statistics of a corpus built before, saying so (as prepare_text does)."""
    try:
        stats = json.loads((out_dir / "stats.json").read_text())
        summary = corpus_summary(stats)
    except (ValueError, TypeError, KeyError):           # not JSON, or JSON of another shape
        raise DataError(f"{out_dir / 'stats.json'} is damaged: delete {out_dir} and run again to synthesise the "
                        "corpus afresh") from None
    print(f"prepare_speech: {out_dir} is up to date ({summary})")
    return stats


def _synthesise(out_dir: Path, n_utts: int, n_test: int, n_test_voices: int, corpus: Path, seed: int) -> dict:
    """prepare_speech's work, done by one process at a time."""
    if out_dir.exists():
        raise DataError(f"{out_dir}: exists but has no stats.json (not a complete corpus); delete it and rerun")
    if shutil.which("espeak-ng") is None:
        raise DataError("espeak-ng not found: it synthesises the default speech corpus; "
                        "install it with `apt-get install -y espeak-ng`")
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    lines = shakespeare_lines(corpus)
    lines = [lines[i] for i in torch.randperm(len(lines), generator=g)[:n_utts].tolist()]
    voices = [f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS]
    voices = [voices[i] for i in torch.randperm(len(voices), generator=g).tolist()]
    split_voices = {"test": voices[:n_test_voices], "train": voices[n_test_voices:]}
    jobs = []
    for i, (text, words) in enumerate(lines):
        split = "test" if i < n_test else "train"
        voice = split_voices[split][i % len(split_voices[split])]
        rate, pitch = torch.randint(130, 211, (), generator=g).item(), torch.randint(20, 81, (), generator=g).item()
        jobs.append(dict(split=split, text=text, words=words, voice=voice, rate=rate, pitch=pitch,
                         file=f"{split}/{voice}/{i:05d}.wav"))

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"synthesising {len(jobs)} utterances with espeak-ng into {out_dir} ...")
    durations = []
    with ThreadPoolExecutor(os.cpu_count()) as pool:                         # each job mostly waits on espeak-ng
        for done, seconds in enumerate(pool.map(lambda job: _speak(job, tmp), jobs), 1):
            durations.append(seconds)
            if done % 200 == 0 or done == len(jobs):
                minutes = sum(durations) / 60
                print(f"  {done}/{len(jobs)} utterances | {minutes:.1f} min of audio | {time.time() - t0:.0f}s")

    stats = {}
    for split in ("train", "test"):
        chosen = [(job, d) for job, d in zip(jobs, durations) if job["split"] == split]
        tsv = tmp / f"{split}.tsv"
        write_manifest(tmp, [job["file"] for job, _ in chosen], tsv, [text_to_ltr(job["words"]) for job, _ in chosen])
        tsv.with_suffix(".wrd").write_text("".join(job["words"] + "\n" for job, _ in chosen))
        stats[split] = {"utterances": len(chosen), "hours": round(sum(d for _, d in chosen) / 3600, 3),
                        "voices": sorted({job["voice"] for job, _ in chosen})}
    stats["build_seconds"] = round(time.time() - t0, 1)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    tmp.rename(out_dir)
    print(f"speech corpus ready in {stats['build_seconds']:.0f}s: {corpus_summary(stats)}")
    return stats


def corpus_summary(stats: dict) -> str:
    """One line on a built corpus, from its stats.json."""
    return ", ".join(f"{s} {stats[s]['utterances']} utterances / {stats[s]['hours'] * 60:.1f} min / "
                     f"{len(stats[s]['voices'])} voices" for s in ("train", "test"))


USAGE = ("usage: python speech_data.py [OUT_DIR]                    the espeak-ng corpus (data/speech)\n"
         "       python speech_data.py AUDIO_DIR OUT_TSV             a manifest of every audio file under AUDIO_DIR "
         f"({', '.join(AUDIO_EXTENSIONS)}), e.g. my_audio my_audio/train.tsv\n"
         "       python speech_data.py SPLIT_DIR OUT_DIR SPLIT_NAME  manifests for a LibriSpeech split, "
         "e.g. LibriSpeech/dev-clean data/librispeech dev_clean")


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(f"{__doc__.strip()}\n\n{USAGE}")
        return 0
    flags = [a for a in argv if a.startswith("-")]
    if flags:                                         # not a folder: this script takes no flags
        print(f"error: {flags[0]} is not an argument of this script\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if len(argv) == 3:
            print(librispeech_manifest(Path(argv[0]), Path(argv[1]), argv[2]))
        elif len(argv) == 2:
            print(folder_manifest(Path(argv[0]), Path(argv[1])))
        elif len(argv) <= 1:
            prepare_speech(*(Path(a) for a in argv))
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
