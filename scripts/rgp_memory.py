"""Per-sample state of one DP step: RGP carriers vs per-sample clipping of the full weights.

Measures the bytes of the per-sample gradients the ``per_sample`` engine (Opacus hooks)
materialises for a batch, divided by the batch size: p·d numbers per sample for every weight
under DP-SGD, r·(p + d) under RGP. Activations (the same for both) are not counted.

    python scripts/rgp_memory.py --model resnet_gn --ranks 1 4 8 16
"""

from __future__ import annotations

import argparse

import torch

from dpexp.clipping import make_engine
from dpexp.methods.rgp import RGP
from dpexp.models import build_model


def per_sample_bytes(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of per-sample gradient state per example, as materialised by the engine."""
    engine = make_engine("per_sample", model)
    with engine.attached_to_model():
        per_sample, _ = engine.per_sample_gradients(inputs, targets)
    total = sum(g.numel() * g.element_size() for g in per_sample.values())
    return total // len(targets)


def report(model_name: str, image_shape: tuple[int, ...], ranks: list[int], batch: int) -> str:
    torch.manual_seed(0)
    inputs = torch.randn(batch, *image_shape)
    targets = torch.randint(0, 10, (batch,))
    model = build_model(model_name, image_shape, 10)
    n_params = sum(p.numel() for p in model.parameters())
    full = per_sample_bytes(model, inputs, targets)
    rows = [
        f"| {model_name} {list(image_shape)} | per-sample clipping (DP-SGD) | "
        f"{n_params:,} | {full:,} | 1.000 |"
    ]
    for rank in ranks:
        model = build_model(model_name, image_shape, 10)
        method = RGP(rank=rank)
        method.setup_method(model, None)
        clipped = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rgp = per_sample_bytes(model, inputs, targets)
        rows.append(
            f"| {model_name} {list(image_shape)} | RGP rank {rank} | {clipped:,} | "
            f"{rgp:,} | {rgp / full:.3f} |"
        )
    header = [
        "| model | mode | per-sample coordinates | per-sample bytes per example | ratio |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_gn")
    parser.add_argument("--image-shape", type=int, nargs="+", default=[3, 32, 32])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(report(args.model, tuple(args.image_shape), args.ranks, args.batch))


if __name__ == "__main__":
    main()
