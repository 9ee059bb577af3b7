"""``model.weights``: start a run from saved weights (fine-tuning).

A source is one of

- a **dpexp run dir**: its ``model.safetensors`` (:data:`RUN_WEIGHTS`), the model the run
  scored (``test_acc``), written by ``dpexp.train.run`` beside ``result.json``; a stage that
  saves other weights into a run dir (public pretraining: :data:`PRETRAINED_WEIGHTS`) uses
  :func:`save_weights`, and a later run names that file directly;
- a **Lightning checkpoint** (``checkpoints/last.ckpt``): its ``state_dict``, whose keys carry
  the LightningModule's ``model.`` prefix;
- a **state dict** saved with ``torch.save`` (also under a ``state_dict`` or ``model`` key);
- a **safetensors** file (recognised by its suffix or its header).

Files are read without unpickling code (``weights_only=True``). The classifier (dpexp/models/
head.py) is replaced by the model's new one when the class count differs (``model.head=reset``);
missing or unexpected keys are refused unless ``model.strict=false``; a tensor whose shape
differs is always refused. Every failure is one :class:`ConfigError` line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpexp.errors import ConfigError
from dpexp.models.head import Head, find_head

log = logging.getLogger(__name__)

RUN_WEIGHTS = "model.safetensors"  # in a run dir: the model the run scored
PRETRAINED_WEIGHTS = "pretrained.safetensors"  # in a run dir: the weights after pretraining
HEADS = ("reset", "keep")
LIGHTNING_PREFIX = "model."  # dpexp.module.Classifier holds the network as ``self.model``
SOURCES = "a dpexp run dir, a Lightning checkpoint, a torch.save'd state dict or a safetensors file"


def _fail(source: Any, allowed: str) -> None:
    raise ConfigError(f"model.weights={str(source)!r} is invalid: {allowed}")


def _some(names: list[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown])
    return f"{listed}, … ({len(names)} in all)" if len(names) > shown else listed


def save_weights(model: nn.Module, path: Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict as safetensors, atomically (a reader sees all or nothing).

    ``metadata`` values are stored as strings in the file's header (provenance)."""
    from safetensors.torch import save_file

    state, storages = {}, set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:  # safetensors refuses shared storage
            tensor = tensor.clone()
        storages.add(storage)
        state[key] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def resolve(source: str | os.PathLike) -> Path:
    """The weights file ``source`` names: itself, or a run dir's :data:`RUN_WEIGHTS`."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / RUN_WEIGHTS).is_file():
            return path / RUN_WEIGHTS
        if (path / PRETRAINED_WEIGHTS).is_file():
            hint = f"pass {path / PRETRAINED_WEIGHTS} for its pretrained weights"
        elif (path / "result.json").is_file():
            hint = "a run finished before dpexp wrote it: pass its checkpoints/last.ckpt"
        elif (path / "checkpoints" / "last.ckpt").is_file():
            hint = "an unfinished run: resume it, or pass its checkpoints/last.ckpt"
        else:
            hint = f"not a dpexp run dir; expected {SOURCES}"
        _fail(source, f"a run dir holding {RUN_WEIGHTS}; this folder has none ({hint})")
    if not path.is_file():
        _fail(source, f"no such file or folder; expected {SOURCES}")
    return path


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and '{'."""
    with path.open("rb") as f:
        start = f.read(9)
    size = int.from_bytes(start[:8], "little") if len(start) == 9 else 0
    return start[8:9] == b"{" and 0 < size <= path.stat().st_size - 8


