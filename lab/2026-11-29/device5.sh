#!/bin/bash
# Fifth device session of 2026-11-29 (one H200; TensorRT 8.6 kit from ../shared/trt86, re-split in .trtkit2).
# Its frame was moved, unchanged, into tools/device_jobs.sh after the lease (this file ran with it inline).
#   bash lab/2026-11-29/device5.sh kit [START...]    stage one carried kit part (.trtkit2), then start jobs
#   bash lab/2026-11-29/device5.sh carry [START...]  copy carried GGUF parts (.devcarry/p) to $W, then start jobs
#   bash lab/2026-11-29/device5.sh poll S            wait up to S s (or until all started jobs are done), report
# Jobs (START):
#   gpu      pytest of the torch side on the GPU (tests/test_gpu.py, test_device.py)
#   tests    engine tests under TensorRT 8.6 (tests/test_engine_*.py, incl. the new test_engine_segments.py)
#   b7       issue 14: Llama-2-7B-shaped checkpoint, streamed on the GPU: quantize, PyTorch perplexity, export from
#            placeholders (qdq16, to disk), check, `split --segments 8` and `build MANIFEST --jobs 3` (one INT8 engine
#            per 4 layers: the whole 32-layer build was OOM-killed at 79.5 GB), the chain's perplexity vs PyTorch's;
#            then the compact float graph (exported beside the quantize from the same checkpoint) as FP16 segments
#   models   (once all GGUF parts are carried) Gemma-3-270m FP16 + INT8 engines without pins (the export patches
#            and build's mask-fill rewrite), SmolLM2 default INT8 whole vs 3 segments, SmolLM2 --alpha kl prefix
#            INT8; perplexity beside ONNX Runtime's
DRIVER=lab/2026-11-29/device5.sh
W=${W:-/tmp/w5}
source "$(cd "$(dirname "$0")/../.." && pwd)/tools/device_jobs.sh"

