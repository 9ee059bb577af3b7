"""Datasets as in-memory tensors, and the Poisson batch sampler DP-SGD's accounting assumes."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dpexp.errors import UserError

log = logging.getLogger(__name__)

# The read-only dataset mirror that sits beside a checkout of this repository (DPEXP_MIRROR
# points elsewhere; tests point it at an empty folder to see a missing dataset).
MIRROR = Path(
    os.environ.get("DPEXP_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)

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

    Looks in ``root``, then in the repository's read-only mirror; failing both, lets
    torchvision download into ``root`` (users with a network). Raises
    :class:`DatasetMissingError` with one line saying what is missing and how to fix it.
    """
    root = Path(root).expanduser()
    for candidate in (root, MIRROR):
        if _has_files(name, candidate):
            return candidate
    reason = "download disabled"
    if download:
        import torchvision

        cls = getattr(torchvision.datasets, TORCHVISION[name][0])
        url = cls.mirrors[0] if hasattr(cls, "mirrors") else cls.url
        if not _reachable(url):
            raise DatasetMissingError(
                f"dataset {name!r} not found: no files in {root / TORCHVISION[name][1]} and "
                f"no network to download it from {urlparse(url).hostname}; set "
                f"DPEXP_DATA_ROOT or dataset.root to a folder holding {TORCHVISION[name][1]}/"
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
        f"dataset {name!r} not found: no files in {root / TORCHVISION[name][1]} "
        f"({reason}); set DPEXP_DATA_ROOT or dataset.root to a folder holding "
        f"{TORCHVISION[name][1]}/"
    )


