#!/bin/bash
# Everything issue 4/6 needs from the lent GPU, started in the background in one call (device processes outlive
# the call; the machine stays while calls keep coming), then polled:
#
#   call:  cp .devcarry/smol.gguf.part_01 .devcarry/smol.gguf.sha256 /tmp/sqw/ && bash lab/2026-11-22/device_all.sh start
#   calls: bash lab/2026-11-22/device_all.sh poll        # sleeps up to POLL seconds (default 500), prints progress, copies results to $OUT
#
# Chain A: SmolLM2 exports -> engines -> comparison/perplexity/generate (lab/2026-11-22/device_smollm2.sh).
# Chain B: benchmark models (parallel with A's exports) -> engines once A's builds are done -> timings once A is done
# (timings never share the GPU with builds).
set -uo pipefail
cd "$(dirname "$0")/.."
source lab/2026-11-22/device_lib.sh
mkdir -p $W/out
case ${1:-start} in
  start)
    setsid nohup bash -c "OUT=$W/out bash lab/2026-11-22/device_smollm2.sh exports > $W/A_exports.log 2>&1; touch $W/A_exports.done;
      OUT=$W/out bash lab/2026-11-22/device_smollm2.sh builds > $W/A_builds.log 2>&1; touch $W/A_builds.done;
      OUT=$W/out bash lab/2026-11-22/device_smollm2.sh compare > $W/A_compare.log 2>&1; touch $W/A.done" > /dev/null 2>&1 < /dev/null &
    setsid nohup bash -c "OUT=$W/out bash lab/2026-11-22/device_bench.sh models > $W/B_models.log 2>&1;
      while [ ! -f $W/A_builds.done ]; do sleep 5; done; OUT=$W/out bash lab/2026-11-22/device_bench.sh build > $W/B_build.log 2>&1;
      while [ ! -f $W/A.done ]; do sleep 5; done; OUT=$W/out bash lab/2026-11-22/device_bench.sh time > $W/B_time.log 2>&1; touch $W/B.done" > /dev/null 2>&1 < /dev/null &
    sleep 2; echo started ;;
  poll)
    wait_done 500 B.done
    ls $W/*.done 2>/dev/null; for f in $W/*.log; do echo "== $f"; tail -n 6 $f; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    cp $W/out/*.tgz "${OUT:-.}/" 2>/dev/null; true ;;
esac
