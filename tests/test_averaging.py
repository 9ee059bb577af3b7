"""Parameter averaging (dpexp.averaging.ParameterEMA): the EMA equals a hand-computed
reference, averages exactly what the optimizer updates (rgp: W; freeze: masked coordinates stay
bit-identical), resumes bit-identically, and leaves training and privacy accounting untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from dpexp.averaging import ParameterEMA, optimizer_parameters
from dpexp.errors import ConfigError
from dpexp.methods.rgp import PATH_NAME
from dpexp.train import run
from dpexp.validate import validate
from tests.conftest import TINY, TINY_DATA

REPO = Path(__file__).resolve().parents[1]
BK = "clipping=bk"  # fixed arithmetic: bit-equality across runs (auto picks by timing)
RECORDER = "+callbacks.recorder._target_=tests.test_averaging.IterateRecorder"


class IterateRecorder(L.Callback):
    """Keeps (in float64) the parameters the optimizer updates: at the start and after each
    optimizer step, and the module itself for inspection after ``run``."""

    latest: IterateRecorder | None = None

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.iterates: list[dict[str, torch.Tensor]] = []
        self.module: L.LightningModule | None = None
        self._step = 0
        IterateRecorder.latest = self

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule):
        params = optimizer_parameters(trainer, pl_module)
        return {n: p.detach().double().clone() for n, p in params.items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module = pl_module
        self.start = self._snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.iterates.append(self._snapshot(trainer, pl_module))


class CrashAfterStep(L.Callback):
    """Fails the run after optimizer step ``step`` (an interrupted run, in process)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash for the resume test")


