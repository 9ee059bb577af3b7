"""Resumable multiruns: job dirs from overrides, finished jobs skipped, killed jobs re-run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dpexp import report, sweep
from dpexp.errors import ConfigError, UserError
from dpexp.results import RESULT_FILE, read_result, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
# Tiny jobs: 4 DP steps on 1×16×16 synthetic images.
TINY_CLI = [
    "dataset=synthetic",
    "dataset.image_shape=[1,16,16]",
    "dataset.size=128",
    "dataset.synthetic_test_size=64",
    "dataset.batch_size=32",
    "trainer.max_epochs=1",
    "privacy.delta=1e-3",
    "privacy.accountant=rdp",  # calibrates σ faster than prv
    "logger=none",
    "trainer.enable_progress_bar=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def sweep_command(sweep_dir: Path, *extra: str) -> list[str]:
    """A 3-job sweep (seed × ε=3)."""
    return [
        sys.executable, "-m", "dpexp.train", "-m", *TINY_CLI,
        "privacy.epsilon=3", "seed=0,1,2", f"hydra.sweep.dir={sweep_dir}", *extra,
    ]  # fmt: skip


def finished(sweep_dir: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sweep_dir.glob(f"*/{RESULT_FILE}")}


def test_job_dirname_is_safe_and_distinct():
    assert sweep.job_dirname("a=1,b=[1,2],c=x/y z") == "a=1,b=_1,2_,c=x_y_z"
    assert sweep.split_items("a.b=[1,2],c='x,y',d=3") == ["a.b=[1,2]", "c='x,y'", "d=3"]
    # leaf keys where unambiguous: dataset.size vs model.size keep their group
    name = sweep.job_dirname("+dataset.size=1,dataset.train_size=2,model.size=3,seed=0")
    assert name == "+dataset.size=1,train_size=2,model.size=3,seed=0"
    assert sweep.job_dirname("") == "defaults"
    long_a, long_b = "k=" + "a" * 300, "k=" + "a" * 299 + "b"
    name_a, name_b = sweep.job_dirname(long_a), sweep.job_dirname(long_b)
    assert len(name_a) == sweep.MAX_DIRNAME and name_a != name_b


def test_sweep_dir_is_timestamped_only_when_asked():
    assert sweep.sweep_stamp(False, "2026-01-01_00-00-00") == ""
    assert sweep.sweep_stamp(True, "2026-01-01_00-00-00") == "/2026-01-01_00-00-00"


def test_job_dirs_come_from_overrides_without_logging_keys(tiny_cfg, tmp_path):
    cfg = tiny_cfg("privacy.epsilon=2", "+sweep=eps_seed", "logger=csv", "resume=true")
    hydra = cfg.hydra
    assert OmegaConf.select(cfg, "hydra.sweep.dir") == "multirun/eps_seed"
    subdir = sweep.job_dirname(hydra.job.override_dirname)
    assert "epsilon=2" in subdir
    for key in ("sweep", "logger", "resume"):
        assert f"{key}=" not in subdir.replace("+", "")
    assert dict(hydra.sweeper.params) == {"privacy.epsilon": "1,3,8", "seed": "0,1,2"}
    stamped = tiny_cfg("sweep_stamp=true")
    assert re.fullmatch(r"multirun/train/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d",
                        OmegaConf.select(stamped, "hydra.sweep.dir"))  # fmt: skip


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))
def test_every_sweep_config_composes(tiny_cfg, name):
    cfg = tiny_cfg(f"+sweep={name}")
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    assert OmegaConf.select(cfg, "hydra.sweep.dir") == f"multirun/{name}"


def test_identity_counts_averaging_and_schedule_but_not_logging(tiny_cfg):
    """Averaging and a schedule change what a job computes; absent, they leave the hash of
    configs from before they existed unchanged."""
    base = tiny_cfg("callbacks.ema=null")
    legacy = OmegaConf.to_container(base, resolve=False)
    del legacy["scheduler"], legacy["callbacks"]["ema"]
    assert sweep.identity_hash(base) == sweep.identity_hash(OmegaConf.create(legacy))
    hashes = {
        sweep.identity_hash(tiny_cfg(*o))
        for o in [("callbacks.ema=null",), (), ("callbacks.ema.decay=0.99",), ("scheduler=cosine",)]
    }
    assert len(hashes) == 4
    assert sweep.identity_hash(tiny_cfg("logger=csv")) == sweep.identity_hash(tiny_cfg())


def test_prepare_job_skips_finished_and_cleans_killed(tiny_cfg, tmp_path):
    job = tmp_path / "job"
    cfg = tiny_cfg(output_dir=job)
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").write_text("partial")
    assert sweep.prepare_job(cfg, job, ["seed=0"]) is None  # a killed attempt: run again
    assert not (job / "checkpoints").exists()  # ... from scratch
    assert sweep.read_job(job)["overrides"] == ["seed=0"]
    write_json_atomic(job / RESULT_FILE, {"test_acc": 0.5})
    assert sweep.prepare_job(cfg, job, ["seed=0"]) == {"test_acc": 0.5}
    # logging and resume options do not make it another job
    assert sweep.prepare_job(tiny_cfg("logger=csv", output_dir=job), job, []) is not None
    with pytest.raises(UserError, match="different configuration"):
        sweep.prepare_job(tiny_cfg("optimizer.lr=0.01", output_dir=job), job, [])


def test_prepare_job_keeps_checkpoints_when_resuming(tiny_cfg, tmp_path):
    job = tmp_path / "job"
    cfg = tiny_cfg("resume=true", output_dir=job)
    sweep.prepare_job(cfg, job, [])
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.ckpt").write_text("epoch 1")
    assert sweep.prepare_job(cfg, job, []) is None
    assert (job / "checkpoints" / "last.ckpt").read_text() == "epoch 1"


@pytest.mark.parametrize(
    ("devices", "strategy", "ok"),
    [(1, "auto", True), (2, "ddp_spawn", True), ("0,1", "ddp_fork", True), (2, "ddp", False),
     (-1, "auto", False), ("2", "fsdp", False), ([0, 1], "ddp", False),
     (2, {"_target_": "lightning.pytorch.strategies.DDPStrategy", "start_method": "spawn"}, True),
     (2, {"_target_": "lightning.pytorch.strategies.DDPStrategy"}, False)],
)  # fmt: skip
def test_multi_device_jobs_in_a_multirun_must_spawn(devices, strategy, ok):
    cfg = OmegaConf.create({"trainer": {"devices": devices, "strategy": strategy}})
    if ok:
        sweep.check_strategy(cfg)
    else:
        with pytest.raises(ConfigError, match=r"trainer\.strategy"):
            sweep.check_strategy(cfg)


@pytest.mark.slow  # a real `python -m dpexp.train -m` subprocess
def test_killed_sweep_resumes_without_repeating_finished_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    first = subprocess.Popen(
        sweep_command(sweep_dir), cwd=REPO, env=ENV, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not finished(sweep_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the whole sweep, as a scheduler would
    first.wait()
    done_before = finished(sweep_dir)
    assert 1 <= len(done_before) < 3, "the sweep must be killed part-way"
    mtimes = {name: (sweep_dir / name / RESULT_FILE).stat().st_mtime_ns for name in done_before}

    second = subprocess.run(
        sweep_command(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    done_after = finished(sweep_dir)
    assert len(done_after) == 3
    skipped = [line for line in second.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == len(done_before)
    for name, content in done_before.items():  # finished jobs were not run again
        assert done_after[name] == content
        assert (sweep_dir / name / RESULT_FILE).stat().st_mtime_ns == mtimes[name]
    rows = report.collect(sweep_dir)
    assert (rows["status"] == report.STATUS_COMPLETE).sum() == 3
    assert sorted(rows["seed"]) == [0, 1, 2]
    for job, target in zip(rows["job"], rows["privacy.epsilon"], strict=True):
        assert json.loads((sweep_dir / job / sweep.JOB_FILE).read_text())["identity_hash"]
        assert read_result(sweep_dir / job)["epsilon"] <= target


@pytest.mark.slow  # a real `python -m dpexp.train -m` subprocess
def test_single_run_still_refuses_to_overwrite(tmp_path):
    cmd = [sys.executable, "-m", "dpexp.train", *TINY_CLI, f"hydra.run.dir={tmp_path / 'run'}"]
    write_json_atomic(tmp_path / "run" / RESULT_FILE, {"test_acc": 0.5})
    out = subprocess.run(cmd, cwd=REPO, env=ENV | {"HYDRA_FULL_ERROR": "0"}, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "already exists" in out.stderr


def test_optuna_search_composes_at_fixed_epsilon(tiny_cfg):
    cfg = tiny_cfg("hparams_search=lr_clip_optuna", "privacy.epsilon=2")
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "privacy.max_grad_norm"}
    assert cfg.privacy.epsilon == 2 and cfg.hydra.sweeper.direction == "maximize"


@pytest.mark.parametrize("launcher", ["joblib", "slurm_gpu", "ray_gpu"])
def test_launcher_configs_compose_with_one_gpu_per_job(tiny_cfg, launcher):
    cfg = tiny_cfg(f"hydra/launcher={launcher}", "trainer=ddp_spawn")
    sweep.check_strategy(cfg)  # 2 devices, spawn: allowed inside a multirun
    gpus = {"slurm_gpu": "gpus_per_node", "ray_gpu": "ray.remote.num_gpus"}.get(launcher)
    if gpus:
        assert OmegaConf.select(cfg.hydra.launcher, gpus) == 1
