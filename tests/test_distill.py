"""lx.distill: end-to-end refinement of compressed factors against the original model."""

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from lowrank_ext.distill import relative_error


class Mlp(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.fc1 = nn.Linear(16, width, dtype=torch.float64)
        self.fc2 = nn.Linear(width, width, dtype=torch.float64)
        self.fc3 = nn.Linear(width, 8, dtype=torch.float64)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Tokens(nn.Module):
    """A token-level model called with a dict batch: ``model(x=..., attention_mask=...)``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 12, dtype=torch.float64)
        self.out = nn.Linear(12, 6, dtype=torch.float64)

    def forward(self, x, attention_mask):
        h = torch.relu(self.proj(x))
        return {"tokens": self.out(h), "mask": attention_mask}


def batches(n=8, rows=64, features=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, features, generator=g, dtype=torch.float64) for _ in range(n)]


def output_error(model, teacher, data):
    with torch.no_grad():
        err = sum(float((model(x) - teacher(x)).pow(2).sum()) for x in data)
        ref = sum(float(teacher(x).pow(2).sum()) for x in data)
    return err / ref


def compressed_pair(ratio=0.3):
    teacher = Mlp()
    model = copy.deepcopy(teacher)
    lx.compress_model(model, ratio=ratio, calibration=batches(4, seed=1), progress=False)
    return model, teacher


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(module, saved):
    now = module.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def test_refinement_lowers_the_held_out_error_and_touches_only_the_factors():
    model, teacher = compressed_pair()
    train, held_out = batches(8, seed=2), batches(4, seed=3)
    teacher_before, model_before = snapshot(teacher), snapshot(model)
    before = output_error(model, teacher, held_out)

    result = lx.distill(model, teacher, train, steps=150, lr=3e-3, progress=False)

    after = output_error(model, teacher, held_out)
    assert after < 0.5 * before, (before, after)
    assert result.steps == 150 and len(result.losses) == 150
    assert result.last_loss < result.first_loss
    assert_same(teacher, teacher_before)
    for key, value in snapshot(model).items():
        changed = not torch.equal(value, model_before[key])
        assert changed == key.endswith((".A", ".B")), key


def test_the_loss_is_the_relative_squared_error_of_the_outputs():
    model, teacher = compressed_pair()
    data = batches(2, seed=4)
    with torch.no_grad():
        expected = float((model(data[0]) - teacher(data[0])).pow(2).sum()
                         / teacher(data[0]).pow(2).sum())
    result = lx.distill(model, teacher, data, steps=1, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-12)


def test_match_adds_the_inner_modules_outputs_to_the_loss():
    model, teacher = compressed_pair()
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        def hidden(m):
            return m.fc2(torch.tanh(m.fc1(x)))

        expected = float((model(x) - teacher(x)).pow(2).sum() / teacher(x).pow(2).sum()
                         + (hidden(model) - hidden(teacher)).pow(2).sum()
                         / hidden(teacher).pow(2).sum())
    result = lx.distill(model, teacher, [x], steps=1, match="fc2", progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("compiled", ["student", "teacher", "both"])
def test_match_names_the_modules_of_a_compiled_model_as_of_the_plain_one(compiled):
    # A compiled model's own names carry torch.compile's _orig_mod. prefix.
    model, teacher = compressed_pair()
    x = batches(1, seed=5)[0]
    plain = lx.distill(copy.deepcopy(model), teacher, [x], steps=1, match="fc2",
                       progress=False).losses[0]
    student = torch.compile(model, backend="eager") if compiled != "teacher" else model
    reference = torch.compile(teacher, backend="eager") if compiled != "student" else teacher
    result = lx.distill(student, reference, [x], steps=1, match="fc2", progress=False)
    assert result.losses[0] == pytest.approx(plain, rel=1e-12)


def test_padding_positions_are_left_out_of_dict_batches():
    teacher = Tokens()
    model = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 7, 12, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    batch = {"x": x, "attention_mask": mask}
    lx.compress_model(model, ratio=0.3, calibration=[batch], progress=False)
    with torch.no_grad():
        s, t = model(**batch)["tokens"], teacher(**batch)["tokens"]
    keep = mask.bool()
    expected = float((s - t)[keep].pow(2).sum() / t[keep].pow(2).sum())
    unmasked = float((s - t).pow(2).sum() / t.pow(2).sum())
    assert expected != pytest.approx(unmasked, rel=1e-3)
    result = lx.distill(model, teacher, [batch], steps=1, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-12)
    assert relative_error(s, t, mask) == pytest.approx(expected, rel=1e-12)


class _Layouts(nn.Module):
    """Per-token tensors in every layout distill masks: token-first inside (as
    nn.Transformer layers with batch_first=False), and as outputs (batch, tokens)
    scores, (batch, tokens, heads, dim) and a masked mean over the tokens."""

    def __init__(self, width):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(10, width, dtype=torch.float64)
        self.proj = nn.Linear(width, width, dtype=torch.float64)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids).transpose(0, 1)).transpose(0, 1)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"scores": h.sum(-1), "heads": h.unflatten(-1, (2, -1)),
                "pooled": (h * m).sum(1) / m.sum(1)}


def test_padding_is_left_out_of_per_token_tensors_in_every_layout():
    """The models differ at the padding token only: every tensor compared leaves it out
    (token-first tensors were compared whole, padding included)."""
    teacher = _Layouts(4)
    model = copy.deepcopy(teacher)
    ids = torch.randint(1, 10, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        model.emb.weight[0] += 3.0
    result = lx.distill(model, teacher, [batch], steps=1, lr=1e-12, match="proj",
                        parameters=[model.proj.weight], progress=False)
    assert result.losses[0] == 0.0
    with torch.no_grad():  # and with a real difference, each layout is masked as it lies
        model.proj.weight.mul_(1.1)
        s, t = model(**batch), teacher(**batch)
    keep = mask.bool()
    expected = sum(float((s[k] - t[k])[keep].pow(2).sum() / t[k][keep].pow(2).sum())
                   for k in ("scores", "heads"))
    expected += float((s["pooled"] - t["pooled"]).pow(2).sum() / t["pooled"].pow(2).sum())
    result = lx.distill(model, teacher, [batch], steps=1, lr=1e-12,
                        parameters=[model.proj.weight], progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-9)


def test_a_custom_loss_replaces_the_output_term_and_inner_modules_keep_theirs():
    model, teacher = compressed_pair()
    x = batches(1, seed=7)[0]
    seen = []

    def cosine_loss(output, target):
        seen.append((output.shape, target.requires_grad))
        return (1 - torch.nn.functional.cosine_similarity(output, target, dim=-1)).mean()

    with torch.no_grad():
        hidden_s = model.fc2(torch.tanh(model.fc1(x)))
        hidden_t = teacher.fc2(torch.tanh(teacher.fc1(x)))
        expected = float(cosine_loss(model(x), teacher(x))
                         + (hidden_s - hidden_t).pow(2).sum() / hidden_t.pow(2).sum())
    seen.clear()
    result = lx.distill(model, teacher, [x], steps=1, match="fc2", loss=cosine_loss,
                        progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-12)
    assert seen == [((64, 8), False)]  # called once per step, on outputs and detached targets


def test_a_loss_that_does_not_reach_the_model_is_refused():
    model, teacher = compressed_pair()
    before = snapshot(model)
    with pytest.raises(ValueError, match="loss must return a one-element tensor"):
        lx.distill(model, teacher, batches(1), steps=2, loss=lambda s, t: t.sum(),
                   progress=False)
    with pytest.raises(TypeError, match="loss must be callable"):
        lx.distill(model, teacher, batches(1), steps=2, loss="mse", progress=False)
    assert_same(model, before)


def test_a_mask_inside_a_tuple_batch_is_used_too():
    """sentence-transformers style: model(features) with the mask inside the features dict."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features):
            return self.inner(**features)["tokens"]

    teacher = Tokens()
    model = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    features = {"x": torch.randn(2, 5, 12, generator=g, dtype=torch.float64),
                "attention_mask": mask}
    lx.compress_model(model, ratio=0.3, calibration=[features], progress=False)
    student, original = Wrapper(model), Wrapper(teacher)
    with torch.no_grad():
        s, t = student(features), original(features)
    keep = mask.bool()
    expected = float((s - t)[keep].pow(2).sum() / t[keep].pow(2).sum())
    result = lx.distill(student, original, [(features,)], steps=1, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-12)


def test_modes_flags_and_gradients_come_back():
    model, teacher = compressed_pair()
    model.train()
    teacher.train()
    model.fc1.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lx.distill(model, teacher, batches(2), steps=3, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert teacher.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_explicit_parameters_train_only_those():
    model, teacher = compressed_pair()
    before = snapshot(model)
    lx.distill(model, teacher, batches(2), steps=5, lr=1e-2,
               parameters=[model.fc3.bias], progress=False)
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key]) == (key != "fc3.bias"), key


