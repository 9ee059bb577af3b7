"""Learning-rate schedules (``scheduler=``): stepped once per optimizer step, over the planned
number of steps, restored on resume; they never touch privacy accounting."""

from __future__ import annotations

import math

import pytest
import torch

from dpexp.train import build, run


def _lrs_seen(cfg, tmp_path, monkeypatch):
    """The learning rate used at every optimizer step of a run of ``cfg``."""
    datamodule, module, privacy, _, trainer = build(cfg, tmp_path)
    seen: list[float] = []
    real_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    trainer.fit(module, datamodule=datamodule)
    return seen, privacy


def test_cosine_decays_over_the_planned_steps(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("scheduler=cosine", "trainer.max_epochs=3", "callbacks=none")
    seen, privacy = _lrs_seen(cfg, tmp_path, monkeypatch)
    steps = privacy.planned_steps
    assert len(seen) == steps > 3
    lr = cfg.optimizer.lr
    expected = [lr * (1 + math.cos(math.pi * k / steps)) / 2 for k in range(steps)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_no_scheduler_keeps_the_learning_rate(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("trainer.max_epochs=2", "callbacks=none")
    seen, _ = _lrs_seen(cfg, tmp_path, monkeypatch)
    assert len(seen) > 2 and set(seen) == {cfg.optimizer.lr}


def test_schedule_does_not_change_the_privacy_account(tiny_cfg, tmp_path):
    plain = run(tiny_cfg("trainer.max_epochs=2"), tmp_path / "plain")
    cosine = run(tiny_cfg("trainer.max_epochs=2", "scheduler=cosine"), tmp_path / "cosine")
    for key in ("epsilon", "noise_multiplier", "sample_rate", "steps"):
        assert plain[key] == cosine[key]
    assert plain["test_acc"] != cosine["test_acc"] or plain["test_loss"] != cosine["test_loss"]
