"""Edge cases every clipping mode must handle alike: empty batches, eval mode, and the layer
options Opacus' grad samplers get wrong (refused in clipping=per_sample)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpexp.accounting import Ledger
from dpexp.clipping import MODES, clip_and_sum, make_engine
from dpexp.privacy.step import GradientStep


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.GroupNorm(1, 3), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    ).double()  # fmt: skip


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