def test_a_dataloader_is_cycled():
    model, teacher = compressed_pair()
    loader = torch.utils.data.DataLoader(torch.cat(batches(2)), batch_size=40)  # 4 batches
    result = lx.distill(model, teacher, loader, steps=9, progress=False)
    assert len(result.losses) == 9


def _learning_rates(monkeypatch, **kwargs):
    """The learning rate of every optimizer step of one distill run."""
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    model, teacher = compressed_pair()
    lx.distill(model, teacher, batches(2), lr=1e-2, progress=False, **kwargs)
    return seen


@pytest.mark.parametrize("steps, warmup, warm", [(40, 0.25, 10), (10, 0.0, 1), (10, 0.99, 8),
                                                 (3, 0.9, 1), (2, 0.5, 1),
                                                 (10, 0.25, 3), (10, 0.35, 4)])  # halves up
def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine(monkeypatch, steps,
                                                                        warmup, warm):
    # warmup = 0.99 of 10 steps rounds to all 10: the warm-up stops two short
    # (the cosine's first step is at the peak) so that the last step is lower.
    lrs = _learning_rates(monkeypatch, steps=steps, warmup=warmup)
    expected = [1e-2 * (i + 1) / warm for i in range(warm)]
    expected += [1e-2 * 0.5 * (1 + math.cos(math.pi * i / (steps - warm)))
                 for i in range(steps - warm)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert steps < 3 or lrs[-1] < 1e-2


def test_one_step_runs_at_the_full_learning_rate(monkeypatch):
    assert _learning_rates(monkeypatch, steps=1, warmup=0.5) == pytest.approx([1e-2])


def test_a_failing_step_leaves_the_model_as_it_was():
    model, teacher = compressed_pair()
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    data = batches(3) + [torch.randn(4, 5, dtype=torch.float64)]  # wrong width at step 3
    with pytest.raises(RuntimeError, match="distill: step 3 raised"):
        lx.distill(model, teacher, data, steps=10, lr=1e-2, progress=False)
    assert_same(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_non_finite_loss_is_an_error_not_a_silent_update():
    model, teacher = compressed_pair()
    before = snapshot(model)
    bad = batches(1)[0]
    bad[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="step 2 raised FloatingPointError: the loss is (inf|nan): "
                                           "this batch holds values that are not finite, or"):
        lx.distill(model, teacher, batches(2) + [bad], steps=5, progress=False)
    assert_same(model, before)


def test_the_last_update_is_checked_too():
    # No step's loss follows the last update: a huge lr that makes the model's
    # outputs overflow there must not return a broken model.
    model, teacher = compressed_pair()
    model.float(), teacher.float()
    before = snapshot(model)
    data = [b.float() for b in batches(2)]
    with pytest.raises(RuntimeError, match="step 0 raised FloatingPointError: the last update"):
        lx.distill(model, teacher, data, steps=1, lr=1e30, warmup=0.0, progress=False)
    assert_same(model, before)


def test_it_trains_under_no_grad_and_names_inference_mode():
    model, teacher = compressed_pair()
    with torch.no_grad():
        result = lx.distill(model, teacher, batches(2), steps=3, lr=1e-2, progress=False)
    assert result.losses[-1] < result.losses[0]
    before = snapshot(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        lx.distill(model, teacher, batches(2), steps=3, progress=False)
    assert_same(model, before)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(steps=0), ValueError, "steps must be a positive int"),
    (dict(steps=2.5), ValueError, "steps must be a positive int"),
    (dict(steps=True), ValueError, "steps must be a positive int"),
    (dict(steps=2, lr=0), ValueError, "lr must be a positive finite number"),
    (dict(steps=2, lr=float("nan")), ValueError, "lr must be a positive finite number"),
    (dict(steps=2, max_grad_norm=-1.0), ValueError, "max_grad_norm must be"),
    (dict(steps=2, warmup=1.0), ValueError, "warmup must be"),
    (dict(steps=2, match="nothing_here"), ValueError, "matches no module"),
    (dict(steps=2, match=3), TypeError, "match must be"),
    (dict(steps=2, match=[]), ValueError, "match is an empty list"),
    (dict(steps=2, parameters=torch.nn.Parameter(torch.ones(2))), TypeError, "single tensor"),
    (dict(steps=2, parameters=[torch.nn.Parameter(torch.ones(2))]), ValueError,
     "must be a parameter of model"),
])
def test_bad_arguments_are_refused_before_any_change(kwargs, error, message):
    model, teacher = compressed_pair()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        lx.distill(model, teacher, batches(2), progress=False, **kwargs)
    assert_same(model, before)


