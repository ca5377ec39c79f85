#!/bin/bash
# Third-stage driver of the eighth lease (~04:57 UTC): ncu without --warm-up (polygraphy refuses it without
# --sequential-runners), and the klr engine built beside kl instead of after it; when kl.engine is there, the prefix
# job (device8.sh) is stopped and the compare is run here.
set -uo pipefail
W=/tmp/w8; R=$W/res; M=$W/m; D=$R/prefix; P=$R/prof; T=/tmp/prof; ROOT=$PWD
trtpy() { ( source /opt/trt86/env.sh; "$TRTPY" "$@" ) }
( export CUDA_VISIBLE_DEVICES=1
  for e in fp3 sq3 sqa3; do
    ( source /opt/trt86/env.sh; /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv "$TRTPY" -c \
        "import sys; from polygraphy.tools._main import main; sys.argv[0] = 'polygraphy'; sys.exit(main())" run "$T/$e.engine" \
        --model-type engine --trt --input-shapes input_ids:[4,256] attention_mask:[4,256] --iterations 1 \
        > "$P/$e.ncu.csv" 2> "$P/$e.ncu.err" )
    echo "$(date +%T) ncu $e rc $?" >> "$P/log"
  done
  python3 tools/ncu_kernels.py "$P"/fp3.ncu.csv "$P"/sq3.ncu.csv "$P"/sqa3.ncu.csv > "$P/ncu_summary.txt" 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=0
  trtpy -m sq_export -q build "$M/klr.onnx" -o "$M/klr_b.engine" --batch 1:1:1 --seq 1:256:256 --opt-level 3 --json > "$D/klr.build.json" 2> "$D/klr.build.err"
  echo "$(date +%T) klr build rc $?" >> "$D/log2" ) &
until [ -f "$M/kl.engine" ]; do sleep 5; done
sleep 5; pkill -f "[j]ob_prefix"; pkill -f "klr.onnx -o /tmp/w8/m/[k]lr.engine"
echo "$(date +%T) kl engine there; prefix job stopped" >> "$D/log2"
wait
mv "$M/klr_b.engine" "$M/klr.engine"
export CUDA_VISIBLE_DEVICES=1
trtpy -m sq_export compare "$M/fp.onnx" "$M/kl.onnx" "$M/kl.engine" "$M/klr.onnx" "$M/klr.engine" --tokens "$M/t.npz" --perplexity \
    --batches 0 --min-cosine -1 --min-top1 0 --json > "$D/compare.json" 2> "$D/compare.err"
echo "$(date +%T) compare rc $?" >> "$D/log2"; cp "$M/t.npz" "$D/"
