"""Progress bars for the long stages outside Lightning's loops (fixed-feature precomputation,
the clipping plan, public pretraining), in the look of Lightning's RichProgressBar.

    from dpexp import progress
    with progress.stage("public pretraining", total=steps) as advance:
        for batch in loader:
            ...
            advance()          # or advance(n)

A bar appears only once its stage has run ``delay`` seconds (a quick stage leaves no trace),
only on a terminal, and never with ``trainer.enable_progress_bar=false`` (``train.build``
calls :func:`enable`); elsewhere ``advance`` does nothing. Started while Lightning's bar is
live (e.g. the clipping plan in the first step), it shows below that bar and is removed when
done. A stage read from a cache logs one INFO line instead (its caller's job).

:class:`ConsoleHandler` is the terminal's logging handler (conf/hydra/default.yaml): it
writes to the *current* ``sys.stdout``, which under a live bar is Rich's proxy, so log lines
print above the bars instead of through them.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich import get_console
from rich.file_proxy import FileProxy
from rich.progress import Progress, ProgressColumn, TextColumn

_enabled = True


def enable(flag: bool) -> None:
    """Turn the stage bars on or off for this process (``trainer.enable_progress_bar``)."""
    global _enabled
    _enabled = bool(flag)


def shown() -> bool:
    """Would a bar be drawn now? Only when enabled and the console is a terminal."""
    return _enabled and get_console().is_terminal


def _columns() -> list[ProgressColumn]:
    """Lightning's RichProgressBar columns and theme, so every bar of a run looks alike."""
    from lightning.pytorch.callbacks.progress.rich_progress import (
        BatchesProcessedColumn,
        CustomBarColumn,
        CustomTimeColumn,
        ProcessingSpeedColumn,
        RichProgressBarTheme,
    )

    theme = RichProgressBarTheme()
    return [
        TextColumn("[progress.description]{task.description}"),
        CustomBarColumn(
            complete_style=theme.progress_bar,
            finished_style=theme.progress_bar_finished,
            pulse_style=theme.progress_bar_pulse,
        ),
        BatchesProcessedColumn(style=theme.batch_progress),
        CustomTimeColumn(style=theme.time),
        ProcessingSpeedColumn(style=theme.processing_speed),
    ]


def _ignore(n: float = 1) -> None:
    return None


@contextmanager
def stage(
    description: str, total: float | None, delay: float = 1.0
) -> Iterator[Callable[[float], None]]:
    """A bar for one stage of ``total`` units; yields ``advance(n=1)``."""
    if not shown():
        yield _ignore
        return
    bar = Progress(*_columns(), console=get_console())
    task = bar.add_task(description, total=total)
    lock = threading.Lock()
    state = {"started": False, "done": False}

    def start() -> None:  # from a timer: a stage whose first unit is slow still shows
        with lock:
            if not state["done"]:
                bar.start()
                state["started"] = True

    timer = threading.Timer(delay, start)
    timer.daemon = True
    timer.start()
    try:
        yield lambda n=1: bar.advance(task, n)
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
            if state["started"]:
                bar.stop()


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stdout`` is at each record (see the module doc)."""

    def __init__(self, stream=None) -> None:  # ``stream``: given by logging configs, unused
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.stdout, FileProxy):
            super().emit(record)
            return
        try:  # above the live bars, unwrapped: the terminal wraps, copy-paste keeps the line
            get_console().print(
                self.format(record), soft_wrap=True, markup=False, highlight=False, emoji=False
            )
        except Exception:
            self.handleError(record)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the current one is used
        pass
