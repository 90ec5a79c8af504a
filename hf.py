"""The official data2vec checkpoints (Hugging Face's Data2VecAudio / Data2VecText / Data2VecVision, SPEC §5) in this
project's own modules, as nanoGPT's GPT.from_pretrained does for GPT-2:

    from hf import from_pretrained
    model = from_pretrained("facebook/data2vec-audio-base-960h").eval()  # a hub name, a save_pretrained folder, a model
    out = model(waves, padding_mask, target_layer="block")              # out.logits (B, T, 32); out.layers: each block

The checkpoint's config sets the architecture (sizes, LayerNorm eps, post-LN or pre-LN, relative position bias shared
or per block, layer scale); the state dict is renamed key by key onto encoders.py and transformer.py. A key the
mapping needs that the checkpoint lacks, or a checkpoint key that maps nowhere, is one ConversionError listing every
one of them. The released weights are data2vec's student: fairseq drops the EMA teacher from its checkpoints.

`transformers` is optional: nothing else in the project imports it, and this file only when it is used.
"""

import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from encoders import ConvFeatureExtractor, PatchEncoder, SpeechEncoder, TextEncoder
from train import PRESETS, CheckpointError, Config, load_state, sub_config
from transformer import Transformer, TransformerConfig

INSTALL = "pip install transformers==5.23.0"
TEXT_PAD_ID = 1   # RoBERTa's <pad>: positions count from pad + 1 = 2, as TextEncoder does

# Hugging Face class -> (modality, task head): the layouts this file converts
SUPPORTED = {
    "Data2VecAudioModel": ("speech", None),
    "Data2VecAudioForCTC": ("speech", "ctc"),
    "Data2VecTextModel": ("text", None),
    "Data2VecVisionModel": ("vision", None),
    "Data2VecVisionForImageClassification": ("vision", "classifier"),
}
BASE_CLASS = {"data2vec-audio": "Data2VecAudioModel", "data2vec-text": "Data2VecTextModel",
              "data2vec-vision": "Data2VecVisionModel"}
HEAD_PREFIX = {"speech": "data2vec_audio.", "text": "data2vec_text.", "vision": "data2vec_vision."}

# Our key prefix -> Hugging Face's, outside the blocks. "encoder.positions.weight" is made of two tensors (below).
TOP = {
    "speech": {"encoder.feature_extractor": "feature_extractor", "encoder.feature_projection": "feature_projection",
               "encoder.masked_spec_embed": "masked_spec_embed", "encoder.pos_conv_embed": "encoder.pos_conv_embed",
               "encoder.layer_norm": "encoder.layer_norm", "lm_head": "lm_head"},
    "text": {"encoder.tokens": "embeddings.word_embeddings", "encoder.ln": "embeddings.LayerNorm",
             "encoder.positions.weight": ("embeddings.position_embeddings.weight",
                                          "embeddings.token_type_embeddings.weight")},
    "vision": {"encoder.projection": "embeddings.patch_embeddings.projection", "encoder.cls_token": "embeddings.cls_token",
               "encoder.mask_token": "embeddings.mask_token", "transformer.ln_f": "layernorm",
               "transformer.rel_pos.table": "encoder.relative_position_bias.relative_position_bias_table",
               "head.0": "pooler.layernorm", "head.1": "classifier"},
}
# Inside block i: Hugging Face's layer prefix, and our name -> theirs. The fused qkv weight is their three projections.
_QKV = {
    "speech": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "text": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "vision": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
}
LAYER = {"speech": "encoder.layers.{}.", "text": "encoder.layer.{}.", "vision": "encoder.layer.{}."}
BLOCK = {
    modality: {"attn.qkv.weight": tuple(f"{n}.weight" for n in q_k_v), "attn.q_bias": f"{q_k_v[0]}.bias",
               "attn.k_bias": f"{q_k_v[1]}.bias", "attn.v_bias": f"{q_k_v[2]}.bias"}
    for modality, q_k_v in _QKV.items()
}
BLOCK["speech"].update({"attn.proj": "attention.out_proj", "ln1": "layer_norm", "fc1": "feed_forward.intermediate_dense",
                        "fc2": "feed_forward.output_dense", "ln2": "final_layer_norm"})
BLOCK["text"].update({"attn.proj": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                      "fc1": "intermediate.dense", "fc2": "output.dense", "ln2": "output.LayerNorm"})
BLOCK["vision"].update({"attn.proj": "attention.output.dense", "ln1": "layernorm_before", "fc1": "intermediate.dense",
                        "fc2": "output.dense", "ln2": "layernorm_after", "gamma1": "lambda_1", "gamma2": "lambda_2",
                        "rel_pos.table": "attention.attention.relative_position_bias.relative_position_bias_table"})
