"""Fixed per-example features (e.g. the scattering transform), computed once and cached on
disk, keyed by a hash of the images and of the transform."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class FixedFeatures:
    """``transform(x)`` for a parameter-free, per-example ``transform``, read from
    ``cache_dir`` when an earlier run computed it for the same images."""

    def __init__(self, transform: nn.Module, cache_dir: str | Path | None = None) -> None:
        self.transform = transform
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def cache_file(self, name: str, x: torch.Tensor) -> Path | None:
        """Named by a hash of the images and of the transform's class and buffers (filters)."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(torch.__version__.encode())
        transform = self.transform
        digest.update(f"{type(transform).__module__}.{type(transform).__qualname__}".encode())
        for key, tensor in [*transform.state_dict().items(), ("x", x)]:
            digest.update(key.encode())
            digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
        return self.cache_dir / f"{name}-{len(x)}-{digest.hexdigest()[:20]}.pt"

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:  # e.g. no public examples: keep the transformed shape
            with torch.no_grad():
                return self.transform(torch.zeros(1, *x.shape[1:]))[:0]
        cached = self.cache_file(name, x)
        if cached is not None and cached.is_file():
            try:
                out = torch.load(cached, map_location="cpu", weights_only=True)
                if torch.is_tensor(out) and len(out) == len(x):
                    log.info("%s: %d precomputed features read from %s", name, len(x), cached)
                    return out
                raise ValueError(f"holds {type(out).__name__}, not {len(x)} feature rows")
            except Exception as exc:  # a damaged cache costs a recomputation, never the run
                log.warning("%s is unusable (%s): computing the features again", cached, exc)
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.cat([self.transform(chunk) for chunk in x.split(1024)])
        log.info(
            "%s: %s of %d images computed in %.0f s",
            name,
            type(self.transform).__name__,
            len(x),
            time.perf_counter() - start,
        )
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out, partial)
            os.replace(partial, cached)  # atomic: a concurrent run sees all of it or nothing
        return out
