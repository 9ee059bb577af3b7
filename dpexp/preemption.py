"""Preemption and time-limit signals: checkpoint at a step boundary, then hand the signal on.

A cluster warns a job before it stops it: SLURM sends ``--signal`` (Lightning's requeue signal,
SIGUSR1, or submitit's preemption signal, SIGUSR2 by default) some time before the limit. The
handlers that Lightning (``SLURMEnvironment(auto_requeue=True)``) and submitit install act at
once, wherever the main thread is: Lightning saves ``hpc_ckpt_<n>.ckpt`` there and submitit
exits without any checkpoint. Inside a DP step that point can lie between the optimizer step
and the ledger's record, so such a checkpoint would hold an update the accountant never
counted. Worse, on SLURM Lightning loads ``hpc_ckpt_<n>.ckpt`` by itself in any later ``fit``
or ``test`` called without ``ckpt_path``, past dpexp's checkpoint checks.

:class:`RequeueCheckpoint` takes these signals over when training starts. Its handler only
notes the signal; at the end of the current optimizer step (the point where the step
checkpoints are written, with the step counted) it writes ``last.ckpt`` and then calls the
handler it replaced: submitit's (requeue and exit), Lightning's (its own checkpoint, then
``scontrol requeue``), or the signal's default action. The requeued multirun job finds its
``last.ckpt`` and continues from it (dpexp.sweep).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from dpexp.errors import ConfigError

log = logging.getLogger(__name__)

LAST_CHECKPOINT = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
# Lightning's SLURM requeue checkpoints, written into trainer.default_root_dir (the run dir).
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"


def _signal(name: str | int) -> signal.Signals:
    try:
        return signal.Signals(name) if isinstance(name, int) else signal.Signals[str(name)]
    except (KeyError, ValueError):
        raise ConfigError(
            f"callbacks.requeue.signals={name!r} is invalid: a signal name such as SIGUSR1"
        ) from None


class RequeueCheckpoint(L.Callback):
    """Defers ``signals`` to the end of the current step, saves ``dirpath/last.ckpt``, then
    runs the handler each signal had before (or its default action)."""

    def __init__(self, dirpath: str, signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGUSR2")):
        self.dirpath = Path(dirpath)
        self.signals = [_signal(name) for name in signals]
        self.received: list[signal.Signals] = []
        self._replaced: dict[signal.Signals, Any] = {}

    @property
    def path(self) -> Path:
        return self.dirpath / LAST_CHECKPOINT

    def _note(self, signum: int, frame: FrameType | None) -> None:
        # Only a note: the main thread may be anywhere inside a DP step.
        self.received.append(signal.Signals(signum))
        log.warning(
            "received %s: checkpointing at the end of this step", signal.Signals(signum).name
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's and submitit's handlers are in place, so they are the ones replaced.
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs handlers in the main thread only
        if trainer.world_size > 1:
            # saving is collective: every rank would have to see the signal at the same step
            log.info("requeue signals are not deferred in a multi-process run")
            return
        for signum in self.signals:
            self._replaced[signum] = signal.signal(signum, self._note)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.received:
            self._save_and_hand_on(trainer)

    def _save_and_hand_on(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)  # the state after this step, the step counted
        log.warning("saved %s at step %d, handing on the signal", self.path, trainer.global_step)
        received, self.received = self.received, []
        for signum in dict.fromkeys(received):
            self._hand_on(signum)
        # Lightning's SLURM handler has saved this same state as hpc_ckpt_<n>.ckpt. On SLURM,
        # a later fit *or test* without ckpt_path loads that file silently: the test would
        # score these weights with this ledger, not the final ones. last.ckpt holds it all.
        for path in Path(trainer.default_root_dir).glob(HPC_CHECKPOINTS):
            path.unlink()

    def _hand_on(self, signum: signal.Signals) -> None:
        previous = self._replaced.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, None)  # submitit: requeue and exit; Lightning: hpc ckpt, requeue
        elif previous == signal.SIG_DFL:  # what the signal would have done: terminate
            self._restore()
            os.kill(os.getpid(), signum)

    def _restore(self) -> None:
        for signum, handler in self._replaced.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._replaced = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received:  # arrived after the last step: the final state
            self._save_and_hand_on(trainer)
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
