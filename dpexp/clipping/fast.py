"""Fast clipping engines built on the tape (recorded inputs and output gradients).

Every engine handles a layer when the backward pass reaches its output (a pre-hook on that
output's autograd node): the layer's per-sample squared norms are added up at once, and only
what its clipped sum still needs (its input and output gradient, or its per-sample gradients)
is kept, so memory stays close to non-private training's.

- ``bk``: one backward (book-keeping). Norms by the seed's mixed rule, then the clipped sum
  Σ_i c_i g_i from the kept tensors and the c-scaled output gradients: no second backward.
- ``auto``: ``bk`` with, per layer and input shape, the fastest exact choice, timed once on
  the first batch of that shape: the ghost norm, or per-sample gradients that are either
  kept (only where they are no larger than the layer's input and output gradient) or used
  for the norm alone (``norm:<method>``; the sum then comes from input and output gradient).
- ``mixed_ghost``: the seed's two passes (Bu, Mao, Xu 2022): norms by the mixed rule in a first
  backward, then a second backward of the reweighted loss Σ_i c_i·loss_i.
- ``ghost``: two passes with the ghost norm wherever one exists (Linear, Conv, Embedding
  weights); other parameters are instantiated.

Per-parameter coordinate weights w force instantiation of that parameter (‖w ⊙ g_i‖ needs it);
its sum is Σ_i c_i (w ⊙ g_i).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from dpexp import progress
from dpexp.clipping.base import (
    ClippingEngine,
    clip_factors,
    squared_norms,
    summed_cross_entropy,
    trainable_parameters,
)
from dpexp.clipping.layers import Dims, instantiation_fits, mixed_rule
from dpexp.clipping.tape import Call, Layer, Tape, UnsupportedModelError, generic_per_sample
from dpexp.clipping.trace import trace_uses

log = logging.getLogger(__name__)


def _no_progress(n: float = 1) -> None:
    return None


def _per_sample_view(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.view(-1, *[1] * (like.dim() - 1))


class FastEngine(ClippingEngine):
    """Shared pipeline: forward with the tape, backward to the recorded output edges, per-layer
    norms (ghost or instantiated), then the clipped sum in one or two passes."""

    rule: Callable[[Dims], bool] = staticmethod(mixed_rule)
    two_pass = False
    _advance: Callable[..., None] = staticmethod(_no_progress)  # the plan's progress bar

    def __init__(self, model, loss_fn=summed_cross_entropy) -> None:
        super().__init__(model, loss_fn)
        self.tape: Tape | None = None
        self._trainable: tuple[int, ...] = ()

    def attach(self) -> None:
        """Hooks on; the plan, decisions and probes survive detach/attach while the set of
        trainable parameters stays the same."""
        trainable = tuple(id(p) for _, p in trainable_parameters(self.model))
        if self.tape is None or trainable != self._trainable:
            self.tape = Tape(self.model)
            self._trainable = trainable
            self._decisions: dict[tuple, str] = {}
            self.plan: list[dict] = []  # the decisions, for the run dir (clipping_plan.json)
            self._planned: set[tuple] = set()  # input shapes whose first batch was planned
            self._probed: set[tuple] = set()
            self._traced: set[tuple] = set()
            self.moved: dict[str, str] = {}  # parameter → the module whose path covers it
        self.tape.attach()
        super().attach()

    def detach(self) -> None:
        self.tape.detach()
        super().detach()

    # -- decisions -------------------------------------------------------------------
    def _strategy(self, layer: Layer, local: str, x: torch.Tensor, g: torch.Tensor) -> str:
        """Per layer, parameter and input shape: "ghost" or an instantiation method; decided
        once and logged once."""
        key = (layer.name, local, tuple(x.shape[1:]))
        if key not in self._decisions:
            choice = self.choose(layer, local, x, g)
            self._decisions[key] = choice
            dims = layer.math.dims(layer.module, x, g)
            self.plan.append(
                {"layer": layer.name, "module": type(layer.module).__name__,
                 "parameter": local, "input": list(x.shape[1:]),
                 "dims": None if dims is None else str(dims), "choice": choice}
            )  # fmt: skip
            log.debug(
                "clipping=%s: %s %s, input %s, %s → %s",
                self.mode, layer.where, local, tuple(x.shape[1:]), dims, choice,
            )  # fmt: skip
            self._advance()
        return self._decisions[key]

    def plan_summary(self) -> str:
        """How many parameters each path clips, e.g. ``ghost 4, unfold 2, conv 2``."""
        counts = Counter(entry["choice"] for entry in self.plan)
        return ", ".join(f"{choice} {n}" for choice, n in counts.most_common())

    def _plan_stage(self, inputs: torch.Tensor, weights) -> AbstractContextManager:
        """A progress bar while the first batch of a new input shape is planned (timed)."""
        shape = tuple(inputs.shape[1:])
        total = sum(
            len(layer.params) - sum(full in weights for full in layer.params.values())
            for layer in self.tape.layers
            if layer.math is not None and len(layer.calls) == 1
        )
        if self.mode != "auto" or total == 0 or shape in self._planned:
            return nullcontext(_no_progress)
        self._planned.add(shape)
        return progress.stage(f"clipping plan ({self.mode})", total=total)

    def choose(self, layer: Layer, local: str, x: torch.Tensor, g: torch.Tensor) -> str:
        """The engine's rule on the layer's (T, p, D) for the ghost norm, else instantiate."""
        if local in layer.math.ghost_params:
            dims = layer.math.dims(layer.module, x, g)
            if dims is not None and type(self).rule(dims):
                return "ghost"
        return default_method(layer, g.shape[2:])

    # -- the plan is checked against a traced forward once per input shape ---------------
    def _adapt_plan(self, inputs: torch.Tensor) -> None:
        key = tuple(inputs.shape[1:])
        if key in self._traced:
            return
        self._traced.add(key)
        moved = self.tape.adapt(trace_uses(self.model, inputs))
        if moved:
            self.moved.update(moved)
            log.info(
                "clipping=%s: %d parameters act outside their own layer's forward; their "
                "per-sample gradients come from the enclosing module: %s",
                self.mode,
                len(moved),
                ", ".join(f"{p} → {m or '<model>'}" for p, m in moved.items()),
            )

    # -- broadcast parameters are checked once per input shape ---------------------------
    def _probe_broadcasts(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Row j of an expanded parameter must get exactly zero gradient from sample i ≠ j;
        a parameter that fails is handed to the generic (torch.func) path."""
        key = tuple(inputs.shape[1:])
        if not self.tape.broadcasts or key in self._probed:
            return
        self._probed.add(key)
        x = inputs[:1].repeat(2, *[1] * (inputs.dim() - 1))
        y = targets[:1].repeat(2, *[1] * (targets.dim() - 1))
        self.tape.start(2)
        try:
            out = self.model(x)
        finally:
            self.tape.stop()
        for b in list(self.tape.broadcasts):
            edges = [e for local in b.params for e in b.edges[local]]
            leaks = False
            for i in (0, 1):
                loss_i = self.loss_fn(out[i : i + 1], y[i : i + 1])
                grads = torch.autograd.grad(loss_i, edges, retain_graph=True, allow_unused=True)
                leaks |= any(g is not None and bool(g[1 - i].ne(0).any()) for g in grads)
            if leaks:
                log.warning(
                    "%s: parameters %s mix samples when expanded; using torch.func instead",
                    b.name or "<root>",
                    sorted(b.params),
                )
                self.tape.demote(b)

    # -- the step ------------------------------------------------------------------------
    def _clipped_sum(self, inputs, targets, max_grad_norm, weights=None):
        params = dict(trainable_parameters(self.model))
        if tuple(id(p) for p in params.values()) != self._trainable:
            self.detach()  # a parameter was frozen or unfrozen since attach: plan again
            self.attach()
        self._adapt_plan(inputs)
        self._probe_broadcasts(inputs, targets)
        tape = self.tape
        tape.start(len(inputs))
        try:
            # detached: every layer input with a history then leads down to a recorded layer
            out = self.model(inputs.detach())
        finally:
            tape.stop()
        loss = self.loss_fn(out, targets)
        step = _Step(self, weights or {}, len(inputs), out.dtype, out.device)
        # Layers are processed as the backward reaches them (a pre-hook on each output's
        # node), so an output gradient is kept only while its layer's clipped sum needs it.
        # Only the lowest layers (no history below them) and broadcast views are requested
        # from autograd: the nodes above run because they lie on the way to those.
        requested, hooks = [], []
        for layer in tape.layers:
            for call in layer.calls:
                hooks.append(call.edge.node.register_prehook(step.prehook(layer, call)))
                if call.lowest:
                    requested.append((layer, call))
        broadcast_edges = [e for b in tape.broadcasts for es in b.edges.values() for e in es]
        edges = [call.edge for _, call in requested] + broadcast_edges
        if self.two_pass:
            edges.append(get_gradient_edge(out))
        try:
            with self._plan_stage(inputs, step.weights) as self._advance:
                grads = list(
                    torch.autograd.grad(loss, edges, allow_unused=True, retain_graph=self.two_pass)
                )
        finally:
            self._advance = _no_progress
            # node → hook → call → edge → node is a cycle through C++ that Python's garbage
            # collector cannot see: it would keep every step's graph and saved inputs alive
            for hook in hooks:
                hook.remove()
        out_grad = grads.pop() if self.two_pass else None
        for (layer, call), g in zip(requested, grads, strict=False):
            step.process(layer, call, g)  # capture-only nodes run no pre-hook
        del grads[: len(requested)]
        unreached = [layer.where for layer in tape.layers for call in layer.calls if not call.done]
        if unreached:
            raise UnsupportedModelError(
                f"{unreached[0]}: its output's gradient was not reached by the backward pass"
            )
        position = 0
        for b in tape.broadcasts:
            for local, full in b.params.items():
                count = len(b.edges[local])
                rows = [g for g in grads[position : position + count] if g is not None]
                position += count
                if rows:
                    step.instantiated(full, torch.stack(rows).sum(0).unsqueeze(1))
        grads.clear()
        for layer in tape.layers:
            layer.calls = []
        norms = step.finish().sqrt()
        factors = clip_factors(norms, max_grad_norm)
        if self.two_pass:
            sums = self._second_pass(out, out_grad, factors, params, step.weights)
        else:
            sums = {}
            while step.pending:  # each layer's recorded tensors are released once summed
                name, clipped = step.pending.pop()
                sums[name] = clipped(factors)
        sums = {n: sums[n] if n in sums else torch.zeros_like(p) for n, p in params.items()}
        return sums, norms.detach(), loss.detach()

    def _second_pass(self, out, out_grad, factors, params, weights):
        """Backward of Σ_i c_i·loss_i: the loss of sample i depends on output row i only."""
        if out_grad is None:
            return {}
        names = list(params)
        grads = torch.autograd.grad(
            out,
            [params[n] for n in names],
            grad_outputs=out_grad * _per_sample_view(factors, out_grad),
            allow_unused=True,
        )
        sums = {}
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                sums[n] = g * weights[n] if n in weights else g
        return sums


