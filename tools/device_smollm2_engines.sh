#!/bin/bash
# Second half of tools/device_smollm2.sh when full-profile builds are too slow: static batch-1 profile, low builder
# optimization level, FP16 and INT8 built in parallel, then compared on the token file with perplexity.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device_out}; mkdir -p "$OUT/engines"; W=/tmp/sqw
source /opt/trt86/env.sh
export PYTHONPATH=.
SQX='import sys, sq_export.cli as c; c.COMMANDS = ["build", "compare"]; sys.exit(c.main(sys.argv[1:]))'
sqx() { "$TRTPY" -c "$SQX" "$@"; }
L=${OPT_LEVEL:-1}
timeout ${BUILD_TIMEOUT:-400} "$TRTPY" -c "$SQX" build $W/fp.onnx -o $W/fp.engine --precision fp16 --batch 1:1:1 --seq 256:256:256 --opt-level $L --json > $OUT/fp.build.json 2> $OUT/fp.build.log &
timeout ${BUILD_TIMEOUT:-400} "$TRTPY" -c "$SQX" build $W/sq.onnx -o $W/sq.engine --precision int8 --batch 1:1:1 --seq 256:256:256 --opt-level $L --json > $OUT/sq.build.json 2> $OUT/sq.build.log &
wait
tail -n 3 $OUT/fp.build.log $OUT/sq.build.log; ls -la $W/*.engine
sqx compare $W/fp.onnx $W/fp.engine $W/sq.onnx $W/sq.engine --tokens $W/tokens.npz --batches ${BATCHES:-16} --perplexity --min-cosine -1 --min-top1 0 --json > $OUT/compare_all.json 2> $OUT/compare_all.log
echo "compare rc $?"
"$TRTPY" -c 'import json,sys; from sq_export.engine.compare import format_table; print(format_table(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])))' $OUT/compare_all.json
