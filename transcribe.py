"""Greedy CTC transcription of audio files with a fine-tuned speech model: one `path<TAB>text` line per file.

    python finetune.py --modality=speech --init_from=out-speech/ckpt.pt --save=out-ctc/ctc.pt   # a CTC checkpoint
    python transcribe.py --ckpt=out-ctc/ctc.pt a.wav b.flac
    python transcribe.py --ckpt=out-ctc/ctc.pt my_audio/                    # every .wav / .flac / .ogg under it
    python transcribe.py --ckpt=facebook/data2vec-audio-base-960h a.wav     # an official CTC checkpoint (hf.py)

Audio must be 16 kHz mono (speech_data's checks name the file and the fix). Every file is normalised to zero mean
and unit variance as in pre-training and fine-tuning (SPEC §6) and decoded on its own, so no padding is involved.
"""

import argparse
import sys
from pathlib import Path

import torch

import hf
from ctc import VOCAB, greedy_decode
from finetune import CTCModel
from speech_data import audio_files, audio_samples, load_audio, normalize_wave
from text_data import DataError
from train import CheckpointError, Config, ConfigError, load_checkpoint, load_state, setup_system, speech_model


def load_ctc(ckpt: str) -> CTCModel:
    """A CTC model from finetune.py's --save file, or from an official Data2VecAudioForCTC checkpoint (folder or hub
    name). Its letters must be ctc.VOCAB (the official vocab.json order), which greedy_decode reads."""
    if hf.is_hf_source(ckpt):
        official = hf.from_pretrained(ckpt)
        if official.lm_head is None:
            raise CheckpointError(f"{ckpt} has no CTC head: it is a pretrained encoder; fine-tune it first "
                                  f"(finetune.py --modality=speech --init_from={ckpt} --save=...)")
        cfg, state, vocab_size = official.config, official.state_dict(), official.lm_head.out_features
        if vocab_size != len(VOCAB):
            raise CheckpointError(f"{ckpt}: {vocab_size} output symbols, but ctc.VOCAB has {len(VOCAB)}")
    else:
        saved = load_checkpoint(Path(ckpt), "fine-tune with finetune.py --modality=speech --save=PATH first")
        modality = saved["config"].get("modality")
        if modality != "speech":
            raise CheckpointError(f"{ckpt} is a {modality} checkpoint; transcribe.py needs a speech model fine-tuned "
                                  "for CTC (finetune.py --modality=speech --save=out-ctc/ctc.pt)")
        if "vocab" not in saved:
            raise CheckpointError(f"{ckpt} is a pretraining checkpoint, not a CTC one; fine-tune it with "
                                  f"finetune.py --modality=speech --init_from={ckpt} --save=out-ctc/ctc.pt")
        if saved["vocab"] != VOCAB:
            raise CheckpointError(f"{ckpt}: its letters {saved['vocab']} are not ctc.VOCAB")
        cfg, state = Config(**saved["config"]), saved["model"]
    student = speech_model(cfg)
    model = CTCModel(student.encoder, student.student, len(VOCAB))
    load_state(model, state, "CTC model", Path(ckpt))
    return model.eval()


@torch.no_grad()
def transcribe_file(model: CTCModel, path: Path, device: torch.device) -> str:
    wave = normalize_wave(load_audio(path)).to(device)[None]                   # (1, S)
    logits, _ = model(wave, torch.zeros_like(wave, dtype=torch.bool))           # (1, T, letters)
    return greedy_decode(logits[0].float().cpu())[0]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="finetune.py --save file, or an official CTC checkpoint "
                        "(save_pretrained folder or hub name, e.g. facebook/data2vec-audio-base-960h)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda, cuda:N or mps")
    parser.add_argument("files", nargs="+", type=Path, help="16 kHz mono audio files (wav, flac, ...), or folders: "
                        "every .wav, .flac and .ogg file under each")
    args = parser.parse_args(argv)
    try:
        _, _, device, _ = setup_system(Config(device=args.device))
        files = [f for path in args.files for f in (audio_files(path) if path.is_dir() else [path])]
        for path in files:                            # every file checked before the model loads: fail fast
            audio_samples(path)
        model = load_ctc(args.ckpt).to(device)
        for path in files:
            print(f"{path}\t{transcribe_file(model, path, device)}")
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
