"""model.weights / model.head / model.strict / model.pretrained: fine-tuning from saved weights.

Nothing here downloads: weights are saved locally (a tiny run, or a model built in the test) and
fine-tuned from; the offline pretrained=true line runs with the hub forced offline."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dpexp.errors import ConfigError, UserError
from dpexp.models import RUN_WEIGHTS, build_model, init_fields, save_weights
from dpexp.train import run
from dpexp.validate import validate
from tests.conftest import TINY, TINY_DATA, compose_config

SHAPE = (1, 16, 16)
HEAD = ("classifier.3.weight", "classifier.3.bias")


def cnn(classes: int = 10, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_model("cnn_tanh", SHAPE, classes, **kwargs)


def assert_state_equal(model, expected: dict[str, torch.Tensor], skip=()) -> None:
    """Every tensor of ``expected`` (but ``skip``) is in ``model``, bit for bit."""
    state = model.state_dict()
    for name, tensor in expected.items():
        if name not in skip:
            assert torch.equal(state[name], tensor), name


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny finished run (cnn_tanh, 10 classes): its dir, as `python -m dpexp.train` leaves it."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    run(compose_config(out, *TINY_DATA, *TINY), out)
    return out


# -- must show: save, then fine-tune with a new head -------------------------------------------
def test_ci_saves_weights_then_finetunes_from_them_with_a_new_head(
    finished_run, tiny_cfg, tmp_path
):
    saved = finished_run / RUN_WEIGHTS
    with safe_open(saved, "pt") as f:
        assert f.metadata()["model"] == "cnn_tanh" and f.metadata()["dataset"] == "synthetic"
    start = load_file(saved)
    assert start["classifier.3.weight"].shape == (10, 32)
    cfg = tiny_cfg(f"model.weights={finished_run}", "dataset.num_classes=4", "model.trainable=head")
    result = run(cfg, tmp_path / "run")
    assert result["model_weights"] == str(saved)
    assert result["model_head"] == "reset: 10 → 4 classes"
    assert result["model_trainable"] == ["head"]
    assert result["trainable_fraction"] == (32 * 4 + 4) / result["n_params"]
    end = load_file(tmp_path / "run" / RUN_WEIGHTS)
    assert end["classifier.3.weight"].shape == (4, 32)
    for name, tensor in start.items():  # the frozen features are the saved ones, bit for bit
        if name not in HEAD:
            assert torch.equal(end[name], tensor), name


# -- every source format ------------------------------------------------------------------------
def test_a_run_dir_and_its_lightning_checkpoint_load(finished_run):
    final = load_file(finished_run / RUN_WEIGHTS)
    assert_state_equal(cnn(seed=1, weights=str(finished_run)), final)
    ckpt = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    raw = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model = cnn(seed=1, weights=str(finished_run / "checkpoints" / "last.ckpt"))
    assert_state_equal(model, raw)
    assert init_fields(model)["model_head"] == "loaded"


@pytest.mark.parametrize("form", ["plain", "state_dict", "model", "ddp", "safetensors", "sniffed"])
def test_every_file_format_loads_the_same_tensors(form, tmp_path):
    source = cnn(seed=0)
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.bin")
    if form in ("safetensors", "sniffed"):  # "sniffed": safetensors content, another suffix
        save_weights(source, path)
    else:
        saved = {f"module.{k}": v for k, v in state.items()} if form == "ddp" else state
        torch.save(saved if form in ("plain", "ddp") else {form: saved, "epoch": 3}, path)
    model = cnn(seed=1, weights=str(path))
    assert_state_equal(model, state)
    assert init_fields(model) == {
        "model_weights": str(path), "model_head": "loaded", "model_trainable": None,
    }  # fmt: skip


# -- the head --------------------------------------------------------------------------------------
def test_reset_gives_a_new_head_only_when_the_class_count_differs(tmp_path):
    save_weights(cnn(10, seed=0), tmp_path / "w.safetensors")
    saved = load_file(tmp_path / "w.safetensors")
    same = cnn(10, seed=1, weights=str(tmp_path / "w.safetensors"), head="reset")
    assert_state_equal(same, saved)  # same class count: the saved head is kept
    fresh = cnn(4, seed=2).state_dict()
    other = cnn(4, seed=2, weights=str(tmp_path / "w.safetensors"), head="reset")
    assert_state_equal(other, saved, skip=HEAD)
    for name in HEAD:  # the model's own new head, as a fresh build with the same seed has it
        assert torch.equal(other.state_dict()[name], fresh[name])
    assert init_fields(other)["model_head"] == "reset: 10 → 4 classes"


def test_a_file_without_classifier_gives_a_new_head_or_missing_keys(tmp_path):
    backbone = {k: v for k, v in cnn(10).state_dict().items() if k not in HEAD}
    torch.save(backbone, tmp_path / "backbone.pt")
    model = cnn(10, seed=1, weights=str(tmp_path / "backbone.pt"))
    assert_state_equal(model, backbone)
    assert init_fields(model)["model_head"] == "new: backbone.pt has no classifier classifier.3"
    with pytest.raises(ConfigError, match=r"2 missing keys \(classifier\.3\.weight, classifier"):
        cnn(10, weights=str(tmp_path / "backbone.pt"), head="keep")


def test_timm_head_is_reset_through_get_classifier(tmp_path):
    kwargs = {"model_name": "resnet10t"}
    save_weights(build_model("timm", (3, 16, 16), 5, **kwargs), tmp_path / "w.safetensors")
    saved = load_file(tmp_path / "w.safetensors")
    model = build_model("timm", (3, 16, 16), 3, weights=str(tmp_path / "w.safetensors"), **kwargs)
    assert_state_equal(model, saved, skip=("fc.weight", "fc.bias"))
    assert model.fc.out_features == 3
    assert init_fields(model)["model_head"] == "reset: 5 → 3 classes"


def test_timm_pretrained_path_with_a_local_file_adapts_channels_and_head(tmp_path):
    """pretrained=true goes through timm's own loader; offline it can read a local file
    (pretrained_cfg_overlay), which adapts the input channels and the classifier."""
    import timm

    source = timm.create_model("resnet10t")  # 3 channels, 1000 classes, as on the hub
    torch.save(source.state_dict(), tmp_path / "hub.pth")
    model = build_model(
        "timm", SHAPE, 5, model_name="resnet10t", pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "hub.pth")},
    )  # fmt: skip
    conv = model.conv1[0].weight
    assert torch.allclose(conv, source.conv1[0].weight.sum(1, keepdim=True))
    assert init_fields(model) == {
        "model_weights": f"timm file: {tmp_path / 'hub.pth'}",
        "model_head": "reset by timm: 1000 → 5 classes",
        "model_trainable": None,
    }


# -- strict ----------------------------------------------------------------------------------------
def test_missing_and_unexpected_keys_are_refused_unless_strict_false(tmp_path, caplog):
    state = cnn(10).state_dict()
    del state["features.0.bias"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "w.pt")
    report = r"1 missing keys \(features\.0\.bias\), 1 unexpected keys \(extra\.weight\)"
    with pytest.raises(ConfigError) as info:
        cnn(10, weights=str(tmp_path / "w.pt"))
    assert re.fullmatch(
        rf"model\.weights='.*w\.pt' is invalid: weights of cnn_tanh: {report}; "
        r"model\.strict=false loads the rest",
        str(info.value),
    ), str(info.value)
    own_bias = cnn(10, seed=3).state_dict()["features.0.bias"]
    with caplog.at_level(logging.WARNING):
        model = cnn(10, seed=3, weights=str(tmp_path / "w.pt"), strict=False)
    assert re.search(report + "; loading the rest", caplog.text)
    del state["extra.weight"]
    assert_state_equal(model, state)
    assert torch.equal(model.features[0].bias, own_bias)


# -- bad input: one line, from validate, nothing written ---------------------------------------
def _random_bytes(work: Path, name: str) -> str:
    (work / name).write_bytes(os.urandom(256))
    return str(work / name)


def _truncated_safetensors(work: Path) -> str:
    save_weights(cnn(10), work / "full.safetensors")
    data = (work / "full.safetensors").read_bytes()
    (work / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return str(work / "cut.safetensors")


def _pickled_module(work: Path) -> str:
    torch.save(cnn(10), work / "module.pt")  # the whole module, not its state dict
    return str(work / "module.pt")


def _not_a_state_dict(work: Path) -> str:
    torch.save({"epoch": 3}, work / "meta.pt")
    return str(work / "meta.pt")


def _wider(work: Path) -> str:
    save_weights(cnn(10, width=2), work / "wide.safetensors")
    return str(work / "wide.safetensors")


def _unfinished_run(work: Path) -> str:
    (work / "unfinished" / "checkpoints").mkdir(parents=True)
    (work / "unfinished" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return str(work / "unfinished")


def _empty_dir(work: Path) -> str:
    (work / "empty").mkdir()
    return str(work / "empty")


def _ten_classes(work: Path) -> str:
    save_weights(cnn(10), work / "w.safetensors")
    return str(work / "w.safetensors")


BAD = {  # id: (weights file maker, extra overrides, message regex)
    "garbage_pt": (lambda w: _random_bytes(w, "w.pt"), (),
                   r"^model\.weights='.*w\.pt' is invalid: a dpexp run "
                   r"dir, .* \(UnpicklingError: Unsupported operand \d+; not a torch\.save "
                   r"file\?\)$"),
    "pickled_module": (_pickled_module, (),
                       r"^model\.weights='.*module\.pt' is invalid: a dpexp run dir, .* "
                       r"\(it pickles dpexp\.models\.cnn\.CNNTanh, not only tensors: save "
                       r"model\.state_dict\(\)\)$"),
    "empty_file": (lambda w: (w / "empty.pt").touch() or str(w / "empty.pt"), (),
                   r"\(EOFError: empty or truncated file\)$"),
    "garbage_safetensors": (lambda w: _random_bytes(w, "w.safetensors"), (),
                            r"^model\.weights='.*w\.safetensors' is invalid: a readable "
                            r"safetensors file \(SafetensorError: .*\)$"),
    "truncated_safetensors": (_truncated_safetensors, (),
                              r"is invalid: a readable safetensors file \(SafetensorError"),
    "not_a_state_dict": (_not_a_state_dict, (),
                         r"^model\.weights='.*meta\.pt' is invalid: a state dict of tensors .*; "
                         r"its 'epoch' is not a tensor \(int\)$"),
    "wider_model": (_wider, (),
                    r"^model\.weights='.*wide\.safetensors' is invalid: features\.0\.weight has "
                    r"shape \[32, 1, 8, 8\] in the file, \[16, 1, 8, 8\] in cnn_tanh as "
                    r"configured \(and 6 more\): the weights must fit the architecture$"),
    "missing_file": (lambda w: str(w / "nowhere.pt"), (),
                     r"^model\.weights='.*nowhere\.pt' is invalid: no such file or folder"),
    "empty_dir": (_empty_dir, (),
                  r"^model\.weights='.*empty' is invalid: a run dir holding model\.safetensors; "
                  r"this folder has none \(not a dpexp run dir; expected a dpexp run dir, a "
                  r"Lightning checkpoint, a torch\.save'd state dict or a safetensors file\)$"),
    "unfinished_run": (_unfinished_run, (),
                       r"this folder has none \(an unfinished run: resume it, or pass its "
                       r"checkpoints/last\.ckpt\)$"),
    "keep_other_classes": (_ten_classes, ("dataset.num_classes=4", "model.head=keep"),
                           r"^model\.head='keep' is invalid: the classifier classifier\.3 in .* "
                           r"scores 10 classes, cnn_tanh here 4 \(dataset\.num_classes\); "
                           r"model\.head=reset gives it a new classifier$"),
    "bad_head": (_ten_classes, ("model.head=new",),
                 r"^model\.head='new' is invalid: choose one of reset, keep$"),
    "bad_strict": (_ten_classes, ("model.strict=maybe",),
                   r"^model\.strict='maybe' is invalid: true or false$"),
    "pretrained_and_weights": (_ten_classes,
                               ("model=timm", "model.model_name=resnet10t",
                                "model.pretrained=true"),
                               r"^model\.pretrained=true is invalid with model\.weights='.*': "
                               r"choose one source of starting weights$"),
    "no_hub_weights": (None, ("model=timm", "model.model_name=resnet50t", "model.pretrained=true"),
                       r"^model\.pretrained=true is invalid: timm has no hub weights for "
                       r"'resnet50t' .*model\.weights=/path/to/model\.safetensors$"),
}  # fmt: skip


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", BAD)
def test_bad_weights_give_one_line_before_anything_is_written(case, tmp_path):
    make, overrides, pattern = BAD[case]
    weights = [f"model.weights={make(tmp_path)}"] if make else []
    cfg = compose_config(tmp_path / "run", *TINY_DATA, *TINY, *weights, *overrides)
    before = _snapshot(tmp_path)
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert _snapshot(tmp_path) == before and not (tmp_path / "run").exists()
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message


# -- offline pretrained=true, through the real command line ----------------------------------
def test_offline_pretrained_fails_before_training_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "DPEXP_DEBUG")}
    hub = tmp_path / "hf"  # an empty hub cache, and no network: nothing can be downloaded
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hub), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [*TINY_DATA, *TINY, "model=timm", "model.model_name=resnet10t", "model.pretrained=true"]
    done = subprocess.run(
        [sys.executable, "-m", "dpexp.train", *args, f"hydra.run.dir={tmp_path / 'new'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.fullmatch(
        r"dpexp: error: model\.pretrained=true is invalid here: timm could not fetch the hub "
        r"weights of 'resnet10t' \(\w+: .+\); offline, download them where there is a network "
        r"and pass the local file: model\.pretrained=false model\.weights=/path/to/"
        r"model\.safetensors",
        lines[0],
    ), lines[0]
    assert done.stdout.strip() == ""  # nor any retry or download message around it
    assert not (tmp_path / "new").exists()
    assert not [p for p in hub.rglob("*") if p.is_file() and p.stat().st_size > 0]
