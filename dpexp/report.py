"""Collect a sweep's jobs into a table and plots, or plot one run's logged metrics.

python -m dpexp.report multirun/<sweep> [--out DIR]
python -m dpexp.report <run dir> [--out DIR]

A sweep: writes ``results.csv`` and ``results.parquet`` (one row per job, finished or not),
three PNG plots and ``summary.md`` into ``DIR`` (default ``<sweep>/report``), and prints the
summary. Jobs without a complete ``result.json`` (killed, failed, never started) are listed,
not dropped. A run dir (one holding ``csv/metrics.csv``): ``metrics.png``, each logged metric
over the optimizer steps, into ``DIR`` (default ``<run dir>/report``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from dpexp.errors import UserError
from dpexp.results import read_result
from dpexp.sweep import JOB_FILE, read_job

# Result fields that name the sparsity of a method, preferred as the "one line per" variable.
RATE_FIELDS = ("pruning_rate", "select_rate", "rgp_rank", "rank")
# Overrides that never define a line or a group: seeds are averaged over.
NOT_A_FACTOR = ("seed", "privacy.epsilon")
STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"  # a job dir without a complete result.json
STATUS_NOT_STARTED = "not started"  # in the sweep's grid, no job dir
PLOTS = ("acc_vs_epsilon.png", "acc_vs_trainable_fraction.png", "pareto.png")


def _parse_value(text: str) -> Any:
    """Override values as numbers where they are numbers (``1e-3`` included)."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text else number


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def job_overrides(job_dir: Path) -> list[str]:
    """The overrides a job ran with: from job.json (written when it ran), else .hydra."""
    job = read_job(job_dir)
    if job and "overrides" in job:
        return list(job["overrides"])
    path = job_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


def target_epsilon(job_dir: Path) -> float | None:
    """The ε the job was configured to spend (its budget), from its recorded config."""
    job = read_job(job_dir)
    config = job.get("config") if job else None
    if config is None and (job_dir / ".hydra" / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "config.yaml"))
    privacy = (config or {}).get("privacy") or {}
    eps = privacy.get("epsilon") if privacy.get("enabled", True) else None
    return float(eps) if isinstance(eps, int | float) else None


def planned_jobs(sweep_dir: Path) -> list[list[str]]:
    """Every job of a basic-sweeper grid, from the sweep's multirun.yaml ([] if unknown)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    cfg = OmegaConf.load(path)
    if "BasicSweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]))
    overrides = OverridesParser.create().parse_overrides(arguments)
    return BasicSweeper.split_arguments(overrides, None)[0]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Every dir Hydra started a job in (it writes .hydra/ first) or dpexp recorded a job."""
    marks = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    marks |= {p.parent for p in sweep_dir.rglob(JOB_FILE)}
    return sorted(marks)


def _scalar(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: status, job dir, its overrides (one column each) and result fields.

    ``df.attrs["overrides"]`` lists the override columns."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep dir {sweep_dir} does not exist")
    rows: list[dict[str, Any]] = []
    seen: list[set[str]] = []
    keys: dict[str, None] = {}  # override keys in first-seen order
    for job_dir in _job_dirs(sweep_dir):
        overrides = job_overrides(job_dir)
        seen.append(set(overrides))
        keys.update((_split(o)[0], None) for o in overrides)
        result = read_result(job_dir)
        row: dict[str, Any] = {
            "job": str(job_dir.relative_to(sweep_dir)),
            "status": STATUS_COMPLETE if result is not None else STATUS_INCOMPLETE,
            "target_epsilon": target_epsilon(job_dir),
        }
        row.update({k: _parse_value(v) for k, v in map(_split, overrides)})
        row.update({k: _scalar(v) for k, v in (result or {}).items()})
        rows.append(row)
    for planned in planned_jobs(sweep_dir):
        if set(planned) not in seen:
            row = {"job": ",".join(planned), "status": STATUS_NOT_STARTED}
            row["target_epsilon"] = None
            keys.update((_split(o)[0], None) for o in planned)
            row.update({k: _parse_value(v) for k, v in map(_split, planned)})
            if isinstance(row.get("privacy.epsilon"), int | float):
                row["target_epsilon"] = float(row["privacy.epsilon"])
            rows.append(row)
    if not rows:
        raise UserError(f"{sweep_dir}: no jobs found (no .hydra/overrides.yaml below it)")
    df = pd.DataFrame(rows)
    df.attrs["overrides"] = list(keys)
    return df


