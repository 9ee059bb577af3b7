"""Any timm architecture, randomly initialised or with timm's hub weights (``pretrained``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from dpexp.errors import ConfigError
from dpexp.models.compat import make_dp_compatible

LOCAL_FILE = "model.pretrained=false model.weights=/path/to/model.safetensors"


def timm_model(
    model_name: str,
    image_shape=(3, 32, 32),
    num_classes: int = 10,
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """``timm.create_model(model_name)`` for ``image_shape`` and ``num_classes``, made
    DP-compatible. ``pretrained`` loads timm's hub weights (timm adapts the classifier, the
    input channels and a ViT's position embedding); without a network that fails here, before
    training, with one line saying how to pass a local file instead."""
    import timm

    if not isinstance(pretrained, bool):
        raise ConfigError(f"model.pretrained={pretrained!r} is invalid: true or false")
    kwargs.setdefault("in_chans", image_shape[0])
    if "vit" in model_name or "deit" in model_name:
        kwargs.setdefault("img_size", tuple(image_shape[1:]))
    if pretrained and timm.is_model(model_name) and not timm.is_model_pretrained(model_name):
        raise ConfigError(
            f"model.pretrained=true is invalid: timm has no hub weights for {model_name!r} "
            f"(timm.list_pretrained() names those that have); or pass a file: {LOCAL_FILE}"
        )
    # built without weights first: a bad name or option fails as such, not as a download
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained:
        try:
            with _quiet("timm", "huggingface_hub"):  # no retry warnings around the one line
                model = timm.create_model(
                    model_name, pretrained=True, num_classes=num_classes, **kwargs
                )
        except Exception as exc:  # no network, hub error, unreadable cache: all end here
            raise ConfigError(
                f"model.pretrained=true is invalid here: timm could not fetch the hub weights "
                f"of {model_name!r} ({type(exc).__name__}: {_first_sentence(exc)}); offline, "
                f"download them where there is a network and pass the local file: {LOCAL_FILE}"
            ) from exc
    return make_dp_compatible(model)


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these libraries' loggers while inside (e.g. the hub client's retries)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _first_sentence(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or "no message"
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 1] + "…"


def hub_weights(model: nn.Module) -> str:
    """What timm loaded into ``model`` (for result.json): a local file given through
    ``pretrained_cfg_overlay={file: ...}``, else the hub checkpoint."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("file"):
        return f"timm file: {cfg['file']}"
    return f"timm hub: {cfg.get('hf_hub_id') or cfg.get('url') or cfg.get('architecture', '?')}"
