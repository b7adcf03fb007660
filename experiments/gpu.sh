#!/usr/bin/env bash
# The benchmark suite's one command for a GPU (one H200, about 8 minutes):
#
#   experiments/gpu.sh [--smoke] [OUT]          # or: make gpu
#
# Runs, each part in its own process with its own time limit, so that one failure loses
# nothing else (status.txt lists each part's exit code, <part>.log its output):
#   env        the machine, driver and versions
#   memory     training-step memory, jax (compiled analysis + device peak) and torch
#              (max_memory_allocated): Rev-ViT-B/L, Rev-Swin-B, Rev-MViT-B, Rev-RoBERTa-base,
#              every mode next to the standard twin and remat, two batch sizes
#   speed      samples/s at two batch sizes, both frameworks, then each method at its largest
#              batch in MAX_GIB (from the memory cells)
#   parity     the cross-framework gradient parity and the GPU speed-up checks (pytest)
#   compile    the H200 compile test of every family and mode (pytest)
#   overlap    the stream-overlap check of pareprop (jax.profiler / torch.profiler)
#   report     tables (report.md) and plots, from every cell above
#
# --smoke runs the same parts on CPU with the smallest configs (a few minutes), as CI can.
# Results: OUT (default results/gpu-<date>), cells in OUT/cells.jsonl.
set -u
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:-results/gpu-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$OUT/status.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ $SMOKE = 1 ]; then
  export JAX_PLATFORMS=cpu
  BACKEND=cpu; T=300; MAX_GIB=0.05
  MODELS=(vit-test); TEXT=(); BATCHES=(2 3); SIZE=(--size 32)
  TESTS_K="vit"
else
  BACKEND=gpu; T=90; MAX_GIB=${MAX_GIB:-100}
  MODELS=(vit-b vit-l swin-b mvit-b); TEXT=(roberta-base); BATCHES=(8 32); SIZE=()
  TESTS_K=""
fi
METHODS=(standard remat reprop pareprop)
BENCH=("$PY" -m experiments.bench --results "$OUT")

part() {  # part NAME LIMIT_S CMD...: run CMD with a time limit, log and record its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
}

part env 60 bash -c "nvidia-smi || echo 'no nvidia-smi (CPU)'; $PY -c '
import platform, jax, torch
print(platform.platform(), platform.python_version())
print(\"jax\", jax.__version__, jax.devices())
print(\"torch\", torch.__version__, torch.cuda.is_available())'"
for fw in jax torch; do
  part "memory-$fw" $T "${BENCH[@]}" memory --frameworks $fw --backend $BACKEND \
    --models "${MODELS[@]}" --methods "${METHODS[@]}" --batches "${BATCHES[@]}" "${SIZE[@]}"
  if [ ${#TEXT[@]} -gt 0 ]; then
    part "memory-$fw-text" 60 "${BENCH[@]}" memory --frameworks $fw --backend $BACKEND \
      --models "${TEXT[@]}" --methods "${METHODS[@]}" --batches "${BATCHES[@]}" --size 512
  fi
done
part speed $T "${BENCH[@]}" speed --frameworks jax torch --backend $BACKEND \
  --models "${MODELS[@]}" "${TEXT[@]}" --methods "${METHODS[@]}" --batches "${BATCHES[@]}" \
  "${SIZE[@]}" --warmup 2 --reps 5
part speed-max-batch $T "${BENCH[@]}" speed --frameworks jax torch --backend $BACKEND \
  --models "${MODELS[@]}" --methods "${METHODS[@]}" --max-batch-gib "$MAX_GIB" "${SIZE[@]}" \
  --warmup 1 --reps 3
part parity $T "$PY" -m pytest -q -x parity_tests/test_gpu.py parity_tests/test_parity.py \
  ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider
part compile $((T + 60)) "$PY" -m pytest -q tests/revjax/test_gpu_compile.py \
  ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider
if [ $SMOKE = 1 ]; then
  part overlap 120 "${BENCH[@]}" overlap --smoke --out "$OUT/overlap"
else
  part overlap 120 "${BENCH[@]}" overlap --out "$OUT/overlap"
fi
part report 60 "${BENCH[@]}" report
echo "results in $OUT (status.txt, report.md, *.png, *.log)"
! grep -qv " rc=0 " "$OUT/status.txt"
