#!/usr/bin/env bash
# The GPU check in one call (benchmarks/README.md, "GPU check"): runs benchmarks/gpu_check.py with this checkout on
# PYTHONPATH and, where the CLI's dependencies are not installed, the wheels of .whl/ (from --prepare)
# unpacked into a scratch folder. Arguments go to gpu_check.py, e.g. --out <dir>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client, torchdata" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "jsonargparse is not installed and .whl/ holds no wheels: run 'python benchmarks/gpu_check.py --prepare' first" >&2
    exit 2
  fi
  # unpacking a wheel is installing it (the .dist-info lets Lightning see the versions; TorchCodec's library loads
  # from its package folder)
  for wheel in .whl/*.whl; do "$PY" -m zipfile -e "$wheel" "$site"; done
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
"$PY" benchmarks/gpu_check.py "$@"