# Present only when the checkpoint was trained with masking (HF: mask_time_prob > 0, use_mask_token); otherwise ours
# keeps its fresh initialisation, as Hugging Face's model would have none.
OPTIONAL = {"encoder.masked_spec_embed", "encoder.mask_token"}
# Checkpoint tensors with no counterpart here: RoBERTa's pooler (dense + tanh on <s>), which data2vec's text heads do
# not use (finetune.roberta_head has its own dense layer).
UNUSED = {"text": {"pooler.dense.weight", "pooler.dense.bias"}}


class ConversionError(CheckpointError):
    pass


class Output(NamedTuple):
    hidden: Tensor                # (B, T, C) the final hidden states (Hugging Face's last_hidden_state)
    padding_mask: Tensor | None   # (B, T) bool, True = padding (speech: padded frames; text: pad tokens)
    layers: list[Tensor]          # each block's target_layer tensor (B, T, C), bottom first; [] without target_layer
    logits: Tensor | None         # CTC: (B, T, letters); image classification: (B, classes); else None


class Pretrained(nn.Module):
    """A data2vec encoder in this project's modules: feature encoder -> Transformer, plus the checkpoint's task head:
    `lm_head` (CTC on letters, ctc.VOCAB order) or `head` (image classes: mean of the patch tokens -> LayerNorm ->
    Linear, SPEC §3). Parameter names are those of finetune.CTCModel and finetune.Classifier."""

    def __init__(self, config: Config, encoder: nn.Module, transformer: Transformer,
                 lm_head: nn.Linear | None = None, head: nn.Sequential | None = None):
        super().__init__()
        self.config = config
        self.encoder, self.transformer, self.lm_head, self.head = encoder, transformer, lm_head, head

    def forward(self, source: Tensor, padding_mask: Tensor | None = None, target_layer: str | None = None) -> Output:
        """source: tokens (B, T) long (padding read from the pad id), images (B, C, H, W), or normalised waveforms
        (B, S) with padding_mask (B, S) bool, True = padded sample. target_layer: "block" gives every block's output
        (Hugging Face's hidden_states[1:]), "ffn" data2vec's targets (transformer.py)."""
        x, pad = self.encoder.embed(source, padding_mask)                     # (B, T, C), (B, T) or None
        h, layers = self.transformer(self.encoder(x, pad), pad, target_layer)  # (B, n_prefix + T, C)
        logits = None
        if self.lm_head is not None:
            logits = self.lm_head(h)                                          # (B, T, letters)
        elif self.head is not None:
            logits = self.head(h[:, self.encoder.n_prefix:].mean(1))          # (B, classes)
        return Output(h, pad, layers, logits)


