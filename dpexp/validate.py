"""Checks of the composed config, run before any data is loaded or anything is written.

Each failure raises :class:`ConfigError` with one line: the key, the bad value and what is
allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dpexp.accounting import ACCOUNTANTS
from dpexp.clipping import MODES, ExactnessError, UnsupportedModelError, check_supported
from dpexp.data import DATASETS, TORCHVISION, DataModule, datamodule_kwargs
from dpexp.errors import ConfigError, UserError
from dpexp.methods import build_methods
from dpexp.models import BUILDERS
from dpexp.privacy.settings import check_resume, privacy_settings


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _number(cfg: DictConfig, key: str) -> float | None:
    value = _get(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        _fail(key, value, "expected a number")
    return float(value)


def _positive_int(cfg: DictConfig, key: str, optional: bool = True) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, value, "expected a positive integer")


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        _fail(key, value, f"choose one of {', '.join(allowed)}")


def validate_dataset(cfg: DictConfig) -> DataModule:
    _choice(cfg, "dataset.name", DATASETS)
    for key in ("dataset.batch_size",):
        _positive_int(cfg, key, optional=False)
    for key in ("dataset.physical_batch_size", "dataset.train_size", "dataset.test_size"):
        _positive_int(cfg, key)
    name = cfg.dataset.name
    if name in TORCHVISION:
        _, _, _, _, shape, classes = TORCHVISION[name]
        if list(_get(cfg, "dataset.image_shape") or shape) != list(shape):
            _fail("dataset.image_shape", _get(cfg, "dataset.image_shape"), f"{name} is {shape}")
        if (_get(cfg, "dataset.num_classes") or classes) != classes:
            _fail("dataset.num_classes", _get(cfg, "dataset.num_classes"), f"{name} has {classes}")
    else:
        _positive_int(cfg, "dataset.size", optional=False)
        _positive_int(cfg, "dataset.num_classes", optional=False)
    dm = DataModule(**datamodule_kwargs(cfg))  # checks public.source and public.size
    if cfg.dataset.batch_size > dm.num_private:
        _fail(
            "dataset.batch_size",
            cfg.dataset.batch_size,
            f"at most the private training set size {dm.num_private}",
        )
    return dm


def validate_pretrain(cfg: DictConfig, dm: DataModule) -> None:
    """``pretrain.*``: epochs >= 0, a positive batch size and lr (or null), public data."""
    epochs = _get(cfg, "pretrain.epochs")
    if epochs is None:
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        _fail("pretrain.epochs", epochs, "an integer >= 0")
    _positive_int(cfg, "pretrain.batch_size", optional=False)
    lr = _number(cfg, "pretrain.lr")
    if lr is not None and not 0 < lr < math.inf:
        _fail("pretrain.lr", lr, "a finite number > 0, or null for the optimizer's lr")
    if epochs and dm.public_size == 0:
        _fail(
            "pretrain.epochs",
            epochs,
            "needs public data but public.source='none': set public.source (heldout, digits "
            "or a dataset) and public.size; training on private data here would not be private",
        )


def validate_privacy(cfg: DictConfig, num_private: int) -> None:
    if not _get(cfg, "privacy.enabled"):
        return
    eps = _number(cfg, "privacy.epsilon")
    sigma = _number(cfg, "privacy.noise_multiplier")
    if eps is None and sigma is None:
        _fail("privacy.epsilon", None, "set epsilon (> 0) or privacy.noise_multiplier")
    if eps is not None and not 0 < eps < math.inf:
        _fail("privacy.epsilon", eps, "a finite number > 0")
    if sigma is not None and sigma < 0:
        _fail("privacy.noise_multiplier", sigma, "a number >= 0, or null to calibrate from epsilon")
    if sigma == 0 and not _get(cfg, "audit.allow_no_noise"):
        _fail("privacy.noise_multiplier", sigma, "> 0 (0 only for audits, audit.allow_no_noise)")
    delta = _number(cfg, "privacy.delta")
    if delta is None or not 0 < delta < 1:
        _fail("privacy.delta", delta, "a number in (0, 1)")
    if delta >= 1 / num_private and not _get(cfg, "privacy.allow_large_delta"):
        _fail(
            "privacy.delta",
            delta,
            f"must be < 1/N = {1 / num_private:.3g} (N={num_private}); "
            "set privacy.allow_large_delta=true to override",
        )
    clip = _number(cfg, "privacy.max_grad_norm")
    if clip is None or not 0 < clip < math.inf:
        _fail("privacy.max_grad_norm", clip, "a finite number > 0")
    _choice(cfg, "privacy.accountant", ACCOUNTANTS)
    _choice(cfg, "clipping.mode", MODES)
    if _get(cfg, "trainer.gradient_clip_val") is not None:
        _fail(
            "trainer.gradient_clip_val",
            _get(cfg, "trainer.gradient_clip_val"),
            "must be null under DP: Lightning's clipping is not per-sample clipping "
            "(use privacy.max_grad_norm)",
        )


def validate_model(cfg: DictConfig) -> nn.Module:
    """The model must build as configured (e.g. its layers fit the dataset's image shape)."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.model)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):  # already one line naming the culprit
            raise cause from None
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
        _fail("model", cfg.model.name, f"cannot be built as configured: {reason}")


def validate_clipping(cfg: DictConfig, model: nn.Module, image_shape: tuple[int, ...]) -> None:
    """The chosen clipping mode must clip every trainable parameter of the model exactly:
    its engine runs on three random inputs and is compared with one backward per example
    (fails before training, naming the module or parameter)."""
    if not _get(cfg, "privacy.enabled"):
        return
    import torch

    example = torch.randn(3, *image_shape, generator=torch.Generator().manual_seed(0))
    try:
        check_supported(model, cfg.clipping.mode, example, int(_get(cfg, "dataset.num_classes")))
    except (UnsupportedModelError, ExactnessError) as exc:
        hint = "" if "clipping=" in str(exc) else " (try clipping=functorch or auto)"
        _fail("clipping.mode", cfg.clipping.mode, f"{exc}{hint}")


def validate_trainer(cfg: DictConfig) -> None:
    epochs, steps = _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_steps")
    if not ((isinstance(epochs, int) and epochs > 0) or (isinstance(steps, int) and steps > 0)):
        _fail("trainer.max_epochs", epochs, "a positive integer (or set trainer.max_steps > 0)")


def validate_averaging(cfg: DictConfig) -> None:
    """``callbacks.ema`` (parameter averaging): decay in (0, 1), warmup a boolean."""
    if _get(cfg, "callbacks.ema") is None:
        return
    decay = _get(cfg, "callbacks.ema.decay")
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
        _fail("callbacks.ema.decay", decay, "a number in (0, 1), e.g. 0.999")
    warmup = _get(cfg, "callbacks.ema.warmup")
    if warmup is not None and not isinstance(warmup, bool):
        _fail("callbacks.ema.warmup", warmup, "true or false")


def validate_checkpoint(cfg: DictConfig) -> None:
    path = _get(cfg, "ckpt_path")
    if path is not None:
        check_checkpoint(cfg, path)


def check_checkpoint(cfg: DictConfig, path: str | Path, key: str = "ckpt_path") -> None:
    """``path`` must be a readable Lightning checkpoint of the configured model
    (``key`` names the option that chose it: ckpt_path, or resume for last.ckpt)."""
    path = str(path)
    if not Path(path).is_file():
        _fail(key, path, "an existing Lightning checkpoint file")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # the error type depends on where the file was cut
        _fail(key, path, "a readable checkpoint (truncated or corrupt)")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        _fail(key, path, "a Lightning checkpoint (no state_dict in the file)")
    _check_checkpoint_model(cfg, path, ckpt["state_dict"], key)
    saved = (ckpt.get("callbacks") or {}).get("PrivacyCallback")
    check_resume(saved.get("settings") if saved else None, privacy_settings(cfg), f"{key}={path!r}")


def _check_checkpoint_model(cfg: DictConfig, path: str, saved: dict, key: str) -> None:
    """The checkpoint must hold this config's model: same parameter names and shapes.

    Methods may add parameters (e.g. carriers), so only the model's own ones are compared."""
    from hydra.utils import instantiate

    expected = {f"model.{k}": v.shape for k, v in instantiate(cfg.model).state_dict().items()}
    common = [name for name in expected if name in saved]  # in the model's layer order
    if not common:
        _fail(key, path, f"a checkpoint of model {cfg.model.name!r}: no parameter matches")
    for name in common:
        if tuple(saved[name].shape) != tuple(expected[name]):
            _fail(
                key,
                path,
                f"a checkpoint of model {cfg.model.name!r} as configured: {name} has shape "
                f"{list(saved[name].shape)} in the file, {list(expected[name])} in the model",
            )


def validate(cfg: DictConfig) -> DataModule:
    """Validate ``cfg``; return the (unloaded) data module it describes."""
    seed = _get(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        _fail("seed", seed, "an integer >= 0")
    _choice(cfg, "model.name", tuple(BUILDERS))
    dm = validate_dataset(cfg)
    validate_pretrain(cfg, dm)
    validate_privacy(cfg, dm.num_private)
    validate_clipping(cfg, validate_model(cfg), tuple(dm.image_shape))
    validate_trainer(cfg)
    validate_averaging(cfg)
    validate_checkpoint(cfg)
    build_methods(cfg)  # method constructors raise ConfigError on bad options
    dm.locate()  # a missing dataset fails here, with one line saying what to do
    return dm
