#!/bin/bash
# The OPT-6.7B-shaped benchmark on the lent GPU (issues 4 and 6), in stages that fit one device call each:
#
#   bash lab/2026-11-22/device_bench.sh models   # device python3: 4 layers at OPT-6.7B width exported by our exporter (~3 min)
#   bash lab/2026-11-22/device_bench.sh build    # $TRTPY: every engine, prefill and decode builds in parallel
#   bash lab/2026-11-22/device_bench.sh time     # $TRTPY: timings one engine at a time (GPU not shared), tables
#
# Graphs (tools/make_bench_model.py): fp, sq (W8A8 Q/DQ), sq_attn (+ INT8 attention MatMuls), fp_dec, sq_dec.
# Prefill: one profile batch 1..8 x seq 1..512 optimized for 4 x 256, timed at 4 x 256 and 8 x 512.
# Decode: static engines per batch (1, 8), one new token over PAST (512) cached tokens, KV cache FP16 in/out.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
OUT=${OUT:-./device_out}; mkdir -p "$OUT"
B=/tmp/sqw/bench; R=/tmp/sqw/bres; mkdir -p $B $R
LAYERS=${LAYERS:-4}; PAST=${PAST:-512}
pack() { tar czf "$OUT/bench_$1.tgz" -C $R . 2>/dev/null; ls -la $R; }

models() {
  export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
  local t0=$(date +%s) pids=()
  for g in fp sq sq_attn fp_dec sq_dec; do
    [ -f $B/$g.onnx ] && continue
    ( python3 -W ignore tools/make_bench_model.py --layers $LAYERS --vocab 8192 --decode --quantize-attention --only $g -o $B > $R/model_$g.log 2>&1
      echo "model $g rc $? $(( $(date +%s) - t0 ))s" ) &
    pids+=($!)
  done
  wait "${pids[@]}"; ls -la $B; du -sh $B; pack models
}

build() {
  # every engine in its own process, all in parallel (each build is mostly one CPU core plus the GPU)
  source /opt/trt86/env.sh; export PYTHONPATH=.
  local t0=$(date +%s)
  for l in fp16 int8 int8:sq_attn; do
    ( timeout 570 "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx $B/sq_attn.onnx --workdir $B --reuse --build-only --labels $l > $R/build_prefill_${l/:/_}.log 2>&1; echo "prefill $l rc $? $(( $(date +%s) - t0 ))s" ) &
    for b in 1 8; do
      [ $l = int8:sq_attn ] && continue
      ( timeout 570 "$TRTPY" tools/bench_trt.py --decode $B/fp_dec.onnx $B/sq_dec.onnx --past $PAST --batches $b --kv-fp16 --workdir $B --reuse --build-only --labels $l > $R/build_decode_${l}_b$b.log 2>&1; echo "decode $l b$b rc $? $(( $(date +%s) - t0 ))s" ) &
    done
  done
  wait; ls -la $B/*.engine; pack build
}

timing() {
  source /opt/trt86/env.sh; export PYTHONPATH=.
  "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx $B/sq_attn.onnx --shape 4x256 --large 8x512 --runs 100 --workdir $B --reuse --json $R/bench_prefill.json 2>&1 | tee $R/bench_prefill.log | tail -n 12
  "$TRTPY" tools/bench_trt.py --decode $B/fp_dec.onnx $B/sq_dec.onnx --past $PAST --batches 1,8 --kv-fp16 --runs 200 --workdir $B --reuse --json $R/bench_decode.json 2>&1 | tee $R/bench_decode.log | tail -n 10
  pack time
}

case $STAGE in
  models) models ;;
  build) build ;;
  time) timing ;;
  all) models; build; timing ;;
  *) echo "usage: $0 models|build|time|all"; exit 2 ;;
esac
