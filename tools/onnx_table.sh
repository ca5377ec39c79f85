#!/bin/bash
# SmolLM2-135M through ONNX Runtime: export FP32 / naive INT8 / SmoothQuant INT8 graphs and evaluate each on the
# held-out split with the same chunking as the PyTorch eval. Usage: bash tools/onnx_table.sh OUTDIR [SAMPLES] [MAX_TOKENS]
set -euo pipefail
OUT=${1:-out/onnx_table}; SAMPLES=${2:-64}; MAX=${3:-16384}
mkdir -p "$OUT"
SQX="python -m sq_export -q"
for spec in "fp:--mode fp" "naive:--mode naive" "sq:--mode sq" "sq_ort:--mode sq --target ort"; do
  name=${spec%%:*}; opts=${spec#*:}
  [ -f "$OUT/$name.onnx" ] || { /usr/bin/time -f "$name export %es %MKB" $SQX export smollm2 $opts --samples "$SAMPLES" -o "$OUT/$name.onnx" --json > "$OUT/$name.export.json"; }
done
for name in fp naive sq sq_ort; do
  /usr/bin/time -f "$name eval %es" $SQX eval "$OUT/$name.onnx" --max-tokens "$MAX" --json | tail -n 1 > "$OUT/$name.eval.json"
  python -m sq_export -q check "$OUT/$name.onnx" $( [ $name = sq_ort ] && echo --target ort ) > "$OUT/$name.check.txt" || true
  echo "$name: $(cat "$OUT/$name.eval.json") $(stat -c %s "$OUT/$name.onnx") bytes"
done
