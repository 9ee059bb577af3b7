"""method=select (gradient dropping) alone and composed with freeze: unselected coordinates
never move, clipping and noise only over selected coordinates, ε unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpexp import accounting
from dpexp.clipping import MODES, make_engine
from dpexp.errors import ConfigError
from dpexp.methods.freeze import MASKS_FILE, Freeze
from dpexp.methods.masks import keep_count
from dpexp.methods.select import Select
from dpexp.privacy.step import merge_weights
from dpexp.train import CONFIG_DIR, run
from dpexp.validate import validate
from tests import reference
from tests.test_freeze import (
    OPTIMIZERS,
    assert_noise_only_where_weighted,
    batch,
    dp_step,
    noise_of_step,
    tiny_model,
)


def state_of(optimizer, p) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in optimizer.state.get(p, {}).items()
        if torch.is_tensor(v) and v.shape == p.shape
    }


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("optimizer_state", ["freeze", "continue"])
def test_unselected_coordinates_do_not_move_in_their_step(optimizer_name, optimizer_state):
    model = tiny_model()
    select = Select(rate=0.7, scorer="random", optimizer_state=optimizer_state)
    select.setup_method(model, None)
    step = dp_step(model, [select])
    optimizer = OPTIMIZERS[optimizer_name]([p for p in model.parameters() if p.requires_grad])
    params = dict(model.named_parameters())
    state_moved_while_unselected = False
    for i in range(4):
        before = {n: p.detach().clone() for n, p in params.items()}
        states = {n: state_of(optimizer, p) for n, p in params.items()}
        step(batch(seed=20 + i), optimizer)
        for n, mask in select.current.items():
            p, off = params[n], mask == 0
            assert torch.equal(p[off], before[n][off]), f"step {i}: unselected {n} moved"
            assert (p[~off] != before[n][~off]).float().mean() > 0.9
            for k, v in state_of(optimizer, p).items():
                old = states[n].get(k, torch.zeros_like(v))
                if optimizer_state == "freeze":
                    assert torch.equal(v[off], old[off]), f"step {i}: state {k} of {n} moved"
                else:
                    state_moved_while_unselected |= not torch.equal(v[off], old[off])
    step.engine.detach()
    assert state_moved_while_unselected == (optimizer_state == "continue")


def test_selection_is_inside_kept_coordinates_and_frozen_ones_stay_bit_identical():
    model = tiny_model()
    freeze = Freeze(rate=0.5, scorer="random", frozen_value="keep")
    select = Select(rate=0.6, scorer="random")
    freeze.setup_method(model, None)
    select.setup_method(model, None)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = dp_step(model, [freeze, select])
    optimizer = OPTIMIZERS["adam_wd"](list(model.parameters()))
    for i in range(4):
        step(batch(seed=30 + i), optimizer)
        for n, kept in freeze.masks.items():
            chosen = select.current[n]
            assert ((chosen != 0) <= (kept != 0)).all()
            assert int(chosen.sum()) == keep_count(int(kept.sum()), 0.6)
    for n, kept in freeze.masks.items():
        frozen = kept == 0
        assert torch.equal(dict(model.named_parameters())[n][frozen], start[n][frozen])


def test_selection_changes_every_k_steps_only():
    model = tiny_model()
    select = Select(rate=0.5, every=3)
    select.setup_method(model, None)
    picks = [select.coordinate_weights(s)["classifier.3.weight"].clone() for s in range(7)]
    assert torch.equal(picks[0], picks[1]) and torch.equal(picks[1], picks[2])
    assert not torch.equal(picks[2], picks[3])
    assert torch.equal(picks[3], picks[5]) and not torch.equal(picks[5], picks[6])


def test_magnitude_selection_takes_largest_current_weights():
    model = tiny_model()
    select = Select(rate=0.75, scorer="magnitude")
    select.setup_method(model, None)
    for n, mask in select.coordinate_weights(0).items():
        w = dict(model.named_parameters())[n].detach().abs()
        assert w[mask == 1].min() >= w[mask == 0].max()


def test_random_selection_resumes_from_checkpointed_generator():
    model = tiny_model()
    first = Select(rate=0.5, seed=4)
    first.setup_method(model, None)
    for s in range(3):
        first.coordinate_weights(s)
    resumed, fresh = Select(rate=0.5, seed=4), Select(rate=0.5, seed=4)
    resumed.load_state_dict(first.state_dict())
    resumed.setup_method(model, None)
    fresh.setup_method(model, None)
    assert torch.equal(
        resumed.coordinate_weights(2)["classifier.1.weight"], first.current["classifier.1.weight"]
    )
    nxt, again = first.coordinate_weights(3), resumed.coordinate_weights(3)
    assert all(torch.equal(nxt[n], again[n]) for n in nxt)
    assert not torch.equal(
        fresh.coordinate_weights(3)["classifier.1.weight"], nxt["classifier.1.weight"]
    )


def freeze_and_select(model):
    freeze = Freeze(rate=0.5, scorer="magnitude", frozen_value="keep")
    select = Select(rate=0.5, scorer="random")
    freeze.setup_method(model, None)
    select.setup_method(model, None)
    return [freeze, select]


@pytest.mark.parametrize("mode", MODES)
def test_clipped_sum_equals_brute_force_over_selected_coordinates(mode):
    model = tiny_model(torch.float64)
    weights = merge_weights(freeze_and_select(model), 0)
    x, y = batch(dtype=torch.float64)
    clip = 0.05
    engine = make_engine(mode, model)
    with engine.attached_to_model():
        sums, norms, _ = engine.clipped_sum(x, y, clip, weights)
    ref_sums, ref_norms = reference.clipped_sum(model, x, y, clip, weights)
    assert (ref_norms > clip).all()
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    for n in ref_sums:
        torch.testing.assert_close(sums[n], ref_sums[n], rtol=1e-10, atol=1e-12)


def test_noise_has_std_sigma_c_on_selected_coordinates_and_is_zero_elsewhere():
    model = tiny_model(torch.float64)
    noise, weights = noise_of_step(model, freeze_and_select(model), sigma=1.5, clip=0.4)
    assert_noise_only_where_weighted(noise, weights, sigma=1.5, clip=0.4)


SIGMA_FIXED = ["privacy.noise_multiplier=0.9", "privacy.epsilon=null"]


def assert_plain_dp_sgd_epsilon(result, steps: int) -> None:
    """ε and the ledger are exactly DP-SGD's for (σ=0.9, q=0.25, steps): masks cost nothing."""
    assert result["steps"] == steps
    assert result["epsilon"] == accounting.epsilon(0.9, 0.25, steps, 1e-3, "prv")
    assert [list(m) for m in result["accountant_history"]] == [[0.9, 0.25, steps]]


