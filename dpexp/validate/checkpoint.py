"""``ckpt_path`` and ``resume``: the checkpoint must be a readable Lightning checkpoint of the
configured model, saved under the same privacy settings."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from dpexp.privacy.settings import check_resume, privacy_settings
from dpexp.validate.fields import fail, get


def validate_checkpoint(cfg: DictConfig) -> None:
    path = get(cfg, "ckpt_path")
    if path is not None:
        check_checkpoint(cfg, path)


def check_checkpoint(cfg: DictConfig, path: str | Path, key: str = "ckpt_path") -> None:
    """``path`` must be a readable Lightning checkpoint of the configured model
    (``key`` names the option that chose it: ckpt_path, or resume for last.ckpt)."""
    path = str(path)
    if not Path(path).is_file():
        fail(key, path, "an existing Lightning checkpoint file")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # the error type depends on where the file was cut
        fail(key, path, "a readable checkpoint (truncated or corrupt)")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        fail(key, path, "a Lightning checkpoint (no state_dict in the file)")
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
        fail(key, path, f"a checkpoint of model {cfg.model.name!r}: no parameter matches")
    for name in common:
        if tuple(saved[name].shape) != tuple(expected[name]):
            fail(
                key,
                path,
                f"a checkpoint of model {cfg.model.name!r} as configured: {name} has shape "
                f"{list(saved[name].shape)} in the file, {list(expected[name])} in the model",
            )
