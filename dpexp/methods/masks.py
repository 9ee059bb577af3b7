"""Coordinate masks shared by ``freeze`` and ``select``: which parameters may be masked, how
coordinates are scored and ranked, and how masked coordinates are kept from moving.

Masks live outside the modules (``{parameter name: 0/1 tensor}``): pruning buffers or
reparametrizations inside the modules would break per-sample gradient hooks.
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

Masks = dict[str, torch.Tensor]

# The coordinates `freeze` keeps, by model, so that `select` can choose among them. A registry
# rather than a module attribute: masks must not live inside the modules.
_KEPT: weakref.WeakKeyDictionary[nn.Module, Masks] = weakref.WeakKeyDictionary()


def register_kept(model: nn.Module, masks: Masks) -> None:
    """Declare ``masks`` the coordinates of ``model`` that may train at all."""
    _KEPT[model] = masks


def kept_masks(model: nn.Module) -> Masks:
    """The masks registered by ``register_kept`` for ``model`` (empty: everything is kept)."""
    return _KEPT.get(model, {})


def stream_seed(seed: int, stream: str) -> int:
    """A seed for the random stream ``stream`` that no other generator of the run shares.

    The Poisson sampler and the noise are seeded from ``seed`` too; a mask drawn from the same
    stream as the sampler would reveal which examples were sampled, breaking amplification.
    """
    return (seed * 1_000_003 + zlib.crc32(stream.encode())) % 2**63


def maskable(param: nn.Parameter, include_all: bool = False) -> bool:
    """Weights of linear/conv/embedding layers (≥ 2 dims) may be masked; biases and
    normalization scales/shifts (1-dim) only when ``include_all``."""
    return include_all or param.dim() > 1


def maskable_parameters(
    model: nn.Module, include_all: bool = False
) -> list[tuple[str, nn.Parameter]]:
    return [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and maskable(p, include_all)
    ]


def random_scores(params: Iterable[tuple[str, nn.Parameter]], generator: torch.Generator) -> Masks:
    """Uniform scores from ``generator`` (on the CPU, so masks do not depend on the device)."""
    return {n: torch.rand(p.shape, generator=generator).to(p.device) for n, p in params}


def magnitude_scores(params: Iterable[tuple[str, nn.Parameter]]) -> Masks:
    return {n: p.detach().abs() for n, p in params}


def public_gradient_scores(
    model: nn.Module, loader: Iterable, names: Iterable[str], taylor: bool = False
) -> Masks:
    """Σ over public batches of |∇_θ L| (or |θ ⊙ ∇_θ L| with ``taylor``), for ``names``.

    ``loader`` must yield public batches only: these scores are not privatized.
    """
    params = dict(model.named_parameters())
    names = list(names)
    scores = {n: torch.zeros_like(params[n]) for n in names}
    device = next(model.parameters()).device
    for x, y in loader:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                scores[n] += (g * params[n].detach() if taylor else g).abs()
    return scores


def keep_count(numel: int, rate: float) -> int:
    """Coordinates kept when a fraction ``rate`` of ``numel`` is dropped."""
    return numel - round(rate * numel)


def top_fraction(scores: Masks, rate: float, scope: str, allowed: Masks | None = None) -> Masks:
    """0/1 masks keeping the highest-scored fraction ``1 - rate`` of the allowed coordinates.

    ``scope='layerwise'`` keeps that fraction of every tensor, ``'global'`` of all of them
    together. ``allowed`` (0/1 per name) restricts the candidates; others are never kept.
    """
    allowed = allowed or {}
    flat = {}
    for n, s in scores.items():
        s = s.detach().flatten().to(torch.float64)
        if n in allowed:
            s = torch.where(allowed[n].flatten() != 0, s, torch.full_like(s, -torch.inf))
        flat[n] = s
    counts = {n: int((s > -torch.inf).sum()) for n, s in flat.items()}
    if scope == "layerwise":
        keep = {n: _top_k_mask(s, keep_count(counts[n], rate)) for n, s in flat.items()}
    elif scope == "global":
        joint = torch.cat([s.cpu() for s in flat.values()])
        chosen = _top_k_mask(joint, keep_count(sum(counts.values()), rate))
        keep, start = {}, 0
        for n, s in flat.items():
            keep[n] = chosen[start : start + s.numel()].to(s.device)
            start += s.numel()
    else:
        raise ValueError(f"unknown scope {scope!r}")
    return {n: keep[n].view_as(scores[n]).to(scores[n].dtype) for n in scores}


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        # stable sort: ties go to the lower index, so masks are reproducible
        order = torch.sort(scores, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask


class CoordinateRestorer:
    """Keeps masked coordinates from moving through an optimizer step.

    ``snapshot`` (before ``optimizer.step()``) copies the parameters and, with
    ``restore_state``, their optimizer state; ``restore`` (after) puts back every coordinate
    whose mask is 0. Weight decay, momentum and Adam's moments then cannot move a coordinate
    that received no gradient. Optimizer state created by this very step is restored to 0, the
    value a zero-initialized buffer (Adam's moments, SGD's first momentum buffer of a zero
    gradient) would hold.
    """

    def __init__(self, restore_state: bool = True) -> None:
        self.restore_state = restore_state
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, dict]] = []

    def snapshot(
        self, params: dict[str, nn.Parameter], masks: Masks, optimizer: torch.optim.Optimizer
    ) -> None:
        self._saved = []
        for n, mask in masks.items():
            p = params[n]
            if not p.requires_grad:
                continue
            state = {}
            if self.restore_state:
                state = {
                    k: v.detach().clone()
                    for k, v in optimizer.state.get(p, {}).items()
                    if torch.is_tensor(v) and v.shape == p.shape
                }
            self._saved.append((p, mask != 0, p.detach().clone(), state))

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        for p, moves, before, state in self._saved:
            p.copy_(torch.where(moves, p, before))
            if not self.restore_state:
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    old = state.get(k, torch.zeros_like(v))
                    v.copy_(torch.where(moves, v, old))
        self._saved = []
