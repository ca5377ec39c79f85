#!/bin/bash
# Third device session of 2026-11-29 (one H200; TensorRT 8.6 kit from ../shared/trt86, re-split in .trtkit2).
# Everything runs in the background (setsid) so calls stay short; each call prints the state and returns the
# results so far as $OUT/res.tgz.
#   bash lab/2026-11-29/device3.sh kit [START...]   stage one carried kit part (.trtkit2), then start jobs
#   bash lab/2026-11-29/device3.sh carry [START...]   copy carried GGUF parts (.devcarry/p) to $W, then start jobs
#   bash lab/2026-11-29/device3.sh poll S          wait up to S s (or until all started jobs are done), report
# Jobs (START): gpu   pytest of the torch side on the GPU (tests/test_gpu.py, test_device.py)
#               big   issue 14: the 7B-shaped chain (export from placeholders, --lazy, since 17:00; EXPORT_MODE="--trace-device cpu" for the run measured at 15:56) (lab/2026-11-29/device_big.sh chain; the original checkpoint
#                     is deleted once the streamed quantization wrote its smoothed copy: disk)
#               trt   engine tests (once the kit is staged); issue 15 bench (Llama-2-7B shape, $BL layers, prefill + decode,
#                     CUDA graph replay, bandwidth bound); issue 14's compact qdq16 graph vs qdq (2-layer 7B)
#               models (once all GGUF parts are carried) Gemma-3-270m and SmolLM2 engines and their perplexity (issues 16, 17)
set -uo pipefail
cd "$(dirname "$0")/../.."
# every call re-copies the working tree, and a background job importing mid-copy failed once: jobs run from a
# private copy (/tmp/src), made by the first call that starts one
if [ "$PWD" != /tmp/src ] && [ "${1:-poll}" != poll ]; then
  [ -d /tmp/src ] || { mkdir -p /tmp/src; tar --exclude=./.trtkit2 --exclude=./.devcarry --exclude=./.git -cf - . | tar -C /tmp/src -xf -; }
  [ "${1}" = kit ] && { bash .trtkit2/stage.sh | tail -n 1; shift; set -- start "$@"; }
  [ "${1}" = carry ] && { mkdir -p "${W:-/tmp/w3}"; cp -r .devcarry/p/. .devcarry/whl "${W:-/tmp/w3}"/ 2>/dev/null; shift; set -- start "$@"; }
  exec bash /tmp/src/lab/2026-11-29/device3.sh "$@"
fi
ROOT=$PWD
W=${W:-/tmp/w3}; R=$W/res; mkdir -p "$W" "$R"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
BL=${BL:-4}            # bench layers (disk: an 8-layer float32 graph of this shape is 7.6 GB)
SQ="python3 -m sq_export -q"

log() { echo "$(date +%T) $*" >> "$R/log"; }
# TensorRT commands run in a subshell that sources the kit's env (its LD_LIBRARY_PATH holds cuBLAS/cuDNN stand-ins:
# never source it where torch runs on the GPU); jobs wait for the kit, staged while they export
trtpy() { ( source /opt/trt86/env.sh; "$TRTPY" "$@" ) }
need_kit() {
  local end=$(( $(date +%s) + 1500 ))
  until [ -f /opt/trt86/.ready ]; do [ "$(date +%s)" -gt $end ] && { echo "kit never staged"; return 1; }; sleep 5; done
}
run_job() {  # name, command...: in the background, its output to R/name.log, done marker R/name.rc
  local name=$1; shift
  [ -e "$W/$name.started" ] && return 0
  touch "$W/$name.started"; log "start $name"
  setsid nohup bash -c "cd '$ROOT'; $*; echo \$? > '$R/$name.rc'; echo \"\$(date +%T) done $name rc \$(cat '$R/$name.rc')\" >> '$R/log'" \
    > "$R/$name.log" 2>&1 < /dev/null &
}

job_gpu() {
  python3 -m pytest -q -rfs -p no:cacheprovider tests/test_gpu.py tests/test_device.py -x 2>&1 | tail -n 40
}

