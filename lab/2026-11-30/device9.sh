#!/bin/bash
# Prepared 2026-11-30 ~05:40 UTC; ran 2026-11-30 07:38-08:07 UTC (the ninth lease; logs9/, lab README). nvidia-h200-x2 preferred (on one H200: G1=0).
# TensorRT 8.6 kit from .trtkit2. EVERY kit call carries stage.sh and MANIFEST beside its part:
#   bash lab/2026-11-30/device9.sh kit rot7b gpu           carry [.trtkit2/stage.sh, .trtkit2/MANIFEST, .trtkit2/part_00]
#   bash .trtkit2/stage.sh                                 carry [stage.sh, MANIFEST, part_0k], k = 01..06;
#                                                          part_07 with .trtkit2/zstd too
#   bash lab/2026-11-30/device9.sh carry                   [.devcarry/p/smol.part_00, .devcarry/p/smol.sha256, .devcarry/whl]
#   bash lab/2026-11-30/device9.sh carry klr               [.devcarry/p/smol.part_01]
#   bash lab/2026-11-30/device9.sh poll 300                keep a call in flight until the end (idle 30 s = machine gone)
# What the eighth lease taught (lab/2026-11-30/README.md): a SmolLM2 INT8 prefill engine takes ~15-17 min to build at
# any level, so klr starts its builds the moment its graphs exist and everything else is secondary; polygraphy runs
# through its entry point (the kit has no `python -m polygraphy`) and without --warm-up; never pkill a pattern that
# matches the calling shell's own command line.
# Jobs:
#   klr    issue 17: SmolLM2, every Linear INT8, prefix + pairs + alpha 0.85 + --rotate-down 64 (PyTorch +0.09 %, ONNX
#          Runtime +0.13 % vs FP32 on 16,384 tokens). Its INT8 engine as 6 segment engines (split, built at once,
#          level 3; revised 2026-11-30 07:55 UTC: a whole build takes 17 min) against the plain float graph and its own
#          graph in ONNX Runtime, perplexity on 16 x 256 held-out tokens (compare --perplexity: the issue's "through
#          the TensorRT 8.6 INT8 engine" row); its prefill (4 x 256, 8 x 512) speed against the FP16 segment chain and
#          its decode-step (past 512, batch 1 and 8) speed against FP16 at level 3.
#   rot7b  issues 15/17: what the rotation's online MatMul costs at Llama-2-7B width. The 4-layer 7B-wide stack's FP16,
#          INT8 and INT8 + --rotate-down 64 engines (streamed quantization on the GPU, lazy export; level 3, built in
#          parallel), timed in one bench_trt --engines run beside issue 15's exporter levers (attention Q/DQ + INT8 LM
#          head, plain and with FP16 INT8-GEMM outputs; INT8 without the norm prescale); ncu kernel lists of INT8 with
#          and without the rotation;
#          then the three decode-step graphs (past 512, batch 1 and 8, level 3): issue 15's decode ratio at 7B width.
#   gpu    torch-side GPU tests (first run of test_streamed_rotate_down_on_the_gpu)
DRIVER=lab/2026-11-30/device9.sh
W=${W:-/tmp/w9}
source "$(cd "$(dirname "$0")/../.." && pwd)/tools/device_jobs.sh"

ncu_engine() {  # engine, csv, input shapes...: Nsight Compute kernel times of one inference through polygraphy
  ( source /opt/trt86/env.sh; /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv "$TRTPY" -c \
      "import sys; from polygraphy.tools._main import main; sys.argv[0] = 'polygraphy'; sys.exit(main())" run "$1" \
      --model-type engine --trt --input-shapes "${@:3}" --iterations 1 > "$2" 2> "${2%.csv}.err" )
}
export -f ncu_engine

