"""Data: sources (torchvision, synthetic), public sources, the Poisson sampler, fixed
features, the module."""

from dpexp.data.datamodule import DataModule, datamodule_kwargs, public_kwargs
from dpexp.data.features import FixedFeatures
from dpexp.data.sampler import PoissonBatchSampler
from dpexp.data.sources import (
    DATASETS,
    NORMALIZATION,
    TORCHVISION,
    DatasetMissingError,
    TensorData,
    locate,
    synthetic,
)

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "TORCHVISION",
    "DataModule",
    "DatasetMissingError",
    "FixedFeatures",
    "PoissonBatchSampler",
    "TensorData",
    "datamodule_kwargs",
    "locate",
    "public_kwargs",
    "synthetic",
]
