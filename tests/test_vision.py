"""Vision: patch embedding against a naive unfold, the CLS prefix and mask alignment through data2vec, layer-wise lr
decay, a tiny pretraining + fine-tuning run, and bad --data folders."""

import pytest
import torch
from PIL import Image

import finetune
import train
from data2vec import Data2Vec, EMATeacher, TargetConfig, build_targets
from encoders import PatchEncoder
from masking import block_mask
from tests.test_finetune import keep_test_logits, signal_at_update
from tests.test_train import assert_only_lists, record_settings
from transformer import TransformerConfig

TINY = ["--modality=vision", "--n_layer=2", "--dim=32", "--n_head=2", "--ffn_dim=64", "--top_k=1", "--img_size=16",
        "--patch_size=4", "--batch_size=8", "--eval_iters=1", "--log_interval=1", "--eval_interval=100"]


def tiny_vision_model(grid=(4, 4), patch=4) -> Data2Vec:
    cfg = TransformerConfig(n_layer=2, dim=16, n_head=2, ffn_dim=32, pre_ln=True, layer_scale=0.1, k_bias=False,
                            final_ln=True, dropout=0.0, attn_dropout=0.0, rel_pos_grid=grid)
    targets = TargetConfig(top_k=2, target_layer="block", target_norm="layer", final_norm="layer", loss_beta=2.0,
                           loss_scale=False)
    return Data2Vec(PatchEncoder(1, 16, patch), cfg, targets, head_hidden=False)


def test_patch_embedding_matches_naive_unfold():
    enc = PatchEncoder(in_chans=3, dim=8, patch_size=4)
    images = torch.randn(2, 3, 12, 8)                                         # 3 x 2 patches
    x, pad = enc.embed(images)
    assert x.shape == (2, 6, 8) and pad is None
    W, b = enc.projection.weight.flatten(1), enc.projection.bias              # (8, 3*4*4), (8,)
    for i in range(3):
        for j in range(2):
            pixels = images[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].flatten(1)   # (2, 48)
            assert torch.allclose(x[:, i * 2 + j], pixels @ W.T + b, atol=1e-5)  # row-major, as block_mask


def test_cls_prefix_and_mask_embedding():
    enc = PatchEncoder(in_chans=1, dim=8, patch_size=4)
    x, _ = enc.embed(torch.randn(3, 1, 16, 16))                               # (3, 16, 8)
    mask = block_mask(3, (4, 4), ratio=0.5, generator=torch.Generator().manual_seed(0))
    xs = enc.apply_mask(x, mask)
    assert torch.equal(xs[mask], enc.mask_token[0].expand(int(mask.sum()), -1))
    assert torch.equal(xs[~mask], x[~mask])
    h = enc(xs)
    assert enc.n_prefix == 1 and h.shape == (3, 17, 8)
    assert torch.equal(h[:, 0], enc.cls_token[0].expand(3, -1)) and torch.equal(h[:, 1:], xs)


def test_targets_are_the_masked_patches_and_never_cls():
    """Data2Vec pads the mask with a False CLS column: targets are the teacher's masked patch steps, in order."""
    torch.manual_seed(0)
    model = tiny_vision_model().eval()
    teacher = EMATeacher(model.student, 0.99, 0.99, 1)
    images = torch.randn(2, 1, 16, 16)
    mask = block_mask(2, (4, 4), ratio=0.5, generator=torch.Generator().manual_seed(1))   # (2, 16)
    loss, pred, y = model(images, mask, teacher)
    assert pred.shape == y.shape == (int(mask.sum()), 16)
    # the masked rows of the flattened (B * (1 + T)) steps skip each image's CLS
    assert torch.equal(model.masked_rows(mask), torch.cat([mask.new_zeros(2, 1), mask], 1).flatten().nonzero()[:, 0])

    x, _ = model.encoder.embed(images)
    _, layers = teacher.model(model.encoder(x), target_layer="block")        # clean input, CLS first
    expected = build_targets(layers, model.targets)[:, 1:][mask]              # (N, 16) patch steps only
    assert torch.allclose(y, expected, atol=1e-6)


