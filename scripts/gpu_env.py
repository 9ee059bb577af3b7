"""What the GPU check ran on (scripts/gpu_check.sh, its env stage): the machine, the device,
the TF32 flags, the versions of dpexp's dependencies, and that dpexp imports.

    python scripts/gpu_env.py cuda
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import subprocess
import sys

import torch

PACKAGES = (
    "torch", "torchvision", "lightning", "timm", "opacus", "hydra-core", "omegaconf",
    "antlr4-python3-runtime", "kymatio", "safetensors", "numpy", "scipy", "pandas", "pytest",
)  # fmt: skip


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print("machine", platform.platform(), platform.machine())
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
    print("python", platform.python_version(), sys.executable)
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_env: error: DEVICE=cuda but torch sees no CUDA device")
        print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
        print(
            "tf32: cudnn.allow_tf32", torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision", torch.get_float32_matmul_precision(),
        )  # fmt: skip
    for name in PACKAGES:
        try:
            print("package", name, md.version(name))
        except md.PackageNotFoundError:
            print("package", name, "MISSING")
    import dpexp.bench
    import dpexp.train  # every later stage imports these

    print("dpexp", dpexp.__file__)


if __name__ == "__main__":
    main()
