"""Official checkpoints (hf.py) against Hugging Face's own implementation, minGPT-style: small random transformers
models of every released layout convert into this project's modules and compute the same thing in fp32 eval mode
(final hidden states, every block's output, the FFN outputs data2vec regresses, CTC and class logits) to 1e-5, on
padded batches where the modality pads. Partial or mismatched checkpoints are one clear error; converted models
fine-tune with finetune.py and transcribe with transcribe.py. Nothing is downloaded: every model comes from a config.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import finetune
import hf
import transcribe
from ctc import VOCAB, text_to_ltr
from speech_data import write_manifest

ROOT = Path(__file__).resolve().parent.parent
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is optional: pip install transformers==5.23.0")
TOL = 1e-5

TEXT = [
    # data2vec-text-base's layout, small: one token type, eps 1e-5
    dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
         max_position_embeddings=34, type_vocab_size=1, layer_norm_eps=1e-5),
    # Hugging Face's defaults: two token types (type 0 folded into the positions), eps 1e-12; 3 blocks of 4 heads
    dict(vocab_size=80, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
         max_position_embeddings=66, type_vocab_size=2, layer_norm_eps=1e-12),
]
AUDIO = [
    # -960h's layout, small: 7 conv layers, 5 pos convs of kernel 19, a CTC head over ctc.VOCAB
    ("Data2VecAudioForCTC", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(16,) * 7, num_conv_pos_embedding_groups=4, vocab_size=len(VOCAB))),
    # 5 conv layers, 2 pos convs with an even kernel, eps 1e-6, trained without masking (no masked_spec_embed)
    ("Data2VecAudioModel", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                                conv_dim=(8,) * 5, conv_kernel=(10, 3, 3, 3, 3), conv_stride=(5, 2, 2, 2, 2),
                                num_conv_pos_embeddings=2, conv_pos_kernel_size=16, num_conv_pos_embedding_groups=8,
                                layer_norm_eps=1e-6, mask_time_prob=0.0)),
]
VISION = [
    # data2vec-vision-base's layout: shared relative position bias, layer scale, mask token, final LayerNorm
    ("Data2VecVisionModel", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4, use_shared_relative_position_bias=True,
                                 use_mean_pooling=False, use_mask_token=True, layer_scale_init_value=0.1,
                                 layer_norm_eps=1e-6)),
    # -ft1k's layout: a bias table per block, mean pooling + LayerNorm + classifier; here no layer scale, 1 channel
    ("Data2VecVisionForImageClassification", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                                  intermediate_size=96, image_size=24, patch_size=4, num_channels=1,
                                                  use_relative_position_bias=True, use_mean_pooling=True,
                                                  layer_scale_init_value=0.0, num_labels=5, layer_norm_eps=1e-12)),
]


def random_hf(cls: str, **config) -> torch.nn.Module:
    """A Hugging Face model with every parameter random (their init leaves LayerNorms at 1/0 and bias tables at 0,
    which would hide a mix-up), in eval mode."""
    transformers = pytest.importorskip("transformers")
    modality = next(m for m in ("Audio", "Text", "Vision") if cls.startswith(f"Data2Vec{m}"))
    model = getattr(transformers, cls)(getattr(transformers, f"Data2Vec{modality}Config")(**config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                scale = 1.0 if isinstance(m, torch.nn.LayerNorm) and name == "weight" else 0.0
                p.copy_(scale + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def ffn_outputs(model: torch.nn.Module, names: list[str], run) -> list[torch.Tensor]:
    """The outputs of the named modules (each block's second FFN linear) while run() runs."""
    outs, hooks = [], []
    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(lambda m, i, o: outs.append(o)))
    run()
    for h in hooks:
        h.remove()
    return outs


