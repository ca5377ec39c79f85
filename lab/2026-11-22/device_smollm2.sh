#!/bin/bash
# SmolLM2-135M on the lent GPU, in stages that each fit one device call (10 min) and skip what is already done:
#
#   bash lab/2026-11-22/device_smollm2.sh exports    # device python3 (torch): ONNX graphs, token + prompt files  (~5 min)
#   bash lab/2026-11-22/device_smollm2.sh builds     # $TRTPY: five TensorRT 8.6 engines, in parallel             (~6-9 min)
#   bash lab/2026-11-22/device_smollm2.sh compare    # $TRTPY: Polygraphy comparison + perplexity, TensorRT generate
#
# Before: the kit staged (../shared/trt86/README.md) and the GGUF parts copied to /tmp/sqw in earlier calls:
#   call A: carry [.devcarry/smol.gguf.part_00]  command: mkdir -p /tmp/sqw && cp .devcarry/smol.gguf.part_00 /tmp/sqw/
#   call B: carry [.devcarry/smol.gguf.part_01, .devcarry/smol.gguf.sha256, .devcarry/whl]
#           command: cp .devcarry/smol.gguf.part_01 .devcarry/smol.gguf.sha256 /tmp/sqw/ && bash lab/2026-11-22/device_smollm2.sh exports
# (.devcarry is made here: docs/TENSORRT.md, "Device recipe".)
#
# Graphs: fp (float), sq (SmoothQuant α 0.85, 64 × 512 calibration: the ONNX Runtime table's recipe), best
# (--smooth-pairs --alpha auto --fallback auto, 32 × 512: issue 7's recipe), and decode graphs fp_dec / best_dec.
# Engines: static 1 × 256 prefill (FP16 from fp, INT8 from sq and best), decode (batch 1, seq 1..32, past 1..64).
# Results go to /tmp/sqw/res and, tarred, to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source lab/2026-11-22/device_lib.sh
STAGE=${1:-all}
OUT=${OUT:-./device_out}; mkdir -p "$OUT"
R=$W/res; mkdir -p $W/smol $R
pack() { tar czf "$OUT/smollm2_$1.tgz" -C $R . 2>/dev/null; ls -la $R; }

