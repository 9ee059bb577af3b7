"""The dataset group: sizes, shapes, the public data (public.*, pretrain.*) and the batch
size."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from dpexp.data import DATASETS, TORCHVISION, DataModule, datamodule_kwargs
from dpexp.validate.fields import choice, fail, get, number, positive_int


def validate_dataset(cfg: DictConfig) -> DataModule:
    choice(cfg, "dataset.name", DATASETS)
    for key in ("dataset.batch_size",):
        positive_int(cfg, key, optional=False)
    for key in ("dataset.physical_batch_size", "dataset.train_size", "dataset.test_size"):
        positive_int(cfg, key)
    name = cfg.dataset.name
    if name in TORCHVISION:
        _, _, _, _, shape, classes = TORCHVISION[name]
        if list(get(cfg, "dataset.image_shape") or shape) != list(shape):
            fail("dataset.image_shape", get(cfg, "dataset.image_shape"), f"{name} is {shape}")
        if (get(cfg, "dataset.num_classes") or classes) != classes:
            fail("dataset.num_classes", get(cfg, "dataset.num_classes"), f"{name} has {classes}")
    else:
        positive_int(cfg, "dataset.size", optional=False)
        positive_int(cfg, "dataset.num_classes", optional=False)
    dm = DataModule(**datamodule_kwargs(cfg))  # checks public.source and public.size
    if cfg.dataset.batch_size > dm.num_private:
        fail(
            "dataset.batch_size",
            cfg.dataset.batch_size,
            f"at most the private training set size {dm.num_private}",
        )
    return dm


def validate_pretrain(cfg: DictConfig, dm: DataModule) -> None:
    """``pretrain.*``: epochs >= 0, a positive batch size and lr (or null), public data."""
    epochs = get(cfg, "pretrain.epochs")
    if epochs is None:
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        fail("pretrain.epochs", epochs, "an integer >= 0")
    positive_int(cfg, "pretrain.batch_size", optional=False)
    lr = number(cfg, "pretrain.lr")
    if lr is not None and not 0 < lr < math.inf:
        fail("pretrain.lr", lr, "a finite number > 0, or null for the optimizer's lr")
    if epochs and dm.public_size == 0:
        fail(
            "pretrain.epochs",
            epochs,
            "needs public data but public.source='none': set public.source (heldout, digits "
            "or a dataset) and public.size; training on private data here would not be private",
        )