# Instantiated for the norm only; the clipped sum then comes from the layer's input and
# c-scaled output gradient, as on the ghost path.
NORM_ONLY = "norm:"


def default_method(layer: Layer, positions: tuple[int, ...] = ()) -> str:
    """Instantiation method when no timing is done (measured on CPU): for convolutions with
    few input channels per group one grouped convolution, with many output positions the
    native kernel per sample, else unfold + batched matmul."""
    module = layer.module
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.in_channels // module.groups <= 4:
            return "conv"
        return "loop" if math.prod(positions) >= 256 else "unfold"
    return layer.math.methods[0]


def _ghost_sum(layer: Layer, local: str, x: torch.Tensor, g: torch.Tensor):
    def clipped(c: torch.Tensor) -> torch.Tensor:
        return layer.math.summed(layer.module, x, g * _per_sample_view(c, g), local)

    return clipped


class _Step:
    """One batch's per-sample squared norms and queued clipped sums, filled layer by layer
    as the backward pass reaches each recorded output."""

    def __init__(self, engine: FastEngine, weights, batch: int, dtype, device) -> None:
        self.engine, self.weights = engine, weights
        self.sq = torch.zeros(batch, dtype=dtype, device=device)
        self.per_sample: dict[str, torch.Tensor] = {}  # instantiated, summed over calls
        self.pending: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []

    def prehook(self, layer: Layer, call: Call):
        def hook(grad_outputs):
            self.process(layer, call, grad_outputs[call.edge.output_nr])

        return hook

    def process(self, layer: Layer, call: Call, g: torch.Tensor | None) -> None:
        """Norm contributions of one call; queues what the clipped sum needs, drops the rest."""
        if call.done:
            return
        if g is not None:
            call.check_unchanged(layer.where)
            if layer.math is None:
                grads = generic_per_sample(layer, call, g, self.engine.tape)
                for local, full in layer.params.items():
                    self.instantiated(full, grads[local])
            else:
                self._fast(layer, call, g)
        call.release()  # the input lives on only in queued ghost sums

    def _fast(self, layer: Layer, call: Call, g: torch.Tensor) -> None:
        layer_math, module, engine = layer.math, layer.module, self.engine
        for local, full in layer.params.items():
            # a weighted or repeatedly called parameter needs its per-sample gradient
            method = default_method(layer, g.shape[2:])
            if len(layer.calls) == 1 and full not in self.weights:
                method = engine._strategy(layer, local, call.x, g)
            if method == "ghost" or method.startswith(NORM_ONLY):
                if method == "ghost":
                    self.sq += layer_math.ghost_sq_norm(module, call.x, g)
                else:
                    how = method.removeprefix(NORM_ONLY)
                    self.sq += layer_math.per_sample_sq_norm(module, call.x, g, local, how)
                if not engine.two_pass:
                    self.pending.append((full, _ghost_sum(layer, local, call.x, g)))
            else:
                self.instantiated(full, layer_math.per_sample(module, call.x, g, local, method))

    def instantiated(self, full: str, per: torch.Tensor) -> None:
        so_far = self.per_sample.get(full)
        self.per_sample[full] = per if so_far is None else so_far + per

    def finish(self) -> torch.Tensor:
        """Adds the instantiated parameters' squared norms; returns all squared norms."""
        for full, per in self.per_sample.items():
            if full in self.weights:
                per = per * self.weights[full]
            self.sq += squared_norms(per)
            if not self.engine.two_pass:
                self.pending.append((full, lambda c, per=per: torch.tensordot(c, per, dims=1)))
        self.per_sample = {}
        return self.sq


