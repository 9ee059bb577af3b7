"""Faults and resume: a run killed with SIGKILL mid-epoch continues from its last step
checkpoint exactly as if it had never stopped (same batches, same noise, same ε, same weights).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from dpexp.errors import UserError
from dpexp.methods.base import Method
from dpexp.models import build_model
from dpexp.privacy.settings import privacy_settings
from dpexp.train import run
from tests.conftest import TINY, TINY_DATA

REPO = Path(__file__).resolve().parents[1]
# 4 Poisson batches per epoch (N=128, B=32), 3 epochs; last.ckpt after steps 3, 4, 6, 8, 9, 12.
# The counting method checks that method state travels in the checkpoint. Bit-equality needs
# the same arithmetic before and after the kill: `bk` fixes it, while `auto` picks each
# layer's (equally exact) method by timing, so its results agree only to rounding.
RUN = [
    "clipping=bk",
    "trainer.max_epochs=3",
    "callbacks.step_checkpoint.every_n_train_steps=3",
    "+method.callbacks.counter._target_=tests.test_resume.CountingMethod",
]
KILL_AFTER_STEP = 7  # one step past the step-6 checkpoint, in the middle of epoch 2


class CountingMethod(Method):
    """A method whose only state is how many optimizer steps it has seen."""

    def __init__(self) -> None:
        self.count = 0

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.count += 1

    def result_fields(self) -> dict[str, Any]:
        return {"counted_steps": self.count}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = state_dict["count"]


class HangAfterStep(L.Callback):
    """Blocks the training process after optimizer step ``step`` so the test can kill it there
    (deterministically mid-epoch, whatever the machine's speed)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(600)


def _start_cli_run(run_dir: Path, marker: Path, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "dpexp.train", *TINY_DATA, *TINY, *RUN,
        f"hydra.run.dir={run_dir}",
        "+callbacks.hang._target_=tests.test_resume.HangAfterStep",
        f"+callbacks.hang.step={KILL_AFTER_STEP}",
        f"+callbacks.hang.marker={marker}",
    ]  # fmt: skip
    # The same thread count as the in-process runs it is compared with: reduction order (and
    # so the last bit of a float) depends on it.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(marker: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not reach the kill point in time")
        time.sleep(0.2)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_tensors(a: Any, b: Any) -> None:
    """Bit-equal nested structures of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_tensors(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tiny_cfg, tmp_path):
    killed, marker, log = tmp_path / "killed", tmp_path / "at_step", tmp_path / "killed.log"
    proc = _start_cli_run(killed, marker, log)
    _wait_for(marker, proc, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "result.json").exists()

    ckpt = _load(killed / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # step 7 was done, then lost
    assert ckpt["DataModule"]["sampler_position"] == 2  # mid-epoch: 2 of 4 batches used
    privacy = ckpt["callbacks"]["PrivacyCallback"]
    assert privacy["steps"] == 6 and privacy["ledger"]["history"][0][2] == 6
    assert ckpt["callbacks"]["CountingMethod"] == {"count": 6}
    assert ckpt["optimizer_states"][0]["state"]  # SGD momentum buffers

    resumed = run(tiny_cfg(*RUN, "resume=true", output_dir=killed), killed)
    whole = run(tiny_cfg(*RUN, output_dir=tmp_path / "whole"), tmp_path / "whole")

    assert resumed["steps"] == whole["steps"] == resumed["counted_steps"] == 12
    assert resumed["epsilon"] == whole["epsilon"]
    assert resumed["accountant_history"] == whole["accountant_history"]
    assert resumed["test_loss"] == whole["test_loss"]
    a, b = (
        _load(killed / "checkpoints" / "last.ckpt"),
        _load(tmp_path / "whole/checkpoints/last.ckpt"),
    )
    _assert_same_tensors(a["state_dict"], b["state_dict"])  # weights: bit-equal
    _assert_same_tensors(a["optimizer_states"], b["optimizer_states"])
    _assert_same_tensors(a["callbacks"]["PrivacyCallback"], b["callbacks"]["PrivacyCallback"])
    _assert_same_tensors(a["DataModule"], b["DataModule"])  # the same sampler stream


def test_mid_epoch_sampler_state_skips_nothing_and_repeats_nothing():
    """Unit level: the checkpointed sampler state after k used batches, while the loader has
    already drawn batch k+1, replays exactly batches k+1.. of the uninterrupted pass."""
    from dpexp.data import PoissonBatchSampler

    def sampler() -> PoissonBatchSampler:
        return PoissonBatchSampler(50, 0.3, steps=6, generator=torch.Generator().manual_seed(3))

    whole = [b.tolist() for b in sampler()]
    first = sampler()
    it = iter(first)
    used = [next(it).tolist() for _ in range(2)]
    next(it)  # drawn ahead of training (Lightning prefetches), never used
    position, state = first.resume_state(consumed=2)
    again = sampler()
    again.generator.set_state(state)
    again.start = position
    assert used + [b.tolist() for b in again] == whole
    reference = sampler()
    list(reference)
    assert torch.equal(again.generator.get_state(), reference.generator.get_state())
    assert again.start == 0  # the next pass (epoch) is a whole one again


def test_budget_already_spent_at_resume_stops_at_once(tiny_cfg, tmp_path, caplog):
    fixed = ["privacy.noise_multiplier=1.0", "trainer.max_epochs=2"]
    first = run(tiny_cfg(*fixed, "privacy.epsilon=10", output_dir=tmp_path / "a"), tmp_path / "a")
    assert first["steps"] == 8 and first["epsilon"] > 3  # ε ≈ 3.4 spent
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    cfg = tiny_cfg(
        "privacy.noise_multiplier=1.0", "privacy.epsilon=3", "trainer.max_epochs=3",
        f"ckpt_path={ckpt}", output_dir=tmp_path / "b",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dpexp.privacy.callback"):
        result = run(cfg, tmp_path / "b")
    assert result["steps"] == 8  # not a single step more
    assert result["budget_stop"] is True
    assert result["epsilon"] == pytest.approx(first["epsilon"])
    assert "already spent after 8 steps" in caplog.text
    assert ckpt.read_bytes() == before  # the other run's checkpoint is untouched


def test_fresh_run_refuses_a_dir_holding_an_unfinished_run(tiny_cfg, tmp_path):
    # an unfinished run: a checkpoint of the configured model, no result.json
    model = build_model("cnn_tanh", (1, 16, 16), 10)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    settings = privacy_settings(tiny_cfg())
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "callbacks": {"PrivacyCallback": {"settings": settings}},
        },
        ckpt,
    )
    before = ckpt.read_bytes()
    with pytest.raises(UserError, match=r"resume=false is invalid here: .*last\.ckpt exists"):
        run(tiny_cfg(), tmp_path / "run")
    other = tmp_path / "other.ckpt"
    other.write_bytes(before)
    with pytest.raises(UserError, match=r"ckpt_path=.* is invalid here: .*resume=true"):
        run(tiny_cfg(f"ckpt_path={other}"), tmp_path / "run")
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["checkpoints", "last.ckpt"]
