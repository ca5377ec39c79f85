#!/bin/bash
# Fourth device session of 2026-11-29 (one H200; TensorRT 8.6 kit from ../shared/trt86, re-split in .trtkit2).
# It ran with its frame inline; that frame is now tools/device_jobs.sh (the same, plus a host-memory column in
# gpumem.csv and a report of every result folder), which this file sources.
#   bash lab/2026-11-29/device4.sh kit [START...]    stage one carried kit part (.trtkit2), then start jobs
#   bash lab/2026-11-29/device4.sh carry [START...]  copy carried GGUF parts (.devcarry/p) to $W, then start jobs
#   bash lab/2026-11-29/device4.sh poll S            wait up to S s (or until all started jobs are done), report
# Jobs (START):
#   gpu      pytest of the torch side on the GPU (tests/test_gpu.py incl. the --trace-device cuda bytes test, test_device.py)
#   b7       issue 14: Llama-2-7B-shaped checkpoint, streamed on the GPU: quantize (calibrates as it goes), PyTorch
#            perplexity of the result, export from placeholders (--lazy, qdq16), check, then its INT8 TensorRT 8.6
#            engine (32 layers) and the engine's perplexity on the same tokens. Checkpoint and result in /dev/shm
#            (the 64 GB disk cannot hold 7B and 13B at once), each deleted as soon as nothing needs it.
#   b13      issue 14: Llama-2-13B-shaped checkpoint (26 GB, in /dev/shm), streamed: calibrate, quantize, export from
#            placeholders (--weights int8: 13 GB), check. Memory flat in depth: the 7B table's columns at 13B.
#   tests    engine tests under TensorRT 8.6 (tests/test_engine_*.py)
#   models   (once all GGUF parts are carried) SmolLM2 default + outlier-prefix INT8 engines and Gemma-3-270m
#            engines with the residual stream pinned to FP32, and their perplexity beside ONNX Runtime's
#   compactfp  (a later call, from that call's tree) the float graph's compact form (float16 weights -> Cast) vs
#            the plain one, 2-layer 7B shape, FP16 engines, identical logits?
DRIVER=lab/2026-11-29/device4.sh
W=${W:-/tmp/w4}
source "$(cd "$(dirname "$0")/../.." && pwd)/tools/device_jobs.sh"

job_b7() {
  export PYTHONPATH=$ROOT
  local D=$R/b7 C=$SHM/b7 T=/tmp/b7; mkdir -p "$D" "$C" "$T"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$D/gpu.txt" 2>&1
  python3 -c 'import torch, transformers, accelerate, safetensors, onnx, onnx_ir, onnxruntime as o; print(torch.__version__, transformers.__version__, accelerate.__version__, safetensors.__version__, onnx.__version__, onnx_ir.__version__, o.__version__)' > "$D/versions.txt" 2>&1
  df -h /dev/shm /tmp > "$D/df.txt" 2>&1
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b -o "$C/l7b" -q || return 1
  step "$D" quant_stream python3 tools/bench_big.py quantize "$C/l7b" -o "$C/q" --device cuda --samples 128 || return 1
  du -sb "$C/l7b" "$C/q" >> "$D/log" 2>&1; rm -rf "$C/l7b"
  step "$D" ppl_stream python3 tools/bench_big.py ppl "$C/q" --device cuda --max-tokens 4096
  $SQ tokens "$C/q" -o "$T/t.npz" --seq-len 512 --max-tokens 4096 >> "$D/log" 2>&1
  step "$D" export_qdq16_lazy python3 tools/bench_big.py export "$C/q" -o "$C/sq16.onnx" --weights qdq16 --lazy || return 1
  du -sb "$C"/sq16.onnx* >> "$D/log" 2>&1; rm -rf "$C/q"
  step "$D" check_qdq16 python3 -m sq_export check "$C/sq16.onnx" --json
  need_kit || return 1
  # 32 layers at builder level 0 (the default level 3 took >18 min on SmolLM2's graphs); the peak host RSS of a
  # TensorRT 8.6 build of a 7B graph is one of the questions
  maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$C/sq16.onnx" -o "$T/sq.engine" --precision int8 --batch 1:1:1 --seq 1:512:512 \
      --opt-level 0 --json > "$D/build_int8.json" 2> "$D/build_int8.err"
  echo "$(date +%T) build_int8 $(tail -n 1 "$D/build_int8.err")" >> "$D/log"
  ls -la "$T" >> "$D/log"; rm -rf "$C"
  [ -f "$T/sq.engine" ] || return 1
  PYTHONPATH=$ROOT trtpy -c "import json, sys; from sq_export.engine.run import engine_perplexity
print(json.dumps(engine_perplexity(sys.argv[1], sys.argv[2]), default=str))" "$T/sq.engine" "$T/t.npz" > "$D/engine_ppl.json" 2> "$D/engine_ppl.err"
  echo "$(date +%T) engine_ppl $(tail -c 300 "$D/engine_ppl.json")" >> "$D/log"
  rm -f "$T/sq.engine"
}

