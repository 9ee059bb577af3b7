"""DP-SGD variants as Lightning callbacks acting at the hook points of the DP step."""

from dpexp.methods.base import Method

__all__ = ["Method"]
