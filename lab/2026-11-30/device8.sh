#!/bin/bash
# Prepared 2026-11-30 ~03:00 UTC for the NEXT lease (not yet run). nvidia-h200-x2 preferred (two GPUs: builds
# beside benches); on one H200 set G1=0. TensorRT 8.6 kit from .trtkit2. EVERY kit call carries stage.sh and
# MANIFEST beside its part (a call's carried paths do not stay for the next call: the seventh lease lost six calls):
#   bash lab/2026-11-30/device8.sh kit prof tests gpu      carry [.trtkit2/stage.sh, .trtkit2/MANIFEST, .trtkit2/part_00]
#   bash .trtkit2/stage.sh                                 carry [stage.sh, MANIFEST, part_0k], k = 01..06;
#                                                          part_07 with .trtkit2/zstd too
#   bash lab/2026-11-30/device8.sh carry                   [.devcarry/p/smol.part_00, .devcarry/p/smol.sha256, .devcarry/whl]
#   bash lab/2026-11-30/device8.sh carry prefix            [.devcarry/p/smol.part_01]
#   bash lab/2026-11-30/device8.sh poll 300                keep a call in flight until the end (idle 30 s = machine gone)
# Jobs:
#   prof    issue 15: the fair prefill ratio at Llama-2-7B width is 1.26x (seventh lease, 4 layers, level 3). Split it:
#           the same 4-layer stack's FP16 and INT8 engines at level 3, plus INT8 with attention Q/DQ and the INT8
#           LM head (`export --quantize-attention --quantize-lm-head`, whole model on the GPU), plus INT8 with the
#           INT8 GEMMs' output pinned to FP16 (bench_trt --int8-gemm-output fp16, experimental); all timed in one
#           bench_trt --engines run; then Nsight Compute kernel lists of the FP16 and INT8 engines (one 4 x 256
#           inference each) summed by class with tools/ncu_kernels.py.
#   prefix  issue 17: SmolLM2 every-Linear-INT8 graphs with the outlier prefix and --alpha kl (the export that failed on
#           the GPU in the seventh lease; fixed), and with alpha 0.85 + --rotate-down 64 (the down_proj inputs rotated:
#           +0.09 % PyTorch, +0.13 % ONNX Runtime vs FP32 on 16,384 tokens, 2026-11-30), their INT8 engines vs ONNX Runtime on 16 x 256
#           held-out tokens, and their prefill / decode-step speed against the FP16 engine, all at level 3 (what
#           the rotation's online MatMul costs in TensorRT).
#   tests   engine tests on GPU ${G1:-1} (the segment decode test was rewritten after the seventh lease's INT8 failure;
#           first run of its shared-memory bit-identity check); gpu  torch-side GPU tests (first run of
#           test_outlier_prefix_on_the_gpu)
DRIVER=lab/2026-11-30/device8.sh
W=${W:-/tmp/w8}
source "$(cd "$(dirname "$0")/../.." && pwd)/tools/device_jobs.sh"

