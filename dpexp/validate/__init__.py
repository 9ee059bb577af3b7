"""Checks of the composed config, run before any data is loaded or anything is written.

Each failure raises :class:`ConfigError` with one line: the key, the bad value and what is
allowed. One module per concern: ``fields`` (single values), ``data``, ``model``, ``privacy``
(and clipping), ``training`` (optimizer, scheduler, trainer, loggers, callbacks, built on
stand-ins; ``refusals`` turns a library's refusal into the line), ``checkpoint``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dpexp.data import DataModule
from dpexp.methods import build_methods
from dpexp.models import BUILDERS
from dpexp.validate.checkpoint import check_checkpoint, validate_checkpoint
from dpexp.validate.data import validate_dataset, validate_pretrain
from dpexp.validate.fields import choice, fail, get
from dpexp.validate.model import validate_model
from dpexp.validate.privacy import validate_clipping, validate_privacy
from dpexp.validate.training import (
    validate_callbacks,
    validate_loggers,
    validate_optimizer,
    validate_scheduler,
    validate_trainer,
)


def validate(cfg: DictConfig) -> DataModule:
    """Validate ``cfg``; return the (unloaded) data module it describes."""
    seed = get(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        fail("seed", seed, "an integer >= 0")
    choice(cfg, "model.name", tuple(BUILDERS))
    dm = validate_dataset(cfg)
    validate_pretrain(cfg, dm)
    validate_privacy(cfg, dm.num_private)
    validate_clipping(cfg, validate_model(cfg), tuple(dm.image_shape))
    validate_scheduler(cfg, validate_optimizer(cfg))
    validate_trainer(cfg)
    validate_callbacks(cfg)
    validate_loggers(cfg)
    validate_checkpoint(cfg)
    build_methods(cfg)  # method constructors raise ConfigError on bad options
    dm.locate()  # a missing dataset fails here, with one line saying what to do
    return dm


__all__ = ["check_checkpoint", "validate"]
