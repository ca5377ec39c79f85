#!/bin/bash
# Prepared 2026-11-30 ~08:15 UTC for the NEXT lease (not yet run). One H200 is enough (nvidia-h200).
# TensorRT 8.6 kit from .trtkit2; every kit call carries stage.sh and MANIFEST beside its part, and the working tree
# (~10 MB) plus a 54 MiB part must stay under the 64 MiB carry limit (ninth lease: move lab/2026-11-29 and
# lab/2026-11-22 out of the tree for the kit calls):
#   bash .trtkit2/stage.sh                          carry [stage.sh, MANIFEST, part_0k], k = 00..06; part_07 with zstd
#   bash lab/2026-11-30/device10.sh start probe tests
#   bash lab/2026-11-30/device10.sh poll 240        keep a call in flight
# Jobs:
#   probe  which form of the rotated down_proj TensorRT 8.6 builds as an INT8 GEMM (rot_fusion_probe.py: one
#          11,008 -> 4,096 Linear in six graph forms, engine size and time each; a few minutes). The ninth lease found
#          today's form runs as an FP16 GEMM (docs/TENSORRT.md). The winning form goes into the exporter next.
#   tests  the engine tests under TensorRT 8.6
DRIVER=lab/2026-11-30/device10.sh
W=${W:-/tmp/w10}
source "$(cd "$(dirname "$0")/../.." && pwd)/tools/device_jobs.sh"

job_probe() {
  need_kit || return 1
  PYTHONPATH=$ROOT trtpy lab/2026-11-30/rot_fusion_probe.py --out "$W/probe" > "$R/probe_rows.log" 2>&1
  cp "$W/probe/probe.json" "$R/" 2>/dev/null
}

start_job() {
  case $1 in
    probe|tests|gpu) run_job "$1" "job_$1" ;;
    *) return 1 ;;
  esac
}

device_main "$@"
