"""method=screen (SA-DPSGD): the acceptance rule, bit-exact restores, and honest accounting."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpexp import accounting
from dpexp.clipping import MODES
from dpexp.data import DataModule
from dpexp.errors import ConfigError
from dpexp.methods.screen import Screen, acceptance_probability
from dpexp.privacy.step import GradientStep
from dpexp.train import run
from dpexp.validate import validate

SCREEN_PUBLIC = ["method=screen", "public.source=heldout", "public.size=32"]


def data_module(public_size: int = 32) -> DataModule:
    dm = DataModule(
        name="synthetic",
        image_shape=(1, 4, 4),
        num_classes=3,
        size=160,
        synthetic_test_size=16,
        batch_size=16,
        public_source="heldout" if public_size else "none",
        public_size=public_size or None,
    )
    dm.setup()
    return dm


def setup(screen: Screen, public_size: int = 32, lr: float = 0.5):
    """A linear model, SGD with momentum and the screen's hooks in a real GradientStep."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    dm = data_module(public_size)
    dm.train.x, dm.public.x = dm.train.x.double(), dm.public.x.double()
    screen.setup_method(model, dm)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, dm, optimizer, GradientStep(model, [screen])


def train_batch(dm: DataModule, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return dm.train[torch.arange(16 * i, 16 * (i + 1)) % len(dm.train)]


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return params, state


def assert_bit_equal(model, optimizer, saved) -> None:
    params, state = saved
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k])


# -- the rule ---------------------------------------------------------------------------
def test_acceptance_probability_is_the_papers_formula():
    assert acceptance_probability(-0.3, k=10, accepted=50) == 1.0
    assert acceptance_probability(0.0, k=10, accepted=50) == 1.0
    assert acceptance_probability(0.02, k=10, accepted=0) == 1.0
    assert acceptance_probability(0.02, k=10, accepted=3) == pytest.approx(math.exp(-0.6))


@pytest.mark.parametrize("delta_e, accepted", [(0.01, 5), (0.003, 40), (0.05, 1)])
def test_empirical_acceptance_frequency_matches_formula(delta_e, accepted):
    screen = Screen(k=10.0, seed=3)
    screen.accepted = accepted
    n = 20_000
    hits = sum(screen.accept(delta_e) for _ in range(n))
    p = math.exp(-10.0 * accepted * delta_e)
    assert abs(hits / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    assert all(screen.accept(-1e-9) for _ in range(100))  # improvements are always kept


def test_delta_e_is_the_mean_loss_change_on_one_validation_batch(monkeypatch):
    screen = Screen(seed=1, public_source="heldout", val_batch=8)
    model, dm, optimizer, step = setup(screen)
    seen = []
    monkeypatch.setattr(screen, "released_delta", lambda d: seen.append(d) or d)
    generator_state = screen.generator.get_state()
    before = [p.detach().clone() for p in model.parameters()]
    step(train_batch(dm, 0), optimizer)
    # Re-draw the same validation batch and score both points by hand.
    order = torch.randperm(len(dm.public), generator=torch.Generator().set_state(generator_state))
    x, y = dm.public[order[:8]]
    old = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p, b in zip(old.parameters(), before, strict=True):
            p.copy_(b)
        expected = F.cross_entropy(model(x), y) - F.cross_entropy(old(x), y)
    assert seen == [pytest.approx(float(expected), rel=1e-12, abs=1e-15)]


# -- restores ---------------------------------------------------------------------------
@pytest.mark.parametrize("restore_optimizer_state", [True, False])
def test_rejection_restores_parameters_and_optimizer_state_bit_exactly(
    monkeypatch, restore_optimizer_state
):
    screen = Screen(public_source="heldout", restore_optimizer_state=restore_optimizer_state)
    model, dm, optimizer, step = setup(screen)
    for i in range(3):  # build up momentum from accepted steps
        step(train_batch(dm, i), optimizer)
    assert screen.accepted == 3
    saved = snapshot(model, optimizer)
    monkeypatch.setattr(screen, "accept", lambda delta_e: False)
    step(train_batch(dm, 3), optimizer)
    assert (screen.candidates, screen.accepted, screen.consecutive_rejections) == (4, 3, 1)
    if restore_optimizer_state:
        assert_bit_equal(model, optimizer, saved)
    else:  # the authors' code: parameters restored, momentum keeps the rejected gradient
        for p, q in zip(model.parameters(), saved[0], strict=True):
            assert torch.equal(p, q)
        assert any(
            not torch.equal(s["momentum_buffer"], saved[1][id(p)]["momentum_buffer"])
            for p, s in optimizer.state.items()
        )


def test_rejected_first_step_drops_the_momentum_it_created(monkeypatch):
    screen = Screen(public_source="heldout")
    model, dm, optimizer, step = setup(screen)
    saved = snapshot(model, optimizer)
    monkeypatch.setattr(screen, "accept", lambda delta_e: False)
    step(train_batch(dm, 0), optimizer)
    assert not optimizer.state
    assert_bit_equal(model, optimizer, saved)


def test_forced_acceptance_after_max_rejections(monkeypatch):
    screen = Screen(public_source="heldout", max_rejections=3)
    model, dm, optimizer, step = setup(screen)
    monkeypatch.setattr(screen, "accept", lambda delta_e: False)
    start = [p.detach().clone() for p in model.parameters()]
    for i in range(3):
        step(train_batch(dm, i), optimizer)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))
    step(train_batch(dm, 3), optimizer)  # the 4th candidate is accepted untested
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))
    assert (screen.candidates, screen.accepted, screen.forced) == (4, 1, 1)
    assert screen.consecutive_rejections == 0
    step(train_batch(dm, 4), optimizer)  # and the count starts again
    assert (screen.accepted, screen.consecutive_rejections) == (1, 1)