job_big() {
  export W=/tmp/big R=/tmp/big/res N=${SAMPLES:-128} PYTHONPATH=$ROOT DEV=${DEV:-cuda}
  mkdir -p "$R"
  source <(sed -n '/^step()/,/^}/p' lab/2026-11-29/device_big.sh)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/gpu.txt" 2>&1
  python3 -c 'import torch, transformers, accelerate, safetensors, onnx, onnx_ir, onnxruntime as o; print(torch.__version__, transformers.__version__, accelerate.__version__, safetensors.__version__, onnx.__version__, onnx_ir.__version__, o.__version__)' > "$R/versions.txt" 2>&1
  step ckpt python3 tools/make_big_checkpoint.py ${BIG_ARGS:---shape llama2-7b} -o "$W/l7b" -q
  step cal_whole python3 tools/bench_big.py calibrate "$W/l7b" -o "$W/w" --device $DEV --samples "$N"
  step cal_stream python3 tools/bench_big.py calibrate "$W/l7b" -o "$W/s" --device $DEV --samples "$N" --stream
  step compare python3 tools/bench_big.py compare "$W/w" "$W/s"
  step quant_stream python3 tools/bench_big.py quantize "$W/l7b" -o "$W/q" --device $DEV --samples "$N"
  du -sb "$W/l7b" "$W/q" >> "$R/log" 2>&1
  rm -rf "$W/l7b" "$W/w" "$W/s"
  touch "$W/gpu_phase_done.pre_ppl"
  step ppl_stream python3 tools/bench_big.py ppl "$W/q" --device $DEV --max-tokens 4096
  touch "$W/gpu_free"
  step export_qdq16 python3 tools/bench_big.py export "$W/q" -o "$W/sq16.onnx" --weights qdq16 ${EXPORT_MODE:---lazy}
  du -sb "$W/q" "$W"/sq16.onnx* >> "$R/log" 2>&1; df -h /tmp >> "$R/log"
  step check_qdq16 python3 -m sq_export check "$W/sq16.onnx" --json
}

job_compact() {  # issue 14: TensorRT 8.6 builds the qdq16 form (FP16 weights -> Cast -> Q -> DQ) like the qdq form?
  export PYTHONPATH=$ROOT
  local C=$W/l2 w
  python3 tools/make_big_checkpoint.py --shape llama2-7b --layers 2 -o "$C" -q
  for w in qdq qdq16; do  # the torch side on the GPU
    $SQ export "$C" --recipe paper --weights $w --device cuda --samples 16 -o "$W/l2_$w.onnx" --json || return 1
  done
  $SQ tokens "$C" -o "$W/l2_t.npz" --seq-len 128 --max-tokens 1024
  need_kit || return 1
  for w in qdq qdq16; do
    trtpy -m sq_export -q build "$W/l2_$w.onnx" -o "$W/l2_$w.engine" --precision int8 --batch 1:1:1 --seq 128:128:128 --json
    echo "build $w rc $?"
  done
  trtpy -m sq_export compare "$W/l2_qdq.engine" "$W/l2_qdq16.engine" "$W/l2_qdq.onnx" --tokens "$W/l2_t.npz" --batches 0 --json
  ls -la "$W"/l2_*.onnx* "$W"/l2_*.engine
  rm -f "$W"/l2_*.onnx* ; rm -rf "$C"
}

job_tests() {
  need_kit || return 1
  PYTHONPATH=$ROOT trtpy -m pytest -q -rfs --noconftest -p no:cacheprovider tests/test_engine_*.py
}

