"""``method=select``: parameter selection / gradient dropping (Adamczewski, He & Park 2023,
arXiv 2306.11754).

Every ``every`` steps a fraction ``1 - rate`` of the maskable weights (among those ``freeze``
kept, if it runs too) is chosen to update. The DP step drops the other coordinates *before*
clipping (the per-sample norm is over selected coordinates only) and adds no noise to them;
this callback then keeps them from moving through the optimizer. The selection is either
fresh data-independent randomness (``random``, from its own seeded generator), the largest
|θ_t| of the current, already private model (``magnitude``: post-processing), or the largest
|∇L| (``grad_score=grad``) or |θ_t ⊙ ∇L| (``taylor``) on a batch of *public* data at θ_t
(``public_grad``, the parameter selection of arXiv 2303.04612). None reads private data, so
the accountant counts exactly DP-SGD's (σ, q) per step.

``optimizer_state``: with ``freeze`` (default) an unselected coordinate's optimizer state
(momentum buffer, Adam's moments) is restored too, as if the step never happened for it. With
``continue`` only its value is restored: the optimizer's state keeps evolving with the zero
gradient (momentum decays, weight decay accumulates into it, Adam's moments decay) and acts
when the coordinate is selected again. Per-tensor counters (Adam's ``step``) always advance.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import nn

from dpexp.errors import ConfigError
from dpexp.methods import masks as M
from dpexp.methods.base import Method, public_split
from dpexp.methods.freeze import GRAD_SCORES, _choice, check_rate

SCORERS = ("random", "magnitude", "public_grad")
OPTIMIZER_STATES = ("freeze", "continue")


class Select(Method):
    """Update a freshly chosen fraction of the weights each step (or every ``every`` steps)."""

    name = "select"

    def __init__(
        self,
        rate: float = 0.5,
        every: int = 1,
        scorer: str = "random",
        optimizer_state: str = "freeze",
        grad_score: str = "grad",
        public_batch_size: int = 256,
        public_source: str = "none",
        seed: int = 0,
    ) -> None:
        self.rate = check_rate("select.rate", rate)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"select.every={every!r} is invalid: a positive integer")
        _choice("select.scorer", scorer, SCORERS)
        _choice("select.optimizer_state", optimizer_state, OPTIMIZER_STATES)
        _choice("select.grad_score", grad_score, GRAD_SCORES)
        batch_ok = isinstance(public_batch_size, int) and not isinstance(public_batch_size, bool)
        if not batch_ok or public_batch_size < 1:
            raise ConfigError(
                f"select.public_batch_size={public_batch_size!r} is invalid: a positive integer"
            )
        if scorer == "public_grad" and public_source == "none":
            raise ConfigError(
                "select.scorer='public_grad' needs public data but public.source='none': set "
                "public.source (heldout, digits or a dataset) and public.size; scoring on "
                "private data would spend privacy that is not accounted"
            )
        self.every = every
        self.scorer = scorer
        self.grad_score = grad_score
        self.public_batch_size = public_batch_size
        # Which public examples score each selection: a stream of its own (never the
        # sampler's), checkpointed with the method.
        self.public_generator = torch.Generator().manual_seed(M.stream_seed(seed, "select-public"))
        self._public = None
        self._shadow: nn.Module | None = None
        self.optimizer_state = optimizer_state
        self.seed = seed
        self.generator = torch.Generator().manual_seed(M.stream_seed(seed, "select"))
        self.current: M.Masks | None = None
        self.selection_index = -1
        self.updated_fraction_sum = 0.0
        self.selected_steps = 0
        self._model: nn.Module | None = None
        self._restorer = M.CoordinateRestorer(restore_state=optimizer_state == "freeze")

    def setup_method(self, model: nn.Module, datamodule: L.LightningDataModule) -> None:
        self._model = model
        if self.scorer != "public_grad":
            return
        self._public = public_split(datamodule, "select.scorer")
        # A copy made before the clipping engine attaches, so it carries none of the engine's
        # hooks: the public forward/backward must leave no trace in the private step.
        self._shadow = copy.deepcopy(model)

    def _public_scores(self, params: list[tuple[str, nn.Parameter]]) -> M.Masks:
        """|∇L| or |θ ⊙ ∇L| at the current θ on one public batch (free: public data only)."""
        shadow = self._shadow
        device = params[0][1].device if params else torch.device("cpu")
        shadow.to(device)
        copies = dict(shadow.named_parameters())
        with torch.no_grad():
            for n, p in self._model.named_parameters():
                if n in copies:
                    copies[n].copy_(p)
                    copies[n].requires_grad_(p.requires_grad)
        shadow.train(self._model.training)
        size = min(self.public_batch_size, len(self._public))
        index = torch.randperm(len(self._public), generator=self.public_generator)[:size]
        scores = M.public_gradient_scores(
            shadow, [self._public[index]], [n for n, _ in params], self.grad_score == "taylor"
        )
        return {n: scores[n].to(p.device) for n, p in params}

    def _select(self) -> M.Masks:
        """Masks over the trainable maskable weights, restricted to ``freeze``'s kept ones."""
        params = M.maskable_parameters(self._model)
        if self.scorer == "random":
            scores = M.random_scores(params, self.generator)
        elif self.scorer == "magnitude":
            scores = M.magnitude_scores(params)
        else:
            scores = self._public_scores(params)
        chosen = M.top_fraction(scores, self.rate, "layerwise", M.kept_masks(self._model))
        return {n: chosen[n].to(p) for n, p in params}

    def _updated_fraction(self) -> float:
        """Share of all parameters this step updates (counting freeze's kept masks)."""
        kept = M.kept_masks(self._model)
        total = updated = 0
        for n, p in self._model.named_parameters():
            total += p.numel()
            if not p.requires_grad:
                continue
            mask = self.current.get(n, kept.get(n))
            updated += p.numel() if mask is None else int(mask.count_nonzero())
        return updated / total

    def coordinate_weights(self, step: int) -> dict[str, torch.Tensor] | None:
        if step // self.every != self.selection_index or self.current is None:
            self.current = self._select()
            self.selection_index = step // self.every
        params = dict(self._model.named_parameters())
        self.current = {n: m.to(params[n]) for n, m in self.current.items()}
        self.updated_fraction_sum += self._updated_fraction()
        self.selected_steps += 1
        return self.current or None

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._restorer.snapshot(dict(self._model.named_parameters()), self.current, optimizer)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._restorer.restore(optimizer)

    def result_fields(self) -> dict[str, Any]:
        return {
            "select_rate": self.rate,
            "select_every": self.every,
            "select_scorer": self.scorer,
            "select_mask_source": self._source(),
            "select_optimizer_state": self.optimizer_state,
        }

    def _source(self) -> str:
        if self.scorer == "random":
            return "random each selection (own generator, seed stream 'select')"
        if self.scorer == "magnitude":
            return "largest |weight| of the current private model (post-processing)"
        kind = "|grad|" if self.grad_score == "grad" else "|weight*grad|"
        return (
            f"largest {kind} at the current weights on {self.public_batch_size} public "
            "examples per selection (public data only)"
        )

    def trainable_fraction(self, model: nn.Module) -> float | None:
        """Mean over the steps taken of the fraction of parameters updated."""
        if not self.selected_steps:
            return None
        return self.updated_fraction_sum / self.selected_steps

    def state_dict(self) -> dict[str, Any]:
        current = None if self.current is None else {n: m.cpu() for n, m in self.current.items()}
        return {
            "generator": self.generator.get_state(),
            "public_generator": self.public_generator.get_state(),
            "current": current,
            "selection_index": self.selection_index,
            "updated_fraction_sum": self.updated_fraction_sum,
            "selected_steps": self.selected_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        if "public_generator" in state_dict:
            self.public_generator.set_state(state_dict["public_generator"])
        self.current = state_dict["current"]
        self.selection_index = state_dict["selection_index"]
        self.updated_fraction_sum = state_dict["updated_fraction_sum"]
        self.selected_steps = state_dict["selected_steps"]
