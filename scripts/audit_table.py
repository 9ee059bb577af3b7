"""The audit table of docs/results/audit.md: honest runs below their claim, planted bugs caught.

python scripts/audit_table.py [--rows NAME ...] [--doc docs/results/audit.md]   (make audit-table)

The audit lines are kept in docs/results/audit/lines.json (a row run again replaces its line);
``--rows`` with no names regenerates the page from them without training.

Each row is one ``dpexp.audit.audit`` run, in this process, on MNIST's first 1024 training
examples. The planted rows run inside a context manager of ``tests/planted.py`` (a deliberate
bug, undone when the run ends); the honest rows are exactly ``python -m dpexp.audit <overrides>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpexp.audit import audit  # noqa: E402
from dpexp.train import CONFIG_DIR  # noqa: E402
from tests import planted  # noqa: E402

SETTING = [
    "dataset=mnist",
    "dataset.train_size=1024",
    "dataset.test_size=256",
    "dataset.batch_size=128",
    "trainer.max_epochs=5",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
    "privacy.epsilon=2",
    "privacy.accountant=rdp",
    "audit.canaries=1000",
]
KEPT = REPO / "docs/results/audit/lines.json"  # every row's audit line, committed
OUTPUT_LAYER = ("classifier.3.weight", "classifier.3.bias")  # cnn_tanh's classifier
UNCLIPPED = "`planted.unclipped_layer('classifier.3.weight', 'classifier.3.bias')` (batches > 8)"


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    overrides: tuple[str, ...]
    bug: Callable[[], contextlib.AbstractContextManager] | None = None
    bug_text: str = "none"


ROWS = [
    Row("honest_per_sample", "honest", ("audit.canary_type=input", "clipping=per_sample")),
    Row("honest_ghost", "honest", ("audit.canary_type=input", "clipping=ghost")),
    Row("honest_bk", "honest", ("audit.canary_type=input", "clipping=bk")),
    Row(
        "noise_off",
        "(a) noise off",
        ("audit.canary_type=input", "clipping=bk"),
        planted.noise_off,
        "`planted.noise_off()`",
    ),
    Row(
        "unclipped_layer",
        "(b) output layer unclipped",
        ("audit.canary_type=input", "clipping=bk"),
        lambda: planted.unclipped_layer(*OUTPUT_LAYER),
        UNCLIPPED,
    ),
    Row(
        "unclipped_layer_gradient_canaries",
        "(b) with gradient canaries",
        ("audit.canary_type=gradient", "clipping=bk"),
        lambda: planted.unclipped_layer(*OUTPUT_LAYER),
        UNCLIPPED,
    ),
]


def compose_audit(output_dir: Path, overrides: list[str]):
    """The config ``python -m dpexp.audit <overrides>`` composes, writing to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra.run.dir={output_dir}", "+audit=default", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_row(row: Row, out: Path) -> dict:
    overrides = [*SETTING, *row.overrides]
    cfg = compose_audit(out / row.name, overrides)
    start = time.perf_counter()
    with row.bug() if row.bug else contextlib.nullcontext():
        line = audit(cfg, out / row.name)
    line["wall_s"] = round(time.perf_counter() - start, 1)
    return line