def build(cfg: Config, task: str | None = None, n_out: int = 0, in_chans: int = 3) -> Pretrained:
    """This project's modules for the architecture `cfg` (random weights). task: None, "ctc" (n_out letters) or
    "classifier" (n_out classes); in_chans: vision only."""
    tcfg = sub_config(TransformerConfig, cfg)
    if cfg.modality == "text":
        encoder = TextEncoder(cfg.vocab_size, cfg.dim, cfg.block_size, TEXT_PAD_ID, cfg.dropout, cfg.ln_eps)
    elif cfg.modality == "vision":
        encoder = PatchEncoder(in_chans, cfg.dim, cfg.patch_size)
        tcfg.rel_pos_grid = (cfg.img_size // cfg.patch_size,) * 2
    else:
        encoder = SpeechEncoder(cfg.dim, cfg.conv_dim, cfg.conv_layers, cfg.pos_conv_layers, cfg.pos_conv_kernel,
                                cfg.pos_conv_groups, cfg.dropout, cfg.ln_eps)
    lm_head = nn.Linear(cfg.dim, n_out) if task == "ctc" else None
    head = nn.Sequential(nn.LayerNorm(cfg.dim, eps=cfg.ln_eps), nn.Linear(cfg.dim, n_out)) if task == "classifier" else None
    return Pretrained(cfg, encoder, Transformer(tcfg), lm_head, head)


# -----------------------------------------------------------------------------
# configs

def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ConversionError(f"unsupported checkpoint: {what}; the official data2vec checkpoints (SPEC §5) convert")


def config_from_hf(c: object, modality: str) -> Config:
    """A Hugging Face Data2Vec*Config -> this project's Config: the base preset's recipe with the checkpoint's
    architecture (sizes, eps, dropout, LN placement, positions)."""
    _require(c.hidden_act == "gelu", f"hidden_act={c.hidden_act!r} (this project's FFN uses exact GELU)")
    arch = dict(modality=modality, preset="base", n_layer=c.num_hidden_layers, dim=c.hidden_size,
                n_head=c.num_attention_heads, ffn_dim=c.intermediate_size, ln_eps=c.layer_norm_eps)
    if modality == "speech":
        n = len(c.conv_dim)
        fe = ConvFeatureExtractor
        _require(len(set(c.conv_dim)) == 1, f"conv_dim={c.conv_dim} (one width for all conv layers)")
        _require(tuple(c.conv_kernel) == fe.KERNELS[:n] and tuple(c.conv_stride) == fe.STRIDES[:n],
                 f"conv_kernel={c.conv_kernel}, conv_stride={c.conv_stride} (wav2vec 2.0's, or their first layers)")
        _require(not c.conv_bias and c.feat_extract_activation == "gelu", "conv_bias or a non-GELU conv activation")
        _require(not c.add_adapter, "add_adapter=True")
        arch.update(conv_dim=c.conv_dim[0], conv_layers=n, pos_conv_layers=c.num_conv_pos_embeddings,
                    pos_conv_kernel=c.conv_pos_kernel_size, pos_conv_groups=c.num_conv_pos_embedding_groups,
                    dropout=c.hidden_dropout, attn_dropout=c.attention_dropout, act_dropout=c.activation_dropout,
                    layerdrop=c.layerdrop, mask_span=c.mask_time_length)
    elif modality == "text":
        _require(c.pad_token_id == TEXT_PAD_ID, f"pad_token_id={c.pad_token_id} (RoBERTa's is {TEXT_PAD_ID})")
        _require(not c.is_decoder, "is_decoder=True")
        arch.update(vocab_size=c.vocab_size, block_size=c.max_position_embeddings - 2, dropout=c.hidden_dropout_prob,
                    attn_dropout=c.attention_probs_dropout_prob, act_dropout=0.0)
    else:
        size, patch = c.image_size, c.patch_size
        _require(isinstance(size, int) and isinstance(patch, int) and size % patch == 0,
                 f"image_size={size}, patch_size={patch} (square images, a whole number of patches)")
        _require(not c.use_absolute_position_embeddings, "absolute position embeddings")
        _require(c.use_relative_position_bias != c.use_shared_relative_position_bias,
                 "a relative position bias that is neither shared nor per block, or both")
        arch.update(img_size=size, patch_size=patch, pre_ln=True, k_bias=False, layer_scale=c.layer_scale_init_value,
                    final_ln=not c.use_mean_pooling, rel_pos_per_layer=c.use_relative_position_bias,
                    drop_path=c.drop_path_rate, dropout=c.hidden_dropout_prob, attn_dropout=c.attention_probs_dropout_prob)
    base = PRESETS[modality]["base"]
    arch["top_k"] = min(base["top_k"], arch["n_layer"])   # the recipe's K, in a shallower (test-sized) model all blocks
    return Config(**{**base, **arch})


# -----------------------------------------------------------------------------
# state dicts

def hf_names(key: str, modality: str) -> tuple[str, ...]:
    """The Hugging Face keys our state-dict key is made from (the base model's names, without a head's prefix)."""
    if m := re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", key):
        layer, name, table = LAYER[modality].format(m[1]), m[2], BLOCK[modality]
    else:
        layer, name, table = "", key, TOP[modality]
    for ours, theirs in table.items():
        if name == ours or name.startswith(ours + "."):
            if isinstance(theirs, tuple):
                return tuple(layer + t for t in theirs)
            return (layer + theirs + name[len(ours):],)
    raise ConversionError(f"no Hugging Face name for {key!r} ({modality}): hf.py's tables need an entry")


def convert_state(hf_state: dict[str, Tensor], model: Pretrained, source: str = "the checkpoint") -> dict[str, Tensor]:
    """Rename a Hugging Face state dict onto `model`'s keys. Strict: every tensor `model` needs must be there (bar
    OPTIONAL ones, see above) and every checkpoint tensor must be used (bar UNUSED ones); else one ConversionError
    that names them all."""
    modality = model.config.modality
    out, used, missing = {}, set(), []
    for key, own in model.state_dict().items():
        names = hf_names(key, modality)
        absent = [n for n in names if n not in hf_state]
        if absent and key in OPTIONAL and len(absent) == len(names):
            out[key] = own
            continue
        missing += absent
        used.update(names)
        if absent:
            continue
        tensors = [hf_state[n] for n in names]
        if key.endswith("attn.qkv.weight"):
            out[key] = torch.cat(tensors)                                     # (3C, C): q, k, v rows
        elif key == "encoder.positions.weight":
            # RoBERTa adds token type 0 to every token (data2vec text has one type): fold it into every position row
            out[key] = tensors[0] + tensors[1][0]                             # (max_len + 2, C)
        else:
            out[key] = tensors[0]
    unexpected = sorted(set(hf_state) - used - UNUSED.get(modality, set()))
    if missing or unexpected:
        raise ConversionError(
            f"{source} does not fit the data2vec {modality} layout its config describes: "
            f"missing {len(missing)} tensor(s) {missing}, unexpected {len(unexpected)} tensor(s) {unexpected}. "
            f"Use a complete checkpoint whose config.json matches its weights (save_pretrained writes both)")
    return out


# -----------------------------------------------------------------------------
# loading

def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConversionError(f"loading Hugging Face checkpoints needs the optional package transformers: "
                              f"{INSTALL}") from None
    return transformers


def is_hf_source(source: str) -> bool:
    """A save_pretrained folder (with config.json), or a hub name `org/name` that is no local path; not a .pt file.
    A missing `out/ckpt` inside an existing local folder `out` is a mistyped path, not a hub name."""
    path = Path(source)
    if path.exists():
        return (path / "config.json").is_file()
    if Path(source.split("/")[0]).is_dir():
        return False
    return path.suffix not in (".pt", ".pth") and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def hf_model(source: str | Path | nn.Module) -> nn.Module:
    """A transformers model: the instance itself, or loaded from a folder or the hub. Hugging Face's own loading is
    made strict too: tensors it would have to initialise at random, or could not place, are a ConversionError."""
    transformers = _transformers()
    if isinstance(source, nn.Module):
        _require(type(source).__name__ in SUPPORTED, f"a {type(source).__name__} (use one of {', '.join(SUPPORTED)})")
        return source
    try:
        config = transformers.AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read a Hugging Face config from {str(source)!r} ({e}); pass a folder written "
                              "by save_pretrained, or a hub name such as facebook/data2vec-audio-base with the "
                              "machine online") from None
    _require(config.model_type in BASE_CLASS, f"model_type {config.model_type!r}")
    saved_arch = (config.architectures or [BASE_CLASS[config.model_type]])[0]
    # another task's model (Data2VecTextForMaskedLM, ...): its encoder converts, its head has no counterpart here
    arch = saved_arch if saved_arch in SUPPORTED else BASE_CLASS[config.model_type]
    try:
        model, info = getattr(transformers, arch).from_pretrained(str(source), output_loading_info=True)
    except Exception as e:                      # no weights file (OSError), a damaged one (safetensors', pickle's)
        reason = (str(e).splitlines() or [""])[0]
        raise ConversionError(f"cannot read the weights of {str(source)!r} ({type(e).__name__}: {reason}); save the "
                              "model again with save_pretrained (model.safetensors or pytorch_model.bin beside "
                              "config.json)") from None
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]   # unused here (UNUSED)
    unexpected = info["unexpected_keys"] if arch == saved_arch else []
    if arch != saved_arch:
        print(f"{source}: a {saved_arch}; converting its {arch}, without the task head "
              f"{sorted(info['unexpected_keys'])}")
    mismatched = [str(m) for m in info["mismatched_keys"]]
    if missing or unexpected or mismatched:
        raise ConversionError(f"{source}: the weights do not fit its config ({arch}): missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}, shape mismatches {mismatched}")
    return model