job_b7() {
  export PYTHONPATH=$ROOT
  local D=$R/b7 C=$SHM/b7 T=/tmp/b7; mkdir -p "$D" "$C" "$T"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$D/gpu.txt" 2>&1
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b -o "$C/l7b" -q || return 1
  # the compact float graph of the checkpoint, on the CPU beside the GPU quantize
  ( step "$D" export_fp16w maxrss python3 -m sq_export -q export "$C/l7b" --mode fp --weights qdq16 --stream -o "$T/fp16w.onnx" --json ) &
  step "$D" quant_stream python3 tools/bench_big.py quantize "$C/l7b" -o "$C/q" --device cuda --samples 128 || return 1
  step "$D" ppl_stream python3 tools/bench_big.py ppl "$C/q" --device cuda --max-tokens 4096
  $SQ tokens "$C/q" -o "$T/t.npz" --seq-len 512 --max-tokens 4096 >> "$D/log" 2>&1
  step "$D" export_qdq16_lazy python3 tools/bench_big.py export "$C/q" -o "$T/sq16.onnx" --weights qdq16 --lazy || return 1
  wait; rm -rf "$C"; du -sb "$T"/*.onnx* >> "$D/log" 2>&1; df -h /tmp >> "$D/log"
  step "$D" check_qdq16 python3 -m sq_export check "$T/sq16.onnx" --json
  step "$D" split_sq python3 -m sq_export split "$T/sq16.onnx" --segments 8 --json || return 1
  need_kit || return 1
  # one INT8 engine per 4 layers, 3 builds at once (a 4-layer 7B-wide build held 34.3 GB), builder level 0
  maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$T/sq16.segments.json" -o "$T/sq.segments.json" \
      --precision int8 --batch 1:1:1 --seq 1:512:512 --opt-level 0 --jobs 3 --json > "$D/build_int8.json" 2> "$D/build_int8.err"
  echo "$(date +%T) build_int8 segments $(tail -n 1 "$D/build_int8.err")" >> "$D/log"
  cp "$T"/sq.seg*.engine.json "$D/" 2>/dev/null; ls -la "$T" >> "$D/log"
  if [ -f "$T/sq.segments.json" ]; then
    PYTHONPATH=$ROOT trtpy -c "import json, sys; from sq_export.engine.run import engine_perplexity
print(json.dumps(engine_perplexity(sys.argv[1], sys.argv[2]), default=str))" "$T/sq.segments.json" "$T/t.npz" > "$D/engine_ppl.json" 2> "$D/engine_ppl.err"
    echo "$(date +%T) engine_ppl $(tail -c 300 "$D/engine_ppl.json")" >> "$D/log"
    rm -f "$T"/sq.seg*.engine
  fi
  [ -f "$T/fp16w.onnx" ] || return 1
  step "$D" split_fp python3 -m sq_export split "$T/fp16w.onnx" --segments 8 --json || return 1
  maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$T/fp16w.segments.json" -o "$T/fp.segments.json" \
      --precision fp16 --batch 1:1:1 --seq 1:512:512 --opt-level 0 --jobs 3 --json > "$D/build_fp16.json" 2> "$D/build_fp16.err"
  echo "$(date +%T) build_fp16 segments $(tail -n 1 "$D/build_fp16.err")" >> "$D/log"
  cp "$T"/fp.seg*.engine.json "$D/" 2>/dev/null; ls -la "$T" >> "$D/log"
}

job_b7seg() {  # the b7 job's split (before the weight-only fix) handed qdq16's weight Casts across cuts: stop it,
  # split again with this call's tree, build the INT8 segments, the chain's perplexity, then the FP16 segments
  pkill -f "job_b7;" ; pkill -f "/tmp/b7/"; sleep 2
  export PYTHONPATH=$ROOT
  local D=$R/b7 T=/tmp/b7
  rm -f "$T"/sq.seg* "$T"/sq.segments.json "$T"/sq16.seg* "$T"/sq16.segments.json
  step "$D" split_sq2 python3 -m sq_export split "$T/sq16.onnx" --segments 8 --json || return 1
  step "$D" split_fp2 python3 -m sq_export split "$T/fp16w.onnx" --segments 8 --json
  need_kit || return 1
  maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$T/sq16.segments.json" -o "$T/sq.segments.json" \
      --precision int8 --batch 1:1:1 --seq 1:512:512 --opt-level 0 --jobs 4 --json > "$D/build_int8.json" 2> "$D/build_int8.err"
  echo "$(date +%T) build_int8 segments $(tail -n 1 "$D/build_int8.err")" >> "$D/log"
  cp "$T"/sq.seg*.engine.json "$D/" 2>/dev/null; ls -la "$T" >> "$D/log"
  if [ -f "$T/sq.segments.json" ]; then
    PYTHONPATH=$ROOT trtpy -c "import json, sys; from sq_export.engine.run import engine_perplexity
print(json.dumps(engine_perplexity(sys.argv[1], sys.argv[2]), default=str))" "$T/sq.segments.json" "$T/t.npz" > "$D/engine_ppl.json" 2> "$D/engine_ppl.err"
    echo "$(date +%T) engine_ppl $(tail -c 300 "$D/engine_ppl.json")" >> "$D/log"
  fi
}

job_models() {  # issues 16, 17 and the segments on a real model: Gemma-3-270m and SmolLM2 through TensorRT 8.6
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=3
  local m M=$W/m; mkdir -p "$M"
  for m in smol gemma; do
    cat "$W/$m".part_* > "$W/$m.gguf"
    [ "$(sha256sum "$W/$m.gguf" | cut -d' ' -f1)" = "$(cat "$W/$m.sha256")" ] || { echo "$m GGUF checksum mismatch"; return 1; }
  done
  mv "$W/smol.gguf" "$M/SmolLM2-135M-Instruct.Q4_1.gguf"; mv "$W/gemma.gguf" "$M/gemma-3-270m-q4_k_m.gguf"
  local S=$M/SmolLM2-135M-Instruct.Q4_1.gguf G=$M/gemma-3-270m-q4_k_m.gguf C="--samples 16 --device ${MDEV:-cpu}"
  $SQ export "$G" --mode fp -o "$M/gemma.fp.onnx" $C --json > "$R/gemma.fp.export.json" 2> "$M/gemma.fp.export.err" &
  $SQ export "$G" --weights qdq -o "$M/gemma.sq.onnx" $C --json > "$R/gemma.sq.export.json" 2> "$M/gemma.sq.export.err" &
  $SQ tokens "$G" -o "$M/gemma.tokens.npz" --seq-len 256 --max-tokens 4096 &
  $SQ export "$S" --weights qdq -o "$M/smol.sq.onnx" $C --json > "$R/smol.sq.export.json" 2> "$M/smol.sq.export.err" &
  [ -z "${NOKL:-}" ] && $SQ export "$S" --weights qdq --prefix-outliers auto --alpha kl --smooth-pairs --fallback none -o "$M/smol.kl.onnx" $C --json > "$R/smol.kl.export.json" 2> "$M/smol.kl.export.err" &
  $SQ tokens "$S" -o "$M/smol.tokens.npz" --seq-len 256 --max-tokens 4096 &
  wait
  tail -n 2 "$M"/*.export.err; cp "$M"/*.tokens.npz "$R/" 2>/dev/null
  python3 -m sq_export split "$M/smol.sq.onnx" --segments 3 --json > "$R/smol.split.json" 2> "$M/smol.split.err"
  need_kit || return 1
  local BD="trtpy -m sq_export -q build --batch 1:1:1 --seq 1:256:256 --json --opt-level 0"
  $BD --precision fp16 "$M/gemma.fp.onnx" -o "$M/gemma.fp.engine" > "$R/gemma.fp.build.json" 2> "$M/gemma.fp.build.err" &
  $BD "$M/gemma.sq.onnx" -o "$M/gemma.sq.engine" > "$R/gemma.sq.build.json" 2> "$M/gemma.sq.build.err" &
  $BD "$M/smol.sq.onnx" -o "$M/smol.sq.engine" > "$R/smol.sq.build.json" 2> "$M/smol.sq.build.err" &
  $BD "$M/smol.sq.segments.json" -o "$M/smol.sqe.segments.json" --jobs 3 > "$R/smol.seg.build.json" 2> "$M/smol.seg.build.err" &
  [ -f "$M/smol.kl.onnx" ] && $BD "$M/smol.kl.onnx" -o "$M/smol.kl.engine" > "$R/smol.kl.build.json" 2> "$M/smol.kl.build.err" &
  wait
  local CP="trtpy -m sq_export compare --perplexity --batches 0 --min-cosine -1 --min-top1 0 --json"
  $CP "$M/gemma.fp.onnx" "$M/gemma.fp.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.fp.compare.json" 2> "$M/gemma.fp.compare.err" &
  $CP "$M/gemma.sq.onnx" "$M/gemma.sq.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.sq.compare.json" 2> "$M/gemma.sq.compare.err" &
  $CP "$M/smol.sq.engine" "$M/smol.sqe.segments.json" "$M/smol.sq.onnx" --tokens "$M/smol.tokens.npz" > "$R/smol.seg.compare.json" 2> "$M/smol.seg.compare.err" &
  [ -f "$M/smol.kl.engine" ] && $CP "$M/smol.kl.onnx" "$M/smol.kl.engine" --tokens "$M/smol.tokens.npz" > "$R/smol.kl.compare.json" 2> "$M/smol.kl.compare.err" &
  wait
  tail -n 3 "$M"/*.build.err "$M"/*.compare.err
  ls -la "$M"
}

start_job() {
  case $1 in
    gpu|b7|b7seg|tests) run_job "$1" "job_$1" ;;
    models|models2) [ "$(ls "$W"/*.part_* 2>/dev/null | wc -l)" -ge 7 ] || { echo "models: GGUF parts still to carry"; return 0; }
                    if [ "$1" = models2 ]; then MDEV=cuda NOKL=1 run_job models job_models; else run_job models job_models; fi ;;
    *) return 1 ;;
  esac
}

device_main "$@"