class ValidationProbe(L.Callback):
    """Records, at each validation batch, whether the model holds the EMA's average."""

    latest: ValidationProbe | None = None

    def __init__(self) -> None:
        self.held_average: list[bool] = []
        ValidationProbe.latest = self

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, ParameterEMA))
        params = dict(pl_module.named_parameters())
        self.held_average.append(
            all(torch.equal(params[n].detach(), a) for n, a in ema.average.items())
        )


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _reference_ema(start, iterates, decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    """avg_0 = θ_0; avg_{t+1} = d_t·avg_t + (1 − d_t)·θ_{t+1}, d_t = min(decay, (1+t)/(10+t))."""
    average = {n: v.clone() for n, v in start.items()}
    for t, theta in enumerate(iterates):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        average = {n: d * average[n] + (1 - d) * theta[n] for n in average}
    return average


@pytest.mark.parametrize(("decay", "warmup"), [(0.999, True), (0.6, False)])
def test_average_equals_hand_computed_reference(tiny_cfg, tmp_path, decay, warmup):
    cfg = tiny_cfg(
        RECORDER, "trainer.max_epochs=2",
        f"callbacks.ema.decay={decay}", f"callbacks.ema.warmup={str(warmup).lower()}",
    )  # fmt: skip
    result = run(cfg, tmp_path / "run")
    recorder = IterateRecorder.latest
    assert result["steps"] == len(recorder.iterates) == 8
    expected = _reference_ema(recorder.start, recorder.iterates, decay, warmup)
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    state = ckpt["callbacks"]["ParameterEMA"]
    assert state["updates"] == 8 and state["average"].keys() == expected.keys()
    model = dict(recorder.module.named_parameters())
    last = recorder.iterates[-1]
    moved = max((last[n] - expected[n]).abs().max().item() for n in expected)
    assert moved > 1e-4  # the average is not the last iterate: the comparison can fail
    for n, value in expected.items():
        torch.testing.assert_close(state["average"][n].double(), value, rtol=1e-6, atol=1e-7)
        # Lightning's convention: the checkpoint's model is the averaged one ...
        assert torch.equal(ckpt["state_dict"][n], state["average"][n])
        # ... and so is the model after training; the raw last iterate is kept beside it.
        assert torch.equal(model[n].detach(), state["average"][n])
        assert torch.equal(state["raw"][n].double(), last[n])
    assert result["averaging"] == (f"ema:{decay:g}" + ("" if warmup else ":nowarmup"))


def test_masked_coordinates_stay_bit_identical_in_the_average(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        RECORDER, BK, "method=freeze", "pruning.rate=0.5", "pruning.frozen_value=keep",
        "trainer.max_epochs=2", "callbacks.ema.decay=0.5",
    )  # fmt: skip
    run(cfg, tmp_path / "run")
    recorder = IterateRecorder.latest
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    masks = ckpt["callbacks"]["Freeze"]["masks"]
    average = ckpt["callbacks"]["ParameterEMA"]["average"]
    assert masks
    for name, kept in masks.items():
        key = f"model.{name}"
        frozen = ~kept.bool()
        assert frozen.any() and kept.bool().any()
        start = recorder.start[key].float()
        assert torch.equal(average[key][frozen], start[frozen])  # bit-identical
        assert not torch.equal(average[key][~frozen], start[~frozen])  # the rest moved


def test_rgp_averages_the_full_weights_and_leaves_no_carriers(tiny_cfg, tmp_path):
    cfg = tiny_cfg(RECORDER, "method=rgp", "rgp.rank=2", "trainer.max_epochs=2")
    result = run(cfg, tmp_path / "run")
    recorder = IterateRecorder.latest
    average = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")["callbacks"]["ParameterEMA"]
    averaged = set(average["average"])
    assert averaged == set(recorder.start)  # what the optimizer updated
    assert not any(f".{PATH_NAME}." in n for n in averaged)  # never the carriers
    model = dict(recorder.module.named_parameters())
    assert not any(f".{PATH_NAME}." in n for n in model)  # carriers removed after fit
    reparametrized = result["rgp_reparametrized_layers"]
    conv_and_linear = [n for n in averaged if n.endswith("weight") and model[n].dim() > 1]
    assert reparametrized >= 1 and len(conv_and_linear) >= reparametrized
    for n in averaged:
        assert torch.equal(model[n].detach(), average["average"][n])


def test_resume_gives_the_same_average_as_an_uninterrupted_run(tiny_cfg, tmp_path):
    common = [BK, "trainer.max_epochs=3", "callbacks.step_checkpoint.every_n_train_steps=3"]
    crash = [
        "+callbacks.crash._target_=tests.test_averaging.CrashAfterStep",
        "+callbacks.crash.step=7",
    ]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    with pytest.raises(RuntimeError, match="crash for the resume test"):
        run(tiny_cfg(*common, *crash, output_dir=killed), killed)
    saved = _load(killed / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 6 and saved["callbacks"]["ParameterEMA"]["updates"] == 6
    resumed = run(tiny_cfg(*common, "resume=true", output_dir=killed), killed)
    uninterrupted = run(tiny_cfg(*common, output_dir=whole), whole)
    for key in ("test_acc", "test_acc_last", "test_loss", "epsilon", "steps"):
        assert resumed[key] == uninterrupted[key]
    a, b = _load(killed / "checkpoints" / "last.ckpt"), _load(whole / "checkpoints" / "last.ckpt")
    for key in ("average", "raw"):
        for n, value in b["callbacks"]["ParameterEMA"][key].items():
            assert torch.equal(a["callbacks"]["ParameterEMA"][key][n], value)
    assert a["callbacks"]["ParameterEMA"]["updates"] == 12
    for n, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][n], value)


def test_privacy_and_training_are_untouched_by_averaging(tiny_cfg, tmp_path):
    """Same σ, ε, steps and ledger; the last iterate is bit-identical to the run without
    averaging (the average never feeds back into training)."""
    fixed = [BK, "trainer.max_epochs=2"]
    on = run(tiny_cfg(*fixed, output_dir=tmp_path / "on"), tmp_path / "on")
    off = run(tiny_cfg(*fixed, "callbacks.ema=null", output_dir=tmp_path / "off"), tmp_path / "off")
    for key in ("epsilon", "noise_multiplier", "sample_rate", "steps", "accountant_history"):
        assert on[key] == off[key]
    assert on["averaging"] == "ema:0.999" and off["averaging"] == "none"
    assert (off["test_acc_last"], off["test_loss_last"]) == (off["test_acc"], off["test_loss"])
    assert (on["test_acc_last"], on["test_loss_last"]) == (off["test_acc"], off["test_loss"])
    assert on["test_loss"] != off["test_loss"]  # the average is another model
    raw = _load(tmp_path / "on" / "checkpoints" / "last.ckpt")["callbacks"]["ParameterEMA"]["raw"]
    plain = _load(tmp_path / "off" / "checkpoints" / "last.ckpt")["state_dict"]
    for n, value in raw.items():
        assert torch.equal(value, plain[n])


