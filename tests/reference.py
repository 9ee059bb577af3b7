"""Brute-force references: one backward pass per sample, no hooks, no tricks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_sample_gradients(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """B × param-shape gradients of each sample's cross-entropy, one backward at a time."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n, _ in params}
    for x, y in zip(inputs, targets, strict=True):
        loss = F.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0), reduction="sum")
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def clipped_sum(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_grad_norm: float,
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Σ_i g_i · min(1, C/‖g_i‖) over (weighted) per-sample gradients, and the norms."""
    grads = per_sample_gradients(model, inputs, targets)
    if weights:
        grads = {n: g * weights[n] if n in weights else g for n, g in grads.items()}
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    factors = torch.where(norms > max_grad_norm, max_grad_norm / norms, torch.ones_like(norms))
    sums = {n: (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0) for n, g in grads.items()}
    return sums, norms
