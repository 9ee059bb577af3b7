"""Every clipping mode against the brute-force reference (one backward per sample), float64."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from dpexp.clipping import ENGINES, MODES, clip_and_sum, fast, make_engine
from dpexp.clipping.fast import BookKeepingEngine
from dpexp.clipping.layers import ConvMath, Dims, instantiation_fits, mixed_rule
from dpexp.clipping.tape import UnsupportedModelError
from dpexp.models import build_model
from tests import reference

FAST = ("bk", "auto", "mixed_ghost", "ghost")
CLIP = 1.0  # where exactness does not depend on the bound


def assert_exact(model, x, y, modes=MODES, weights=None):
    """Norms and clipped sums of ``modes`` equal the brute force within 1e-6 (relative).

    The clipping bound lies between the norms, so some samples are clipped and some are not.
    """
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    _, ref_norms = reference.clipped_sum(model, x, y, 1.0, weights)
    low, high = ref_norms.sort().values[len(ref_norms) // 2 - 1 : len(ref_norms) // 2 + 1]
    clip = float(low + high) / 2
    ref_sums, _ = reference.clipped_sum(model, x, y, clip, weights)
    for mode in modes:
        sums, norms = clip_and_sum(model, x, y, clip, mode=mode, weights=weights)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0, msg=mode)
        assert set(sums) == set(ref_sums), mode
        for name, ref in ref_sums.items():
            err = (sums[name] - ref).norm() / ref.norm().clamp_min(1e-300)
            assert err <= 1e-6, f"{mode}: {name} relative error {err:.2e}"
        assert all(p.grad is None for p in model.parameters()), mode
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), mode


def batch(shape, n=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * 2, torch.randint(0, classes, (n,), generator=g)


def test_cnn_tanh_all_modes():
    assert_exact(build_model("cnn_tanh", (1, 28, 28)), *batch((1, 28, 28)))


def test_grouped_depthwise_conv_with_stride_dilation_and_padding_modes():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, groups=6, dilation=2, padding=2),
        nn.Tanh(),
        nn.Conv2d(6, 4, 3, groups=2, stride=(1, 2), padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(4 * 5 * 3, 5),
    )
    # Opacus' hooks mishandle non-zero padding modes: the fast modes and torch.func only
    assert_exact(model, *batch((3, 9, 9), classes=5), modes=(*FAST, "functorch"))


def test_conv1d_with_same_and_valid_padding():
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding="valid"),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 9, 3),
    )
    assert_exact(model, *batch((2, 20), classes=3))


def test_mlp():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    assert_exact(model, *batch((3, 4), classes=3))


def test_resnet_gn():
    model = build_model("resnet_gn", (3, 8, 8), groups=4)
    assert_exact(model, *batch((3, 8, 8), n=3), modes=(*FAST, "functorch"))


def tiny_vit() -> nn.Module:
    return build_model(
        "timm", (3, 16, 16), model_name="vit_tiny_patch16_224", patch_size=4, depth=2,
        embed_dim=24, num_heads=2,
    )  # fmt: skip


def test_timm_vit_with_cls_token_pos_embed_and_timm_layernorm():
    model = tiny_vit()
    x, y = batch((3, 16, 16), n=3)
    assert_exact(model, x, y, modes=(*FAST, "functorch"))
    engine = make_engine("bk", model)  # the model is now float64
    with engine.attached_to_model():
        engine.clipped_sum(x.double(), y, CLIP)
        expanded = {n for b in engine.tape.broadcasts for n in b.params.values()}
        generic = [layer.name for layer in engine.tape.layers if layer.math is None]
    assert expanded == {"cls_token", "pos_embed"}  # the cheap path passed its probe
    assert generic == []  # timm's LayerNorm computes nn.LayerNorm's function: fast path


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).tanh().mean(1))


def test_embedding_with_padding_idx():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (4, 7), generator=g)
    # Opacus' embedding sampler ignores padding_idx: the fast modes and torch.func only
    assert_exact(TokenModel(), tokens, torch.tensor([0, 1, 2, 1]), (*FAST, "functorch"))


def in_place_net() -> nn.Module:
    """torchvision's BasicBlock as is: ``out += identity`` and ReLU(inplace=True)."""
    norm = lambda c: nn.GroupNorm(2, c)  # noqa: E731
    block = BasicBlock(4, 4, norm_layer=norm)
    assert block.relu.inplace
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), block,
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def test_in_place_ops_are_tolerated():
    assert_exact(in_place_net(), *batch((3, 8, 8)), modes=(*FAST, "functorch"))


def test_coordinate_weights_are_honoured():
    model = build_model("cnn_tanh", (1, 28, 28)).double()
    names = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    weights = {
        n: (torch.rand(names[n].shape, generator=g) > 0.5).double()
        for n in ("features.0.weight", "features.3.weight", "classifier.1.bias")
    }
    weights["classifier.3.weight"] = torch.rand(names["classifier.3.weight"].shape, generator=g)
    assert_exact(model, *batch((1, 28, 28)), weights=weights)


