"""Preemption: a requeue signal inside a DP step is held until the step is counted, last.ckpt is
saved, then the signal goes on; a multirun job killed mid-run continues from its checkpoint."""

from __future__ import annotations

import json
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

from dpexp import sweep
from dpexp.errors import ConfigError
from dpexp.methods.base import Method
from dpexp.preemption import RequeueCheckpoint
from dpexp.results import RESULT_FILE, read_result
from dpexp.train import run

REPO = Path(__file__).resolve().parents[1]
# 4 Poisson batches per epoch (N=128, B=32), 2 epochs; `bk` for bit-equal arithmetic.
JOB = ["clipping=bk", "trainer.max_epochs=2"]
SIGNAL_AT_STEP = 3  # inside epoch 1, before any epoch-end checkpoint
SLURM = {  # what Lightning's SLURMEnvironment.detect() and its requeue handler read
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "dpexp-test",
    "SLURM_JOB_ID": "4242",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}
COMPARED = ("epsilon", "steps", "test_acc", "test_loss", "accountant_history", "noise_multiplier")


class SignalOnce(Method):
    """Sends this process ``signal`` once per run dir, right after optimizer step ``step`` and
    before the ledger records it: the worst point for a checkpoint."""

    def __init__(self, step: int, signal: str = "SIGUSR2") -> None:
        self.step, self.signum, self.count = step, signal, 0
        self.marker: Path | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.marker = Path(trainer.default_root_dir) / f"sent_{self.signum}"

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.count += 1
        if self.count == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(str(self.step))
            os.kill(os.getpid(), getattr(signal, self.signum))


class HangOnce(L.Callback):
    """Blocks after optimizer step ``step`` until killed, unless ``marker`` exists (it writes
    it): the re-run of the same sweep command passes that step."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(trainer.global_step))
            time.sleep(600)


def signal_method(step: int, name: str) -> list[str]:
    return [
        f"+method.callbacks.signal_once._target_={__name__}.SignalOnce",
        f"+method.callbacks.signal_once.step={step}",
        f"+method.callbacks.signal_once.signal={name}",
    ]


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_slurm_requeue_signal_checkpoints_after_the_step_is_counted(
    tiny_cfg, tmp_path, monkeypatch
):
    """Lightning's SLURM auto-requeue (SIGUSR1) under a fake SLURM job: the signal arrives
    between optimizer step 3 and its ledger record; last.ckpt holds 3 counted steps when
    `scontrol requeue` is called, and a run resumed from it ends as the unsignalled run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records the call and what last.ckpt held at that moment
    scontrol.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/scontrol.log\n'
        f"cp {tmp_path}/signalled/checkpoints/last.ckpt {tmp_path}/at_requeue.ckpt\n"
        f"cp {tmp_path}/signalled/hpc_ckpt_1.ckpt {tmp_path}/hpc_at_requeue.ckpt\n"
    )
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_cfg(
        *JOB, *signal_method(SIGNAL_AT_STEP, "SIGUSR1"), output_dir=tmp_path / "signalled"
    )
    signalled = run(cfg, tmp_path / "signalled")
    for key in SLURM:
        monkeypatch.delenv(key)

    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    at_requeue = _load(tmp_path / "at_requeue.ckpt")
    privacy = at_requeue["callbacks"]["PrivacyCallback"]
    assert at_requeue["global_step"] == SIGNAL_AT_STEP
    assert privacy["steps"] == SIGNAL_AT_STEP == privacy["ledger"]["history"][0][2]
    # Lightning's own handler ran after ours, at the same safe point; its file is removed, or
    # Lightning would test these step-3 weights (and report this ledger) instead of the final
    hpc = _load(tmp_path / "hpc_at_requeue.ckpt")
    assert hpc["global_step"] == SIGNAL_AT_STEP
    assert hpc["callbacks"]["PrivacyCallback"]["steps"] == SIGNAL_AT_STEP
    assert not list((tmp_path / "signalled").glob("hpc_ckpt_*"))

    # The resume keeps the method's options (a privacy setting); its signal was already sent.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "sent_SIGUSR1").write_text(str(SIGNAL_AT_STEP))
    resumed = run(tiny_cfg(*JOB, *signal_method(SIGNAL_AT_STEP, "SIGUSR1"),
                           f"ckpt_path={tmp_path / 'at_requeue.ckpt'}",
                           output_dir=resumed_dir), resumed_dir)  # fmt: skip
    assert signalled["steps"] == 8
    for key in COMPARED:
        assert resumed[key] == signalled[key], key


