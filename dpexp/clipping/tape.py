"""Recording what a forward pass needs for per-sample gradients, with no backward hooks.

Every trainable parameter of the model is covered by exactly one of

- a **fast layer** (Linear, Conv1d/2d, GroupNorm, LayerNorm, Embedding, and subclasses that
  compute the same function): its input and the gradient edge of its output are recorded;
- a **broadcast parameter**: a raw ``nn.Parameter`` with a leading dimension of 1 (a ViT's
  ``cls_token``/``pos_embed``) is replaced, during its owner's forward, by a view expanded to
  the batch, so that row i of that view's gradient is sample i's gradient (checked by a probe);
- a **generic module**: its direct parameters get exact per-sample gradients from ``torch.func``
  (vjp of the module at each sample's recorded input, vmapped).

Gradient *edges* of the outputs are taken when the output is produced, so an in-place op that
later changes the output (``out += identity``, ``ReLU(inplace=True)``) does not change which
gradient is read.

That static plan assumes each parameter acts only inside its own module's forward, on
batch-first tensors. :meth:`Tape.adapt` checks it against a traced forward
(``dpexp.clipping.trace``) and hands every parameter it does not hold for (one read outside its
module, tied to another module, or in a layer applied to rows that are not samples) to the
generic path of the innermost batched module enclosing all its uses: exact, and slower only
there. Recording refuses to start before the plan was adapted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from dpexp.clipping.layers import EXACT_TYPES, LayerMath, math_for
from dpexp.clipping.trace import UseTrace
from dpexp.errors import UserError

log = logging.getLogger(__name__)


class UnsupportedModelError(UserError):
    """A trainable parameter that no clipping path can handle exactly; names module and type."""


def describe(name: str, module: nn.Module) -> str:
    return f"model module {name or '<root>'!r} ({type(module).__name__})"


@dataclass
class Call:
    """One forward call of a recorded module."""

    args: tuple
    kwargs: dict
    edge: GradientEdge
    versions: tuple[int, ...]
    # no tensor argument has autograd history: nothing recorded lies below this call
    lowest: bool = False
    done: bool = False

    @property
    def x(self) -> torch.Tensor:
        return self.args[0]

    def release(self) -> None:
        """Drop the recorded inputs (their memory is autograd's again); mark processed."""
        self.args, self.kwargs, self.done = (), {}, True

    def check_unchanged(self, where: str) -> None:
        now = tuple(a._version for a in self.args if isinstance(a, torch.Tensor))
        if now != self.versions:
            raise UnsupportedModelError(
                f"{where}: its input was modified in place after the forward; "
                "make that op out-of-place"
            )


@dataclass
class Layer:
    """A module whose direct trainable parameters one path covers."""

    name: str
    module: nn.Module
    params: dict[str, str]  # local name → full parameter name
    math: LayerMath | None  # None: generic (torch.func)
    calls: list[Call] = field(default_factory=list)
    checked_shapes: set = field(default_factory=set)

    @property
    def where(self) -> str:
        return describe(self.name, self.module)


@dataclass
class Broadcast:
    """Raw parameters of ``owner`` expanded to the batch during its forward."""

    name: str
    owner: nn.Module
    params: dict[str, str]
    edges: dict[str, list[GradientEdge]] = field(default_factory=dict)
    saved: dict[str, nn.Parameter] = field(default_factory=dict)


def _trainable_direct(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


class Tape:
    """Hooks on the model that record inputs and output edges during ``recording``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[Layer] = []
        self.broadcasts: list[Broadcast] = []
        self.batch_size = 0
        self.recording = False
        self._handles: list = []
        self.tied: set[str] = set()  # full names of parameters registered in several modules
        self.adapted = False
        self._plan()

    # -- which path covers each parameter --------------------------------------------
    def _plan(self) -> None:
        full_names = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        owners: set[int] = set()
        for mod_name, module in self.model.named_modules():
            direct = _trainable_direct(module)
            for local, p in list(direct.items()):
                if id(p) in owners:  # tied: the first owner holds it until adapt() moves it
                    self.tied.add(full_names[id(p)])
                    del direct[local]
                owners.add(id(p))
            if not direct:
                continue
            names = {local: full_names[id(p)] for local, p in direct.items()}
            layer_math = math_for(module)
            if layer_math is not None and set(names) <= set(layer_math.params):
                why = layer_math.unsupported(module)
                if why:
                    raise UnsupportedModelError(f"{describe(mod_name, module)}: {why}")
                self.layers.append(Layer(mod_name, module, names, layer_math))
                continue
            spread = {
                n: f for n, f in names.items() if layer_math is None and _broadcastable(direct[n])
            }
            if spread:
                self.broadcasts.append(Broadcast(mod_name, module, spread))
            rest = {n: f for n, f in names.items() if n not in spread}
            if rest:
                self.layers.append(Layer(mod_name, module, rest, None))

    def demote(self, broadcast: Broadcast) -> None:
        """Hand a broadcast owner's parameters to the generic path (exact, slower)."""
        self.broadcasts.remove(broadcast)
        owner = [l for l in self.layers if l.module is broadcast.owner and l.math is None]
        if owner:
            owner[0].params.update(broadcast.params)
        else:
            self.layers.append(Layer(broadcast.name, broadcast.owner, dict(broadcast.params), None))
        if self._handles:  # re-register: the owner's expansion hooks must go
            self.detach()
            self.attach()

    def adapt(self, trace: UseTrace) -> dict[str, str]:
        """Hand each parameter whose path does not see all of its uses to the generic path
        of the innermost batched module enclosing them (``trace``); returns the moves,
        parameter → new module name ("" for the model itself)."""
        if not trace.batched.get(""):
            raise UnsupportedModelError(
                "the model must map a batch of inputs to a batch of outputs (one tensor with "
                "the samples as first dimension)"
            )
        modules = dict(self.model.named_modules())
        moved: dict[str, str] = {}
        for holder in [*self.layers, *self.broadcasts]:
            fast = isinstance(holder, Layer) and holder.math is not None
            for local, full in list(holder.params.items()):
                whole = (
                    full not in self.tied
                    and trace.batched.get(holder.name, True)
                    and trace.used_only_in(full, holder.name, directly=fast)
                )
                home = None if whole else trace.home(full)
                if home is None:  # covered where it is, or never used (no gradient)
                    continue
                del holder.params[local]
                self._generic_layer(home, modules[home]).params[_relative(full, home)] = full
                moved[full] = home
        for full in self.tied - set(moved):  # registered twice but used by neither module
            home = trace.home(full)
            if home is not None:
                self._generic_layer(home, modules[home]).params[_relative(full, home)] = full
                moved[full] = home
        self.layers = [layer for layer in self.layers if layer.params]
        self.broadcasts = [b for b in self.broadcasts if b.params]
        self.adapted = True
        if self._handles:  # the hooks follow the new plan
            self.detach()
            self.attach()
        return moved

    def _generic_layer(self, name: str, module: nn.Module) -> Layer:
        for layer in self.layers:
            if layer.module is module and layer.math is None:
                return layer
        layer = Layer(name, module, {}, None)
        self.layers.append(layer)
        return layer

    @property
    def param_names(self) -> list[str]:
        names = [f for layer in self.layers for f in layer.params.values()]
        return names + [f for b in self.broadcasts for f in b.params.values()]

    # -- hooks -------------------------------------------------------------------------
    def attach(self) -> None:
        for layer in self.layers:
            self._handles.append(
                layer.module.register_forward_hook(self._recorder(layer), with_kwargs=True)
            )
        for b in self.broadcasts:
            self._handles.append(b.owner.register_forward_pre_hook(self._expander(b)))
            self._handles.append(b.owner.register_forward_hook(self._restorer(b), always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start(self, batch_size: int) -> None:
        """Forget the previous batch and record the next forward."""
        if not self.adapted:
            raise RuntimeError("Tape.adapt(trace) must check the plan before recording")
        self.batch_size = batch_size
        for layer in self.layers:
            layer.calls = []
        for b in self.broadcasts:
            b.edges = {n: [] for n in b.params}
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def _recorder(self, layer: Layer):
        def hook(module, args, kwargs, output):
            if not self.recording:
                return
            if not isinstance(output, torch.Tensor) or output.grad_fn is None:
                raise UnsupportedModelError(
                    f"{layer.where}: output must be one tensor that requires grad, "
                    f"got {type(output).__name__}"
                )
            rows = (output.shape[0] if output.dim() else None, _rows(args))
            if rows[0] != self.batch_size or (layer.math is not None and rows[1] != rows[0]):
                raise UnsupportedModelError(
                    f"{layer.where}: called on {rows[1]} rows, returned {rows[0]}, in a batch "
                    f"of {self.batch_size} samples; its per-sample gradients are undefined"
                )
            lowest = not any(
                isinstance(a, torch.Tensor) and a.grad_fn is not None
                for a in (*args, *kwargs.values())
            )
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            if layer.math is not None:
                self._check_semantics(layer, args[0], output)
            versions = tuple(a._version for a in args if isinstance(a, torch.Tensor))
            edge = get_gradient_edge(output)
            layer.calls.append(Call(args, kwargs, edge, versions, lowest))

        return hook

    def _check_semantics(self, layer: Layer, x: torch.Tensor, output: torch.Tensor) -> None:
        """A subclass (e.g. timm's LayerNorm) must compute its base type's function: checked
        once per input shape against the defining functional form; else the generic path."""
        if type(layer.module) in EXACT_TYPES or tuple(x.shape[1:]) in layer.checked_shapes:
            return
        with torch.no_grad():
            try:
                expected = layer.math.reference(layer.module, x)
                same = expected.shape == output.shape and torch.allclose(
                    expected, output, rtol=1e-5, atol=1e-6
                )
            except RuntimeError:
                same = False
        if not same:
            log.info("%s differs from its base type: generic per-sample gradients", layer.where)
            layer.math = None
        layer.checked_shapes.add(tuple(x.shape[1:]))

    def _expander(self, b: Broadcast):
        def hook(module, args):
            if not self.recording:
                return
            for local in b.params:
                p = module._parameters[local]
                view = p.expand(self.batch_size, *p.shape[1:])
                module._parameters[local] = view  # plain dict entry: restored after forward
                b.edges[local].append(get_gradient_edge(view))
                b.saved[local] = p

        return hook

    def _restorer(self, b: Broadcast):
        def hook(module, args, output):
            for local, p in b.saved.items():
                module._parameters[local] = p
            b.saved = {}

        return hook


def _rows(args: tuple) -> int | None:
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first.shape[0] if first is not None and first.dim() else None


def _relative(full: str, module: str) -> str:
    return full[len(module) + 1 :] if module else full


def _broadcastable(p: nn.Parameter) -> bool:
    return p.dim() >= 2 and p.shape[0] == 1


def generic_per_sample(
    layer: Layer, call: Call, g: torch.Tensor, tape: Tape
) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of ``layer``'s direct parameters by torch.func: the vjp of
    the module at each sample's own input with that sample's output gradient."""
    batch = len(g)
    params = {n: layer.module.get_parameter(n).detach() for n in layer.params}

    def batched(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) == batch

    flags = (tree_map(batched, call.args), tree_map(batched, call.kwargs))
    in_dims = (*tree_map(lambda f: 0 if f else None, flags), 0)

    def one_sample(args, kwargs, g_i):
        def f(prm):
            args_1 = tree_map(_as_batch_of_one, args, flags[0])
            kwargs_1 = tree_map(_as_batch_of_one, kwargs, flags[1])
            return functional_call(layer.module, prm, args_1, kwargs_1)

        _, pullback = vjp(f, params)
        return pullback(g_i.unsqueeze(0))[0]

    was = tape.recording
    tape.recording = False  # children's hooks must not record this replay
    try:
        return vmap(one_sample, in_dims=in_dims)(call.args, call.kwargs, g)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{layer.where}: no fast path and torch.func per-sample gradients failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        tape.recording = was


def _as_batch_of_one(value, batched: bool):
    return value.unsqueeze(0) if batched else value
