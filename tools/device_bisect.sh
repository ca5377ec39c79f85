#!/bin/bash
# Where does FP16 break the SmoothQuant INT8 engine of SmolLM2 (docs/TENSORRT.md, third session: fine with
# `build --no-fp16`, broken with FP16; the overflow sits in layers 15-29, in both the attention and the MLP half)?
# One round of parallel builds, then perplexity of each engine on 8 chunks (ONNX Runtime on the graph as reference):
#
#   (kit staged; GGUF parts in /tmp/sqw as for tools/device_pins.sh)
#   call:  cp .devcarry/smol.gguf.part_01 .devcarry/smol.gguf.sha256 /tmp/sqw/ && bash tools/device_bisect.sh start
#   calls: POLL=500 bash tools/device_bisect.sh poll
#
# Engines (all INT8 from the same `sq` graph, alpha 0.85):
#   q_attn_hi / q_mlp_hi   only layers 15-29's attention (resp. MLP) Linears quantized (tools/qdq_bypass.py --invert)
#   q_hi_a / q_hi_b        only layers 15-22 (resp. 23-29) quantized
#   q_28_29                only layers 28-29 quantized (their down_proj makes the massive activations)
#   res32                  all quantized, residual adds pinned FP32 (build --fp32-nodes)
#   attn32                 all quantized, attention's softmax/score/RoPE nodes pinned FP32
#   mlp32                  all quantized, the MLP's SiLU and gate*up product pinned FP32
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/device_lib.sh
W=/tmp/sqw; R=$W/res6; mkdir -p $W/out $R $W/smol
G=$W/smol/SmolLM2-135M-Instruct.Q4_1.gguf
L=${OPT_LEVEL:-0}

chain() {
  smol_python_env; export OMP_NUM_THREADS=8
  local t0=$(date +%s)
  smol_gguf >> $R/log || { touch $W/X.done; return; }
  [ -f $W/sq.onnx ] || python3 -m sq_export -q export $G --mode sq --weights qdq --samples 64 -o $W/sq.onnx --json > $R/export_sq.json 2> $R/export_sq.log
  [ -f $W/tokens_small.npz ] || python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 2048 -o $W/tokens_small.npz
  echo "export $(( $(date +%s) - t0 ))s" >> $R/log
  hi='layers\.(1[5-9]|2[0-9])/'
  for spec in "q_attn_hi:${hi}self_attn/" "q_mlp_hi:${hi}mlp/" "q_hi_a:layers\.(1[5-9]|2[0-2])/" "q_hi_b:layers\.(2[3-9])/" "q_28_29:layers\.(28|29)/"; do
    python3 tools/qdq_bypass.py $W/sq.onnx $W/${spec%%:*}.onnx --invert --match "${spec#*:}" >> $R/log 2>&1
  done
  source /opt/trt86/env.sh; export PYTHONPATH=.
  b() {  # engine onnx extra...
    local name=$1 onnx=$2; shift 2
    ( timeout 900 "$TRTPY" -m sq_export build $W/$onnx.onnx -o $W/$name.engine --precision int8 --batch 1:1:1 --seq 256:256:256 --opt-level $L --json "$@" > $R/build_$name.json 2> $R/build_$name.log
      echo "build $name rc $? $(( $(date +%s) - t0 ))s" >> $R/log ) &
  }
  for n in q_attn_hi q_mlp_hi q_hi_a q_hi_b q_28_29; do b $n $n; done
  b res32 sq --fp32-nodes 'layers\.\d+/Add(_1)?$'
  b attn32 sq --fp32-nodes 'self_attn/(Softmax|Add_2|Mul_[0-9]+|MatMul|Cast)'
  b mlp32 sq --fp32-nodes 'mlp/(act_fn|Mul)'
  wait
  local engines=()
  for n in q_attn_hi q_mlp_hi q_hi_a q_hi_b q_28_29 res32 attn32 mlp32; do [ -f $W/$n.engine ] && engines+=($W/$n.engine); done
  "$TRTPY" -m sq_export compare $W/sq.onnx "${engines[@]}" --tokens $W/tokens_small.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare.json 2> $R/compare.log
  compare_table $R/compare.json > $R/compare_table.txt 2>&1
  echo "compare $(( $(date +%s) - t0 ))s" >> $R/log
  touch $W/X.done
}

case ${1:-start} in
  start)
    export -f chain; export W R G L
    setsid nohup bash -c chain > $W/X.out 2>&1 < /dev/null &
    sleep 2; echo started ;;
  poll)
    end=$(( $(date +%s) + ${POLL:-500} ))
    while [ $(date +%s) -lt $end ] && [ ! -f $W/X.done ]; do sleep 10; done
    cat $R/log 2>/dev/null; tail -n 2 $W/X.out; [ -f $R/compare_table.txt ] && cat $R/compare_table.txt
    tar czf "${OUT:-.}/bisect_$(date +%H%M).tgz" -C $R . 2>/dev/null; true ;;
esac