def test_numpy_scalars_are_taken_as_numbers():
    np = pytest.importorskip("numpy")
    teacher = Tokens()
    model = copy.deepcopy(teacher)
    batch = {"x": torch.randn(2, 5, 12, dtype=torch.float64),
             "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    lx.compress_model(model, ratio=0.3, calibration=[batch], progress=False)
    result = lx.distill(model, teacher, [batch], steps=np.int64(2), lr=np.float32(1e-3),
                        warmup=np.float64(0.5), max_grad_norm=np.float32(1.0), progress=False)
    assert result.steps == 2 and type(result.steps) is int


def test_bad_data_and_models_are_refused():
    model, teacher = compressed_pair()
    x = batches(1)[0]
    with pytest.raises(TypeError, match="re-iterable"):
        lx.distill(model, teacher, (b for b in [x]), steps=1)
    with pytest.raises(TypeError, match="single Tensor"):
        lx.distill(model, teacher, x, steps=1)
    with pytest.raises(ValueError, match="no batches"):
        lx.distill(model, teacher, [], steps=1)
    with pytest.raises(TypeError, match="must be a tensor, tuple or dict"):
        lx.distill(model, teacher, [3], steps=1)
    with pytest.raises(ValueError, match="teacher is the model itself"):
        lx.distill(model, model, [x], steps=1)
    with pytest.raises(ValueError, match="no LowRankLinear"):
        lx.distill(copy.deepcopy(teacher), teacher, [x], steps=1)
    with pytest.raises(ValueError, match="shares trainable parameters"):
        shared = nn.Sequential(model)
        lx.distill(model, shared, [x], steps=1)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        lx.distill(model, lambda x: x, [x], steps=1)
    wider = Mlp()
    wider.fc3 = nn.Linear(32, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="outputs of the model and of the teacher differ"):
        lx.distill(model, wider, [x], steps=1)


def test_merged_adapters_are_refused_since_they_would_train_without_effect():
    model, teacher = compressed_pair()
    lx.add_lora(model, 2)
    model.fc2.merge()
    saved = snapshot(model)
    with pytest.raises(ValueError, match="LoRA layer\\(s\\) fc2 are merged"):
        lx.distill(model, teacher, batches(2), steps=2, progress=False)
    assert_same(model, saved)
    model.fc2.unmerge()
    lx.distill(model, teacher, batches(2), steps=2, progress=False)


def _half_pair(dtype, seed=0):
    """A compressed model and its teacher, both in ``dtype`` (compressed in float32);
    the same weights for every dtype."""
    torch.manual_seed(seed)
    teacher = Mlp().float()
    model = copy.deepcopy(teacher)
    lx.compress_model(model, ratio=0.3, calibration=[b.float() for b in batches(4, seed=1)],
                      progress=False)
    return model.to(dtype), teacher.to(dtype)


def _held_out_error(model, teacher, dtype):
    """output_error of the outputs in ``dtype``, summed in float64."""
    with torch.no_grad():
        pairs = [(model(x.to(dtype)).double(), teacher(x.to(dtype)).double())
                 for x in batches(4, seed=3)]
    return (sum(float((s - t).pow(2).sum()) for s, t in pairs)
            / sum(float(t.pow(2).sum()) for _, t in pairs))


def test_float16_distillation_lowers_the_loss():
    """Adam's eps is 0 in float16: without float32 masters a zero gradient gives 0/0."""
    model, teacher = _half_pair(torch.float16)
    train = [b.half() for b in batches(8, seed=2)]
    before = _held_out_error(model, teacher, torch.float16)
    result = lx.distill(model, teacher, train, steps=100, lr=3e-3, progress=False)
    after = _held_out_error(model, teacher, torch.float16)
    assert after < 0.7 * before, (before, after)
    assert result.last_loss < result.first_loss
    assert all(p.dtype == torch.float16 and bool(torch.isfinite(p).all())
               for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_failing_half_precision_step_restores_the_parameters(dtype):
    model, teacher = _half_pair(dtype)
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    data = [b.to(dtype) for b in batches(3)] + [torch.randn(4, 5, dtype=dtype)]
    with pytest.raises(RuntimeError, match="distill: step 3 raised"):
        lx.distill(model, teacher, data, steps=10, lr=1e-2, max_grad_norm=1.0, progress=False)
    assert_same(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_bfloat16_distillation_keeps_updates_below_its_precision():
    """At lr 3e-5 each step moves a factor by less than half a bfloat16 ulp for most
    entries: applied directly, the updates round away. The float32 masters keep them,
    so the model gains about what the same run in float32 gains."""
    train = batches(8, seed=2)
    gains = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, teacher = _half_pair(dtype)
        before = _held_out_error(model, teacher, dtype)
        lx.distill(model, teacher, [b.to(dtype) for b in train], steps=200, lr=3e-5,
                   progress=False)
        gains[dtype] = before - _held_out_error(model, teacher, dtype)
    assert gains[torch.float32] > 0
    assert gains[torch.bfloat16] > 0.75 * gains[torch.float32], gains


def test_a_non_finite_loss_before_any_update_does_not_blame_the_lr():
    model, teacher = compressed_pair()
    before = snapshot(model)
    bad = batches(1)[0]
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="step 0 raised FloatingPointError: this batch holds "
                                           "values that are not finite") as info:
        lx.distill(model, teacher, [bad], steps=2, progress=False)
    assert "lr" not in str(info.value)
    assert_same(model, before)


def test_float16_gradients_that_overflow_are_named_not_trained_on():
    model, teacher = _half_pair(torch.float16)
    before = snapshot(model)

    def huge(output, target):  # its gradient, 2e8·output, is beyond float16's 65504
        return (output.float() * 1e4).pow(2).sum()

    with pytest.raises(RuntimeError, match="step 0 raised FloatingPointError: the gradients "
                                           "of float16 parameters are not finite"):
        lx.distill(model, teacher, [b.half() for b in batches(2)], steps=3, loss=huge,
                   progress=False)
    assert_same(model, before)


class _CountingTrain(nn.Module):
    """Wraps a model; counts the calls of its overridden train()."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.train_calls = inner, 0

    def train(self, mode=True):
        self.train_calls += 1
        return super().train(mode)

    def forward(self, x):
        return self.inner(x)


def test_an_overridden_train_is_never_run_and_the_modes_come_back():
    model, teacher = compressed_pair()
    model, teacher = _CountingTrain(model).train(), _CountingTrain(teacher).eval()
    model.train_calls = teacher.train_calls = 0
    lx.distill(model, teacher, batches(2), steps=3, progress=False)
    assert model.train_calls == teacher.train_calls == 0
    assert all(m.training for m in model.modules())
    assert not any(m.training for m in teacher.modules())


class _OneShot(torch.utils.data.IterableDataset):
    def __init__(self, items):
        self.items = iter(items)

    def __iter__(self):
        return self.items


def test_data_that_runs_dry_on_a_later_pass_is_named_so():
    model, teacher = compressed_pair()
    before = snapshot(model)
    loader = torch.utils.data.DataLoader(_OneShot(batches(3)), batch_size=None)
    with pytest.raises(ValueError, match="data gave no batches on pass 2, after 3 in the passes "
                                         "before; it must give its batches again"):
        lx.distill(model, teacher, loader, steps=5, lr=1e-2, progress=False)
    assert_same(model, before)


@pytest.mark.parametrize("loss, seen", [
    (lambda out, tgt: (out - tgt).pow(2), "a tensor of shape (64, 8)"),
    (lambda out, tgt: (out - tgt).detach().pow(2).mean(), "a tensor that requires no grad"),
    (lambda out, tgt: 1.0, "float"),
])
def test_a_loss_of_the_wrong_kind_says_what_it_gave(loss, seen):
    model, teacher = compressed_pair()
    with pytest.raises(ValueError, match=rf"loss must return a one-element tensor .* got "
                                         rf"{re.escape(seen)}$"):
        lx.distill(model, teacher, batches(2), steps=3, progress=False, loss=loss)


def test_a_loss_that_does_not_depend_on_the_model_is_refused():
    model, teacher = compressed_pair()
    before = snapshot(model)
    leaf = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="the loss does not depend on the parameters being "
                                         "trained"):
        lx.distill(model, teacher, batches(2), steps=3, lr=1e-2, progress=False,
                   loss=lambda out, tgt: leaf + (out - tgt).detach().pow(2).mean())
    assert_same(model, before)


def test_matched_modules_that_never_run_are_named():
    model, teacher = compressed_pair()
    model.extra, teacher.extra = nn.Linear(2, 2).double(), nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="match names modules that did not run in the "
                                         "teacher's forward: extra"):
        lx.distill(model, teacher, batches(2), steps=2, progress=False, match="extra")


@pytest.mark.parametrize("progress", ["no", 0, []])
def test_progress_must_be_a_bool_or_none(progress):
    model, teacher = compressed_pair()
    with pytest.raises(TypeError, match="distill: progress must be True, False or None, got"):
        lx.distill(model, teacher, batches(2), steps=2, progress=progress)


class _MaskedTagger(nn.Module):
    """Per-token logits set to -inf at padding, as masked heads do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.head = nn.Embedding(20, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, input_ids, attention_mask):
        logits = self.head(torch.tanh(self.fc(self.emb(input_ids))))
        return logits.masked_fill(attention_mask[..., None] == 0, float("-inf"))


def _tagger_batch():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return {"input_ids": torch.randint(1, 20, (4, 6), generator=g), "attention_mask": mask}


def test_non_finite_values_at_padding_stay_out_of_the_loss():
    """-inf − -inf is NaN, and NaN·0 is NaN: weighting padding by zero let it
    poison the loss, which masking by selection does not."""
    teacher, batch = _MaskedTagger(), _tagger_batch()
    model = copy.deepcopy(teacher)
    lx.compress_model(model, ratio=0.5, calibration=[batch], progress=False)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        s, t = model(**batch), teacher(**batch)
    expected = float((s - t)[keep].pow(2).sum() / t[keep].pow(2).sum())
    assert relative_error(s, t, batch["attention_mask"]) == pytest.approx(expected, rel=1e-6)
    result = lx.distill(model, teacher, [batch], steps=3, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(value) for value in result.losses)


def test_the_last_check_allows_what_the_teacher_gives_too():
    """A loss of one's own that reads real tokens only trained every step, then
    the check of the last update refused the -inf the teacher gives as well."""
    teacher, batch = _MaskedTagger(), _tagger_batch()
    model = copy.deepcopy(teacher)
    lx.compress_model(model, ratio=0.5, calibration=[batch], progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def real_tokens_mse(out, target):
        finite = torch.isfinite(target)
        return (out[finite] - target[finite]).pow(2).mean()

    result = lx.distill(model, teacher, [batch], steps=5, lr=1e-2, loss=real_tokens_mse,
                        progress=False)
    assert result.steps == 5
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_torchscript_module_in_match_is_refused_and_leaves_no_hooks():
    class WithScript(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
                self.act = torch.jit.script(nn.Tanh())
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.act(self.fc(x)))

    torch.manual_seed(0)
    teacher = WithScript()
    model = copy.deepcopy(teacher)
    lx.compress_model(model, rank=2, progress=False)
    with pytest.raises(ValueError, match=r"distill: match names TorchScript module\(s\) act"):
        lx.distill(model, teacher, [torch.randn(4, 8)], steps=1, match=["fc", "act"],
                   progress=False)
    for m in [*model.modules(), *teacher.modules()]:
        if not isinstance(m, torch.jit.ScriptModule):
            assert not m._forward_hooks


@pytest.mark.parametrize("steps, warmup, expected", [(50, 0.29, 15), (25, 0.58, 15),
                                                     (90, 0.35, 32), (10, 0.25, 3)])
def test_warm_up_steps_round_halves_up_for_decimal_fractions(monkeypatch, steps, warmup,
                                                             expected):
    """0.29 · 50 is 14.499999999999998 in binary: it gave 14 warm-up steps."""
    rates = _learning_rates(monkeypatch, steps=steps, warmup=warmup)  # peak lr 1e-2
    assert rates.index(1e-2) + 1 == expected
    assert rates[:expected] == pytest.approx([1e-2 * (i + 1) / expected
                                              for i in range(expected)])


def test_per_token_layouts_are_masked_alike_in_distill_and_the_sensitivity_probes():
    """One rule (per_token_layout): a (batch, tokens, heads, dim) output kept
    its padding in the probes, (tokens, batch) scores theirs in distill."""
    from lowrank_ext.sensitivity import _real_tokens

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 2:] = 0  # 7 real tokens of 10
    keep = mask.bool()
    four_d = torch.randn(2, 5, 2, 4, generator=g, dtype=torch.float64)
    assert torch.equal(_real_tokens(four_d, mask), four_d[keep])
    token_first = torch.randn(5, 2, generator=g, dtype=torch.float64)
    assert torch.equal(_real_tokens(token_first, mask), token_first[keep.T].unsqueeze(-1))
    s, t = torch.randn(5, 2, generator=g, dtype=torch.float64), token_first
    expected = float((s - t)[keep.T].pow(2).sum() / t[keep.T].pow(2).sum())
    assert relative_error(s, t, mask) == pytest.approx(expected, rel=1e-12)
    pooled = torch.randn(2, 3, generator=g, dtype=torch.float64)  # fits no layout
    assert _real_tokens(pooled, mask) is pooled


def test_an_attention_map_with_as_many_heads_as_tokens_is_not_read_per_token():
    from lowrank_ext.calibration import per_token_layout

    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, 2:] = 0
    assert per_token_layout(torch.zeros(2, 4, 4, 4), mask) is None  # (batch, heads, t, t)
    assert per_token_layout(torch.zeros(2, 4, 3, 5), mask) is mask  # (batch, tokens, h, d)
    assert per_token_layout(torch.zeros(2, 4, 4), mask) is mask  # head-averaged map: rows


class ScalesItsInput(Mlp):
    def forward(self, x):
        x.mul_(2.0)  # in place on its input
        return super().forward(x)


def test_each_model_gets_its_own_copy_of_the_batch_and_the_caller_keeps_theirs():
    # The teacher ran on the batch first, so the model saw it scaled twice (a
    # wrong target), and the caller's tensors were scaled on every pass.
    torch.manual_seed(0)
    teacher = ScalesItsInput()
    model = copy.deepcopy(teacher)
    model.fc2 = lx.LowRankLinear.from_linear(model.fc2, rank=32)  # exact: the loss is 0
    data = batches(2, seed=5)
    kept = [x.clone() for x in data]
    result = lx.distill(model, teacher, data, steps=3, lr=1e-9, progress=False)
    assert max(result.losses) < 1e-20
    assert all(torch.equal(a, b) for a, b in zip(data, kept))


def test_batches_that_require_grad_or_come_from_inference_mode():
    # Batches that require grad had gradients written into them; inference
    # tensors (which compress_model's calibration takes) failed the step.
    model, teacher = compressed_pair()
    data = [x.requires_grad_() for x in batches(2, seed=5)]
    lx.distill(model, teacher, data, steps=2, lr=1e-4, progress=False)
    assert all(x.grad is None for x in data)
    with torch.inference_mode():
        frozen = [x.clone() for x in batches(2, seed=5)]
    result = lx.distill(model, teacher, frozen, steps=2, lr=1e-4, progress=False)
    assert result.steps == 2


class Noisy(Mlp):
    def forward(self, x):
        return super().forward(x) + 0.1 * torch.randn(x.shape[0], 8, dtype=x.dtype)


def test_the_teacher_draws_the_random_numbers_the_model_draws():
    # A forward drawing noise (in eval mode too) gave a loss no training removes;
    # the generators advance as they would for the model's forwards alone.
    torch.manual_seed(0)
    teacher = Noisy()
    model = copy.deepcopy(teacher)
    model.fc2 = lx.LowRankLinear.from_linear(model.fc2, rank=32)  # exact
    data = batches(2, seed=5)
    torch.manual_seed(7)
    result = lx.distill(model, teacher, data, steps=3, lr=1e-12, progress=False)
    assert max(result.losses) < 1e-20
    after = torch.get_rng_state()
    torch.manual_seed(7)
    with torch.no_grad():
        for step in range(3):  # the model's forwards: one per step
            model(data[step % 2].clone())
    assert torch.equal(after, torch.get_rng_state())


def test_an_iterator_is_refused_up_front_with_what_it_is():
    data = iter(batches(2))
    model, teacher = compressed_pair()
    with pytest.raises(TypeError, match=r"distill: data must be re-iterable \(a list of batches "
                                        r"or a DataLoader\), got a list_iterator whose iter\(\) "
                                        r"returns itself"):
        lx.distill(model, teacher, data, steps=2, progress=False)


class _PaddedScores(nn.Module):
    """Tokens through three layers; -inf at the padded positions, after the
    last layer ("head", on purpose: scores) or before it ("mid")."""

    def __init__(self, where):
        super().__init__()
        self.emb, self.where = nn.Embedding(30, 16), where
        self.l1, self.l2, self.l3 = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask):
        pad = attention_mask.unsqueeze(-1) == 0
        h = self.l2(torch.tanh(self.l1(self.emb(input_ids))))
        if self.where == "mid":
            h = h.masked_fill(pad, float("-inf"))
        out = self.l3(h)
        return out.masked_fill(pad, float("-inf")) if self.where == "head" else out


