"""A new user's first run, as a terminal shows it (docs/results/first_run.md): progress bars
for the long stages and, outside them, a few lines only: no per-layer clipping lines, no
Lightning tip, no deprecation warning; at the end where the metrics are and how to plot them."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from dpexp.data.sources import MIRROR

REPO = Path(__file__).resolve().parents[1]
BAR = "━"  # Rich's bar glyph: a line holding it is a progress bar


def terminal_lines(raw: str) -> list[str]:
    """The screen a terminal shows once ``raw`` is written to it, enough for Rich's output:
    carriage returns, erase-line (ESC[2K) and cursor-up (ESC[nA); other escapes dropped."""
    screen, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\n":
            row, col = row + 1, 0
            screen += [""] * (row + 1 - len(screen))
        elif token == "\r":
            col = 0
        elif token.endswith("K") and token.startswith("\x1b["):
            screen[row] = ""
        elif token.endswith("A") and token.startswith("\x1b["):
            row = max(0, row - int(token[2:-1] or 1))
        elif not token.startswith("\x1b"):
            line = screen[row].ljust(col)
            screen[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return [line.rstrip() for line in screen]


def run_in_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """``python -m dpexp.train *args`` with a 120-column pseudo-terminal as its console."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "dpexp.train", *args], cwd=cwd, env=env,
                            stdin=follower, stdout=follower, stderr=follower)  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # a real `python -m dpexp.train` in a terminal
@pytest.mark.skipif(not (MIRROR / "MNIST" / "raw").is_dir(), reason="no MNIST mirror")
def test_first_run_is_quiet_outside_its_progress_bars(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DPEXP_DATA_ROOT", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE",
                        "HYDRA_FULL_ERROR", "COLUMNS", "LINES")}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TERM="xterm-256color",
               PYTHONPATH=str(REPO))  # fmt: skip
    run_dir = tmp_path / "run"
    # the default root (./data, empty here): the mirror is used and says so
    args = ["model=cnn_tanh", "trainer.max_epochs=1", "dataset.train_size=512",
            "dataset.test_size=500", "dataset.batch_size=128",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    code, raw = run_in_terminal(args, tmp_path, env)
    screen = terminal_lines(raw)
    assert code == 0, "\n".join(screen)
    text = [line for line in screen if line.strip() and BAR not in line]
    shown = "\n".join(screen)
    assert any(line.startswith("Epoch 0/0") and BAR in line for line in screen), shown
    assert len(text) <= 10, shown
    # anywhere, also glued to a bar: per-layer plan lines are DEBUG, the rest filtered
    assert not any("model module" in line for line in screen), shown
    assert not any("Tip:" in line or "deprecated" in line for line in screen), shown
    assert sum("read from the mirror" in line for line in text) == 1, shown
    (plan,) = [line for line in text if "clipping=auto: " in line]
    assert f"(plan in {run_dir / 'clipping_plan.json'})" in plan
    assert (run_dir / "clipping_plan.json").is_file()
    assert text[-1] == (
        f"metrics: {run_dir / 'csv' / 'metrics.csv'}; plot them: python -m dpexp.report {run_dir}"
    )
