"""Checks of single config values; each failure is one :class:`ConfigError` line:
the key, the bad value and what is allowed."""

from __future__ import annotations

import math
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from dpexp.errors import ConfigError


def get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def fail(key: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def number(cfg: DictConfig, key: str) -> float | None:
    value = get(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        fail(key, value, "expected a number")
    return float(value)


def positive_int(cfg: DictConfig, key: str, optional: bool = True) -> None:
    value = get(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(key, value, "expected a positive integer")


def choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = get(cfg, key)
    if value not in allowed:
        fail(key, value, f"choose one of {', '.join(allowed)}")
