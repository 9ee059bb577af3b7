"""Input-space canaries with classes of their own: extra private examples that travel the run's
own path (the Poisson sampler and the configured clipping engine), read white-box from the
released updates on the output-layer row of their class."""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dpexp.audit.canaries import Canaries
from dpexp.clipping import trainable_parameters
from dpexp.errors import ConfigError

# Initial bias of the canary classes: every example of the data set gives each of them a
# probability below e^-20 ≈ 2e-9, so the data's gradients (and training) do not change and
# the data write nothing measurable into the canaries' rows.
CANARY_LOGIT = -20.0
# Per-sample gradient entries materialised at once by the auditor (memory: 4 bytes each).
PER_SAMPLE_BUDGET = 2**24


def output_layer(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` with ``num_classes`` outputs (the model's classifier)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == num_classes
    ]
    if not found or found[-1][1].bias is None:
        raise ConfigError(
            "audit.canary_type=input is invalid for this model: its output must be an "
            f"nn.Linear with bias and dataset.num_classes={num_classes} outputs (the canaries' "
            "classes are added to it)"
        )
    return found[-1]


class InputCanaries(Canaries):
    """m out-of-distribution examples, each with a class of its own; public to the auditor.

    Canary i is a standard Gaussian image (the data are normalised to unit variance) labelled
    with class K + i, a class added to the model's output layer for it (:meth:`add_classes`:
    row K + i starts at weight 0 and bias :data:`CANARY_LOGIT`). The included canaries are
    appended to the private training set (:meth:`members`, given to
    ``DataModule.add_private_examples`` before set-up): the run's sampler draws them, the
    run's engine computes their per-sample norms over every trainable parameter and clips
    and sums them with the batch, the step adds the noise.

    The gradient of canary i on its own row, (p_{K+i} − 1)·[h_i, 1] with h_i the output
    layer's input, is its own: the data and the other canaries write p_{K+i}·[h, 1] ≈ 0 there.
    Each step the auditor computes, with ``torch.func`` on its own copy of the model and
    apart from dpexp's engines, canary i's gradient g_i at the current parameters, its clip
    factor c_i = min(1, C/‖g_i‖), and records the alignment of the released update with the
    expected clipped gradient on row K + i: x_i = ⟨u_{K+i}, c_i·g_{i,K+i}⟩ / C. A sampled
    member adds c_i²‖g_{i,K+i}‖²/(B·C) to it; an engine that does not clip the output layer
    adds 1/c_i times as much.
    """

    name = "audit_input_canaries"

    def __init__(
        self, canaries: int, image_shape: tuple[int, ...], num_classes: int, seed: int
    ) -> None:
        super().__init__(canaries, seed)
        self.inputs = torch.randn((canaries, *image_shape), generator=self.generator)
        self.features = self.inputs  # what the model sees: see use_model_inputs
        self.num_classes = num_classes
        self.labels = num_classes + torch.arange(canaries)
        self.weight_name = self.bias_name = ""
        self.model: nn.Module | None = None
        self.live: nn.Module | None = None
        self.clip_norm = math.nan

    def use_model_inputs(self, features: torch.Tensor) -> None:
        """The canaries' inputs as the model sees them (the data module's fixed front end,
        e.g. precomputed scattering features): the auditor's gradients must be the run's."""
        self.features = features

    def add_classes(self, model: nn.Module) -> None:
        """Give the model's output layer one class per canary (before training starts)."""
        name, layer = output_layer(model, self.num_classes)
        with torch.no_grad():
            weight = torch.cat([layer.weight, layer.weight.new_zeros(self.m, layer.in_features)])
            bias = torch.cat([layer.bias, layer.bias.new_full((self.m,), CANARY_LOGIT)])
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
        layer.out_features = self.num_classes + self.m
        was_training = model.training
        model.eval()
        with torch.no_grad():
            outputs = model(self.features[:1]).shape[-1]
        model.train(was_training)
        if outputs != self.num_classes + self.m:
            raise ConfigError(
                f"audit.canary_type=input is invalid for this model: {name!r} is not its "
                "output layer (the canaries' classes must reach the loss)"
            )
        prefix = f"{name}." if name else ""
        self.weight_name, self.bias_name = f"{prefix}weight", f"{prefix}bias"

    def members(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The included canaries: extra private training examples."""
        return self.inputs[self.included], self.labels[self.included]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After the methods' set-up (reparametrisations) and before the engine attaches:
        # a copy with the run's forward pass and none of the engine's hooks.
        if stage == "fit":
            self.model = copy.deepcopy(pl_module.model)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.live = pl_module.model
        trainable = dict(trainable_parameters(self.live))
        if self.weight_name not in trainable or self.bias_name not in trainable:
            raise ConfigError(
                "audit.canary_type=input is invalid with a method that freezes or "
                f"reparametrises the output layer ({self.weight_name}, {self.bias_name}): "
                "the canaries are read on its rows"
            )
        device = trainable[self.weight_name].device
        self.model.to(device)
        self.features, self.labels = self.features.to(device), self.labels.to(device)
        self.clip_norm = pl_module.gradient_step.max_grad_norm

    def transform_update(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Record each canary's alignment with the released noisy gradient."""
        self.released.append(self.alignments(grads))
        return grads

    @torch.no_grad()
    def alignments(self, update: dict[str, torch.Tensor]) -> torch.Tensor:
        """⟨u_{K+i}, c_i·g_{i,K+i}⟩ / C for every canary i, at the live model's parameters."""
        trainable = dict(trainable_parameters(self.live))
        params = {n: p.detach() for n, p in trainable.items()}
        fixed = {n: p.detach() for n, p in self.live.named_parameters() if n not in trainable}
        fixed.update(dict(self.live.named_buffers()))
        self.model.train(self.live.training)
        model = self.model

        def loss(params, x, y):
            return F.cross_entropy(functional_call(model, (params, fixed), (x[None],)), y[None])

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        rows_w, rows_b = update[self.weight_name], update[self.bias_name]
        chunk = max(1, PER_SAMPLE_BUDGET // sum(p.numel() for p in params.values()))
        values = []
        for x, y in zip(self.features.split(chunk), self.labels.split(chunk), strict=True):
            with torch.enable_grad():
                g = per_sample(params, x, y)
            norms = torch.stack([g[n].flatten(1).square().sum(1) for n in g]).sum(0).sqrt()
            factors = (self.clip_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1)
            own = torch.arange(len(y), device=y.device)
            dots = (g[self.weight_name][own, y] * rows_w[y]).sum(1)
            dots += g[self.bias_name][own, y] * rows_b[y]
            values.append((factors * dots / self.clip_norm).double().cpu())
        return torch.cat(values)
