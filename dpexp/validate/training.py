"""The objects Lightning trains with: optimizer, scheduler, trainer, loggers and callbacks.
Each is built as ``train.build`` would build it (on stand-ins: a dummy parameter, no logger,
no callbacks) so that torch and Lightning check their own settings before anything is written.
A logger is built only where that writes nothing; any other is checked against its
signature."""

from __future__ import annotations

import inspect

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from dpexp.tracking import logger_configs
from dpexp.validate.fields import fail, get
from dpexp.validate.refusals import built

# Lightning's loggers whose constructor writes nothing (files, the W&B run) until the first
# log call (read in Lightning 2.6): built in full, so their own checks run.
_LAZY_LOGGERS = (
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.WandbLogger",
)


def validate_optimizer(cfg: DictConfig) -> torch.optim.Optimizer:
    """``optimizer`` built on a dummy parameter (the module passes the real ones)."""
    factory = built("optimizer", cfg.optimizer, lambda: instantiate(cfg.optimizer))
    dummy = torch.nn.Parameter(torch.zeros(1))
    return built("optimizer", cfg.optimizer, lambda: factory(params=[dummy]))


def validate_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> None:
    """``scheduler`` built on the dummy optimizer and stepped a few times (a bad horizon such
    as T_max=0 fails only at a step); ``T_max: null`` stands for the planned step count."""
    if not cfg.get("scheduler"):
        return
    factory = built("scheduler", cfg.scheduler, lambda: instantiate(cfg.scheduler))
    keywords = getattr(factory, "keywords", {})
    planned = {"T_max": 3} if "T_max" in keywords and keywords["T_max"] is None else {}

    def step_a_few_times():
        scheduler = factory(optimizer, **planned)
        for _ in range(3):
            optimizer.step()
            scheduler.step()

    built("scheduler", cfg.scheduler, step_a_few_times)


def validate_trainer(cfg: DictConfig) -> None:
    epochs, steps = get(cfg, "trainer.max_epochs"), get(cfg, "trainer.max_steps")
    if not ((isinstance(epochs, int) and epochs > 0) or (isinstance(steps, int) and steps > 0)):
        fail("trainer.max_epochs", epochs, "a positive integer (or set trainer.max_steps > 0)")
    built("trainer", cfg.trainer, lambda: instantiate(cfg.trainer, logger=False, callbacks=[]))


def validate_callbacks(cfg: DictConfig) -> None:
    """Every entry of ``callbacks`` (``callbacks.<name>=null`` turns one off); their
    constructors write nothing (checkpoint dirs are made at the first save)."""
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None:
            built(f"callbacks.{name}", node, lambda node=node: instantiate(node))


def validate_loggers(cfg: DictConfig) -> None:
    """Every entry of ``logger``: its target must import and its settings bind to its
    signature; only loggers known to write nothing until used are built."""
    for name, node in logger_configs(cfg).items():
        where = f"logger.{name}"
        if node._target_ in _LAZY_LOGGERS:
            built(where, node, lambda node=node: instantiate(node))
            continue
        unbuilt = built(where, node, lambda node=node: instantiate(node, _partial_=True))
        built(
            where,
            node,
            lambda p=unbuilt: inspect.signature(p.func).bind(*p.args, **p.keywords),
        )
