"""method=freeze: masks chosen from public information only, frozen coordinates that never
move, clipping/noise restricted to kept coordinates, checked against brute force."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch import nn

from dpexp import accounting
from dpexp.accounting import Ledger
from dpexp.clipping import MODES, make_engine
from dpexp.data import DataModule, TensorData
from dpexp.errors import ConfigError
from dpexp.methods.freeze import MASKS_FILE, Freeze
from dpexp.methods.masks import keep_count, public_gradient_scores, top_fraction
from dpexp.models import CNNTanh
from dpexp.pretrain import pretrain
from dpexp.privacy.step import GradientStep, merge_weights
from dpexp.train import run
from dpexp.validate import validate
from tests import reference

SHAPE = (1, 16, 16)


def tiny_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return CNNTanh(SHAPE, num_classes=4).to(dtype)


def batch(n: int = 8, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def dp_step(model, methods, mode="per_sample", sigma=1.0, clip=0.1, batch_size=8.0):
    engine = make_engine(mode, model)
    engine.attach()
    return GradientStep(
        model,
        methods,
        engine=engine,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch_size,
        sample_rate=0.25,
        ledger=Ledger(1e-3, "prv"),
        noise_generator=torch.Generator().manual_seed(3),
    )


OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.1),
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
}


def train_steps(model, methods, optimizer_name: str, steps: int = 5, **step_kwargs):
    step = dp_step(model, methods, **step_kwargs)
    optimizer = OPTIMIZERS[optimizer_name]([p for p in model.parameters() if p.requires_grad])
    for i in range(steps):
        step(batch(seed=10 + i), optimizer)
    step.engine.detach()
    return optimizer


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("frozen_value", ["keep", "zero"])
@pytest.mark.parametrize("prune_all", [False, True])
def test_frozen_coordinates_are_bit_identical_after_training(
    optimizer_name, frozen_value, prune_all
):
    model = tiny_model()
    freeze = Freeze(rate=0.6, scorer="random", frozen_value=frozen_value, prune_all=prune_all)
    freeze.setup_method(model, None)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, [freeze], optimizer_name)
    for n, p in model.named_parameters():
        if n not in freeze.masks:
            assert not torch.equal(p, start[n]), f"{n} (never masked) should train"
            continue
        frozen = freeze.masks[n] == 0
        assert torch.equal(p[frozen], start[n][frozen]), f"{n}: a frozen coordinate moved"
        if frozen_value == "zero":
            assert (p[frozen] == 0).all()
        assert (p[~frozen] != start[n][~frozen]).float().mean() > 0.9, f"{n}: kept must train"
    assert prune_all == ("classifier.3.bias" in freeze.masks)


def test_masks_keep_the_highest_scores_layerwise_and_globally():
    scores = {"a": torch.arange(10.0), "b": torch.arange(100.0, 90.0, -1).view(2, 5)}
    layer = top_fraction(scores, 0.7, "layerwise")
    assert layer["a"].tolist() == [0] * 7 + [1] * 3
    assert layer["b"].flatten().tolist() == [1] * 3 + [0] * 7
    glob = top_fraction(scores, 0.7, "global")  # 6 of 20 kept: all from "b"
    assert glob["a"].sum() == 0 and glob["b"].flatten().tolist() == [1] * 6 + [0] * 4
    assert keep_count(320, 0.95) == 16 and keep_count(10, 0.0) == 10


def test_magnitude_scorer_keeps_largest_starting_weights_and_biases_are_never_pruned():
    model = tiny_model()
    freeze = Freeze(rate=0.8, scorer="magnitude", frozen_value="keep")
    weights_before = {n: p.detach().abs().clone() for n, p in model.named_parameters()}
    freeze.setup_method(model, None)
    assert set(freeze.masks) == {n for n, p in model.named_parameters() if p.dim() > 1}
    for n, mask in freeze.masks.items():
        kept, dropped = weights_before[n][mask == 1], weights_before[n][mask == 0]
        assert len(kept) == keep_count(mask.numel(), 0.8)
        assert kept.min() >= dropped.max()


def test_tensor_with_nothing_left_stops_requiring_grad_and_training_still_runs():
    model = tiny_model()
    with torch.no_grad():
        model.classifier[1].weight.mul_(1e-6)  # globally the smallest: pruned entirely
    freeze = Freeze(rate=0.5, scorer="magnitude", scope="global")
    freeze.setup_method(model, None)
    assert freeze.frozen_parameters == ["classifier.1.weight"]
    assert not model.classifier[1].weight.requires_grad
    assert model.classifier[1].bias.requires_grad
    train_steps(model, [freeze], "sgd_momentum_wd", steps=2)
    assert (model.classifier[1].weight == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_clipped_sum_equals_brute_force_over_kept_coordinates(mode):
    model = tiny_model(torch.float64)
    freeze = Freeze(rate=0.7, scorer="random", frozen_value="keep")
    freeze.setup_method(model, None)
    weights = merge_weights([freeze], 0)
    x, y = batch(dtype=torch.float64)
    clip = 0.05  # small enough that every sample is clipped
    engine = make_engine(mode, model)
    with engine.attached_to_model():
        sums, norms, _ = engine.clipped_sum(x, y, clip, weights)
    ref_sums, ref_norms = reference.clipped_sum(model, x, y, clip, weights)
    assert (ref_norms > clip).all()
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    assert sums.keys() == ref_sums.keys()
    for n in sums:
        torch.testing.assert_close(sums[n], ref_sums[n], rtol=1e-10, atol=1e-12)
        if n in weights:
            assert (sums[n][weights[n] == 0] == 0).all()


def noise_of_step(model, methods, sigma: float, clip: float):
    """The noise GradientStep added (its update × B minus the brute-force clipped sum)."""
    x, y = batch(dtype=torch.float64)
    step = dp_step(model, methods, sigma=sigma, clip=clip, batch_size=len(y))
    weights = merge_weights(methods, 0)
    grads, _ = step.private_gradient(x, y, weights)
    step.engine.detach()
    ref, _ = reference.clipped_sum(model, x, y, clip, weights)
    return {n: grads[n] * len(y) - ref[n] for n in grads}, weights


def assert_noise_only_where_weighted(noise, weights, sigma, clip):
    on = torch.cat([noise[n][weights[n] != 0] for n in weights])
    off = torch.cat([noise[n][weights[n] == 0] for n in weights])
    assert len(off) > 1000 and (off == 0).all()  # exactly zero, not merely small
    assert len(on) > 1000
    assert on.std().item() == pytest.approx(sigma * clip, rel=0.08)
    assert abs(on.mean().item()) < 4 * sigma * clip / math.sqrt(len(on))


def test_noise_has_std_sigma_c_on_kept_coordinates_and_is_zero_on_frozen():
    model = tiny_model(torch.float64)
    freeze = Freeze(rate=0.5, scorer="random", frozen_value="keep")
    freeze.setup_method(model, None)
    noise, weights = noise_of_step(model, [freeze], sigma=2.0, clip=0.5)
    assert_noise_only_where_weighted(noise, weights, sigma=2.0, clip=0.5)


def test_public_grad_refused_without_public_data(tiny_cfg):
    with pytest.raises(ConfigError, match=r"public\.source='none'.*private data"):
        validate(tiny_cfg("method=freeze", "pruning.scorer=public_grad"))
    with pytest.raises(ConfigError, match=r"pretrain\.epochs=1 .*public\.source='none'"):
        validate(tiny_cfg("method=freeze", "pretrain.epochs=1"))
    with pytest.raises(ConfigError, match=r"pruning.rate=1.0 .*\[0, 1\)"):
        validate(tiny_cfg("method=freeze", "pruning.rate=1.0"))
    with pytest.raises(ConfigError, match=r"pruning\.scorer='fisher'"):
        validate(tiny_cfg("method=freeze", "pruning.scorer=fisher"))
    with pytest.raises(ConfigError, match=r"pruning\.rescale=true .*frozen_value='keep'"):
        validate(tiny_cfg("method=freeze", "pruning.rescale=true", "pruning.frozen_value=keep"))


@pytest.mark.parametrize("grad_score", ["grad", "taylor"])
def test_public_grad_mask_reads_only_the_public_split(grad_score):
    def mask_with_private(poison: bool):
        dm = DataModule(
            "synthetic", image_shape=SHAPE, num_classes=4, size=96, public_source="heldout",
            public_size=32,
        )  # fmt: skip
        dm.setup("fit")
        if poison:  # if scoring touched private data, NaNs would reach the scores
            dm.train = TensorData(torch.full_like(dm.train.x, math.nan), dm.train.y)
        model = tiny_model()
        sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
        pretrain(model, dm.public, 1, sgd, batch_size=8)
        freeze = Freeze(
            rate=0.5,
            scorer="public_grad",
            grad_score=grad_score,
            public_source="heldout",
            public_batch_size=8,
        )
        freeze.setup_method(model, dm)
        return freeze

    clean, poisoned = mask_with_private(False), mask_with_private(True)
    for n in clean.masks:
        assert torch.equal(clean.masks[n], poisoned.masks[n])
    assert "the last 32 examples of synthetic's training split" in clean.mask_source


def test_run_writes_masks_fields_plain_epsilon_and_keeps_pruned_weights_zero(tiny_cfg, tmp_path):
    fixed_sigma = ["privacy.noise_multiplier=1.2", "privacy.epsilon=null"]
    cfg = tiny_cfg("method=freeze", "pruning.rate=0.8", "pruning.scorer=random", *fixed_sigma)
    result = run(cfg, tmp_path / "run")
    # ε is plain DP-SGD's for the same (σ, q, steps): the mask costs no privacy
    assert result["epsilon"] == accounting.epsilon(1.2, 0.25, 4, 1e-3, "prv")
    saved = torch.load(tmp_path / "run" / MASKS_FILE)
    masks = saved["masks"]
    assert saved["pruning_rate"] == 0.8 and saved["scorer"] == "random"
    for key in ("pruning_rate", "scorer", "mask_source", "trainable_fraction"):
        assert key in json.loads((tmp_path / "run" / "result.json").read_text())
    model = CNNTanh(SHAPE, num_classes=10)
    total = sum(p.numel() for p in model.parameters())
    maskable = {n: p.numel() for n, p in model.named_parameters() if p.dim() > 1}
    assert set(masks) == set(maskable)
    kept = sum(keep_count(numel, 0.8) for numel in maskable.values())
    assert all(int(masks[n].sum()) == keep_count(maskable[n], 0.8) for n in masks)
    assert result["trainable_fraction"] == (kept + total - sum(maskable.values())) / total
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for n, mask in masks.items():
        weight = ckpt["state_dict"][f"model.{n}"]
        assert (weight[~mask] == 0).all() and (weight[mask] != 0).all()


def test_rate_zero_is_exactly_dp_sgd(tiny_cfg, tmp_path):
    plain = run(tiny_cfg(output_dir=tmp_path / "a"), tmp_path / "a")
    frozen = run(
        tiny_cfg("method=freeze", "pruning.rate=0", output_dir=tmp_path / "b"), tmp_path / "b"
    )
    assert frozen["test_loss"] == plain["test_loss"]
    assert frozen["epsilon"] == plain["epsilon"] and frozen["trainable_fraction"] == 1.0


def test_resuming_with_different_masks_is_refused():
    from dpexp.errors import UserError

    first, other = (
        Freeze(rate=0.5, scorer="random", seed=0),
        Freeze(rate=0.5, scorer="random", seed=1),
    )
    first.setup_method(tiny_model(), None)
    other.setup_method(tiny_model(), None)
    other.load_state_dict(other.state_dict())  # the same masks resume silently
    with pytest.raises(UserError, match="pruning masks differ"):
        other.load_state_dict(first.state_dict())


@pytest.mark.parametrize("taylor", [False, True])
def test_public_gradient_scores_sum_per_batch_magnitudes(taylor):
    model = tiny_model(torch.float64)
    batches = [batch(4, torch.float64, seed=s) for s in (5, 6)]
    names = ["features.0.weight", "classifier.3.weight"]
    scores = public_gradient_scores(model, batches, names, taylor=taylor)
    params = dict(model.named_parameters())
    for n in names:
        expected = torch.zeros_like(params[n])
        for x, y in batches:
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params[n])[0]
            expected += (g * params[n] if taylor else g).abs()
        torch.testing.assert_close(scores[n], expected.detach(), rtol=1e-12, atol=0)
