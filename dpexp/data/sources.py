"""Where images come from: torchvision datasets (on disk, the mirror, or downloaded) and
synthetic tensors, loaded as normalised in-memory tensors."""

from __future__ import annotations

import math
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.utils.data import Dataset

from dpexp.errors import UserError

# The read-only dataset mirror that sits beside a checkout of this repository (DPEXP_MIRROR
# points elsewhere; tests point it at an empty folder to see a missing dataset).
MIRROR = Path(
    os.environ.get("DPEXP_MIRROR") or Path(__file__).resolve().parents[3] / "shared" / "data"
)

# dataset.root when neither DPEXP_DATA_ROOT nor dataset.root is set (conf/dataset/*.yaml)
DEFAULT_ROOT = "data"

# name -> (torchvision class name, folder its files live in, train size, test size, shape, classes)
TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", 60_000, 10_000, (1, 28, 28), 10),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", 60_000, 10_000, (1, 28, 28), 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 50_000, 10_000, (3, 32, 32), 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 50_000, 10_000, (3, 32, 32), 100),
}
DATASETS = (*TORCHVISION, "synthetic")
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DatasetMissingError(UserError):
    """The dataset's files are neither on disk nor downloadable."""


def _has_files(name: str, root: Path) -> bool:
    folder = root / TORCHVISION[name][1]
    return folder.is_dir() and any(folder.iterdir())


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can ``url``'s host be resolved and connected to within ``timeout`` seconds?

    Runs in a daemon thread because name resolution ignores socket timeouts: without a
    network, torchvision's download would otherwise hang for minutes before failing."""
    host = urlparse(url).hostname
    port = 443 if url.startswith("https") else 80
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def locate(name: str, root: str | Path, download: bool = True) -> Path:
    """Return the dataset root that holds ``name``'s files.

    Looks in ``root``; for the default root only (``data``, i.e. neither DPEXP_DATA_ROOT nor
    dataset.root set) also in the repository's read-only mirror; failing that, lets
    torchvision download into ``root`` (users with a network). Raises
    :class:`DatasetMissingError` with one line naming ``root``, what is missing and how to
    fix it.
    """
    root = Path(root).expanduser()
    if _has_files(name, root):
        return root
    if is_default_root(root) and _has_files(name, MIRROR):
        return MIRROR
    folder = TORCHVISION[name][1]
    # an explicit root is never swapped for the mirror: say so where that would have helped
    note = (
        f"; the mirror {MIRROR} is used only for the default root {DEFAULT_ROOT!r}"
        if not is_default_root(root) and _has_files(name, MIRROR)
        else ""
    )
    reason = "download disabled"
    if download:
        import torchvision

        cls = getattr(torchvision.datasets, TORCHVISION[name][0])
        url = cls.mirrors[0] if hasattr(cls, "mirrors") else cls.url
        if not _reachable(url):
            raise DatasetMissingError(
                f"dataset {name!r} not found in {root}: no files in {root / folder} and "
                f"no network to download it from {urlparse(url).hostname}; set "
                f"DPEXP_DATA_ROOT or dataset.root to a folder holding {folder}/{note}"
            )
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
            return root
        except Exception as exc:  # no network, proxy refusal, disk full, ...
            reason = f"download failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        finally:
            socket.setdefaulttimeout(previous)
    raise DatasetMissingError(
        f"dataset {name!r} not found in {root}: no files in {root / folder} ({reason}); set "
        f"DPEXP_DATA_ROOT or dataset.root to a folder holding {folder}/{note}"
    )


def is_default_root(root: str | Path) -> bool:
    """Is ``root`` the default (``data`` beside the working directory), not a chosen one?"""
    return Path(root).expanduser() == Path(DEFAULT_ROOT)


def load_torchvision(
    name: str, root: Path, train: bool, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """N×C×H×W images, normalised with the dataset's mean/std (in [0, 1] without
    ``normalize``), and labels."""
    import torchvision

    ds = getattr(torchvision.datasets, TORCHVISION[name][0])(str(root), train=train)
    data = torch.as_tensor(ds.data)
    # N×H×W grey images or N×H×W×C colour images → N×C×H×W
    data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    x = data.float().div_(255.0)
    if not normalize:
        return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)
    mean, std = NORMALIZATION[name]
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


def synthetic(
    size: int, image_shape: tuple[int, ...], num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian images labelled by a fixed random linear teacher, so that models can learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *image_shape, generator=g)
    # The teacher is shared by every split and seed: train and test follow one labelling.
    teacher_rng = torch.Generator().manual_seed(12345)
    teacher = torch.randn(math.prod(image_shape), num_classes, generator=teacher_rng)
    y = (x.flatten(1) @ teacher).argmax(1)
    return x, y


class TensorData(Dataset):
    """Indexable by a tensor of indices, so a whole batch is one gather (no per-sample collate)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):
        return self.x[index], self.y[index]