def test_instance_norm_targets_take_their_statistics_over_the_patches_alone():
    """--target_norm=instance / --final_norm=instance on vision: CLS is never a target, so its teacher output must
    not shift the mean and variance the patches' targets are normalised with."""
    torch.manual_seed(0)
    model = tiny_vision_model().eval()
    model.targets = TargetConfig(top_k=2, target_layer="block", target_norm="instance", final_norm="instance")
    teacher = EMATeacher(model.student, 0.99, 0.99, 1)
    x, _ = model.encoder.embed(torch.randn(2, 1, 16, 16))                     # (2, 16, 16)
    got = model.teacher_targets(teacher, x, None)[:, 1:]                      # (2, 16, 16) patch steps

    def inorm(t):                                                             # over time, per image and channel
        return (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5)

    _, layers = teacher.model(model.encoder(x), target_layer="block")
    want = inorm(sum(inorm(t[:, 1:]) for t in layers) / 2)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        model.encoder.cls_token.mul_(10)                                      # another CLS, the same patches
    moved = (model.teacher_targets(teacher, x, None)[:, 1:] - got).abs().max()
    assert moved < 1e-4                                   # 2e-7; 0.098 with CLS in the statistics


def test_block_mask_index_is_the_patch_position():
    """Changing the pixels of patch (i, j) changes exactly embedding step i * w + j, the step block_mask names."""
    enc = PatchEncoder(in_chans=1, dim=8, patch_size=4)
    images = torch.randn(1, 1, 16, 16)
    changed = images.clone()
    changed[..., 8:12, 4:8] += 1                                              # patch (2, 1)
    diff = (enc.embed(changed)[0] - enc.embed(images)[0]).abs().sum(-1)[0]    # (16,)
    assert diff.nonzero().flatten().tolist() == [2 * 4 + 1]


