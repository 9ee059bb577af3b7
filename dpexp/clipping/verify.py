"""The exactness probe: an engine's norms and clipped sum against one backward per example.

Run before the first private step (``clipping.verify=true``, the default) on the first few
examples of the first batch, and by ``check_supported`` on random inputs before training.
Any engine gets it for free: it only calls ``engine.clipped_sum``. A mismatch beyond what
the dtype's rounding explains refuses the run, naming the parameters whose sums differ, so
that a model that breaks an engine's assumptions in a way nobody listed fails loudly
instead of leaking. The tolerance is the dtype's (:func:`tolerance`); float32 on CUDA with
TF32 in effect (cuDNN's default for convolutions) is held to float16's, since TF32 keeps
float16's 10 mantissa bits: the norms that clip are then that accurate, not float32's.

Rounding grows with depth: on a ResNet-18 float32 errors reach 3e-5, and one dry run saw
8.3e-4 against float32's 1e-4 (docs/gpu_check.md). A mismatch in a lower precision is
therefore decided in float64: the same examples, the model's floating tensors cast to
float64 for the comparison only (autocast off) and restored bit for bit afterwards. What is
not exact by construction (a missed norm, an unclipped parameter) is as wrong in float64 and
refuses the run; rounding vanishes there, and the run goes on with both errors reported.

What is compared, per probed example i and parameter p, with reference gradients g_i from
``autograd.grad`` of that example's loss alone:

- norms: |n̂_i − ‖w ⊙ g_i‖|, relative to max(‖w ⊙ g_i‖, min(C, max_j ‖w ⊙ g_j‖)): a norm far
  below the clipping scale changes no clipping factor, so it is not held to its own size;
- sums: ‖ŝ_p − Σ_i c_i w_p ⊙ g_{i,p}‖ relative to Σ_i ‖c_i w_p ⊙ g_{i,p}‖ (the size of what
  is summed, so that cancellation between examples does not look like an error, and a
  parameter the engine misses entirely shows an error of order 1), or to a tiny share of the
  whole clipped sum where that is larger (:data:`FLOOR`).

Stochastic regularisers (dropout, drop-path) are switched off for the probe, since one
example alone and the batch cannot draw the same masks; the random number generators are
left as they were, so a run with the probe trains exactly like one without.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dpexp.clipping.base import ClippingEngine, Weights, clip_factors, trainable_parameters
from dpexp.errors import UserError

log = logging.getLogger(__name__)

MAX_EXAMPLES = 8
# Relative tolerance by dtype: measured errors of exact engines are ~3e-7 in float32 and
# ~3e-16 in float64; a missed or unclipped parameter shows errors of 1e-3 and more.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# A parameter whose summed gradient is below this share of the whole clipped sum is held to
# that share: a gradient that is zero in exact arithmetic (an attention key's bias under
# softmax) is rounding noise in both computations (measured 5e-17 of the whole in float32).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}
STOCHASTIC = ("DropPath", "DropBlock2d", "DropBlock")


def tf32_in_effect(device: torch.device) -> bool:
    """Whether float32 matrix products or convolutions on ``device`` may round to TF32 (10
    mantissa bits, as float16): CUDA with cuDNN's ``allow_tf32`` (torch's default) or a
    float32 matmul precision below "highest"."""
    return device.type == "cuda" and (
        torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    )


def tolerance(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """``(relative tolerance, floor share)`` of the probe for the rounding in effect: float32
    on CUDA with TF32 rounds the engine's and the reference's products differently (~1e-3),
    and is held to float16's tolerance, which has the same mantissa."""
    if dtype == torch.float32 and tf32_in_effect(device):
        dtype = torch.float16
    return TOLERANCE.get(dtype, 1e-4), FLOOR.get(dtype, 1e-6)


