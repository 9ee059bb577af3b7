"""Predictable noise (issue: privacy audit, item 5): reproducible noise is labelled as such;
``privacy.secure_noise=true`` draws its seeds from the OS CSPRNG and never stores them."""

from __future__ import annotations

import json

import pytest
import torch

from dpexp.accounting import Ledger
from dpexp.clipping import clip_and_sum, make_engine
from dpexp.methods.screen import Screen
from dpexp.models import CNNTanh
from dpexp.privacy.step import GradientStep
from dpexp.train import run, summary_line

REPRODUCIBLE = "reproducible from seed — not a private release"


def test_reproducible_noise_is_labelled_in_the_result_and_the_summary(tiny_cfg, tmp_path):
    result = run(tiny_cfg(), tmp_path / "run")
    assert result["noise"] == REPRODUCIBLE
    assert f"noise: {REPRODUCIBLE}" in summary_line(result)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["noise"] == REPRODUCIBLE


def released_update(seed: int, secure: bool, inputs, targets):
    torch.manual_seed(0)
    model = CNNTanh(image_shape=(1, 16, 16), num_classes=4)
    step = GradientStep(
        model, engine=make_engine("per_sample", model), noise_multiplier=1.0,
        max_grad_norm=0.1, expected_batch_size=4, sample_rate=0.5, ledger=Ledger(1e-5),
        noise_generator=torch.Generator().manual_seed(seed), secure_noise=secure,
    )  # fmt: skip
    with step.engine.attached_to_model():
        grads, _ = step.private_gradient(inputs, targets, None)
    return model, grads


def test_anyone_with_the_seed_can_subtract_reproducible_noise():
    """What the label warns of: with the noise seed (seed + 1, seed from result.json), the
    released update minus regenerated noise is the clipped gradient of the batch."""
    x, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    model, released = released_update(1, secure=False, inputs=x, targets=y)
    attacker = torch.Generator().manual_seed(1)
    clipped, _ = clip_and_sum(model, x, y, 0.1, mode="per_sample")
    for name, p in model.named_parameters():
        noise = torch.normal(0.0, 0.1, p.shape, generator=attacker)
        torch.testing.assert_close(released[name] * 4 - noise, clipped[name])


def test_secure_noise_has_the_right_distribution_and_defeats_regeneration():
    step = GradientStep(torch.nn.Linear(1, 1), secure_noise=True,
                        noise_generator=torch.Generator().manual_seed(3))  # fmt: skip
    draws = step.gaussian(2.0, torch.empty(400_000, dtype=torch.float64))
    assert abs(float(draws.mean())) < 0.02
    assert float(draws.std()) == pytest.approx(2.0, rel=0.01)
    plain = torch.normal(0.0, 2.0, (400_000,), generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)  # fmt: skip
    assert not torch.allclose(draws, plain)


def test_secure_runs_draw_fresh_seeds_and_store_none(tiny_cfg, tmp_path):
    cfg = ("privacy.secure_noise=true", "callbacks.ema=null")
    a = run(tiny_cfg(*cfg, output_dir=tmp_path / "a"), tmp_path / "a")
    b = run(tiny_cfg(*cfg, output_dir=tmp_path / "b"), tmp_path / "b")
    assert a["noise"].startswith("secure") and a["seed"] == b["seed"] == 0
    assert a["test_loss"] != b["test_loss"]  # same seed, other noise and batches
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["callbacks"]["PrivacyCallback"]["noise_generator"] is None
    assert ckpt["DataModule"]["sampler_generator"] is None
    reproducible = run(tiny_cfg("callbacks.ema=null", output_dir=tmp_path / "c"), tmp_path / "c")
    again = run(tiny_cfg("callbacks.ema=null", output_dir=tmp_path / "d"), tmp_path / "d")
    assert reproducible["test_loss"] == again["test_loss"]  # the research default


def test_secure_noise_reseeds_the_private_validation_test_of_screen():
    screen = Screen(validation="private_noisy", seed=0)
    reference = Screen(validation="private_noisy", seed=0)
    screen.use_secret_seed(12345)
    assert screen.state_dict()["generator"] is None
    draw = torch.rand(3, generator=screen.generator)
    assert not torch.equal(draw, torch.rand(3, generator=reference.generator))
