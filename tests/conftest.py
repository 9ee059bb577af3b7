"""Shared fixtures: compose the real Hydra config with tiny overrides, as a user would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dpexp.train import CONFIG_DIR

# A run small enough for a unit test: synthetic 1×16×16 images, a few Poisson batches.
TINY_DATA = [
    "dataset=synthetic",
    "dataset.image_shape=[1,16,16]",
    "dataset.size=128",
    "dataset.synthetic_test_size=64",
    "dataset.batch_size=32",
]
TINY = [
    "model=cnn_tanh",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "privacy.delta=1e-3",
    "logger=none",
]
MNIST_AVAILABLE = any(
    (Path(root) / "MNIST" / "raw").is_dir()
    for root in (
        os.environ.get("DPEXP_DATA_ROOT", "data"),
        Path(__file__).parents[2] / "shared/data",
    )
)


def compose_config(output_dir: Path, *overrides: str) -> DictConfig:
    """The train config as `python -m dpexp.train` would compose it, writing to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra.run.dir={output_dir}", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def pytest_configure(config):
    """DPEXP_TEST_DEVICE / DPEXP_TEST_DTYPE of the exactness tests (tests/device.py); one
    thread per xdist worker, and for the runs it starts, so workers do not oversubscribe."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        from tests import device
    except ValueError as exc:  # a bad value: one line, before any test runs
        raise pytest.UsageError(str(exc)) from None
    device.configure()


def pytest_report_header(config):
    from tests import device

    return device.describe()


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: ``tiny_cfg(*overrides)`` → a composed tiny config writing into tmp_path/run.

    ``data`` replaces the synthetic dataset overrides (e.g. ``data=["dataset=mnist", ...]``)."""

    def make(
        *overrides: str, output_dir: Path | None = None, data: list[str] = TINY_DATA
    ) -> DictConfig:
        return compose_config(output_dir or tmp_path / "run", *data, *TINY, *overrides)

    return make


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
    GlobalHydra.instance().clear()
