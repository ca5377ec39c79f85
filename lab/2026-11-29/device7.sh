#!/bin/bash
# Prepared 2026-11-30 ~00:30 UTC for the NEXT lease (not yet run). Best on nvidia-h200-x2 (256 GiB host memory: the
# 7B segment builds take 22-32 GB each); on one H200 set BJOBS=3 GPUS=0. TensorRT 8.6 kit from .trtkit2 (zstd
# travels with the LAST part: the tree plus part_00 and zstd exceed one 64 MiB call). Disk: b7 writes four 7B graphs
# (~55 GB) beside the engines: on one H200 (64 GB disk) start b7 with DEC=0 (no decode graphs nor engines).
#   bash lab/2026-11-29/device7.sh kit pin b7 tests   first call, with .trtkit2's stage.sh, MANIFEST, part_00
#   bash .trtkit2/stage.sh                            parts 01..06; part_07 together with .trtkit2/zstd
#   bash lab/2026-11-29/device7.sh poll 300           keep a call in flight until the end (idle 30 s = machine gone)
# Jobs (START):
#   pin   issue 15, first: is the 7B FP16 chain's ~110 TFLOP/s (2026-11-29 23:51 lease) the float MatMuls running
#         in FP32 next to the FP32-pinned norms? A 4-layer Llama-2-7B-width stack, its float and SmoothQuant graphs;
#         FP16 engines with the float MatMuls pinned to FP16 (now the default) and without (--no-fp16-matmuls), at
#         levels 0 and 3, the INT8 engine at 0 and 3; all timed in one bench_trt --engines run (4x256, 8x512,
#         CUDA graph). Reading: the first engine is the reference, every other is labelled int8 by the tool.
#   b7    issues 14/15: the 32-layer 7B prefill graphs AND decode graphs (from placeholders, side by side), split
#         into 8; FP16 and INT8 prefill segment engines (level ${LEVEL:-0}), chains compared and benched; then the
#         decode-step segment engines (static batch 1 and 8, past 512) benched with --decode --cuda-graph.
#   tests  engine tests under the kit (test_engine_segments.py now runs the chains on one shared activation buffer:
#          first GPU run of engine/chain.SharedScratch); gpu  the torch-side GPU tests
#   prefix  issue 17 (after `carry prefix` with .devcarry/p/smol.part_00 + smol.sha256 + .devcarry/whl, then
#         smol.part_01): SmolLM2's every-Linear-INT8 graph with the outlier prefix and --alpha kl (its best PyTorch
#         row), its INT8 engine's perplexity beside ONNX Runtime's on 16 x 256 held-out tokens, and its prefill /
#         decode-step speed against the FP16 engine of the float graph (bench_trt builds both from ONNX, level 0)
#   gemma issue 16 again, on the right token ids: the device's transformers 5.17 converts Gemma-3's GGUF tokenizer
#         differently from 5.24 here (no BOS, finer splits: held-out perplexity ~900 instead of ~66), so the tokenizer
#         made here travels (`carry` with .devcarry/g3tok: tokenizer.json + config + gemma.tokens.npz, 4 x 256 ids
#         made here) and the exports calibrate with --tokenizer; then FP16 / INT8 / INT8 --no-fp16 engines vs ONNX
#         Runtime on those ids. Carry order: g3tok, then .devcarry/p/gemma.part_00 + gemma.sha256 + whl, parts 01..04
#   run   issue 14's one command: `sq-export run CKPT -o OUT --stream --device cuda --segments 2 --build-jobs 2
#         --trt-python /tmp/trtpy.sh` on a 4-layer 7B-width checkpoint, the kit's Python (wrapped so that only it sources
#         the kit's env) building and measuring the segment engines
#   env BJOBS (segment builds at once, default 4), GPUS (their devices, default 0,1), LEVEL (builder level, default 0)
DRIVER=lab/2026-11-29/device7.sh
W=${W:-/tmp/w7}
source "$(cd "$(dirname "$0")/../.." && pwd)/tools/device_jobs.sh"