exports() {
  smol_python_env; export OMP_NUM_THREADS=${THREADS:-3}
  smol_gguf || exit 2
  python3 -c 'import torch, transformers, onnx, onnxruntime; print("torch", torch.__version__, "transformers", transformers.__version__, "onnx", onnx.__version__, "ort", onnxruntime.__version__)' | tee $R/device_python.txt
  local best="--mode sq --weights qdq --smooth-pairs --alpha auto --fallback auto --samples 32"
  local t0=$(date +%s) pids=()
  for spec in "fp:--mode fp" "sq:--mode sq --weights qdq --samples 64" "best:$best" "fp_dec:--mode fp --decode" "best_dec:$best --decode"; do
    local name=${spec%%:*} opts=${spec#*:}
    [ -f $W/$name.onnx ] && continue
    ( python3 -m sq_export -q export $G $opts -o $W/$name.onnx --json > $R/export_$name.json 2> $R/export_$name.log; echo "export $name rc $? $(( $(date +%s) - t0 ))s" ) &
    pids+=($!)
  done
  [ -f $W/tokens.npz ] || python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 8192 -o $W/tokens.npz
  [ -f $W/prompts.npz ] || python3 -m sq_export -q tokens $G --prompts 8 --prompt-tokens 32 --reference-tokens 16 -o $W/prompts.npz
  wait "${pids[@]}"
  echo "exports: $(( $(date +%s) - t0 ))s"; ls -la $W
  for n in fp sq best fp_dec best_dec; do
    [ -f $W/$n.onnx ] && { python3 -m sq_export check $W/$n.onnx --json > $R/check_$n.json; echo "check $n: rc $?"; }
  done
  # ONNX Runtime greedy agreement of the INT8 decode graph with PyTorch FP32 (the same prompts the engines get)
  for n in fp_dec best_dec; do
    [ -f $R/generate_ort_$n.json ] || python3 -m sq_export -q generate $W/$n.onnx --prompts-file $W/prompts.npz --max-new-tokens 16 --json > $R/generate_ort_$n.json 2>&1
  done
  pack exports
}

builds() {
  source /opt/trt86/env.sh; export PYTHONPATH=.
  local pids=() t0=$(date +%s)
  b() {  # name onnx precision extra...
    local name=$1 onnx=$2 prec=$3; shift 3
    [ -f $W/$name.engine ] && return
    ( timeout ${BUILD_TIMEOUT:-560} "$TRTPY" -m sq_export build $W/$onnx.onnx -o $W/$name.engine --precision $prec --opt-level $L --json "$@" > $R/build_$name.json 2> $R/build_$name.log
      echo "build $name rc $? $(( $(date +%s) - t0 ))s" ) &
    pids+=($!)
  }
  b fp16 fp fp16 --batch 1:1:1 --seq 256:256:256
  b sq_int8 sq int8 --batch 1:1:1 --seq 256:256:256
  b best_int8 best int8 --batch 1:1:1 --seq 256:256:256
  b fp16_dec fp_dec fp16 --batch 1:1:1 --seq 1:32:32 --past 1:48:64
  b best_int8_dec best_dec int8 --batch 1:1:1 --seq 1:32:32 --past 1:48:64
  wait "${pids[@]}"
  ls -la $W/*.engine; pack builds
}

compare() {
  source /opt/trt86/env.sh; export PYTHONPATH=.
  local models=()
  for p in fp.onnx fp16.engine sq.onnx sq_int8.engine best.onnx best_int8.engine; do [ -f $W/$p ] && models+=($W/$p); done
  "$TRTPY" -m sq_export compare "${models[@]}" --tokens $W/tokens.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare.json 2> $R/compare.log
  echo "compare rc $?"
  compare_table $R/compare.json | tee $R/compare_table.txt
  for n in fp16_dec best_int8_dec; do
    [ -f $W/$n.engine ] && "$TRTPY" -m sq_export generate $W/$n.engine --prompts-file $W/prompts.npz --max-new-tokens 16 --json > $R/generate_trt_$n.json 2>&1
    tail -c 600 $R/generate_trt_$n.json; echo
  done
  pack compare
}

diag() {
  # Why the plain-SmoothQuant INT8 engine (sq) diverges from its ONNX graph while `best` does not: two variants of
  # sq, one with every down_proj left in float, one with --smooth-pairs (down_proj inputs smoothed), each built and
  # compared with its own graph on 8 chunks.
  smol_python_env; export OMP_NUM_THREADS=4
  smol_gguf || exit 2
  local downs=$(python3 -c 'print(",".join(f"model.layers.{i}.mlp.down_proj" for i in range(30)))')
  local pids=()
  [ -f $W/sq_nodown.onnx ] || { python3 -m sq_export -q export $G --mode sq --weights qdq --samples 64 --fallback $downs -o $W/sq_nodown.onnx --json > $R/export_sq_nodown.json 2>&1 & pids+=($!); }
  [ -f $W/sq_pairs.onnx ] || { python3 -m sq_export -q export $G --mode sq --weights qdq --samples 64 --smooth-pairs -o $W/sq_pairs.onnx --json > $R/export_sq_pairs.json 2>&1 & pids+=($!); }
  [ -f $W/tokens_small.npz ] || python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 2048 -o $W/tokens_small.npz
  wait "${pids[@]}"
  source /opt/trt86/env.sh; export PYTHONPATH=.
  pids=()
  for n in sq_nodown sq_pairs; do
    [ -f $W/$n.engine ] || { timeout 560 "$TRTPY" -m sq_export build $W/$n.onnx -o $W/$n.engine --precision int8 --batch 1:1:1 --seq 256:256:256 --opt-level $L --json > $R/build_$n.json 2> $R/build_$n.log & pids+=($!); }
  done
  wait "${pids[@]}"
  "$TRTPY" -m sq_export compare $W/sq_nodown.onnx $W/sq_nodown.engine $W/sq_pairs.onnx $W/sq_pairs.engine \
    --tokens $W/tokens_small.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare_diag.json 2> $R/compare_diag.log
  compare_table $R/compare_diag.json | tee $R/compare_diag_table.txt
  pack diag
}

case $STAGE in
  exports) exports ;;
  builds) builds ;;
  compare) compare ;;
  diag) diag ;;
  all) exports; builds; compare ;;
  *) echo "usage: $0 exports|builds|compare|diag|all"; exit 2 ;;
esac
