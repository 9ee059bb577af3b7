"""Lightning DDP via spawn whose main process learns what the workers trained.

With a spawn launcher the callbacks run in the worker processes; Lightning sends back only
the weights and the logged metrics. :class:`DDPSpawnStrategy` also sends back rank 0's privacy
state (ledger, steps, σ, q) and every method's ``state_dict``, so that ``result.json``, written
by the main process, reports the ε the workers actually spent.

The DP arithmetic itself lives in :mod:`dpexp.privacy.step` (clipped sums all-reduced, noise
drawn once by rank 0) and :mod:`dpexp.data` (ranks split one global Poisson batch).
"""

from __future__ import annotations

import io
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn

from dpexp.methods.base import Method
from dpexp.privacy.callback import PrivacyCallback


class _StateReturningLauncher(_MultiProcessingLauncher):
    returns_callback_state = True  # PrivacyCallback refuses spawn launchers without this

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        states = {}
        for index, callback in enumerate(trainer.callbacks):
            if isinstance(callback, PrivacyCallback):
                states[index] = callback.worker_state()
            elif isinstance(callback, Method):
                states[index] = callback.state_dict()
        buffer = io.BytesIO()
        torch.save(states, buffer)  # bytes: tensors must not travel by shared memory
        extra["dpexp_callback_states"] = buffer.getvalue()
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        states = torch.load(io.BytesIO(extra["dpexp_callback_states"]), weights_only=False)
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