job_prof() {
  export PYTHONPATH=$ROOT
  local D=$R/prof C=$SHM/prof T=/tmp/prof G1=${G1:-1}; mkdir -p "$D" "$C" "$T"
  step "$D" ckpt python3 tools/make_big_checkpoint.py --shape llama2-7b --layers 4 -o "$C/l4" -q || return 1
  step "$D" export_fp python3 -m sq_export -q export "$C/l4" --mode fp --weights qdq16 --stream -o "$T/fp.onnx" --json &
  ( step "$D" quant python3 tools/bench_big.py quantize "$C/l4" -o "$C/q" --device cuda --samples 64 \
      && step "$D" export_sq python3 tools/bench_big.py export "$C/q" -o "$T/sq.onnx" --weights qdq16 --lazy ) &
  step "$D" export_sqa python3 -m sq_export -q export "$C/l4" --weights qdq16 --device cuda --samples 64 --fallback none \
      --quantize-attention --quantize-lm-head -o "$T/sqa.onnx" --json &
  wait
  need_kit || return 1
  local B="-m sq_export -q build --batch 1:4:8 --seq 1:256:512 --opt-level 3 --json" e
  for e in "fp16 fp.onnx fp3 0" "int8 sq.onnx sq3 $G1" "int8 sqa.onnx sqa3 0"; do
    set -- $e
    ( export CUDA_VISIBLE_DEVICES=$4; trtpy $B --precision $1 "$T/$2" -o "$T/$3.engine" > "$D/build_$3.json" 2> "$D/build_$3.err"
      echo "$(date +%T) build $3 rc $? $(tail -n 1 "$D/build_$3.err")" >> "$D/log" ) &
  done
  ( export CUDA_VISIBLE_DEVICES=$G1; PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$T/fp.onnx" "$T/sq.onnx" --opt-level 3 --shape 4x256 \
      --large 8x512 --int8-gemm-output fp16 --build-only --labels int8 --workdir "$T/o16" > "$D/build_o16.log" 2>&1
    echo "$(date +%T) build o16 rc $?" >> "$D/log" ) &
  wait
  cp "$T"/*.engine.json "$D/" 2>/dev/null; cp "$T/o16/bench_int8.engine" "$T/sq3_o16.engine" 2>/dev/null
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py --engines "$T/fp3.engine" "$T/sq3.engine" "$T/sqa3.engine" "$T/sq3_o16.engine" \
      --shape 4x256 --large 8x512 --cuda-graph --json "$D/bench.json" > "$D/bench.log" 2>&1
  echo "$(date +%T) bench rc $?" >> "$D/log"
  local NCU; NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
  [ -n "$NCU" ] || { echo "$(date +%T) no ncu on this machine" >> "$D/log"; return 0; }
  for e in fp3 sq3 sqa3; do
    ( source /opt/trt86/env.sh; "$NCU" --metrics gpu__time_duration.sum --csv "$TRTPY" -m polygraphy run "$T/$e.engine" \
        --model-type engine --trt --input-shapes input_ids:[4,256] attention_mask:[4,256] --iterations 2 --warm-up 0 \
        > "$D/$e.ncu.csv" 2> "$D/$e.ncu.err" )
    echo "$(date +%T) ncu $e rc $?" >> "$D/log"
  done
  python3 tools/ncu_kernels.py "$D"/fp3.ncu.csv "$D"/sq3.ncu.csv "$D"/sqa3.ncu.csv > "$D/ncu_summary.txt" 2>&1
  gzip -9 "$D"/*.ncu.csv
}

job_prefix() {
  export PYTHONPATH=/tmp/site:$ROOT OMP_NUM_THREADS=4 CUDA_VISIBLE_DEVICES=${G1:-1}
  local M=$W/m D=$R/prefix; mkdir -p "$M" "$D"
  gguf_from_parts smol "$M/SmolLM2-135M-Instruct.Q4_1.gguf" || return 1
  local S=$M/SmolLM2-135M-Instruct.Q4_1.gguf C="--samples 64 --device cuda" K="--prefix-outliers auto --alpha kl --smooth-pairs --fallback none"
  $SQ export "$S" --weights qdq $K -o "$M/kl.onnx" $C --json > "$D/kl.export.json" 2> "$D/kl.export.err" &
  # klr: issue 17's best row (prefix + pairs + alpha 0.85 + --rotate-down 64; ONNX Runtime +0.13 % on 16,384 tokens)
  local R85="--prefix-outliers auto --alpha 0.85 --smooth-pairs --fallback none --rotate-down 64"
  $SQ export "$S" --weights qdq $R85 -o "$M/klr.onnx" $C --json > "$D/klr.export.json" 2> "$D/klr.export.err" &
  $SQ export "$S" --weights qdq $R85 --decode -o "$M/klr_dec.onnx" $C --json > "$D/klr_dec.export.json" 2> "$D/klr_dec.export.err" &
  $SQ export "$S" --weights qdq $K --decode -o "$M/kl_dec.onnx" $C --json > "$D/kl_dec.export.json" 2> "$D/kl_dec.export.err" &
  $SQ export "$S" --mode fp -o "$M/fp.onnx" --json > "$D/fp.export.json" 2> "$D/fp.export.err" &
  $SQ export "$S" --mode fp --decode -o "$M/fp_dec.onnx" --json > "$D/fp_dec.export.json" 2> "$D/fp_dec.export.err" &
  $SQ tokens "$S" -o "$M/t.npz" --seq-len 256 --max-tokens 4096 &
  wait
  [ -f "$M/kl.onnx" ] || { echo "$(date +%T) prefix export failed: $(tail -n 1 "$D/kl.export.err")" >> "$D/log"; return 1; }
  need_kit || return 1
  local g
  for g in kl klr; do  # klr: with the down_proj inputs rotated (--rotate-down 64, issue 17's best every-Linear-INT8 row)
    trtpy -m sq_export -q build "$M/$g.onnx" -o "$M/$g.engine" --batch 1:1:1 --seq 1:256:256 --opt-level 3 --json > "$D/$g.build.json" 2> "$D/$g.build.err"
    echo "$(date +%T) prefix $g build rc $? $(tail -n 1 "$D/$g.build.err")" >> "$D/log"
  done
  # one table: the plain float graph (no prefix) is the reference; each INT8 graph in ONNX Runtime beside its engine
  trtpy -m sq_export compare "$M/fp.onnx" "$M/kl.onnx" "$M/kl.engine" "$M/klr.onnx" "$M/klr.engine" --tokens "$M/t.npz" --perplexity \
      --batches 0 --min-cosine -1 --min-top1 0 --json > "$D/compare.json" 2> "$D/compare.err"
  echo "$(date +%T) prefix compare rc $? $(tail -c 300 "$D/compare.err")" >> "$D/log"; cp "$M/t.npz" "$D/"
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py "$M/fp.onnx" "$M/kl.onnx" "$M/klr.onnx" --shape 4x256 --large 8x512 --opt-level 3 --cuda-graph \
      --workdir "$M/bp" --json "$D/bench_prefill.json" > "$D/bench_prefill.log" 2>&1
  PYTHONPATH=$ROOT trtpy tools/bench_trt.py --decode "$M/fp_dec.onnx" "$M/kl_dec.onnx" "$M/klr_dec.onnx" --batches 1,8 --past 512 --kv-fp16 \
      --cuda-graph --opt-level 3 --workdir "$M/bd" --json "$D/bench_decode.json" > "$D/bench_decode.log" 2>&1
  echo "$(date +%T) prefix benches done" >> "$D/log"
}

job_tests() {  # on the second GPU: the first one times the prof bench
  need_kit || return 1
  CUDA_VISIBLE_DEVICES=${G1:-1} PYTHONPATH=$ROOT trtpy -m pytest -q -rfs --noconftest -p no:cacheprovider -s tests/test_engine_*.py 2>&1 \
      | grep -v "^\[W\]\|^\[I\]" > "$R/tests_full.log"; tail -n 60 "$R/tests_full.log"
}

start_job() {
  case $1 in
    gpu|tests|prof) run_job "$1" "job_$1" ;;
    prefix) [ "$(ls "$W"/smol.part_* 2>/dev/null | wc -l)" -ge 2 ] || { echo "prefix: GGUF parts still to carry"; return 0; }
            run_job prefix job_prefix ;;
    *) return 1 ;;
  esac
}

device_main "$@"