# -- the private noisy test -------------------------------------------------------------
def test_noisy_test_clips_delta_e_and_adds_gaussian_noise_of_std_2_cv_sigma_v():
    screen = Screen(validation="private_noisy", clip_v=0.01, sigma_v=1.5, seed=2)
    for raw, clipped in [(5.0, 0.01), (-3.0, -0.01), (0.004, 0.004)]:
        draws = torch.tensor([screen.released_delta(raw) for _ in range(20_000)], dtype=float)
        std = 2 * 0.01 * 1.5
        assert abs(draws.mean().item() - clipped) < 4.5 * std / math.sqrt(20_000)
        assert draws.std().item() == pytest.approx(std, rel=0.03)


def test_private_validation_batch_is_a_poisson_sample_of_the_private_training_set():
    screen = Screen(validation="private_noisy", val_batch=32, seed=4)
    screen.setup_method(nn.Linear(1, 1), data_module(public_size=32))
    assert screen.validation_rate == 32 / 128
    assert screen.privacy_mechanisms() == [(1.3, 0.25)]
    sizes = torch.tensor([len(screen._validation_batch()[1]) for _ in range(2000)], dtype=float)
    assert sizes.mean().item() == pytest.approx(32, rel=0.02)  # Binomial(128, 1/4)
    assert sizes.var().item() == pytest.approx(128 * 0.25 * 0.75, rel=0.15)
    x, _ = screen._validation_batch()
    private = {tuple(r.tolist()) for r in screen.datamodule.train.x.flatten(1)}
    assert all(tuple(r.tolist()) in private for r in x.flatten(1))


