"""The dataset group: sizes, shapes, the public split and the batch size."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from dpexp.data import DATASETS, TORCHVISION, DataModule
from dpexp.validate.fields import choice, fail, get, positive_int


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
    public = get(cfg, "dataset.public_size") or 0
    dm_kwargs = {
        k: v
        for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
        if k != "_target_"
    }
    dm = DataModule(**dm_kwargs)
    full = dm._full_sizes[0]
    if isinstance(public, bool) or not isinstance(public, int) or not 0 <= public < full:
        fail("dataset.public_size", public, f"an integer in [0, {full})")
    if cfg.dataset.batch_size > dm.num_private:
        fail(
            "dataset.batch_size",
            cfg.dataset.batch_size,
            f"at most the private training set size {dm.num_private}",
        )
    return dm
