"""Paper tables: run a table's sweeps, keep their results, and set our numbers beside the paper's.

python -m dpexp.tables <table> [--run] [--doc PATH] [override ...]

``--run`` runs the table's sweeps first (``python -m dpexp.train -m ...``, resumable: finished
jobs are skipped), with the extra overrides appended (e.g. ``trainer.max_epochs=3``). Every
finished job found in ``multirun/`` is then kept under ``docs/results/<table>/`` (its
``result.json`` and ``job.json``, a few kB, meant to be committed) with a ``results.csv`` of
all of them, and ``docs/results/tables/<table>.md`` is written from those kept results: the
command, the machine and wall time the jobs recorded, epochs, deviations from the paper, and
one row per table cell with our mean over n seeds (± std where n ≥ 2), the published number
(or n/a) and the difference, then every job of the table's grid that has no result yet.
Without ``--run`` and without ``multirun/``, the page is regenerated from the committed
results alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import hashlib
import itertools
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dpexp import report
from dpexp.errors import UserError
from dpexp.results import RESULT_FILE, hardware, read_result
from dpexp.sweep import JOB_FILE, grid_job_dirnames

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sweep:
    """One ``python -m dpexp.train -m`` command; its dir is ``multirun/<name>``."""

    name: str
    args: tuple[str, ...]

    def task_name(self, overrides: list[str]) -> str:
        """``name``, or ``name-<hash>`` with extra overrides: runs with other settings (e.g.
        fewer epochs) get their own deterministic dir and never mix into one table."""
        settings = sorted(o for o in overrides if not o.startswith("hydra"))  # not launchers
        if not settings:
            return self.name
        digest = hashlib.sha1(" ".join(settings).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"


@dataclass(frozen=True)
class PaperTable:
    title: str
    source: str
    keys: tuple[str, ...]  # columns naming a cell (override or result fields)
    sweeps: tuple[Sweep, ...] = ()
    bench_csv: str | None = None  # a benchmark table: read these CSVs instead of sweeps
    metric: str = "test_acc"
    scale: float = 100.0  # accuracy in %
    published: dict[tuple, float] = field(default_factory=dict)
    paper_epochs: int | None = None
    deviations: str = ""
    # a cell key whose values are also set side by side: a second table with one column per
    # value and, per row, the values ordered by the metric, best first
    compare: str | None = None


TABLES: dict[str, PaperTable] = {
    "sa_dpsgd": PaperTable(
        title="SA-DPSGD: MNIST and FashionMNIST at ε = 3, DP-SGD vs screened updates",
        source="Fu, Chen & Ling, SA-DPSGD, arXiv 2211.07218 (baseline and SA-DPSGD rows)",
        keys=("dataset", "method", "screen.validation", "privacy.noise_multiplier"),
        sweeps=(
            Sweep("sa_dpsgd", ("experiment=sa_dpsgd_table", "method=dpsgd")),
            Sweep(
                "sa_dpsgd",
                ("experiment=sa_dpsgd_table", "method=screen", "screen.validation=public"),
            ),
            Sweep(
                "sa_dpsgd",
                ("experiment=sa_dpsgd_table", "method=screen", "screen.validation=private_noisy"),
            ),
            # σ as the paper chose it (accepted steps only): honest ε reported beside its 3
            *(
                Sweep(
                    "sa_dpsgd",
                    (
                        "experiment=sa_dpsgd_table",
                        f"dataset={name}",
                        "method=screen",
                        "screen.validation=public",
                        f"privacy.noise_multiplier={sigma}",
                        "privacy.epsilon=null",
                    ),
                )
                for name, sigma in (("mnist", 1.23), ("fashion_mnist", 2.15))
            ),
        ),
        published={
            ("mnist", "dpsgd"): 98.12,
            ("mnist", "screen"): 98.35,
            ("fashion_mnist", "dpsgd"): 86.33,
            ("fashion_mnist", "screen"): 87.41,
        },
        paper_epochs=40,
        deviations=(
            "σ is calibrated so the *honest* ε (every candidate step and every noisy test "
            "accounted) is 3, except in the rows with the paper's σ, whose honest ε is "
            "reported; the paper counts accepted steps only (`epsilon_paper`). 1000 training "
            "examples are held out as the public validation split, in every row."
        ),
    ),
    "pruning_tradeoff": PaperTable(
        title="Pre-pruning trade-off: accuracy over pruning rate × ε × scorer",
        source="Adamczewski & Park, DP meets pruning, arXiv 2303.04612",
        keys=(
            "dataset",
            "method",
            "pruning.scorer",
            "pruning.rate",
            "select.rate",
            "privacy.epsilon",
        ),
        sweeps=(
            Sweep("pruning_tradeoff", ("experiment=pruning_tradeoff",)),
            # three seeds for the cells of the seed's claim: rate 0 vs 0.5 at ε = 1
            Sweep(
                "pruning_tradeoff",
                (
                    "experiment=pruning_tradeoff",
                    "privacy.epsilon=1",
                    "pruning.rate=0,0.5",
                    "seed=1,2",
                ),
            ),
            # gradient dropping: a fresh random selection of 1 - rate of the weights each step
            Sweep(
                "pruning_tradeoff",
                (
                    "experiment=pruning_tradeoff",
                    "method=select",
                    "select.rate=0.5,0.8,0.9",
                    "pruning.rate=0",
                    "pruning.scorer=random",
                ),
            ),
            Sweep("pruning_tradeoff_fmnist", ("experiment=pruning_tradeoff_fmnist",)),
            Sweep(
                "pruning_tradeoff_fmnist",
                (
                    "experiment=pruning_tradeoff_fmnist",
                    "privacy.epsilon=1",
                    "pruning.rate=0,0.5",
                    "seed=1,2",
                ),
            ),
            Sweep(
                "pruning_tradeoff_fmnist",
                (
                    "experiment=pruning_tradeoff_fmnist",
                    "method=select",
                    "select.rate=0.5,0.8,0.9",
                    "pruning.rate=0",
                    "pruning.scorer=random",
                ),
            ),
        ),
        paper_epochs=40,
        deviations="No published MNIST/FashionMNIST numbers are quoted here (n/a).",
    ),
    "closeness": PaperTable(
        title="Closeness of public data: pretraining, freeze and select on public data",
        source="Adamczewski & Park, DP meets pruning, arXiv 2303.04612 (public pretraining, "
        "public-gradient freezing and selection); the grid of issue 14 item 6",
        keys=(
            "dataset",
            "public.source",
            "method",
            "pruning.rate",
            "select.rate",
            "privacy.epsilon",
        ),
        sweeps=tuple(
            sweep
            for experiment, sources in (
                ("closeness", "heldout,digits,fashion_mnist"),
                ("closeness_fmnist", "heldout,mnist,digits"),
            )
            for sweep in (
                # public pretraining only (rate 0), then freeze / select on public gradients
                Sweep(experiment, (f"experiment={experiment}", f"public.source={sources}")),
                Sweep(
                    experiment,
                    (
                        f"experiment={experiment}",
                        f"public.source={sources}",
                        "method=freeze",
                        "pruning.rate=0.5,0.9",
                    ),
                ),
                Sweep(
                    experiment,
                    (
                        f"experiment={experiment}",
                        f"public.source={sources}",
                        "method=select",
                        "select.rate=0.5,0.9",
                    ),
                ),
                # no public data: DP-SGD from scratch and the data-free scorers
                *(
                    Sweep(
                        experiment,
                        (
                            f"experiment={experiment}",
                            "public.source=none",
                            "public.size=null",
                            "pretrain.epochs=0",
                            *method,
                        ),
                    )
                    for method in (
                        ("method=dpsgd",),
                        (
                            "method=freeze",
                            "pruning.scorer=magnitude",
                            "pruning.frozen_value=zero",
                            "pruning.rate=0.5,0.9",
                        ),
                        ("method=select", "select.scorer=random", "select.rate=0.5,0.9"),
                    )
                ),
            )
        ),
        paper_epochs=None,
        compare="public.source",
        deviations="Not a paper table: 10 pretraining epochs on 1,797 public examples, then "
        "private training of the ScatterNet CNN for the configured 10 epochs unless an override "
        "says otherwise (the Epochs line says what ran); no published numbers (n/a).",
    ),
    "rgp_ablation": PaperTable(
        title="RGP ablation: DP-SGD vs RGP (rank 1, 4, 16) at ε ∈ {1, 3}",
        source="Yu et al., Large scale private learning via low-rank reparametrization, "
        "ICML 2021, arXiv 2106.09352",
        keys=("dataset", "method", "rgp.rank", "privacy.epsilon"),
        # The experiment's own sweep dirs and job names: jobs already run there are reused.
        sweeps=(
            Sweep("rgp_ablation", ("experiment=rgp_ablation", "method=dpsgd", "rgp.rank=8")),
            Sweep("rgp_ablation", ("experiment=rgp_ablation", "method=rgp")),
            # seeds 1-2 for the claim's closest cells: DP-SGD vs rank 16 at ε = 1, both widths
            Sweep(
                "rgp_ablation",
                (
                    "experiment=rgp_ablation",
                    "method=dpsgd",
                    "rgp.rank=8",
                    "privacy.epsilon=1",
                    "seed=1,2",
                ),
            ),
            Sweep(
                "rgp_ablation",
                (
                    "experiment=rgp_ablation",
                    "method=rgp",
                    "rgp.rank=16",
                    "privacy.epsilon=1",
                    "seed=1,2",
                ),
            ),
        ),
        paper_epochs=20,
        deviations="The paper's vision results are on CIFAR-10 (WRN-28); here MNIST with the "
        "Tramèr–Boneh CNN (model.width=1) and its 4× wider variant (model.width=4), 20 epochs; "
        "its MNIST numbers are not quoted (n/a). DP-SGD rows carry rgp.rank=8, unused by "
        "DP-SGD. FashionMNIST: `experiment=rgp_ablation_fmnist` (not run for this table).",
    ),
    "clipping_speed": PaperTable(
        title="Clipping speed: DP step time and peak memory relative to non-private training",
        source="Bu, Mao & Xu, mixed ghost clipping, NeurIPS 2022 (claims < 2× time)",
        keys=("model", "clipping"),
        bench_csv="outputs/bench/*/bench.csv",
        metric="time_ratio",
        scale=1.0,
        deviations="Measured by `make bench` on this machine's CPU; the paper measured GPUs "
        "on other models, so no per-cell published number is quoted (n/a).",
    ),
}


def run_sweeps(table: PaperTable, overrides: list[str]) -> None:
    """Run (or resume) every sweep of ``table``; a failing sweep stops with its exit code."""
    for sweep in table.sweeps:
        cmd = [sys.executable, "-m", "dpexp.train", "-m", *sweep.args,
               f"task_name={sweep.task_name(overrides)}", *overrides]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)


FINDING_FILE = "finding.md"  # beside the kept results: the claim, what we measured, verdict


def kept_dir(root: Path, name: str) -> Path:
    """Where a table's finished jobs are kept (committed): docs/results/<table>/."""
    return root / "docs" / "results" / name