def test_select_epsilon_is_plain_dp_sgd_for_the_same_sigma_q_steps(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=select", "select.rate=0.9", "trainer.max_epochs=2", *SIGMA_FIXED)
    assert_plain_dp_sgd_epsilon(run(cfg, tmp_path / "run"), steps=8)


def clipping_override(mode: str) -> str:
    group_file = Path(CONFIG_DIR) / "clipping" / f"{mode}.yaml"
    return f"clipping={mode}" if group_file.is_file() else f"clipping.mode={mode}"


@pytest.mark.parametrize("mode", MODES)
def test_freeze_select_trains_with_every_clipping_mode(tiny_cfg, tmp_path, mode):
    cfg = tiny_cfg(
        "method=freeze_select",
        clipping_override(mode),
        "pruning.rate=0.5",
        "select.rate=0.5",
        *SIGMA_FIXED,
    )
    result = run(cfg, tmp_path / "run")
    assert result["clipping"] == mode
    assert_plain_dp_sgd_epsilon(result, steps=4)
    assert result["pruning_rate"] == 0.5 and result["select_rate"] == 0.5
    masks = torch.load(tmp_path / "run" / MASKS_FILE)["masks"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    n_params = result["n_params"]
    updated = 0
    for n, w in ckpt["state_dict"].items():
        name = n.removeprefix("model.")
        if name in masks:
            assert (w[~masks[name]] == 0).all()  # pruned stays exactly zero
            updated += keep_count(int(masks[name].sum()), 0.5)
        else:
            updated += w.numel()
    assert result["trainable_fraction"] == pytest.approx(updated / n_params, rel=1e-12)


def test_bad_select_options_are_one_line_config_errors(tiny_cfg):
    for override, pattern in [
        ("select.rate=1.5", r"select\.rate=1\.5 .*\[0, 1\)"),
        ("select.every=0", r"select\.every=0 .*positive integer"),
        ("select.scorer=gradient", r"select\.scorer='gradient' .*random, magnitude"),
        ("select.optimizer_state=reset", r"select\.optimizer_state='reset' .*freeze, continue"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            validate(tiny_cfg("method=select", override))


def test_select_rejects_invalid_constructor_options_directly():
    with pytest.raises(ConfigError, match=r"select\.rate=-0\.1"):
        Select(rate=-0.1)


def test_resumed_freeze_select_run_matches_the_uninterrupted_one(tiny_cfg, tmp_path):
    method = ["method=freeze_select", "pruning.scorer=random", "select.every=3"]
    method += ["privacy.noise_multiplier=1.0", "privacy.epsilon=null"]  # same σ for 1 or 2 epochs
    whole = run(
        tiny_cfg(*method, "trainer.max_epochs=2", output_dir=tmp_path / "a"), tmp_path / "a"
    )
    run(tiny_cfg(*method, "trainer.max_epochs=1", output_dir=tmp_path / "b"), tmp_path / "b")
    ckpt = f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}"
    resumed = run(
        tiny_cfg(*method, "trainer.max_epochs=2", ckpt, output_dir=tmp_path / "c"), tmp_path / "c"
    )
    assert resumed["steps"] == whole["steps"] == 8
    assert resumed["test_loss"] == whole["test_loss"]
    assert resumed["trainable_fraction"] == whole["trainable_fraction"]
