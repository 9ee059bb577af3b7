"""Where each trainable parameter is really used: a traced forward pass.

The fast engines assume that a layer's parameters act only inside that layer's own forward,
on inputs whose first dimension is the sample. Models break this in several ways, all
silent if unchecked:

- a parameter read outside its module's forward: timm's BEiT and EVA attention compute
  ``F.linear(x, self.qkv.weight, qkv_bias)``, so ``qkv.forward`` never runs;
- one tensor registered in two modules (tied weights, e.g. a language model's head);
- a layer applied to tensors whose first dimension is not the sample: SwinV2 runs its
  attention on windows (B·windows rows) and its position-bias MLP on a table shared by
  every sample.

:func:`trace_uses` runs the model on small batches of two sizes with a
``TorchFunctionMode`` that sees every torch call. For each trainable parameter it records
the stack of modules whose forward was running when an op consumed it into a result with a
gradient, and for each module whether every call took and returned batch-first tensors.
The tape (``dpexp.clipping.tape``) then hands each parameter to the innermost batched
module that encloses all of its uses, so that its per-sample gradient is computed exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# Two batch sizes: a leading dimension that follows both is the sample dimension; one that
# matches a single size by coincidence (a table of 3 rows) does not.
TRACE_BATCHES = (2, 3)


@dataclass
class UseTrace:
    """Uses of each trainable parameter and the batch layout of each module's calls."""

    # full parameter name → one stack of running module names (outermost first) per use
    uses: dict[str, list[tuple[str, ...]]] = field(default_factory=lambda: defaultdict(list))
    # module name → every call took a batch-first tensor and returned one batch-first tensor
    batched: dict[str, bool] = field(default_factory=dict)

    def home(self, param: str) -> str | None:
        """The innermost batched module that encloses every use of ``param`` and owns it
        (``param`` lies below it); None if the parameter was not used."""
        stacks = self.uses.get(param)
        if not stacks:
            return None
        common = set(stacks[0]).intersection(*stacks[1:])
        for name in reversed(stacks[0]):
            if name in common and self.batched.get(name) and _below(param, name):
                return name
        return ""  # the model itself (its own call is checked by the caller)

    def used_only_in(self, param: str, module: str, directly: bool) -> bool:
        """Every use of ``param`` happened while ``module`` ran (``directly``: in its own
        forward, not in a child's)."""
        stacks = self.uses.get(param, [])
        if directly:
            return all(stack and stack[-1] == module for stack in stacks)
        return all(module in stack for stack in stacks)


def _below(param: str, module: str) -> bool:
    return module == "" or param.startswith(module + ".")


def _leading(value) -> int | None:
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() > 0 else None


class _Tracer(TorchFunctionMode):
    def __init__(self, params: dict[int, str], stack: list[str], trace: UseTrace) -> None:
        super().__init__()
        self.params, self.stack, self.trace = params, stack, trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        used = [
            self.params[id(t)]
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and id(t) in self.params
        ]
        if used and any(
            isinstance(t, torch.Tensor) and t.grad_fn is not None for t in tree_flatten(out)[0]
        ):
            for name in used:
                self.trace.uses[name].append(tuple(self.stack))
        return out


def trace_uses(model: nn.Module, inputs: torch.Tensor) -> UseTrace:
    """Trace ``model`` on the first examples of ``inputs`` (repeated if fewer), at each of
    :data:`TRACE_BATCHES`; the random number generators are left as they were."""
    names = {id(m): n for n, m in model.named_modules()}
    params = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    trace = UseTrace()
    stack: list[str] = []
    batch = [0]

    def enter(module, args, kwargs):
        name = names.get(id(module))
        if name is not None:
            first = next((a for a in tree_flatten((args, kwargs))[0] if _leading(a)), None)
            if _leading(first) != batch[0]:
                trace.batched[name] = False
            stack.append(name)

    def leave(module, args, kwargs, output):
        name = names.get(id(module))
        if name is not None:
            if stack and stack[-1] == name:
                stack.pop()
            if _leading(output) != batch[0]:
                trace.batched[name] = False
            trace.batched.setdefault(name, True)

    devices = [inputs.device] if inputs.device.type == "cuda" else []
    hooks = [
        nn.modules.module.register_module_forward_pre_hook(
            lambda m, a: enter(m, a, {}),
        ),
        nn.modules.module.register_module_forward_hook(
            lambda m, a, out: leave(m, a, {}, out), always_call=True
        ),
    ]
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for size in TRACE_BATCHES:
                index = torch.arange(size, device=inputs.device) % max(len(inputs), 1)
                batch[0] = size
                stack.clear()
                with _Tracer(params, stack, trace):
                    model(inputs[index].detach())
    finally:
        for hook in hooks:
            hook.remove()
    return trace


def outside_own_module(model: nn.Module, trace: UseTrace) -> list[str]:
    """Why engines that hook each module (Opacus' grad samplers) cannot see a parameter
    whole: tied to another module, read outside its module's own forward, or its module
    called on rows that are not samples. One phrase per parameter; empty if none."""
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    first: dict[int, str] = {}
    for full, p in named:
        first.setdefault(id(p), full)
    problems = [f"{full} is tied to {first[id(p)]}" for full, p in named if first[id(p)] != full]
    tied = {id(p) for full, p in named if first[id(p)] != full}
    for full, p in named:
        module = full.rpartition(".")[0]
        if id(p) in tied:
            continue
        if not trace.batched.get(module, True):
            problems.append(f"{full}: module {module!r} runs on rows that are not samples")
        elif not trace.used_only_in(full, module, directly=True):
            problems.append(f"{full} is used outside the forward of module {module!r}")
    return problems
