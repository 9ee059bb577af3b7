"""The start-of-run exactness probe (issue: privacy audit, item 2): an engine that is not
exact for the model is refused before anything is released."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from dpexp.accounting import Ledger
from dpexp.clipping import MODES, ExactnessError, make_engine, probe, verify
from dpexp.clipping.fast import BookKeepingEngine
from dpexp.clipping.layers import LinearMath
from dpexp.clipping.verify import ProbeReport, tolerance
from dpexp.errors import UserError
from dpexp.models import CNNTanh
from dpexp.privacy.step import GradientStep
from dpexp.train import run
from tests import device


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNNTanh(image_shape=(1, 16, 16), num_classes=4)


def batch(n: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g, dtype=dtype), torch.arange(n) % 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_every_exact_engine_passes_well_inside_the_tolerance(mode, dtype):
    """On the test device (tests/device.py), in both dtypes."""
    model = cnn().to(device.DEVICE, dtype)
    x, y = (t.to(device.DEVICE) for t in batch(dtype=dtype))
    engine = make_engine(mode, model)
    with engine.attached_to_model():
        report = probe(engine, x, y, max_grad_norm=None)
    assert report.examples == 8
    assert report.max_norm_error < report.tolerance / 10
    assert report.max_sum_error < report.tolerance / 10


def test_float32_on_cuda_with_tf32_is_held_to_float16_tolerance(monkeypatch):
    """TF32 keeps float16's 10 mantissa bits: the engine and the reference round their
    products differently, by ~1e-3, which float32's 1e-4 would refuse."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # no CUDA needed to name one
    precision = torch.get_float32_matmul_precision()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    assert tolerance(torch.float32, cuda) == tolerance(torch.float16, cpu) == (1e-2, 1e-3)
    assert tolerance(torch.float32, cpu) == (1e-4, 1e-6)
    assert tolerance(torch.float64, cuda) == (1e-9, 1e-12)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    try:
        torch.set_float32_matmul_precision("highest")
        assert tolerance(torch.float32, cuda) == (1e-4, 1e-6)
        torch.set_float32_matmul_precision("high")  # TF32 in matrix products
        assert tolerance(torch.float32, cuda) == (1e-2, 1e-3)
    finally:
        torch.set_float32_matmul_precision(precision)


def miss_linear_norms(monkeypatch):
    """A planted bug: the ghost norm of Linear weights is dropped (those layers are then
    clipped by the other layers' norms only)."""
    monkeypatch.setattr(LinearMath, "ghost_sq_norm", lambda self, m, x, g: x.new_zeros(len(x)))


def unclip_one_parameter(monkeypatch, name: str):
    """A planted bug: one parameter's sum skips clipping (the per-sample gradients of that
    parameter are summed as they are)."""
    original = BookKeepingEngine.clipped_sum

    def broken(self, inputs, targets, max_grad_norm, weights=None):
        sums, norms, loss = original(self, inputs, targets, max_grad_norm, weights)
        param = dict(self.model.named_parameters())[name]
        loss_all = self.loss_fn(self.model(inputs), targets)
        sums[name] = torch.autograd.grad(loss_all, param)[0]
        return sums, norms, loss

    monkeypatch.setattr(BookKeepingEngine, "clipped_sum", broken)


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample"])
def test_float32_rounding_beyond_the_tolerance_is_decided_in_float64(mode, monkeypatch):
    """An exact engine whose float32 errors exceed the tolerance (here made 1e-12, as a deep
    model's rounding exceeds 1e-4) is exact in float64: the run goes on, both are reported,
    and the model comes back in float32, the same tensors, bit for bit."""
    monkeypatch.setitem(verify.TOLERANCE, torch.float32, 1e-12)
    model = cnn()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    x, y = batch()
    name = next(iter(before))
    weights = {name: (torch.rand_like(before[name][1]) > 0.5).float()}  # a freeze mask
    engine = make_engine(mode, model)
    with engine.attached_to_model():
        report = probe(engine, x, y, max_grad_norm=None, weights=weights)
    assert max(report.max_norm_error, report.max_sum_error) > report.tolerance == 1e-12
    assert report.float64_error is not None and report.float64_error < 1e-12
    for n, p in model.named_parameters():
        assert p is before[n][0] and p.dtype == torch.float32 and torch.equal(p, before[n][1])


def test_the_exactness_error_survives_pickling():
    """A spawned or remote job (DDP, submitit, Ray) hands its refusal back pickled."""
    report = ProbeReport(8, 0.5, 0.5, 1e-4, 0.01)
    again = pickle.loads(pickle.dumps(ExactnessError("not exact", report)))
    assert str(again) == "not exact"


def test_a_missed_norm_is_caught_and_the_parameters_named(monkeypatch):
    miss_linear_norms(monkeypatch)
    model = cnn()
    x, y = batch()
    engine = make_engine("bk", model)
    with engine.attached_to_model(), pytest.raises(ExactnessError) as info:
        probe(engine, x, y, max_grad_norm=None)
    message = str(info.value)
    assert "per-sample norms differ" in message and "\n" not in message
    assert message.endswith("(in float64 too)")  # not rounding: the float64 re-check agrees
    assert "classifier" in message or "fc" in message  # the Linear layers are named


def test_an_unclipped_parameter_is_caught_by_name(monkeypatch):
    model = cnn()
    name = next(n for n, _ in model.named_parameters())
    unclip_one_parameter(monkeypatch, name)
    x, y = batch()
    engine = make_engine("bk", model)
    with engine.attached_to_model(), pytest.raises(ExactnessError, match=rf"differ: {name};"):
        probe(engine, x, y, max_grad_norm=1e-3)


def test_the_step_refuses_before_noise_is_added_or_the_model_moves(monkeypatch):
    miss_linear_norms(monkeypatch)
    model = cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ledger = Ledger(1e-5)
    step = GradientStep(
        model, engine=make_engine("bk", model), noise_multiplier=1.0, max_grad_norm=0.1,
        expected_batch_size=8, sample_rate=0.1, ledger=ledger,
        noise_generator=torch.Generator().manual_seed(1), verify=True,
    )  # fmt: skip
    step.engine.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ExactnessError):
        step(batch(), optimizer)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert step.steps == 0 and ledger.history() == []


def test_a_run_with_a_broken_engine_fails_in_one_line_before_training(
    monkeypatch, tiny_cfg, tmp_path
):
    miss_linear_norms(monkeypatch)
    with pytest.raises(UserError, match=r"^clipping\.mode='bk' is invalid: .*not exact"):
        run(tiny_cfg("clipping=bk"), tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_the_probe_reports_its_cost_and_leaves_training_unchanged(tiny_cfg, tmp_path):
    probed = run(tiny_cfg(output_dir=tmp_path / "a"), tmp_path / "a")
    plain = run(tiny_cfg("clipping.verify=false", output_dir=tmp_path / "b"), tmp_path / "b")
    report = probed["clipping_probe"]
    assert report["examples"] == 8 and report["seconds"] > 0
    assert report["max_norm_error"] <= report["tolerance"]
    assert plain["clipping_probe"] is None
    for key in ("test_acc", "test_loss", "epsilon", "steps"):
        assert probed[key] == plain[key], key


def test_dropout_is_off_for_the_comparison_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(6, 4, 4), torch.arange(6) % 3
    engine = make_engine("auto", model)
    with engine.attached_to_model():
        probe(engine, x, y, max_grad_norm=None)
    assert model[2].training
