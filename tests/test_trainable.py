"""model.trainable: name patterns choose what trains; frozen tensors cost no per-sample work in
any clipping mode, the clipped sum over the trainable subset equals brute force, and freeze /
select masks and trainable_fraction only count what trains."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample import grad_sample_module as opacus_gsm
from torch import nn

from dpexp.clipping import MODES, fast, layers, make_engine, per_sample
from dpexp.errors import ConfigError
from dpexp.methods.freeze import Freeze
from dpexp.methods.masks import keep_count
from dpexp.methods.select import Select
from dpexp.models import build_model, save_weights
from dpexp.models.trainable import apply_trainable
from dpexp.train import run
from tests.test_clipping_modes import Scale, assert_exact, batch

SHAPE = (1, 16, 16)


def names_that_train(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def small_resnet(trainable=None) -> nn.Module:
    return build_model("resnet_gn", (3, 8, 8), 10, groups=4, trainable=trainable)


# -- which names a pattern takes ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "head"),
    [
        ("cnn_tanh", SHAPE, {}, "classifier.3"),
        ("cnn_cifar", (3, 16, 16), {}, "classifier.3"),
        ("scatternet", SHAPE, {}, "classifier.3"),
        ("resnet_gn", (3, 8, 8), {"groups": 4}, "fc"),
        ("timm", (3, 16, 16), {"model_name": "resnet10t"}, "fc"),
    ],
)
def test_head_keyword_is_the_classifier_of_every_builder(name, shape, kwargs, head):
    expected = {f"{head}.weight", f"{head}.bias"}
    for pattern in ("head", "head.*", ["head.weight", "head.bias"]):
        model = build_model(name, shape, 7, trainable=pattern, **kwargs)
        assert names_that_train(model) == expected, pattern
        assert dict(model.named_parameters())[f"{head}.weight"].shape[0] == 7


def test_bias_pattern_is_bitfit_and_norm_keyword_takes_normalization_layers():
    model = build_model("cnn_tanh", SHAPE, trainable="*.bias")
    assert names_that_train(model) == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    model = small_resnet(trainable="norm")
    norms = {
        f"{m_name}.{n}"
        for m_name, m in model.named_modules()
        if isinstance(m, nn.GroupNorm)
        for n, _ in m.named_parameters()
    }
    assert len(norms) == 2 * (1 + 2 * 8 + 3)  # the stem's, two per block, three downsamples
    assert names_that_train(model) == norms
    vit = build_model(
        "timm", (3, 16, 16), 10, model_name="vit_tiny_patch16_224", patch_size=4, depth=1,
        embed_dim=24, num_heads=2, trainable=["norm", "head"],
    )  # fmt: skip
    assert names_that_train(vit) == {
        "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.norm2.weight",
        "blocks.0.norm2.bias", "norm.weight", "norm.bias", "head.weight", "head.bias",
    }  # fmt: skip


def test_literal_patterns_union_and_null_trains_everything():
    model = build_model("cnn_tanh", SHAPE, trainable=["features.3.*", "classifier.1.bias"])
    assert names_that_train(model) == {"features.3.weight", "features.3.bias", "classifier.1.bias"}
    model = build_model("cnn_tanh", SHAPE, trainable=None)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("trainable", "message"),
    [
        (
            "features.9.*",
            r"^model\.trainable='features\.9\.\*' is invalid: it matches no parameter of "
            r"cnn_tanh; parameters are features\.0\.weight, features\.0\.bias, features\.3\."
            r"weight, …, classifier\.3\.bias \(8 tensors\), keywords head = classifier\.3",
        ),
        ("norm", r"^model\.trainable='norm' is invalid: cnn_tanh has no normalization layer"),
        ("head.gamma", r"matches no parameter of cnn_tanh's head classifier\.3 \(weight, bias\)"),
        ([], r"^model\.trainable=\[\] is invalid: a list of parameter-name patterns"),
        (["head", 3], r"^model\.trainable=\['head', 3\] is invalid"),
    ],
)
def test_a_pattern_that_matches_nothing_is_one_line(trainable, message):
    with pytest.raises(ConfigError) as info:
        build_model("cnn_tanh", SHAPE, trainable=trainable)
    assert "\n" not in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_pattern_error_comes_from_validate_before_anything_is_written(tiny_cfg, tmp_path):
    from dpexp.validate import validate

    with pytest.raises(ConfigError, match=r"model\.trainable='clasifier\.\*' is invalid"):
        validate(tiny_cfg("model.trainable=[clasifier.*]"))
    assert not (tmp_path / "run").exists()


# -- frozen tensors cost no per-sample work, in every mode -----------------------------------
def frozen_mix() -> nn.Module:
    """A frozen conv below the trainable ones, a frozen unknown module (the generic torch.func
    path if it trained), a Linear whose weight is frozen but whose bias trains."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), Scale(3), nn.Tanh(), nn.Conv2d(3, 3, 1), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 3),
    )  # fmt: skip
    apply_trainable(model, ["3.*", "5.bias", "7.*"])
    return model


