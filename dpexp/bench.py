"""Benchmark of clipping modes: step time and peak step memory against non-private training.

    python -m dpexp.bench model=cnn_tanh dataset=mnist dataset.batch_size=256
    python -m dpexp.bench --table outputs/bench/*/bench.csv     # Markdown table of runs

Every mode runs the real training step (:class:`~dpexp.privacy.step.GradientStep`: clipped
sum, noise, SGD step; non-private: mean gradient, SGD step) on one random batch of exactly
``dataset.batch_size`` examples of the dataset's shape (its files are never read). After
``bench.warmup`` steps per mode, ``bench.repeats`` rounds run every mode once, interleaved
(A B A B ...), and the median step time is reported. Engines are attached and detached outside
the timed region.

Peak memory: one more step per mode. On the CPU, under ``torch.profiler`` with
``profile_memory``: the running sum of every tensor allocation and free in time order gives the
peak of bytes live during the step above what was live before it (model, optimizer state and
the batch are not counted); tensors from torch's CPU allocator only, not Python objects or the
allocator's own caching. On CUDA (``bench.device=cuda``) the same quantity from the caching
allocator's statistics: ``max_memory_allocated`` during the step minus ``memory_allocated``
before it; step times are taken between ``torch.cuda.synchronize`` calls.

``bench.autocast=bf16`` runs every step (non-private too) under ``torch.autocast`` with
bfloat16: parameters, their gradients, the clipped sum and the noise stay float32. The fast
engines compute per-sample norms and clipped sums in float32 from the bfloat16 layer inputs
and output gradients (autocast off there); Opacus' hooks and torch.func follow autocast, and
the step casts their sums to float32 before the noise.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from torch.profiler import ProfilerActivity, profile

from dpexp.accounting import Ledger
from dpexp.clipping import MODES, ClippingEngine, make_engine, trainable_parameters
from dpexp.privacy.step import GradientStep
from dpexp.train import CONFIG_DIR

NON_PRIVATE = "non_private"
CPU = torch.device("cpu")
FIELDS = [
    "model", "clipping", "batch_size", "device", "precision",
    "step_ms", "peak_mem_mb", "time_ratio", "mem_ratio",
]  # fmt: skip
AUTOCAST = {None: None, "bf16": torch.bfloat16}


class OpacusGhostEngine(ClippingEngine):
    """Opacus' fast gradient clipping (ghost norms where it has a norm sampler), as its
    ``DPTensorFastGradientClipping.backward`` does it: a backward for the norms, a second one
    of the reweighted per-sample losses. For comparison only (not a training mode)."""

    mode = "opacus_ghost"

    def attach(self) -> None:
        self._hooks = GradSampleHooksFastGradientClipping(
            self.model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0
        )
        super().attach()

    def detach(self) -> None:
        self._hooks.cleanup()
        super().detach()

    def _clipped_sum(self, inputs, targets, max_grad_norm, weights=None):
        params = trainable_parameters(self.model)
        self._hooks.max_grad_norm = max_grad_norm
        self._hooks.enable_hooks()
        losses = F.cross_entropy(self.model(inputs), targets, reduction="none")
        losses.sum().backward(retain_graph=True)
        coeff = self._hooks.get_clipping_coef()
        norms = self._hooks.per_sample_gradient_norms
        for _, p in params:
            p.grad = None
        self._hooks.disable_hooks()
        (coeff * losses).sum().backward()
        sums = {n: p.grad for n, p in params}
        for _, p in params:
            p.grad = None
        return sums, norms, losses.sum().detach()


class OpacusFunctorchEngine(ClippingEngine):
    """Opacus' hooks with ``force_functorch=True`` (per-sample gradients of every layer by
    torch.func), then flat clipping. For comparison only."""

    mode = "opacus_functorch"

    def attach(self) -> None:
        self._hooks = GradSampleHooks(
            self.model, batch_first=True, loss_reduction="sum", force_functorch=True
        )
        super().attach()

    def detach(self) -> None:
        self._hooks.cleanup()
        super().detach()

    def _clipped_sum(self, inputs, targets, max_grad_norm, weights=None):
        from dpexp.clipping import clip_materialized

        params = trainable_parameters(self.model)
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        per_sample = {n: p.grad_sample for n, p in params}
        for _, p in params:
            p.grad, p.grad_sample = None, None
        sums, norms = clip_materialized(per_sample, max_grad_norm, weights)
        return sums, norms, loss.detach()


OPACUS = {e.mode: e for e in (OpacusGhostEngine, OpacusFunctorchEngine)}


def make_bench_engine(mode: str, model: torch.nn.Module) -> ClippingEngine:
    return OPACUS[mode](model) if mode in OPACUS else make_engine(mode, model)


class Contender:
    """One mode's training step on a shared model; engine attached only while it runs."""

    def __init__(
        self, mode: str, model, optimizer, batch_size: int, sigma: float,
        device: torch.device = CPU, autocast: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        self.mode = mode
        self.optimizer = optimizer
        self.device, self.autocast = device, autocast
        self.engine = None if mode == NON_PRIVATE else make_bench_engine(mode, model)
        kwargs = {}
        if self.engine is not None:
            kwargs = {
                "engine": self.engine,
                "noise_multiplier": sigma,
                "max_grad_norm": 1.0,
                "expected_batch_size": batch_size,
                "sample_rate": 0.01,
                "ledger": Ledger(1e-5),
                "noise_generator": torch.Generator(device=device).manual_seed(0),
            }
        self.step = GradientStep(model, **kwargs)

    def run(self, batch, measure: Callable[[Callable[[], None], torch.device], float]) -> float:
        if self.engine is not None:
            self.engine.attach()

        def step() -> None:
            with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
                self.step(batch, self.optimizer)

        try:
            return measure(step, self.device)
        finally:
            if self.engine is not None:
                self.engine.detach()
            self.optimizer.zero_grad(set_to_none=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], None], device: torch.device = CPU) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def peak_mb(fn: Callable[[], None], device: torch.device = CPU) -> float:
    """Peak of tensor bytes live during ``fn`` above those live before it (profiler events;
    on CUDA the caching allocator's statistics)."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = top = 0
    for _, delta in changes:
        live += delta
        top = max(top, live)
    return top / 2**20


def bench_device(cfg: DictConfig) -> torch.device:
    name = cfg.bench.get("device") or "cpu"
    if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()):
        from dpexp.errors import ConfigError

        allowed = "cpu or cuda" if torch.cuda.is_available() else "cpu (no CUDA device here)"
        raise ConfigError(f"bench.device={name!r} is invalid: {allowed}")
    return torch.device(name)


def bench_autocast(cfg: DictConfig) -> torch.dtype | None:
    name = cfg.bench.get("autocast")
    if name not in AUTOCAST:
        from dpexp.errors import ConfigError

        raise ConfigError(f"bench.autocast={name!r} is invalid: null (float32) or bf16")
    return AUTOCAST[name]


def model_label(cfg: DictConfig) -> str:
    name = cfg.model.name
    return f"{name}:{cfg.model.model_name}" if name == "timm" else name


def benchmark(cfg: DictConfig) -> list[dict]:
    """Measure every mode of ``cfg.bench.modes`` and non-private training; one row each."""
    if cfg.bench.threads:
        torch.set_num_threads(int(cfg.bench.threads))
    torch.manual_seed(cfg.seed)
    modes = [NON_PRIVATE, *cfg.bench.modes]
    unknown = [m for m in modes[1:] if m not in MODES and m not in OPACUS]
    if unknown:
        from dpexp.errors import ConfigError

        raise ConfigError(
            f"bench.modes={unknown!r} is invalid: choose from {', '.join((*MODES, *OPACUS))}"
        )
    device, autocast = bench_device(cfg), bench_autocast(cfg)
    model = instantiate(cfg.model).to(device)
    model.train()
    optimizer = instantiate(cfg.optimizer)(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4
    )
    size = int(cfg.dataset.batch_size)
    x = torch.randn(size, *cfg.dataset.image_shape, device=device)
    if (features := getattr(model, "fixed_features", None)) is not None:
        x = features(x)  # as training sees it: the data module computes these once
    y = torch.randint(0, int(cfg.dataset.num_classes), (size,), device=device)
    sigma = float(cfg.bench.noise_multiplier)
    contenders = [Contender(m, model, optimizer, size, sigma, device, autocast) for m in modes]
    for _ in range(int(cfg.bench.warmup)):
        for c in contenders:
            c.run((x, y), wall_ms)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(int(cfg.bench.repeats)):
        for c in contenders:
            times[c.mode].append(c.run((x, y), wall_ms))
    memory = {c.mode: c.run((x, y), peak_mb) for c in contenders}
    base_ms = statistics.median(times[NON_PRIVATE])
    rows = []
    for mode in modes:
        step_ms = statistics.median(times[mode])
        rows.append(
            {
                "model": model_label(cfg),
                "clipping": mode,
                "batch_size": size,
                "device": device.type,
                "precision": cfg.bench.get("autocast") or "fp32",
                "step_ms": round(step_ms, 2),
                "peak_mem_mb": round(memory[mode], 2),
                "time_ratio": round(step_ms / base_ms, 3),
                "mem_ratio": round(memory[mode] / max(memory[NON_PRIVATE], 1e-9), 3),
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    """Rows of several runs as one Markdown table."""
    lines = [
        "| model | clipping | B | step ms | × non-private | peak step MB | × non-private |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        # CSVs written before bench.device / bench.autocast existed: CPU, float32
        notes = [r.get("device") or "cpu", r.get("precision") or "fp32"]
        notes = [n for n in notes if n not in ("cpu", "fp32")]
        notes = [f"{n} autocast" if n == "bf16" else n for n in notes]
        model = f"{r['model']} ({', '.join(notes)})" if notes else r["model"]
        lines.append(
            f"| {model} | {r['clipping']} | {r['batch_size']} | {float(r['step_ms']):.1f} "
            f"| {float(r['time_ratio']):.2f} | {float(r['peak_mem_mb']):.1f} "
            f"| {float(r['mem_ratio']):.2f} |"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def hydra_main(cfg: DictConfig) -> None:
    rows = benchmark(cfg)
    for row in rows:
        print(json.dumps({k: row[k] for k in FIELDS}), flush=True)
    out = Path(HydraConfig.get().runtime.output_dir) / "bench.csv"
    write_csv(rows, out)
    print(f"csv: {out}", file=sys.stderr)


def main() -> None:
    """``--table a.csv b.csv ...`` prints the Markdown table of finished runs."""
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        rows = []
        for path in sys.argv[2:]:
            with open(path, newline="") as f:
                rows.extend(csv.DictReader(f))
        print(markdown_table(rows))
        return
    hydra_main()


if __name__ == "__main__":
    main()
