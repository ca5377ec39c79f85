#!/bin/bash
# Prepared 2026-11-29 ~22:10 UTC; run 2026-11-29 from ~00:00 UTC on nvidia-h200-x2 (two H200s, 256 GiB host memory,
# 128 GiB disk: twice the host memory the 7B segment builds need); TensorRT 8.6 kit from ../shared/trt86, re-split in .trtkit2.
# The frame (kit staging, snapshots, background jobs, poll/report) is tools/device_jobs.sh; this file holds the jobs.
#   bash lab/2026-11-29/device6.sh kit [START...]    stage one carried kit part (.trtkit2), then start jobs
#   bash lab/2026-11-29/device6.sh carry [START...]  copy carried GGUF parts (.devcarry/p) to $W, then start jobs
#   bash lab/2026-11-29/device6.sh poll S            wait up to S s (or until all started jobs are done), report
# Jobs (START):
#   tests    engine tests under TensorRT 8.6 (tests/test_engine_*.py; test_engine_segments.py has never run on a GPU)
#   gemma    (once all GGUF parts are carried) issue 16: Gemma-3-270m float + SmoothQuant graphs (GPU calibration),
#            FP16 and INT8 engines with no pins, perplexity beside ONNX Runtime's on 4 x 256 held-out tokens
#   b7       issues 14 and 15: Llama-2-7B shape, streamed: quantize (GPU) and the compact float graph (CPU) side by
#            side, the SmoothQuant qdq16 graph, both split into 8 segments; FP16 segment engines as soon as the float
#            graph exists, then INT8 (3 builds at a time: a 4-layer 7B-wide INT8 build holds ~34 GB), one profile
#            (batch 1:4:8, seq 1:256:512) for perplexity and the prefill benchmark; the chains' perplexity vs
#            PyTorch's, FP16 chain vs INT8 chain, tools/bench_trt.py --engines prefill 4x256 / 8x512 (+ CUDA graph)
#   b7dec    (after b7 started with DEC=1 in the environment of the call that starts it, which also exports and splits
#            the 7B decode graphs from placeholders) decode-step segment engines per batch (DEC_BATCHES, default
#            "1 8"; past 512), FP16 vs INT8 chains timed by bench_trt --engines --decode --cuda-graph
#   gpu      pytest of the torch side on the GPU (tests/test_gpu.py, test_device.py)
#   env BJOBS (segment builds at once, default 4), GPUS (their CUDA devices, default 0,1)
# Never leave the machine idle: it goes back 30 s after the last call ends (the fifth lease lost a machine so).
DRIVER=lab/2026-11-29/device6.sh
W=${W:-/tmp/w6}
source "$(cd "$(dirname "$0")/../.." && pwd)/tools/device_jobs.sh"

