"""Where the clipping exactness tests run: ``DPEXP_TEST_DEVICE`` (cpu, cuda, cuda:N; default
cpu) and ``DPEXP_TEST_DTYPE`` (float64, the default, or float32).

    DPEXP_TEST_DEVICE=cuda DPEXP_TEST_DTYPE=float32 pytest tests/test_clipping_modes.py

Only the comparisons against the brute-force reference move (``place``, ``rtol``); the
other tests of those files stay on the CPU in float64. On CUDA, TF32 is switched off for
the whole session (``configure``): these tests check the engines' algebra at the dtype's
precision, and TF32 rounds the engine and the reference differently (~1e-3 relative).
"""

from __future__ import annotations

import os

import torch
from torch import nn

DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Relative tolerance in float32, wherever float64 asks for ≤ 1e-6: float32's unit roundoff
# is 6e-8; measured errors of exact engines are ≤ 2e-6 on these models; a missed or
# unclipped parameter shows errors of 1e-3 and more.
FLOAT32_RTOL = 1e-4


def _device() -> torch.device:
    name = os.environ.get("DPEXP_TEST_DEVICE", "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"DPEXP_TEST_DEVICE={name!r} is invalid: cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DPEXP_TEST_DEVICE={name!r} is invalid: no CUDA device here")
    return device


def _dtype() -> torch.dtype:
    name = os.environ.get("DPEXP_TEST_DTYPE", "float64")
    if name not in DTYPES:
        raise ValueError(f"DPEXP_TEST_DTYPE={name!r} is invalid: {' or '.join(DTYPES)}")
    return DTYPES[name]


DEVICE = _device()
DTYPE = _dtype()


def configure() -> None:
    """Session set-up for a CUDA run: no TF32 in matrix products and convolutions."""
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def place(model: nn.Module, *tensors: torch.Tensor):
    """The model (in place) and tensors on the test device; floating ones in the test dtype.

    Returns the moved tensors (one tensor alone, or a tuple)."""
    model.to(device=DEVICE, dtype=DTYPE)
    moved = tuple(t.to(DEVICE, DTYPE) if t.is_floating_point() else t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def rtol(float64_rtol: float) -> float:
    """The relative tolerance of a comparison written for float64, in the test dtype."""
    return float64_rtol if DTYPE is torch.float64 else max(float64_rtol, FLOAT32_RTOL)


def atol(float64_atol: float, ref: torch.Tensor) -> float:
    """An elementwise absolute tolerance written for float64, in the test dtype: in float32
    relative to the reference's largest entry (cancellation leaves rounding of that size)."""
    if DTYPE is torch.float64:
        return float64_atol
    return max(float64_atol, FLOAT32_RTOL * float(ref.abs().max()))


def describe() -> str:
    return f"exactness tests on {DEVICE} in {str(DTYPE).removeprefix('torch.')}"
