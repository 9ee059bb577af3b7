"""The classifier head: the module that maps a model's features to class scores.

timm models name theirs with ``get_classifier()``; dpexp's own models implement the same method
(their last ``Linear``; ``fc`` for ``resnet_gn``). Fine-tuning gives a model a new head when the
class count changes (``model.head=reset``) and linear probing trains the head alone
(``model.trainable=head``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Head:
    """The classifier module and its name inside the model (``classifier.3``, ``head``, ``fc``)."""

    name: str
    module: nn.Module

    def qualified(self, local: str) -> str:
        """A name inside the head (``weight``) as a name in the model (``classifier.3.weight``)."""
        return f"{self.name}.{local}" if self.name else local

    @property
    def parameter_names(self) -> list[str]:
        return [self.qualified(n) for n, _ in self.module.named_parameters()]

    @property
    def state_keys(self) -> list[str]:
        return [self.qualified(k) for k in self.module.state_dict()]

    @property
    def classes(self) -> int | None:
        """Number of class scores: rows of the head's weight."""
        weight = getattr(self.module, "weight", None)
        return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def find_head(model: nn.Module) -> Head | None:
    """The model's classifier as named by ``get_classifier()``; None if it names none (no such
    method, or a head without parameters, e.g. timm's ``num_classes=0``)."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return None
    module = get()
    if not isinstance(module, nn.Module) or not any(True for _ in module.parameters()):
        return None
    name = next((n for n, m in model.named_modules() if m is module), None)
    return None if name is None else Head(name, module)