def test_validation_scores_the_average_and_training_resumes_from_the_raw_iterate(
    tiny_cfg, tmp_path
):
    fixed = [BK, "trainer.max_epochs=2", "callbacks.ema.decay=0.5"]
    probe = ["+callbacks.probe._target_=tests.test_averaging.ValidationProbe"]
    validated = tiny_cfg(*fixed, *probe, "trainer.limit_val_batches=1.0", output_dir=tmp_path / "v")
    run(validated, tmp_path / "v")
    assert ValidationProbe.latest.held_average == [True, True]  # one batch, each epoch
    run(tiny_cfg(*fixed, output_dir=tmp_path / "plain"), tmp_path / "plain")
    a = _load(tmp_path / "v" / "checkpoints" / "last.ckpt")["callbacks"]["ParameterEMA"]
    b = _load(tmp_path / "plain" / "checkpoints" / "last.ckpt")["callbacks"]["ParameterEMA"]
    for key in ("raw", "average"):  # validation changed nothing in training
        for n, value in b[key].items():
            assert torch.equal(a[key][n], value)


def _score(cfg, weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``weights`` on the test set, by hand."""
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("test")
    model = instantiate(cfg.model)
    model.load_state_dict({n.removeprefix("model."): v for n, v in weights.items()})
    correct, loss, total = 0, 0.0, 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            total += len(y)
    return correct / total, loss / total


def test_ddp_spawn_reports_the_average_and_the_last_iterate(tiny_cfg, tmp_path):
    """The workers train; the main process must still test the average (test_acc) and the
    raw last iterate (test_acc_last): both checked against the checkpoint by hand."""
    cfg = tiny_cfg("trainer=ddp_spawn_cpu", "trainer.max_epochs=2", "callbacks.ema.decay=0.5")
    result = run(cfg, tmp_path / "run")
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    state = ckpt["callbacks"]["ParameterEMA"]
    assert state["updates"] == result["steps"] == 8
    raw = {**ckpt["state_dict"], **state["raw"]}
    (acc, loss), (acc_last, loss_last) = _score(cfg, ckpt["state_dict"]), _score(cfg, raw)
    assert abs(loss - loss_last) > 1e-4  # the two models are told apart
    assert result["test_acc"] == pytest.approx(acc, abs=1e-6)
    assert result["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert result["test_acc_last"] == pytest.approx(acc_last, abs=1e-6)
    assert result["test_loss_last"] == pytest.approx(loss_last, rel=1e-5)


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, "'x'", True])
def test_bad_decay_is_one_config_error(tiny_cfg, decay):
    with pytest.raises(ConfigError, match=r"^callbacks\.ema\.decay=.* is invalid: a number in"):
        validate(tiny_cfg(f"callbacks.ema.decay={decay}"))


def test_bad_decay_exits_2_with_one_line(tmp_path):
    command = [
        sys.executable, "-m", "dpexp.train", *TINY_DATA, *TINY,
        f"hydra.run.dir={tmp_path / 'run'}", "callbacks.ema.decay=1.0",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "dpexp: error: callbacks.ema.decay=1.0 is invalid: a number in (0, 1), e.g. 0.999"
    ]
    assert not (tmp_path / "run").exists()


def test_averaging_can_be_switched_off(tiny_cfg, tmp_path):
    for overrides in (["callbacks.ema=null"], ["~callbacks.ema"], ["callbacks=none"]):
        cfg = tiny_cfg(*overrides)
        assert (cfg.callbacks or {}).get("ema") is None
    with pytest.raises(ConfigError, match=r"callbacks\.ema\.decay=2"):
        ParameterEMA(decay=2)