job_b13() {
  export PYTHONPATH=$ROOT
  local D=$R/b13 C=$SHM/b13 T=/tmp/b13; mkdir -p "$D" "$C" "$T"
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-13b -o "$C/l13b" -q || return 1
  step "$D" cal_stream python3 tools/bench_big.py calibrate "$C/l13b" -o "$T/s" --device cuda --samples 128 --stream
  step "$D" quant_stream python3 tools/bench_big.py quantize "$C/l13b" -o "$T/q" --device cuda --samples 128 || return 1
  du -sb "$C/l13b" "$T/q" >> "$D/log" 2>&1; rm -rf "$C"
  step "$D" export_int8_lazy python3 tools/bench_big.py export "$T/q" -o "$T/sq8.onnx" --weights int8 --lazy || return 1
  du -sb "$T"/sq8.onnx* >> "$D/log" 2>&1; df -h /tmp >> "$D/log"
  step "$D" check_int8 python3 -m sq_export check "$T/sq8.onnx" --json
  rm -rf "$T"
}

job_buildmem() {  # after the 32-layer INT8 build was OOM-killed at 79.5 GB: TensorRT 8.6 build host RSS vs depth
  export PYTHONPATH=$ROOT
  local D=$R/buildmem C=$W/bm L; mkdir -p "$D" "$C"
  for L in 4 8; do
    python3 tools/make_big_checkpoint.py --shape llama2-7b --layers $L -o "$C/c$L" -q || return 1
    $SQ export "$C/c$L" --stream "$C/q$L" --weights qdq16 --fallback none --device cuda --samples 32 -o "$C/sq$L.onnx" --json > "$D/export$L.json" 2> "$D/export$L.err" || return 1
    rm -rf "$C/c$L" "$C/q$L"
    need_kit || return 1
    maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$C/sq$L.onnx" -o "$C/sq$L.engine" --precision int8 \
        --batch 1:1:1 --seq 1:512:512 --opt-level 0 --json > "$D/build$L.json" 2> "$D/build$L.err"
    echo "$(date +%T) layers $L $(tail -n 1 "$D/build$L.err") engine $(stat -c %s "$C/sq$L.engine" 2>/dev/null)" >> "$D/log"
    rm -rf "$C"/sq$L.*
  done
}

job_gemmasq() {  # started beside the models job (its Gemma INT8 builds wait for the SmolLM2 builds): same builds now
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4
  local M=$W/m BD="trtpy -m sq_export -q build --batch 1:1:1 --seq 1:256:256 --json --opt-level 0" PIN='layers\.\d+/(Add(_1)?|mlp/down_proj/MatMul)$'
  local CP="trtpy -m sq_export compare --perplexity --batches 0 --min-cosine -1 --min-top1 0 --json"
  $CP "$M/gemma.fp.onnx" "$M/gemma.fp.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.fp.compare2.json" 2> "$R/gemma.fp.compare2.err" &
  $BD --fp32-nodes "$PIN" "$M/gemma.sq.onnx" -o "$M/gemma.sqp.engine" > "$R/gemma.sqp.build.json" 2> "$R/gemma.sqp.build.err" &
  $BD --no-fp16 "$M/gemma.sq.onnx" -o "$M/gemma.sq32b.engine" > "$R/gemma.sq32b.build.json" 2> "$R/gemma.sq32b.build.err" &
  wait
  $CP "$M/gemma.sq.onnx" "$M/gemma.sqp.engine" "$M/gemma.sq32b.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.sq.compare2.json" 2> "$R/gemma.sq.compare2.err"
}

job_tests() {  # (as it ran: the frame's job_tests adds -s and filters the kit's log lines)
  need_kit || return 1
  PYTHONPATH=$ROOT trtpy -m pytest -q -rfs --noconftest -p no:cacheprovider tests/test_engine_*.py
}

