"""RGP: reparametrized gradient perturbation (Yu, Zhang, Chen, Yin, Liu, ICML 2021).

Each reparametrized weight W (p × d; a conv kernel is read per group as
C_out/groups × C_in/groups·k_h·k_w) is written W = W̃ + L·R with gradient carriers L (p × r,
orthonormal columns) and R (r × d, orthonormal rows) and W̃ held constant. Only the carriers
(and the parameters that are not reparametrized) get per-sample gradients: ∂L_i = G_i·Rᵀ and
∂R_i = Lᵀ·G_i, computed by the clipping engine through two small ordinary layers, never forming
the per-sample G_i. After the DP step clipped, summed and noised them, the update of W is the
projection of G onto the carriers' subspaces, ∂W = ∂L·R + L·∂R − L·Lᵀ·∂L·R (``reconstruct``).

How a layer is reparametrized: the layer keeps its weight W and bias; a child ``rgp``
(:class:`CarrierPath`, x ↦ L·(R·x)) and a forward hook add ``path(x) − stopgrad(path(x))``
to its output, where the path reads a detached x. In value this adds exactly zero, so the
forward pass is bit-for-bit the plain layer's; in gradient it is W̃·x + L·R·x with
W̃ = W − L·R constant: the carriers receive G·Rᵀ and Lᵀ·G, the input receives Wᵀ·g (through
the layer only, since the path's input is detached) and W itself is frozen during the pass.
W̃ is never formed, so no rounding error enters the forward pass.

Carriers are rebuilt before every step from DP-released weights only (the historical update,
the change since initialisation, or the weight), so they cost no privacy: ε is DP-SGD's for
(σ, q, steps).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dpexp.errors import ConfigError
from dpexp.methods.base import Method

LAYER_KINDS = ("conv", "linear")
CARRIER_MODES = ("both", "left")
CARRIER_SOURCES = ("historical", "from_init", "weight")
PATH_NAME = "rgp"  # child module holding the carriers of a reparametrized layer


def carriers(
    matrix: torch.Tensor,
    rank: int,
    power_iterations: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient carriers of ``matrix`` (… × p × d; leading dimensions are a batch).

    Returns ``(L, R)``: L (… × p × r) with orthonormal columns and R (… × r × d) with
    orthonormal rows, r = min(rank, p, d), spanning approximately the top-r left and right
    singular subspaces (exactly when rank(matrix) ≤ r). ``power_iterations`` steps of the
    power method from a Gaussian start drawn from ``generator``, orthonormalised by QR
    (Gram–Schmidt). A zero matrix has no preferred subspace: it gets random carriers.
    """
    if rank < 1 or power_iterations < 1:
        raise ValueError(f"rank={rank} and power_iterations={power_iterations} must be >= 1")
    p, d = matrix.shape[-2:]
    rank = min(rank, p, d)

    def gaussian(*shape: int) -> torch.Tensor:
        draw = torch.randn(*matrix.shape[:-2], *shape, generator=generator, dtype=matrix.dtype)
        return draw.to(matrix.device)

    zero = matrix.flatten(-2).abs().amax(-1) == 0
    if zero.any():  # a zero target (no update yet): fresh random carriers instead
        matrix = torch.where(zero[..., None, None], gaussian(p, d), matrix)
    right = gaussian(d, rank)  # d × r
    for _ in range(power_iterations):
        left = torch.linalg.qr(matrix @ right).Q  # p × r
        right = torch.linalg.qr(matrix.mT @ left).Q  # d × r
    return left, right.mT


def reconstruct(
    grad_L: torch.Tensor, grad_R: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor
) -> torch.Tensor:
    """The update of W from the carriers' gradients: ∂L·R + L·∂R − L·Lᵀ·∂L·R (… × p × d).

    On exact gradients ∂L = G·Rᵀ, ∂R = Lᵀ·G this is L·Lᵀ·G + G·Rᵀ·R − L·Lᵀ·G·Rᵀ·R, the
    projection of G onto the carriers' subspaces (G itself when r = min(p, d)); the last term
    removes the part both carriers carry. ``grad_R=None`` (only L is trained, R fixed) gives
    ∂L·R = G·Rᵀ·R.
    """
    update = grad_L @ R
    if grad_R is not None:
        update = update + L @ grad_R - L @ (L.mT @ grad_L) @ R
    return update


