"""The Lightning data module: train/test (and public) splits as in-memory tensors, fed by
the Poisson sampler; its checkpoint state lets a resumed run draw exactly the batches it
missed."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from dpexp.data import public as P
from dpexp.data.features import FixedFeatures
from dpexp.data.sampler import PoissonBatchSampler
from dpexp.data.sources import (
    DATASETS,
    TORCHVISION,
    TensorData,
    load_torchvision,
    locate,
    synthetic,
)

log = logging.getLogger(__name__)


class DataModule(L.LightningDataModule):
    """Train/test (and optional public) splits held in memory as normalised tensors.

    The public split comes from ``public_source`` (``dpexp.data.public``): ``heldout`` takes
    the last ``public_size`` examples of the training set and removes them from the private
    training data; ``digits`` or another dataset bring ``public_size`` (None: all) images of
    their own, mapped to this dataset's input. Either may be used freely (e.g. to choose
    masks, to pretrain). ``train_size``/``test_size`` take the first examples of each split.
    :meth:`add_private_examples` appends examples (an audit's canaries) to the private set.
    """

    def __init__(
        self,
        name: str,
        root: str = "data",
        batch_size: int = 256,
        physical_batch_size: int | None = None,
        train_size: int | None = None,
        test_size: int | None = None,
        public_source: str = "none",
        public_size: int | None = None,
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
        self.public_source = public_source
        # the number of public examples, known (and checked) before anything is loaded
        self.public_size = P.public_count(
            public_source, public_size, name, self._full_sizes[0], self.num_classes
        )
        self.public_description = P.describe(
            public_source, self.public_size, name, self.image_shape
        )
        self.sampler_generator = torch.Generator().manual_seed(seed)
        self.secret_sampler = False  # privacy.secure_noise: the seed is secret, never stored
        self._sampler: PoissonBatchSampler | None = None
        self._resume_position = 0  # batch of the epoch to continue from (checkpoint)
        self.train = self.test = self.public = None
        self.planned_epochs: int | None = None
        self.input_transform: nn.Module | None = None
        self.feature_cache: Path | None = None
        self.extra_private: TensorData | None = None
        self._features: FixedFeatures | None = None  # while setup() computes them

    def add_private_examples(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Append ``(x, y)`` (images of the dataset's shape, labels of the model's classes) to
        the private training set at :meth:`setup`, e.g. an audit's input canaries.

        They are private examples like the others: the Poisson sampler draws each of them
        with the rate q = ``batch_size`` / :attr:`num_private`, and the clipping engine clips
        them with the batch. :attr:`num_private`, q and the step plan stay those of the
        dataset's own examples, fixed before the extra examples are known: the accountant's
        q is the sampler's q, and neither depends on how many examples were added."""
        if self.train is not None:
            raise RuntimeError("add_private_examples() must be called before setup()")
        if tuple(x.shape[1:]) != self.image_shape or len(x) != len(y):
            raise ValueError(
                f"extra private examples must be {len(y)} images of shape {self.image_shape}, "
                f"got {tuple(x.shape)}"
            )
        if self.extra_private is not None:
            x = torch.cat([self.extra_private.x, x])
            y = torch.cat([self.extra_private.y, y])
        self.extra_private = TensorData(x.float(), y.long())

    def precompute(self, transform: nn.Module, cache_dir: str | Path | None = None) -> None:
        """Store ``transform(x)`` instead of every image ``x``, computed once at set-up and
        kept in ``cache_dir`` (if given) for the next run on the same images.

        Only for a fixed per-example transform (no parameters trained, no statistics of other
        examples), e.g. a scattering front end: then this equals applying it at every step."""
        if self.train is not None:
            raise RuntimeError("precompute() must be called before setup()")
        self.input_transform = transform
        self.feature_cache = Path(cache_dir) if cache_dir is not None else None

    def model_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the model sees for images ``x``: the fixed front end of :meth:`precompute`,
        if any (an auditor computing its canaries' gradients needs exactly the training input)."""
        if self.input_transform is None:
            return x
        return FixedFeatures(self.input_transform)(self.name, x, "canaries")

    def _transformed(self, x: torch.Tensor, split: str, name: str | None = None) -> torch.Tensor:
        if self._features is None:
            return x
        return self._features(name or self.name, x, split)

    # Sizes are known before loading, so configs can be validated without touching the data.
    @property
    def num_private(self) -> int:
        held_out = self.public_size if self.public_source == "heldout" else 0
        available = self._full_sizes[0] - held_out
        return available if self.train_size is None else min(self.train_size, available)

    @property
    def sample_rate(self) -> float:
        """q = B / N over the dataset's own private examples (extra examples do not change it)."""
        return self.batch_size / self.num_private

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(self.num_private / self.batch_size))

    def locate(self) -> Path | None:
        """The private dataset's root; a missing private or public source fails here, with
        one line, before anything is written."""
        P.check_available(self.public_source, self.root)
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
            if root != Path(self.root).expanduser():  # only the default root falls back
                log.info("dataset %s: read from the mirror %s (the default root %s/ has no "
                         "files)", self.name, root, self.root)  # fmt: skip
            x, y = load_torchvision(self.name, root, train=True)
            xt, yt = load_torchvision(self.name, root, train=False)
        if self.input_transform is not None:
            self._features = FixedFeatures(self.input_transform, self.feature_cache)
        n = self.num_private
        self.public = self._public(x, y)
        self.train = TensorData(self._transformed(x[:n], "train"), y[:n])
        if self.extra_private is not None:
            extra = self.extra_private
            self.train = TensorData(
                torch.cat([self.train.x, self._transformed(extra.x, "canaries")]),
                torch.cat([self.train.y, extra.y]),
            )
        m = len(yt) if self.test_size is None else min(self.test_size, len(yt))
        self.test = TensorData(self._transformed(xt[:m], "test"), yt[:m])
        if self._features is not None:
            log.info("%s", self._features.summary(self.name))
            self._features = None

    def _public(self, x: torch.Tensor, y: torch.Tensor) -> TensorData:
        """The public split: the held-out tail of the training set ``x``, or an external
        source brought to this dataset's input (never any of the first N private examples)."""
        if self.public_source in ("none", "heldout"):
            start = len(y) - self.public_size
            return TensorData(self._transformed(x[start:], "public"), y[start:])
        raw, labels = P.load_public(self.public_source, self.public_size, self.root)
        images = P.to_private_input(raw, tuple(self.image_shape), self.name)
        with_features = self._transformed(images, "public", f"public-{self.public_source}")
        return TensorData(with_features, labels)

    def public_fields(self) -> dict:
        """result.json entries: where the public data came from, how much, how it was mapped."""
        return {
            "public_source": self.public_source,
            "public_size": self.public_size,
            "public_data": self.public_description,
        }

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

    def use_secret_sampler_seed(self, seed: int) -> None:
        """Seed the Poisson sampler with a secret (``privacy.secure_noise``): checkpoints then
        keep only the position in the epoch, and a resume draws fresh batches."""
        self.sampler_generator.manual_seed(seed)
        self.secret_sampler = True

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
        if self.secret_sampler:
            state = None
        return {"sampler_generator": state, "sampler_position": position}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["sampler_generator"] is not None:  # None: secret, reseeded by this run
            self.sampler_generator.set_state(state_dict["sampler_generator"])
        self._resume_position = state_dict.get("sampler_position", 0)

    def public_dataloader(self, batch_size: int = 256, shuffle: bool = True) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed + 7)
        order = torch.randperm(len(self.public), generator=g) if shuffle else None
        order = torch.arange(len(self.public)) if order is None else order
        return DataLoader(self.public, sampler=order.split(batch_size), batch_size=None)


def datamodule_kwargs(cfg: DictConfig) -> dict:
    """:class:`DataModule` arguments of a composed config: the ``dataset`` node (resolved, no
    ``_target_``) and the ``public`` node's source and size."""
    kwargs = OmegaConf.to_container(cfg.dataset, resolve=True)
    kwargs.pop("_target_", None)
    return {**kwargs, **public_kwargs(cfg)}


def public_kwargs(cfg: DictConfig) -> dict:
    """``public.source`` and ``public.size`` as :class:`DataModule` arguments."""
    public = cfg.get("public") or {}
    return {"public_source": public.get("source", "none"), "public_size": public.get("size")}
