#!/bin/bash
# Second-stage driver of the eighth lease (2026-11-30 ~04:55 UTC), started on the device beside device8.sh's jobs:
#   ncu   the prof engines' kernel lists again (device8's `python -m polygraphy` does not run: the kit's polygraphy has no
#         __main__; the console script's entry point is used here), on GPU 0 once the prof bench is done
#   pbench / dbench  the prefix job's prefill and decode benches on GPU 0, beside its level-3 engine builds on GPU 1
#         (the job's own sequential order would not fit the lease)
set -uo pipefail
W=/tmp/w8; R=$W/res; M=$W/m; D=$R/prefix; P=$R/prof; T=/tmp/prof; ROOT=$PWD
trtpy() { ( source /opt/trt86/env.sh; "$TRTPY" "$@" ) }
pg() { trtpy -c "import sys; from polygraphy.tools._main import main; sys.argv[0] = 'polygraphy'; sys.exit(main())" "$@"; }
export CUDA_VISIBLE_DEVICES=0
( for e in fp3 sq3 sqa3; do
    ( source /opt/trt86/env.sh; /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv "$TRTPY" -c \
        "import sys; from polygraphy.tools._main import main; sys.argv[0] = 'polygraphy'; sys.exit(main())" run "$T/$e.engine" \
        --model-type engine --trt --input-shapes input_ids:[4,256] attention_mask:[4,256] --iterations 1 --warm-up 0 \
        > "$P/$e.ncu.csv" 2> "$P/$e.ncu.err" )
    echo "$(date +%T) ncu $e rc $?" >> "$P/log"
  done
  python3 tools/ncu_kernels.py "$P"/fp3.ncu.csv "$P"/sq3.ncu.csv "$P"/sqa3.ncu.csv > "$P/ncu_summary.txt" 2>&1
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$M/fp.onnx" "$M/kl.onnx" "$M/klr.onnx" --shape 4x256 --large 8x512 --opt-level 3 --cuda-graph \
      --workdir "$M/bp2" --json "$D/bench_prefill.json" > "$D/bench_prefill.log" 2>&1
  echo "$(date +%T) pbench rc $?" >> "$D/log2" ) &
PYTHONPATH=$ROOT trtpy tools/bench_trt.py --decode "$M/fp_dec.onnx" "$M/kl_dec.onnx" "$M/klr_dec.onnx" --batches 1,8 --past 512 --kv-fp16 \
    --cuda-graph --opt-level 3 --workdir "$M/bd2" --json "$D/bench_decode.json" > "$D/bench_decode.log" 2>&1
echo "$(date +%T) dbench rc $?" >> "$D/log2"
wait