def max_diff(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Max |a - b| over the real steps; a, b: (B, T, C) or (B, K), keep: (B, T) bool."""
    d = (a - b).abs()
    return (d[keep] if keep is not None else d).max().item()


def assert_blocks_match(got, want, got_ffn: list, want_ffn: list, keep: torch.Tensor | None = None) -> None:
    """Every block's output (hidden_states[i + 1] is block i's, SPEC §5) and FFN output agree within TOL."""
    for i in range(len(got.layers)):
        assert max_diff(got.layers[i], want.hidden_states[i + 1], keep) < TOL, f"block {i}"
        assert max_diff(got_ffn[i], want_ffn[i], keep) < TOL, f"FFN output of block {i}"


# ---- parity ------------------------------------------------------------------------------------------------------

@needs_transformers
@pytest.mark.parametrize("config", TEXT)
def test_text_parity_on_a_padded_batch(config):
    theirs = random_hf("Data2VecTextModel", **config)
    ours = hf.from_pretrained(theirs).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config["vocab_size"], (3, 16), generator=g)                   # (B, T)
    for row, n in enumerate((16, 11, 5)):                                                 # <s> text </s> <pad>...
        ids[row, 0], ids[row, n - 1], ids[row, n:] = 0, 2, hf.TEXT_PAD_ID
    keep = ids != hf.TEXT_PAD_ID                                                          # (B, T)
    with torch.no_grad():
        want = theirs(ids, attention_mask=keep.long(), output_hidden_states=True)
        got = ours(ids, target_layer="block")
        L = config["num_hidden_layers"]
        want_ffn = ffn_outputs(theirs, [f"encoder.layer.{i}.output.dense" for i in range(L)],
                               lambda: theirs(ids, attention_mask=keep.long()))
        got_ffn = ours(ids, target_layer="ffn").layers
    assert torch.equal(got.padding_mask, ~keep) and len(got.layers) == L == len(want.hidden_states) - 1
    assert max_diff(got.hidden, want.last_hidden_state, keep) < TOL
    assert_blocks_match(got, want, got_ffn, want_ffn, keep)


@needs_transformers
@pytest.mark.parametrize("cls,config", AUDIO)
def test_audio_parity_on_a_padded_batch(cls, config):
    theirs = random_hf(cls, **config)
    ours = hf.from_pretrained(theirs).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([8000, 6100, 3211])                                            # samples per row
    waves = torch.randn(3, 8000, generator=g)                                             # (B, S)
    padding_mask = torch.arange(8000) >= lengths[:, None]                                 # (B, S) True = padded
    waves[padding_mask] = 0.0                                                             # as HF's feature extractor
    base = theirs.data2vec_audio if cls.endswith("CTC") else theirs
    with torch.no_grad():
        want = theirs(waves, attention_mask=(~padding_mask).long(), output_hidden_states=True)
        got = ours(waves, padding_mask, target_layer="block")
        L = config["num_hidden_layers"]
        want_ffn = ffn_outputs(base, [f"encoder.layers.{i}.feed_forward.output_dense" for i in range(L)],
                               lambda: theirs(waves, attention_mask=(~padding_mask).long()))
        got_ffn = ours(waves, padding_mask, target_layer="ffn").layers
    keep = ~got.padding_mask                                                              # (B, T) real frames
    assert keep.sum(1).tolist() == base._get_feat_extract_output_lengths(lengths).tolist()
    assert len(got.layers) == L == len(want.hidden_states) - 1
    if cls.endswith("CTC"):
        assert got.logits.shape[-1] == len(VOCAB) and max_diff(got.logits, want.logits, keep) < TOL
    else:
        assert "masked_spec_embed" not in theirs.state_dict()                             # OPTIONAL: ours keeps its own
        assert max_diff(got.hidden, want.last_hidden_state, keep) < TOL
    assert_blocks_match(got, want, got_ffn, want_ffn, keep)


@needs_transformers
@pytest.mark.parametrize("cls,config", VISION)
def test_vision_parity(cls, config):
    theirs = random_hf(cls, **config)
    ours = hf.from_pretrained(theirs).eval()
    per_layer = config.get("use_relative_position_bias", False)
    assert ours.transformer.cfg.rel_pos_per_layer == per_layer
    assert (ours.transformer.rel_pos is None) == per_layer == (ours.transformer.blocks[0].rel_pos is not None)
    size = config["image_size"]
    images = torch.randn(2, config.get("num_channels", 3), size, size, generator=torch.Generator().manual_seed(1))
    base = theirs.data2vec_vision if cls.endswith("Classification") else theirs
    with torch.no_grad():
        want = theirs(images, output_hidden_states=True)
        got = ours(images, target_layer="block")
        L = config["num_hidden_layers"]
        want_ffn = ffn_outputs(base, [f"encoder.layer.{i}.output.dense" for i in range(L)], lambda: theirs(images))
        got_ffn = ours(images, target_layer="ffn").layers
        want_hidden = base(images).last_hidden_state
    assert got.hidden.shape == (2, 1 + (size // config["patch_size"]) ** 2, config["hidden_size"])
    assert max_diff(got.hidden, want_hidden) < TOL
    if cls.endswith("Classification"):
        assert max_diff(got.logits, want.logits) < TOL
    assert_blocks_match(got, want, got_ffn, want_ffn)


def test_per_layer_relative_position_bias_is_each_blocks_own():
    """rel_pos_per_layer: every block adds its own table (and no shared one) to the attention scores."""
    from transformer import Transformer, TransformerConfig
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layer=2, dim=16, n_head=2, ffn_dim=32, pre_ln=True, dropout=0.0, attn_dropout=0.0,
                            rel_pos_grid=(2, 2), rel_pos_per_layer=True)
    model = Transformer(cfg).eval()
    assert model.rel_pos is None and all(b.rel_pos is not None for b in model.blocks)
    with torch.no_grad():
        model.blocks[1].rel_pos.table.normal_()
    x = torch.randn(2, 5, 16)                                                             # CLS + 2 x 2 patches
    padding_mask = torch.tensor([[False] * 4 + [True], [False] * 5])                     # (B, T)
    keep = ~padding_mask[:, None, None, :]                                                # (B, 1, 1, T)
    with torch.no_grad():
        _, layers = model(x, padding_mask, target_layer="block")
        first, _ = model.blocks[0](x, keep)
        # block 1 without its table, given the table by hand as an additive mask, is block 1 with its own table
        bias = model.blocks[1].rel_pos(5).unsqueeze(0).masked_fill(~keep, float("-inf"))  # (B, H, T, T)
        table, model.blocks[1].rel_pos = model.blocks[1].rel_pos, None
        by_hand, _ = model.blocks[1](first, bias)
        without, _ = model.blocks[1](first, keep)
        model.blocks[1].rel_pos = table
    assert torch.allclose(layers[0], first, atol=1e-6) and torch.allclose(layers[1], by_hand, atol=1e-6)
    assert not torch.allclose(layers[1], without, atol=1e-3)                              # the table does matter


# ---- strictness ----------------------------------------------------------------------------------------------------

@needs_transformers
def test_partial_or_foreign_state_dict_is_one_error_naming_every_key():
    theirs = random_hf("Data2VecTextModel", **TEXT[0])
    ours = hf.build(hf.config_from_hf(theirs.config, "text"))
    state = dict(theirs.state_dict())
    del state["encoder.layer.1.attention.self.key.weight"], state["embeddings.LayerNorm.bias"]
    state["encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
    with pytest.raises(hf.ConversionError) as e:
        hf.convert_state(state, ours, "partial")
    msg = str(e.value)
    assert "missing 2" in msg and "encoder.layer.1.attention.self.key.weight" in msg and "embeddings.LayerNorm.bias" in msg
    assert "unexpected 1" in msg and "encoder.layer.2.output.dense.weight" in msg
    assert "config.json" in msg                                                           # says what to do


@needs_transformers
def test_folder_whose_weights_do_not_fit_its_config_is_an_error(tmp_path):
    """save_pretrained, then claim one block more than the weights hold: Hugging Face alone would initialise it
    at random with a warning; here it is a ConversionError naming the missing tensors."""
    random_hf("Data2VecTextModel", **TEXT[0]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(hf.ConversionError, match=r"missing \[.*encoder\.layer\.2\.attention"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(hf.ConversionError, match="save_pretrained"):
        hf.from_pretrained(tmp_path / "nothing-here")


@needs_transformers
def test_folder_with_missing_or_damaged_weights_is_one_error(tmp_path):
    """config.json without its weights, then with them cut short (a download that stopped): Hugging Face raises its
    own OSError / SafetensorError from deep inside; here each is a ConversionError naming the folder and the fix."""
    random_hf("Data2VecTextModel", **TEXT[0]).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    fix = "save the model again with save_pretrained"
    with pytest.raises(hf.ConversionError, match=rf"cannot read the weights of '{tmp_path}' \(OSError: .*{fix}"):
        hf.from_pretrained(tmp_path)
    weights.write_bytes(data[:1000])
    with pytest.raises(hf.ConversionError, match=rf"the weights of '{tmp_path}' \(SafetensorError: .*{fix}"):
        hf.from_pretrained(tmp_path)


@needs_transformers
def test_another_tasks_checkpoint_converts_its_encoder_and_names_the_head_left_out(tmp_path, capsys):
    theirs = random_hf("Data2VecTextForMaskedLM", **TEXT[0])
    theirs.save_pretrained(tmp_path)
    ours = hf.from_pretrained(tmp_path).eval()
    assert "without the task head ['lm_head.bias', 'lm_head.dense.bias'" in capsys.readouterr().out
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))      # (B, T)
    with torch.no_grad():
        assert max_diff(ours(ids).hidden, theirs.data2vec_text(ids).last_hidden_state) < TOL


@needs_transformers
def test_unsupported_architecture_is_named():
    with pytest.raises(hf.ConversionError, match="absolute position embeddings"):
        hf.from_pretrained(random_hf("Data2VecVisionModel", **{**VISION[0][1], "use_absolute_position_embeddings": True}))


def test_without_transformers_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)                                 # import fails
    with pytest.raises(hf.ConversionError, match=r"pip install transformers=="):
        hf.from_pretrained("facebook/data2vec-audio-base")
    assert hf.INSTALL.split()[-1] in (ROOT / "requirements-test.txt").read_text().split()  # CI installs that pin
    assert "-r requirements-test.txt" in (ROOT / ".ci" / "run").read_text()


def test_only_hf_imports_transformers():
    code = ("import sys, bench, ctc, data2vec, encoders, finetune, masking, speech_data, text_data, train, "
            "transcribe, transformer, vision_data; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_hf_sources_are_told_apart_from_our_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert not hf.is_hf_source("out/ckpt_typo")                  # a typo in a local path, not a hub name to ask for
    assert hf.is_hf_source(str(tmp_path)) and hf.is_hf_source("facebook/data2vec-audio-base-960h")
    assert not hf.is_hf_source("out-text/ckpt.pt") and not hf.is_hf_source(str(tmp_path / "config.json"))
    assert not hf.is_hf_source("random") and not hf.is_hf_source(str(ROOT / "data"))


# ---- round trips: fine-tuning and transcription -----------------------------------------------------------------

@pytest.fixture(scope="module")
def speech_manifest(tmp_path_factory) -> Path:
    """Four 0.5-0.8 s chirps with letter transcripts (train.tsv; the test split reads the same)."""
    root = tmp_path_factory.mktemp("hf-speech")
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        samples = int(rng.integers(8000, 12800))
        t = np.arange(samples) / 16000
        files.append(Path(f"{i}.wav"))
        sf.write(str(root / files[-1]), 0.3 * np.sin(2 * np.pi * (200 + 300 * i) * t * (1 + t)), 16000, subtype="PCM_16")
    write_manifest(root, files, root / "train.tsv", [text_to_ltr("one two" if i % 2 else "three") for i in range(4)])
    return root / "train.tsv"


@needs_transformers
def test_official_ctc_checkpoint_fine_tunes_then_transcribes(speech_manifest, tmp_path, capsys):
    folder, saved = tmp_path / "d2v-audio-960h", tmp_path / "ctc.pt"
    random_hf(AUDIO[0][0], **AUDIO[0][1]).save_pretrained(folder)
    args = [f"--train={speech_manifest}", f"--test={speech_manifest}", "--epochs=1", "--batch_size=2",
            f"--out_dir={tmp_path / 'ft'}"]
    assert finetune.main(["--modality=speech", f"--init_from={folder}", *args, f"--save={saved}"]) == 0
    assert "test CER" in capsys.readouterr().out
    wavs = sorted(speech_manifest.parent.glob("*.wav"))
    for ckpt in (saved, folder):                                       # ours after fine-tuning; the official layout
        assert transcribe.main([f"--ckpt={ckpt}", *map(str, wavs)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split("\t")[0] for line in lines] == list(map(str, wavs))
    assert transcribe.main([f"--ckpt={folder}", str(speech_manifest.parent)]) == 0  # audio folder: every file in it
    assert capsys.readouterr().out.splitlines() == lines                           # as listed one by one
    (tmp_path / "empty").mkdir()
    assert transcribe.main([f"--ckpt={saved}", str(tmp_path / "empty")]) == 1
    assert "empty: no .wav / .flac / .ogg files under it" in capsys.readouterr().err

    sf.write(str(tmp_path / "8k.wav"), np.zeros(8000), 8000)
    assert transcribe.main([f"--ckpt={saved}", str(tmp_path / "8k.wav")]) == 1
    assert "sample rate 8000 Hz" in capsys.readouterr().err
    assert transcribe.main([f"--ckpt={saved}", str(tmp_path / "none.wav")]) == 1
    assert "no such file" in capsys.readouterr().err


@needs_transformers
def test_transcribe_agrees_with_the_official_model(speech_manifest, tmp_path):
    """transcribe.py's letters for a file are the argmax path of Hugging Face's own logits on that waveform."""
    theirs = random_hf(AUDIO[0][0], **AUDIO[0][1])
    folder = tmp_path / "ctc"
    theirs.save_pretrained(folder)
    wav = sorted(speech_manifest.parent.glob("*.wav"))[0]
    model = transcribe.load_ctc(str(folder))
    wave = torch.from_numpy(sf.read(str(wav), dtype="float32")[0])
    wave = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-5)             # (S,) fairseq's normalise
    with torch.no_grad():
        want = theirs(wave[None]).logits[0]                                                # (T, letters)
    ids = want.argmax(-1).unique_consecutive()
    text = "".join(VOCAB[i] for i in ids.tolist() if i > 3).replace("|", " ")
    assert transcribe.transcribe_file(model, wav, torch.device("cpu")) == " ".join(text.split())


@needs_transformers
def test_official_vision_checkpoint_fine_tunes(tmp_path, capsys):
    folder = tmp_path / "d2v-vision"
    random_hf("Data2VecVisionModel", **{**VISION[0][1], "image_size": 32, "num_channels": 1}).save_pretrained(folder)
    assert finetune.main(["--modality=vision", f"--init_from={folder}", "--label_fraction=0.02", "--epochs=1",
                          f"--out_dir={tmp_path / 'ft'}"]) == 0
    assert "test accuracy" in capsys.readouterr().out


@needs_transformers
def test_official_text_checkpoint_fine_tunes_with_its_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer
    lines = ["To be, or not to be, that is the question", "Now is the winter of our discontent",
             "All the world's a stage", "If music be the food of love, play on"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder = tmp_path / "d2v-text"
    transformers.RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>", mask_token="<mask>").save_pretrained(folder)
    random_hf("Data2VecTextModel", **{**TEXT[0], "vocab_size": 300}).save_pretrained(folder)
    for split in ("train", "test"):
        rows = [f"{line}\t{'hamlet' if i % 2 == 0 else 'other'}" for i, line in enumerate(lines * 3)]
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    args = [f"--train={tmp_path / 'train.tsv'}", f"--test={tmp_path / 'test.tsv'}", "--max_len=16", "--epochs=1",
            "--batch_size=4", f"--out_dir={tmp_path / 'ft'}"]
    assert finetune.main(["--modality=text", f"--init_from={folder}", *args]) == 0
    assert "test accuracy" in capsys.readouterr().out
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    assert finetune.main(["--modality=text", f"--init_from={folder}", *args]) == 1
    assert "tokenizer.save_pretrained" in capsys.readouterr().err
