"""Parameters that escape their own module's forward (issue: privacy audit, item 1).

Every trainable parameter's per-sample contribution is computed exactly (counted in the norm
and in the sum), or the model is refused before training with the parameter named.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpexp.clipping import MODES, UnsupportedModelError, check_supported, clip_and_sum
from dpexp.clipping.trace import trace_uses
from dpexp.models import make_dp_compatible
from tests import device, reference

EXACT_MODES = tuple(m for m in MODES if m != "per_sample")


def assert_exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, modes=EXACT_MODES) -> None:
    """Every mode's norms and clipped sums equal one backward per sample (float64, 1e-9; on
    the test device in the test dtype, tests/device.py), with the clipping bound between
    the norms."""
    x, y = device.place(model, x, y)
    tol = device.rtol(1e-9)
    _, norms = reference.clipped_sum(model, x, y, 1e9)
    clip = float(norms.median())
    ref_sums, ref_norms = reference.clipped_sum(model, x, y, clip)
    for mode in modes:
        sums, got = clip_and_sum(model, x, y, clip, mode=mode)
        torch.testing.assert_close(got, ref_norms, rtol=tol, atol=0, msg=mode)
        for name, ref in ref_sums.items():
            err = float(
                (sums[name] - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny)
            )
            assert err <= tol, f"{mode}: {name} relative error {err:.2e}"


def scrambled(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn from N(0, 0.3²): no parameter's gradient is negligible, so a
    missed one shows in the norms (timm initialises some at 0 or 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


class FusedQKV(nn.Module):
    """BEiT's attention input projection: the Linear's weight with a bias assembled from
    separate parameters, through F.linear, so ``qkv.forward`` never runs."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(3 * dim, dim)

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return self.proj(F.linear(x, self.qkv.weight, bias).tanh())


def bypass_net() -> nn.Module:
    return scrambled(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), FusedQKV(), nn.Linear(6, 3)))


def test_a_weight_read_outside_its_module_is_exact_in_every_fast_mode():
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    assert_exact(bypass_net(), x, y)


def test_the_trace_finds_the_escape_and_its_enclosing_module():
    model = bypass_net()
    trace = trace_uses(model, torch.randn(4, 5))
    assert trace.uses["2.qkv.weight"] == [("", "2")] * 2  # both traced batch sizes
    assert trace.home("2.qkv.weight") == "2"
    assert trace.used_only_in("3.weight", "3", directly=True)


def test_hook_based_per_sample_refuses_an_escaped_weight_by_name():
    with pytest.raises(UnsupportedModelError, match=r"2\.qkv\.weight is used outside"):
        clip_and_sum(bypass_net(), torch.randn(4, 5), torch.tensor([0, 1, 2, 0]), 1.0)


class TiedHead(nn.Module):
    """A language-model-style head: the output layer reuses the input layer's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 4)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(self.encode(x).tanh())


def test_tied_weights_are_exact_in_every_fast_mode():
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert_exact(scrambled(TiedHead()), x, y)


def test_tied_weights_are_refused_by_the_hook_based_mode():
    with pytest.raises(UnsupportedModelError, match=r"decode\.weight is tied to encode\.weight"):
        check_supported(TiedHead(), "per_sample", torch.randn(3, 4), 4)


class Windows(nn.Module):
    """Swin's layout: attention over windows (rows = samples × windows), plus a position
    bias from an MLP on a table that every sample shares."""

    def __init__(self, dim: int = 4, windows: int = 3) -> None:
        super().__init__()
        self.windows = windows
        self.attn = nn.Linear(dim, dim)
        self.bias_mlp = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, dim))
        self.register_buffer("table", torch.randn(windows, 2))

    def forward(self, x):  # B × (windows·dim)
        rows = x.reshape(len(x) * self.windows, -1)
        out = self.attn(rows).reshape(len(x), self.windows, -1) + self.bias_mlp(self.table)
        return out.flatten(1)


def windows_net() -> nn.Module:
    return scrambled(nn.Sequential(Windows(), nn.Tanh(), nn.Linear(12, 3)))


def test_layers_applied_to_rows_that_are_not_samples_are_exact():
    x, y = torch.randn(5, 12), torch.tensor([0, 1, 2, 0, 1])
    assert_exact(windows_net(), x, y)


def test_hook_based_per_sample_refuses_layers_on_rows_that_are_not_samples():
    with pytest.raises(UnsupportedModelError, match=r"runs on rows that are not samples"):
        check_supported(windows_net(), "per_sample", torch.randn(3, 12), 3)


def test_a_layer_called_on_other_rows_than_traced_is_refused_at_the_step():
    """The plan holds for the traced forward; a later forward that changes the layout is
    caught when the layer is recorded, not summed wrongly."""

    class Switch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.split = False

        def forward(self, x):
            if self.split:
                return self.fc(x.reshape(-1, 2)).reshape(len(x), -1)
            return self.fc(x[:, :2]).repeat(1, 2)

    model = Switch()
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    clip_and_sum(model, x, y, 1.0, mode="bk")
    from dpexp.clipping import make_engine

    engine = make_engine("bk", model)
    with engine.attached_to_model():
        engine.clipped_sum(x, y, 1.0)
        model.split = True
        with pytest.raises(UnsupportedModelError, match=r"'fc' \(Linear\): called on 8 rows"):
            engine.clipped_sum(x, y, 1.0)


TIMM = {
    "beit": ("beit_base_patch16_224", {"patch_size": 4, "embed_dim": 16, "depth": 1}),
    "eva02": ("eva02_tiny_patch14_224", {"patch_size": 4, "embed_dim": 16, "depth": 1}),
    "swinv2": (
        "swinv2_tiny_window8_256",
        {"patch_size": 2, "embed_dim": 8, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4},
    ),
}


def timm_model(family: str, **extra) -> nn.Module:
    import timm

    name, kwargs = TIMM[family]
    kwargs = {"num_heads": 2, **kwargs, "img_size": 16, "num_classes": 3, **extra}
    return make_dp_compatible(timm.create_model(name, pretrained=False, **kwargs))


@pytest.mark.parametrize("family", sorted(TIMM))
def test_real_timm_models_are_exact_in_every_fast_mode_and_refused_by_hooks(family):
    model = scrambled(timm_model(family, drop_path_rate=0.0))
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    assert_exact(model, x, y)
    with pytest.raises(UnsupportedModelError, match="Opacus"):
        check_supported(model, "per_sample", device.place(model, x), 3)


def test_swin_with_drop_path_is_checked_with_drop_path_on():
    """timm's default drop-path rate: the fast modes pass the start-of-run check only if
    their paths work with it on (the probe switches it off for the comparison)."""
    model = timm_model("swinv2")
    for mode in EXACT_MODES:
        check_supported(model, mode, torch.randn(3, 3, 16, 16), 3)
