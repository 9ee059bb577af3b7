"""Per-sample gradients from Opacus' hooks (the reference mode) and from torch.func."""

from __future__ import annotations

from opacus.grad_sample import GradSampleHooks
from torch.func import functional_call, grad, vmap

from dpexp.clipping.base import MaterializingEngine, trainable_parameters
from dpexp.clipping.tape import UnsupportedModelError
from dpexp.clipping.trace import outside_own_module, trace_uses


class OpacusPerSampleEngine(MaterializingEngine):
    """Opacus' grad samplers attached as hooks (no wrapper module)."""

    mode = "per_sample"

    def attach(self) -> None:
        self._hooks = GradSampleHooks(
            self.model, batch_first=True, loss_reduction="sum", strict=True
        )
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

    def per_sample_gradients(self, inputs, targets):
        self._check_coverage(inputs)
        params = trainable_parameters(self.model)
        saved = [p.grad for _, p in params]
        for _, p in params:
            p.grad = None  # backward accumulates in place: keep the caller's tensors intact
        loss = self.loss_fn(self.model(inputs), targets)
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