def test_base_preset_is_the_paper_model():
    """ViT-B/16 at 224: 196 patches, a (2*14-1)^2 + 3 = 732-row shared bias, and HF's 85.7M parameters (SPEC §5)."""
    cfg = train.parse_args(["--modality=vision", "--preset=base"])
    assert (cfg.img_size // cfg.patch_size, cfg.top_k, cfg.loss_beta, cfg.tau_0, cfg.tau_e) == (14, 6, 2.0, 0.9998, 0.9998)
    grid = (cfg.img_size // cfg.patch_size,) * 2
    model = Data2Vec(PatchEncoder(3, cfg.dim, cfg.patch_size),
                     TransformerConfig(**{**vars(train.sub_config(TransformerConfig, cfg)), "rel_pos_grid": grid}),
                     train.sub_config(TargetConfig, cfg), head_hidden=False)
    assert model.student.rel_pos.table.shape == (732, 12)
    n = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert n == pytest.approx(85.7e6, rel=0.002)


def test_layer_decay_groups():
    model = tiny_vision_model()
    clf = finetune.Classifier(model.encoder, model.student, torch.nn.Linear(16, 10), "mean")
    fc = finetune.FinetuneConfig(lr=1.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in finetune.layer_groups(clf, fc) for p in g["params"]}
    assert lr_of[id(clf.encoder.cls_token)] == 0.125                          # decay^(L + 1), L = 2
    assert lr_of[id(clf.transformer.blocks[0].fc1.weight)] == 0.25
    assert lr_of[id(clf.transformer.blocks[1].fc1.weight)] == 0.5
    assert lr_of[id(clf.head.weight)] == lr_of[id(clf.transformer.rel_pos.table)] == 1.0
    assert len(finetune.layer_groups(clf, finetune.FinetuneConfig(layer_decay=1.0))) == 1


def test_tiny_pretraining_then_probe_and_finetune(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    read = record_settings(monkeypatch, train.TASKS, "vision")
    assert train.main([*TINY, "--max_iters=3", f"--out_dir={out}"]) == 0
    assert_only_lists(train.ONLY, "vision", read)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["modality"] == "vision"
    assert "encoder.cls_token" in ckpt["model"] and "encoder.projection.weight" in ckpt["model"]
    read = record_settings(monkeypatch, finetune.RUNNERS, "vision")
    for mode in ("probe", "finetune"):
        args = ["--modality=vision", f"--init_from={out / 'ckpt.pt'}", f"--mode={mode}", "--epochs=1",
                "--probe_epochs=2", "--label_fraction=0.1", f"--out_dir={tmp_path / 'ft'}"]
        assert finetune.main(args) == 0
        assert "test accuracy" in capsys.readouterr().out
    assert_only_lists(finetune.ONLY, "vision", read)


def test_ctrl_c_mid_fine_tuning_then_resume_ends_where_the_straight_run_does(tmp_path, monkeypatch, capfd):
    """Vision fine-tuning draws its augmentations from the run's generator: a resumed run must continue that stream.
    Ctrl-C during update 4 of 18; --resume ends with the straight run's test logits, to the bit."""
    assert train.main([*TINY, "--max_iters=1", f"--out_dir={tmp_path / 'pre'}"]) == 0
    args = ["--modality=vision", f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}", "--epochs=2", "--batch_size=16",
            "--label_fraction=0.1"]
    logits = keep_test_logits(monkeypatch)
    assert finetune.main([*args, f"--out_dir={tmp_path / 'straight'}"]) == 0
    signal_at_update(monkeypatch, 4)
    assert finetune.main([*args, f"--out_dir={tmp_path / 'resumed'}"]) == 130
    assert "stopped at update 4/18" in capfd.readouterr().err
    assert finetune.main([*args, f"--out_dir={tmp_path / 'resumed'}", "--resume"]) == 0
    assert len(logits) == 4 and torch.equal(logits[3], logits[1])   # straight epochs 1, 2; resumed epochs 1, 2


def test_bad_image_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "notes.txt").write_text("no images here")
    for folder, message in [("empty", "has no images and no class subfolders"), ("classes", "no readable images"),
                            ("missing", "does not exist")]:
        code = train.main([*TINY, f"--data={tmp_path / folder}", f"--out_dir={tmp_path / 'o'}"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_fine_tuning_on_a_folder_of_one_class_is_refused(tmp_path, capsys):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (12, 12), (60 * i, 0, 0)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
    for mode in ("probe", "finetune"):
        args = ["--modality=vision", "--init_from=random", f"--mode={mode}", f"--data={tmp_path / 'imgs'}",
                f"--out_dir={tmp_path / 'ft'}"]
        assert finetune.main(args) == 1
        assert capsys.readouterr().err == (f"error: {tmp_path / 'imgs'}: every training example is of class "
                                           "'cat', and a classifier needs two classes or more: add examples of "
                                           "another class\n")
        assert not (tmp_path / "ft").exists()


def test_a_folder_without_classes_pretrains_and_fine_tuning_asks_for_them(tmp_path, capsys):
    """Images straight in --data: pretraining reads no labels and runs; fine-tuning names the layout it needs."""
    (tmp_path / "imgs").mkdir()
    for i in range(10):
        Image.new("RGB", (12, 12), (20 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    assert train.main([*TINY, "--max_iters=1", f"--data={tmp_path / 'imgs'}", f"--out_dir={tmp_path / 'pre'}"]) == 0
    capsys.readouterr()
    args = ["--modality=vision", f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}", "--mode=probe",
            f"--data={tmp_path / 'imgs'}"]
    assert finetune.main(args) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'imgs'} holds images without class subfolders, enough to "
                                       "pretrain but not to train a classifier: lay them out as "
                                       f"{tmp_path / 'imgs'}/<class name>/<image>.png\n")
