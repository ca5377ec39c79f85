#!/bin/bash
# Issue 4 diagnosis on the lent GPU, two background chains started in one call and polled (device processes outlive
# the call while the machine stays warm):
#
#   call:  cp .devcarry/smol.gguf.part_01 .devcarry/smol.gguf.sha256 /tmp/sqw/ && bash lab/2026-11-22/device_diag.sh start
#   calls: POLL=500 bash lab/2026-11-22/device_diag.sh poll      # progress; results tarred to $OUT/diag_*.tgz
#
# Chain G (speed): why INT8 engines of our exported decoders are slower than FP16 when the kit's MLP-only graph
#   gets 1.63x. (1) tools/bench_qdq_forms.py: MLP stacks in several ONNX forms, FP16 vs INT8; (2) our exporter's
#   OPT-6.7B-shaped decoder, 2 layers, static 4x256, engines with and without FP32-pinned norms; (3) per-kernel GPU
#   time with nsys when the image has it; (4) the TensorRT test suite.
# Chain S (accuracy): why plain SmoothQuant (alpha 0.85) gives a garbage INT8 engine of SmolLM2 while its ONNX graph
#   is fine: the graph with groups of Linears taken back to float (tools/qdq_bypass.py) and an INT8-without-FP16
#   build, each engine's perplexity on 8 chunks; plus issue 7's final selection (--fallback auto) end to end.
# S's builds wait for G's timings, so no timing shares the GPU with a build.
set -uo pipefail
cd "$(dirname "$0")/.."
source lab/2026-11-22/device_lib.sh
R=$W/res3; mkdir -p $W/out $R

chain_g() {
  source /opt/trt86/env.sh
  export PYTHONPATH=. PYTHONUNBUFFERED=1
  local B=$W/opt2 t0=$(date +%s)
  ( OMP_NUM_THREADS=4 python3 -W ignore tools/make_bench_model.py --layers 2 --vocab 8192 --only fp,sq -o $B > $R/opt2_models.log 2>&1; echo "opt2 models rc $? $(( $(date +%s) - t0 ))s" >> $R/G.log ) &
  local models=$!
  timeout 900 "$TRTPY" tools/bench_qdq_forms.py --layers 2 --jobs 7 --runs 100 --workdir $W/forms --json $R/forms.json > $R/forms.log 2>&1
  echo "forms rc $? $(( $(date +%s) - t0 ))s" >> $R/G.log
  wait $models
  for v in pin nopin; do
    local flag=""; [ $v = nopin ] && flag=--no-fp32-norms
    for l in fp16 int8; do
      ( timeout 600 "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx --static --shape 4x256 $flag --workdir $B/$v --build-only --labels $l > $R/opt2_build_${v}_$l.log 2>&1
        echo "opt2 build $v $l rc $? $(( $(date +%s) - t0 ))s" >> $R/G.log ) &
    done
  done
  wait
  for v in pin nopin; do
    local flag=""; [ $v = nopin ] && flag=--no-fp32-norms
    "$TRTPY" tools/bench_trt.py $B/fp.onnx $B/sq.onnx --static --shape 4x256 $flag --workdir $B/$v --reuse --runs 100 --json $R/opt2_$v.json > $R/opt2_time_$v.log 2>&1
    echo "opt2 time $v rc $? $(( $(date +%s) - t0 ))s" >> $R/G.log
  done
  touch $W/G_timed
  if command -v nsys > /dev/null; then
    for e in $B/pin/bench_fp16.engine $B/pin/bench_int8.engine $B/nopin/bench_int8.engine $W/forms/mlp2d_int8.engine; do
      [ -f $e ] || continue
      local tag=$(basename $(dirname $e))_$(basename $e .engine)
      timeout 300 nsys profile -t cuda -o $R/nsys_$tag --force-overwrite true polygraphy run $e --model-type engine --trt --iterations 20 > $R/nsys_$tag.log 2>&1
      nsys stats -r cuda_gpu_kern_sum -f csv -o $R/kern_$tag $R/nsys_$tag.nsys-rep >> $R/nsys_$tag.log 2>&1
      rm -f $R/nsys_$tag.nsys-rep $R/nsys_$tag.sqlite
    done
    echo "nsys done $(( $(date +%s) - t0 ))s" >> $R/G.log
  else
    echo "no nsys on this image: $(ls /usr/local/cuda/bin 2>/dev/null | tr '\n' ' ')" >> $R/G.log
  fi
  PYTHONPATH=.:tests timeout 900 "$TRTPY" $TRTPY -m pytest --noconftest tests/test_engine_*.py > $R/trt_tests.log 2>&1
  echo "trt tests rc $? $(( $(date +%s) - t0 ))s" >> $R/G.log
  touch $W/G.done
}