def from_pretrained(source: str | Path | nn.Module) -> Pretrained:
    """An official data2vec checkpoint as this project's modules (random init nowhere, bar OPTIONAL tensors).

    source: a transformers Data2VecAudioModel / Data2VecAudioForCTC / Data2VecTextModel / Data2VecVisionModel /
    Data2VecVisionForImageClassification instance, a folder written by its save_pretrained, or a hub name (online).
    """
    hf = hf_model(source)
    modality, task = SUPPORTED[type(hf).__name__]
    c = hf.config
    cfg = config_from_hf(c, modality)
    n_out = {"ctc": getattr(c, "vocab_size", 0), "classifier": getattr(c, "num_labels", 0)}.get(task, 0)
    if task == "classifier":
        _require(c.use_mean_pooling, "an image classifier on the CLS token (use_mean_pooling=False)")
    model = build(cfg, task, n_out, getattr(c, "num_channels", 3))
    prefix = HEAD_PREFIX[modality]
    state = {k.removeprefix(prefix): v for k, v in hf.state_dict().items()}   # the base model's names
    name = source if isinstance(source, (str, Path)) else type(hf).__name__
    load_state(model, convert_state(state, model, str(name)), "converted model", Path(str(name)))
    return model


def tokenizer(source: str) -> object:
    """The checkpoint's own tokenizer (RoBERTa's BPE for data2vec text), from its folder or the hub."""
    transformers = _transformers()
    fix = f"save it beside the model with tokenizer.save_pretrained({str(source)!r})"
    files = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in files):
        # transformers would build an empty tokenizer from config.json alone, whose ids mean nothing
        raise ConversionError(f"{source}: no tokenizer files ({', '.join(files)}); {fix}")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as e:
        raise ConversionError(f"{source}: no tokenizer ({type(e).__name__}: {e}); {fix}") from None
