"""Building a config group's object to let its library check it, and turning the library's
refusal into one :class:`ConfigError` line that names the key."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from dpexp.errors import ConfigError, UserError

T = TypeVar("T")
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# identifiers and numbers, as a library's message mentions a parameter or a value
_TOKEN = re.compile(r"[A-Za-z_]\w*|-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def built(where: str, node: DictConfig, make: Callable[[], T]) -> T:
    """``make()`` (which builds ``node``, the config at key ``where``), quietly; a refusal
    becomes a ConfigError naming the key the library's message points at."""
    try:
        with _quiet():
            return make()
    except Exception as exc:
        cause = exc
        if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
            cause = exc.__cause__
        if isinstance(cause, UserError):  # already one line naming the culprit
            raise cause from None
        target = OmegaConf.select(node, "_target_", default="the target")
        if isinstance(exc, InstantiationException) and "Error locating target" in str(exc):
            raise ConfigError(
                f"{where}._target_={target!r} is invalid: cannot be imported ({_lines(cause)[-1]})"
            ) from exc
        reason = _lines(cause)[0]
        leaves = _leaves(OmegaConf.to_container(node, resolve=True))
        key = _culprit(leaves, reason)
        if key is None:
            raise ConfigError(
                f"{where} is invalid: {target} refused its settings ({reason})"
            ) from exc
        raise ConfigError(
            f"{where}.{key}={leaves[key]!r} is invalid: {target} refused it ({reason})"
        ) from exc


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings or Lightning info lines (device summary, tips) from a trial build: the
    real one, after validation, says them."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _lines(exc: BaseException) -> list[str]:
    """The exception's message, line by line (its type if it has none)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]


def _leaves(node: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a config node's settings (Hydra's own keys left out)."""
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        if key in _HYDRA_KEYS:
            continue
        if isinstance(value, dict):
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _culprit(leaves: dict[str, Any], message: str) -> str | None:
    """The one setting the message names (its parameter name, else its value), or None."""
    tokens = _TOKEN.findall(message)
    named = [key for key in leaves if key.rsplit(".", 1)[-1] in tokens]
    if named:
        return named[0] if len(named) == 1 else None
    valued = [key for key, value in leaves.items() if _mentioned(value, tokens)]
    return valued[0] if len(valued) == 1 else None


def _mentioned(value: Any, tokens: list[str]) -> bool:
    """The value appears as Python prints it (1.5, -1, gpu; or one element of a list):
    a message's "index 0" does not point at a setting of 0.0."""
    if isinstance(value, list):
        return any(_mentioned(element, tokens) for element in value)
    if isinstance(value, bool) or value is None:
        return False
    return isinstance(value, int | float | str) and str(value) in tokens