chain_s() {
  smol_python_env; export OMP_NUM_THREADS=5
  local t0=$(date +%s)
  smol_gguf >> $R/S.log || { touch $W/S.done; return; }
  local best="--mode sq --weights qdq --smooth-pairs --alpha auto --fallback auto --samples 32"
  for spec in "sq:--mode sq --weights qdq --samples 64" "best:$best"; do
    local name=${spec%%:*} opts=${spec#*:}
    [ -f $W/$name.onnx ] && continue
    ( python3 -m sq_export -q export $G $opts -o $W/$name.onnx --json > $R/export_$name.json 2> $R/export_$name.log; echo "export $name rc $? $(( $(date +%s) - t0 ))s" >> $R/S.log ) &
  done
  [ -f $W/tokens_small.npz ] || python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 2048 -o $W/tokens_small.npz
  [ -f $W/tokens.npz ] || python3 -m sq_export -q tokens $G --seq-len 256 --max-tokens 8192 -o $W/tokens.npz
  wait
  for spec in "v_attn:self_attn/" "v_mlp:mlp/" "v_lo:layers\.([0-9]|1[0-4])/" "v_hi:layers\.(1[5-9]|2[0-9])/"; do
    python3 tools/qdq_bypass.py $W/sq.onnx $W/${spec%%:*}.onnx --match "${spec#*:}" >> $R/S.log 2>&1
  done
  echo "variants $(( $(date +%s) - t0 ))s" >> $R/S.log
  while [ ! -f $W/G_timed ]; do sleep 5; done
  source /opt/trt86/env.sh; export PYTHONPATH=.
  b() {  # engine onnx extra...
    local name=$1 onnx=$2; shift 2
    [ -f $W/$name.engine ] && return
    ( timeout 900 "$TRTPY" -m sq_export build $W/$onnx.onnx -o $W/$name.engine --precision int8 --batch 1:1:1 --seq 256:256:256 --opt-level $L --json "$@" > $R/build_$name.json 2> $R/build_$name.log
      echo "build $name rc $? $(( $(date +%s) - t0 ))s" >> $R/S.log ) &
  }
  b sq sq; b sq_nofp16 sq --no-fp16; b v_attn v_attn; b v_mlp v_mlp; b v_lo v_lo; b v_hi v_hi; b best best
  wait
  local engines=()
  for n in sq sq_nofp16 v_attn v_mlp v_lo v_hi; do [ -f $W/$n.engine ] && engines+=($W/$n.engine); done
  "$TRTPY" -m sq_export compare $W/sq.onnx "${engines[@]}" --tokens $W/tokens_small.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare_sqdiag.json 2> $R/compare_sqdiag.log
  compare_table $R/compare_sqdiag.json > $R/compare_sqdiag_table.txt 2>&1
  echo "compare sqdiag $(( $(date +%s) - t0 ))s" >> $R/S.log
  "$TRTPY" -m sq_export compare $W/best.onnx $W/best.engine --tokens $W/tokens.npz --batches 0 --perplexity --min-cosine -1 --min-top1 0 --json > $R/compare_best.json 2> $R/compare_best.log
  compare_table $R/compare_best.json > $R/compare_best_table.txt 2>&1
  echo "compare best $(( $(date +%s) - t0 ))s" >> $R/S.log
  touch $W/S.done
}

case ${1:-start} in
  start)
    export -f chain_g chain_s; export W R G L
    setsid nohup bash -c chain_g > $W/G.out 2>&1 < /dev/null &
    setsid nohup bash -c chain_s > $W/S.out 2>&1 < /dev/null &
    sleep 2; echo started; command -v nsys || echo "no nsys" ;;
  poll)
    wait_done 500 G.done S.done
    ls $W/*.done $W/G_timed 2>/dev/null; cat $R/G.log $R/S.log 2>/dev/null; tail -n 3 $W/G.out $W/S.out
    for f in $R/forms.log $R/opt2_time_*.log $R/compare_*table.txt; do [ -f $f ] && { echo "== $f"; tail -n 14 $f; }; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; free -g | head -2
    tar czf "${OUT:-.}/diag_$(date +%H%M).tgz" -C $R . 2>/dev/null; true ;;
esac
