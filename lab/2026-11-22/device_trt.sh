#!/bin/bash
# Engine-side checks on the lent GPU with the TensorRT 8.6 kit (../shared/trt86/README.md says how to stage it).
# From the repository root, in the same device call as (or a later warm call after) the kit staging:
#
#   test -f /opt/trt86/.ready && source /opt/trt86/env.sh && bash lab/2026-11-22/device_trt.sh [options] [MODEL.onnx ...]
#
# options:
#   --tokens FILE           token file (.npz from `sq-export tokens`) for comparisons and perplexity
#   --batch MIN:OPT:MAX     engine profile batch range (default 1:1:4)
#   --seq MIN:OPT:MAX       engine profile sequence range (default 1:128:512; must cover the token chunk length)
#   --bench FP16.onnx INT8.onnx   also run tools/bench_trt.py on these two graphs
#   --skip-tests            do not run the test suite
#
# Steps, each logged to $OUT (the device tool's result folder; ./device_out when unset):
#   1. the engine tests (tests/test_engine_*.py) with $TRTPY: pytest is not in the kit, so $TRTPY -m pytest --noconftest
#      runs them (it uses pytest instead when one is importable)                  -> tests.log
#   2. every MODEL.onnx built into an engine: INT8 when the graph holds Q/DQ nodes, FP16 otherwise
#                                                                                 -> NAME.build.json/.log, engines/
#   3. with --tokens: each engine compared with its own ONNX graph, and (with 2+ models) every engine and graph
#      against the first graph, with perplexity                                   -> compare_*.json/.log
#   4. with --bench: FP16 vs INT8 speed and size                                  -> bench_trt.json/.log
# Exit status: 0 when every step passed, else the number of failed steps (capped at 100).
set -uo pipefail
cd "$(dirname "$0")/.."
source lab/2026-11-22/device_lib.sh

if [ -z "${TRTPY:-}" ]; then
  if [ -f /opt/trt86/env.sh ]; then source /opt/trt86/env.sh; else
    echo "device_trt: \$TRTPY is not set and /opt/trt86/env.sh is missing: stage the TensorRT kit first" >&2; exit 3
  fi
fi
OUT=${OUT:-./device_out}
mkdir -p "$OUT/engines"
export PYTHONPATH=".:tests${PYTHONPATH:+:$PYTHONPATH}"

TOKENS="" BATCH="1:1:4" SEQ="1:128:512" BENCH=() SKIP_TESTS=0 MODELS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) TOKENS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --bench) BENCH=("$2" "$3"); shift 3 ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) MODELS+=("$1"); shift ;;
  esac
done

# sq-export with only the torch-free engine subcommands (the device's kit Python has no torch).
sqx() { "$TRTPY" -m sq_export "$@"; }   # the CLI builds its parser without torch

# the readable table of a compare --json report (its last line); the log's tail when there is none
table() { compare_table "$1" 2>/dev/null || tail -n 5 "${1%.json}.log"; }

FAILED=0
step() { echo; echo "=== $* ==="; }

{
  echo "date: $(date -u +%FT%TZ)"
  "$TRTPY" -c 'import sys, tensorrt, polygraphy, onnx, onnxruntime, numpy; print("python", sys.version.split()[0], "| tensorrt", tensorrt.__version__, "| polygraphy", polygraphy.__version__, "| onnx", onnx.__version__, "| onnxruntime", onnxruntime.__version__, "| numpy", numpy.__version__)'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

if [ "$SKIP_TESTS" = 0 ]; then
  step "engine tests ($TRTPY $TRTPY -m pytest --noconftest)"
  "$TRTPY" $TRTPY -m pytest --noconftest tests/test_engine_*.py 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "tests: FAILED (rc $rc)"; FAILED=$((FAILED + 1)); }
fi

