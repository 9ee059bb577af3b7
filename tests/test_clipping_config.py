"""``clipping=<mode>`` through the real config: same algorithm, same result, in every mode."""

from __future__ import annotations

import pytest
from torch import nn

from dpexp.clipping import MODES, UnsupportedModelError, check_supported
from dpexp.errors import ConfigError
from dpexp.models import BUILDERS
from dpexp.train import run
from dpexp.validate import validate
from tests.test_bad_input import _dropout_in_generic_layer


def test_every_mode_trains_to_the_same_model(tiny_cfg, tmp_path):
    results = {mode: run(tiny_cfg(f"clipping={mode}"), tmp_path / mode) for mode in MODES}
    reference = results["per_sample"]
    for mode, result in results.items():
        assert result["clipping"] == mode
        assert result["steps"] == reference["steps"] == 4
        # same σ, same noise draws, the same clipped sums up to float32 rounding
        assert result["epsilon"] == reference["epsilon"]
        assert result["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-4), mode


def test_unsupported_model_fails_validation_with_module_name(tiny_cfg, monkeypatch):
    monkeypatch.setitem(BUILDERS, "cnn_tanh", _dropout_in_generic_layer)
    with pytest.raises(ConfigError, match=r"clipping.mode='bk'.*'1' \(_DroppedScale\).*random"):
        validate(tiny_cfg("clipping=bk"))
    validate(tiny_cfg("clipping=bk", "privacy=none"))  # nothing is clipped without DP
    validate(tiny_cfg("clipping=functorch"))  # each sample draws its own mask inside vmap


def test_check_supported_reports_opacus_refusals():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError):
        check_supported(model, "per_sample")
    check_supported(nn.Sequential(nn.Linear(2, 2)), "per_sample")
