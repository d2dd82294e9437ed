#!/usr/bin/env bash
# Everything a GPU can tell us about sqdf_fast, in one prepared command (the parts and their time boxes are in
# bench/gpu_suite.py's docstring):
#
#   bash bench/gpu_suite.sh [--wheels DIR] [--out DIR] [--budget-s 450] [--only PART,...] [--cpu-smoke]
#
# --wheels DIR  install DIR/*.whl (e.g. diffusers, which the lent GPU machines lack) into a target folder put on
#               PYTHONPATH; nothing else is installed or built.
# This checkout's sqdf_fast runs from a staged copy (sqdf_fast/ plus kernels/ as sqdf_fast/kernels, as an install
# lays them out), so the suite needs no `pip install` of the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sqdf_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then echo "gpu_suite: no .whl files in $WHEELS" >&2; exit 2; fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "${wheels[@]}"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$WORK/pkg"
cp -r "$ROOT/sqdf_fast" "$WORK/pkg/sqdf_fast"
rm -rf "$WORK/pkg/sqdf_fast/kernels"
cp -r "$ROOT/kernels" "$WORK/pkg/sqdf_fast/kernels"
find "$WORK/pkg" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="$WORK/pkg:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
(cd "$WORK" && "$PYTHON" -c "import importlib.util as u, sys; s = u.find_spec('sqdf_fast.kernels')
sys.exit(0 if s and s.origin.startswith('$WORK') else 1)") \
  || { echo "gpu_suite: the staged sqdf_fast copy is not the one found first" >&2; exit 2; }
"$PYTHON" bench/gpu_suite.py ${ARGS[@]+"${ARGS[@]}"}