job_bench() {  # issue 15, Llama-2-7B shape with $BL layers: FP16 vs INT8 prefill and decode, plain and CUDA graph
  export PYTHONPATH=$ROOT OMP_NUM_THREADS=6
  local B=$W/bench; mkdir -p "$B"
  python3 tools/make_bench_model.py --family llama --layers "$BL" --only fp,sq -o "$B" &
  python3 tools/make_bench_model.py --family llama --layers "$BL" --decode --only fp_dec,sq_dec -o "$B" &
  wait; ls -la "$B"
  need_kit || return 1
  local T="trtpy tools/bench_trt.py --workdir $B"
  # builds in parallel, then timings one at a time on an otherwise idle GPU (after the 7B chain's GPU phases)
  # two builds at a time: four 7B-width builds beside the other jobs filled the 128 GB host (one was OOM-killed)
  $T "$B/fp.onnx" "$B/sq.onnx" --build-only --labels fp16 > "$B/b_fp16.log" 2>&1 &
  $T "$B/fp.onnx" "$B/sq.onnx" --build-only --labels int8 > "$B/b_int8.log" 2>&1 &
  wait
  $T --decode "$B/fp_dec.onnx" "$B/sq_dec.onnx" --build-only --labels fp16 > "$B/b_dfp16.log" 2>&1 &
  $T --decode "$B/fp_dec.onnx" "$B/sq_dec.onnx" --build-only --labels int8 > "$B/b_dint8.log" 2>&1 &
  wait; tail -n 3 "$B"/b_*.log
  local end=$(( $(date +%s) + 300 ))
  while [ ! -e /tmp/big/gpu_free ] && [ "$(date +%s)" -lt $end ]; do sleep 5; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  $T "$B/fp.onnx" "$B/sq.onnx" --reuse --cuda-graph --json "$R/bench_prefill.json"
  $T --decode "$B/fp_dec.onnx" "$B/sq_dec.onnx" --reuse --cuda-graph --json "$R/bench_decode.json"
  $T --decode "$B/fp_dec.onnx" "$B/sq_dec.onnx" --reuse --cuda-graph --kv-fp16 --batches 1 --json "$R/bench_decode_kv16.json" 2>&1 | tail -n 8
  ls -la "$B"; rm -f "$B"/*.onnx*
}

job_models() {  # issues 16 and 17: Gemma-3-270m and SmolLM2 through TensorRT 8.6
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4
  local m
  for m in smol gemma; do
    cat "$W/$m".part_* > "$W/$m.gguf"
    [ "$(sha256sum "$W/$m.gguf" | cut -d' ' -f1)" = "$(cat "$W/$m.sha256")" ] || { echo "$m GGUF checksum mismatch"; return 1; }
  done
  mv "$W/smol.gguf" "$W/SmolLM2-135M-Instruct.Q4_1.gguf"; mv "$W/gemma.gguf" "$W/gemma-3-270m-q4_k_m.gguf"
  local S=$W/SmolLM2-135M-Instruct.Q4_1.gguf G=$W/gemma-3-270m-q4_k_m.gguf C="--samples 16 --device cpu"
  # exports on the CPU (the path measured on this project's machine), all at once
  $SQ export "$G" --mode fp -o "$W/gemma.fp.onnx" $C --json > "$R/gemma.fp.export.json" 2> "$W/gemma.fp.export.err" &
  $SQ export "$G" --weights qdq -o "$W/gemma.sq.onnx" $C --json > "$R/gemma.sq.export.json" 2> "$W/gemma.sq.export.err" &
  $SQ tokens "$G" -o "$W/gemma.tokens.npz" --seq-len 256 --max-tokens 4096 &
  $SQ export "$S" --weights qdq -o "$W/smol.sq.onnx" $C --json > "$R/smol.sq.export.json" 2> "$W/smol.sq.export.err" &
  $SQ export "$S" --weights qdq --prefix-outliers auto --alpha 0.85 --fallback none -o "$W/smol.px.onnx" $C --json > "$R/smol.px.export.json" 2> "$W/smol.px.export.err" &
  $SQ tokens "$S" -o "$W/smol.tokens.npz" --seq-len 256 --max-tokens 4096 &
  wait
  tail -n 2 "$W"/*.export.err; cp "$W"/*.tokens.npz "$R/" 2>/dev/null
  need_kit || return 1
  # builder optimization level 0 for all: SmolLM2's graphs (8,666 nodes) at the default level 3 were still building
  # after 18 minutes (single-threaded Myelin compile); at level 0 they took 286-412 s on 2026-11-22
  local BD="trtpy -m sq_export -q build --batch 1:1:1 --seq 1:256:256 --json --opt-level 0"
  $BD "$W/smol.sq.onnx" -o "$W/smol.sq.engine" > "$R/smol.sq.build.json" 2> "$W/smol.sq.build.err" &
  $BD "$W/smol.px.onnx" -o "$W/smol.px.engine" > "$R/smol.px.build.json" 2> "$W/smol.px.build.err" &
  $BD "$W/gemma.sq.onnx" -o "$W/gemma.sq.engine" > "$R/gemma.sq.build.json" 2> "$W/gemma.sq.build.err" &
  $BD --no-fp16 "$W/gemma.sq.onnx" -o "$W/gemma.sq32.engine" > "$R/gemma.sq32.build.json" 2> "$W/gemma.sq32.build.err" &
  $BD --precision fp16 --fp32-nodes 'layers\.\d+/(Add(_1)?|mlp/down_proj/MatMul)$' "$W/gemma.fp.onnx" -o "$W/gemma.fp.engine" \
      > "$R/gemma.fp.build.json" 2> "$W/gemma.fp.build.err" &
  wait
  tail -n 3 "$W"/*.build.err
  local CP="trtpy -m sq_export compare --perplexity --batches 0 --min-cosine -1 --min-top1 0 --json"
  $CP "$W/smol.sq.onnx" "$W/smol.sq.engine" --tokens "$W/smol.tokens.npz" > "$R/smol.sq.compare.json" 2> "$W/smol.sq.compare.err" &
  $CP "$W/smol.px.onnx" "$W/smol.px.engine" --tokens "$W/smol.tokens.npz" > "$R/smol.px.compare.json" 2> "$W/smol.px.compare.err" &
  $CP "$W/gemma.sq32.engine" "$W/gemma.sq.engine" "$W/gemma.fp.engine" --tokens "$W/gemma.tokens.npz" > "$R/gemma.compare.json" 2> "$W/gemma.compare.err" &
  wait
  tail -n 5 "$W"/*.compare.err
}

start() {
  local j
  for j in "$@"; do
    case $j in
      gpu) run_job gpu job_gpu ;;
      big) run_job big job_big ;;
      trt) run_job tests job_tests; run_job bench job_bench; run_job compact job_compact ;;
      models) [ "$(ls "$W"/*.part_* 2>/dev/null | wc -l)" -ge 7 ] || { echo "models: GGUF parts still to carry"; continue; }
              run_job models job_models ;;
    esac
  done
}

report() {
  echo "== $(date +%T) $(df -h /tmp | tail -1 | awk '{print "disk used " $3 " of " $2}'); $(free -g | awk '/Mem/{print "RAM used " $3 " GiB"}'); GPU $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  cat "$R/log" 2>/dev/null | tail -n 30
  [ -f /tmp/big/res/log ] && { echo "-- big:"; cat /tmp/big/res/log; cat /tmp/big/res/big.jsonl 2>/dev/null; }
  for f in "$R"/*.log; do [ -s "$f" ] && { echo "-- $(basename "$f"):"; tail -n 6 "$f"; }; done
  mkdir -p "$R/big"; cp /tmp/big/res/* "$R/big/" 2>/dev/null; cp "$W"/bench/*.log "$R/" 2>/dev/null
  tar -C "$W" -czf "${OUT:-/tmp}/res.tgz" res 2>/dev/null
}

export -f log trtpy need_kit run_job job_gpu job_big job_compact job_tests job_bench job_models
export W R ROOT BL SQ
case ${1:-poll} in
  start) shift; start "$@"; report ;;
  poll) end=$(( $(date +%s) + ${2:-60} ))
        while [ "$(date +%s)" -lt $end ]; do
          busy=0; for s in "$W"/*.started; do [ -e "$s" ] || continue; n=$(basename "$s" .started); [ -e "$R/$n.rc" ] || busy=1; done
          [ $busy = 0 ] && break; sleep 10
        done
        report ;;
esac
