"""A virtual environment holding what the GPU machine's Python holds and nothing else, for a
dry run of scripts/gpu_check.sh on a machine without a GPU (docs/gpu_check.md).

The distributions of :data:`GPU_IMAGE` that an existing environment has (the dev venv) are
linked into a fresh venv of that environment's Python; every other one, dpexp's own
dependencies of scripts/gpu_requirements.txt included, is missing until the check installs
its wheels offline, as it must on the GPU machine.

    python scripts/gpu_offline_env.py /tmp/gpu-env --source /work/main/.venv
    DEVICE=cpu PYTHON=/tmp/gpu-env/bin/python OUT=/tmp/gpucheck bash scripts/gpu_check.sh
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The Python packages of the GPU machine's image (the workplace's package list of that
# machine, read 2026-11-17; torch 2.11, Python 3.12).
_IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
"""
GPU_IMAGE = frozenset(_IMAGE.split())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def installed(site: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """For each distribution in ``site`` (canonical name): the entries of ``site`` it owns,
    and the distributions it requires (extras left out)."""
    owned: dict[str, set[str]] = {}
    requires: dict[str, set[str]] = {}
    for info in site.glob("*.dist-info"):
        meta = info / "METADATA"
        if not meta.is_file():
            continue
        lines = meta.read_text(errors="replace").splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Name:")), None)
        if name is None:
            continue
        requires[canonical(name)] = {
            canonical(re.split(r"[\s;<>=!~\[(]", ln.split(":", 1)[1].strip(), maxsplit=1)[0])
            for ln in lines
            if ln.startswith("Requires-Dist:") and "extra ==" not in ln
        }
        entries = {info.name}
        record = info / "RECORD"
        for line in record.open() if record.is_file() else ():
            first = Path(line.split(",", 1)[0]).parts[:1]
            if first and first[0] not in ("..", "__pycache__") and (site / first[0]).exists():
                entries.add(first[0])
        owned[canonical(name)] = entries
    return owned, requires


def closure(names: set[str], requires: dict[str, set[str]]) -> set[str]:
    """``names`` and everything they require, transitively (the image is consistent: what
    its packages need is there, whatever the list above names)."""
    done: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in done:
            done.add(name)
            todo.extend(requires.get(name, ()))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="the venv to create (replaced if present)")
    parser.add_argument("--source", type=Path, required=True, help="an environment to link from")
    args = parser.parse_args()
    source_python = args.source / "bin" / "python"
    if not source_python.is_file():
        sys.exit(f"gpu_offline_env: --source {args.source} is invalid: it has no bin/python")
    if args.target.exists():
        shutil.rmtree(args.target)
    subprocess.run(
        [str(source_python), "-m", "venv", "--without-pip", str(args.target)], check=True
    )
    source, target = site_packages(source_python), site_packages(args.target / "bin" / "python")
    owned, requires = installed(source)
    wanted = closure({canonical(n) for n in GPU_IMAGE} & set(owned), requires)
    linked = sorted(wanted & set(owned))
    for name in linked:
        for entry in owned[name]:
            if not (target / entry).exists():
                (target / entry).symlink_to(source / entry)
    missing = sorted(set(owned) - wanted)
    print(f"gpu_offline_env: {args.target}: {len(linked)} distributions linked from {source}")
    print(f"gpu_offline_env: left out (not on the GPU machine): {' '.join(missing)}")


if __name__ == "__main__":
    main()
