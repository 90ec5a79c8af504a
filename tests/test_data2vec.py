"""The data2vec objective: targets, loss, EMA teacher, collapse monitors, each against an independent computation."""

import torch
import torch.nn.functional as F

from data2vec import (
    Data2Vec, EMATeacher, TargetConfig, build_targets, collapse_stat, ema_tau, local_window, normalize,
)
from encoders import TextEncoder
from transformer import Transformer, TransformerConfig

CFG = TransformerConfig(n_layer=4, dim=16, n_head=2, ffn_dim=32, dropout=0.0, attn_dropout=0.0)


def tiny_model(top_k=2, **target_kw):
    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=50, dim=16, max_len=12, pad_id=1, dropout=0.0)
    targets = TargetConfig(top_k=top_k, target_norm="layer", final_norm="none", loss_beta=4.0, loss_scale=False)
    targets.__dict__.update(target_kw)
    model = Data2Vec(enc, CFG, targets, head_hidden=True)
    return model, EMATeacher(model.student, 0.999, 0.9999, 100)


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 50, (3, 10), generator=g)
    tokens[1, 7:] = 1                                    # padding
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, [2, 5]] = mask[1, [1, 3]] = mask[2, [0, 9]] = True
    student = torch.where(mask, torch.full_like(tokens, 3), tokens)
    return dict(source=tokens, mask=mask, student_source=student)


def test_target_is_mean_of_normalised_top_k_blocks():
    """Run the teacher's blocks one by one by hand; the target is the mean of layer-normed FFN outputs of the last K."""
    model, teacher = tiny_model(top_k=3)
    with torch.no_grad():
        for p in teacher.model.parameters():               # a teacher unlike the student
            p.add_(torch.randn_like(p) * 0.1)
    b = tiny_batch()
    x, pad = model.encoder.embed(b["source"])
    got = model.teacher_targets(teacher, x, pad)
    h = model.encoder(x, pad)
    ffn_outputs = []
    for block in teacher.model.blocks:
        a = block.attn(h, ~pad[:, None, None, :])
        h1 = block.ln1(h + a)
        f = block.fc2(F.gelu(block.fc1(h1)))
        ffn_outputs.append(f)
        h = block.ln2(h1 + f)
    want = sum(F.layer_norm(f, (16,)) for f in ffn_outputs[-3:]) / 3
    assert torch.allclose(got, want, atol=1e-5)
    wrong = sum(F.layer_norm(f, (16,)) for f in ffn_outputs[-4:]) / 4
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_final_norm_and_instance_norm():
    layers = [torch.randn(2, 6, 4) * (i + 1) + i for i in range(3)]
    cfg = TargetConfig(top_k=2, target_norm="instance", final_norm="layer")
    inst = [(t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5) for t in layers[-2:]]
    avg = (inst[0] + inst[1]) / 2
    want = (avg - avg.mean(-1, keepdim=True)) / torch.sqrt(avg.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(build_targets(layers, cfg), want, atol=1e-5)


def test_instance_norm_on_padded_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    lengths = [6, 3, 2, 5]
    y = torch.randn(4, 6, 8)
    pad = torch.arange(6)[None, :] >= torch.tensor(lengths)[:, None]
    got = normalize(y, "instance", pad)
    for b, n in enumerate(lengths):
        alone = F.instance_norm(y[b:b + 1, :n].transpose(1, 2)).transpose(1, 2)
        assert torch.allclose(got[b, :n], alone[0], atol=1e-5)


def test_loss_and_gradients_touch_masked_steps_only():
    model, teacher = tiny_model()
    b = tiny_batch()
    captured = {}
    model.student.register_forward_hook(lambda m, i, o: (captured.update(h=o[0]), o[0].retain_grad()) and None)
    loss, pred, y = model(**b, teacher=teacher)
    assert pred.shape == y.shape == (int(b["mask"].sum()), 16)
    loss.backward()
    grad = captured["h"].grad                                   # (B, T, C) gradient at the student's output
    assert grad[b["mask"]].abs().sum() > 0
    assert grad[~b["mask"]].abs().sum() == 0


def test_precomputed_mask_rows_change_nothing():
    """train.py hands the forward pass the masked rows computed on the CPU; the result is the boolean-mask one."""
    model, teacher = tiny_model()
    b = tiny_batch()
    rows = model.masked_rows(b["mask"])
    assert torch.equal(rows, b["mask"].flatten().nonzero().squeeze(1))
    for got, want in zip(model(**b, teacher=teacher, mask_rows=rows), model(**b, teacher=teacher)):
        assert torch.equal(got, want)


def test_loss_formula():
    pred, y = torch.randn(5, 16) * 3, torch.randn(5, 16)
    model, teacher = tiny_model()
    from data2vec import regression_loss
    d = (pred - y).abs()
    smooth = torch.where(d < 4, 0.5 * d ** 2 / 4, d - 2).sum()
    assert torch.allclose(regression_loss(pred, y, 4.0, False), smooth)
    assert torch.allclose(regression_loss(pred, y, 0.0, True), ((pred - y) ** 2).sum() / 4)


def test_teacher_sees_the_unmasked_input():
    model, teacher = tiny_model()
    b = tiny_batch()
    seen = {}
    teacher.model.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    model(**b, teacher=teacher)
    x, pad = model.encoder.embed(b["source"])
    assert torch.allclose(seen["x"], model.encoder(x, pad))      # clean ids, not the <mask>-corrupted ones


def test_ema_tau_one_never_moves_and_tau_zero_copies():
    model, _ = tiny_model()
    teacher = EMATeacher(model.student, 1.0, 1.0, 10)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    for step in range(5):
        teacher.update(model.student, step)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.model.parameters()))
    copier = EMATeacher(Transformer(CFG), 0.0, 0.0, 10)
    copier.update(model.student, 0)
    assert all(torch.equal(t, s) for t, s in zip(copier.model.parameters(), model.student.parameters()))


