"""The DP step against brute force: clipping, noise, physical batches, Poisson sampling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats
from torch import nn

from dpexp.accounting import Ledger
from dpexp.clipping import clip_and_sum, make_engine
from dpexp.data import PoissonBatchSampler
from dpexp.models import CNNTanh
from dpexp.privacy.step import GradientStep
from tests import reference

MODES = ("per_sample", "functorch")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3))


def small_models():
    torch.manual_seed(0)
    return {
        "mlp": (mlp().double(), torch.randn(6, 3, 2, 2, dtype=torch.float64), 3),
        "cnn_tanh": (
            CNNTanh(image_shape=(1, 16, 16), num_classes=4).double(),
            torch.randn(5, 1, 16, 16, dtype=torch.float64),
            4,
        ),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "cnn_tanh"])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3])  # every sample clipped / none clipped
def test_clip_and_sum_matches_brute_force(mode, name, max_grad_norm):
    model, x, classes = small_models()[name]
    y = torch.arange(len(x)) % classes
    grads, norms = clip_and_sum(model, x, y, max_grad_norm, mode=mode)
    ref_grads, ref_norms = reference.clipped_sum(model, x, y, max_grad_norm)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)
    assert set(grads) == {n for n, p in model.named_parameters()}
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-9, atol=1e-15)
    # each clipped per-sample gradient has norm ≤ C, so the sum has norm ≤ B·C
    total = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert total <= len(x) * max_grad_norm * (1 + 1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_clip_and_sum_leaves_model_untouched(mode):
    model, x, _ = small_models()["mlp"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    hooks_before = [len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()]
    clip_and_sum(model, x, torch.zeros(len(x), dtype=torch.long), 1.0, mode=mode)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert [len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()] == hooks_before
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_are_not_clipped_or_returned(mode):
    model, x, _ = small_models()["mlp"]
    model[1].weight.requires_grad_(False)
    y = torch.zeros(len(x), dtype=torch.long)
    grads, norms = clip_and_sum(model, x, y, 0.01, mode=mode)
    ref, ref_norms = reference.clipped_sum(model, x, y, 0.01)
    assert "1.weight" not in grads
    torch.testing.assert_close(norms, ref_norms)
    torch.testing.assert_close(grads["3.weight"], ref["3.weight"])


def make_step(model, sigma, C, B, physical=None, seed=0, mode="per_sample"):
    engine = make_engine(mode, model)
    engine.attach()
    return GradientStep(
        model,
        engine=engine,
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=B,
        sample_rate=0.1,
        physical_batch_size=physical,
        ledger=Ledger(1e-5, "rdp"),
        noise_generator=torch.Generator().manual_seed(seed),
    )


class RecordingSGD(torch.optim.SGD):
    """Plain SGD(lr=1) that remembers the gradient it applied."""

    def __init__(self, params):
        super().__init__(params, lr=1.0)
        self.applied = None

    def step(self, closure=None):
        self.applied = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def test_update_is_clipped_sum_plus_noise_over_expected_batch():
    model, x, _ = small_models()["mlp"]
    y = torch.arange(len(x)) % 3
    sigma, C, B = 0.7, 0.05, 8.0
    ref, _ = reference.clipped_sum(model, x, y, C)
    step = make_step(model, sigma, C, B, seed=3)
    opt = RecordingSGD(model.parameters())
    step((x, y), opt)
    # the same generator reproduces the noise, drawn once per parameter, in parameter order
    g = torch.Generator().manual_seed(3)
    for (n, p), applied in zip(model.named_parameters(), opt.applied, strict=True):
        noise = torch.normal(0.0, sigma * C, p.shape, generator=g, dtype=p.dtype)
        torch.testing.assert_close(applied, (ref[n] + noise) / B)
    assert step.ledger.history() == [(sigma, 0.1, 1)]


def test_physical_batches_give_the_same_update():
    model, x, _ = small_models()["cnn_tanh"]
    y = torch.arange(len(x)) % 4
    updates = []
    for physical in (None, 2, 1):
        m = small_models()["cnn_tanh"][0]
        m.load_state_dict(model.state_dict())
        opt = RecordingSGD(m.parameters())
        make_step(m, 1.1, 0.1, 5, physical=physical, seed=9)((x, y), opt)
        updates.append(opt.applied)
    for other in updates[1:]:
        for a, b in zip(updates[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_noise_std_is_sigma_c_and_added_once_per_logical_batch():
    """With every per-sample gradient zero, the update is pure noise: std σC/B, whatever the
    number of physical chunks (noise is drawn once per logical batch, not per chunk)."""
    # zero input ⇒ zero per-sample gradients
    x, y = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    sigma, C, B = 1.3, 0.5, 4.0
    for physical in (None, 1):
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 500, bias=False)).double()
        opt = RecordingSGD(model.parameters())
        make_step(model, sigma, C, B, physical=physical, seed=1)((x, y), opt)
        sample = opt.applied[0].flatten() * B
        assert sample.std().item() == pytest.approx(sigma * C, rel=0.05)
        assert abs(sample.mean().item()) < 4 * sigma * C / math.sqrt(sample.numel())


def test_empty_batch_still_adds_noise_and_is_accounted():
    model, x, _ = small_models()["mlp"]
    step = make_step(model, 1.0, 1.0, 4.0)
    opt = RecordingSGD(model.parameters())
    stats_ = step((x[:0], torch.zeros(0, dtype=torch.long)), opt)
    assert stats_["batch_size"] == 0
    assert all(g.abs().sum() > 0 for g in opt.applied)
    assert step.ledger.history() == [(1.0, 0.1, 1)]


def test_budget_stop_refuses_the_step_that_would_exceed_it():
    model, x, _ = small_models()["mlp"]
    step = make_step(model, 1.0, 1.0, 4.0)
    step.max_steps = 2
    opt = RecordingSGD(model.parameters())
    y = torch.zeros(len(x), dtype=torch.long)
    assert step((x, y), opt) is not None and step((x, y), opt) is not None
    before = [p.clone() for p in model.parameters()]
    assert step((x, y), opt) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert step.ledger.history() == [(1.0, 0.1, 2)]


def test_poisson_batch_sizes_are_binomial():
    n, q, steps = 1000, 0.03, 400
    sampler = PoissonBatchSampler(n, q, steps, torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == steps
    sizes = torch.tensor([len(b) for b in batches]).numpy()
    # Kolmogorov–Smirnov-style check on a discrete law: compare the first two moments and
    # run a chi-square goodness-of-fit test on binned counts.
    assert sizes.mean() == pytest.approx(n * q, rel=0.05)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.2)
    edges = [0, 24, 27, 30, 33, 36, 1001]
    bins = list(itertools.pairwise(edges))
    observed = [((sizes >= lo) & (sizes < hi)).sum() for lo, hi in bins]
    cdf = stats.binom(n, q).cdf
    expected = [steps * (cdf(hi - 1) - cdf(lo - 1)) for lo, hi in bins]
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # membership is independent across examples: every example appears ~q·steps times
    counts = torch.bincount(torch.cat(batches), minlength=n).float()
    assert counts.mean().item() == pytest.approx(q * steps, rel=0.05)
    assert all(len(torch.unique(b)) == len(b) for b in batches)  # no duplicates in a batch
