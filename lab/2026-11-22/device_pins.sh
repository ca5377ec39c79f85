#!/bin/bash
# Issue 4 on the lent GPU after the precision pins (sq_export/engine/precision_pins.py: whole norms FP32, un-quantized
# MatMuls of INT8 engines FP16): do the SmoothQuant INT8 engines of SmolLM2 now match their ONNX graphs, and how
# fast is the OPT-6.7B-shaped INT8 engine against FP16? Two background chains, polled:
#
#   call:  cp .devcarry/smol.gguf.part_01 .devcarry/smol.gguf.sha256 /tmp/sqw/ && bash lab/2026-11-22/device_pins.sh start
#   calls: POLL=500 bash lab/2026-11-22/device_pins.sh poll
#
# Chain S: SmolLM2 exports fp, sq (alpha 0.85), best (--smooth-pairs --alpha auto --fallback auto) -> engines fp16,
#   sq, sq_nomm (sq built with --no-fp16-matmuls, the control), best -> perplexities (Polygraphy compare).
# Chain B: lab/2026-11-22/device_bench.sh models (4 layers) -> prefill engines (+ a control INT8 engine without the FP16
#   MatMul pins) -> prefill timings once S's builds are done -> Nsight Compute kernel split -> decode engines and
#   timings once S's comparisons are done. No timing shares the GPU with a build or a comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
source lab/2026-11-22/device_lib.sh
R=$W/res4; mkdir -p $W/out $R $W/smol