def fmt_claim(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def caught(line: dict) -> bool:
    claim = line["epsilon_claimed"]
    return claim is not None and line["epsilon_lower_bound"] > claim


def findings(rows: list[tuple[Row, dict]]) -> list[str]:
    """What the rows show, read off the rows themselves."""
    out = ["", "## Findings", ""]
    honest = [line for row, line in rows if row.bug is None]
    if honest:
        low = min(line["epsilon_lower_bound"] for line in honest)
        high = max(line["epsilon_lower_bound"] for line in honest)
        below = all(not caught(line) for line in honest)
        modes = ", ".join(line["clipping"] for line in honest)
        out.append(
            f"- Honest runs ({modes}): lower bounds "
            + (f"{low:.3f}" if low == high else f"{low:.3f}–{high:.3f}")
            + ", "
            + ("all below their claims" if below else "**some above their claims**")
            + ". Equal bounds across modes are expected: the same seed draws the same batches,"
            " noise and canaries, and the engines' clipped sums agree to float rounding."
        )
    for row, line in rows:
        if row.bug is None:
            continue
        verdict = "caught" if caught(line) else "**not caught**"
        out.append(
            f"- {row.what}"
            + ("" if "canaries" in row.what else f" ({line['canary_type']} canaries)")
            + f": lower bound "
            f"{line['epsilon_lower_bound']:.3f} against a claim of "
            f"{fmt_claim(line['epsilon_claimed'])}: {verdict}."
        )
    if any(r.name == "unclipped_layer_gradient_canaries" and not caught(x) for r, x in rows):
        out.append(
            "- Gradient canaries are clipped by `clip_materialized`, around the engine, so the"
            " engine's bug leaves them untouched: the last row is the blind spot input canaries"
            " close."
        )
    return out


def page(rows: list[tuple[Row, dict]]) -> str:
    head = [
        "# Audit results: canaries through the sampler and the engine",
        "",
        "Generated by `scripts/audit_table.py` (`make audit-table`); design and bound in",
        "[../audit.md](../audit.md). The per-method table of gradient canaries is in",
        "[audit_methods.md](audit_methods.md).",
        "",
        f"Setting: `{' '.join(SETTING)}`: MNIST, its first 1024 training examples, expected",
        "batch 128 (q = 1/8), 40 steps, `cnn_tanh`, C = 0.1, δ = 1e-5, σ calibrated to ε = 2",
        "(RDP). m = 1000 canaries, each in with probability 1/2; confidence 0.95, Bonferroni",
        "over 2 scores × 6 guess counts. *Caught* means the 95 % lower bound exceeds the claim.",
        f"Machine: {platform.machine()}, torch {torch.__version__}, one thread, shared CPU"
        " (wall times are inflated).",
        "",
        "| row | canaries | clipping | planted bug | σ | ε claimed | ε lower bound |"
        " guesses r / correct v | score | caught? | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = []
    for row, line in rows:
        body.append(
            f"| {row.what} | {line['canary_type']} | {line['clipping']} | {row.bug_text} | "
            f"{line['noise_multiplier']:.3f} | {fmt_claim(line['epsilon_claimed'])} | "
            f"**{line['epsilon_lower_bound']:.3f}** | {line['guesses']} / {line['correct']} | "
            f"{line['score']} | {'**yes**' if caught(line) else 'no'} | {line['wall_s']} |"
        )
    commands = [
        *findings(rows),
        "",
        "## Exact commands",
        "",
        "All rows: `DPEXP_DATA_ROOT=/work/shared/data OMP_NUM_THREADS=1 python "
        "scripts/audit_table.py` (one row: `--rows <name>`). The honest rows are also",
        "exactly these command lines (the JSON line is written to `<run dir>/audit.json`):",
        "",
    ]
    for row, _ in rows:
        args = " ".join([*SETTING, *row.overrides])
        if row.bug is None:
            commands.append(f"- {row.name}: `python -m dpexp.audit {args}`")
        else:
            commands.append(
                f"- {row.name}: `python scripts/audit_table.py --rows {row.name}` "
                f"(the overrides `{args}` inside {row.bug_text})"
            )
    return "\n".join([*head, *body, *commands, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=[r.name for r in ROWS])
    parser.add_argument("--doc", type=Path, default=REPO / "docs/results/audit.md")
    parser.add_argument("--out", type=Path, default=REPO / "multirun/audit_table")
    args = parser.parse_args()
    unknown = sorted(set(args.rows) - {r.name for r in ROWS})
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {[r.name for r in ROWS]}")
    os.environ.setdefault("DPEXP_DATA_ROOT", str(REPO / "data"))
    kept = KEPT
    lines = json.loads(kept.read_text()) if kept.is_file() else {}
    for row in ROWS:
        if row.name in args.rows:
            lines[row.name] = run_row(row, args.out)
            print(json.dumps({"row": row.name, **lines[row.name]}), flush=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(lines, indent=1))
    done = [(row, lines[row.name]) for row in ROWS if row.name in lines]
    args.doc.write_text(page(done))


if __name__ == "__main__":
    main()