job_models() {  # issues 16 and 17: Gemma-3-270m and SmolLM2 through TensorRT 8.6
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4
  local m M=$W/m; mkdir -p "$M"
  for m in smol gemma; do
    cat "$W/$m".part_* > "$W/$m.gguf"
    [ "$(sha256sum "$W/$m.gguf" | cut -d' ' -f1)" = "$(cat "$W/$m.sha256")" ] || { echo "$m GGUF checksum mismatch"; return 1; }
  done
  mv "$W/smol.gguf" "$M/SmolLM2-135M-Instruct.Q4_1.gguf"; mv "$W/gemma.gguf" "$M/gemma-3-270m-q4_k_m.gguf"
  local S=$M/SmolLM2-135M-Instruct.Q4_1.gguf G=$M/gemma-3-270m-q4_k_m.gguf C="--samples 16 --device cpu"
  # exports on the CPU (the path measured on this project's machine), all at once
  $SQ export "$G" --mode fp -o "$M/gemma.fp.onnx" $C --json > "$R/gemma.fp.export.json" 2> "$M/gemma.fp.export.err" &
  $SQ export "$G" --weights qdq -o "$M/gemma.sq.onnx" $C --json > "$R/gemma.sq.export.json" 2> "$M/gemma.sq.export.err" &
  $SQ tokens "$G" -o "$M/gemma.tokens.npz" --seq-len 256 --max-tokens 4096 &
  $SQ export "$S" --weights qdq -o "$M/smol.sq.onnx" $C --json > "$R/smol.sq.export.json" 2> "$M/smol.sq.export.err" &
  $SQ export "$S" --weights qdq --prefix-outliers auto --alpha 0.85 --fallback none -o "$M/smol.px.onnx" $C --json > "$R/smol.px.export.json" 2> "$M/smol.px.export.err" &
  $SQ tokens "$S" -o "$M/smol.tokens.npz" --seq-len 256 --max-tokens 4096 &
  wait
  tail -n 2 "$M"/*.export.err; cp "$M"/*.tokens.npz "$R/" 2>/dev/null
  need_kit || return 1
  # builder level 0 (SmolLM2's graphs at level 3 were still compiling after 18 min); Gemma-3's residual stream
  # reaches 93,380 (> FP16's 65,504, docs/ACCURACY.md): its residual adds (layers.N/Add, Add_1) and down_proj
  # pinned to FP32
  local BD="trtpy -m sq_export -q build --batch 1:1:1 --seq 1:256:256 --json --opt-level 0" PIN='layers\.\d+/(Add(_1)?|mlp/down_proj/MatMul)$'
  $BD "$M/smol.sq.onnx" -o "$M/smol.sq.engine" > "$R/smol.sq.build.json" 2> "$M/smol.sq.build.err" &
  $BD "$M/smol.px.onnx" -o "$M/smol.px.engine" > "$R/smol.px.build.json" 2> "$M/smol.px.build.err" &
  $BD --precision fp16 --fp32-nodes "$PIN" "$M/gemma.fp.onnx" -o "$M/gemma.fp.engine" > "$R/gemma.fp.build.json" 2> "$M/gemma.fp.build.err" &
  wait
  $BD --fp32-nodes "$PIN" "$M/gemma.sq.onnx" -o "$M/gemma.sq.engine" > "$R/gemma.sq.build.json" 2> "$M/gemma.sq.build.err" &
  $BD --no-fp16 "$M/gemma.sq.onnx" -o "$M/gemma.sq32.engine" > "$R/gemma.sq32.build.json" 2> "$M/gemma.sq32.build.err" &
  local CP="trtpy -m sq_export compare --perplexity --batches 0 --min-cosine -1 --min-top1 0 --json"
  $CP "$M/smol.sq.onnx" "$M/smol.sq.engine" --tokens "$M/smol.tokens.npz" > "$R/smol.sq.compare.json" 2> "$M/smol.sq.compare.err" &
  $CP "$M/smol.px.onnx" "$M/smol.px.engine" --tokens "$M/smol.tokens.npz" > "$R/smol.px.compare.json" 2> "$M/smol.px.compare.err" &
  $CP "$M/gemma.fp.onnx" "$M/gemma.fp.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.fp.compare.json" 2> "$M/gemma.fp.compare.err" &
  wait
  $CP "$M/gemma.sq.onnx" "$M/gemma.sq.engine" "$M/gemma.sq32.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.sq.compare.json" 2> "$M/gemma.sq.compare.err"
  tail -n 3 "$M"/*.build.err "$M"/*.compare.err
  ls -la "$M"
}

job_compactfp() {  # the float graph's compact form under TensorRT 8.6 (2-layer Llama-2-7B shape)
  export PYTHONPATH=$ROOT
  local C=$W/fp2; mkdir -p "$C"
  python3 tools/make_big_checkpoint.py --shape llama2-7b --layers 2 -o "$C/l2" -q || return 1
  $SQ export "$C/l2" --mode fp -o "$C/fp.onnx" --json || return 1
  $SQ export "$C/l2" --mode fp --weights qdq16 --stream -o "$C/fp16w.onnx" --json || return 1
  $SQ tokens "$C/l2" -o "$C/t.npz" --seq-len 128 --max-tokens 1024
  ls -la "$C"
  need_kit || return 1
  local f
  for f in fp fp16w; do
    trtpy -m sq_export -q build "$C/$f.onnx" -o "$C/$f.engine" --precision fp16 --batch 1:1:1 --seq 128:128:128 --opt-level 0 --json
    echo "build $f rc $?"
  done
  trtpy -m sq_export compare "$C/fp.engine" "$C/fp16w.engine" "$C/fp.onnx" --tokens "$C/t.npz" --batches 0 --json
  ls -la "$C"; rm -rf "$C"
}

start_job() {
  case $1 in
    gpu|b7|b13|tests|compactfp|buildmem|gemmasq) run_job "$1" "job_$1" ;;
    buildmem2) run_job buildmem2 job_buildmem ;;
    models) [ "$(ls "$W"/*.part_* 2>/dev/null | wc -l)" -ge 7 ] || { echo "models: GGUF parts still to carry"; return 0; }
            run_job models job_models ;;
    *) return 1 ;;
  esac
}

device_main "$@"
