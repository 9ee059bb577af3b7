"""DP-SGD variants as Lightning callbacks acting at the hook points of the DP step."""

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from dpexp.errors import UserError
from dpexp.methods.base import Method


def build_methods(cfg: DictConfig) -> list[Method]:
    """Instantiate ``cfg.method.callbacks``; constructors check their own options."""
    methods = []
    for node in (cfg.method.get("callbacks") or {}).values():
        try:
            methods.append(instantiate(node))
        except InstantiationException as exc:
            # Hydra wraps the constructor's one-line ConfigError; let the user see that line
            if isinstance(exc.__cause__, UserError):
                raise exc.__cause__ from None
            raise
    return methods


__all__ = ["Method", "build_methods"]