job_b7() {
  export PYTHONPATH=$ROOT
  local D=$R/b7 C=$SHM/b7 T=/tmp/b7; mkdir -p "$D" "$C" "$T"
  local PROF="--batch 1:4:8 --seq 1:256:512 --opt-level 0 --jobs ${BJOBS:-4} --gpus ${GPUS:-0,1} --json"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$D/gpu.txt" 2>&1
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b -o "$C/l7b" -q || return 1
  (  # the float side on the CPU: compact float graph, split, FP16 segment engines
    step "$D" export_fp16w maxrss python3 -m sq_export -q export "$C/l7b" --mode fp --weights qdq16 --stream -o "$T/fp16w.onnx" --json || exit 1
    step "$D" split_fp python3 -m sq_export split "$T/fp16w.onnx" --segments 8 --json || exit 1
    need_kit || exit 1
    maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$T/fp16w.segments.json" -o "$T/fp.segments.json" \
        --precision fp16 $PROF > "$D/build_fp16.json" 2> "$D/build_fp16.err"
    echo "$(date +%T) build_fp16 segments $(tail -n 1 "$D/build_fp16.err")" >> "$D/log"
  ) &
  step "$D" quant_stream python3 tools/bench_big.py quantize "$C/l7b" -o "$C/q" --device cuda --samples 128 || return 1
  step "$D" ppl_stream python3 tools/bench_big.py ppl "$C/q" --device cuda --max-tokens 4096
  step "$D" ppl_fp python3 tools/bench_big.py ppl "$C/l7b" --device cuda --max-tokens 4096
  $SQ tokens "$C/q" -o "$T/t.npz" --seq-len 512 --max-tokens 4096 >> "$D/log" 2>&1
  step "$D" export_qdq16_lazy python3 tools/bench_big.py export "$C/q" -o "$T/sq16.onnx" --weights qdq16 --lazy || return 1
  step "$D" split_sq python3 -m sq_export split "$T/sq16.onnx" --segments 8 --json || return 1
  if [ -n "${DEC:-}" ]; then  # the decode graphs from placeholders too (for job b7dec): ~5 min each, side by side
    ( step "$D" export_sq_dec python3 -c 'import json, sys, sq_export as sq
r = sq.export_onnx(sq.load_quantized(sys.argv[1], lazy=True), sys.argv[2], weights="qdq16", decode=True)
print(json.dumps({"onnx": str(r.path), "bytes": r.bytes, "nodes": r.nodes}))' "$C/q" "$T/sq16_dec.onnx" \
        && step "$D" split_sq_dec python3 -m sq_export split "$T/sq16_dec.onnx" --segments 8 --json ) &
    ( step "$D" export_fp_dec python3 -m sq_export -q export "$C/l7b" --mode fp --weights qdq16 --stream --decode -o "$T/fp16w_dec.onnx" --json \
        && step "$D" split_fp_dec python3 -m sq_export split "$T/fp16w_dec.onnx" --segments 8 --json ) &
  fi
  wait; rm -rf "$C"; du -sb "$T"/*.onnx* >> "$D/log" 2>&1; df -h /tmp >> "$D/log"
  need_kit || return 1
  maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$T/sq16.segments.json" -o "$T/sq.segments.json" \
      --precision int8 $PROF > "$D/build_int8.json" 2> "$D/build_int8.err"
  echo "$(date +%T) build_int8 segments $(tail -n 1 "$D/build_int8.err")" >> "$D/log"
  cp "$T"/*.seg*.engine.json "$D/" 2>/dev/null; ls -la "$T" >> "$D/log"
  [ -f "$T/sq.segments.json" ] && [ -f "$T/fp.segments.json" ] || return 1
  # accuracy: the INT8 chain against the FP16 chain and PyTorch's streamed perplexity (ppl_stream above)
  PYTHONPATH=$ROOT trtpy -m sq_export compare "$T/fp.segments.json" "$T/sq.segments.json" --tokens "$T/t.npz" --perplexity --batches 0 \
      --min-cosine -1 --min-top1 0 --json > "$D/compare.json" 2> "$D/compare.err"
  echo "$(date +%T) compare $(tail -c 400 "$D/compare.json")" >> "$D/log"
  # speed (issue 15): prefill 4x256 and 8x512, plain and as one CUDA graph
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py --engines "$T/fp.segments.json" "$T/sq.segments.json" --shape 4x256 --large 8x512 --cuda-graph \
      --json "$D/bench_prefill.json" > "$D/bench_prefill.log" 2>&1
  echo "$(date +%T) bench rc $?" >> "$D/log"
}

job_b7dec() {  # issue 15 at full size: decode-step engines (one static profile per batch) of the 7B decode graphs
  # (job b7 with DEC=1 exports and splits them), FP16 vs INT8 chains timed by bench_trt --engines --decode
  export PYTHONPATH=$ROOT
  local D=$R/b7 T=/tmp/b7 b
  [ -f "$T/sq16_dec.segments.json" ] && [ -f "$T/fp16w_dec.segments.json" ] || { echo "run job b7 with DEC=1 first"; return 1; }
  need_kit || return 1
  for b in ${DEC_BATCHES:-1 8}; do
    trtpy -m sq_export -q build "$T/fp16w_dec.segments.json" -o "$T/fpD$b.segments.json" --precision fp16 --batch $b:$b:$b \
        --seq 1:1:1 --past 512:512:512 --opt-level 0 --jobs 3 --json > "$D/build_fpD$b.json" 2> "$D/build_fpD$b.err"
    trtpy -m sq_export -q build "$T/sq16_dec.segments.json" -o "$T/sqD$b.segments.json" --precision int8 --batch $b:$b:$b \
        --seq 1:1:1 --past 512:512:512 --opt-level 0 --jobs 3 --json > "$D/build_sqD$b.json" 2> "$D/build_sqD$b.err"
    trtpy tools/bench_trt.py --engines --decode "$T/fpD$b.segments.json" "$T/sqD$b.segments.json" --batches $b --past 512 \
        --cuda-graph --json "$D/bench_dec_b$b.json" > "$D/bench_dec_b$b.log" 2>&1
    echo "$(date +%T) decode b$b bench rc $?" >> "$D/log"
    rm -f "$T"/fpD$b.seg* "$T"/sqD$b.seg* "$T/fpD$b.segments.json" "$T/sqD$b.segments.json"
  done
}

job_tests() {  # the frame's, on the second GPU (the first holds the 7B work)
  need_kit || return 1
  CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$ROOT trtpy -m pytest -q -rfs --noconftest -p no:cacheprovider -s tests/test_engine_*.py 2>&1 | grep -v "^\[W\]\|^\[I\]" | tail -n 60
}

job_gemma() {  # issue 16: Gemma-3-270m's engines with the FP16 fixes, beside ONNX Runtime
  export CUDA_VISIBLE_DEVICES=1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4
  local M=$W/m; mkdir -p "$M"
  cat "$W"/gemma.part_* > "$W/gemma.gguf"
  [ "$(sha256sum "$W/gemma.gguf" | cut -d' ' -f1)" = "$(cat "$W/gemma.sha256")" ] || { echo "gemma GGUF checksum mismatch"; return 1; }
  mv "$W/gemma.gguf" "$M/gemma-3-270m-q4_k_m.gguf"
  local G=$M/gemma-3-270m-q4_k_m.gguf C="--samples 16 --device cuda"
  $SQ export "$G" --mode fp -o "$M/gemma.fp.onnx" $C --json > "$R/gemma.fp.export.json" 2> "$M/gemma.fp.export.err" &
  $SQ export "$G" --weights qdq -o "$M/gemma.sq.onnx" $C --json > "$R/gemma.sq.export.json" 2> "$M/gemma.sq.export.err" &
  $SQ tokens "$G" -o "$M/gemma.tokens.npz" --seq-len 256 --max-tokens 1024 &
  wait
  need_kit || return 1
  local BD="trtpy -m sq_export -q build --batch 1:1:1 --seq 1:256:256 --json --opt-level 0"
  $BD --precision fp16 "$M/gemma.fp.onnx" -o "$M/gemma.fp.engine" > "$R/gemma.fp.build.json" 2> "$M/gemma.fp.build.err" &
  $BD "$M/gemma.sq.onnx" -o "$M/gemma.sq.engine" > "$R/gemma.sq.build.json" 2> "$M/gemma.sq.build.err" &
  wait
  local CP="trtpy -m sq_export compare --perplexity --batches 0 --min-cosine -1 --min-top1 0 --json"
  $CP "$M/gemma.fp.onnx" "$M/gemma.fp.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.fp.compare.json" 2> "$M/gemma.fp.compare.err" &
  $CP "$M/gemma.sq.onnx" "$M/gemma.sq.engine" --tokens "$M/gemma.tokens.npz" > "$R/gemma.sq.compare.json" 2> "$M/gemma.sq.compare.err" &
  wait
  tail -n 3 "$M"/*.build.err "$M"/*.compare.err
}

start_job() {
  case $1 in
    gpu|b7|b7dec|tests) run_job "$1" "job_$1" ;;
    gemma) [ "$(ls "$W"/gemma.part_* 2>/dev/null | wc -l)" -ge 5 ] || { echo "gemma: GGUF parts still to carry"; return 0; }
           run_job gemma job_gemma ;;
    *) return 1 ;;
  esac
}

device_main "$@"
