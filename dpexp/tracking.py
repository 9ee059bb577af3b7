"""Experiment trackers (CSV, TensorBoard, W&B): what each run logs and how a W&B run ends."""

from __future__ import annotations

import math
import netrc
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

# Logged as metrics at the end of every run (beside ``epsilon``, which the privacy callback
# logs each epoch): what a dashboard needs to compare runs on the privacy–sparsity plane.
RESULT_METRICS = (
    "epsilon",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "trainable_fraction",
    "test_acc",
    "test_loss",
)
MAX_TAG = 64  # W&B rejects longer tags


def wandb_logged_in() -> bool:
    """True when W&B has an API key: ``WANDB_API_KEY`` or an ``api.wandb.ai`` netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """Offline unless ``WANDB_MODE=online`` or the user has logged in (``wandb login``)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return mode != "online"
    return not wandb_logged_in()


PRIVATE_STATS_TAG = "logs-private-statistics"


def wandb_tags(overrides: Sequence[str], private_stats: bool = False) -> list[str]:
    """The job's command-line overrides as W&B tags (truncated to W&B's limit), and a mark
    on runs whose logs hold statistics of private batches (``logger.private_stats``)."""
    tags = [str(o)[:MAX_TAG] for o in overrides]
    return [*tags, PRIVATE_STATS_TAG] if private_stats else tags


def register_resolvers() -> None:
    """Resolvers used by conf/logger/wandb.yaml (idempotent)."""
    for name, fn in (("dpexp.wandb_offline", wandb_offline), ("dpexp.wandb_tags", wandb_tags)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def logger_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configured loggers by name (``logger.<name>``; ``logger.private_stats`` is a
    setting, not a logger)."""
    return {
        str(name): node
        for name, node in (cfg.get("logger") or {}).items()
        if isinstance(node, DictConfig) and "_target_" in node
    }


def log_config(loggers: Sequence[Logger], cfg: DictConfig) -> None:
    """Log the resolved config as hyperparameters (W&B config, hparams.yaml, TensorBoard)."""
    if not loggers:
        return
    params = OmegaConf.to_container(cfg, resolve=True)
    params.pop("paths", None)
    for logger in loggers:
        logger.log_hyperparams(params)


def log_result(loggers: Sequence[Logger], result: dict[str, Any], step: int) -> None:
    """Log the run's privacy and sparsity facts and test scores as metrics."""
    metrics = {
        f"result/{key}": float(result[key])
        for key in RESULT_METRICS
        if isinstance(result.get(key), int | float) and math.isfinite(result[key])
    }
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def finish_wandb() -> None:
    """End the current W&B run, so the next job of a multirun (same process) opens its own."""
    wandb = sys.modules.get("wandb")  # never import wandb for runs that did not use it
    if wandb is not None and wandb.run is not None:
        wandb.finish()
