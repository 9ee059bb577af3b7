"""The model group: the model must build as configured."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dpexp.errors import UserError
from dpexp.validate.fields import fail


def validate_model(cfg: DictConfig) -> nn.Module:
    """The model must build as configured (e.g. its layers fit the dataset's image shape)."""
    try:
        return instantiate(cfg.model)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):  # already one line naming the culprit
            raise cause from None
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
        fail("model", cfg.model.name, f"cannot be built as configured: {reason}")