job_pin() {
  export PYTHONPATH=$ROOT
  local D=$R/pin C=$SHM/pin T=/tmp/pin; mkdir -p "$D" "$C" "$T"
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b --layers 4 -o "$C/l4" -q || return 1
  step "$D" export_fp python3 -m sq_export -q export "$C/l4" --mode fp --weights qdq16 --stream -o "$T/fp.onnx" --json &
  ( step "$D" quant python3 tools/bench_big.py quantize "$C/l4" -o "$C/q" --device cuda --samples 64 \
      && step "$D" export_sq python3 tools/bench_big.py export "$C/q" -o "$T/sq.onnx" --weights qdq16 --lazy ) &
  wait
  need_kit || return 1
  local B="-m sq_export -q build --batch 1:4:8 --seq 1:256:512 --json" g=0 e
  for e in "fp16 fp.onnx fp_pin0 --opt-level 0" "fp16 fp.onnx fp_nopin0 --opt-level 0 --no-fp16-matmuls" \
           "int8 sq.onnx sq0 --opt-level 0" "fp16 fp.onnx fp_pin3 --opt-level 3" "int8 sq.onnx sq3 --opt-level 3"; do
    set -- $e
    ( export CUDA_VISIBLE_DEVICES=$(( g % 2 )); trtpy $B --precision $1 "$T/$2" -o "$T/$3.engine" "${@:4}" \
        > "$D/build_$3.json" 2> "$D/build_$3.err"; echo "$(date +%T) build $3 rc $? $(tail -n 1 "$D/build_$3.err")" >> "$D/log" ) &
    g=$(( g + 1 ))
  done
  wait
  cp "$T"/*.engine.json "$D/" 2>/dev/null
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py --engines "$T/fp_nopin0.engine" "$T/fp_pin0.engine" "$T/sq0.engine" \
      "$T/fp_pin3.engine" "$T/sq3.engine" --shape 4x256 --large 8x512 --cuda-graph --json "$D/bench.json" > "$D/bench.log" 2>&1
  echo "$(date +%T) bench rc $?" >> "$D/log"
}

job_b7() {
  export PYTHONPATH=$ROOT
  local D=$R/b7 C=$SHM/b7 T=/tmp/b7; mkdir -p "$D" "$C" "$T"
  local PROF="--batch 1:4:8 --seq 1:256:512 --opt-level ${LEVEL:-0} --jobs ${BJOBS:-4} --gpus ${GPUS:-0,1} --json"
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b -o "$C/l7b" -q || return 1
  ( step "$D" export_fp16w python3 -m sq_export -q export "$C/l7b" --mode fp --weights qdq16 --stream -o "$T/fp16w.onnx" --json \
      && step "$D" split_fp python3 -m sq_export split "$T/fp16w.onnx" --segments 8 --json ) &
  [ "${DEC:-1}" = 1 ] && ( step "$D" export_fp_dec python3 -m sq_export -q export "$C/l7b" --mode fp --weights qdq16 --stream --decode -o "$T/fp16w_dec.onnx" --json \
      && step "$D" split_fp_dec python3 -m sq_export split "$T/fp16w_dec.onnx" --segments 8 --json ) &
  step "$D" quant_stream python3 tools/bench_big.py quantize "$C/l7b" -o "$C/q" --device cuda --samples 128 || return 1
  step "$D" ppl_stream python3 tools/bench_big.py ppl "$C/q" --device cuda --max-tokens 4096
  step "$D" ppl_fp python3 tools/bench_big.py ppl "$C/l7b" --device cuda --max-tokens 4096
  $SQ tokens "$C/q" -o "$T/t.npz" --seq-len 512 --max-tokens 4096 >> "$D/log" 2>&1
  [ "${DEC:-1}" = 1 ] && ( step "$D" export_sq_dec python3 -c 'import json, sys, sq_export as sq
r = sq.export_onnx(sq.load_quantized(sys.argv[1], lazy=True), sys.argv[2], weights="qdq16", decode=True)
print(json.dumps({"onnx": str(r.path), "bytes": r.bytes, "nodes": r.nodes}))' "$C/q" "$T/sq16_dec.onnx" \
      && step "$D" split_sq_dec python3 -m sq_export split "$T/sq16_dec.onnx" --segments 8 --json ) &
  step "$D" export_qdq16_lazy python3 tools/bench_big.py export "$C/q" -o "$T/sq16.onnx" --weights qdq16 --lazy || return 1
  step "$D" split_sq python3 -m sq_export split "$T/sq16.onnx" --segments 8 --json || return 1
  wait; rm -rf "$C"; du -sb "$T"/*.onnx* >> "$D/log" 2>&1; df -h /tmp >> "$D/log"
  need_kit || return 1
  local p
  for p in "fp16 fp16w fp" "int8 sq16 sq"; do
    set -- $p
    maxrss bash -c 'source /opt/trt86/env.sh; exec "$TRTPY" "$@"' _ -m sq_export -q build "$T/$2.segments.json" -o "$T/$3.segments.json" \
        --precision $1 $PROF > "$D/build_$3.json" 2> "$D/build_$3.err"
    echo "$(date +%T) build $3 segments $(tail -n 1 "$D/build_$3.err")" >> "$D/log"
  done
  cp "$T"/*.seg*.engine.json "$D/" 2>/dev/null
  [ -f "$T/sq.segments.json" ] && [ -f "$T/fp.segments.json" ] || return 1
  PYTHONPATH=$ROOT trtpy -m sq_export compare "$T/fp.segments.json" "$T/sq.segments.json" --tokens "$T/t.npz" --perplexity --batches 0 \
      --min-cosine -1 --min-top1 0 --json > "$D/compare.json" 2> "$D/compare.err"
  echo "$(date +%T) compare $(tail -c 300 "$D/compare.json")" >> "$D/log"
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py --engines "$T/fp.segments.json" "$T/sq.segments.json" --shape 4x256 --large 8x512 --cuda-graph \
      --json "$D/bench_prefill.json" > "$D/bench_prefill.log" 2>&1
  echo "$(date +%T) bench prefill rc $?" >> "$D/log"
  rm -f "$T"/fp.seg*.engine "$T"/sq.seg*.engine
  local b
  [ "${DEC:-1}" = 1 ] || return 0
  for b in ${DEC_BATCHES:-1 8}; do  # decode-step chains: one static profile per batch
    for p in "fp16 fp16w_dec fpD$b" "int8 sq16_dec sqD$b"; do
      set -- $p
      trtpy -m sq_export -q build "$T/$2.segments.json" -o "$T/$3.segments.json" --precision $1 --batch $b:$b:$b --seq 1:1:1 \
          --past 512:512:512 --opt-level ${LEVEL:-0} --jobs ${BJOBS:-4} --gpus ${GPUS:-0,1} --json > "$D/build_$3.json" 2> "$D/build_$3.err"
      echo "$(date +%T) build $3 $(tail -n 1 "$D/build_$3.err")" >> "$D/log"
    done
    trtpy tools/bench_trt.py --engines --decode "$T/fpD$b.segments.json" "$T/sqD$b.segments.json" --batches $b --past 512 \
        --cuda-graph --json "$D/bench_dec_b$b.json" > "$D/bench_dec_b$b.log" 2>&1
    echo "$(date +%T) decode b$b bench rc $?" >> "$D/log"
    rm -f "$T"/fpD$b.seg*.engine "$T"/sqD$b.seg*.engine
  done
}

job_prefix() {
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4 CUDA_VISIBLE_DEVICES=1
  local M=$W/m D=$R/prefix; mkdir -p "$M" "$D"
  gguf_from_parts smol "$M/SmolLM2-135M-Instruct.Q4_1.gguf" || return 1
  local S=$M/SmolLM2-135M-Instruct.Q4_1.gguf C="--samples 64 --device cuda" K="--prefix-outliers auto --alpha kl --smooth-pairs --fallback none"
  $SQ export "$S" --weights qdq $K -o "$M/kl.onnx" $C --json > "$D/kl.export.json" 2> "$D/kl.export.err" &
  $SQ export "$S" --weights qdq $K --decode -o "$M/kl_dec.onnx" $C --json > "$D/kl_dec.export.json" 2> "$D/kl_dec.export.err" &
  $SQ export "$S" --mode fp -o "$M/fp.onnx" --json > "$D/fp.export.json" 2> "$D/fp.export.err" &
  $SQ export "$S" --mode fp --decode -o "$M/fp_dec.onnx" --json > "$D/fp_dec.export.json" 2> "$D/fp_dec.export.err" &
  $SQ tokens "$S" -o "$M/t.npz" --seq-len 256 --max-tokens 4096 &
  wait
  need_kit || return 1
  trtpy -m sq_export -q build "$M/kl.onnx" -o "$M/kl.engine" --batch 1:1:1 --seq 1:256:256 --opt-level 0 --json > "$D/kl.build.json" 2> "$D/kl.build.err"
  trtpy -m sq_export compare "$M/kl.onnx" "$M/kl.engine" --tokens "$M/t.npz" --perplexity --batches 0 --min-cosine -1 --min-top1 0 \
      --json > "$D/kl.compare.json" 2> "$D/kl.compare.err"
  echo "$(date +%T) prefix compare $(tail -c 400 "$D/kl.compare.json")" >> "$D/log"
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$M/fp.onnx" "$M/kl.onnx" --shape 4x256 --large 8x512 --opt-level 0 --workdir "$M/bp" \
      --json "$D/bench_prefill.json" > "$D/bench_prefill.log" 2>&1
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py --decode "$M/fp_dec.onnx" "$M/kl_dec.onnx" --batches 1,8 --past 512 --kv-fp16 --cuda-graph \
      --opt-level 0 --workdir "$M/bd" --json "$D/bench_decode.json" > "$D/bench_decode.log" 2>&1
  echo "$(date +%T) prefix benches done" >> "$D/log"
}

job_gemma() {
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4 CUDA_VISIBLE_DEVICES=1
  local M=$W/gm D=$R/gemma; mkdir -p "$M" "$D"
  gguf_from_parts gemma "$M/gemma-3-270m-q4_k_m.gguf" || return 1
  local G=$M/gemma-3-270m-q4_k_m.gguf C="--samples 16 --device cuda --tokenizer $W/g3tok" T=$W/g3tok/gemma.tokens.npz
  $SQ export "$G" --mode fp -o "$M/fp.onnx" $C --json > "$D/fp.export.json" 2> "$D/fp.export.err" &
  $SQ export "$G" --weights qdq -o "$M/sq.onnx" $C --json > "$D/sq.export.json" 2> "$D/sq.export.err" &
  wait
  need_kit || return 1
  local BD="-m sq_export -q build --batch 1:1:1 --seq 1:256:256 --json --opt-level 0"
  ( CUDA_VISIBLE_DEVICES=0 trtpy $BD --precision fp16 "$M/fp.onnx" -o "$M/fp.engine" > "$D/fp.build.json" 2> "$D/fp.build.err" ) &
  ( CUDA_VISIBLE_DEVICES=1 trtpy $BD "$M/sq.onnx" -o "$M/sq.engine" > "$D/sq.build.json" 2> "$D/sq.build.err" ) &
  ( CUDA_VISIBLE_DEVICES=1 trtpy $BD "$M/sq.onnx" -o "$M/sq32.engine" --no-fp16 > "$D/sq32.build.json" 2> "$D/sq32.build.err" ) &
  wait
  local CP="-m sq_export compare --perplexity --batches 0 --min-cosine -1 --min-top1 0 --json --tokens $T"
  trtpy $CP "$M/fp.onnx" "$M/fp.engine" > "$D/fp.compare.json" 2> "$D/fp.compare.err" &
  trtpy $CP "$M/sq.onnx" "$M/sq.engine" "$M/sq32.engine" > "$D/sq.compare.json" 2> "$D/sq.compare.err" &
  wait
  echo "$(date +%T) gemma fp $(tail -c 300 "$D/fp.compare.json") sq $(tail -c 500 "$D/sq.compare.json")" >> "$D/log"
}

job_run() {
  export PYTHONPATH=$ROOT
  local D=$R/run C=$SHM/run; mkdir -p "$D" "$C"
  printf '#!/bin/bash\nsource /opt/trt86/env.sh\nexec "$TRTPY" "$@"\n' > /tmp/trtpy.sh; chmod +x /tmp/trtpy.sh
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b --layers 4 -o "$C/l4" -q || return 1
  need_kit || return 1
  step "$D" run maxrss python3 -m sq_export run "$C/l4" -o /tmp/run7 --stream --device cuda --weights qdq16 --segments 2 \
      --build-jobs 2 --trt-python /tmp/trtpy.sh --max-tokens 2048 --json
  cp /tmp/run7/*.json /tmp/run7/report.md "$D/" 2>/dev/null
}

job_tests() {  # on the second GPU: the first one times the pin and b7 benches
  need_kit || return 1
  CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$ROOT trtpy -m pytest -q -rfs --noconftest -p no:cacheprovider -s tests/test_engine_*.py 2>&1 | grep -v "^\[W\]\|^\[I\]" | tail -n 60
}

start_job() {
  case $1 in
    gemma) [ "$(ls "$W"/gemma.part_* 2>/dev/null | wc -l)" -ge 5 ] && [ -f "$W/g3tok/tokenizer.json" ] || { echo "gemma: parts still to carry"; return 0; }
           run_job gemma job_gemma ;;
    gpu|tests|pin|b7|run) run_job "$1" "job_$1" ;;
    prefix) [ "$(ls "$W"/smol.part_* 2>/dev/null | wc -l)" -ge 2 ] || { echo "prefix: GGUF parts still to carry"; return 0; }
            run_job prefix job_prefix ;;
    *) return 1 ;;
  esac
}

device_main "$@"
