#!/bin/bash
# Why FP16 breaks the SmoothQuant INT8 engines of SmolLM2 (docs/TENSORRT.md: fine with `build --no-fp16`, broken with
# FP16 in layers 15-29, where the residual stream holds |x| ~ 20,000, so a norm's mean(x²) ~ 7e5 cannot be FP16), and
# whether `build --prescale-norms` (engine/norm_prescale.py: each token divided by its max |x| before squaring; exact)
# fixes it. One round of parallel exports and builds, then perplexities (ONNX Runtime on each graph as reference):
#
#   (kit staged; GGUF parts in /tmp/sqw as for lab/2026-11-22/device_pins.sh)
#   call:  cp .devcarry/smol.gguf.part_01 .devcarry/smol.gguf.sha256 /tmp/sqw/ && bash lab/2026-11-22/device_bisect.sh start
#   calls: POLL=500 bash lab/2026-11-22/device_bisect.sh poll
#
# Engines:
#   sq_ps        sq graph (alpha 0.85), INT8, --prescale-norms                    the candidate fix
#   best_ps      issue 7's final selection (pairs, alpha auto, fallback auto), INT8, --prescale-norms
#   naive        naive W8A8 graph (no smoothing), INT8                          does it break without smoothing?
#   sqf_fp16     sq graph with every Linear back to float (smoothed float), FP16   do Q/DQ matter at all?
#   q_12_14      sq graph, only layers 12-14 quantized (the first with |x| ~ 2e4)
#   q_28_29      sq graph, only layers 28-29 quantized
#   res32        sq graph, INT8, residual adds pinned FP32 (build --fp32-nodes)
#   fp16_ps      float graph, FP16, --prescale-norms                            still right?
set -uo pipefail
cd "$(dirname "$0")/.."
source lab/2026-11-22/device_lib.sh
R=$W/res7; mkdir -p $W/out $R $W/smol

chain() {
  smol_python_env; export OMP_NUM_THREADS=4
  local t0=$(date +%s)
  smol_gguf >> $R/log || { touch $W/X.done; return; }
  for spec in "fp:--mode fp" "sq:--mode sq --weights qdq --samples 64" "naive:--mode naive --weights qdq --samples 64" "best:--mode sq --weights qdq --smooth-pairs --alpha auto --fallback auto --samples 32"; do
    local name=${spec%%:*} opts=${spec#*:}
    [ -f $W/$name.onnx ] || ( python3 -m sq_export -q export $G $opts -o $W/$name.onnx --json > $R/export_$name.json 2> $R/export_$name.log; echo "export $name rc $? $(( $(date +%s) - t0 ))s" >> $R/log ) &
  done
  [ -f $W/tokens_small.npz ] || python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 2048 -o $W/tokens_small.npz
  source /opt/trt86/env.sh; export PYTHONPATH=.
  b() {  # engine onnx precision extra...
    local name=$1 onnx=$2 prec=$3; shift 3
    ( while [ ! -f $W/$onnx.onnx ]; do sleep 5; [ $(( $(date +%s) - t0 )) -gt 900 ] && exit 1; done
      timeout 900 "$TRTPY" -m sq_export build $W/$onnx.onnx -o $W/$name.engine --precision $prec --batch 1:1:1 --seq 256:256:256 --opt-level $L --json "$@" > $R/build_$name.json 2> $R/build_$name.log
      echo "build $name rc $? $(( $(date +%s) - t0 ))s" >> $R/log ) &
  }
  ( while [ ! -f $W/sq.onnx ]; do sleep 5; [ $(( $(date +%s) - t0 )) -gt 900 ] && exit 1; done
    "$TRTPY" tools/qdq_bypass.py $W/sq.onnx $W/sqf.onnx.tmp --match . >> $R/log 2>&1 && mv $W/sqf.onnx.tmp $W/sqf.onnx
    for spec in "q_12_14:layers\.(1[2-4])/" "q_28_29:layers\.(28|29)/"; do
      "$TRTPY" tools/qdq_bypass.py $W/sq.onnx $W/${spec%%:*}.onnx.tmp --invert --match "${spec#*:}" >> $R/log 2>&1 && mv $W/${spec%%:*}.onnx.tmp $W/${spec%%:*}.onnx
    done ) &
  b sq_ps sq int8 --prescale-norms
  b best_ps best int8 --prescale-norms
  b naive naive int8
  b sqf_fp16 sqf fp16
  b q_12_14 q_12_14 int8
  b q_28_29 q_28_29 int8
  b res32 sq int8 --fp32-nodes 'layers\.\d+/Add(_1)?$'
  b fp16_ps fp fp16 --prescale-norms
  wait
  cmp() {  # tag graph engines...
    local tag=$1 graph=$2; shift 2; local e=()
    for n in "$@"; do [ -f $W/$n.engine ] && e+=($W/$n.engine); done
    [ ${#e[@]} -gt 0 ] || return
    ( "$TRTPY" -m sq_export compare $W/$graph.onnx "${e[@]}" --tokens $W/tokens_small.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare_$tag.json 2> $R/compare_$tag.log
      compare_table $R/compare_$tag.json > $R/compare_${tag}_table.txt 2>&1; echo "compare $tag $(( $(date +%s) - t0 ))s" >> $R/log ) &
  }
  cmp sq sq sq_ps sqf_fp16 q_12_14 q_28_29 res32
  cmp best best best_ps
  cmp naive naive naive
  cmp fp fp fp16_ps
  wait
  touch $W/X.done
}

case ${1:-start} in
  start)
    export -f chain; export W R G L
    setsid nohup bash -c chain > $W/X.out 2>&1 < /dev/null &
    sleep 2; echo started ;;
  poll)
    wait_done 500 X.done
    cat $R/log 2>/dev/null; tail -n 2 $W/X.out
    for f in $R/compare_*_table.txt; do [ -f $f ] && { echo "== $f"; cat $f; }; done
    tar czf "${OUT:-.}/bisect_$(date +%H%M).tgz" -C $R . 2>/dev/null; true ;;
esac