ENGINES=()
for m in "${MODELS[@]}"; do
  name=$(basename "$m" .onnx)
  prec=$("$TRTPY" -c 'import sys; from sq_export.engine.trt_compat import graph_facts; print("int8" if graph_facts(sys.argv[1]).has_qdq else "fp16")' "$m" 2>>"$OUT/$name.build.log") \
    || { echo "$m: cannot read the graph (see $OUT/$name.build.log)"; FAILED=$((FAILED + 1)); ENGINES+=(""); continue; }
  eng="$OUT/engines/$name.$prec.engine"
  step "build $m -> $eng ($prec, batch $BATCH, seq $SEQ)"
  sqx -v build "$m" -o "$eng" --precision "$prec" --batch "$BATCH" --seq "$SEQ" --timing-cache "$OUT/engines/timing.cache" --json \
    > "$OUT/$name.build.json" 2> "$OUT/$name.build.log"
  rc=$?
  tail -n 5 "$OUT/$name.build.log"
  if [ "$rc" = 0 ]; then
    "$TRTPY" -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print("built", d["engine"], d["engine_bytes"], "bytes in", d["build_seconds"], "s; layers", d["layer_precisions"].get("precision_counts")); [print("  note:", n) for n in d["plan"]["notes"]]' "$OUT/$name.build.json"
    ENGINES+=("$eng")
  else
    echo "build $m: FAILED (rc $rc, see $OUT/$name.build.log)"; FAILED=$((FAILED + 1)); ENGINES+=("")
  fi
done

if [ -n "$TOKENS" ] && [ "${#MODELS[@]}" -gt 0 ]; then
  for i in "${!MODELS[@]}"; do
    m=${MODELS[$i]}; eng=${ENGINES[$i]}; name=$(basename "$m" .onnx)
    [ -n "$eng" ] || continue
    step "compare $m (ONNX Runtime) vs $eng"
    sqx compare "$m" "$eng" --tokens "$TOKENS" --batches 4 --json > "$OUT/compare_$name.json" 2> "$OUT/compare_$name.log"
    rc=$?
    table "$OUT/compare_$name.json" | tee -a "$OUT/compare_$name.log"
    [ "$rc" = 0 ] || { echo "compare $name: rc $rc"; FAILED=$((FAILED + 1)); }
  done
  if [ "${#MODELS[@]}" -gt 1 ]; then
    all=("${MODELS[0]}")
    for i in "${!MODELS[@]}"; do
      [ "$i" = 0 ] || all+=("${MODELS[$i]}")
      [ -n "${ENGINES[$i]}" ] && all+=("${ENGINES[$i]}")
    done
    step "compare all against ${MODELS[0]}, with perplexity"
    sqx compare "${all[@]}" --tokens "$TOKENS" --batches "${BATCHES:-4}" --perplexity --min-cosine -1 --min-top1 0 --json \
      > "$OUT/compare_all.json" 2> "$OUT/compare_all.log"
    rc=$?
    table "$OUT/compare_all.json" | tee -a "$OUT/compare_all.log"
    [ "$rc" = 0 ] || { echo "compare all: rc $rc"; FAILED=$((FAILED + 1)); }
  fi
elif [ "${#MODELS[@]}" -gt 0 ]; then
  echo; echo "(no --tokens FILE: engines built, comparisons skipped)"
fi

if [ "${#BENCH[@]}" = 2 ]; then
  step "bench FP16 ${BENCH[0]} vs INT8 ${BENCH[1]}"
  "$TRTPY" tools/bench_trt.py "${BENCH[0]}" "${BENCH[1]}" --workdir "$OUT/engines" --json "$OUT/bench_trt.json" 2>&1 | tee "$OUT/bench_trt.log"
  rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "bench: FAILED (rc $rc)"; FAILED=$((FAILED + 1)); }
fi

echo; echo "device_trt: $FAILED failed step(s); results in $OUT"
rm -f "$OUT/engines/"*.engine  # engines are large; the JSON sidecars and logs stay
exit $((FAILED > 100 ? 100 : FAILED))
