"""Making arbitrary models safe for per-sample gradients, or refusing them by name."""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn

from dpexp.errors import UserError


class IncompatibleModelError(UserError):
    """The model cannot be trained with per-sample clipping; the message names the module."""


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """BatchNorm → GroupNorm (Opacus' fixer), in-place activations → out-of-place.

    Batch statistics mix samples, so a model that keeps any after fixing is refused with the
    offending module's name and type.
    """
    model = ModuleValidator.fix(model)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise IncompatibleModelError(
                f"model module {name!r} ({type(module).__name__}) mixes samples in a batch "
                "and cannot be made DP-compatible"
            )
    return model
