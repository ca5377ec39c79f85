#!/bin/bash
# Issue 14 on one H200 (not yet run): a synthetic Llama-2-7B float16 checkpoint (tools/make_big_checkpoint.py),
# GPU calibration whole model vs layer-streamed (time, peak host RSS, peak GPU memory; act scales compared), the
# streamed quantization (default recipe, --fallback none) writing the smoothed checkpoint layer by layer, and the
# compact TensorRT 8.6 graph (--weights qdq16) exported from it. Each step is one tools/bench_big.py process (one
# JSON line). Steps 1-4 need only the device's python3 (torch 2.11, transformers 5.17, accelerate 1.15,
# safetensors, onnx, onnx-ir 1.0, onnxruntime: KINDS.md's list); the `trt` part needs the TensorRT 8.6 kit staged
# (/opt/trt86/env.sh, ../shared/trt86).
#   calls:  bash lab/2026-11-29/device_big.sh start       (returns at once; steps run in the background)
#           POLL=540 bash lab/2026-11-29/device_big.sh poll   (waits up to POLL s, copies results to $OUT)
#           bash lab/2026-11-29/device_big.sh trt         (kit staged: qdq vs qdq16 INT8 engines of a 2-layer 7B)
# Disk (64 GB): checkpoint 13.5 GB + smoothed checkpoint 13.5 GB + qdq16 graph ~14 GB. Host RAM (128 GB): the
# export holds the smoothed model in float32 (27 GB) and the exporter's copies.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=${W:-/tmp/big}; R=$W/res; mkdir -p "$W" "$R"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
N=${SAMPLES:-128}

step() {  # name, command...: its JSON line to big.jsonl, stderr to name.err, rc and seconds to log
  local name=$1 t0=$(date +%s); shift
  "$@" >> "$R/big.jsonl" 2> "$R/$name.err"
  echo "$name rc $? $(( $(date +%s) - t0 ))s" >> "$R/log"
}

chain() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/gpu.txt" 2>&1
  python3 -c 'import torch, transformers, accelerate, safetensors, onnx, onnx_ir, onnxruntime as o; print(torch.__version__, transformers.__version__, accelerate.__version__, safetensors.__version__, onnx.__version__, onnx_ir.__version__, o.__version__)' > "$R/versions.txt" 2>&1
  [ -f "$W/l7b/model.safetensors.index.json" ] || step ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b -o "$W/l7b" -q
  step cal_whole python3 tools/bench_big.py calibrate "$W/l7b" -o "$W/w" --device cuda --samples "$N"
  step cal_stream python3 tools/bench_big.py calibrate "$W/l7b" -o "$W/s" --device cuda --samples "$N" --stream
  step compare python3 tools/bench_big.py compare "$W/w" "$W/s"
  step quant_stream python3 tools/bench_big.py quantize "$W/l7b" -o "$W/q" --device cuda --samples "$N"
  step ppl_stream python3 tools/bench_big.py ppl "$W/q" --device cuda --max-tokens 4096
  rm -rf "$W/w" "$W/s"
  step export_qdq16 python3 tools/bench_big.py export "$W/q" -o "$W/sq16.onnx" --weights qdq16
  du -sb "$W/l7b" "$W/q" "$W"/sq16.onnx* >> "$R/log" 2>&1; df -h /tmp >> "$R/log"
  touch "$W/done"
}

trt() {  # TensorRT 8.6: does the builder fold float16 -> Cast -> Q into INT8 weights? same logits as the qdq form?
  source /opt/trt86/env.sh
  local C="$W/l2"
  [ -f "$C/model.safetensors.index.json" ] || python3 tools/make_big_checkpoint.py --shape llama2-7b --layers 2 -o "$C" -q
  for w in qdq qdq16; do
    python3 -m sq_export -q export "$C" --recipe paper --weights $w --device cuda --samples 16 -o "$W/l2_$w.onnx" >> "$R/trt.log" 2>&1
    "$TRTPY" -m sq_export -q build "$W/l2_$w.onnx" -o "$W/l2_$w.engine" --precision int8 --batch 1:1:1 --seq 128:128:128 >> "$R/trt.log" 2>&1
    echo "build $w rc $?" >> "$R/trt.log"
  done
  python3 -m sq_export tokens "$C" -o "$W/t.npz" >> "$R/trt.log" 2>&1
  "$TRTPY" -m sq_export compare "$W/l2_qdq.engine" "$W/l2_qdq16.engine" "$W/l2_qdq.onnx" --tokens "$W/t.npz" --json > "$R/trt_compare.json" 2>> "$R/trt.log"
  ls -la "$W"/l2_*.onnx* "$W"/l2_*.engine >> "$R/trt.log" 2>&1
  cp "$R"/trt* "${OUT:-$R}/" 2>/dev/null; tail -n 30 "$R/trt.log"
}

wait_done() {
  local end=$(( $(date +%s) + ${POLL:-540} ))
  while [ $(date +%s) -lt $end ] && [ ! -f "$W/done" ]; do sleep 5; done
}

case ${1:-start} in
  start) export -f chain step; export W R N; setsid nohup bash -c chain > "$W/chain.out" 2>&1 < /dev/null & sleep 2; echo started ;;
  poll) wait_done; cat "$R/log" 2>/dev/null; cat "$R/big.jsonl" 2>/dev/null; tail -n 3 "$W/chain.out" "$R"/*.err 2>/dev/null | tail -n 40
        cp "$R"/* "${OUT:-$R}/" 2>/dev/null; true ;;
  trt) trt ;;
esac