def _padded_scores_pair(where):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    teacher = _PaddedScores(where)
    model = copy.deepcopy(teacher)
    lx.compress_model(model, ratio=0.5, calibration=batches, progress=False)
    return model, teacher, batches


@pytest.mark.parametrize("where", ["head", None])
def test_a_diverging_lr_is_named_also_with_minus_inf_at_padding(where):
    # -inf that the teacher puts at padding on purpose made a diverging
    # step say the batch or the teacher's outputs were not finite.
    model, teacher, batches = _padded_scores_pair(where)
    with pytest.raises(RuntimeError, match=r"step 1 raised FloatingPointError: the loss is "
                                           r"(inf|nan); try a lower lr"):
        lx.distill(model, teacher, batches, steps=5, lr=1e8, progress=False)


def test_gradients_that_are_not_finite_are_named_at_their_step():
    # -inf at padding before a trained layer: the loss (padding left out) is
    # finite, its gradient NaN; Adam wrote NaN into the factors and the next
    # step blamed the batch.
    model, teacher, batches = _padded_scores_pair("mid")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="step 0 raised FloatingPointError: the gradients of "
                                           "the trained parameters are not finite"):
        lx.distill(model, teacher, batches, steps=5, lr=1e-2, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_teacher_output_that_is_not_finite_where_the_loss_reads_it_is_named():
    model, teacher = compressed_pair()
    before = snapshot(model)
    teacher.register_forward_hook(lambda module, args, out: out.index_fill(0, torch.tensor([0]),
                                                                           float("inf")))
    with pytest.raises(RuntimeError, match="step 0 raised FloatingPointError: the teacher's "
                                           "outputs on this batch hold values that are not "
                                           "finite where the loss reads them"):
        lx.distill(model, teacher, batches(2), steps=2, progress=False)
    assert_same(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_not_finite_gradients_from_padding_are_explained_in_every_dtype(dtype):
    # In bfloat16 and float16 the float16-range advice came first, though
    # bfloat16 has float32's range and a float32 copy fails alike.
    model, teacher, batches = _padded_scores_pair("mid")
    model.to(dtype), teacher.to(dtype)
    with pytest.raises(RuntimeError, match="step 0 raised FloatingPointError: the gradients of "
                                           "the trained parameters are not finite although"):
        lx.distill(model, teacher, batches, steps=3, lr=1e-2, progress=False)


def test_a_custom_loss_over_intentional_minus_inf_still_names_the_lr():
    # With loss=, every teacher output counts as read: a diverging step after
    # a finite one blamed the teacher's -inf at padding alone.
    model, teacher, batches = _padded_scores_pair("head")

    def kept(output, target):
        mask = batches[0]["attention_mask"].bool()
        return (output[mask] - target[mask]).pow(2).sum() / target[mask].pow(2).sum()

    with pytest.raises(RuntimeError, match=r"step 1 raised FloatingPointError: the loss is "
                                           r"(inf|nan): the teacher's outputs .* try a lower lr"):
        lx.distill(model, teacher, batches, steps=5, lr=1e8, loss=kept, progress=False)


def test_a_dora_magnitude_under_a_parametrization_stays_dora():
    # use_dora read _parameters, which a parametrization empties: the layer
    # computed plain LoRA, and its merged state loaded without the magnitude.
    from torch.nn.utils import parametrize

    class Same(nn.Module):
        def forward(self, X):
            return X

    torch.manual_seed(0)
    layer = lx.LoRALinear(nn.Linear(6, 4, dtype=torch.float64), rank=2, use_dora=True)
    with torch.no_grad():
        layer.B.normal_()
        layer.magnitude.mul_(1.5)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = layer(x)
    parametrize.register_parametrization(layer, "magnitude", Same())
    assert layer.use_dora
    torch.testing.assert_close(layer(x), expected)
    assert "parametrizations.magnitude.original" in layer._weight_keys("")


def test_float16_gradients_below_its_range_are_kept_by_loss_scaling():
    # Nearly rank-8 layers compressed to rank 8: the loss starts near 1e-4 and
    # each output's gradient, about 2(s − t)/‖t‖², underflowed to 0 in float16
    # (every step trained nothing, without a word).
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with torch.no_grad():
        for layer in (base[0], base[2]):
            layer.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64) / 8
                               + 0.003 * torch.randn(64, 64))
    x = torch.randn(64, 256, 64)
    losses = {}
    for dtype in (torch.float32, torch.float16):
        original = copy.deepcopy(base).to(dtype)
        model = copy.deepcopy(base)
        lx.compress_model(model, rank=8)
        model.to(dtype)
        factors = [model[0].A, model[0].B, model[2].A, model[2].B]
        before = [p.detach().clone() for p in factors]
        losses[dtype] = lx.distill(model, original, [x.to(dtype)], steps=4, lr=1e-4).losses
        assert all((p != b).any() for p, b in zip(factors, before))  # none stayed
    assert losses[torch.float16][0] < 1e-3
    # float16 follows float32 down (it stayed at its first loss).
    assert losses[torch.float16][-1] < 0.95 * losses[torch.float16][0]
    torch.testing.assert_close(torch.tensor(losses[torch.float16]),
                               torch.tensor(losses[torch.float32]), rtol=0.05, atol=0)