def read_state_dict(path: Path, source: Any = None) -> dict[str, torch.Tensor]:
    """The tensors in the weights file ``path`` by name, Lightning's ``model.`` prefix removed."""
    source = path if source is None else source
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            _fail(source, f"a readable safetensors file ({type(exc).__name__}: {_first(exc)})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        _fail(source, f"{SOURCES} ({_torch_load_reason(exc)})")
    return _unwrap(loaded, source)


def _torch_load_reason(exc: Exception) -> str:
    """torch.load's refusal in a few words (its own message runs to several sentences)."""
    text = str(exc)
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if pickled:
        return f"it pickles {pickled.group(1)}, not only tensors: save model.state_dict()"
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unpickler:
        return f"{type(exc).__name__}: {unpickler.group(1).strip()}; not a torch.save file?"
    return f"{type(exc).__name__}: {_first(exc) if text.strip() else 'empty or truncated file'}"


def _first(exc: Exception, limit: int = 160) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _unwrap(loaded: Any, source: Any) -> dict[str, torch.Tensor]:
    state, wrapper = loaded, None
    if isinstance(loaded, dict):
        wrapper = next(
            (k for k in ("state_dict", "model") if isinstance(loaded.get(k), dict)), None
        )
        state = loaded[wrapper] if wrapper else loaded
    if not isinstance(state, dict) or not state:
        held = "an empty dict" if isinstance(state, dict) else f"a {type(loaded).__name__}"
        _fail(source, f"{SOURCES}; the file holds {held}")
    odd = next(((k, v) for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None or not all(isinstance(k, str) for k in state):
        what = (
            f"its {odd[0]!r} is not a tensor ({type(odd[1]).__name__})" if odd else "keys not str"
        )
        _fail(source, f"a state dict of tensors ({SOURCES}); {what}")
    if wrapper == "state_dict":  # a Lightning checkpoint: keys of the LightningModule
        state = {k.removeprefix(LIGHTNING_PREFIX): v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _classes(state: dict[str, torch.Tensor], head: Head) -> int | None:
    """Class scores of the saved classifier: rows of its weight (or length of its bias)."""
    for local in ("weight", "bias"):
        tensor = state.get(head.qualified(local))
        if tensor is not None and tensor.dim() >= 1:
            return int(tensor.shape[0])
    return None


def load_weights(
    model: nn.Module,
    source: str | os.PathLike,
    head: str = "reset",
    strict: bool = True,
    model_name: str = "the model",
) -> dict[str, str]:
    """Load ``source`` into ``model``; returns what was loaded (file, what became of the head)."""
    path = resolve(source)
    state = read_state_dict(path, source)
    expected = model.state_dict()
    head_note, new_head = "loaded", set()
    classifier = find_head(model)
    if classifier is not None:
        keys = [k for k in classifier.state_keys if k in expected]
        in_file = [k for k in keys if k in state]
        classes = _classes(state, classifier)
        differs = classes is not None and classes != classifier.classes
        if differs and head == "keep":
            raise ConfigError(
                f"model.head='keep' is invalid: the classifier {classifier.name} in {path} "
                f"scores {classes} classes, {model_name} here {classifier.classes} "
                "(dataset.num_classes); model.head=reset gives it a new classifier"
            )
        if head == "reset" and (differs or not in_file):
            for k in in_file:
                del state[k]
            new_head = set(keys)
            head_note = (
                f"reset: {classes} → {classifier.classes} classes"
                if in_file
                else f"new: {path.name} has no classifier {classifier.name}"
            )
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if mismatched:
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        _fail(
            source,
            f"{k} has shape {list(state[k].shape)} in the file, {list(expected[k].shape)} in "
            f"{model_name} as configured{more}: the weights must fit the architecture",
        )
    missing = [k for k in expected if k not in state and k not in new_head]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        report = ", ".join(
            f"{len(names)} {what} keys ({_some(names)})"
            for what, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        if strict:
            _fail(source, f"weights of {model_name}: {report}; model.strict=false loads the rest")
        log.warning("model.weights=%s (strict=false): %s; loading the rest", source, report)
    model.load_state_dict(state, strict=False)
    log.info("model.weights=%s: %d tensors from %s; head %s", source, len(state), path, head_note)
    return {"model_weights": str(path), "model_head": head_note}
