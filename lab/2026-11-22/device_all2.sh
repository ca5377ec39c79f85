#!/bin/bash
# Second device session of 2026-11-22: the benchmark (lab/2026-11-22/device_bench.sh) and the sq-engine diagnosis
# (lab/2026-11-22/device_smollm2.sh diag) in the background, then the decode tests; poll with `lab/2026-11-22/device_all.sh poll`.
set -uo pipefail
cd "$(dirname "$0")/.."
W=/tmp/sqw; mkdir -p $W/out
setsid nohup bash -c "OUT=$W/out bash lab/2026-11-22/device_smollm2.sh diag > $W/A_diag.log 2>&1; touch $W/A.done" > /dev/null 2>&1 < /dev/null &
setsid nohup bash -c "OUT=$W/out bash lab/2026-11-22/device_bench.sh models > $W/B_models.log 2>&1;
  OUT=$W/out bash lab/2026-11-22/device_bench.sh build > $W/B_build.log 2>&1; touch $W/B_built;
  OUT=$W/out bash lab/2026-11-22/device_bench.sh time > $W/B_time.log 2>&1;
  source /opt/trt86/env.sh; PYTHONPATH=.:tests timeout 500 \$TRTPY $TRTPY -m pytest --noconftest tests/test_engine_decode.py > $W/bres/decode_tests.log 2>&1;
  tar czf $W/out/bench_final.tgz -C $W/bres .; touch $W/B.done" > /dev/null 2>&1 < /dev/null &
sleep 1; echo started
