#!/bin/bash
# After un-pinning LayerNormalization (precision_pins.norm_node_names): is the FP16 engine of an OPT-shaped graph FP16
# again, and where does INT8 stand against it in one run? 2 layers, static 4 x 256, kit staged.
#   call: bash tools/device_ln_check.sh start      calls: POLL=300 bash tools/device_ln_check.sh poll
set -uo pipefail
cd "$(dirname "$0")/.."
W=/tmp/sqw; B=$W/ln; R=$W/res9; mkdir -p $B $R
case ${1:-start} in
  start)
    setsid nohup bash -c "
      export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
      python3 -W ignore tools/make_bench_model.py --layers ${LAYERS:-2} --vocab 8192 --quantize-attention --only fp,sq_attn -o $B > $R/models.log 2>&1
      source /opt/trt86/env.sh
      S='$B/fp.onnx $B/sq_attn.onnx --static --shape 4x256'
      \$TRTPY tools/bench_trt.py \$S --workdir $B --build-only --labels fp16 > $R/b_fp16.log 2>&1 &
      \$TRTPY tools/bench_trt.py \$S --workdir $B --build-only --labels int8 > $R/b_int8.log 2>&1 &
      wait; echo built >> $R/log
      \$TRTPY tools/bench_trt.py \$S --workdir $B --reuse --runs 200 --json $R/t.json > $R/t.log 2>&1
      cp $B/*.engine.json $R/ 2>/dev/null; touch $W/LN.done" > /dev/null 2>&1 < /dev/null &
    sleep 1; echo started ;;
  poll)
    end=$(( $(date +%s) + ${POLL:-300} ))
    while [ $(date +%s) -lt $end ] && [ ! -f $W/LN.done ]; do sleep 5; done
    cat $R/log 2>/dev/null; tail -n 3 $R/models.log $R/b_*.log; tail -n 8 $R/t.log 2>/dev/null
    tar czf "${OUT:-.}/ln_check.tgz" -C $R . 2>/dev/null; true ;;
esac
