"""The settings a run's privacy ledger depends on, stored in its checkpoints.

A resumed run continues the ledger it finds in the checkpoint: its ε is only right if every
step before and after the resume was the same mechanism. Each setting below changes what a
step releases or how it is counted, so a resume with any of them changed is refused, with
the key named. Settings that change neither (the ε cap with a fixed σ, the clipping engine,
loggers, the number of epochs with a fixed σ) may change; σ itself, which depends on the
step plan when it is calibrated, is compared by the privacy callback once it is known.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpexp.errors import UserError

# Compared in this order; the first difference is reported.
KEYS = (
    "privacy.enabled",
    "privacy.delta",
    "privacy.accountant",
    "privacy.max_grad_norm",
    "privacy.noise_multiplier",
    "privacy.secure_noise",
    "dataset.name",
    "private_examples",
    "sample_rate",
    "method",
)


def privacy_settings(cfg: DictConfig) -> dict[str, Any]:
    """The privacy-relevant settings of ``cfg``: privacy on/off, δ, accountant, C, a fixed σ,
    the noise source, the private set (dataset, size N) and q = B/N, the method and its
    options (resolved)."""
    from dpexp.data import DataModule, datamodule_kwargs  # sizes only: nothing is loaded

    # N depends on public.source/public.size (a held-out public slice leaves the private set)
    data = DataModule(**datamodule_kwargs(cfg))
    enabled = bool(cfg.privacy.enabled)
    privacy = {
        key: (cfg.privacy.get(key) if enabled else None)
        for key in ("delta", "accountant", "max_grad_norm", "noise_multiplier")
    }
    return {
        "privacy.enabled": enabled,
        **{f"privacy.{k}": v for k, v in privacy.items()},
        "privacy.secure_noise": bool(cfg.privacy.get("secure_noise")) if enabled else None,
        "dataset.name": data.name,
        "private_examples": data.num_private,
        "sample_rate": data.sample_rate,
        "method": OmegaConf.to_container(cfg.method, resolve=True),
    }


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    for key in KEYS:
        if saved.get(key) != current.get(key):
            return key
    return None


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], source: str) -> None:
    """Refuse to continue a checkpoint (named by ``source``, e.g. ``ckpt_path='...'``) whose
    privacy settings differ from this run's."""
    if saved is None:
        raise UserError(
            f"{source} is invalid: the checkpoint records no privacy settings (written by an "
            "older dpexp), so a resume could not account for its steps; start a new run"
        )
    key = first_difference(saved, current)
    if key is not None:
        shown = "the method or its options" if key == "method" else key
        raise UserError(
            f"{source} is invalid: the checkpoint was trained with {shown}="
            f"{_short(saved.get(key))}, this run has {_short(current.get(key))}; a resume "
            "must keep every privacy setting, or its epsilon would not be what was spent"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