def _subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


class PerSampleWork:
    """Records, per clipping mode, which parameters had per-sample gradients (or per-sample
    norms) computed: Opacus' grad samplers, the vmapped torch.func gradient, and the fast
    engines' per-layer math and generic path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.owned = {
            (id(m), local): self.names[id(p)]
            for m in model.modules()
            for local, p in m.named_parameters(recurse=False)
        }
        self.computed: set[str] = set()
        samplers = GradSampleHooks.GRAD_SAMPLERS
        for module_type, sampler in list(samplers.items()):
            monkeypatch.setitem(samplers, module_type, self._opacus(sampler))
        monkeypatch.setattr(
            opacus_gsm,
            "ft_compute_per_sample_gradient",
            self._opacus(opacus_gsm.ft_compute_per_sample_gradient),
        )
        monkeypatch.setattr(per_sample, "grad", self._functorch(per_sample.grad))
        for cls in _subclasses(layers.LayerMath):
            for method in ("per_sample", "per_sample_sq_norm", "summed"):
                if method in vars(cls):
                    monkeypatch.setattr(cls, method, self._layer(vars(cls)[method]))
            if "ghost_sq_norm" in vars(cls):
                monkeypatch.setattr(cls, "ghost_sq_norm", self._ghost(vars(cls)["ghost_sq_norm"]))
        monkeypatch.setattr(fast, "generic_per_sample", self._generic(fast.generic_per_sample))

    def _opacus(self, sampler):
        def spy(module, activations, backprops):
            out = sampler(module, activations, backprops)
            self.computed.update(self.names[id(p)] for p in out)
            return out

        return spy

    def _functorch(self, grad):
        def spy(f, **kwargs):
            g = grad(f, **kwargs)

            def differentiated(params, *args):
                self.computed.update(params)
                return g(params, *args)

            return differentiated

        return spy

    def _layer(self, method):
        def spy(math, module, x, g, name, *args, **kwargs):
            self.computed.add(self.owned[id(module), name])
            return method(math, module, x, g, name, *args, **kwargs)

        return spy

    def _ghost(self, method):
        def spy(math, module, x, g):
            self.computed.add(self.owned[id(module), "weight"])
            return method(math, module, x, g)

        return spy

    def _generic(self, generic):
        def spy(layer, call, g, tape):
            self.computed.update(layer.params.values())
            return generic(layer, call, g, tape)

        return spy


class Affine(nn.Module):
    """An unknown module type with two direct parameters (no Opacus grad sampler)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.beta = nn.Parameter(torch.linspace(-1, 1, channels))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def half_frozen_unknown() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), Affine(3), nn.Flatten(), nn.Linear(48, 3))
    model[1].beta.requires_grad_(False)
    return model


def frozen_modules(model: nn.Module) -> set[str]:
    """Modules with direct parameters, none of which trains."""
    return {
        name
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    }


WORK_CASES = {  # model, input shape, classes
    "frozen_mix": (frozen_mix, (2, 6, 6), 3),
    "bitfit_and_head": (lambda: build_model("cnn_tanh", SHAPE, trainable=["*.bias", "head"]),
                        SHAPE, 10),
    "resnet_norm_head": (lambda: small_resnet(["norm", "head"]), (3, 8, 8), 10),
    "half_frozen_unknown": (half_frozen_unknown, (2, 6, 6), 3),
}  # fmt: skip


