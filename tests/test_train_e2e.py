"""End-to-end runs through the real Hydra config (tiny data, one epoch)."""

from __future__ import annotations

import json

import pytest

from dpexp import accounting
from dpexp.train import run
from tests.conftest import MNIST_AVAILABLE

REQUIRED = {
    "test_acc", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "epochs",
    "accountant", "max_grad_norm", "method", "clipping", "dataset", "model", "n_params",
    "trainable_fraction", "wall_s", "seed", "git_sha", "hardware", "config_hash",
}  # fmt: skip


def test_dp_run_on_synthetic_writes_complete_result(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_epochs=2")
    result = run(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(on_disk) >= REQUIRED
    assert on_disk["steps"] == 2 * 4  # N/B = 128/32 steps per epoch
    assert 0 <= result["test_acc"] <= 1
    assert result["epsilon"] <= cfg.privacy.epsilon
    # ε is re-derivable from the recorded (σ, q, steps)
    again = accounting.epsilon(
        result["noise_multiplier"], result["sample_rate"], result["steps"], 1e-3, "prv"
    )
    assert result["epsilon"] == pytest.approx(again, rel=1e-9)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_result_names_the_code_the_run_started_from(tiny_cfg, tmp_path, monkeypatch):
    """A checkout while a long run trains must not relabel its result with the new commit."""
    import dpexp.train as train

    head = {"sha": "started"}
    real_build = train.build

    def build_then_check_out(*args, **kwargs):
        built = real_build(*args, **kwargs)
        head["sha"] = "checked-out-later"
        return built

    monkeypatch.setattr(train, "git_sha", lambda: head["sha"])
    monkeypatch.setattr(train, "build", build_then_check_out)
    assert run(tiny_cfg(), tmp_path / "run")["git_sha"] == "started"


def test_non_private_baseline_runs_the_same_loop(tiny_cfg, tmp_path):
    result = run(tiny_cfg("privacy=none"), tmp_path / "run")
    assert result["epsilon"] is None and result["noise_multiplier"] is None
    assert result["steps"] == 4


def test_finished_run_is_never_overwritten(tiny_cfg, tmp_path):
    from dpexp.errors import UserError

    run(tiny_cfg(), tmp_path / "run")
    before = (tmp_path / "run" / "result.json").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        run(tiny_cfg(), tmp_path / "run")
    assert (tmp_path / "run" / "result.json").read_bytes() == before


@pytest.mark.skipif(not MNIST_AVAILABLE, reason="MNIST mirror not present")
def test_mnist_subset_one_epoch(tiny_cfg, tmp_path):
    mnist = ["dataset=mnist", "dataset.train_size=2048", "dataset.test_size=512"]
    cfg = tiny_cfg(
        "dataset.batch_size=256",
        "privacy.delta=1e-4",
        "privacy.epsilon=8",
        "trainer.max_epochs=2",
        data=mnist,
    )
    result = run(cfg, tmp_path / "run")
    assert result["dataset"] == "mnist" and result["steps"] == 16
    # far above chance after 16 DP steps (the last iterate: an average of 16 steps still lags)
    assert result["test_acc_last"] > 0.3