# -- refused configurations -------------------------------------------------------------
@pytest.mark.parametrize(
    "options, match",
    [
        ({"validation": "private"}, "refused"),
        ({"validation": "test"}, "screen.validation"),
        ({"validation": "public", "public_source": "none"}, "public.source='none'"),
        ({"validation": "private_noisy", "sigma_v": 0.0}, "screen.sigma_v"),
        ({"validation": "private_noisy", "clip_v": -1.0}, "screen.clip_v"),
        ({"k": -1.0}, "screen.k"),
        ({"max_rejections": 1.5}, "screen.max_rejections"),
        ({"val_batch": 0}, "screen.val_batch"),
    ],
)
def test_bad_options_raise_one_line_config_errors(options, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        Screen(**options)


def config_error_of(config) -> ConfigError:
    """The ConfigError that ``validate`` raised, even if Hydra's instantiate wrapped it."""
    with pytest.raises(Exception) as info:
        validate(config)
    error = info.value
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__
    assert error is not None, f"no ConfigError behind {info.value!r}"
    return error


def test_public_validation_without_public_split_is_refused_by_the_config(tiny_cfg):
    assert "public.source='none'" in str(config_error_of(tiny_cfg("method=screen")))
    private = tiny_cfg("method=screen", "screen.validation=private")
    assert "refused" in str(config_error_of(private))
    with pytest.raises(ConfigError, match=r"public\.source and public\.size"):
        Screen().setup_method(nn.Linear(1, 1), data_module(public_size=0))


# -- through the real config ------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_every_candidate_is_accounted_in_each_clipping_mode(tiny_cfg, tmp_path, mode):
    # A large k and learning rate make rejections likely, so the counts can differ.
    cfg = tiny_cfg(
        *SCREEN_PUBLIC,
        f"clipping.mode={mode}",
        "screen.k=1000",
        "screen.paper_accounting=true",
        "optimizer.lr=5",
        "trainer.max_epochs=3",
        "privacy.epsilon=8",
    )
    result = run(cfg, tmp_path / mode)
    assert result["method"] == "screen" and result["validation"] == "public"
    assert result["candidates"] == result["steps"] == 3 * 3  # 96 private / 32 per batch
    assert [tuple(h) for h in result["accountant_history"]] == [
        (result["noise_multiplier"], result["sample_rate"], result["candidates"])
    ]
    assert 0 < result["accepted"] < result["candidates"]
    assert result["acceptance_rate"] == result["accepted"] / result["candidates"]
    honest = accounting.epsilon(
        result["noise_multiplier"], result["sample_rate"], result["candidates"], 1e-3, "prv"
    )
    assert result["epsilon"] == pytest.approx(honest, rel=1e-9)
    paper = accounting.epsilon(
        result["noise_multiplier"], result["sample_rate"], result["accepted"], 1e-3, "prv"
    )
    assert result["epsilon_paper"] == pytest.approx(paper, rel=1e-9)
    assert result["epsilon_paper"] < result["epsilon"] <= 8


def test_noisy_test_is_composed_into_calibration_ledger_and_budget(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "method=screen",
        "trainer.max_epochs=2",
        "privacy.epsilon=6",
        "privacy.accountant=rdp",  # the quicker accountant: σ is searched twice here
        "screen.validation=private_noisy",
        "screen.sigma_v=2.0",
        "screen.val_batch=32",
    )
    noisy = run(cfg, tmp_path / "run")
    q, q_v, steps = noisy["sample_rate"], 32 / 128, noisy["steps"]
    assert noisy["validation_mechanism"]["sample_rate_v"] == q_v
    history = sorted(map(tuple, noisy["accountant_history"]))
    assert history == sorted([(noisy["noise_multiplier"], q, steps), (2.0, q_v, steps)])
    again = accounting.epsilon_of_history(history, 1e-3, "rdp")
    assert noisy["epsilon"] == pytest.approx(again, rel=1e-9)
    gradient_only = accounting.epsilon(noisy["noise_multiplier"], q, steps, 1e-3, "rdp")
    assert noisy["epsilon"] > gradient_only  # the test costs privacy
    # σ was calibrated with the test composed in, so the total still fits the budget.
    assert noisy["epsilon"] <= 6
    test = [(2.0, q_v)]
    calibrated = accounting.noise_multiplier(6, q, steps, 1e-3, "rdp", extra_mechanisms=test)
    assert noisy["noise_multiplier"] == calibrated
    assert calibrated > accounting.noise_multiplier(6, q, steps, 1e-3, "rdp")
    # The screen's counters and RNG stream go into the checkpoint.
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Screen"))
    assert (state["candidates"], state["accepted"]) == (steps, noisy["accepted"])


def test_checkpointed_state_continues_the_same_stream():
    screen = Screen(seed=5)
    screen.accepted, screen.candidates, screen.consecutive_rejections = 7, 9, 2
    state = screen.state_dict()
    expected = [screen.accept(0.01) for _ in range(50)]
    restored = Screen(seed=99)
    restored.load_state_dict(state)
    assert (restored.accepted, restored.candidates, restored.consecutive_rejections) == (7, 9, 2)
    assert [restored.accept(0.01) for _ in range(50)] == expected


def test_resumed_screen_run_matches_the_uninterrupted_one(tiny_cfg, tmp_path):
    method = [*SCREEN_PUBLIC, "screen.k=1000", "optimizer.lr=5"]
    method += ["privacy.noise_multiplier=1.0", "privacy.epsilon=null"]  # same σ for 1 or 2 epochs
    whole = run(
        tiny_cfg(*method, "trainer.max_epochs=2", output_dir=tmp_path / "a"), tmp_path / "a"
    )
    run(tiny_cfg(*method, "trainer.max_epochs=1", output_dir=tmp_path / "b"), tmp_path / "b")
    ckpt = f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}"
    resumed = run(
        tiny_cfg(*method, "trainer.max_epochs=2", ckpt, output_dir=tmp_path / "c"), tmp_path / "c"
    )
    counts = ("candidates", "accepted", "forced_accepts", "steps")
    assert [resumed[k] for k in counts] == [whole[k] for k in counts]
    assert whole["accepted"] < whole["candidates"]
    assert resumed["test_loss"] == whole["test_loss"]
