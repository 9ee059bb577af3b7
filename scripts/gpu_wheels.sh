#!/usr/bin/env bash
# Wheels of scripts/gpu_requirements.txt for the GPU machine's Python 3.12, into
# scripts/gpu_wheels/ (git-ignored; carried with the check, 64 MiB at most). Needs a package
# index; the GPU machine has none. `make gpu-wheels`.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_WHEELS:-scripts/gpu_wheels}
PY=${PY:-python3}
LIMIT_MB=64
mapfile -t PACKAGES < <(grep -v '^\s*\(#\|$\)' scripts/gpu_requirements.txt)
rm -rf "$DIR"
mkdir -p "$DIR"
for spec in "${PACKAGES[@]}"; do
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp -d "$DIR" "$spec" 2>/dev/null; then
    # antlr4-python3-runtime 4.9.3 has no wheel on the index: built here (pure Python)
    "$PY" -m pip wheel --quiet --no-deps -w "$DIR" "$spec"
  fi
done
for whl in "$DIR"/*.whl; do
  case "$whl" in
    *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*.whl | *-abi3-*.whl) ;;
    *) echo "gpu_wheels: $whl does not install on CPython 3.12" >&2; exit 1 ;;
  esac
done
size=$(du -sm "$DIR" | cut -f1)
ls -1 "$DIR"
echo "gpu_wheels: ${#PACKAGES[@]} packages, $(du -sh "$DIR" | cut -f1) in $DIR"
if (( size > LIMIT_MB )); then
  echo "gpu_wheels: $DIR is over $LIMIT_MB MiB, the most that travels to the GPU machine" >&2
  exit 1
fi
