"""The Poisson batch sampler that DP-SGD's accounting assumes (a privacy component: kept
small and tested on its own, tests/test_dp_step.py and tests/test_distributed.py)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class PoissonBatchSampler(Sampler[torch.Tensor]):
    """Each example joins each batch independently with probability ``sample_rate``.

    Batch sizes vary (Binomial(N, q)) and may be empty; this is the sampling the
    subsampled-Gaussian accountants assume. The generator's state is checkpointed.

    With ``world_size`` > 1 processes, every process draws the same global Poisson batch
    (same generator state everywhere) and keeps the examples with ``index % world_size ==
    rank``: the union over processes is exactly one Poisson batch of rate q over all N.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator
        self.start = 0  # first batch of the next pass: > 0 only when resuming mid-epoch
        self.drawn = 0  # batches drawn so far in the current pass
        self._states: dict[int, torch.Tensor] = {}  # generator state before batch i was drawn
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.drawn, self.start = self.start, 0
        self._states = {}
        while self.drawn < self.steps:
            # The data fetcher runs a batch ahead of training: keep the last few states.
            self._states = {i: s for i, s in self._states.items() if i > self.drawn - 4}
            self._states[self.drawn] = self.generator.get_state()
            self.drawn += 1
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            indices = mask.nonzero().flatten()
            yield indices[indices % self.world_size == self.rank]

    def resume_state(self, consumed: int) -> tuple[int, torch.Tensor]:
        """``(position, generator state)`` from which a new pass continues exactly after the
        first ``consumed`` batches of this pass were used for training (batches drawn ahead
        of training are drawn again)."""
        if consumed >= self.steps:
            return 0, self.generator.get_state()  # the pass is complete: next epoch
        if consumed == self.drawn:
            return consumed, self.generator.get_state()
        if consumed in self._states:
            return consumed, self._states[consumed]
        raise RuntimeError(f"sampler cannot checkpoint after batch {consumed} ({self.drawn} drawn)")
