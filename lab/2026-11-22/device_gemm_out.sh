#!/bin/bash
# Does an FP16 output of the INT8 GEMMs (instead of TensorRT 8.6's FP32 choice) speed up our INT8 engines?
# OPT-6.7B-shaped decoder, LAYERS (default 1) layers, static 4 x 256: FP16 engine, INT8 engine (default pins), INT8
# engine with tools/bench_trt.py --int8-gemm-output fp16; one FP16 engine timed against both. Its FP16 engine's time
# and size also show whether the FP16 engine of an OPT-shaped graph runs in FP16 (LayerNorm pins, docs/TENSORRT.md).
#   call: bash lab/2026-11-22/device_gemm_out.sh start      calls: bash lab/2026-11-22/device_gemm_out.sh poll
set -uo pipefail
cd "$(dirname "$0")/.."
source lab/2026-11-22/device_lib.sh
B=$W/go; R=$W/res5; mkdir -p $B $R
case ${1:-start} in
  start)
    setsid nohup bash -c "
      export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
      python3 -W ignore tools/make_bench_model.py --layers ${LAYERS:-1} --vocab 8192 --only fp,sq -o $B > $R/models.log 2>&1
      source /opt/trt86/env.sh
      S='$B/fp.onnx $B/sq.onnx --static --shape 4x256'
      \$TRTPY tools/bench_trt.py \$S --workdir $B/a --build-only --labels fp16 > $R/b_fp16.log 2>&1 &
      \$TRTPY tools/bench_trt.py \$S --workdir $B/a --build-only --labels int8 > $R/b_int8.log 2>&1 &
      \$TRTPY tools/bench_trt.py \$S --workdir $B/b --build-only --labels int8 --int8-gemm-output fp16 > $R/b_int8o16.log 2>&1 &
      wait; echo built >> $R/G.log
      ln -sf $B/a/bench_fp16.engine $B/b/bench_fp16.engine; ln -sf $B/a/bench_fp16.engine.json $B/b/bench_fp16.engine.json
      \$TRTPY tools/bench_trt.py \$S --workdir $B/a --reuse --runs 200 --json $R/a.json > $R/a.log 2>&1
      \$TRTPY tools/bench_trt.py \$S --workdir $B/b --reuse --runs 200 --int8-gemm-output fp16 --json $R/b.json > $R/b.log 2>&1
      touch $W/GO.done" > /dev/null 2>&1 < /dev/null &
    sleep 1; echo started ;;
  poll)
    wait_done 300 GO.done
    cat $R/G.log 2>/dev/null; tail -n 3 $R/models.log $R/b_*.log; tail -n 8 $R/a.log $R/b.log 2>/dev/null
    tar czf "${OUT:-.}/gemm_out.tgz" -C $R . 2>/dev/null; true ;;
esac
