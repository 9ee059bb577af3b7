"""Models are DP-ready; datasets resolve their root and fail with one clear line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpexp import data
from dpexp.clipping import clip_and_sum
from dpexp.models import IncompatibleModelError, build_model, make_dp_compatible
from tests import reference
from tests.conftest import MNIST_AVAILABLE


def test_cnn_tanh_is_tramer_boneh_architecture():
    model = build_model("cnn_tanh", image_shape=(1, 28, 28), num_classes=10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 10)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (16, (8, 8), (2, 2), (2, 2)),
        (32, (4, 4), (2, 2), (0, 0)),
    ]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_gn_has_cifar_stem_groupnorm_and_no_inplace_ops():
    model = build_model("resnet_gn", image_shape=(3, 32, 32), num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_resnet_gn_per_sample_gradients_match_brute_force():
    torch.manual_seed(0)
    model = build_model("resnet_gn", image_shape=(3, 8, 8), num_classes=3).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    grads, norms = clip_and_sum(model, x, y, 0.5, mode="per_sample")
    ref, ref_norms = reference.clipped_sum(model, x, y, 0.5)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-8, atol=0)
    for n in ("conv1.weight", "layer4.1.bn2.weight", "fc.bias"):
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-7, atol=1e-12)


def test_timm_model_is_made_compatible():
    model = build_model("timm", image_shape=(3, 16, 16), num_classes=5, model_name="resnet10t")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


class StatefulNorm(nn.modules.batchnorm._BatchNorm):
    """A batch-statistics layer Opacus' fixer does not know."""


def test_incompatible_model_names_the_module():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), StatefulNorm(2))
    # Opacus' fixer replaces only the BatchNorm classes it knows.
    with pytest.raises(IncompatibleModelError, match=r"'1' \(StatefulNorm\)"):
        make_dp_compatible(model)


def test_missing_dataset_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data.sources, "MIRROR", tmp_path / "no-mirror")
    with pytest.raises(data.DatasetMissingError) as info:
        data.locate("mnist", tmp_path / "empty", download=False)
    message = str(info.value)
    assert "\n" not in message
    assert "'mnist'" in message and str(tmp_path / "empty") in message
    assert "DPEXP_DATA_ROOT" in message


@pytest.mark.skipif(not MNIST_AVAILABLE, reason="MNIST mirror not present")
def test_mnist_loads_in_memory_with_a_disjoint_public_slice():
    import os

    dm = data.DataModule(
        "mnist",
        root=os.environ.get("DPEXP_DATA_ROOT", "data"),
        batch_size=64,
        public_source="heldout",
        public_size=1000,
    )
    dm.setup()
    assert dm.num_private == 59_000 and len(dm.train) == 59_000 and len(dm.public) == 1000
    assert len(dm.test) == 10_000 and dm.train.x.shape[1:] == (1, 28, 28)
    assert dm.train.x.dtype == torch.float32 and abs(dm.train.x.mean().item()) < 0.05
    # the public slice is the end of the training file, never part of the private set
    assert not torch.equal(dm.public.x[0], dm.train.x[-1])
    assert dm.sample_rate == pytest.approx(64 / 59_000)


def test_sampler_state_round_trips_through_the_datamodule():
    dm = data.DataModule("synthetic", size=100, batch_size=10, image_shape=(1, 4, 4))
    dm.setup()
    state = dm.state_dict()
    first = [b.tolist() for b in dm.train_dataloader().sampler]
    dm.load_state_dict(state)
    again = [b.tolist() for b in dm.train_dataloader().sampler]
    assert first == again and len(first) == 10
