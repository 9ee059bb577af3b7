"""The sweep report on a hand-made sweep dir: rows, aggregates, plots, missing jobs."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from dpexp import report, tables
from dpexp.errors import UserError
from dpexp.results import RESULT_FILE, write_json_atomic
from dpexp.sweep import grid_job_dirnames, job_dirname

RATES, EPSILONS, SEEDS = (0.0, 0.8), (1, 8), (0, 1)


def accuracy(rate: float, eps: int, seed: int) -> float:
    return 0.5 + 0.04 * eps - 0.1 * rate + 0.01 * seed


def make_job(sweep_dir: Path, overrides: list[str], result: dict | None) -> Path:
    """A job dir as Hydra and dpexp.train leave it."""
    job = sweep_dir / job_dirname(",".join(sorted(overrides)))
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    eps = float(overrides[1].split("=")[1])
    OmegaConf.save(OmegaConf.create({"privacy": {"enabled": True, "epsilon": eps}}),
                   job / ".hydra" / "config.yaml")  # fmt: skip
    if result is not None:
        write_json_atomic(job / RESULT_FILE, result)
    return job


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """2 rates × 2 ε × 2 seeds planned; one job killed (no result), one never started."""
    sweep_dir = tmp_path / "sweep"
    grid = {"pruning.rate": "0.0,0.8", "privacy.epsilon": "1,8", "seed": "0,1"}
    multirun = {"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": grid},
        "overrides": {"task": ["+sweep=pruning_eps"]},
    }}  # fmt: skip
    sweep_dir.mkdir()
    OmegaConf.save(OmegaConf.create(multirun), sweep_dir / "multirun.yaml")
    for rate, eps, seed in itertools.product(RATES, EPSILONS, SEEDS):
        if (rate, eps, seed) == (0.8, 8, 1):
            continue  # never started
        overrides = [f"pruning.rate={rate}", f"privacy.epsilon={eps}", f"seed={seed}",
                     "+sweep=pruning_eps"]  # fmt: skip
        killed = (rate, eps, seed) == (0.8, 8, 0)
        result = None if killed else {
            "test_acc": accuracy(rate, eps, seed), "epsilon": eps * 0.999, "seed": seed,
            "pruning_rate": rate, "trainable_fraction": 1 - rate * 0.9,
            "accountant_history": [[1.0, 0.1, 10]], "method": "freeze",
        }  # fmt: skip
        make_job(sweep_dir, overrides, result)
    return sweep_dir


def test_collect_lists_every_planned_job(sweep_dir):
    df = report.collect(sweep_dir)
    assert len(df) == 8
    counts = df["status"].value_counts().to_dict()
    assert counts == {report.STATUS_COMPLETE: 6, report.STATUS_INCOMPLETE: 1,
                      report.STATUS_NOT_STARTED: 1}  # fmt: skip
    killed = df[df["status"] == report.STATUS_INCOMPLETE].iloc[0]
    assert (killed["pruning.rate"], killed["privacy.epsilon"], killed["seed"]) == (0.8, 8, 0)
    never = df[df["status"] == report.STATUS_NOT_STARTED].iloc[0]
    assert (never["pruning.rate"], never["privacy.epsilon"], never["seed"]) == (0.8, 8, 1)
    assert df["target_epsilon"].tolist().count(8.0) == 4


def test_summary_files_and_aggregates(sweep_dir, tmp_path):
    out = tmp_path / "out"
    text = report.summarize(report.collect(sweep_dir), out)
    for name in ("results.csv", "results.parquet", "summary.md", *report.PLOTS):
        assert (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(out / "results.csv")
    parquet = pd.read_parquet(out / "results.parquet")
    assert len(csv) == len(parquet) == 8
    # mean ± std over seeds, per (ε, rate)
    row = csv[(csv["pruning.rate"] == 0.0) & (csv["privacy.epsilon"] == 1)]
    assert sorted(row["test_acc"]) == pytest.approx([accuracy(0, 1, 0), accuracy(0, 1, 1)])
    expected_std = np.std([accuracy(0, 1, 0), accuracy(0, 1, 1)], ddof=1)
    assert f"| 1 | 0 | 2 | {accuracy(0, 1, 0.5):.4g} | {expected_std:.4g} |" in text
    assert "## 2 jobs without a complete result.json" in text
    assert "- incomplete: " in text and "- not started: " in text
    assert "6 of 8 jobs complete" in text


def test_pareto_front():
    eps = np.array([1.0, 1.0, 8.0, 8.0, 1.0])
    fraction = np.array([1.0, 0.2, 0.2, 1.0, 0.2])
    acc = np.array([0.9, 0.8, 0.95, 0.94, 0.7])
    # (1, .2, .8) beats (1, .2, .7); (8, .2, .95) beats (8, 1, .94)
    assert report.pareto_mask(eps, fraction, acc).tolist() == [True, True, True, False, False]


def test_line_variable_prefers_a_method_rate(sweep_dir):
    df = report.collect(sweep_dir)
    done = df[df["status"] == report.STATUS_COMPLETE]
    assert report.line_variable(done, report.factors(df, df.attrs["overrides"])) == "pruning_rate"
    assert report.factors(df, df.attrs["overrides"]) == ["pruning.rate"]


def test_cli_refuses_a_dir_without_jobs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path)])
    assert exc.value.code == 2
    assert "no jobs found" in capsys.readouterr().err


def test_paper_table_sets_ours_beside_published(tmp_path):
    table = tables.TABLES["sa_dpsgd"]
    sweep_dir = tmp_path / "multirun" / table.sweeps[0].task_name(["trainer.max_epochs=3"])
    assert sweep_dir.name.startswith("sa_dpsgd-")
    accs = {("mnist", "dpsgd"): (0.97, 0.98), ("mnist", "screen"): (0.975, 0.985),
            ("fashion_mnist", "dpsgd"): (0.85, 0.86)}  # fmt: skip
    for (dataset, method), values in accs.items():
        for seed, acc in enumerate(values):
            overrides = [f"dataset={dataset}", f"method={method}", f"seed={seed}"]
            job = sweep_dir / job_dirname(",".join(overrides))
            (job / ".hydra").mkdir(parents=True)
            OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
            write_json_atomic(job / RESULT_FILE, {
                "test_acc": acc, "epsilon": 2.99, "epochs": 3, "dataset": dataset,
                "method": method, "seed": seed, "trainable_fraction": 1.0,
            })  # fmt: skip
    assert tables.keep_results("sa_dpsgd", table, tmp_path, ["trainer.max_epochs=3"]) == 6
    shutil.rmtree(tmp_path / "multirun" / sweep_dir.name / next(iter(sorted(
        p.name for p in sweep_dir.iterdir()))))  # fmt: skip
    done, missing = tables.collect("sa_dpsgd", table, tmp_path, ["trainer.max_epochs=3"])
    merged = tables.merge(table, done).set_index(["dataset", "method"])
    assert merged.loc[("mnist", "dpsgd"), "ours"] == pytest.approx(97.5)
    assert merged.loc[("mnist", "dpsgd"), "published"] == 98.12
    assert merged.loc[("mnist", "dpsgd"), "diff"] == pytest.approx(97.5 - 98.12)
    assert merged.loc[("fashion_mnist", "dpsgd"), "seeds"] == 2
    assert ("fashion_mnist", "screen") not in merged.index  # not run: not invented
    text = tables.document("sa_dpsgd", table, merged.reset_index(), missing,
                           ["trainer.max_epochs=3"], done=done)  # fmt: skip
    assert (
        "| mnist | dpsgd | 2.990 | 3 | 97.50 ± 0.71 (n=2, 3 of 40 epochs) | 98.12 | -0.62 |" in text
    )
    assert "- Epochs: 3 (paper: 40)" in text and "Machine: not recorded by 6 jobs" in text
    assert "Deviations from the paper:" in text and "trainer.max_epochs=3" in text
    assert (sweep_dir / "report" / "results.csv").is_file()
    kept = tmp_path / "docs" / "results" / "sa_dpsgd"
    assert (kept / "results.csv").is_file()  # all six jobs, also the one no longer in multirun
    shutil.rmtree(tmp_path / "multirun")  # a fresh clone: only the committed results
    again, _ = tables.collect("sa_dpsgd", table, tmp_path, ["trainer.max_epochs=3"])
    assert len(again) == 6 and sorted(again["test_acc"]) == sorted(done["test_acc"])


def test_the_page_says_where_and_how_long_the_jobs_ran():
    """The machine comes from the jobs' results, not from where the page is generated; jobs
    that did not record it are counted as such."""
    done = pd.DataFrame({"hardware": ["GPU box", "GPU box", None],
                         "wall_s": [100.0, 300.0, 200.0]})  # fmt: skip
    lines = tables.machine_lines(done)
    assert lines[0].startswith(
        "- Machine: GPU box (2 jobs); not recorded by 1 jobs, run before results did so; "
        "this page was generated on "
    )
    assert lines[1] == "- Wall time: 100–300 s per job (median 200 s), 3 jobs, 0.2 h in all"
    assert len(tables.machine_lines(done.drop(columns="wall_s"))) == 1


def test_tables_without_published_numbers_say_so():
    table = tables.TABLES["pruning_tradeoff"]
    done = pd.DataFrame({"dataset": ["mnist"] * 2, "pruning.scorer": ["random"] * 2,
                         "pruning.rate": [0.5] * 2, "privacy.epsilon": [1] * 2,
                         "test_acc": [0.9, 0.92]})  # fmt: skip
    text = tables.document("pruning_tradeoff", table, tables.merge(table, done), [], [])
    assert "| mnist | random | 0.5 | 1 | 91.00 ± 1.41 (n=2) | n/a | n/a |" in text


def test_tables_cli_takes_overrides_after_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tables, "REPO", tmp_path)
    with pytest.raises(SystemExit) as exc:
        tables.main(["clipping_speed", "--doc", str(tmp_path / "t.md"), "bench.threads=1"])
    assert exc.value.code == 2 and "run `make bench`" in capsys.readouterr().err


def test_jobs_with_extra_overrides_get_their_own_rows():
    table = tables.TABLES["rgp_ablation"]
    done = pd.DataFrame({"dataset": ["mnist"] * 3, "method": ["rgp"] * 3, "rgp.rank": [4] * 3,
                         "privacy.epsilon": [3] * 3, "model.width": [None, None, 2],
                         "seed": [0, 1, 0], "test_acc": [0.7, 0.72, 0.75]})  # fmt: skip
    done.attrs["overrides"] = ["method", "rgp.rank", "privacy.epsilon", "model.width", "seed"]
    merged = tables.merge(table, done)
    assert merged["seeds"].tolist() == [1, 2] or merged["seeds"].tolist() == [2, 1]
    text = tables.document("rgp_ablation", table, merged, [], [])
    assert "| mnist | rgp | 4 | 3 | – | 71.00 ± 1.41 (n=2) | n/a | n/a |" in text
    assert "| mnist | rgp | 4 | 3 | 2 | 75.00 (n=1) | n/a | n/a |" in text  # one seed: no ±
    assert "± 0.00" not in text


def test_published_number_is_found_beside_extra_cell_keys_and_the_finding_is_printed():
    """A cell with more keys than the published table (screen.validation) still gets the
    published number of its (dataset, method); the kept finding goes under the table."""
    table = tables.TABLES["sa_dpsgd"]
    done = pd.DataFrame({
        "dataset": ["mnist"] * 4, "method": ["dpsgd", "dpsgd", "screen", "screen"],
        "screen.validation": [None, None, "public", "private_noisy"],
        "seed": [0, 1, 0, 0], "test_acc": [0.98, 0.982, 0.978, 0.97], "epochs": [40] * 4,
    })  # fmt: skip
    done.attrs["overrides"] = ["dataset", "method", "screen.validation", "seed"]
    merged = tables.merge(table, done)
    published = dict(zip(merged["screen.validation"].fillna("-"), merged["published"], strict=True))
    assert published == {"-": 98.12, "public": 98.35, "private_noisy": 98.35}
    text = tables.document("sa_dpsgd", table, merged, [], [], "Claim: x. Measured: y.")
    assert text.rstrip().endswith(
        "## The seed's claim and what we measured\n\nClaim: x. Measured: y."
    )


def test_closeness_table_sets_the_sources_side_by_side_best_first():
    table = tables.TABLES["closeness"]
    done = pd.DataFrame({
        "dataset": ["mnist"] * 5, "method": ["freeze"] * 5,
        "public.source": ["heldout", "heldout", "digits", "none", "fashion_mnist"],
        "pruning.rate": [0.5] * 5, "privacy.epsilon": [1] * 5, "seed": [0, 1, 0, 0, 0],
        "test_acc": [0.95, 0.97, 0.955, 0.93, 0.96],
    })  # fmt: skip
    done.attrs["overrides"] = ["public.source", "method", "pruning.rate", "seed"]
    text = tables.document("closeness", table, tables.merge(table, done), [], [])
    assert "| dataset | method | pruning.rate | privacy.epsilon | digits | fashion_mnist |" in text
    assert (
        "| mnist | freeze | 0.5 | 1 | 95.50 (n=1) | 96.00 (n=1) | 96.00 ± 1.41 (n=2) | 93.00 (n=1)"
        " | fashion_mnist = heldout > digits > none |" in text
    )


def test_table_lists_every_grid_job_without_a_kept_result(tmp_path):
    """Jobs launched one at a time leave no multirun.yaml of the whole grid: the missing jobs
    come from the table's sweeps and the experiment's own grid, named as Hydra names them."""
    table = tables.TABLES["rgp_ablation"]
    extra = ["trainer.max_epochs=1"]
    task = table.sweeps[0].task_name(extra)
    grid = [job for sweep in table.sweeps for job in grid_job_dirnames([*sweep.args, *extra])]
    assert (
        len(grid) == 16 + 8  # the grid, seeds 1-2 of its closest cells
        and "+width=4,experiment=rgp_ablation,method=rgp,epsilon=3,rank=16,max_epochs=1" in grid
    )
    finished, killed = grid[0], grid[1]
    job = tmp_path / "multirun" / task / finished
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["method=dpsgd"]), job / ".hydra" / "overrides.yaml")
    write_json_atomic(job / RESULT_FILE, {
        "test_acc": 0.9, "epsilon": 0.999, "epochs": 1, "dataset": "mnist", "method": "dpsgd",
        "seed": 0, "trainable_fraction": 1.0, "accountant_history": [[1.0, 0.1, 10]],
    })  # fmt: skip
    (tmp_path / "multirun" / task / killed).mkdir()
    with pytest.raises(UserError, match="holds no results"):
        tables.collect("rgp_ablation", table, tmp_path, extra)  # nothing kept yet
    tables.keep_results("rgp_ablation", table, tmp_path, extra)
    done, missing = tables.collect("rgp_ablation", table, tmp_path, extra)
    assert len(done) == 1 and len(missing) == 23
    assert f"{task}: incomplete: {killed}" in missing
    assert f"{task}: not run: {grid[2]}" in missing
    assert not any(finished in m for m in missing)


def test_a_table_with_one_sweep_not_run_yet_lists_its_jobs(tmp_path):
    table = tables.TABLES["pruning_tradeoff"]
    job = tmp_path / "docs" / "results" / "pruning_tradeoff" / "pruning_tradeoff"
    job /= "experiment=pruning_tradeoff,epsilon=1,rate=0,scorer=magnitude"
    job.mkdir(parents=True)
    overrides = ["experiment=pruning_tradeoff", "privacy.epsilon=1", "pruning.scorer=magnitude",
                 "pruning.rate=0"]  # fmt: skip
    write_json_atomic(job / "job.json", {"overrides": overrides})
    write_json_atomic(job / RESULT_FILE, {"test_acc": 0.96, "epochs": 40, "dataset": "mnist"})
    done, missing = tables.collect("pruning_tradeoff", table, tmp_path, [])
    assert len(done) == 1
    fmnist = 30 + 8 + 9  # the same grid, seeds 1-2 and select on FashionMNIST
    assert len(missing) == 30 + 8 + 9 - 1 + fmnist  # grid, seeds 1-2, select on MNIST
    assert sum(m.startswith("pruning_tradeoff_fmnist: not run: ") for m in missing) == fmnist
