"""Per-sample gradients from Opacus' hooks (the reference mode) and from torch.func."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opacus.grad_sample import GradSampleHooks
from torch import nn
from torch.func import functional_call, grad, vmap

from dpexp.clipping.base import MaterializingEngine, trainable_parameters
from dpexp.clipping.tape import UnsupportedModelError, describe
from dpexp.clipping.trace import outside_own_module, trace_uses

# Module types whose forward ignores ``training``: Opacus' hooks record a module's input only
# in training mode, so in eval mode these are marked as training for the forward alone.
_SAME_IN_EVAL = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag, nn.GroupNorm,
    nn.LayerNorm, nn.RMSNorm,
)  # fmt: skip
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def opacus_blind_spot(module: nn.Module) -> str | None:
    """Why Opacus' grad sampler for ``module`` (chosen by its exact type) would give wrong
    per-sample gradients or fail, and the modes that are exact for it; None if it is fine.
    Each case was measured against one backward per sample (tests/test_clipping_edges.py)."""
    kind = type(module)
    if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode != "zeros":
        exact = "clipping=functorch" if kind is nn.Conv3d else "clipping=functorch or auto"
        return (
            f"padding_mode={module.padding_mode!r} is ignored by Opacus' convolution grad "
            f"sampler (wrong per-sample gradients); use {exact}, exact for it"
        )
    if kind is nn.Embedding and module.padding_idx is not None:
        return (
            f"padding_idx={module.padding_idx} is ignored by Opacus' embedding grad sampler "
            "(wrong per-sample gradients); use clipping=functorch or auto, exact for it"
        )
    if kind is nn.Embedding and module.scale_grad_by_freq:
        return (
            "scale_grad_by_freq=True is ignored by Opacus' embedding grad sampler (wrong "
            "per-sample gradients); use clipping=functorch, exact for it"
        )
    if kind is nn.LayerNorm and module.weight is not None and module.bias is None:
        return (
            "bias=False makes Opacus' layer-norm grad sampler fail; use clipping=functorch "
            "or auto, exact for it"
        )
    return None


def _same_in_eval(module: nn.Module) -> bool:
    if type(module) in _INSTANCE_NORMS:
        return not module.track_running_stats
    return type(module) in _SAME_IN_EVAL


class OpacusPerSampleEngine(MaterializingEngine):
    """Opacus' grad samplers attached as hooks (no wrapper module). Refuses the layer options
    those samplers get wrong (:func:`opacus_blind_spot`)."""

    mode = "per_sample"

    def attach(self) -> None:
        names = {id(m): n for n, m in self.model.named_modules()}
        hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="sum", strict=True)
        self._hooked = [(names[id(m)], m) for m in hooks.iterate_submodules(self.model)]
        for name, module in self._hooked:
            if why := opacus_blind_spot(module):
                hooks.cleanup()
                raise UnsupportedModelError(f"{describe(name, module)}: {why}")
        self._hooks = hooks
        self._checked: set[tuple] = getattr(self, "_checked", set())
        super().attach()

    def _check_coverage(self, inputs) -> None:
        """Opacus computes a parameter's per-sample gradient from its own module's input
        and output only: refuse, by name, any parameter with uses it cannot see."""
        key = tuple(inputs.shape[1:])
        if key in self._checked or len(inputs) == 0:
            return
        self._hooks.disable_hooks()  # the traced forwards must leave no activations behind
        try:
            problems = outside_own_module(self.model, trace_uses(self.model, inputs))
        finally:
            self._hooks.enable_hooks()
        if problems:
            raise UnsupportedModelError(
                f"Opacus' per-module hooks cannot clip this model: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            )
        self._checked.add(key)

    def detach(self) -> None:
        self._hooks.cleanup()
        del self._hooks
        super().detach()

    @contextmanager
    def _recorded_in_eval_mode(self) -> Iterator[None]:
        """Marks the hooked modules in eval mode as training while the forward runs, so that
        Opacus records them; only types whose forward ignores the flag (Dropout and other
        unhooked modules keep their mode)."""
        flipped = []
        for name, module in self._hooked:
            if module.training:
                continue
            if not _same_in_eval(module):
                raise UnsupportedModelError(
                    f"{describe(name, module)} is in eval mode, where Opacus' hooks record "
                    "nothing, and its forward may depend on the mode; use clipping=functorch "
                    "or auto, or call model.train()"
                )
            flipped.append(module)
        try:
            for module in flipped:
                module.training = True
            yield
        finally:
            for module in flipped:
                module.training = False

    def per_sample_gradients(self, inputs, targets):
        self._check_coverage(inputs)
        params = trainable_parameters(self.model)
        saved = [p.grad for _, p in params]
        for _, p in params:
            p.grad = None  # backward accumulates in place: keep the caller's tensors intact
        with self._recorded_in_eval_mode():
            out = self.model(inputs)
        loss = self.loss_fn(out, targets)
        loss.backward()
        per_sample = {n: p.grad_sample for n, p in params}
        for (_, p), g in zip(params, saved, strict=True):
            p.grad_sample = None
            p.grad = g
        return per_sample, loss.detach()


class FunctorchEngine(MaterializingEngine):
    """vmap(grad(·)) over samples: any differentiable layer, no hooks."""

    mode = "functorch"

    def per_sample_gradients(self, inputs, targets):
        trainable = dict(trainable_parameters(self.model))
        params = {n: p.detach() for n, p in trainable.items()}
        fixed = {n: p for n, p in self.model.named_parameters() if n not in trainable}
        fixed.update(dict(self.model.named_buffers()))

        def sample_loss(params, x, y):
            out = functional_call(self.model, (params, fixed), (x.unsqueeze(0),))
            loss = self.loss_fn(out, y.unsqueeze(0))
            return loss, loss

        # each sample draws its own dropout masks inside vmap, as in a batched forward
        grads, losses = vmap(
            grad(sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different"
        )(params, inputs, targets)
        return grads, losses.sum().detach()
