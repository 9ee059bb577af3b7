"""Edge cases every clipping mode must handle alike: empty batches, eval mode, and the layer
options Opacus' grad samplers get wrong (refused in clipping=per_sample)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpexp.accounting import Ledger
from dpexp.clipping import MODES, UnsupportedModelError, check_supported, clip_and_sum, make_engine
from dpexp.privacy.step import GradientStep
from tests import device, reference


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.GroupNorm(1, 3), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    ).double()  # fmt: skip


def batch(shape, n=4, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x * 2, torch.randint(0, classes, (n,), generator=g)


def empty_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, 2, 5, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)


# -- empty batches ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_clips_to_zeros(mode):
    model = conv_net()
    sums, norms = clip_and_sum(model, *empty_batch(), 1.0, mode=mode)
    assert set(sums) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(sums[name], torch.zeros_like(p)), name
    assert norms.shape == (0,) and norms.dtype == torch.float64


@pytest.mark.parametrize("mode", MODES)
def test_empty_poisson_batch_is_a_noised_and_accounted_step(mode):
    """An empty batch is a valid DP step: the clipped sum is zero, the update is the noise
    divided by the expected batch size, and the ledger counts the step."""
    model, sigma, clip, expected_batch = conv_net(), 1.3, 0.7, 8.0
    ledger = Ledger(delta=1e-5)
    step = GradientStep(
        model,
        engine=make_engine(mode, model),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        sample_rate=0.1,
        ledger=ledger,
        noise_generator=torch.Generator().manual_seed(7),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = {}

    def record_update():
        seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    with step.engine.attached_to_model():
        stats = step(empty_batch(), optimizer, record_update)
    same_noise = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():  # drawn in parameter order, as the step draws
        noise = torch.normal(0.0, sigma * clip, p.shape, generator=same_noise, dtype=p.dtype)
        assert torch.equal(seen[name], noise / expected_batch), name
    assert stats["batch_size"] == 0
    assert step.steps == 1
    assert ledger.history() == [(sigma, 0.1, 1)]


# -- eval mode ------------------------------------------------------------------------------
def assert_matches_brute_force(model, x, y, modes, clip=None):
    """Norms and clipped sums equal one backward per sample (float64, relative 1e-10; on the
    test device in the test dtype, tests/device.py); by default the bound lies between the
    norms, so some samples are clipped and some are not."""
    x, y = device.place(model, x, y)
    _, ref_norms = reference.clipped_sum(model, x, y, 1.0)
    clip = clip or float(ref_norms.median())
    ref_sums, _ = reference.clipped_sum(model, x, y, clip)
    for mode in modes:
        sums, norms = clip_and_sum(model, x, y, clip, mode=mode)
        torch.testing.assert_close(norms, ref_norms, rtol=device.rtol(1e-10), atol=0, msg=mode)
        for name, ref in ref_sums.items():
            torch.testing.assert_close(
                sums[name], ref, rtol=device.rtol(1e-10), atol=device.atol(1e-12, ref), msg=mode
            )


class Flat(nn.Module):
    """(B, C, H, W) → (B, C, H·W), for a Conv1d after a Conv2d."""

    def forward(self, x):
        return x.flatten(2)


def conv_linear_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Dropout(0.5), nn.GroupNorm(1, 3), Flat(),
        nn.Conv1d(3, 4, 5, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 4),
    ).double()  # fmt: skip


def test_every_mode_is_exact_in_eval_mode():
    model = conv_linear_net().eval()
    x, y = batch((2, 5, 5))
    assert_matches_brute_force(model, x, y, MODES)
    assert not any(m.training for m in model.modules())  # the mode is left as it was


class Scale(nn.Module):
    """A module type dpexp cannot know to compute the same function in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


def test_per_sample_refuses_an_unknown_module_type_in_eval_mode():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), Scale(), nn.Flatten(), nn.Linear(75, 4)
    ).double()
    x, y = batch((2, 5, 5))
    model.eval()
    with pytest.raises(UnsupportedModelError, match=r"'1' \(Scale\) is in eval mode.*functorch"):
        clip_and_sum(model, x, y, 1.0, mode="per_sample")
    assert not any(m.training for m in model.modules())
    assert_matches_brute_force(model, x, y, [m for m in MODES if m != "per_sample"])
    assert_matches_brute_force(model.train(), x, y, ["per_sample"])  # in training mode: fine


# -- layer options Opacus' grad samplers get wrong ------------------------------------------
def padded_conv(dims: int, padding_mode: str) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
    return nn.Sequential(
        conv(2, 3, 3, padding=1, padding_mode=padding_mode), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * 5**dims, 4),
    ).double()  # fmt: skip


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize("dims", [1, 2])
def test_per_sample_refuses_non_zero_padding_modes_the_others_are_exact(dims, padding_mode):
    model = padded_conv(dims, padding_mode)
    x, y = batch((2,) + (5,) * dims)
    expected = rf"module '0' \(Conv{dims}d\): padding_mode='{padding_mode}' .*functorch or auto"
    with pytest.raises(UnsupportedModelError, match=expected):
        check_supported(model, "per_sample")  # what validate calls: refused before training
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert_matches_brute_force(model, x, y, [m for m in MODES if m != "per_sample"])


def test_per_sample_keeps_a_frozen_padded_conv():
    """Opacus computes nothing for a frozen layer: the gradient only passes through it."""
    model = padded_conv(2, "reflect")
    model[0].requires_grad_(False)
    assert_matches_brute_force(model, *batch((2, 5, 5)), MODES)


class Tokens(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding, self.head = embedding, nn.Linear(embedding.embedding_dim, 4)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1).tanh())


def token_batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (4, 7), generator=g)
    tokens[:, :3] = torch.tensor([0, 3, 3])  # the padding index, and a repeated token
    return tokens, torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize(
    ("make", "data", "refusal", "exact"),
    [
        (lambda: Tokens(nn.Embedding(11, 6, padding_idx=0)), token_batch,
         r"'embedding' \(Embedding\): padding_idx=0 .*functorch or auto", ("functorch", "auto")),
        (lambda: Tokens(nn.Embedding(11, 6, scale_grad_by_freq=True)), token_batch,
         r"'embedding' \(Embedding\): scale_grad_by_freq=True .*functorch,", ("functorch",)),
        (lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4, bias=False), nn.Linear(4, 4)),
         lambda: batch((5,)), r"'1' \(LayerNorm\): bias=False .*functorch or auto",
         ("functorch", "auto")),
        (lambda: nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(),
            nn.Linear(2 * 27, 4)),
         lambda: batch((1, 3, 3, 3)), r"'0' \(Conv3d\): padding_mode='circular' .*functorch,",
         ("functorch",)),
    ],
    ids=["embedding_padding_idx", "embedding_scale_grad_by_freq", "layernorm_no_bias", "conv3d"],
)  # fmt: skip
def test_per_sample_refuses_other_options_opacus_gets_wrong(make, data, refusal, exact):
    model = make().double()
    with pytest.raises(UnsupportedModelError, match=refusal):
        check_supported(model, "per_sample")
    assert_matches_brute_force(model, *data(), exact)