class BookKeepingEngine(FastEngine):
    """One backward; mixed rule per layer; clipped sum from recorded tensors."""

    mode = "bk"


class AutoEngine(FastEngine):
    """One backward; per layer and input shape the fastest exact path, timed once, among
    those that keep no more memory until the clipped sum than the ghost path (the layer's
    input and output gradient): per-sample gradients are kept only where they are smaller,
    elsewhere they give the norm and are dropped (``norm:<method>``)."""

    mode = "auto"

    def choose(self, layer, local, x, g):
        layer_math = layer.math
        dims = layer_math.dims(layer.module, x, g)
        if local not in layer_math.ghost_params or dims is None:
            return default_method(layer, g.shape[2:])  # biases, norm layers: one way
        # the ghost norm is not even timed where its Gram matrices are 4× past the mixed rule
        candidates = ["ghost"] if mixed_rule(Dims(dims.T, 4 * dims.p, dims.D)) else []
        if not candidates or instantiation_fits(dims):
            small = getattr(layer.module, local).numel() <= x[0].numel() + g[0].numel()
            for method in layer_math.methods:
                candidates += [method, NORM_ONLY + method] if small else [NORM_ONLY + method]
        if len(candidates) == 1:
            return candidates[0]
        seconds = dict.fromkeys(candidates, float("inf"))
        for _ in range(3):  # interleaved, best of three: robust to a busy machine
            for c in candidates:
                seconds[c] = min(seconds[c], _time_path(layer, local, x, g, c))
        fastest = min(seconds, key=seconds.get)
        usual = super().choose(layer, local, x, g)  # bk's choice, kept unless clearly slower
        return fastest if seconds[fastest] < 0.8 * seconds.get(usual, float("inf")) else usual


def _time_path(layer: Layer, local: str, x: torch.Tensor, g: torch.Tensor, path: str) -> float:
    """Seconds for the norm and the clipped sum of one parameter by ``path``."""
    layer_math, module = layer.math, layer.module
    factors = torch.ones(len(x), dtype=g.dtype, device=g.device)
    start = time.perf_counter()
    if path == "ghost":
        layer_math.ghost_sq_norm(module, x, g)
        _ghost_sum(layer, local, x, g)(factors)
    elif path.startswith(NORM_ONLY):
        layer_math.per_sample_sq_norm(module, x, g, local, path.removeprefix(NORM_ONLY))
        _ghost_sum(layer, local, x, g)(factors)
    else:
        per = layer_math.per_sample(module, x, g, local, path)
        squared_norms(per)
        torch.tensordot(factors, per, dims=1)
    return time.perf_counter() - start


class MixedGhostEngine(FastEngine):
    """The seed's two-pass mixed ghost clipping."""

    mode = "mixed_ghost"
    two_pass = True


class GhostEngine(FastEngine):
    """Two passes, ghost norms wherever they exist (Linear, Conv, Embedding weights)."""

    mode = "ghost"
    two_pass = True
    rule = staticmethod(lambda dims: True)
