"""``model.trainable``: train only the parameters whose names match a list of patterns.

Patterns are matched against parameter names (``model.named_parameters()``) with ``fnmatch``
rules (``*`` also crosses dots), plus two keywords:

- ``head``: the classifier (``get_classifier()``, dpexp/models/head.py), whatever its name in
  the model; ``head.<pattern>`` matches names inside it (``head.*`` is all of it, ``head.bias``
  its bias), so linear probing reads the same for every model;
- ``norm``: the parameters of normalization layers (BatchNorm, InstanceNorm, GroupNorm,
  LayerNorm, RMSNorm and their subclasses, and any module whose class name ends in ``Norm``,
  ``Norm2d``..., such as timm's ``RmsNorm`` or ``LayerNorm2d``).

The other parameters get ``requires_grad=False`` when the model is built, before any method
chooses masks and before the clipping engine attaches, so no engine computes their per-sample
gradients, the noise skips them and the optimizer never sees them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from dpexp.errors import ConfigError
from dpexp.models.head import find_head

log = logging.getLogger(__name__)

HEAD = "head"
NORM = "norm"
NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)
_NORM_NAME = re.compile(r"Norm(\d+d)?$")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Direct parameters of every normalization layer of ``model``."""
    return [
        f"{prefix}.{n}" if prefix else n
        for prefix, module in model.named_modules()
        if is_norm(module)
        for n, _ in module.named_parameters(recurse=False)
    ]


def parse_patterns(patterns: Any) -> list[str] | None:
    """``null`` (everything trains), one pattern, or a non-empty list of non-empty patterns."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    ok = isinstance(patterns, Sequence) and all(isinstance(p, str) and p for p in patterns)
    if not ok or not patterns:
        shown = list(patterns) if isinstance(patterns, Sequence) else patterns
        raise ConfigError(
            f"model.trainable={shown!r} is invalid: a list of parameter-name patterns, e.g. "
            "[head] or ['*.bias', head] (null trains every parameter)"
        )
    return list(patterns)


def match(model: nn.Module, pattern: str) -> list[str]:
    """Parameter names of ``model`` matched by one pattern or keyword."""
    if pattern == NORM:
        return norm_parameter_names(model)
    if pattern == HEAD or pattern.startswith(HEAD + "."):
        head = find_head(model)
        if head is None:
            return []
        inner = pattern.removeprefix(HEAD).removeprefix(".") or "*"
        return [
            head.qualified(n) for n, _ in head.module.named_parameters() if fnmatchcase(n, inner)
        ]
    return [n for n, _ in model.named_parameters() if fnmatchcase(n, pattern)]


def _no_match(model: nn.Module, pattern: str, model_name: str) -> ConfigError:
    names = [n for n, _ in model.named_parameters()]
    shown = ", ".join(names[:3]) + (f", …, {names[-1]}" if len(names) > 3 else "")
    head = find_head(model)
    if pattern == HEAD or pattern.startswith(HEAD + "."):
        why = (
            f"{model_name} has no classifier head (get_classifier())"
            if head is None
            else f"it matches no parameter of {model_name}'s head {head.name} "
            f"({', '.join(n for n, _ in head.module.named_parameters())})"
        )
    elif pattern == NORM:
        why = f"{model_name} has no normalization layer with parameters"
    else:
        why = f"it matches no parameter of {model_name}"
    keywords = f"head = {head.name}" if head is not None else "head"
    return ConfigError(
        f"model.trainable={pattern!r} is invalid: {why}; parameters are {shown} "
        f"({len(names)} tensors), keywords {keywords}, norm = normalization layers"
    )


def apply_trainable(model: nn.Module, patterns: Any, model_name: str = "the model") -> list[str]:
    """Freeze every parameter no pattern matches; return the names that train.

    A pattern that matches nothing is refused (one line naming it and the model's names)."""
    parsed = parse_patterns(patterns)
    if parsed is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    chosen: set[str] = set()
    for pattern in parsed:
        matched = match(model, pattern)
        if not matched:
            raise _no_match(model, pattern, model_name)
        chosen.update(matched)
    params = list(model.named_parameters())
    for name, p in params:
        p.requires_grad_(name in chosen)
    trained = sum(p.numel() for n, p in params if n in chosen)
    total = sum(p.numel() for _, p in params)
    log.info(
        "model.trainable=%s: %d of %d parameters train (%d of %d tensors); the rest are frozen",
        parsed,
        trained,
        total,
        len(chosen),
        len(params),
    )
    return [n for n, _ in params if n in chosen]