def test_ema_formula_and_tiny_updates_survive_bf16_autocast():
    model, teacher = tiny_model()
    t0 = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        teacher.update(model.student, 0)                        # tau = 0.999
    for before, after, s in zip(t0, teacher.model.parameters(), model.student.parameters()):
        assert after.dtype == torch.float32
        assert torch.allclose(after, 0.999 * before + 0.001 * s, atol=1e-7)
        assert not torch.equal(after, before)                   # a 1e-6 change is not rounded away


def test_buffers_are_copied_and_shared_weights_not_duplicated():
    cfg = TransformerConfig(n_layer=2, dim=16, n_head=2, ffn_dim=32, rel_pos_grid=(2, 2), pre_ln=True)
    student = Transformer(cfg)
    teacher = EMATeacher(student, 0.5, 0.5, 10)
    student.rel_pos.index.fill_(3)
    teacher.update(student, 0)
    assert torch.equal(teacher.model.rel_pos.index, student.rel_pos.index)   # copied, not averaged
    model, teacher = tiny_model()
    teacher_ids = {id(p) for p in teacher.model.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert not any(n.startswith("encoder") or n.startswith("head") for n, _ in teacher.model.named_parameters())
    assert sum(p.numel() for p in teacher.model.parameters()) == sum(p.numel() for p in model.student.parameters())


def test_tau_schedule_hits_endpoints():
    assert ema_tau(0, 0.999, 0.9999, 100) == 0.999
    assert abs(ema_tau(50, 0.999, 0.9999, 100) - 0.99945) < 1e-12
    assert ema_tau(100, 0.999, 0.9999, 100) == 0.9999
    assert ema_tau(10_000, 0.999, 0.9999, 100) == 0.9999


def test_collapse_stat_matches_std():
    y = torch.randn(1000, 8) * torch.arange(1, 9)
    assert abs(collapse_stat(y) - torch.sqrt(y.var(0) + 1e-6).mean().item()) < 1e-4
    assert collapse_stat(torch.ones(100, 8)) < 0.01


def test_local_window_sequence_and_grid():
    band = local_window(5, 1)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(band, (i - j).abs() <= 1)
    # a 3 x 3 grid behind one CLS token: the centre patch sees all nine, a corner its 2 x 2 square; CLS only itself
    grid = local_window(9, 1, grid=(3, 3), prefix=1)
    assert grid.shape == (10, 10)
    assert grid[1 + 4, 1:].all() and grid[1 + 0, 1:].sum() == 4
    assert grid[0].sum() == 1 and grid[1:, 0].sum() == 0


def test_teacher_context_limits_what_a_target_depends_on():
    # one teacher block, a window of 3 steps: the target at step 0 cannot depend on step 5; with full context it does
    b = tiny_batch()
    changed = b["source"].clone()
    changed[:, 5] = 7
    for context, depends in [(3, False), (0, True)]:
        model, teacher = tiny_model(top_k=1, teacher_context=context)
        teacher.model.blocks = teacher.model.blocks[:1]
        x, pad = model.encoder.embed(b["source"])
        y = model.teacher_targets(teacher, x, pad)                           # (B, T, C)
        x2, _ = model.encoder.embed(changed)
        y2 = model.teacher_targets(teacher, x2, pad)
        assert torch.isfinite(y).all()                                       # padded rows too
        assert torch.allclose(y[:, 0], y2[:, 0]) != depends
        assert not torch.allclose(y[:, 4], y2[:, 4])                         # a neighbour of step 5 sees it


def test_without_absolute_positions_a_token_enters_the_transformer_the_same_at_every_step():
    """--positions=relative: the embeddings say which token a step holds and nothing about where it sits, so the
    teacher's targets learn about position only through the attention's relative bias; with RoBERTa's absolute rows
    the same token enters differently at every step."""
    tokens = torch.tensor([[0, 9, 9, 9, 9, 2]])                                     # <s> w w w w </s>
    for relative in (False, True):
        torch.manual_seed(0)
        enc = TextEncoder(vocab_size=50, dim=16, max_len=12, pad_id=1, dropout=0.0, positions=not relative)
        x, pad = enc.embed(tokens)
        h = enc(x, pad)[0, 1:5]                                                     # (4, C) the four w's
        assert torch.allclose(h, h[:1].expand_as(h)) == relative
