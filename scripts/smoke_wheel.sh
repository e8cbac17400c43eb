#!/usr/bin/env bash
# Installs a sparseops wheel into a fresh venv and tests the installed package, not the source tree:
# `python -m sparseops info`, then the test suite copied to a temp directory (nothing there is
# importable as sparseops, so the tests import the wheel).
#
#   scripts/smoke_wheel.sh dist/sparseops-0.1.0+cputorch2.14-....whl
#
# PYTHON picks the interpreter [python3]; KEEP=1 keeps the temp directory.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 WHEEL" >&2; exit 2; }
WHEEL=$(realpath "$1")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d /tmp/sparseops-smoke.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
PY=$TMP/venv/bin/python

printf '\n=== smoke test %s (in %s)\n' "$(basename "$WHEEL")" "$TMP"
"${PYTHON:-python3}" -m venv "$TMP/venv"
# pip resolves torch from the wheel's pin (torch>=A.B,<A.B+1); the extras are what tests/ imports.
"$PY" -m pip install -q "$WHEEL[test,examples,hf]"

cp -r "$ROOT/tests" "$TMP/tests"
cp "$ROOT/pyproject.toml" "$TMP/"  # pytest's settings (markers) only; there is no package next to it
cd "$TMP"
"$PY" - "$(basename "$WHEEL")" <<'EOF'
import sys, sysconfig
import sparseops
from sparseops import ops
site = sysconfig.get_paths()["platlib"]
assert sparseops.__file__.startswith(site), f"imported {sparseops.__file__}, not the wheel in {site}"
if "+cu" in sys.argv[1]:  # a CUDA wheel must load its CUDA library even without a GPU
    assert ops.CUDA_EXTENSION_ERROR is None, ops.CUDA_EXTENSION_ERROR
print(f"imported {sparseops.__file__}")
EOF
"$PY" -m sparseops info
# Left out: test_bench_scripts.py runs benchmarks/*.py, development scripts that are not in the
# wheel. For a CPU wheel, test_cuda_extension_is_built_and_registered: it expects a source build,
# where a CUDA torch and nvcc on PATH mean the CUDA extension was built; a CPU wheel has none by design.
skip=(--ignore=tests/test_bench_scripts.py)
case $(basename "$WHEEL") in
    *+cu*) ;;
    *) skip+=(--deselect tests/test_backend.py::test_cuda_extension_is_built_and_registered) ;;
esac
"$PY" -m pytest -p no:cacheprovider -q tests "${skip[@]}"
