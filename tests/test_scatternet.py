"""ScatterNet+CNN: a parameter-free, per-example front end, computed once by the data module,
and exact per-sample clipping of the CNN behind it in every mode."""

from __future__ import annotations

import torch
from torch import nn

from dpexp.data import DataModule
from dpexp.models import build_model
from dpexp.train import build, run
from tests.test_clipping_modes import assert_exact, batch


def test_shapes_follow_tramer_boneh():
    mnist = build_model("scatternet", (1, 28, 28))
    assert mnist.fixed_features.output_shape == (81, 7, 7)
    convs = [m for m in mnist.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (81, 16, (2, 2)),
        (16, 32, (1, 1)),
    ]
    norm = mnist.features[0]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 27 and not norm.affine
    cifar = build_model("scatternet", (3, 32, 32), num_classes=100)
    assert cifar.fixed_features.output_shape == (243, 8, 8)
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_front_end_is_fixed_and_per_example():
    model = build_model("scatternet", (1, 16, 16))
    # nothing to train, nothing learned from data: only the CNN's parameters are private
    assert not list(model.fixed_features.parameters())
    x, _ = batch((1, 16, 16), n=5)
    together = model.fixed_features(x)
    alone = torch.cat([model.fixed_features(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    # a different batch-mate changes nothing, in the features or in the logits
    other = torch.cat([x[:1], torch.randn(4, 1, 16, 16)])
    torch.testing.assert_close(model(other)[0], model(x)[0], rtol=1e-6, atol=1e-6)


def test_every_clipping_mode_is_exact_on_raw_images_and_on_features():
    model = build_model("scatternet", (1, 16, 16)).double()
    x, y = batch((1, 16, 16), n=4)
    features = model.fixed_features(x.double())
    assert_exact(model, features, y)  # what training sees
    # scattering inside the forward (torch.func cannot vmap kymatio's in-place ops; training
    # never asks it to, as the data module computes the features first)
    assert_exact(model, x, y, modes=("auto", "bk", "per_sample"))


def test_data_module_stores_the_features_and_the_model_reads_either(tmp_path):
    model = build_model("scatternet", (1, 16, 16))
    raw = DataModule("synthetic", size=40, synthetic_test_size=10, image_shape=(1, 16, 16))
    pre = DataModule("synthetic", size=40, synthetic_test_size=10, image_shape=(1, 16, 16))
    pre.precompute(model.fixed_features)
    raw.setup(), pre.setup()
    assert pre.train.x.shape == (40, 81, 4, 4) and pre.test.x.shape == (10, 81, 4, 4)
    assert pre.public.x.shape == (0, 81, 4, 4)
    torch.testing.assert_close(pre.train.x, model.fixed_features(raw.train.x))
    torch.testing.assert_close(model(pre.test.x), model(raw.test.x))


def test_training_precomputes_the_features(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=scatternet", f"paths.feature_cache={tmp_path / 'cache'}")
    datamodule, module, *_ = build(cfg, tmp_path / "run")
    assert datamodule.input_transform is module.model.fixed_features
    assert datamodule.feature_cache == tmp_path / "cache"
    result = run(cfg, tmp_path / "run")
    assert result["model"] == "scatternet" and result["steps"] == 4
    assert 0 < result["n_params"] == sum(p.numel() for p in module.model.parameters())
    assert len(list((tmp_path / "cache").glob("synthetic-*.pt"))) == 2


def test_features_are_cached_by_images_and_transform_and_a_damaged_cache_is_recomputed(
    tmp_path, monkeypatch, caplog
):
    model = build_model("scatternet", (1, 16, 16))
    calls = []
    original = model.fixed_features.forward
    monkeypatch.setattr(
        model.fixed_features, "forward", lambda x: calls.append(len(x)) or original(x)
    )

    def setup(seed=0):
        dm = DataModule(
            "synthetic", size=40, synthetic_test_size=10, image_shape=(1, 16, 16), seed=seed
        )
        dm.precompute(model.fixed_features, tmp_path)
        dm.setup()
        return dm

    first = setup()
    files = sorted(tmp_path.glob("*.pt"))
    # one zero image gives the empty public split its shape; train and test are cached
    assert len(files) == 2 and calls == [1, 40, 10]
    calls.clear()
    with caplog.at_level("INFO", logger="dpexp.data.datamodule"):
        again = setup()
    assert calls == [1]  # read back, not recomputed, and said so in one line
    assert (
        caplog.text.count(f"features of 50 synthetic images: 50 read from the cache in {tmp_path}")
        == 1
    )
    torch.testing.assert_close(again.train.x, first.train.x, rtol=0, atol=0)
    calls.clear()
    other = setup(seed=1)  # other images: other files
    assert calls == [1, 40, 10] and len(list(tmp_path.glob("*.pt"))) == 4
    calls.clear()
    assert files[0].name.startswith("synthetic-10-")  # the test split's
    files[0].write_bytes(b"not a tensor")
    with caplog.at_level("WARNING"):
        repaired = setup()
    assert "unusable" in caplog.text and calls == [1, 10]
    torch.testing.assert_close(repaired.train.x, first.train.x, rtol=0, atol=0)
    torch.testing.assert_close(repaired.test.x, first.test.x, rtol=0, atol=0)
    assert not torch.equal(other.train.x, first.train.x)
    assert not list(tmp_path.glob("*.tmp"))
