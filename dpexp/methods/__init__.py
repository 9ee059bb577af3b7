"""DP-SGD variants as Lightning callbacks acting at the hook points of the DP step."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from dpexp.methods.base import Method


def build_methods(cfg: DictConfig) -> list[Method]:
    """Instantiate ``cfg.method.callbacks``; constructors check their own options."""
    return [instantiate(node) for node in (cfg.method.get("callbacks") or {}).values()]


__all__ = ["Method", "build_methods"]
