"""Sweeps through real launchers: Ray (a local instance), submitit's local executor (with a
preemption it requeues), and the sbatch script submitit writes for hydra/launcher=slurm_gpu.

Each sweep is 2 tiny jobs (seed 0, 1) run one at a time (one CPU slot): Ray with
``num_cpus=1``, submitit with ``hydra.sweeper.max_batch_size=1``."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn
from hydra.types import HydraContext
from hydra.utils import instantiate

from dpexp.results import RESULT_FILE, read_result
from tests.test_preemption import COMPARED, ENV, JOB, REPO, TINY_CLI, signal_method

DOC = REPO / "docs" / "distributed.md"
SBATCH_BEGIN, SBATCH_END = "<!-- sbatch:begin -->", "<!-- sbatch:end -->"
# The slurm_gpu example of the docs: 2 jobs on partition `gpu`.
SLURM_OVERRIDES = ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"]


def sweep_command(sweep_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dpexp.train", "-m", *TINY_CLI, *JOB, "seed=0,1",
        f"hydra.sweep.dir={sweep_dir}", *extra,
    ]  # fmt: skip


def results_by_seed(sweep_dir: Path) -> dict[int, dict]:
    results = [read_result(p.parent) for p in sweep_dir.glob(f"*/{RESULT_FILE}")]
    return {r["seed"]: r for r in results}


def finished_bytes(sweep_dir: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sweep_dir.glob(f"*/{RESULT_FILE}")}


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the prefix of its workers' lines


def run_sweep(command: list[str], **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(command, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    out.stdout = ANSI.sub("", out.stdout)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, dict]:
    """The same two jobs through the basic launcher, in this order, never interrupted."""
    sweep_dir = tmp_path_factory.mktemp("basic") / "sweep"
    run_sweep(sweep_command(sweep_dir))
    return results_by_seed(sweep_dir)


def assert_same_results(results: dict[int, dict], reference: dict[int, dict]) -> None:
    assert sorted(results) == sorted(reference) == [0, 1]
    for seed, result in results.items():
        for key in COMPARED:
            assert result[key] == reference[seed][key], (seed, key)


@pytest.mark.slow  # two sweeps through a local Ray instance
def test_ray_sweep_runs_each_job_in_a_ray_worker_and_a_rerun_skips_them(tmp_path, uninterrupted):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher.ray_launcher")
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(sweep_dir, "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=1")
    first = run_sweep(command, RAY_DEDUP_LOGS="0")
    assert "Ray Launcher is launching 2 jobs" in first.stdout + first.stderr
    # Ray prefixes each worker's output with its pid: two jobs, two fresh workers (max_calls=1)
    ran = re.findall(r"\((?:\w+ )?pid=(\d+)[^)]*\) run dir: ", first.stdout)
    assert len(ran) == 2 and len(set(ran)) == 2, first.stdout[-3000:]
    assert_same_results(results_by_seed(sweep_dir), uninterrupted)
    before = finished_bytes(sweep_dir)

    again = run_sweep(command, RAY_DEDUP_LOGS="0")
    assert len(re.findall(r"pid=\d+[^)]*\) skipped, already complete", again.stdout)) == 2
    assert finished_bytes(sweep_dir) == before


def submitit_jobs(sweep_dir: Path) -> list[Path]:
    """submitit's job folders (``%j`` → the job id; ``%j`` itself holds pickles in transit)."""
    return sorted(p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())


@pytest.mark.slow  # a sweep through submitit's local executor, each job in its own process
def test_submitit_local_jobs_are_preempted_requeued_and_resume(tmp_path, uninterrupted):
    """Each job gets submitit's preemption signal (SIGUSR2) inside DP step 3 of 8, before any
    checkpoint exists (no step checkpoints; the first epoch ends at step 4): dpexp saves
    last.ckpt after the step, submitit pickles the job again and exits for requeue, its local
    controller restarts the job, and the job continues from that last.ckpt, ending as the
    uninterrupted run."""
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(
        sweep_dir, "hydra/launcher=submitit_local", "hydra.sweeper.max_batch_size=1",
        "callbacks.step_checkpoint.every_n_train_steps=0", *signal_method(3, "SIGUSR2"),
    )  # fmt: skip
    run_sweep(command)
    jobs = submitit_jobs(sweep_dir)
    assert len(jobs) == 2  # one submitit job per sweep job (the sweep ran one at a time)
    for folder in jobs:
        names = {p.name.removeprefix(folder.name) for p in folder.iterdir()}
        assert {"_submitted.pkl", "_0_result.pkl", "_0_log.out", "_0_log.err"} <= names
        log = (folder / f"{folder.name}_0_log.err").read_text()
        log += (folder / f"{folder.name}_0_log.out").read_text()
        assert "this job is preempted" in log and "Requeued job" in log, log[-3000:]
        assert "continuing the interrupted attempt from" in log, log[-3000:]
    assert_same_results(results_by_seed(sweep_dir), uninterrupted)


def generated_sbatch(tmp_path: Path, monkeypatch, tiny_cfg) -> str:
    """The sbatch script that hydra/launcher=slurm_gpu makes submitit submit for 2 jobs: the
    launcher's own launch(), with `sbatch` replaced by a script that keeps what it is given,
    an `srun` that submitit only looks for, and the wait for the jobs' results skipped."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.Job, "results", lambda self: [JobReturn()])
    sweep_dir = tmp_path / "multirun" / "eps_seed"
    cfg = tiny_cfg(*SLURM_OVERRIDES, f"hydra.sweep.dir={sweep_dir}", "hydra.job.name=train")
    launcher = instantiate(cfg.hydra.launcher)
    context = HydraContext(config_loader=None, callbacks=None)
    launcher.setup(hydra_context=context, task_function=print, config=cfg)
    launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    text = (tmp_path / "submitted.sh").read_text()
    return text.replace(f"{tmp_path}/", "").replace(shlex.quote(sys.executable), "python")


def documented_sbatch() -> str:
    doc = DOC.read_text()
    block = doc.split(SBATCH_BEGIN, 1)[1].split(SBATCH_END, 1)[0]
    return block.strip().removeprefix("```bash").removesuffix("```").strip() + "\n"


def test_slurm_gpu_sbatch_script_is_submitits_own_and_is_the_documented_one(
    tmp_path, monkeypatch, tiny_cfg
):
    script = generated_sbatch(tmp_path, monkeypatch, tiny_cfg)
    for line in (
        "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120", "#SBATCH --array=0-1%2", "#SBATCH --open-mode=append",
        "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
    ):  # fmt: skip
        assert line in script.splitlines(), line
    assert script == documented_sbatch(), f"docs/distributed.md is out of date:\n{script}"