def _load_torchvision(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    ds = getattr(torchvision.datasets, TORCHVISION[name][0])(str(root), train=train)
    data = torch.as_tensor(ds.data)
    # N×H×W grey images or N×H×W×C colour images → N×C×H×W
    data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    x = data.float().div_(255.0)
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


class PoissonBatchSampler(Sampler[torch.Tensor]):
    """Each example joins each batch independently with probability ``sample_rate``.

    Batch sizes vary (Binomial(N, q)) and may be empty; this is the sampling the
    subsampled-Gaussian accountants assume. The generator's state is checkpointed.

    With ``world_size`` > 1 processes, every process draws the same global Poisson batch
    (same generator state everywhere) and keeps the examples with ``index % world_size ==
    rank``: the union over processes is exactly one Poisson batch of rate q over all N.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator
        self.start = 0  # first batch of the next pass: > 0 only when resuming mid-epoch
        self.drawn = 0  # batches drawn so far in the current pass
        self._states: dict[int, torch.Tensor] = {}  # generator state before batch i was drawn
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.drawn, self.start = self.start, 0
        self._states = {}
        while self.drawn < self.steps:
            # The data fetcher runs a batch ahead of training: keep the last few states.
            self._states = {i: s for i, s in self._states.items() if i > self.drawn - 4}
            self._states[self.drawn] = self.generator.get_state()
            self.drawn += 1
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            indices = mask.nonzero().flatten()
            yield indices[indices % self.world_size == self.rank]

    def resume_state(self, consumed: int) -> tuple[int, torch.Tensor]:
        """``(position, generator state)`` from which a new pass continues exactly after the
        first ``consumed`` batches of this pass were used for training (batches drawn ahead
        of training are drawn again)."""
        if consumed >= self.steps:
            return 0, self.generator.get_state()  # the pass is complete: next epoch
        if consumed == self.drawn:
            return consumed, self.generator.get_state()
        if consumed in self._states:
            return consumed, self._states[consumed]
        raise RuntimeError(f"sampler cannot checkpoint after batch {consumed} ({self.drawn} drawn)")


class DataModule(L.LightningDataModule):
    """Train/test (and optional public) splits held in memory as normalised tensors.

    ``public_size`` examples at the end of the training set are declared public: they are
    removed from the private training data and may be used freely (e.g. to choose masks).
    ``train_size``/``test_size`` take the first examples of each split (small test runs).
    """

    def __init__(
        self,
        name: str,
        root: str = "data",
        batch_size: int = 256,
        physical_batch_size: int | None = None,
        train_size: int | None = None,
        test_size: int | None = None,
        public_size: int = 0,
        eval_batch_size: int = 1024,
        image_shape: tuple[int, ...] | list[int] = (3, 32, 32),
        num_classes: int = 10,
        size: int = 1024,
        synthetic_test_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
        self.name = name
        self.root = root
        self.batch_size = batch_size
        self.physical_batch_size = physical_batch_size
        self.train_size = train_size
        self.test_size = test_size
        self.public_size = public_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.size = size
        self.synthetic_test_size = synthetic_test_size
        if name == "synthetic":
            self.image_shape, self.num_classes = tuple(image_shape), num_classes
            self._full_sizes = (size, synthetic_test_size)
        else:
            _, _, n_train, n_test, self.image_shape, self.num_classes = TORCHVISION[name]
            self._full_sizes = (n_train, n_test)
        self.sampler_generator = torch.Generator().manual_seed(seed)
        self._sampler: PoissonBatchSampler | None = None
        self._resume_position = 0  # batch of the epoch to continue from (checkpoint)
        self.train = self.test = self.public = None
        self.planned_epochs: int | None = None
        self.input_transform: nn.Module | None = None
        self.feature_cache: Path | None = None

    def precompute(self, transform: nn.Module, cache_dir: str | Path | None = None) -> None:
        """Store ``transform(x)`` instead of every image ``x``, computed once at set-up and
        kept in ``cache_dir`` (if given) for the next run on the same images.

        Only for a fixed per-example transform (no parameters trained, no statistics of other
        examples), e.g. a scattering front end: then this equals applying it at every step."""
        if self.train is not None:
            raise RuntimeError("precompute() must be called before setup()")
        self.input_transform = transform
        self.feature_cache = Path(cache_dir) if cache_dir is not None else None

    def _cache_file(self, x: torch.Tensor) -> Path | None:
        """Named by a hash of the images and of the transform's class and buffers (filters)."""
        if self.feature_cache is None:
            return None
        digest = hashlib.sha256(torch.__version__.encode())
        transform = self.input_transform
        digest.update(f"{type(transform).__module__}.{type(transform).__qualname__}".encode())
        for name, tensor in [*transform.state_dict().items(), ("x", x)]:
            digest.update(name.encode())
            digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
        return self.feature_cache / f"{self.name}-{len(x)}-{digest.hexdigest()[:20]}.pt"

    def _transformed(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is None:
            return x
        if len(x) == 0:  # e.g. no public examples: keep the transformed shape
            with torch.no_grad():
                return self.input_transform(torch.zeros(1, *x.shape[1:]))[:0]
        cached = self._cache_file(x)
        if cached is not None and cached.is_file():
            try:
                out = torch.load(cached, map_location="cpu", weights_only=True)
                if torch.is_tensor(out) and len(out) == len(x):
                    log.info("%s: %d precomputed features read from %s", self.name, len(x), cached)
                    return out
                raise ValueError(f"holds {type(out).__name__}, not {len(x)} feature rows")
            except Exception as exc:  # a damaged cache costs a recomputation, never the run
                log.warning("%s is unusable (%s): computing the features again", cached, exc)
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.cat([self.input_transform(chunk) for chunk in x.split(1024)])
        log.info(
            "%s: %s of %d images computed in %.0f s",
            self.name,
            type(self.input_transform).__name__,
            len(x),
            time.perf_counter() - start,
        )
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out, partial)
            os.replace(partial, cached)  # atomic: a concurrent run sees all of it or nothing
        return out

    # Sizes are known before loading, so configs can be validated without touching the data.
    @property
    def num_private(self) -> int:
        available = self._full_sizes[0] - self.public_size
        return available if self.train_size is None else min(self.train_size, available)

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.num_private

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(self.num_private / self.batch_size))

    def locate(self) -> Path | None:
        return None if self.name == "synthetic" else locate(self.name, self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if self.name == "synthetic":
            x, y = synthetic(self.size, self.image_shape, self.num_classes, seed=1000 + self.seed)
            xt, yt = synthetic(
                self.synthetic_test_size, self.image_shape, self.num_classes, seed=2000 + self.seed
            )
        else:
            root = self.locate()
            x, y = _load_torchvision(self.name, root, train=True)
            xt, yt = _load_torchvision(self.name, root, train=False)
        n_public_start = len(y) - self.public_size
        self.public = TensorData(self._transformed(x[n_public_start:]), y[n_public_start:])
        n = self.num_private
        self.train = TensorData(self._transformed(x[:n]), y[:n])
        m = len(yt) if self.test_size is None else min(self.test_size, len(yt))
        self.test = TensorData(self._transformed(xt[:m]), yt[:m])

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer  # None outside a Trainer; under DDP, this process's rank
        sampler = PoissonBatchSampler(
            len(self.train),
            self.sample_rate,
            self.steps_per_epoch,
            self.sampler_generator,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        sampler.start, self._resume_position = self._resume_position, 0
        self._sampler = sampler
        return DataLoader(self.train, sampler=sampler, batch_size=None)

    def _eval_loader(self, data: TensorData) -> DataLoader:
        batches = torch.arange(len(data)).split(self.eval_batch_size)
        return DataLoader(data, sampler=batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test)

    # DDP via spawn pickles the data module; a torch.Generator pickles its state as a temporary
    # tensor, shared by file descriptor and freed before the child reads it ("unable to resize
    # file"). Send the state as bytes instead.
    def __getstate__(self) -> dict:
        state = self.sampler_generator.get_state().numpy().tobytes()
        return {**self.__dict__, "sampler_generator": state}

    def __setstate__(self, state: dict) -> None:
        generator = torch.Generator()
        generator.set_state(
            torch.frombuffer(bytearray(state["sampler_generator"]), dtype=torch.uint8)
        )
        self.__dict__.update({**state, "sampler_generator": generator})

    def state_dict(self) -> dict:
        """The sampler's RNG as it was before the first batch training has not used yet, and
        that batch's index in the epoch: a resumed run draws exactly the batches it missed."""
        position, state = 0, self.sampler_generator.get_state()
        if self._sampler is not None:
            trainer = self.trainer
            consumed = (
                trainer.fit_loop.epoch_loop.batch_progress.current.processed
                if trainer is not None
                else self._sampler.drawn
            )
            position, state = self._sampler.resume_state(consumed)
        return {"sampler_generator": state, "sampler_position": position}

    def load_state_dict(self, state_dict: dict) -> None:
        self.sampler_generator.set_state(state_dict["sampler_generator"])
        self._resume_position = state_dict.get("sampler_position", 0)

    def public_dataloader(self, batch_size: int = 256, shuffle: bool = True) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed + 7)
        order = torch.randperm(len(self.public), generator=g) if shuffle else None
        order = torch.arange(len(self.public)) if order is None else order
        return DataLoader(self.public, sampler=order.split(batch_size), batch_size=None)
