"""DP-SGD: the step pipeline (``step``) and the Lightning callback that owns it (``callback``)."""

from dpexp.privacy.callback import PLAN_FILE, PrivacyCallback
from dpexp.privacy.step import GradientStep

__all__ = ["PLAN_FILE", "GradientStep", "PrivacyCallback"]
