"""Deliberate privacy bugs, planted only by tests (and scripts/audit_planted.py) to check that
the canary audit catches them. Each is a context manager; nothing outside it is changed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch

import dpexp.privacy.step as step_module
from dpexp.clipping import fast
from dpexp.clipping.verify import MAX_EXAMPLES


class _TorchWithoutNoise:
    """``torch`` as the DP step sees it, except that ``torch.normal`` draws zeros."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def normal(mean, std, size, *, generator=None, device=None, dtype=None):
        return torch.zeros(size, device=device, dtype=dtype)


@contextmanager
def noise_off() -> Iterator[None]:
    """(a) The DP step adds no noise; σ, the ledger and the claimed ε are unchanged."""
    with mock.patch.object(step_module, "torch", _TorchWithoutNoise()):
        yield


class _UnclippedFor(list):
    """The engine's queue of clipped sums, handing out the named parameters' sums unclipped."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names

    def pop(self, *args):
        name, clipped = super().pop(*args)
        if name in self.names:
            return name, lambda factors: clipped(torch.ones_like(factors))
        return name, clipped


@contextmanager
def unclipped_layer(*names: str, above: int = MAX_EXAMPLES) -> Iterator[None]:
    """(b) The one-pass fast engines (``bk``, ``auto``) sum the named parameters' per-sample
    gradients without the clip factors, in batches of more than ``above`` examples; the norms,
    and every other parameter, stay right. A path taken only at full batch size, like the
    engines' per-shape decisions: the exactness probes (3 examples at validation, at most
    :data:`~dpexp.clipping.verify.MAX_EXAMPLES` before the first step) never take it."""
    original = fast._Step.__init__

    def init(self, engine, weights, batch, *args, **kwargs):
        original(self, engine, weights, batch, *args, **kwargs)
        if batch > above:
            self.pending = _UnclippedFor(names)

    with mock.patch.object(fast._Step, "__init__", init):
        yield