def test_signal_without_a_handler_terminates_after_the_checkpoint(tmp_path):
    """SIGUSR2 outside submitit has the default action (terminate): it still comes after the
    checkpoint of the step it interrupted."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "dpexp.train", *TINY_CLI, *JOB, f"hydra.run.dir={run_dir}",
        "callbacks.step_checkpoint.every_n_train_steps=0",
        *signal_method(SIGNAL_AT_STEP, "SIGUSR2"),
    ]  # fmt: skip
    out = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGUSR2, out.stderr[-2000:]
    assert not (run_dir / RESULT_FILE).exists()
    ckpt = _load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == SIGNAL_AT_STEP
    assert ckpt["callbacks"]["PrivacyCallback"]["steps"] == SIGNAL_AT_STEP


def test_bad_signal_name_is_one_line():
    with pytest.raises(ConfigError, match=r"callbacks\.requeue\.signals='SIGFOO' is invalid"):
        RequeueCheckpoint("ckpts", signals=["SIGFOO"])


# -- multirun jobs: SIGKILL mid-run, re-run the sweep ------------------------------------------
TINY_CLI = [
    "model=cnn_tanh",
    "dataset=synthetic",
    "dataset.image_shape=[1,16,16]",
    "dataset.size=128",
    "dataset.synthetic_test_size=64",
    "dataset.batch_size=32",
    "privacy.delta=1e-3",
    "privacy.accountant=rdp",
    "privacy.epsilon=3",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
STEP_CKPT = ["callbacks.step_checkpoint.every_n_train_steps=2"]  # last.ckpt after 2, 4, 6, 8
KILL_AT_STEP = 7  # one step past the step-6 checkpoint, mid epoch 2


def sweep_command(sweep_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dpexp.train", "-m", *TINY_CLI, *JOB, *STEP_CKPT, "seed=0",
        f"hydra.sweep.dir={sweep_dir}", *extra,
    ]  # fmt: skip


def job_dir(sweep_dir: Path) -> Path:
    (job,) = [p.parent for p in sweep_dir.glob(f"*/{sweep.JOB_FILE}")]
    return job


@pytest.mark.slow  # three `python -m dpexp.train -m` subprocesses
def test_sigkilled_sweep_job_continues_from_its_checkpoint(tmp_path):
    killed, marker = tmp_path / "killed", tmp_path / "at_step"
    hang = [
        f"+callbacks.hang._target_={__name__}.HangOnce",
        f"+callbacks.hang.step={KILL_AT_STEP}", f"+callbacks.hang.marker={marker}",
    ]  # fmt: skip
    first = subprocess.Popen(sweep_command(killed, *hang), cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert first.poll() is None, "the sweep ended before the kill point"
        assert time.monotonic() < deadline, "the sweep did not reach the kill point"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    job = job_dir(killed)
    assert read_result(job) is None
    assert _load(job / "checkpoints" / "last.ckpt")["global_step"] == 6

    again = subprocess.run(sweep_command(killed, *hang), cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "continuing the interrupted attempt from" in again.stdout + again.stderr
    whole = subprocess.run(sweep_command(tmp_path / "whole"), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed, reference = read_result(job), read_result(job_dir(tmp_path / "whole"))
    assert resumed["steps"] == reference["steps"] == 8
    for key in COMPARED:
        assert resumed[key] == reference[key], key
    table = {k: (reference[k], resumed[k]) for k in ("epsilon", "steps", "test_acc", "test_loss")}
    print("uninterrupted vs killed-and-resumed:", json.dumps(table))


def test_changed_job_does_not_continue_another_configurations_checkpoint(tiny_cfg, tmp_path):
    job = tmp_path / "job"
    sweep.prepare_job(tiny_cfg("optimizer.lr=0.5", output_dir=job), job, [])
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.ckpt").write_text("another configuration's")
    (job / "hpc_ckpt_1.ckpt").write_text("Lightning's requeue checkpoint")
    assert sweep.prepare_job(tiny_cfg("optimizer.lr=0.1", output_dir=job), job, []) is None
    assert not sweep.resumes(job)
    assert not (job / "hpc_ckpt_1.ckpt").exists()
    # the same configuration again: its own checkpoint is kept and continued
    cfg = tiny_cfg("optimizer.lr=0.1", output_dir=job)
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.ckpt").write_text("its own")
    assert sweep.prepare_job(cfg, job, []) is None
    assert sweep.resumes(job)
