"""The privacy and clipping groups: ε, δ, σ, C, the accountant, and whether the clipping
mode clips the model exactly."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from dpexp.accounting import ACCOUNTANTS
from dpexp.clipping import MODES, ExactnessError, UnsupportedModelError, check_supported
from dpexp.validate.fields import choice, fail, get, number


def validate_privacy(cfg: DictConfig, num_private: int) -> None:
    if not get(cfg, "privacy.enabled"):
        return
    eps = number(cfg, "privacy.epsilon")
    sigma = number(cfg, "privacy.noise_multiplier")
    if eps is None and sigma is None:
        fail("privacy.epsilon", None, "set epsilon (> 0) or privacy.noise_multiplier")
    if eps is not None and not 0 < eps < math.inf:
        fail("privacy.epsilon", eps, "a finite number > 0")
    if sigma is not None and sigma < 0:
        fail("privacy.noise_multiplier", sigma, "a number >= 0, or null to calibrate from epsilon")
    if sigma == 0 and not get(cfg, "audit.allow_no_noise"):
        fail("privacy.noise_multiplier", sigma, "> 0 (0 only for audits, audit.allow_no_noise)")
    delta = number(cfg, "privacy.delta")
    if delta is None or not 0 < delta < 1:
        fail("privacy.delta", delta, "a number in (0, 1)")
    if delta >= 1 / num_private and not get(cfg, "privacy.allow_large_delta"):
        fail(
            "privacy.delta",
            delta,
            f"must be < 1/N = {1 / num_private:.3g} (N={num_private}); "
            "set privacy.allow_large_delta=true to override",
        )
    clip = number(cfg, "privacy.max_grad_norm")
    if clip is None or not 0 < clip < math.inf:
        fail("privacy.max_grad_norm", clip, "a finite number > 0")
    choice(cfg, "privacy.accountant", ACCOUNTANTS)
    choice(cfg, "clipping.mode", MODES)
    if get(cfg, "trainer.gradient_clip_val") is not None:
        fail(
            "trainer.gradient_clip_val",
            get(cfg, "trainer.gradient_clip_val"),
            "must be null under DP: Lightning's clipping is not per-sample clipping "
            "(use privacy.max_grad_norm)",
        )


def validate_clipping(cfg: DictConfig, model: nn.Module, image_shape: tuple[int, ...]) -> None:
    """The chosen clipping mode must clip every trainable parameter of the model exactly:
    its engine runs on three random inputs and is compared with one backward per example
    (fails before training, naming the module or parameter)."""
    if not get(cfg, "privacy.enabled"):
        return
    example = torch.randn(3, *image_shape, generator=torch.Generator().manual_seed(0))
    try:
        check_supported(model, cfg.clipping.mode, example, int(get(cfg, "dataset.num_classes")))
    except (UnsupportedModelError, ExactnessError) as exc:
        hint = "" if "clipping=" in str(exc) else " (try clipping=functorch or auto)"
        fail("clipping.mode", cfg.clipping.mode, f"{exc}{hint}")
