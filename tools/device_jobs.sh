#!/bin/bash
# The frame of a lab device driver (lab/YYYY-MM-DD/deviceN.sh), sourced by it after it defines DRIVER (its path
# relative to the repository root) and before its job_* functions. On the lent GPU machine (device tool), every
# call of the driver is short; long work runs in the background (setsid) and survives between calls:
#   bash DRIVER kit [START...]    stage one carried part of the TensorRT 8.6 kit (.trtkit2/stage.sh), start jobs
#   bash DRIVER carry [START...]  copy carried files (.devcarry/p/* into $W, every other .devcarry/DIR as $W/DIR), start jobs
#   bash DRIVER start START...    start jobs
#   bash DRIVER poll S            wait up to S s (or until every started job is done), report; $OUT/res.tgz
# Every call that starts jobs snapshots the working tree it carried into /tmp/src.N and runs from there, so jobs
# keep the code of the call that started them. The driver defines job_NAME functions and `start_job NAME`
# (the names it accepts; return 1 to refuse), and calls `device_main "$@"` last.
# Standard jobs: job_gpu, job_tests. Helpers for jobs: log, trtpy (the kit's Python; never where torch runs on the GPU), maxrss, need_kit, step, gguf_from_parts,
# run_job; $W work folder, $R results (returned), $ROOT the snapshot, $SQ the torch-side CLI, $SHM big scratch.
# Never leave the machine idle between calls: it goes back 30 s after a call ends, with everything on it.
set -uo pipefail
if [[ "$PWD" != /tmp/src.* ]] && [ "${1:-poll}" != poll ]; then
  S=/tmp/src.$(date +%s%N); mkdir -p "$S"
  tar --exclude=./.trtkit2 --exclude=./.devcarry --exclude=./.git -cf - . | tar -C "$S" -xf -
  [ "${1}" = kit ] && { bash .trtkit2/stage.sh | tail -n 1; shift; set -- start "$@"; }
  [ "${1}" = carry ] && { mkdir -p "${W:-/tmp/w}"; cp -r .devcarry/p/. "${W:-/tmp/w}"/ 2>/dev/null
    for d in .devcarry/*/; do [ "$d" = .devcarry/p/ ] || cp -r "$d" "${W:-/tmp/w}"/ 2>/dev/null; done; shift; set -- start "$@"; }
  cd "$S" && exec bash "$S/$DRIVER" "$@"
fi
ROOT=$PWD
W=${W:-/tmp/w}; R=$W/res; mkdir -p "$W" "$R"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
SQ="python3 -m sq_export -q"
# the big checkpoints live in host memory when /dev/shm can take them (disk: 7B 13.5 + 13.5 GB, 13B 26 + 26 GB)
SHM=/dev/shm; [ "$(df -BG --output=size /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)" -ge 60 ] 2>/dev/null || SHM=/tmp

log() { echo "$(date +%T) $*" >> "$R/log"; }
# TensorRT commands run in a subshell that sources the kit's env (its LD_LIBRARY_PATH holds cuBLAS/cuDNN stand-ins:
# never source it where torch runs on the GPU)
trtpy() { ( source /opt/trt86/env.sh; "$TRTPY" "$@" ) }
# peak RSS of a command and its children (the kit's python has no /usr/bin/time): printed to stderr as one line
maxrss() { python3 -c 'import resource, subprocess, sys, time
t = time.time(); rc = subprocess.call(sys.argv[1:])
print(f"maxrss_mib {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024} seconds {time.time() - t:.1f} rc {rc}", file=sys.stderr, flush=True)
sys.exit(rc)' "$@"; }
need_kit() {
  local end=$(( $(date +%s) + 1500 ))
  until [ -f /opt/trt86/.ready ]; do [ "$(date +%s)" -gt $end ] && { echo "kit never staged"; return 1; }; sleep 5; done
}
gguf_from_parts() {  # name, dest: $W/name.part_* (carried) joined, checked against $W/name.sha256, moved to dest;
  # the carried gguf wheel installed into /tmp/site (prepend it to PYTHONPATH)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/whl/*.whl || return 1
  cat "$W/$1".part_* > "$W/$1.gguf"
  [ "$(sha256sum "$W/$1.gguf" | cut -d' ' -f1)" = "$(cat "$W/$1.sha256")" ] || { echo "$1 GGUF checksum mismatch"; return 1; }
  mkdir -p "$(dirname "$2")" && mv "$W/$1.gguf" "$2"
}
run_job() {  # name, command...: in the background, its output to R/name.log, done marker R/name.rc
  local name=$1; shift
  [ -e "$W/$name.started" ] && return 0
  touch "$W/$name.started"; log "start $name (tree $ROOT)"
  setsid nohup bash -c "cd '$ROOT'; $*; echo \$? > '$R/$name.rc'; echo \"\$(date +%T) done $name rc \$(cat '$R/$name.rc')\" >> '$R/log'" \
    > "$R/$name.log" 2>&1 < /dev/null &
}
step() {  # dir, name, command...: its JSON line to dir/big.jsonl, stderr to dir/name.err, rc and seconds to dir/log
  local d=$1 name=$2 t0=$(date +%s); shift 2
  "$@" >> "$d/big.jsonl" 2> "$d/$name.err"
  local rc=$?
  echo "$(date +%T) $name rc $rc $(( $(date +%s) - t0 ))s" >> "$d/log"
  return $rc
}
gpumon() {  # sample the GPU's memory use every 2 s into R/gpumem.csv until the jobs are done
  [ -e "$W/gpumon.started" ] && return 0; touch "$W/gpumon.started"
  setsid nohup bash -c "while true; do echo \"\$(date +%T),\$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits),\$(free -m | awk '/Mem/{print \$3}')\" >> '$R/gpumem.csv'; sleep 2; done" > /dev/null 2>&1 < /dev/null &
}


# the two standard jobs (a driver may redefine them): the torch side's GPU tests, the engine tests under the kit
job_gpu() {
  python3 -m pytest -q -rfs -p no:cacheprovider tests/test_gpu.py tests/test_device.py 2>&1 | tail -n 40
}

job_tests() {
  need_kit || return 1
  PYTHONPATH=$ROOT trtpy -m pytest -q -rfs --noconftest -p no:cacheprovider -s tests/test_engine_*.py 2>&1 | grep -v "^\[W\]\|^\[I\]" | tail -n 60
}

start() {
  local j
  gpumon
  for j in "$@"; do
    start_job "$j" || echo "unknown or not yet startable job: $j"
  done
}

report() {
  echo "== $(date +%T) $(df -h /tmp | tail -1 | awk '{print "disk used " $3 " of " $2}'); shm $(df -h /dev/shm | tail -1 | awk '{print $3}'); $(free -g | awk '/Mem/{print "RAM used " $3 " GiB"}'); GPU $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  tail -n 30 "$R/log" 2>/dev/null
  local d f
  for d in "$R"/*/; do [ -f "$d/log" ] && { echo "-- $(basename "$d"):"; cat "$d/log"; tail -n 3 "$d/big.jsonl" 2>/dev/null | cut -c1-400; }; done
  for f in "$R"/*.log; do [ -s "$f" ] && { echo "-- $(basename "$f"):"; tail -n 6 "$f"; }; done
  tar -C "$W" -czf "${OUT:-/tmp}/res.tgz" res 2>/dev/null
}

device_main() {
  export -f log trtpy maxrss need_kit gguf_from_parts run_job step $(declare -F | awk '{print $3}' | grep '^job_')
  export W R ROOT SQ SHM
  case ${1:-poll} in
    start) shift; start "$@"; report ;;
    poll) local end=$(( $(date +%s) + ${2:-60} )) busy s n
          while [ "$(date +%s)" -lt $end ]; do
            busy=0; for s in "$W"/*.started; do [ -e "$s" ] || continue; n=$(basename "$s" .started); [ "$n" = gpumon ] && continue; [ -e "$R/$n.rc" ] || busy=1; done
            [ $busy = 0 ] && break; sleep 10
          done
          report ;;
  esac
}
