#!/bin/bash
# Sourced by tools/device_*.sh on the lent GPU (cwd: the repository root):
#   W, G, L           the work folder (/tmp/sqw), SmolLM2's GGUF there, the builder optimization level ($OPT_LEVEL, 0)
#   wait_done S F...  wait up to $POLL (default S) seconds until every flag file $W/F exists (or $W/$UNTIL does)
#   smol_python_env   the gguf wheel (.devcarry/whl) for the device's python3, PYTHONPATH for exports
#   smol_gguf         SmolLM2's GGUF from its parts in $W (carried in two calls), checked against its sha256 once;
#                     non-zero (and no file) on a mismatch
#   compare_table F   the Polygraphy table of a `sq-export compare --json` output file F ($TRTPY)
W=${W:-/tmp/sqw}
G=${G:-$W/smol/SmolLM2-135M-Instruct.Q4_1.gguf}
L=${L:-${OPT_LEVEL:-0}}
wait_done() {
  local end=$(( $(date +%s) + ${POLL:-$1} )) f missing; shift
  while [ $(date +%s) -lt $end ]; do
    missing=0; for f in "$@"; do [ -f "$W/$f" ] || missing=1; done
    [ $missing = 0 ] && return 0
    [ -n "${UNTIL:-}" ] && [ -f "$W/$UNTIL" ] && return 0
    sleep 5
  done
}
smol_python_env() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
}
smol_gguf() {
  [ -f "$G" ] && return 0
  mkdir -p "$(dirname "$G")"
  cat "$W"/smol.gguf.part_* > "$G.tmp"
  if [ "$(sha256sum "$G.tmp" | cut -d' ' -f1)" != "$(cat "$W/smol.gguf.sha256")" ]; then
    rm -f "$G.tmp"; echo "GGUF checksum mismatch"; return 1
  fi
  mv "$G.tmp" "$G"
}
compare_table() {
  "$TRTPY" -c 'import json,sys; from sq_export.engine.compare import format_table; print(format_table(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])))' "$1"
}
export -f smol_python_env smol_gguf compare_table wait_done
