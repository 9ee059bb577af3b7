#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md). Within one time budget, on one CUDA device:
#   install  dpexp's dependencies that the machine lacks, offline, from scripts/gpu_wheels/
#   env      versions, the device, TF32 flags; dpexp imports
#   tests    the clipping exactness tests on the device, float64 and float32
#   train    a short CIFAR-shaped synthetic DP training (resnet_gn, clipping=auto, probe on)
#   bench    dpexp.bench for resnet_gn and ViT-tiny at B=256, float32 and bf16 autocast
# and writes, under $OUT (at most 8 files come back from the GPU machine): summary.md,
# check.log (every stage's output), env.txt, bench.csv, train_result.json.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh                   # on the GPU machine
#   DEVICE=cpu OUT=/tmp/gpucheck bash scripts/gpu_check.sh   # dry run here, tiny sizes
#
# DEVICE (cuda; cpu: tiny sizes), PYTHON (python3), WHEELS (scripts/gpu_wheels), INSTALL (1;
# 0 skips the install when the dependencies are importable already), BUDGET (480 s for the
# whole check, 900 in the dry run; each stage also has its own cap), WORK (scratch dir,
# default a new /tmp one).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$(date +%s)

DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-scripts/gpu_wheels}
INSTALL=${INSTALL:-1}
# the GPU machine's 10 minutes, less its transfers; the dry run's bf16 is emulated (slow)
BUDGET=${BUDGET:-$([[ $DEVICE == cpu ]] && echo 900 || echo 480)}

fail() {
  echo "gpu_check: error: $*" >&2
  exit 2
}
[[ -n ${OUT:-} ]] || fail "OUT is unset: name the folder the results are written to"
case $DEVICE in cpu | cuda) ;; *) fail "DEVICE=$DEVICE is invalid: cuda, or cpu (dry run)" ;; esac
case $INSTALL in 0 | 1) ;; *) fail "INSTALL=$INSTALL is invalid: 1 (install the wheels) or 0" ;; esac
[[ $BUDGET =~ ^[0-9]+$ ]] && ((BUDGET >= 60)) || fail "BUDGET=$BUDGET is invalid: seconds, >= 60"
command -v "$PYTHON" >/dev/null || fail "PYTHON=$PYTHON is invalid: no such command"
WHEEL_FILES=()
if ((INSTALL)); then
  while read -r spec; do
    name=${spec%%==*} version=${spec#*==}
    file=$(compgen -G "$WHEELS/$(echo "$name" | tr 'A-Z.-' 'a-z__')-$version-*.whl" | head -1) ||
      fail "WHEELS=$WHEELS is invalid: no wheel of $spec (make gpu-wheels), or INSTALL=0"
    WHEEL_FILES+=("$file")
  done < <(grep -v '^\s*\(#\|$\)' scripts/gpu_requirements.txt)
fi
mkdir -p "$OUT"
WORK=${WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$WORK"
LOG=$OUT/check.log
STAGES=$WORK/stages.md
: >"$LOG"
: >"$STAGES"
DEADLINE=$((START + BUDGET))
RESERVE=15 # seconds kept for the summary
FAILED=0

# stage NAME CAP CMD...: CMD under `timeout`, capped by what is left of the budget; its
# output goes to $WORK/NAME.log and check.log; its status to the summary. Never aborts.
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  ((cap <= left)) || cap=$left
  if ((cap < 10)); then
    echo "| $name | skipped: budget spent | 0 |" >>"$STAGES"
    FAILED=1
    return 0
  fi
  local t0 rc=0 status
  t0=$(date +%s)
  timeout --kill-after=5 "$cap" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status="timed out after ${cap} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  ((rc == 0)) || FAILED=1
  {
    echo "===== $name: $status, $(($(date +%s) - t0)) s: $*"
    cat "$WORK/$name.log"
  } >>"$LOG"
  echo "| $name | $status | $(($(date +%s) - t0)) |" >>"$STAGES"
}

# -- sizes ---------------------------------------------------------------------------------
if [[ $DEVICE == cuda ]]; then
  TRAINER=gpu SHAPE=3x32x32
  TRAIN_DATA=(dataset.size=8192 dataset.synthetic_test_size=1024 dataset.batch_size=256)
  TRAIN_EPOCHS=2
  BENCH_SIZE=(dataset.batch_size=256)
  BENCH_ROUNDS=(bench.warmup=2 bench.repeats=5)
  TEST_SELECT=(-k "not leaves_training_unchanged") # a CPU training twice, device-independent
  CAP_TESTS=150 CAP_TRAIN=120 CAP_BENCH=110
else # dry run: every stage, tiny
  TRAINER=cpu SHAPE=3x16x16
  TRAIN_DATA=(dataset.size=128 dataset.synthetic_test_size=64 dataset.batch_size=32
    "dataset.image_shape=[3,16,16]")
  TRAIN_EPOCHS=1
  BENCH_SIZE=(dataset.batch_size=4 "dataset.image_shape=[3,16,16]")
  BENCH_ROUNDS=(bench.warmup=1 bench.repeats=1)
  TEST_SELECT=(-k "cnn_tanh_all_modes or test_mlp or tied_weights or eval_mode or passes_well")
  CAP_TESTS=150 CAP_TRAIN=120 CAP_BENCH=240
fi

# -- install -------------------------------------------------------------------------------
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
if ((INSTALL)); then
  stage install 60 "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile \
    --no-cache-dir --disable-pip-version-check --target "$WORK/site" "${WHEEL_FILES[@]}"
  export PYTHONPATH=$REPO:$WORK/site # dpexp from this tree, then the installed wheels
else
  echo "| install | skipped (INSTALL=0) | 0 |" >>"$STAGES"
fi

# -- env -----------------------------------------------------------------------------------
stage env 60 "$PYTHON" scripts/gpu_env.py "$DEVICE"
if [[ -f $WORK/env.log ]]; then cp "$WORK/env.log" "$OUT/env.txt"; fi

# -- exactness tests -----------------------------------------------------------------------
TEST_FILES=(tests/test_clipping_modes.py tests/test_param_coverage.py
  tests/test_clipping_edges.py tests/test_verify.py)
for dtype in float64 float32; do
  stage "tests_$dtype" "$CAP_TESTS" env DPEXP_TEST_DEVICE="$DEVICE" DPEXP_TEST_DTYPE="$dtype" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "${TEST_SELECT[@]}" "${TEST_FILES[@]}"
done

# -- DP training ---------------------------------------------------------------------------
stage train "$CAP_TRAIN" "$PYTHON" -m dpexp.train model=resnet_gn dataset=synthetic \
  "${TRAIN_DATA[@]}" trainer="$TRAINER" trainer.max_epochs="$TRAIN_EPOCHS" \
  trainer.enable_progress_bar=false logger=none clipping=auto "hydra.run.dir=$WORK/train"
if [[ -f $WORK/train/result.json ]]; then cp "$WORK/train/result.json" "$OUT/train_result.json"; fi

# -- benchmark -----------------------------------------------------------------------------
BENCH_CSVS=()
for model in resnet_gn vit_tiny; do
  case $model in
    resnet_gn) MODEL=(model=resnet_gn) ;;
    vit_tiny) MODEL=(model=timm +model.patch_size=4) ;;
  esac
  for precision in fp32 bf16; do
    autocast=null
    [[ $precision == bf16 ]] && autocast=bf16
    dir=$WORK/bench/${model}_$precision
    stage "bench_${model}_$precision" "$CAP_BENCH" "$PYTHON" -m dpexp.bench "${MODEL[@]}" \
      dataset=synthetic "${BENCH_SIZE[@]}" "${BENCH_ROUNDS[@]}" bench.device="$DEVICE" \
      bench.autocast="$autocast" "hydra.run.dir=$dir"
    if [[ -f $dir/bench.csv ]]; then BENCH_CSVS+=("$dir/bench.csv"); fi
  done