def factors(df: pd.DataFrame, override_keys: list[str]) -> list[str]:
    """Override keys that vary across the sweep, apart from seed and ε (the grid's factors)."""
    return [
        c
        for c in override_keys
        if c not in NOT_A_FACTOR and c in df and df[c].astype(str).nunique(dropna=False) > 1
    ]


def line_variable(done: pd.DataFrame, swept: list[str]) -> str | None:
    """What one line of the accuracy-vs-ε plot holds fixed: a method's rate, else a factor."""
    for field in RATE_FIELDS:
        if field in done and done[field].nunique() > 1:
            return field
    return swept[0] if swept else None


def aggregate(done: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean ± std over seeds of accuracy, spent ε and trainable fraction for each group."""
    grouped = done.groupby(by, dropna=False)
    out = grouped.agg(
        seeds=("test_acc", "size"),
        test_acc_mean=("test_acc", "mean"),
        test_acc_std=("test_acc", "std"),
        epsilon_spent=("epsilon", "mean"),
        trainable_fraction=("trainable_fraction", "mean"),
    )
    return out.reset_index()  # one seed: no spread (std NaN, shown as –)


def _label(key: str, value: Any) -> str:
    return f"{key.split('.')[-1]}={value:g}" if isinstance(value, float) else f"{key}={value}"


def plot_acc_vs_epsilon(done: pd.DataFrame, line: str | None, path: Path) -> None:
    by = ["target_epsilon"] + ([line] if line else [])
    agg = aggregate(done, by)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for value, part in agg.groupby(line, dropna=False) if line else [(None, agg)]:
        part = part.sort_values("target_epsilon")
        label = _label(line, value) if line else "all jobs"
        ax.errorbar(
            part["target_epsilon"], part["test_acc_mean"], yerr=part["test_acc_std"].fillna(0.0),
            marker="o", capsize=3, label=label,
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("ε (target budget, log scale)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("Accuracy vs privacy budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _set_eps_ticks(ax, agg["target_epsilon"])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _set_eps_ticks(ax: plt.Axes, eps: pd.Series) -> None:
    ticks = sorted(set(eps.dropna()))
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()


def plot_acc_vs_fraction(done: pd.DataFrame, line: str | None, path: Path) -> None:
    # The fraction follows from the method's rate; averaged over seeds like the accuracy.
    by = ["target_epsilon"] + ([line] if line else [])
    agg = aggregate(done, by)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for eps, part in agg.groupby("target_epsilon", dropna=False):
        part = part.sort_values("trainable_fraction")
        ax.errorbar(
            part["trainable_fraction"], part["test_acc_mean"],
            yerr=part["test_acc_std"].fillna(0.0), marker="o", capsize=3,
            label=f"ε={eps:g}" if not pd.isna(eps) else "non-private",
        )  # fmt: skip
    ax.set_xlabel("trainable fraction (parameters updated)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("Accuracy vs trainable fraction, per ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pareto_mask(eps: np.ndarray, fraction: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Points no other point beats: ε no larger, fraction no larger, accuracy no smaller, and
    strictly better in one of them."""
    points = np.stack([eps, fraction, -acc], axis=1)
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        dominated = np.all(points <= p, axis=1) & np.any(points < p, axis=1)
        keep[i] = not dominated.any()
    return keep


def plot_pareto(agg: pd.DataFrame, labels: list[str], path: Path) -> None:
    """ε spent vs accuracy, coloured by trainable fraction; the 3-D Pareto front outlined and
    labelled with its factors (``labels``: columns of ``agg``)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    front = agg[agg["pareto"]]
    rest = agg[~agg["pareto"]]
    style = {"cmap": "viridis", "norm": plt.Normalize(0, 1)}
    if not rest.empty:
        ax.scatter(
            rest["epsilon_spent"], rest["test_acc_mean"], c=rest["trainable_fraction"],
            alpha=0.35, s=30, label="dominated", **style,
        )  # fmt: skip
    points = ax.scatter(
        front["epsilon_spent"], front["test_acc_mean"], c=front["trainable_fraction"],
        s=80, edgecolors="black", linewidths=1.2, label="Pareto-optimal", **style,
    )  # fmt: skip
    for _, row in front.iterrows():
        text = ", ".join(_label(k, row[k]) for k in labels if k != "target_epsilon")
        if text:
            ax.annotate(text, (row["epsilon_spent"], row["test_acc_mean"]), fontsize=7,
                        xytext=(6, 4), textcoords="offset points")  # fmt: skip
    fig.colorbar(points, ax=ax, label="trainable fraction")
    ax.set_xscale("log")
    ax.set_xlabel("ε spent (log scale)")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("Pareto front of (ε, trainable fraction, accuracy)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ticks = sorted(set(agg["epsilon_spent"].dropna()))
    if ticks:
        ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
        ax.minorticks_off()
    ax.margins(x=0.15, y=0.1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _varies_within(done: pd.DataFrame, group: list[str], column: str) -> bool:
    """Whether ``column`` takes several values inside a group (else it adds no information)."""
    return bool((done.groupby(group, dropna=False)[column].nunique(dropna=False) > 1).any())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def summarize(df: pd.DataFrame, out: Path) -> str:
    """Write the CSV, parquet, plots and summary.md; return the Markdown summary."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    df.to_parquet(out / "results.parquet", index=False)
    swept = factors(df, df.attrs.get("overrides", []))
    done = df[df["status"] == STATUS_COMPLETE].copy()
    lines = [f"# Sweep report: {len(done)} of {len(df)} jobs complete", ""]
    if not done.empty:
        line = line_variable(done, swept)
        group = ["target_epsilon", *swept]
        if line and line not in group and _varies_within(done, group, line):
            group.append(line)
        agg = aggregate(done, group)
        agg["pareto"] = pareto_mask(
            agg["epsilon_spent"].fillna(np.inf).to_numpy(),
            agg["trainable_fraction"].to_numpy(),
            agg["test_acc_mean"].to_numpy(),
        )
        plot_acc_vs_epsilon(done, line, out / PLOTS[0])
        plot_acc_vs_fraction(done, line, out / PLOTS[1])
        plot_pareto(agg, group, out / PLOTS[2])
        lines += [markdown_table(agg), ""]
        lines += [f"Plots: {', '.join(PLOTS)} in {out}", ""]
    missing = df[df["status"] != STATUS_COMPLETE]
    if not missing.empty:
        lines += [f"## {len(missing)} jobs without a complete result.json", ""]
        pairs = zip(missing.status, missing.job, strict=True)
        lines += [f"- {status}: {job}" for status, job in pairs]
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


RUN_METRICS = Path("csv") / "metrics.csv"  # the csv logger's file in a run dir


def plot_run(run_dir: Path, out: Path) -> Path:
    """One panel per metric the run logged during training (ε, update norm, learning rate,
    private statistics if logged), over the optimizer step; returns the PNG's path."""
    metrics = pd.read_csv(run_dir / RUN_METRICS)
    columns = [c for c in metrics.columns if c not in ("epoch", "step")
               and not c.startswith(("result/", "test/")) and metrics[c].notna().any()]  # fmt: skip
    if not columns:
        raise UserError(f"{run_dir / RUN_METRICS} holds no training metrics to plot")
    fig, axes = plt.subplots(len(columns), 1, figsize=(6, 2.2 * len(columns)), dpi=120,
                             sharex=True, squeeze=False)  # fmt: skip
    for ax, column in zip(axes[:, 0], columns, strict=True):
        points = metrics[["step", column]].dropna()
        ax.plot(points["step"], points[column], marker="." if len(points) < 50 else None)
        ax.set_ylabel(column, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    result = read_result(run_dir) or {}
    if "test_acc" in result:
        axes[0, 0].set_title(f"{run_dir.name}: test_acc={result['test_acc']:.4f}", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "metrics.png")
    plt.close(fig)
    return out / "metrics.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir or one run's dir")
    parser.add_argument("--out", type=Path, default=None, help="default: <dir>/report")
    args = parser.parse_args(argv)
    try:
        out = args.out or args.sweep_dir / "report"
        if (args.sweep_dir / RUN_METRICS).is_file():
            print(f"written: {plot_run(args.sweep_dir, out)}")
            return
        df = collect(args.sweep_dir)
        print(summarize(df, out))
    except UserError as exc:
        print(f"dpexp.report: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
