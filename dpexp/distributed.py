"""Lightning DDP via spawn whose main process learns what the workers trained.

With a spawn launcher the callbacks run in the worker processes; Lightning sends back only
the weights and the logged metrics. :class:`DDPSpawnStrategy` also sends back rank 0's privacy
state (ledger, steps, σ, q), every method's ``state_dict`` and the parameter average's
(the raw last iterate, for ``test_acc_last``), so that ``result.json``, written
by the main process, reports the ε the workers actually spent.

The DP arithmetic itself lives in :mod:`dpexp.privacy.step` (clipped sums all-reduced, noise
drawn once by rank 0) and :mod:`dpexp.data` (ranks split one global Poisson batch).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn

from dpexp.averaging import ParameterEMA
from dpexp.methods.base import Method
from dpexp.privacy.callback import PrivacyCallback


def close_process_group(wait_for_peers: bool = True) -> None:
    """Destroy the default process group and, with it, gloo's worker threads.

    Lightning leaves the group to interpreter shutdown. A gloo thread may still hold the last
    reference to a collective's tensor then; releasing it needs the GIL, which a finalizing
    interpreter no longer hands out, and the worker dies with SIGABRT ("terminate called
    without an active exception") after a finished fit. Destroying the group here joins those
    threads while Python still runs. ``wait_for_peers``: barrier first, so that no rank leaves
    while another is still in a collective (skipped after an error: the peers may be gone).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


class _StateReturningLauncher(_MultiProcessingLauncher):
    returns_callback_state = True  # PrivacyCallback refuses spawn launchers without this

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        finished = False
        try:
            super()._wrapping_function(*args, **kwargs)
            finished = True
        finally:
            close_process_group(wait_for_peers=finished)

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return extra
        states = {}
        for index, callback in enumerate(trainer.callbacks):
            if isinstance(callback, PrivacyCallback):
                states[index] = callback.worker_state()
            elif isinstance(callback, Method | ParameterEMA):  # ParameterEMA: test_acc_last
                states[index] = callback.state_dict()
        # Through a file, as Lightning sends the weights: the main process reads the result
        # queue only after the workers have exited, so a payload larger than the pipe buffer
        # (~64 KB, e.g. a parameter average) would block the worker forever.
        path = Path(tempfile.mkdtemp()) / "callback_states.pt"
        torch.save(states, path)
        extra["dpexp_callback_states"] = str(path)
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        path = Path(extra["dpexp_callback_states"])
        states = torch.load(path, weights_only=False)
        shutil.rmtree(path.parent, ignore_errors=True)
        for index, state in states.items():
            callback = trainer.callbacks[index]
            if isinstance(callback, PrivacyCallback):
                callback.restore_worker_state(state)
            elif state:
                callback.load_state_dict(state)


class DDPSpawnStrategy(DDPStrategy):
    """``DDPStrategy(start_method="spawn")`` that restores the privacy and method state in the
    main process after ``fit`` (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("start_method", "spawn")
        super().__init__(**kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _StateReturningLauncher(self, start_method=self._start_method)
