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

from dpexp import progress

log = logging.getLogger(__name__)


class FixedFeatures:
    """``transform(x)`` for a parameter-free, per-example ``transform``, read from
    ``cache_dir`` when an earlier run computed it for the same images."""

    def __init__(self, transform: nn.Module, cache_dir: str | Path | None = None) -> None:
        self.transform = transform
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.read = self.computed = 0  # examples, over every call
        self.seconds = 0.0  # spent computing

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

    def __call__(self, name: str, x: torch.Tensor, split: str = "") -> torch.Tensor:
        if len(x) == 0:  # e.g. no public examples: keep the transformed shape
            with torch.no_grad():
                return self.transform(torch.zeros(1, *x.shape[1:]))[:0]
        cached = self.cache_file(name, x)
        if cached is not None and cached.is_file():
            try:
                out = torch.load(cached, map_location="cpu", weights_only=True)
                if torch.is_tensor(out) and len(out) == len(x):
                    log.debug("%s %s: %d features read from %s", name, split, len(x), cached)
                    self.read += len(x)
                    return out
                raise ValueError(f"holds {type(out).__name__}, not {len(x)} feature rows")
            except Exception as exc:  # a damaged cache costs a recomputation, never the run
                log.warning("%s is unusable (%s): computing the features again", cached, exc)
        start = time.perf_counter()
        label = " ".join(filter(None, (name, split, type(self.transform).__name__)))
        chunks = []
        with torch.no_grad(), progress.stage(label, total=len(x)) as advance:
            for chunk in x.split(1024):
                chunks.append(self.transform(chunk))
                advance(len(chunk))
        out = torch.cat(chunks)
        self.computed += len(x)
        self.seconds += time.perf_counter() - start
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out, partial)
            os.replace(partial, cached)  # atomic: a concurrent run sees all of it or nothing
        return out

    def summary(self, name: str) -> str:
        """One line for every split together: read from the cache, computed, or both."""
        what = f"{type(self.transform).__name__} features of {self.read + self.computed} {name}"
        parts = []
        if self.read:
            parts.append(f"{self.read} read from the cache in {self.cache_dir}")
        if self.computed:
            kept = f", cached in {self.cache_dir}" if self.cache_dir is not None else ""
            parts.append(f"{self.computed} computed in {self.seconds:.0f} s{kept}")
        return f"{what} images: {'; '.join(parts)}"
