"""Which timm families each clipping mode clips exactly, and which it refuses.

For tiny random configs of real timm architectures, every mode is

1. asked before training (``dpexp.clipping.check_supported`` with an example batch, as
   ``dpexp.validate`` does): refused → "refused", with the reason;
2. otherwise compared in float64 with one backward per sample (``tests/reference.py``), all
   parameters redrawn from N(0, 0.3²) so that none is negligible: norms and every
   parameter's clipped sum within 1e-9 → "exact", else "WRONG" with the largest error.

    python scripts/timm_coverage.py > docs/results/timm_coverage_table.md
    PYTHONPATH=<older checkout> python scripts/timm_coverage.py   # the same on older code
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.reference

from dpexp.clipping import MODES, check_supported, clip_and_sum
from dpexp.models import make_dp_compatible
from tests import reference

# family → (timm name, tiny kwargs, input shape)
VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", VIT, (3, 16, 16)),
    "deit": ("deit_tiny_patch16_224", VIT, (3, 16, 16)),
    "beit": ("beit_base_patch16_224", VIT, (3, 16, 16)),
    "eva02": ("eva02_tiny_patch14_224", VIT, (3, 16, 16)),
    "cait": ("cait_xxs24_224", {**VIT, "depth_token_only": 1}, (3, 16, 16)),
    "swinv2": (
        "swinv2_tiny_window8_256",
        {
            "img_size": 16,
            "patch_size": 2,
            "embed_dim": 8,
            "depths": (1, 1),
            "num_heads": (1, 2),
            "window_size": 4,
            "drop_path_rate": 0.0,
        },
        (3, 16, 16),
    ),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 8, 16, 16)}, (3, 32, 32)),
    "resnet": ("resnet18", {"layers": (1, 1, 1, 1)}, (3, 32, 32)),
}


def verdict(family: str, mode: str) -> str:
    import timm

    name, kwargs, shape = FAMILIES[family]
    model = make_dp_compatible(timm.create_model(name, pretrained=False, num_classes=3, **kwargs))
    example = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    try:
        try:
            check_supported(model, mode, example, 3)
        except TypeError:  # older dpexp: check_supported(model, mode)
            check_supported(model, mode)
    except Exception as exc:
        return f"refused: {str(exc).splitlines()[0][:110]}"
    model = model.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    x, y = example.double(), torch.tensor([0, 1, 2])
    _, norms = reference.clipped_sum(model, x, y, 1e9)
    clip = float(norms.median())
    ref_sums, ref_norms = reference.clipped_sum(model, x, y, clip)
    try:
        sums, got = clip_and_sum(model, x, y, clip, mode=mode)
    except Exception as exc:
        return f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    norm_err = float(((got - ref_norms).abs() / ref_norms).max())
    # a gradient that is zero in exact arithmetic (an attention key's bias) is rounding noise
    floor = 1e-6 * sum(float(r.norm()) for r in ref_sums.values())
    sum_err, worst = max(
        (float((sums[n] - r).norm()) / max(float(r.norm()), floor), n) for n, r in ref_sums.items()
    )
    if max(norm_err, sum_err) <= 1e-9:
        return "exact"
    return f"WRONG: norms {norm_err:.1e}, sums {sum_err:.1e} ({worst})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print("| family (timm model) | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    start = time.perf_counter()
    for family in args.families:
        cells = [verdict(family, mode) for mode in MODES]
        print(f"| {family} (`{FAMILIES[family][0]}`) | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