@dataclass
class ProbeReport:
    examples: int
    max_norm_error: float
    max_sum_error: float
    tolerance: float
    seconds: float
    # where the errors above exceeded the tolerance: the largest error of the float64 re-check
    float64_error: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class ExactnessError(UserError):
    """The engine's norms or clipped sums differ from one backward per example."""

    # ``report`` is a keyword so that the error pickles (a spawned or remote job re-raises it)
    def __init__(self, message: str, report: ProbeReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@contextmanager
def _deterministic(model: nn.Module) -> Iterator[None]:
    stochastic = [
        m
        for m in model.modules()
        if m.training
        and (isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in STOCHASTIC)
    ]
    for m in stochastic:
        m.training = False
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for m in stochastic:
            m.training = True


def reference_gradients(
    engine: ClippingEngine, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example gradients (B × parameter shape), one backward per example, with the
    engine's hooks removed."""
    params = trainable_parameters(engine.model)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n, _ in params}
    was_attached = engine.attached
    if was_attached:
        engine.detach()
    try:
        for x, y in zip(inputs, targets, strict=True):
            loss = engine.loss_fn(engine.model(x.unsqueeze(0)), y.unsqueeze(0))
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for (n, p), g in zip(params, grads, strict=True):
                rows[n].append(torch.zeros_like(p) if g is None else g.detach())
    finally:
        if was_attached:
            engine.attach()
    return {n: torch.stack(r) for n, r in rows.items()}


@contextmanager
def _in_float64(model: nn.Module) -> Iterator[None]:
    """The model's floating parameters and buffers in float64, the same objects (optimizers
    and hooks keep theirs); afterwards back in their own dtype, bit for bit."""
    seen, tensors = set(), []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None and t.is_floating_point() and id(t) not in seen:
                    seen.add(id(t))
                    tensors.append((t, t.data))
    try:
        for t, data in tensors:
            t.data = data.double()
        with torch.autocast(tensors[0][1].device.type if tensors else "cpu", enabled=False):
            yield
    finally:
        for t, data in tensors:
            t.data = data


def probe(
    engine: ClippingEngine,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_grad_norm: float | None,
    weights: Weights = None,
    examples: int = MAX_EXAMPLES,
) -> ProbeReport:
    """Compare ``engine`` with the reference on the first ``examples`` inputs; raise
    :class:`ExactnessError` (one line, naming the parameters) on a mismatch that float64
    confirms (see the module docstring).

    ``max_grad_norm=None`` clips at the median reference norm, so that some probed examples
    are clipped and some are not."""
    inputs, targets = inputs[:examples].detach(), targets[:examples]
    try:
        return _compare(engine, inputs, targets, max_grad_norm, weights)
    except ExactnessError as rounded:
        if all(p.dtype == torch.float64 for p in engine.model.parameters()):
            raise
        first = rounded
    start = time.perf_counter()
    double = {n: w.double() for n, w in weights.items()} if weights else weights
    with _in_float64(engine.model):
        x = inputs.double() if inputs.is_floating_point() else inputs
        try:
            exact = _compare(engine, x, targets, max_grad_norm, double)
        except ExactnessError as confirmed:  # not rounding: wrong in exact arithmetic too
            raise ExactnessError(f"{confirmed} (in float64 too)", confirmed.report) from None
    report = first.report
    report.float64_error = max(exact.max_norm_error, exact.max_sum_error)
    report.seconds = round(report.seconds + time.perf_counter() - start, 4)
    log.info(
        "clipping.mode=%r: errors up to %.2g in the model's precision exceed its tolerance %g, "
        "but in float64 the engine is exact (%.2g): rounding, not a missing clip",
        engine.mode, max(report.max_norm_error, report.max_sum_error), report.tolerance,
        report.float64_error,
    )  # fmt: skip
    return report


def _compare(
    engine: ClippingEngine,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_grad_norm: float | None,
    weights: Weights = None,
) -> ProbeReport:
    """One comparison in the model's own precision; :class:`ExactnessError` on a mismatch."""
    start = time.perf_counter()
    with _deterministic(engine.model):
        grads = reference_gradients(engine, inputs, targets)
        if weights:
            grads = {n: g * weights[n] if n in weights else g for n, g in grads.items()}
        if not grads:
            return ProbeReport(len(targets), 0.0, 0.0, 0.0, 0.0)
        ref_norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
        if max_grad_norm is None:
            max_grad_norm = float(ref_norms.median().clamp_min(torch.finfo(ref_norms.dtype).tiny))
        sums, norms, _ = engine.clipped_sum(inputs, targets, max_grad_norm, weights)
    tol, floor_share = tolerance(ref_norms.dtype, ref_norms.device)
    scale = ref_norms.max().clamp(max=max_grad_norm) if len(ref_norms) else ref_norms.sum()
    norm_errors = (norms.to(ref_norms) - ref_norms).abs() / torch.maximum(ref_norms, scale).clamp(
        min=torch.finfo(ref_norms.dtype).tiny
    )
    factors = clip_factors(ref_norms, max_grad_norm)
    clipped = {n: g * factors.view(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}
    sizes = {n: c.flatten(1).norm(dim=1).sum() for n, c in clipped.items()}
    floor = floor_share * sum(sizes.values())
    sum_errors = {}
    for name, c in clipped.items():
        engine_sum = sums.get(name, torch.zeros_like(c[0]))
        scale = torch.maximum(sizes[name], floor).clamp_min(torch.finfo(c.dtype).tiny)
        sum_errors[name] = float((c.sum(0) - engine_sum).norm() / scale)
    report = ProbeReport(
        examples=len(targets),
        max_norm_error=float(norm_errors.max()) if len(norm_errors) else 0.0,
        max_sum_error=max(sum_errors.values(), default=0.0),
        tolerance=tol,
        seconds=round(time.perf_counter() - start, 4),
    )
    wrong = sorted(n for n, e in sum_errors.items() if not e <= tol)
    if wrong or not report.max_norm_error <= tol:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise ExactnessError(
            f"clipping.mode={engine.mode!r} is not exact for this model: on {report.examples} "
            f"examples its per-sample norms differ from one backward per example by up to "
            f"{report.max_norm_error:.2g} (relative) and its clipped sums by up to "
            f"{report.max_sum_error:.2g}, tolerance {tol:g}; parameters that differ: "
            f"{shown or 'none (the norms alone)'}; try clipping=functorch",
            report,
        )
    return report
