"""Loggers: W&B offline (one run per job, privacy facts as metrics), TensorBoard, CSV."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from dpexp import tracking
from dpexp.train import run
from tests.test_sweep import ENV, REPO, TINY_CLI

PRIVACY_METRICS = ("result/epsilon", "result/sample_rate", "result/noise_multiplier",
                   "result/trainable_fraction")  # fmt: skip


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"),
            "WANDB_SILENT": "true"}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "netrc", "offline"),
    [({"WANDB_MODE": "online"}, "", False), ({"WANDB_MODE": "offline"}, "", True),
     ({"WANDB_API_KEY": "k"}, "", False), ({}, "machine api.wandb.ai login user password k\n",
     False), ({}, "", True)],
)  # fmt: skip
def test_wandb_is_offline_unless_logged_in_or_asked(env, netrc, offline, tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh home: only this test's netrc
    monkeypatch.delenv("NETRC", raising=False)
    if netrc:
        (tmp_path / ".netrc").write_text(netrc)
        (tmp_path / ".netrc").chmod(0o600)
    assert tracking.wandb_offline() is offline


def test_wandb_run_logs_privacy_facts_and_finishes(tiny_cfg, tmp_path, wandb_offline):
    import wandb

    cfg = tiny_cfg("logger=wandb", "task_name=my_sweep", "privacy.epsilon=2")
    result = run(cfg, tmp_path / "run")
    try:
        active = wandb.run
        assert active is not None and active.offline
        assert active.group == "my_sweep"
        assert "privacy.epsilon=2" in active.tags
        assert active.config["privacy"]["epsilon"] == 2
        for key in PRIVACY_METRICS:
            assert active.summary[key] == pytest.approx(result[key.removeprefix("result/")])
        assert active.summary["epsilon"] == pytest.approx(result["epsilon"])  # per epoch
    finally:
        tracking.finish_wandb()
    assert wandb.run is None
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow  # a real `python -m dpexp.train -m` subprocess
def test_multirun_jobs_never_share_a_wandb_run(tmp_path, wandb_offline):
    cmd = [sys.executable, "-m", "dpexp.train", "-m", *TINY_CLI, "logger=wandb", "seed=0,1",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=ENV | wandb_offline, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].parent.parent != runs[1].parent.parent
    ids = {next(r.glob("run-*.wandb")).stem for r in runs}
    assert len(ids) == 2  # one W&B run per job, each closed before the next began
    assert not list((tmp_path / "wandb_dir").rglob("offline-run-*"))  # all under job dirs


def test_tensorboard_and_csv_log_privacy_facts(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(tiny_cfg("logger=[csv,tensorboard]"), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epsilon", *PRIVACY_METRICS} <= tags
    noise = events.Scalars("result/noise_multiplier")[-1].value
    assert noise == pytest.approx(result["noise_multiplier"], rel=1e-6)
    metrics = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    last = metrics.dropna(subset=["result/epsilon"]).iloc[-1]
    assert last["result/epsilon"] == pytest.approx(result["epsilon"])
    assert last["result/sample_rate"] == pytest.approx(result["sample_rate"])
    hparams = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert hparams["privacy"]["delta"] == pytest.approx(1e-3)
    assert os.path.isfile(tmp_path / "run" / "result.json")


PRIVATE_COLUMNS = {"train/loss_step", "train/clip_fraction_step", "train/grad_norm_step",
                   "train/batch_size"}  # fmt: skip


def test_logs_hold_only_dp_outputs_and_public_evaluations_by_default(tiny_cfg, tmp_path):
    """The exact Poisson batch size, clip fraction, median per-sample norm and train loss
    are statistics of private batches that the accountant does not count."""
    result = run(tiny_cfg("logger=[csv,tensorboard]"), tmp_path / "run")
    columns = set(pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv").columns)
    assert not {c for c in columns if c.startswith("train/")} - {
        "train/update_norm_step",
        "train/update_norm_epoch",
        "train/lr",
    }
    assert {"train/update_norm_step", "train/lr", "epsilon", "test/acc"} <= columns
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert not PRIVATE_COLUMNS & set(events.Tags()["scalars"])
    assert result["logs_contain_private_statistics"] is False


def test_private_stats_are_logged_on_request_and_the_run_is_marked(tiny_cfg, tmp_path):
    result = run(tiny_cfg("logger=csv", "logger.private_stats=true"), tmp_path / "run")
    columns = set(pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv").columns)
    assert columns >= PRIVATE_COLUMNS
    assert result["logs_contain_private_statistics"] is True


def test_a_non_private_run_says_its_logs_hold_private_statistics(tiny_cfg, tmp_path):
    result = run(tiny_cfg("privacy=none"), tmp_path / "run")
    assert result["logs_contain_private_statistics"] is True


def test_wandb_tags_mark_runs_with_private_statistics(tiny_cfg):
    from omegaconf import OmegaConf

    marked = tiny_cfg("logger=wandb", "logger.private_stats=true")
    plain = tiny_cfg("logger=wandb")
    tags = OmegaConf.to_container(marked.logger.wandb, resolve=True)["tags"]
    assert tracking.PRIVATE_STATS_TAG in tags
    assert (
        tracking.PRIVATE_STATS_TAG
        not in OmegaConf.to_container(plain.logger.wandb, resolve=True)["tags"]
    )