class CarrierPath(nn.Module):
    """x ↦ L·(R·x) for one Linear or Conv2d layer, as two bias-free layers of the same kinds
    (R: the layer's kernel, stride, padding, dilation and groups with r channels per group;
    L: a Linear or a grouped 1×1 conv), so every clipping engine computes their per-sample
    gradients. A grouped conv gets one pair of carriers per group (exact)."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, train_right: bool = True):
        super().__init__()
        weight = layer.weight
        self.groups = getattr(layer, "groups", 1)
        self.out_per_group = weight.shape[0] // self.groups
        self.in_per_group = weight[0].numel()
        self.rank = min(rank, self.out_per_group, self.in_per_group)
        width = self.groups * self.rank
        factory = {"device": weight.device, "dtype": weight.dtype}
        if isinstance(layer, nn.Conv2d):
            self.right = nn.Conv2d(
                layer.in_channels,
                width,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=self.groups,
                bias=False,
                padding_mode=layer.padding_mode,
                **factory,
            )
            self.left = nn.Conv2d(
                width, layer.out_channels, 1, groups=self.groups, bias=False, **factory
            )
        else:
            self.right = nn.Linear(layer.in_features, width, bias=False, **factory)
            self.left = nn.Linear(width, layer.out_features, bias=False, **factory)
        self.right.weight.requires_grad_(train_right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(x))

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) as groups × p × r and groups × r × d."""
        return self.as_left(self.left.weight.detach()), self.as_right(self.right.weight.detach())

    def as_left(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(self.groups, self.out_per_group, self.rank)

    def as_right(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(self.groups, self.rank, self.in_per_group)

    @torch.no_grad()
    def load(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.left.weight.copy_(left.reshape(self.left.weight.shape))
        self.right.weight.copy_(right.reshape(self.right.weight.shape))


def _add_low_rank_path(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: output + path(x) − stopgrad(path(x)); adds exactly zero in value."""
    if not module.training:
        return output
    low_rank = getattr(module, PATH_NAME)(args[0].detach())
    return output + (low_rank - low_rank.detach())


@dataclass
class _Reparametrized:
    layer: nn.Linear | nn.Conv2d
    path: CarrierPath
    weight_name: str
    left_name: str
    right_name: str
    hook: RemovableHandle

    def weight_matrix(self) -> torch.Tensor:
        """W as groups × p × d."""
        path = self.path
        return self.layer.weight.detach().reshape(
            path.groups, path.out_per_group, path.in_per_group
        )


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"rgp.{key}={value!r} is invalid: {allowed}")


def _check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"expected an integer >= {minimum}")
    return value


class RGP(Method):
    """``method=rgp``: low-rank gradient carriers clipped and noised instead of full weights.

    Options (the ``rgp`` config node): ``rank`` r; ``carriers`` both | left (only L is trained,
    as in the authors' vision code); ``carrier_source`` historical (W_t − W_{t−k},
    k = ``history_steps``) | from_init (W_t/‖W_t‖ − W_0/‖W_0‖) | weight (W_t); during the
    first ``warmup_steps`` steps the carriers come from W_t; ``power_iterations``; ``layers``
    (conv, linear: plain ``nn.Conv2d``/``nn.Linear``) and ``reparametrize_classifier`` (the
    last Linear); ``nonreparam_grad_scale`` multiplies the per-sample gradient of every
    parameter that is not reparametrized before clipping (noise on it is unchanged);
    ``seed`` seeds the random starts of the power method.
    """

    name = "rgp"

    def __init__(
        self,
        rank: int = 8,
        carriers: str = "both",
        carrier_source: str = "historical",
        history_steps: int = 10,
        warmup_steps: int = 10,
        power_iterations: int = 1,
        layers: Sequence[str] = LAYER_KINDS,
        reparametrize_classifier: bool = False,
        nonreparam_grad_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.rank = _check_int("rank", rank, 1)
        if carriers not in CARRIER_MODES:
            _fail("carriers", carriers, f"choose one of {', '.join(CARRIER_MODES)}")
        if carrier_source not in CARRIER_SOURCES:
            _fail("carrier_source", carrier_source, f"choose one of {', '.join(CARRIER_SOURCES)}")
        self.carrier_mode = carriers
        self.carrier_source = carrier_source
        self.history_steps = _check_int("history_steps", history_steps, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.power_iterations = _check_int("power_iterations", power_iterations, 1)
        layers = list(layers) if not isinstance(layers, str) else [layers]
        if not layers or any(kind not in LAYER_KINDS for kind in layers):
            _fail("layers", layers, f"a non-empty list of {', '.join(LAYER_KINDS)}")
        self.layers = tuple(layers)
        if not isinstance(reparametrize_classifier, bool):
            _fail("reparametrize_classifier", reparametrize_classifier, "true or false")
        self.reparametrize_classifier = reparametrize_classifier
        scale = nonreparam_grad_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            _fail("nonreparam_grad_scale", scale, "a number > 0")
        self.nonreparam_grad_scale = float(scale)
        self.seed = _check_int("seed", seed, 0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.reparametrized: list[_Reparametrized] = []
        self.steps = 0
        self.history: dict[str, deque[torch.Tensor]] = {}
        self.initial: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] | None = None
        self._nonreparam_params: list[tuple[str, nn.Parameter]] = []
        self._counts: dict[str, int] = {}

    # -- reparametrization ------------------------------------------------------------
    def _selected(self, model: nn.Module) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
        # Exact types: subclasses (e.g. timm's Conv2dSame) may run another forward.
        kinds = {"conv": nn.Conv2d, "linear": nn.Linear}
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        classifier = linears[-1] if linears else None
        chosen = []
        for name, module in model.named_modules():
            if not any(type(module) is kinds[kind] for kind in self.layers):
                continue
            if name == classifier and not self.reparametrize_classifier:
                continue
            if module.weight.requires_grad:
                chosen.append((name, module))
        return chosen

    def setup_method(self, model: nn.Module, datamodule: L.LightningDataModule) -> None:
        if self.reparametrized:
            raise RuntimeError("RGP is already attached to a model")
        chosen = self._selected(model)
        if not chosen:
            _fail("layers", list(self.layers), "the model has no such layer to reparametrize")
        self._weights = None
        for name, layer in chosen:
            path = CarrierPath(layer, self.rank, train_right=self.carrier_mode == "both")
            layer.add_module(PATH_NAME, path)
            layer.weight.requires_grad_(False)  # W is updated from the carriers, not clipped
            prefix = f"{name}.{PATH_NAME}"
            self.reparametrized.append(
                _Reparametrized(
                    layer=layer,
                    path=path,
                    weight_name=f"{name}.weight",
                    left_name=f"{prefix}.left.weight",
                    right_name=f"{prefix}.right.weight",
                    hook=layer.register_forward_hook(_add_low_rank_path),
                )
            )
        self.refresh_carriers(from_history=False)  # usable (and bit-identical) from here on
        clipped = [p for p in model.parameters() if p.requires_grad]
        self._counts = {
            "rgp_reparametrized_layers": len(self.reparametrized),
            "rgp_reparametrized_params": sum(r.layer.weight.numel() for r in self.reparametrized),
            "rgp_clipped_params": sum(p.numel() for p in clipped),
        }
        self._nonreparam_params = self._nonreparam(model)

    def _nonreparam(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        carrier_ids = {id(p) for r in self.reparametrized for p in r.path.parameters()}
        return [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in carrier_ids
        ]

    def restore_plain_layers(self) -> None:
        """Remove carriers and hooks: the model is the plain model with the trained weights."""
        for r in self.reparametrized:
            r.hook.remove()
            delattr(r.layer, PATH_NAME)
            r.layer.weight.requires_grad_(True)
        self.reparametrized = []

    # -- carriers -----------------------------------------------------------------------
    def _target(self, r: _Reparametrized, weight: torch.Tensor) -> torch.Tensor:
        """The matrix whose top singular subspaces the carriers span (DP-released weights)."""
        if self.carrier_source == "historical":
            past = self.history.setdefault(r.weight_name, deque(maxlen=self.history_steps))
            oldest = past[0].to(weight) if past else None
            past.append(weight.clone())
            if self.steps >= self.warmup_steps and oldest is not None:
                return weight - oldest  # W_t − W_{t−min(k, t)}
        elif self.carrier_source == "from_init":
            start = self.initial.setdefault(r.weight_name, weight.clone()).to(weight)
            if self.steps >= self.warmup_steps:
                tiny = torch.finfo(weight.dtype).tiny
                return weight / weight.norm().clamp_min(tiny) - start / start.norm().clamp_min(tiny)
        return weight

    @torch.no_grad()
    def refresh_carriers(self, from_history: bool = True) -> None:
        """Rebuild every layer's carriers from the current (already released) weights; with
        ``from_history`` this is the start of a step and its weights join the history."""
        for r in self.reparametrized:
            weight = r.weight_matrix()
            target = self._target(r, weight) if from_history else weight
            left, right = carriers(target, self.rank, self.power_iterations, self.generator)
            r.path.load(left, right)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.refresh_carriers()

    # -- the DP step ------------------------------------------------------------------
    def coordinate_weights(self, step: int) -> dict[str, torch.Tensor] | None:
        if self.nonreparam_grad_scale == 1.0 or not self.reparametrized:
            return None
        if self._weights is None:  # built at the first step: the model is on its device by then
            self._weights = {
                n: torch.full_like(p, self.nonreparam_grad_scale)
                for n, p in self._nonreparam_params
            }
        return self._weights

    def transform_update(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        grads = dict(grads)
        for r in self.reparametrized:
            left, right = r.path.matrices()
            grad_left = r.path.as_left(grads.pop(r.left_name))
            grad_right = grads.pop(r.right_name, None)
            if grad_right is not None:
                grad_right = r.path.as_right(grad_right)
            update = reconstruct(grad_left, grad_right, left, right)
            grads[r.weight_name] = update.reshape(r.layer.weight.shape)
        return grads

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.steps += 1

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter] | None:
        weights = [r.layer.weight for r in self.reparametrized]
        return weights + [p for _, p in self._nonreparam(model)]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.restore_plain_layers()

    # -- results and checkpoints --------------------------------------------------------
    def result_fields(self) -> dict[str, Any]:
        return {
            "rgp_rank": self.rank,
            "rgp_carriers": self.carrier_mode,
            "rgp_carrier_source": self.carrier_source,
            **self._counts,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "generator": self.generator.get_state(),
            "history": {n: [t.cpu() for t in past] for n, past in self.history.items()},
            "initial": {n: t.cpu() for n, t in self.initial.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict["steps"]
        self.generator.set_state(state_dict["generator"])
        self.history = {
            n: deque(past, maxlen=self.history_steps) for n, past in state_dict["history"].items()
        }
        self.initial = dict(state_dict["initial"])