def test_float16_loss_scale_is_halved_where_the_scaled_gradients_overflow(monkeypatch):
    # Gradients of a summed squared error near 10 overflow float16 at the first
    # scale (2¹⁶): the backward runs again at a smaller one, and training
    # follows float32's.
    backward, calls = torch.Tensor.backward, []

    def counted(self, *args, **kwargs):
        calls.append(self.dtype)
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counted)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    x = torch.randn(8, 16)
    results = {}
    for dtype in (torch.float32, torch.float16):
        calls.clear()
        original = copy.deepcopy(base).to(dtype)
        model = copy.deepcopy(base)
        lx.compress_model(model, rank=2)
        model.to(dtype)
        lx.distill(model, original, [x.to(dtype)], steps=3, lr=1e-3,
                   loss=lambda output, target: ((output.float() - target.float()) ** 2).sum())
        results[dtype] = [p.detach().float() for p in model.parameters()]
        assert len(calls) == (3 if dtype == torch.float32 else 4)  # one step ran twice
    for ours, reference in zip(results[torch.float16], results[torch.float32]):
        torch.testing.assert_close(ours, reference, rtol=0.02, atol=2e-3)


def test_a_module_both_models_share_is_matched_on_each_model_s_inputs():
    # Both hooks sat on the one module: each list took both forwards, and the
    # matched term compared every output with itself (0).
    torch.manual_seed(0)
    head = nn.Linear(16, 4).requires_grad_(False)
    original = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), head)
    model = nn.Sequential(copy.deepcopy(original[0]), nn.Tanh(), head)
    lx.compress_model(model, rank=2, exclude="2")
    assert model[2] is head
    x = torch.randn(5, 8, dtype=torch.float32)
    with torch.no_grad():
        s, t = head(model[:2](x)).double(), head(original[:2](x)).double()
        expected = float(((s - t) ** 2).sum() / (t ** 2).sum())
    only_matched = lx.distill(model, original, [x], steps=1, lr=1e-12, match="2",
                              loss=lambda output, target: (output * 0).sum())
    assert only_matched.losses[0] == pytest.approx(expected, rel=1e-5)


