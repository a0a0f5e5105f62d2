#!/usr/bin/env bash
# The scorer's GPU checks in one short run: the CUDA tests, the latency curve of the served network
# on the GPU in bfloat16 (the issue's target: p50 <= 10 ms for 8 candidates), and whether stacking
# concurrent requests into one pass pays there (it does not on the CPU: docs/benchmarks.md).
#
# The GPU machine needs torch and transformers, not the backbone packages: the network is built over
# random backbone weights from a bundle of configs and tokenizers (bench/backbone_bundle.py), which
# times exactly what the trained weights would (docs/benchmarks.md, "On a GPU"). Prepare the bundle
# where the backbones are installed, then run this from the repository root on the GPU machine:
#
#     .venv/bin/python bench/backbone_bundle.py .device/bundle      # here, once (4 MB)
#     bash bench/cuda_check.sh                                       # there; results in $OUT
#
# .device/ is ignored by git: a copy of the tree sent to another machine holds it only if it is
# named to travel with it (docs/benchmarks.md gives the whole call), and such a copy may hold no
# .git either: COMMIT names the tree's commit in env.txt (`COMMIT=$(git rev-parse --short HEAD)`,
# taken before it is sent).
#
# Settings (environment): OUT (results folder, default runs/cuda_check), PYTHON (default python3),
# BUNDLE (default .device/bundle), DEVICE (default cuda; cpu runs the same steps on the CPU, which
# is how the test suite checks this script), REPEATS, CANDIDATES, BATCHES, COMMIT. A step that fails
# is reported at the end (the first failure's status is the script's), and the steps after it
# still run: a machine lent for minutes gives back every figure it could take.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/cuda_check}
PYTHON=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.device/bundle}
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-30}
CANDIDATES=${CANDIDATES:-2,5,8,10,20}
BATCHES=${BATCHES:-1,2,4,8,16}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
[ -f "$BUNDLE/bundle.json" ] || { echo "no bundle at $BUNDLE: run bench/backbone_bundle.py $BUNDLE first" >&2; exit 2; }

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PYTHON" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/env.txt"

failed=()  # "step (exit N)", in order
first=0
step() {  # step NAME COMMAND...: run it; a failure is noted, and the next step runs
  local name=$1 rc=0
  shift
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    failed+=("$name (exit $rc)")
    [ "$first" -ne 0 ] || first=$rc
  fi
}
gpu_tests() {
  "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/scorer/test_inference.py tests/scorer/test_training.py \
    2>&1 | tee "$OUT/pytest_gpu.txt"
}

if [ "$DEVICE" = cuda ]; then
  # the tests marked gpu: the tiny network scores on CUDA in bfloat16 as on the CPU, and a training
  # step runs there and saves CPU tensors (they skip, and say so, where there is no CUDA)
  step "the GPU tests ($OUT/pytest_gpu.txt)" gpu_tests
fi
step "the latency curve" "$PYTHON" bench/scorer_latency.py --bundle "$BUNDLE" --device "$DEVICE" \
  --candidates "$CANDIDATES" --repeats "$REPEATS" --json "$OUT/scorer_latency_$DEVICE.json" \
  --plot "$OUT/scorer_latency_$DEVICE.png"
# the same with every one of the 256 instruction tokens read (the checkpoint reads 64)
step "the latency curve at 256 tokens" "$PYTHON" bench/scorer_latency.py --bundle "$BUNDLE" --device "$DEVICE" \
  --candidates "$CANDIDATES" --repeats "$REPEATS" --instruction-budget 256 \
  --json "$OUT/scorer_latency_${DEVICE}_256.json"
step "the stacked requests" "$PYTHON" bench/batch_requests.py --bundle "$BUNDLE" --device "$DEVICE" \
  --batches "$BATCHES" --candidates 8 --repeats "$(( REPEATS < 10 ? REPEATS : 10 ))" \
  --json "$OUT/batch_requests_$DEVICE.json"
if [ "${#failed[@]}" -ne 0 ]; then
  printf 'cuda_check: failed: %s; the other results in %s\n' "$(IFS=';'; echo "${failed[*]}")" "$OUT" >&2
  exit "$first"
fi
echo "cuda_check: done; results in $OUT"
