#!/bin/bash
# Gemma-3-270m: ONNX Runtime perplexity of the FP32, naive and paper graphs (issue 16's rows), same protocol as
# docs/ACCURACY.md's Gemma table (4,096 held-out tokens, chunks of 512, calibration 16 x 512)
cd /work/main
SQ="/work/main/.venv/bin/python -m sq_export -q"
export PYTHONPATH=/work/main
for row in "fp --mode fp" "naive --recipe naive" "paper --recipe paper"; do
  set -- $row; name=$1; shift
  t0=$(date +%s)
  $SQ export gemma3-270m "$@" --samples 16 --calib-seq-len 512 -o /tmp/g3ort/$name.onnx --json > /tmp/g3ort/$name.export.json 2> /tmp/g3ort/$name.export.err
  t1=$(date +%s)
  $SQ eval /tmp/g3ort/$name.onnx --max-tokens 4096 --json > /tmp/g3ort/$name.eval.json 2> /tmp/g3ort/$name.eval.err
  t2=$(date +%s)
  echo "$(date -u +%FT%TZ) $name export $((t1-t0)) s eval $((t2-t1)) s: $(tail -c 300 /tmp/g3ort/$name.eval.json)" >> /tmp/g3ort/log
  rm -f /tmp/g3ort/$name.onnx /tmp/g3ort/$name.onnx.data
done
echo done >> /tmp/g3ort/log