done
if ((${#BENCH_CSVS[@]})); then
  {
    head -1 "${BENCH_CSVS[0]}"
    for f in "${BENCH_CSVS[@]}"; do tail -n +2 "$f"; done
  } >"$OUT/bench.csv"
fi

# -- summary -------------------------------------------------------------------------------
{
  echo "# dpexp GPU check ($DEVICE), $(date -u +'%Y-%m-%d %H:%M UTC')"
  echo
  grep -E '^(device|torch|python|tf32:) ' "$WORK/env.log" | sed 's/^/    /' || true
  echo
  echo "| stage | status | s |"
  echo "|---|---|---:|"
  cat "$STAGES"
  echo
  echo "Total: $(($(date +%s) - START)) s of a budget of $BUDGET s."
  for dtype in float64 float32; do
    if [[ -f $WORK/tests_$dtype.log ]]; then
      echo
      echo "Exactness tests, $DEVICE, $dtype: $(grep -E '(passed|failed|error)' \
        "$WORK/tests_$dtype.log" | tail -1 | tr -d '=')"
      grep -E '^(FAILED|ERROR) ' "$WORK/tests_$dtype.log" | sed 's/^/    /' || true
    fi
  done
  if [[ -f $OUT/train_result.json ]]; then
    echo
    echo "DP training (resnet_gn, synthetic $SHAPE, $DEVICE):"
    "$PYTHON" -c '
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("test_acc", "epsilon", "delta", "noise_multiplier", "steps", "clipping", "wall_s")
print("    " + " ".join(f"{k}={r[k]}" for k in keys))
print("    clipping_probe:", json.dumps(r.get("clipping_probe")))' "$OUT/train_result.json" || true
    grep -h -E 'GPU available|used: (True|False)' "$WORK/train.log" | sed 's/^/    /' || true
  fi
  if ((${#BENCH_CSVS[@]})); then
    echo
    echo "Clipping benchmark ($DEVICE; step time and peak step memory against non-private):"
    echo
    "$PYTHON" -m dpexp.bench --table "${BENCH_CSVS[@]}" || true
  fi
} >"$OUT/summary.md" 2>>"$LOG"
cat "$OUT/summary.md"
exit "$FAILED"