def test_frozen_parameters_cost_nothing():
    model = build_model("cnn_tanh", (1, 28, 28))
    model.features[0].requires_grad_(False)
    model.classifier[1].weight.requires_grad_(False)
    assert_exact(model, *batch((1, 28, 28)), modes=FAST)
    engine = make_engine("bk", model)
    with engine.attached_to_model():
        modules = {layer.name: set(layer.params) for layer in engine.tape.layers}
    assert "features.0" not in modules  # no hook, no work
    assert modules["classifier.1"] == {"bias"}


class Scale(nn.Module):
    """An unknown module type with a raw parameter: torch.func covers it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class MixingToken(nn.Module):
    """A leading-1 parameter used in a way that mixes rows once expanded (rolled over the
    batch): the probe must hand it to torch.func, whose per-sample result is exact."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.linspace(-1, 1, dim).view(1, dim))

    def forward(self, x):
        return x + torch.roll(self.token.expand(len(x), -1), 1, 0)


def test_unknown_modules_fall_back_to_torch_func_exactly(caplog):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), Scale(3), nn.Conv3d(1, 1, 1).requires_grad_(False), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5), MixingToken(5), nn.Tanh(), nn.Linear(5, 3),
    )  # fmt: skip
    model[2] = nn.Identity()
    with caplog.at_level(logging.WARNING):
        assert_exact(model, *batch((2, 6, 6), classes=3), modes=FAST)
    assert "mix samples" in caplog.text


def test_layernorm_subclass_with_other_semantics_is_not_taken_for_layernorm():
    from timm.layers import LayerNorm2d

    model = nn.Sequential(nn.Conv2d(2, 4, 3), LayerNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x, y = batch((2, 6, 6), classes=3)
    assert_exact(model, x, y, modes=FAST)
    engine = make_engine("bk", model)  # the model is now float64
    with engine.attached_to_model():
        engine.clipped_sum(x.double(), y, CLIP)
        assert [layer.name for layer in engine.tape.layers if layer.math is None] == ["1"]


def test_unsupported_embedding_options_are_refused():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True))
    with pytest.raises(UnsupportedModelError, match=r"'0' \(Embedding\).*scale_grad_by_freq"):
        make_engine("auto", model).attach()


@pytest.mark.parametrize(
    "path", ["ghost", "unfold", "conv", "loop", "norm:unfold", "norm:conv", "norm:loop"]
)
def test_every_conv_path_is_exact(path, monkeypatch):
    class Forced(BookKeepingEngine):
        mode = "forced"

        def choose(self, layer, local, x, g):
            if isinstance(layer.module, nn.modules.conv._ConvNd) and local == "weight":
                return path
            return super().choose(layer, local, x, g)

    monkeypatch.setitem(ENGINES, "forced", Forced)
    grouped = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(6, 6, 3, groups=6, dilation=2, padding=2), nn.Tanh(),
        nn.Conv2d(6, 4, 3, groups=2, stride=(1, 2), padding=1, padding_mode="reflect"),
        nn.Flatten(), nn.Linear(4 * 5 * 3, 5),
    )  # fmt: skip
    one_d = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=2), nn.Flatten(),
        nn.Linear(4 * 10, 3),
    )  # fmt: skip
    assert_exact(grouped, *batch((3, 9, 9), classes=5), modes=("forced",))
    assert_exact(one_d, *batch((2, 20), classes=3), modes=("forced",))


def test_auto_keeps_per_sample_gradients_only_where_smaller_than_input_and_output_gradient(
    monkeypatch,
):
    """Memory: a kept per-sample weight gradient must not outweigh the layer's x and g,
    which the ghost and norm-only paths keep instead until the clipped sum; even when
    keeping would be the fastest."""

    def keep_is_fastest(layer, local, x, g, path):
        return 1.0 if path == "ghost" or path.startswith(fast.NORM_ONLY) else 0.0

    monkeypatch.setattr(fast, "_time_path", keep_is_fastest)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(),  # per-sample 36 ≤ x 36 + g 144: may keep
        nn.Conv2d(4, 32, 3), nn.Tanh(),  # per-sample 1152 > x 144 + g 512: must not keep
        nn.Flatten(), nn.Linear(32 * 16, 3),
    )  # fmt: skip
    x, y = batch((1, 6, 6), classes=3)
    engine = make_engine("auto", model.double())
    with engine.attached_to_model():
        engine.clipped_sum(x.double(), y, max_grad_norm=1.0)
    choice = {name: c for (name, local, _), c in engine._decisions.items() if local == "weight"}
    assert choice["0"] in ConvMath.methods  # kept: the fastest and no larger than x and g
    assert choice["2"] == "ghost" or choice["2"].startswith(fast.NORM_ONLY), choice
    assert_exact(model, *batch((1, 6, 6), classes=3), modes=("auto",))


