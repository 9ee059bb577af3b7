"""Input canaries (``audit.canary_type=input``) travel the run's own path: the Poisson sampler
draws them and the configured clipping engine clips them. Honest runs stay below their claim;
two planted bugs (tests/planted.py) are caught: (a) no noise added, (b) an engine that skips
clipping for the output layer, which gradient canaries (clipped around the engine) cannot see.
"""

from __future__ import annotations

import pytest
import torch

from dpexp import accounting
from dpexp.audit import InputCanaries, audit
from dpexp.clipping import clip_and_sum, make_engine, probe
from dpexp.clipping.base import ClippingEngine
from dpexp.errors import ConfigError
from dpexp.models.cnn import CNNTanh
from tests import planted

SIGMA = 3.5  # over 40 steps at q = 1/4 and δ = 1e-5: ε = 2.12 (RDP)
AUDIT = [
    "+audit=default",
    "audit.canary_type=input",
    "audit.canaries=500",
    "callbacks=none",
    "privacy.delta=1e-5",
    "privacy.accountant=rdp",
    f"privacy.noise_multiplier={SIGMA}",
    "privacy.epsilon=null",
    "trainer.max_epochs=10",
]
CLAIM = accounting.epsilon(SIGMA, 0.25, 40, 1e-5, "rdp")
OUTPUT_LAYER = ("classifier.3.weight", "classifier.3.bias")  # cnn_tanh's classifier


def test_honest_run_stays_below_its_claim_and_canaries_go_through_sampler_and_engine(
    tiny_cfg, tmp_path, monkeypatch
):
    """Every batch the engine clips is recorded: the canaries it sees are exactly included
    ones, about q·T times each, and no canary gradient is injected around the engine."""
    seen: list[torch.Tensor] = []
    original = ClippingEngine.clipped_sum

    def spy(self, inputs, targets, *args, **kwargs):
        seen.append(targets.detach().cpu().clone())
        return original(self, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(ClippingEngine, "clipped_sum", spy)
    made: list[InputCanaries] = []
    monkeypatch.setattr(InputCanaries, "add_classes", record(made, InputCanaries.add_classes))
    line = audit(tiny_cfg(*AUDIT, "clipping=bk"), tmp_path / "run")
    assert line["epsilon_claimed"] == pytest.approx(CLAIM)
    assert line["epsilon_lower_bound"] <= line["epsilon_claimed"]
    assert (line["canary_type"], line["clipping"], line["steps"]) == ("input", "bk", 40)
    (canaries,) = made
    labels = torch.cat(seen)
    drawn = labels[labels >= 10] - 10  # canary i has class 10 + i
    included = canaries.included.nonzero().flatten()
    assert set(drawn.tolist()) <= set(included.tolist())  # an excluded canary never trains
    # each included canary joins each of the 40 steps with q = 1/4 (the first chunk the
    # probe also clips once more: at most 8 examples)
    expected = 0.25 * 40 * len(included)
    assert abs(len(drawn) - expected) < 4 * (expected * 0.75) ** 0.5 + 8


def record(made: list, add_classes):
    def wrapped(self, model):
        made.append(self)
        return add_classes(self, model)

    return wrapped


def test_noise_off_is_caught(tiny_cfg, tmp_path):
    """(a) The step adds no noise while σ, the ledger and the claim stay as they were."""
    with planted.noise_off():
        line = audit(tiny_cfg(*AUDIT, "clipping=bk"), tmp_path / "run")
    assert line["epsilon_claimed"] == pytest.approx(CLAIM)
    assert line["epsilon_lower_bound"] > line["epsilon_claimed"]


def test_engine_that_skips_clipping_one_layer_is_caught(tiny_cfg, tmp_path):
    """(b) ``bk`` sums the output layer's per-sample gradients without their clip factors in
    full-size batches; the exactness probes (on at most 8 examples) do not see it."""
    with planted.unclipped_layer(*OUTPUT_LAYER):
        line = audit(tiny_cfg(*AUDIT, "clipping=bk"), tmp_path / "run")
    assert line["epsilon_claimed"] == pytest.approx(CLAIM)
    assert line["epsilon_lower_bound"] > line["epsilon_claimed"]


def test_the_planted_engine_bug_is_real_and_hidden_from_the_probe():
    """The planted bug leaves batches of ≤ 8 examples exact (the probe passes) and changes
    the output layer's clipped sum, and only that, in larger batches."""
    model = CNNTanh((1, 16, 16), 10)
    x, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 10

    def sums(n: int, engine: str = "bk") -> dict[str, torch.Tensor]:
        return clip_and_sum(model, x[:n], y[:n], 0.1, engine)[0]

    with planted.unclipped_layer(*OUTPUT_LAYER):
        small, large = sums(8), sums(16)
        engine = make_engine("bk", model)
        with engine.attached_to_model():
            probe(engine, x, y, 0.1)  # raises on any mismatch
    exact_small, exact_large = sums(8, "functorch"), sums(16, "functorch")
    for name in exact_large:
        torch.testing.assert_close(small[name], exact_small[name], rtol=1e-4, atol=1e-7)
        if name in OUTPUT_LAYER:
            assert (large[name] - exact_large[name]).norm() > 2 * exact_large[name].norm()
        else:
            torch.testing.assert_close(large[name], exact_large[name], rtol=1e-4, atol=1e-7)


def test_unknown_canary_type_fails_with_one_line(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"audit\.canary_type='white_box' is invalid"):
        audit(tiny_cfg(*AUDIT, "audit.canary_type=white_box"), tmp_path / "run")