chain_s() {
  smol_python_env; export OMP_NUM_THREADS=4
  local t0=$(date +%s)
  smol_gguf >> $R/S.log || { touch $W/S_built $W/S.done; return; }
  for spec in "fp:--mode fp" "sq:--mode sq --weights qdq --samples 64" "best:--mode sq --weights qdq --smooth-pairs --alpha auto --fallback auto --samples 32"; do
    local name=${spec%%:*} opts=${spec#*:}
    ( python3 -m sq_export -q export $G $opts -o $W/$name.onnx --json > $R/export_$name.json 2> $R/export_$name.log; echo "export $name rc $? $(( $(date +%s) - t0 ))s" >> $R/S.log ) &
  done
  python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 2048 -o $W/tokens_small.npz
  python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 8192 -o $W/tokens.npz
  wait
  source /opt/trt86/env.sh; export PYTHONPATH=.
  b() {  # engine onnx precision extra...
    local name=$1 onnx=$2 prec=$3; shift 3
    ( timeout 900 "$TRTPY" -m sq_export build $W/$onnx.onnx -o $W/$name.engine --precision $prec --batch 1:1:1 --seq 256:256:256 --opt-level $L --json "$@" > $R/build_$name.json 2> $R/build_$name.log
      echo "build $name rc $? $(( $(date +%s) - t0 ))s" >> $R/S.log ) &
  }
  b fp16 fp fp16; b sq sq int8; b sq_nomm sq int8 --no-fp16-matmuls; b best best int8
  wait
  touch $W/S_built
  while [ ! -f $W/B_prefill_timed ]; do sleep 5; done
  table() { compare_table $1 > ${1%.json}_table.txt 2>&1; }
  "$TRTPY" -m sq_export compare $W/sq.onnx $W/sq.engine $W/sq_nomm.engine --tokens $W/tokens_small.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare_sq.json 2> $R/compare_sq.log
  table $R/compare_sq.json; echo "compare sq $(( $(date +%s) - t0 ))s" >> $R/S.log
  "$TRTPY" -m sq_export compare $W/best.onnx $W/best.engine $W/fp16.engine --tokens $W/tokens.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare_best.json 2> $R/compare_best.log
  table $R/compare_best.json; echo "compare best $(( $(date +%s) - t0 ))s" >> $R/S.log
  touch $W/S.done
}

chain_b() {
  local B=/tmp/sqw/bench t0=$(date +%s)
  OUT=$W/out bash lab/2026-11-22/device_bench.sh models > $R/bench_models.log 2>&1
  echo "bench models $(( $(date +%s) - t0 ))s" >> $R/B.log
  source /opt/trt86/env.sh; export PYTHONPATH=.
  for l in fp16 int8 int8:sq_attn; do
    ( timeout 900 "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx $B/sq_attn.onnx --workdir $B --build-only --labels $l > $R/build_prefill_${l/:/_}.log 2>&1; echo "prefill $l rc $? $(( $(date +%s) - t0 ))s" >> $R/B.log ) &
  done
  ( timeout 900 "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx --workdir $B/ctl --build-only --labels int8 --no-fp16-matmuls > $R/build_prefill_ctl.log 2>&1; echo "prefill ctl rc $? $(( $(date +%s) - t0 ))s" >> $R/B.log ) &
  wait
  while [ ! -f $W/S_built ]; do sleep 5; done
  "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx $B/sq_attn.onnx --shape 4x256 --large 8x512 --runs 100 --workdir $B --reuse --json $R/bench_prefill.json > $R/bench_prefill.log 2>&1
  ln -sf $B/bench_fp16.engine $B/ctl/bench_fp16.engine; ln -sf $B/bench_fp16.engine.json $B/ctl/bench_fp16.engine.json
  "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx --shape 4x256 --large 8x512 --runs 100 --workdir $B/ctl --reuse --no-fp16-matmuls --json $R/bench_prefill_ctl.json > $R/bench_prefill_ctl.log 2>&1
  echo "prefill timed $(( $(date +%s) - t0 ))s" >> $R/B.log
  printf 'import sys\nfrom polygraphy.tools import main\nsys.argv[0] = "polygraphy"\nsys.exit(main())\n' > /tmp/pg.py
  for e in bench_fp16 bench_int8; do
    timeout 240 /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv "$TRTPY" /tmp/pg.py run $B/$e.engine --model-type engine --trt --iterations 2 --input-shapes input_ids:[4,256] attention_mask:[4,256] > $R/ncu_$e.csv 2> $R/ncu_$e.err
  done
  python3 tools/ncu_kernels.py $R/ncu_bench_fp16.csv $R/ncu_bench_int8.csv > $R/ncu_summary.txt 2>&1
  touch $W/B_prefill_timed
  for l in fp16 int8; do
    for b in 1 8; do
      ( timeout 900 "$TRTPY" tools/bench_trt.py --decode $B/fp_dec.onnx $B/sq_dec.onnx --past 512 --batches $b --kv-fp16 --workdir $B --build-only --labels $l > $R/build_decode_${l}_b$b.log 2>&1; echo "decode $l b$b rc $? $(( $(date +%s) - t0 ))s" >> $R/B.log ) &
    done
  done
  wait
  while [ ! -f $W/S.done ]; do sleep 5; done
  "$TRTPY" tools/bench_trt.py --decode $B/fp_dec.onnx $B/sq_dec.onnx --past 512 --batches 1,8 --kv-fp16 --runs 200 --workdir $B --reuse --json $R/bench_decode.json > $R/bench_decode.log 2>&1
  echo "decode timed $(( $(date +%s) - t0 ))s" >> $R/B.log
  touch $W/B.done
}

case ${1:-start} in
  start)
    export -f chain_s chain_b; export W R G L
    setsid nohup bash -c chain_s > $W/S.out 2>&1 < /dev/null &
    setsid nohup bash -c chain_b > $W/B.out 2>&1 < /dev/null &
    sleep 2; echo started ;;
  poll)
    wait_done 500 B.done S.done
    ls $W/*.done $W/S_built $W/B_prefill_timed 2>/dev/null; cat $R/S.log $R/B.log 2>/dev/null; tail -n 2 $W/S.out $W/B.out
    for f in $R/bench_prefill*.log $R/ncu_summary.txt $R/compare_*_table.txt $R/bench_decode.log; do [ -f $f ] && { echo "== $f"; tail -n 14 $f; }; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; free -g | head -2
    tar czf "${OUT:-.}/pins_$(date +%H%M).tgz" -C $R . 2>/dev/null; true ;;
esac