# -- layer rule ---------------------------------------------------------------------------
def test_mixed_rule_boundary():
    assert mixed_rule(Dims(T=4, p=4, D=8))  # 2·16 = 32 ≤ 32
    assert not mixed_rule(Dims(T=4, p=3, D=10))  # 32 > 30
    assert not instantiation_fits(Dims(T=16, p=512, D=4608))  # ResNet layer4: ghost only
    assert instantiation_fits(Dims(T=1024, p=64, D=576))  # ResNet layer1


def test_cnn_tanh_takes_both_branches_and_logs_each_decision_once(caplog):
    model = build_model("cnn_tanh", (1, 28, 28))
    x, y = batch((1, 28, 28))
    engine = make_engine("mixed_ghost", model)
    with caplog.at_level(logging.DEBUG, logger="dpexp.clipping.fast"), engine.attached_to_model():
        engine.clipped_sum(x, y, CLIP)
        engine.clipped_sum(x, y, CLIP)
    decisions = {k[:2]: v for k, v in engine._decisions.items()}
    assert [(e["layer"], e["parameter"]) for e in engine.plan] == list(decisions)
    # conv1: T = 13² = 169, p·D = 16·64 → instantiate; conv2: T = 25, p·D = 32·256 → ghost
    assert decisions[("features.0", "weight")] == "conv"
    assert decisions[("features.3", "weight")] == "ghost"
    assert caplog.text.count("'features.0' (Conv2d) weight") == 1


def test_decisions_are_per_input_shape():
    model = nn.Sequential(nn.Linear(8, 2))  # p·D = 16: ghost iff 2T² ≤ 16, i.e. T ≤ 2

    def token_mean_loss(out, y):
        return F.cross_entropy(out.mean(1), y, reduction="sum")

    engine = make_engine("bk", model, token_mean_loss)
    with engine.attached_to_model():
        for tokens in (2, 9):
            engine.clipped_sum(torch.randn(3, tokens, 8), torch.tensor([0, 1, 1]), CLIP)
    got = {k[2]: v for k, v in engine._decisions.items() if k[1] == "weight"}
    assert got == {(2, 8): "ghost", (9, 8): "default"}


def test_input_modified_in_place_after_forward_is_refused():
    class Clobber(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = torch.tanh(x)
            out = self.fc(h)
            h.mul_(2)  # the recorded input of fc is no longer what fc saw
            return out

    engine = make_engine("bk", Clobber())
    with engine.attached_to_model(), pytest.raises(UnsupportedModelError, match="in place"):
        engine.clipped_sum(torch.randn(2, 3), torch.tensor([0, 1]), CLIP)


def test_summed_loss_is_returned():
    model = build_model("cnn_tanh", (1, 28, 28))
    x, y = batch((1, 28, 28))
    expected = F.cross_entropy(model(x), y, reduction="sum")
    for mode in FAST:
        engine = make_engine(mode, model)
        with engine.attached_to_model():
            _, _, loss = engine.clipped_sum(x, y, CLIP)
        torch.testing.assert_close(loss, expected.detach())


def test_decisions_survive_reattach_until_trainable_parameters_change():
    model = build_model("cnn_tanh", (1, 28, 28))
    x, y = batch((1, 28, 28))
    engine = make_engine("auto", model)
    with engine.attached_to_model():
        engine.clipped_sum(x, y, CLIP)
    decided = dict(engine._decisions)
    with engine.attached_to_model():
        assert engine._decisions == decided  # timed once, not per attach
    model.features[0].requires_grad_(False)
    with engine.attached_to_model():
        assert engine._decisions == {} and "features.0" not in {
            layer.name for layer in engine.tape.layers
        }
    assert_exact(model, x, y, modes=("auto",))


def test_parameters_unfrozen_while_attached_are_not_dropped():
    model = build_model("cnn_tanh", (1, 28, 28)).double()
    x, y = batch((1, 28, 28))
    model.features[0].requires_grad_(False)
    engine = make_engine("bk", model)
    with engine.attached_to_model():
        engine.clipped_sum(x.double(), y, CLIP)
        model.features[0].requires_grad_(True)  # e.g. a method unfreezing a layer
        sums, _, _ = engine.clipped_sum(x.double(), y, 1e6)  # nothing clipped
    ref = reference.per_sample_gradients(model, x.double(), y)
    torch.testing.assert_close(sums["features.0.weight"], ref["features.0.weight"].sum(0))


@pytest.mark.parametrize("mode", MODES)
def test_a_step_keeps_nothing_alive(mode):
    """No graph or layer input outlives the step: a leak of one batch per step fills the
    memory within an epoch (seen as 23 GB after 20 MNIST epochs)."""
    import gc
    import weakref

    model = build_model("scatternet", (1, 16, 16))  # a lowest layer fed by a parameter-free one
    inputs = []
    model.features[1].register_forward_hook(lambda m, a, out: inputs.append(weakref.ref(a[0])))
    x, y = batch((81, 4, 4), n=8)
    clip_and_sum(model, x, y, CLIP, mode=mode)
    gc.collect()
    assert inputs and all(ref() is None for ref in inputs), mode