job_klr() {
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4
  local M=$W/m D=$R/klr G1=${G1:-1}; mkdir -p "$M" "$D"
  gguf_from_parts smol "$M/SmolLM2-135M-Instruct.Q4_1.gguf" || return 1
  local S=$M/SmolLM2-135M-Instruct.Q4_1.gguf C="--samples 64 --device cuda"
  local K="--prefix-outliers auto --alpha 0.85 --smooth-pairs --fallback none --rotate-down 64"
  ( export CUDA_VISIBLE_DEVICES=$G1
    $SQ export "$S" --weights qdq $K -o "$M/klr.onnx" $C --json > "$D/klr.export.json" 2> "$D/klr.export.err" &
    $SQ export "$S" --weights qdq $K --decode -o "$M/klr_dec.onnx" $C --json > "$D/klr_dec.export.json" 2> "$D/klr_dec.export.err" &
    $SQ export "$S" --mode fp -o "$M/fp.onnx" --json > "$D/fp.export.json" 2> "$D/fp.export.err" &
    $SQ export "$S" --mode fp --decode -o "$M/fp_dec.onnx" --json > "$D/fp_dec.export.json" 2> "$D/fp_dec.export.err" &
    $SQ tokens "$S" -o "$M/t.npz" --seq-len 256 --max-tokens 4096 > "$D/tokens.log" 2>&1 &
    wait )
  log "klr exports done: $(ls "$M")"
  [ -f "$M/klr.onnx" ] || { echo "$(date +%T) klr export failed: $(tail -n 1 "$D/klr.export.err")" >> "$D/log"; return 1; }
  need_kit || return 1
  # the accuracy engine first, as 6 segment engines of 5 layers built at once (a whole SmolLM2 INT8 build takes
  # ~17 min on TensorRT 8.6; the rotation's Reshapes keep the shapes inferable since 2026-11-30, so it cuts)
  local B="-m sq_export -q build --batch 1:4:8 --seq 1:256:512 --opt-level 3 --jobs 6 --gpus $G1 --json"
  ( export PYTHONPATH=$ROOT
    trtpy -m sq_export -q split "$M/klr.onnx" --segments 6 --json > "$D/klr.split.json" 2>&1
    trtpy $B "$M/klr.segments.json" -o "$M/klr_e.segments.json" > "$D/klr.build.json" 2> "$D/klr.build.err"
    echo "$(date +%T) klr segment engines rc $? $(tail -n 1 "$D/klr.build.err" | cut -c1-300)" >> "$D/log"
    cp "$M/t.npz" "$D/"
    trtpy -m sq_export compare "$M/fp.onnx" "$M/klr.onnx" "$M/klr_e.segments.json" --tokens "$M/t.npz" --perplexity --batches 0 \
        --min-cosine -1 --min-top1 0 --json > "$D/compare.json" 2> "$D/compare.err"
    echo "$(date +%T) klr compare rc $? $(tail -c 600 "$D/compare.json")" >> "$D/log" ) &
  ( export PYTHONPATH=$ROOT  # the FP16 reference cut the same way (speed: chain vs chain)
    trtpy -m sq_export -q split "$M/fp.onnx" --segments 6 --json > "$D/fp.split.json" 2>&1
    trtpy ${B/--gpus $G1/--gpus 0} --precision fp16 "$M/fp.segments.json" -o "$M/fp_e.segments.json" > "$D/fp.build.json" 2> "$D/fp.build.err"
    echo "$(date +%T) fp segment engines rc $? $(tail -n 1 "$D/fp.build.err" | cut -c1-300)" >> "$D/log" ) &
  local Q="--decode --batches 1,8 --past 512 --kv-fp16 --opt-level 3 --workdir $M/bd" l
  for l in fp16 int8; do  # the decode engines (~3 min each), built side by side
    ( export CUDA_VISIBLE_DEVICES=0; PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$M/fp_dec.onnx" "$M/klr_dec.onnx" $Q --build-only --labels $l > "$D/bd_$l.log" 2>&1
      echo "$(date +%T) klr decode build $l rc $?" >> "$D/log" ) &
  done
  wait
  ( export CUDA_VISIBLE_DEVICES=$G1  # timed on GPU 1: rot7b times on GPU 0
    PYTHONPATH=$ROOT trtpy tools/bench_trt.py --engines "$M/fp_e.segments.json" "$M/klr_e.segments.json" --shape 4x256 --large 8x512 \
        --cuda-graph --json "$D/bench_prefill.json" > "$D/bench_prefill.log" 2>&1
    echo "$(date +%T) klr prefill bench rc $?" >> "$D/log"
    PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$M/fp_dec.onnx" "$M/klr_dec.onnx" $Q --reuse --cuda-graph --json "$D/bench_decode.json" > "$D/bench_decode.log" 2>&1
    echo "$(date +%T) klr decode bench rc $?" >> "$D/log" )
  echo "$(date +%T) klr benches done" >> "$D/log"
}