@pytest.mark.parametrize("case", WORK_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_frozen_tensors_get_no_per_sample_work(mode, case):
    make, shape, classes = WORK_CASES[case]
    model = make()
    x, y = batch(shape, n=3, classes=classes)
    with pytest.MonkeyPatch.context() as patch:
        work = PerSampleWork(patch, model)
        engine = make_engine(mode, model)
        with engine.attached_to_model():
            sums, _, _ = engine.clipped_sum(x, y, 1.0)
            hooked = {
                name
                for name, m in model.named_modules()
                if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
            }
    trainable = names_that_train(model)
    expected = set(trainable)
    if mode == "per_sample" and case == "half_frozen_unknown":
        # Opacus' torch.func fallback differentiates every parameter of a layer it has no
        # sampler for (and then drops the frozen ones): documented in docs/finetuning.md
        expected.add("1.beta")
    assert work.computed == expected  # all of the trainable, none of the frozen
    assert set(sums) == trainable
    assert not hooked & frozen_modules(model)  # a frozen layer gets no hook at all
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_frozen_mix_freezes_whole_layers_and_parts_of_layers():
    model = frozen_mix()
    assert frozen_modules(model) == {"0", "1"}
    assert names_that_train(model) == {"3.weight", "3.bias", "5.bias", "7.weight", "7.bias"}


EXACT_CASES = {  # model, input shape
    "bitfit": (lambda: build_model("cnn_tanh", SHAPE, trainable="*.bias"), SHAPE),
    "linear_probe": (lambda: build_model("cnn_tanh", SHAPE, trainable="head"), SHAPE),
    "mixed": (lambda: build_model("cnn_tanh", SHAPE, trainable=["features.3.*", "head.bias"]),
              SHAPE),
    "resnet_norm_head": (lambda: small_resnet(["norm", "head"]), (3, 8, 8)),
    "frozen_mix": (frozen_mix, (2, 6, 6)),
}  # fmt: skip


@pytest.mark.parametrize("case", EXACT_CASES)
def test_clipped_sum_over_the_trainable_subset_equals_brute_force(case):
    """Norms and clipped sums of every mode (MODES) against one backward per sample."""
    make, shape = EXACT_CASES[case]
    model = make()
    classes = model[-1].out_features if isinstance(model, nn.Sequential) else 10
    assert_exact(model, *batch(shape, n=4, classes=classes), modes=MODES)


# -- composition with freeze / select and trainable_fraction ---------------------------------
def test_freeze_and_select_masks_only_cover_trainable_parameters():
    model = build_model("cnn_tanh", SHAPE, 4, trainable=["head", "features.0.*"])
    freeze = Freeze(rate=0.5, scorer="random")
    freeze.setup_method(model, None)
    assert set(freeze.masks) == {"classifier.3.weight", "features.0.weight"}  # maskable & trainable
    select = Select(rate=0.5)
    select.setup_method(model, None)
    weights = select.coordinate_weights(0)
    assert set(weights) == set(freeze.masks)
    kept = {n: int(m.sum()) for n, m in freeze.masks.items()}
    for n, w in weights.items():  # selected only among freeze's kept coordinates
        assert (
            int(w.sum()) == keep_count(kept[n], 0.5)
            and not (w.bool() & ~freeze.masks[n].bool()).any()
        )
    total = sum(p.numel() for p in model.parameters())
    biases = 4 + 16  # classifier.3.bias, features.0.bias: trainable, not maskable
    assert freeze.trainable_fraction(model) == (sum(kept.values()) + biases) / total
    selected = sum(keep_count(k, 0.5) for k in kept.values())
    assert select.trainable_fraction(model) == (selected + biases) / total


def test_trainable_fraction_in_result_json_with_frozen_tensors_unchanged(tiny_cfg, tmp_path):
    """freeze_select over a trainable subset: result.json's trainable_fraction is the share of
    all parameters that moved, and every frozen tensor ends bit-identical to the start."""
    from safetensors.torch import load_file

    start = build_model("cnn_tanh", SHAPE, 10)
    save_weights(start, tmp_path / "start.safetensors")
    cfg = tiny_cfg(
        "method=freeze_select", "pruning.rate=0.5", "pruning.frozen_value=keep", "select.rate=0.5",
        f"model.weights={tmp_path / 'start.safetensors'}", "model.trainable=[head,'*.bias']",
    )  # fmt: skip
    result = run(cfg, tmp_path / "run")
    end = load_file(tmp_path / "run" / "model.safetensors")
    trained = {"classifier.3.weight", *(n for n in end if n.endswith("bias"))}
    for n, before in start.state_dict().items():
        if n not in trained:
            assert torch.equal(end[n], before), n
    assert not torch.equal(end["classifier.3.weight"], start.state_dict()["classifier.3.weight"])
    head = start.classifier[3].weight.numel()
    biases = sum(p.numel() for n, p in start.named_parameters() if n.endswith("bias"))
    selected = keep_count(keep_count(head, 0.5), 0.5)
    assert result["trainable_fraction"] == pytest.approx(
        (selected + biases) / result["n_params"], rel=1e-12
    )
    assert result["model_trainable"] == ["head", "*.bias"]


def test_reset_head_left_frozen_is_warned(caplog, tmp_path):
    save_weights(build_model("cnn_tanh", SHAPE, 10), tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        build_model(
            "cnn_tanh", SHAPE, 4, weights=str(tmp_path / "w.safetensors"), trainable="*.bias"
        )
    assert (
        "new random classifier classifier.3 (model.head=reset) but model.trainable=['*.bias'] "
        "leaves classifier.3.weight frozen"
    ) in caplog.text
