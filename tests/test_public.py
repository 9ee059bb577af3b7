"""Public data (public.source/public.size), public pretraining (pretrain.*), select's
public_grad scorer and freeze's rescale: public data never enters the private set, everything
computed from it is free (the accountant is unchanged), masks never read private data."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpexp import accounting
from dpexp.clipping import make_engine
from dpexp.data import DataModule, TensorData
from dpexp.data import public as P
from dpexp.errors import ConfigError
from dpexp.methods.freeze import Freeze
from dpexp.methods.masks import keep_count
from dpexp.methods.select import Select
from dpexp.models import PRETRAINED_WEIGHTS, CNNTanh
from dpexp.pretrain import pretrain, run_stage
from dpexp.train import run
from dpexp.validate import validate
from tests import reference

SHAPE = (1, 16, 16)
needs_sklearn = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("sklearn"), reason="scikit-learn not installed"
)


def synthetic(**public) -> DataModule:
    dm = DataModule("synthetic", image_shape=SHAPE, num_classes=4, size=96, **public)
    dm.setup("fit")
    return dm


# -- the source and its size -------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "size", "match"),
    [
        ("imagenet", None, r"public\.source='imagenet' .*choose one of none, heldout, digits"),
        ("mnist", 100, r"public\.source='mnist' .*the private dataset; use public.source=heldout"),
        ("heldout", None, r"public\.size=None .*heldout.*\[1, 59999\]"),
        ("heldout", 60_000, r"public\.size=60000 .*\[1, 59999\]"),
        ("digits", 1798, r"public\.size=1798 .*digits has \[1, 1797\]"),
        ("none", 10, r"public\.size=10 .*public\.source='none'"),
        ("cifar100", None, r"public\.source='cifar100' .*100 values.*10 classes"),
        ("digits", 2.5, r"public\.size=2\.5 .*integer"),
    ],
)
def test_bad_public_settings_are_one_line_errors(source, size, match):
    with pytest.raises(ConfigError, match=match):
        DataModule("mnist", public_source=source, public_size=size)


def test_heldout_is_removed_from_the_private_set_and_an_external_source_is_not():
    held = DataModule("mnist", batch_size=512, public_source="heldout", public_size=2000)
    assert held.num_private == 58_000 and held.sample_rate == 512 / 58_000
    external = DataModule("mnist", batch_size=512, public_source="fashion_mnist", public_size=2000)
    assert external.num_private == 60_000 and external.sample_rate == 512 / 60_000
    assert DataModule("mnist", public_source="digits").public_size == 1797


def test_heldout_rows_are_never_private_rows():
    dm = synthetic(public_source="heldout", public_size=32)
    assert len(dm.train) == 64 and len(dm.public) == 32
    private = {tuple(r.tolist()) for r in dm.train.x.flatten(1)}
    assert not any(tuple(r.tolist()) in private for r in dm.public.x.flatten(1))


def test_public_images_are_brought_to_the_private_input():
    grey = torch.full((2, 1, 8, 8), 0.5)
    out = P.to_private_input(grey, (3, 32, 32), "cifar10")  # grey → colour, 8 → 32 px
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in P.NORMALIZATION["cifar10"])
    torch.testing.assert_close(out, ((0.5 - mean) / std).expand(2, 3, 32, 32))
    colour = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    out = P.to_private_input(colour, (1, 28, 28), "mnist")  # colour → grey by luminance
    luminance = 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2]
    torch.testing.assert_close(out[:, 0], (luminance - 0.1307) / 0.3081)
    small = P.to_private_input(colour[:, :1], (1, 14, 14), "mnist")  # shrinking: antialiased
    expected = F.interpolate(colour[:, :1], size=(14, 14), mode="bilinear", antialias=True)
    torch.testing.assert_close(small, (expected - 0.1307) / 0.3081)
    standardised = P.to_private_input(colour[:, :1], (1, 28, 28), "synthetic")
    assert abs(standardised.mean().item()) < 1e-5 and standardised.std().item() == pytest.approx(1)


@needs_sklearn
def test_digits_are_a_public_set_of_their_own_mapped_to_the_private_shape():
    dm = synthetic(public_source="digits", public_size=100)
    assert dm.public.x.shape == (100, *SHAPE) and dm.num_private == 96 and len(dm.train) == 96
    assert dm.public.y.tolist()[:10] == list(range(10))
    fields = dm.public_fields()
    assert fields["public_source"] == "digits" and fields["public_size"] == 100
    assert "digits (1×8×8, pixels in [0, 1]) → 1×16×16" in fields["public_data"]


def test_digits_without_scikit_learn_is_refused_before_anything_runs(tiny_cfg, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"public\.source='digits' .*needs scikit-learn"):
        validate(tiny_cfg("public.source=digits"))


# -- pretraining -------------------------------------------------------------------------
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return CNNTanh(SHAPE, num_classes=4)


def test_pretraining_lowers_the_public_loss_and_trains_only_trainable_parameters():
    dm = synthetic(public_source="heldout", public_size=64)
    model = tiny_model()
    model.classifier[1].weight.requires_grad_(False)
    frozen = model.classifier[1].weight.detach().clone()

    def public_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(dm.public.x), dm.public.y))

    before = public_loss()
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    fields = pretrain(model, dm.public, 3, sgd, batch_size=16)
    assert fields["pretrain_steps"] == 3 * 4 and public_loss() < before
    assert torch.equal(model.classifier[1].weight, frozen)


def test_a_resumed_run_reads_its_pretrained_weights_instead_of_training_again(tmp_path):
    dm = synthetic(public_source="heldout", public_size=32)
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    first = tiny_model()
    fields = run_stage(first, dm, tmp_path, 2, sgd, 0.05, 8, seed=0)
    assert (tmp_path / PRETRAINED_WEIGHTS).is_file() and fields["pretrain_epochs"] == 2
    again = tiny_model()
    resumed = run_stage(again, None, tmp_path, 2, None, 0.05, 8, seed=0, resuming=True)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert {k: resumed[k] for k in fields} == fields


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("pretrain.epochs=-1", r"pretrain\.epochs=-1 .*integer >= 0"),
        ("pretrain.epochs=1.5", r"pretrain\.epochs=1\.5 .*integer >= 0"),
        ("pretrain.lr=0", r"pretrain\.lr=0.*> 0"),
        ("pretrain.batch_size=0", r"pretrain\.batch_size=0 .*positive integer"),
        ("select.scorer=public_grad", r"select\.scorer='public_grad' .*public\.source='none'"),
    ],
)
def test_bad_pretrain_and_select_options(tiny_cfg, override, match):
    extra = ["method=select"] if override.startswith("select") else []
    with pytest.raises(ConfigError, match=match):
        validate(tiny_cfg(*extra, override))


# -- the end-to-end claim: public data is free ---------------------------------------------
@needs_sklearn
def test_public_pretraining_and_public_grad_masks_leave_the_accountant_unchanged(
    tiny_cfg, tmp_path
):
    sigma = ["privacy.noise_multiplier=1.3", "privacy.epsilon=null"]
    plain = run(tiny_cfg(*sigma, output_dir=tmp_path / "plain"), tmp_path / "plain")
    public = ["public.source=digits", "public.size=200", "pretrain.epochs=1"]
    methods = ["method=freeze_select", "pruning.scorer=public_grad", "select.scorer=public_grad"]
    out = tmp_path / "public"
    result = run(tiny_cfg(*sigma, *public, *methods, output_dir=out), out)
    # same private set, same (σ, q, steps): the same ε, to the last bit
    assert result["sample_rate"] == plain["sample_rate"] == 32 / 128
    assert result["accountant_history"] == plain["accountant_history"]
    assert result["epsilon"] == plain["epsilon"] == accounting.epsilon(1.3, 0.25, 4, 1e-3, "prv")
    saved = json.loads((out / "result.json").read_text())
    assert saved["public_source"] == "digits" and saved["public_size"] == 200
    assert saved["pretrain_epochs"] == 1 and saved["pretrain_steps"] == 1  # 200 / 256
    assert saved["pretrain_data"].startswith("the first 200 of digits")
    assert "public" in saved["select_mask_source"] and "digits" in saved["mask_source"]
    # a later run starts from the pretrained weights
    later = tmp_path / "later"
    weights = f"model.weights={out / PRETRAINED_WEIGHTS}"
    assert run(tiny_cfg(weights, output_dir=later), later)["model_weights"] == str(
        out / PRETRAINED_WEIGHTS
    )


# -- select.scorer=public_grad ---------------------------------------------------------------
def test_select_public_grad_scores_a_public_batch_and_never_reads_private_data():
    def selection(poison: bool):
        dm = synthetic(public_source="heldout", public_size=32)
        if poison:
            dm.train = TensorData(torch.full_like(dm.train.x, math.nan), dm.train.y)
        model = tiny_model()
        select = Select(rate=0.7, scorer="public_grad", public_batch_size=8,
                        public_source="heldout", seed=3)  # fmt: skip
        select.setup_method(model, dm)
        replay = torch.Generator().set_state(select.public_generator.get_state())
        index = torch.randperm(32, generator=replay)[:8]
        return select, model, dm.public[index], select.coordinate_weights(0)

    _, model, (x, y), masks = selection(False)
    _, _, _, poisoned = selection(True)
    loss = F.cross_entropy(model(x), y)
    for n, p in model.named_parameters():
        if p.dim() < 2:
            continue
        score = torch.autograd.grad(loss, p, retain_graph=True)[0].abs().flatten()
        kept = masks[n].flatten().bool()
        assert int(kept.sum()) == keep_count(p.numel(), 0.7)
        assert score[kept].min() >= score[~kept].max()  # the largest public |grad| train
        assert torch.equal(masks[n], poisoned[n])


def test_public_scoring_leaves_no_trace_in_the_engine():
    """The public forward/backward runs on a copy without the engine's hooks: the private
    clipped sum after a selection equals one backward per example."""
    dm = synthetic(public_source="heldout", public_size=32)
    model = tiny_model().double()
    dm.public.x = dm.public.x.double()
    select = Select(rate=0.5, scorer="public_grad", public_batch_size=8, public_source="heldout")
    select.setup_method(model, dm)
    x, y = dm.train.x[:6].double(), dm.train.y[:6]
    for mode in ("per_sample", "auto"):
        engine = make_engine(mode, model)
        with engine.attached_to_model():
            weights = select.coordinate_weights(select.selection_index + 1)
            sums, norms, _ = engine.clipped_sum(x, y, 0.05, weights)
        ref_sums, ref_norms = reference.clipped_sum(model, x, y, 0.05, weights)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
        for n in sums:
            torch.testing.assert_close(sums[n], ref_sums[n], rtol=1e-10, atol=1e-12)


def test_select_public_generator_resumes():
    dm = synthetic(public_source="heldout", public_size=32)
    first = Select(scorer="public_grad", public_source="heldout", public_batch_size=4)
    first.setup_method(tiny_model(), dm)
    first.coordinate_weights(0)
    state = first.state_dict()
    expected = first.coordinate_weights(1)
    second = Select(scorer="public_grad", public_source="heldout", public_batch_size=4)
    second.setup_method(tiny_model(), dm)
    second.load_state_dict(state)
    got = second.coordinate_weights(1)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


# -- freeze: pruning.rescale ---------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["random", "magnitude"])
def test_rescale_restores_the_output_variance_of_every_pruned_layer(scorer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.Tanh(), nn.Linear(300, 200))
    x = torch.randn(4096, 400)
    with torch.no_grad():
        unpruned = [model[0](x).var(), model[2](torch.randn(4096, 300)).var()]
    variances = {}
    for rescale in (False, True):
        pruned = copy.deepcopy(model)
        Freeze(rate=0.9, scorer=scorer, rescale=rescale).setup_method(pruned, None)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            variances[rescale] = [
                pruned[0](x).var(),
                pruned[2](torch.randn(4096, 300, generator=g)).var(),
            ]
    for before, off, on in zip(unpruned, variances[False], variances[True], strict=True):
        assert float(on / before) == pytest.approx(1.0, abs=0.1)
        assert float(off / before) < 0.5  # without it the signal shrinks


# -- the closeness study: every job of its grid composes, with public data where it needs it --
def test_every_job_of_the_closeness_grid_composes_with_valid_public_and_method_settings(tmp_path):
    import itertools

    from dpexp import tables
    from dpexp.data import datamodule_kwargs
    from dpexp.methods import build_methods
    from tests.conftest import compose_config

    jobs = 0
    for sweep in tables.TABLES["closeness"].sweeps:
        axes = [[f"{k}={v}" for v in a.split("=", 1)[1].split(",")] if "," in a else [a]
                for a in sweep.args for k in [a.split("=", 1)[0]]]  # fmt: skip
        for overrides in itertools.product(*axes, ["privacy.epsilon=1", "privacy.epsilon=3"]):
            cfg = compose_config(tmp_path, *overrides)
            dm = DataModule(**datamodule_kwargs(cfg))
            methods = build_methods(cfg)
            assert (dm.public_size > 0) == (cfg.public.source != "none")
            assert cfg.pretrain.epochs == (10 if dm.public_size else 0)
            assert dm.public_size in (0, 1797)
            jobs += 1
            assert all(m.scorer == "public_grad" for m in methods) or not dm.public_size
    assert jobs == 2 * 2 * (3 * (1 + 2 + 2) + 1 + 2 + 2)  # datasets × ε × (public + none rows)