def keep_results(name: str, table: PaperTable, root: Path, overrides: list[str]) -> int:
    """Copy every finished job of the table's sweeps in ``multirun/`` (result.json, job.json)
    to :func:`kept_dir`; returns how many jobs are kept there now."""
    for sweep in dict.fromkeys(s.task_name(overrides) for s in table.sweeps):
        source = root / "multirun" / sweep
        for job in sorted(p.parent for p in source.glob(f"*/{RESULT_FILE}")):
            identity = [f for f in (JOB_FILE, ".hydra/overrides.yaml") if (job / f).is_file()]
            if read_result(job) is None or not identity:
                continue
            target = kept_dir(root, name) / sweep / job.name
            for file in (RESULT_FILE, identity[0]):
                (target / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(job / file, target / file)
    return len(list(kept_dir(root, name).glob(f"*/*/{RESULT_FILE}")))


def collect(
    name: str, table: PaperTable, root: Path, overrides: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """Completed rows of all the table's sweeps run with ``overrides``, from the kept results
    (also written to <kept>/results.csv), and every job of the sweeps' grids without a kept
    result (``<sweep>: not run|incomplete: <job>``; incomplete: its dir is in ``multirun/``)."""
    if table.bench_csv:
        paths = sorted(glob.glob(str(root / table.bench_csv)))
        if not paths:
            raise UserError(f"no benchmark results at {table.bench_csv}: run `make bench`")
        return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True), []
    frames, override_keys = [], {}
    names = dict.fromkeys(sweep.task_name(overrides) for sweep in table.sweeps)  # shared dirs once
    for sweep in names:
        kept = kept_dir(root, name) / sweep
        if not kept.is_dir():  # not run yet: its jobs are listed as missing below
            continue
        df = report.collect(kept)
        if (root / "multirun" / sweep).is_dir():  # the sweep's own report, if run here
            report.summarize(
                report.collect(root / "multirun" / sweep), root / "multirun" / sweep / "report"
            )
        override_keys.update(dict.fromkeys(df.attrs["overrides"]))
        frames.append(df[df["status"] == report.STATUS_COMPLETE])
    if not frames:
        raise UserError(
            f"{kept_dir(root, name)} holds no results: run `make reproduce TABLE={name}`"
        )
    done = pd.concat(frames, ignore_index=True)
    done.attrs["overrides"] = list(override_keys)
    done.to_csv(kept_dir(root, name) / "results.csv", index=False)
    missing = []
    for sweep in table.sweeps:
        task = sweep.task_name(overrides)
        for job in grid_job_dirnames([*sweep.args, *overrides]):
            if read_result(kept_dir(root, name) / task / job) is None:
                started = (root / "multirun" / task / job).is_dir()
                missing.append(f"{task}: {'incomplete' if started else 'not run'}: {job}")
    return done, list(dict.fromkeys(missing))


def merge(table: PaperTable, done: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: ours (mean and std over its ``seeds``), published, difference.

    Any other override that varies among the jobs (e.g. a wider model run into the same sweep
    dir) becomes a column too, so such jobs get their own rows instead of being averaged in."""
    keys = [k for k in table.keys if k in done]
    # published numbers are keyed by the leading cell keys (e.g. dataset, method)
    width = len(next(iter(table.published), ()))
    varying = report.factors(done, done.attrs.get("overrides", []))
    keys += [k for k in varying if k not in keys and k not in ("task_name", "experiment")]
    metric = done[table.metric].astype(float) * table.scale
    grouped = done.assign(_metric=metric).groupby(keys, dropna=False)
    out = grouped.agg(
        seeds=("_metric", "size"), ours=("_metric", "mean"), ours_std=("_metric", "std")
    ).reset_index()
    for extra in ("epsilon", "epsilon_paper", "acceptance_rate", "epochs", "mem_ratio"):
        if extra in done:
            out[extra] = grouped[extra].mean().to_numpy()
    # one seed: std stays NaN (no spread is printed for it, see document)
    out["published"] = [
        table.published.get(tuple(row[k] for k in keys[:width]), float("nan"))
        for _, row in out.iterrows()
    ]
    out["diff"] = out["ours"] - out["published"]
    return out


# Measured columns and their decimals; every other column names the cell (an override).
DIGITS = {"epsilon": 3, "epsilon_paper": 3, "acceptance_rate": 2, "epochs": 0, "seeds": 0,
          "mem_ratio": 2}  # fmt: skip


def _key_cell(value: object) -> str:
    """An override value: ``–`` where a job did not set it, integers without decimals."""
    if isinstance(value, float):
        return "–" if pd.isna(value) else f"{value:g}"
    return str(value)


def _cell(value: object, digits: int = 2) -> str:
    if isinstance(value, float):
        return "n/a" if pd.isna(value) else f"{value:.{digits}f}"
    return str(value)


def ours_cell(mean: float, std: float, n: int) -> str:
    """Mean over ``n`` seeds, with the spread only where there is one (n ≥ 2)."""
    spread = f" ± {std:.2f}" if n >= 2 and not pd.isna(std) else ""
    return f"{mean:.2f}{spread} (n={n})"


def side_by_side(table: PaperTable, merged: pd.DataFrame) -> list[str]:
    """Markdown lines of the cells again, a column per value of ``table.compare`` and the
    values of each row ordered by the metric (best first; ``=`` where they tie to 0.01)."""
    key = table.compare
    index = [k for k in table.keys if k != key and k in merged]
    values = sorted(merged[key].astype(str).unique())
    lines = [f"By {key} (best first in the last column):", "",
             "| " + " | ".join([*index, *values, "order"]) + " |",
             "|" + "---|" * (len(index) + len(values) + 1)]  # fmt: skip
    for cell, rows in merged.groupby(index, dropna=False, sort=True):
        by_value = {str(r[key]): r for _, r in rows.iterrows()}
        ranked = sorted(by_value, key=lambda v: -by_value[v]["ours"])
        order = ranked[:1]
        for before, value in itertools.pairwise(ranked):
            tie = round(by_value[before]["ours"], 2) == round(by_value[value]["ours"], 2)
            order.append(("= " if tie else "> ") + value)
        cells = [_key_cell(v) for v in cell]
        cells += [ours_cell(by_value[v]["ours"], by_value[v]["ours_std"], int(by_value[v]["seeds"]))
                  if v in by_value else "–" for v in values]  # fmt: skip
        lines.append("| " + " | ".join([*cells, " ".join(order)]) + " |")
    return lines


def machine_lines(done: pd.DataFrame | None) -> list[str]:
    """Where and how long the jobs ran, from their results (``hardware``, ``wall_s``); jobs
    kept before results recorded the machine are counted, never attributed to this one."""
    n = 0 if done is None else len(done)
    recorded = done["hardware"].dropna() if n and "hardware" in done else pd.Series(dtype=str)
    ran_on = [f"{machine} ({count} jobs)" for machine, count in recorded.value_counts().items()]
    if len(recorded) < n:
        ran_on.append(f"not recorded by {n - len(recorded)} jobs, run before results did so")
    lines = [f"- Machine: {'; '.join(ran_on) or 'not recorded'}; this page was generated on "
             f"{hardware()}"]  # fmt: skip
    wall = done["wall_s"].dropna().astype(float) if n and "wall_s" in done else pd.Series()
    if len(wall):
        lines.append(
            f"- Wall time: {wall.min():.0f}–{wall.max():.0f} s per job (median "
            f"{wall.median():.0f} s), {len(wall)} jobs, {wall.sum() / 3600:.1f} h in all"
        )
    return lines


def document(name: str, table: PaperTable, merged: pd.DataFrame, missing: list[str],
             overrides: list[str], finding: str = "",
             done: pd.DataFrame | None = None) -> str:  # fmt: skip
    """The Markdown page for docs/results/tables/<name>.md; ``finding``: the paragraph on the
    seed's claim (docs/results/<name>/finding.md), set under the table; ``done``: the
    completed jobs the cells were merged from (their machine and wall time)."""
    unit = "%" if table.scale == 100 else "×"
    metric = f"{table.metric} ({unit})"
    # n (the seeds) is printed in each "ours" cell, not as a column of its own
    cols = [c for c in merged.columns
            if c not in ("ours", "ours_std", "seeds", "published", "diff")]  # fmt: skip
    header = [*cols, f"ours: {metric}", "published", "ours − published"]
    lines = [
        f"# {table.title}", "",
        f"Source: {table.source}.", "",
        "Reproduce: `make reproduce TABLE=" + name
        + (f' ARGS="{" ".join(overrides)}"`' if overrides else "`"), "",
        "Commands:", "",
    ]  # fmt: skip
    if table.bench_csv:
        lines.append("    make bench")
    for sweep in table.sweeps:
        args = " ".join([*sweep.args, f"task_name={sweep.task_name(overrides)}", *overrides])
        lines.append(f"    python -m dpexp.train -m {args}")
    epochs = sorted({int(e) for e in merged.get("epochs", pd.Series(dtype=float)).dropna()})
    lines += [
        "",
        *machine_lines(done),
        f"- Epochs: {', '.join(map(str, epochs)) or 'n/a'}"
        + (f" (paper: {table.paper_epochs})" if table.paper_epochs else ""),
        f"- Deviations from the paper: {table.deviations}"
        + (f" Overrides: `{' '.join(overrides)}`." if overrides else ""),
        f"- Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python -m dpexp.tables`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, row in merged.iterrows():
        ours = ours_cell(row["ours"], row["ours_std"], int(row["seeds"]))
        short = table.paper_epochs and row.get("epochs", table.paper_epochs) < table.paper_epochs
        if short:  # marked in the cell itself, not only in the epochs line
            ours = ours[:-1] + f", {row['epochs']:.0f} of {table.paper_epochs} epochs)"
        cells = [_cell(row[c], DIGITS[c]) if c in DIGITS else _key_cell(row[c]) for c in cols]
        cells += [ours, _cell(row["published"]), _cell(row["diff"])]
        lines.append("| " + " | ".join(cells) + " |")
    if table.compare and table.compare in merged:
        lines += ["", *side_by_side(table, merged)]
    if missing:
        lines += [
            "",
            f"{len(missing)} jobs of the grid have no result yet (`--run` resumes them):",
            "",
        ]
        lines += [f"- {m}" for m in missing]
    if finding:  # written by whoever ran the table, from the rows above
        lines += ["", "## The seed's claim and what we measured", "", finding.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--run", action="store_true", help="run/resume the sweeps first")
    parser.add_argument("--doc", type=Path, help="default: docs/results/tables/<table>.md")
    parser.add_argument("overrides", nargs="*", help="appended to every sweep command")
    args = parser.parse_intermixed_args(argv)  # overrides may follow --run
    table = TABLES[args.table]
    try:
        if args.run and table.bench_csv:
            subprocess.run(
                ["make", "bench", f"ARGS={' '.join(args.overrides)}"], cwd=REPO, check=True
            )
        elif args.run:
            run_sweeps(table, args.overrides)
        if not table.bench_csv:
            keep_results(args.table, table, REPO, args.overrides)
        done, missing = collect(args.table, table, REPO, args.overrides)
        finding_file = kept_dir(REPO, args.table) / FINDING_FILE
        finding = finding_file.read_text() if finding_file.is_file() else ""
        text = document(
            args.table, table, merge(table, done), missing, args.overrides, finding, done
        )
    except UserError as exc:
        print(f"dpexp.tables: error: {exc}", file=sys.stderr)
        sys.exit(2)
    # Not docs/results/<table>.md: the method owners write their own notes there.
    doc = args.doc or REPO / "docs" / "results" / "tables" / f"{args.table}.md"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(text)
    print(f"written: {doc}")


if __name__ == "__main__":
    main()