def test_a_teacher_encoder_runs_its_ordinary_path_as_the_student_does():
    # In its no_grad forward the teacher's encoder packed the padded batch
    # into a nested tensor, zeros at padded positions, which the student
    # computing gradients never gives: a student equal to its teacher had a
    # loss of 0.5.
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                               batch_first=True), 2)
    teacher, student = copy.deepcopy(encoder), copy.deepcopy(encoder)
    x = torch.randn(3, 6, 16)
    padding = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]]).bool()
    result = lx.distill(student, teacher, [{"src": x, "src_key_padding_mask": padding}],
                        steps=1, lr=1e-12, parameters=[student.layers[0].linear1.bias])
    assert result.losses[0] < 1e-10
    assert teacher.use_nested_tensor is True and student.use_nested_tensor is True


def test_match_names_are_read_through_a_data_parallel_wrapper():
    # The wrapper's names carry module.: 'the teacher has no module named module.0'.
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model = copy.deepcopy(original)
    lx.compress_model(model, rank=2)
    data = [torch.randn(5, 8)]
    reference = copy.deepcopy(model)
    wrapped = lx.distill(nn.DataParallel(model), original, data, steps=2, lr=1e-2,
                         match="0").losses
    assert wrapped == lx.distill(reference, original, data, steps=2, lr=1e-2, match="0").losses


