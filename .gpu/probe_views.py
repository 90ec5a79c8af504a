"""Throwaway: the genre probe on several readouts of one encoder (pretrained ckpt or its random init)."""
import sys
import torch
from finetune import FinetuneConfig, pretrained, init_student, load_task, probe, mean_pool
from data2vec import build_targets, TargetConfig, normalize
from text_data import encode_texts
from train import TASKS, load_state

ckpt, init = sys.argv[1], sys.argv[2]          # init: ckpt | random
fc = FinetuneConfig(modality="text", init_from="random" if init == "random" else ckpt,
                    like=ckpt if init == "random" else "", mode="probe")
cfg, state = pretrained(fc)
task = TASKS["text"](cfg, prepare=True)
encoder, transformer = init_student(fc, task.build_model, state)
teacher = None
if init != "random":
    raw = torch.load(ckpt, weights_only=True)
    import copy
    teacher = copy.deepcopy(transformer)
    teacher.load_state_dict(raw["teacher"])
tr_text, tr_label, te_text, te_label = load_task(fc, task.data_dir)
classes = sorted(set(tr_label))
y_tr = torch.tensor([classes.index(l) for l in tr_label]); y_te = torch.tensor([classes.index(l) for l in te_label])
enc = lambda t: encode_texts(task.data.enc, t, fc.max_len, task.data.meta)
x_tr, x_te = enc(tr_text), enc(te_text)
K = cfg.top_k

class View(torch.nn.Module):
    def __init__(self, kind, tf):
        super().__init__(); self.kind, self.tf = kind, tf
    def features(self, src):
        x, pad = encoder.embed(src)
        h0 = encoder(x, pad)
        out, ffn = self.tf(h0, pad, target_layer="ffn")
        _, blocks = self.tf(h0, pad, target_layer="block")
        if self.kind == "last":
            return mean_pool(out, pad, 0)
        if self.kind == "target":
            y = build_targets(ffn, TargetConfig(top_k=K, target_norm=cfg.target_norm, final_norm=cfg.final_norm), pad)
            return mean_pool(y, pad, 0)
        if self.kind == "concat":
            return torch.cat([mean_pool(h, pad, 0) for h in [h0, *blocks]], -1)
        if self.kind == "meanln":   # mean over the per-layer-normalised block outputs of all blocks
            return torch.cat([mean_pool(normalize(h, "layer"), pad, 0) for h in blocks[-K:]], -1)
encoder.eval(); transformer.eval()
views = [("last", transformer), ("target", transformer), ("concat", transformer)]
if teacher is not None:
    teacher.eval(); views.append(("target-teacher", teacher))
for name, tf in views:
    v = View(name.split("-")[0], tf)
    acc = probe(v, fc, x_tr, y_tr, x_te, y_te, torch.autocast("cpu", enabled=False), lambda x, g: x)
    print(f"{init} {name}: {acc:.4f}", flush=True)