job_rot7b() {
  export PYTHONPATH=$ROOT
  local D=$R/rot7b C=$SHM/r7 T=/tmp/r7 G1=${G1:-1}; mkdir -p "$D" "$C" "$T"
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b --layers 4 -o "$C/l4" -q || return 1
  step "$D" export_fp python3 -m sq_export -q export "$C/l4" --mode fp --weights qdq16 --stream -o "$T/fp.onnx" --json &
  step "$D" export_fp_dec python3 -m sq_export -q export "$C/l4" --mode fp --weights qdq16 --stream --decode -o "$T/fp_dec.onnx" --json &
  # issue 15's exporter levers on the same stack: attention Q/DQ + INT8 LM head (whole model on the GPU: the
  # streamed path does not calibrate them), built plain and with FP16 INT8-GEMM outputs
  step "$D" export_sqa python3 -m sq_export -q export "$C/l4" --weights qdq16 --device cuda --samples 64 --fallback none \
      --quantize-attention --quantize-lm-head -o "$T/sqa.onnx" --json &
  local q
  for q in "sq" "sqr --rotate-down 64"; do
    set -- $q
    ( step "$D" quant_$1 python3 tools/bench_big.py quantize "$C/l4" -o "$C/$1" --device cuda --samples 64 "${@:2}" \
        && step "$D" export_$1 python3 tools/bench_big.py export "$C/$1" -o "$T/$1.onnx" --weights qdq16 --lazy \
        && step "$D" export_$1_dec python3 -c 'import json, sys, sq_export as sq
r = sq.export_onnx(sq.load_quantized(sys.argv[1], lazy=True), sys.argv[2], weights="qdq16", decode=True)
print(json.dumps({"onnx": str(r.path), "bytes": r.bytes, "nodes": r.nodes}))' "$C/$1" "$T/$1_dec.onnx" ) &
  done
  wait
  need_kit || return 1
  local B="-m sq_export -q build --batch 1:4:8 --seq 1:256:512 --opt-level 3 --json" e
  # sqnp: sq without the norm prescale (norms are pinned to FP32, so the prescale's extra max-reduction per norm may
  # be redundant: its cost is what this measures; accuracy to be checked on SmolLM2 if it pays)
  for e in "fp16 fp 0 fp3" "int8 sq $G1 sq3" "int8 sqr 0 sqr3" "int8 sqa $G1 sqa3" "int8 sq $G1 sqnp3 --no-prescale-norms"; do
    set -- $e
    ( export CUDA_VISIBLE_DEVICES=$3; trtpy $B --precision $1 "$T/$2.onnx" -o "$T/$4.engine" "${@:5}" > "$D/build_$4.json" 2> "$D/build_$4.err"
      echo "$(date +%T) build $4 rc $? $(tail -n 1 "$D/build_$4.err")" >> "$D/log" ) &
  done
  ( export CUDA_VISIBLE_DEVICES=0; PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$T/fp.onnx" "$T/sqa.onnx" --opt-level 3 --shape 4x256 \
      --large 8x512 --int8-gemm-output fp16 --build-only --labels int8 --workdir "$T/o16" > "$D/build_sqa_o16.log" 2>&1
    echo "$(date +%T) build sqa3_o16 rc $?" >> "$D/log"; cp "$T/o16/bench_int8.engine" "$T/sqa3_o16.engine" ) &
  local Q="--decode --batches 1,8 --past 512 --kv-fp16 --opt-level 3 --workdir $T/bd"
  for e in "fp16 $G1" "int8 0" "int8:sqr_dec $G1"; do
    set -- $e
    ( export CUDA_VISIBLE_DEVICES=$2; PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$T/fp_dec.onnx" "$T/sq_dec.onnx" "$T/sqr_dec.onnx" $Q \
        --build-only --labels $1 > "$D/bd_${1/:/_}.log" 2>&1
      echo "$(date +%T) decode build $1 rc $?" >> "$D/log" ) &
  done
  wait
  cp "$T"/*.engine.json "$D/" 2>/dev/null; rm -rf "$C"
  export CUDA_VISIBLE_DEVICES=0
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py --engines "$T/fp3.engine" "$T/sq3.engine" "$T/sqr3.engine" "$T/sqa3.engine" \
      "$T/sqa3_o16.engine" "$T/sqnp3.engine" --shape 4x256 --large 8x512 \
      --cuda-graph --json "$D/bench.json" > "$D/bench.log" 2>&1
  echo "$(date +%T) prefill bench rc $?" >> "$D/log"
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$T/fp_dec.onnx" "$T/sq_dec.onnx" "$T/sqr_dec.onnx" $Q --reuse --cuda-graph \
      --json "$D/bench_decode.json" > "$D/bench_decode.log" 2>&1
  echo "$(date +%T) decode bench rc $?" >> "$D/log"
  for e in sq3 sqr3; do
    ncu_engine "$T/$e.engine" "$D/$e.ncu.csv" input_ids:[4,256] attention_mask:[4,256]
    echo "$(date +%T) ncu $e rc $?" >> "$D/log"
  done
  python3 tools/ncu_kernels.py "$D"/sq3.ncu.csv "$D"/sqr3.ncu.csv > "$D/ncu_summary.txt" 2>&1
}

start_job() {
  case $1 in
    gpu|rot7b) run_job "$1" "job_$1" ;;
    klr) [ "$(ls "$W"/smol.part_* 2>/dev/null | wc -l)" -ge 2 ] || { echo "klr: GGUF parts still to carry"; return 0; }
         run_job klr job_klr ;;
    *) return 1 ;;
  esac
}

device_main "$@"