def test_float16_compiled_model_trains_with_loss_scaling():
    # A graph kept for a second backward (the first form of the loss scaling)
    # is refused by inductor's backward once compiled with donated buffers.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).half()
    teacher, model = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        model[0].weight.mul_(0.9)
    model.requires_grad_(False)
    model[0].weight.requires_grad_(True)
    compiled = torch.compile(model)
    x = torch.randn(8, 16).half()
    compiled(x).float().pow(2).mean().backward()  # the user's own step first
    model[0].weight.grad = None
    losses = lx.distill(compiled, teacher, [x], steps=2, lr=1e-3,
                        parameters=[model[0].weight]).losses
    assert losses[1] < losses[0]


def test_a_step_run_again_unscaled_replays_a_generator_the_model_holds():
    # After an overflow of the float16 scaled gradients the forward runs again:
    # a torch.Generator of the model's own drew new numbers there, and from
    # then on the student's noise ran one draw ahead of the teacher's.
    drawn = []

    class Noisy(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.a, self.b, self.tag = nn.Linear(16, 16), nn.Linear(16, 16), tag
            self.generator = torch.Generator().manual_seed(7)

        def forward(self, x):
            h = self.a(x)
            noise = torch.randn(h.shape, generator=self.generator).to(h.dtype)
            drawn.append((self.tag, noise))
            return self.b(torch.tanh(h + 0.1 * noise))

    torch.manual_seed(0)
    teacher = Noisy("teacher").half()
    model = copy.deepcopy(teacher)
    model.tag = "student"
    lx.compress_model(model, rank=3)
    x = torch.randn(8, 16).half()
    lx.distill(model, teacher, [x], steps=3, lr=1e-3,
               loss=lambda output, target: 50 * ((output.float() - target.float()) ** 2).sum())
    students = [noise for tag, noise in drawn[:-1] if tag == "student"]  # (the last: the check)
    assert len(students) > 3  # a step ran again
    expected, matched = None, []
    for tag, noise in drawn[:-1]:  # each student forward against the teacher's before it
        if tag == "teacher":
            expected = noise
        else:
            matched.append(torch.equal(noise, expected))
    assert all(matched)
