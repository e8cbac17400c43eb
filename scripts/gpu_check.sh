#!/usr/bin/env bash
# GPU bring-up in one call (issue 15): build the extensions in place, `python -m sparseops info`,
# the GPU tests, the GPU benchmarks and the tuner, within a time budget, on a bare GPU machine with
# its own python/torch (no venv, no installs). See docs/gpu_check.md.
#
#   scripts/gpu_check.sh [--budget-s N] OUT_DIR       # on the GPU machine (default budget 420 s)
#   scripts/gpu_check.sh --dry-run OUT_DIR            # here, without a GPU, in under 3 minutes
#
# Environment: PYTHON (default python3; CI passes .venv/bin/python), MAX_JOBS (default nproc),
# GPU_CHECK_TESTS_K (pytest -k selection, default "cuda or triton": every cuda-marked test, -k
# matches markers too, and every test with cuda or triton in its file, class or name),
# GPU_CHECK_TESTS_M (pytest -m expression; default "cuda" with --dry-run, none on the GPU),
# GPU_CHECK_AUTOTUNE_MAX (Triton autotune configs kept for the tests, default 1 on the GPU; "all"),
# GPU_CHECK_XDIST (pytest-xdist workers for the tests, default min(8, nproc/2) where xdist is
# installed; 0 = off), GPU_CHECK_REP_MS (do_bench rep per measurement, default 50),
# GPU_CHECK_SPLIT (weights of tests, bench, tune in what is left after the build: "40 35 25").
#
# Writes into OUT_DIR: gpu_check.log, stages.tsv, junit.xml (and tests.tsv where pytest was
# stopped before writing it), gpu-<device>.json and .md, tune.json, summary.txt; prints the summary last. Exit code: 1 if the build or the tests failed (with
# --dry-run: if any stage failed), else 0; the summary is printed and the files are kept either way.
set -uo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

DRY=0
BUDGET=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget-s) BUDGET="${2:-}"; shift ;;
        --budget-s=*) BUDGET="${1#*=}" ;;
        -h|--help) usage ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
if [ -z "$BUDGET" ]; then BUDGET=$([ "$DRY" = 1 ] && echo 170 || echo 420); fi
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget-s takes whole seconds" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/gpu_check.log "$OUT"/stages.tsv "$OUT"/junit.xml "$OUT"/tests.tsv "$OUT"/gpu-*.json "$OUT"/gpu-*.md \
      "$OUT"/tune.json "$OUT"/summary.txt
LOG="$OUT/gpu_check.log"
STAGES="$OUT/stages.tsv"
: >"$LOG"
: >"$STAGES"

PYTHON="${PYTHON:-python3}"
JOBS="${MAX_JOBS:-$(nproc)}"
# the checkout, not an installed sparseops (tests/triton_aot.py runs in a subprocess by file name)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
RESERVE=15          # seconds kept for the summary
T0=$(date +%s)
RC=0

now() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(now) )); }
say() { echo "[gpu_check +$(now)s] $*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STAGES"; say "$1: $2 ($3 s) $4"; }
# run LIMIT CMD...: CMD under timeout (SIGINT first, so pytest and bench_gpu.py save what they have;
# SIGKILL 20 s later), output appended to the log; sets RUN_RC and RUN_S
run() {
    local limit="$1"; shift
    local start
    start=$(date +%s)
    echo "\$ $*   # limit ${limit}s" >>"$LOG"
    RUN_FROM=$(wc -l <"$LOG")
    timeout -s INT -k 20 "$limit" "$@" >>"$LOG" 2>&1 </dev/null
    RUN_RC=$?
    RUN_S=$(( $(date +%s) - start ))
}
# the last lines of the log, on the console, when a stage failed
show_tail() { echo "----- last lines of $LOG -----"; tail -n "${1:-30}" "$LOG"; echo "-----"; }
share() {  # share WEIGHT SUM: WEIGHT/SUM of the time left after the reserve
    local l=$(( $(left) - RESERVE ))
    [ "$l" -gt 0 ] || l=0
    echo $(( l * $1 / $2 ))
}
read -r W_TESTS W_BENCH W_TUNE <<<"${GPU_CHECK_SPLIT:-40 35 25}"

[ "$DRY" = 1 ] && record mode dry-run 0 "no GPU: CUDA build skipped, GPU tests collected and skipped, Triton interpreter"
{
    echo "gpu_check: $(date -u +%FT%TZ) budget ${BUDGET}s dry_run=$DRY out=$OUT"
    echo "python: $PYTHON ($(command -v "$PYTHON" || echo missing)); nproc $(nproc); MAX_JOBS=$JOBS"
    (git -C "$ROOT" log -1 --oneline 2>/dev/null || echo "git: no history in this copy")
    ("$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1)
    ("$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1)
    (nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found")
    (nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found")
} >>"$LOG" 2>&1
tail -n 7 "$LOG"

# ---- 1. build ----------------------------------------------------------------------------------
BUILD_OK=0
limit=$(( BUDGET / 2 ))
if [ "$DRY" = 1 ]; then
    limit=600
    run "$limit" env SPARSEOPS_NO_CUDA=1 MAX_JOBS="$JOBS" "$PYTHON" setup.py build_ext --inplace
    if [ "$RUN_RC" = 0 ]; then
        BUILD_OK=1
        record build ok "$RUN_S" "CPU extension; CUDA extension not built (dry run)"
    else
        record build failed "$RUN_S" "CPU extension (exit $RUN_RC)"
    fi
else
    run "$limit" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" NVCC_THREADS=1 \
        "$PYTHON" setup.py build_ext --inplace
    if [ "$RUN_RC" = 0 ] && ! ls sparseops/_cuda*.so >/dev/null 2>&1; then
        BUILD_OK=1
        RC=1
        record build failed "$RUN_S" "setup.py succeeded but left no sparseops/_cuda*.so; going on with the CPU extension"
    elif [ "$RUN_RC" = 0 ]; then
        BUILD_OK=1
        record build ok "$RUN_S" "CPU and CUDA extensions, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=$JOBS"
    else
        show_tail 40
        RC=1
        cuda_s=$RUN_S
        # the Triton tests and benchmarks need only the CPU extension: build it alone and go on
        run "$(( $(left) / 3 ))" env SPARSEOPS_NO_CUDA=1 MAX_JOBS="$JOBS" "$PYTHON" setup.py build_ext --inplace
        if [ "$RUN_RC" = 0 ]; then
            BUILD_OK=1
            record build failed "$(( cuda_s + RUN_S ))" "CUDA extension failed (see log); CPU extension alone built, going on"
        else
            record build failed "$(( cuda_s + RUN_S ))" "CPU extension failed too (exit $RUN_RC)"
        fi
    fi
fi
[ "$BUILD_OK" = 1 ] || { RC=1; show_tail 40; }
# the dry run's clock starts after the build (CI has just built, so it is a no-op there; a rebuild of
# the CPU extension on 2 cores would take the budget meant for the stages it checks)
[ "$DRY" = 1 ] && T0=$(date +%s)

# ---- 2. info -----------------------------------------------------------------------------------
if [ "$BUILD_OK" = 1 ]; then
    run 60 "$PYTHON" -m sparseops info
    if [ "$RUN_RC" = 0 ]; then
        tail -n +"$(( RUN_FROM + 1 ))" "$LOG" | head -n 20
        record info ok "$RUN_S" ""
    else
        record info failed "$RUN_S" "exit $RUN_RC"
        [ "$DRY" = 1 ] && RC=1
    fi
else
    record info skipped 0 "no build"
fi

# ---- 3. tests ----------------------------------------------------------------------------------
limit=$(share "$W_TESTS" $(( W_TESTS + W_BENCH + W_TUNE )))
if [ "$BUILD_OK" != 1 ]; then
    record tests skipped 0 "no build"
    RC=1
elif [ "$limit" -lt 20 ]; then
    record tests skipped 0 "budget: ${limit}s left for them"
    RC=1
else
    args=(-m pytest tests -k "${GPU_CHECK_TESTS_K:-cuda or triton}" -p gpu_check_plugin -rfE --durations=15
          --junitxml="$OUT/junit.xml" -o junit_suite_name=gpu_check)
    # without a GPU only the cuda-marked ones, collected and skipped (make test runs the rest)
    marks="${GPU_CHECK_TESTS_M-$([ "$DRY" = 1 ] && echo cuda)}"
    [ -n "$marks" ] && args+=(-m "$marks")
    if [ "$DRY" != 1 ]; then
        export GPU_CHECK_AUTOTUNE_MAX="${GPU_CHECK_AUTOTUNE_MAX:-1}"
        workers="${GPU_CHECK_XDIST:-$(( $(nproc) / 2 < 8 ? $(nproc) / 2 : 8 ))}"
        if [ "$workers" -gt 1 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
            args+=(-n "$workers")
        fi
    fi
    run "$limit" env PYTHONPATH="$ROOT/scripts:$PYTHONPATH" GPU_CHECK_RESULTS="$OUT/tests.tsv" "$PYTHON" "${args[@]}"
    failures=$( (grep -o '<failure\|<error' "$OUT/junit.xml" 2>/dev/null; grep -P '\tfailed\t' "$OUT/tests.tsv" 2>/dev/null) | wc -l)
    # tests.tsv (one line per test as it ends) matters only where pytest was stopped before junit.xml
    in_junit=$( (grep -o '<testcase [^>]*name=' "$OUT/junit.xml" 2>/dev/null || true) | wc -l)
    in_tsv=$( (cut -f3 "$OUT/tests.tsv" 2>/dev/null || true) | sort -u | wc -l)
    [ "$in_junit" -ge "$in_tsv" ] && rm -f "$OUT/tests.tsv"
    note="pytest exit $RUN_RC; -k '${GPU_CHECK_TESTS_K:-cuda or triton}'${GPU_CHECK_AUTOTUNE_MAX:+; autotune configs: $GPU_CHECK_AUTOTUNE_MAX}"
    if [ "$failures" -gt 0 ] || { [ "$RUN_RC" != 0 ] && [ "$RUN_RC" != 124 ] && [ "$RUN_RC" != 137 ]; }; then
        record tests failed "$RUN_S" "$note"
        RC=1
        show_tail 30
    elif [ "$RUN_RC" = 0 ]; then
        record tests ok "$RUN_S" "$note"
    else
        record tests partial "$RUN_S" "$note; stopped at its ${limit}s share: the tests not in junit.xml did not run"
    fi
fi

# ---- 4. benchmarks -----------------------------------------------------------------------------
limit=$(share "$W_BENCH" $(( W_BENCH + W_TUNE )))
if [ "$BUILD_OK" != 1 ]; then
    record bench skipped 0 "no build"
elif [ "$limit" -lt 20 ]; then
    record bench skipped 0 "budget: ${limit}s left for it"
else
    if [ "$DRY" = 1 ]; then
        bargs=(--tiny)
    else
        bargs=(--rep-ms "${GPU_CHECK_REP_MS:-50}")
    fi
    run "$limit" "$PYTHON" benchmarks/bench_gpu.py "${bargs[@]}" --budget-s $(( limit - 10 )) --out-dir "$OUT"
    made=$(ls "$OUT"/gpu-*.json 2>/dev/null | head -n 1)
    if [ "$RUN_RC" = 0 ] && [ -n "$made" ]; then
        record bench ok "$RUN_S" "$(basename "$made") (.md beside it)"
    elif [ "$RUN_RC" = 124 ] || [ "$RUN_RC" = 137 ]; then
        record bench partial "$RUN_S" "stopped at its ${limit}s share; ${made:+$(basename "$made") keeps what was measured}"
    else
        record bench failed "$RUN_S" "exit $RUN_RC${made:+; $(basename "$made") keeps what was measured}"
        show_tail 20
        [ "$DRY" = 1 ] && RC=1
    fi
fi

# ---- 5. tuner ----------------------------------------------------------------------------------
limit=$(share 1 1)
if [ "$BUILD_OK" != 1 ]; then
    record tune skipped 0 "no build"
elif ! timeout 60 "$PYTHON" -m sparseops tune --help >"$OUT/tune.help" 2>&1; then
    record tune n/a 0 "tune: not available in this checkout"
elif [ "$limit" -lt 20 ]; then
    record tune skipped 0 "budget: ${limit}s left for it"
elif [ "$DRY" = 1 ] && ! grep -qw cpu "$OUT/tune.help"; then
    record tune skipped 0 "dry run: tune --help works; it has no cpu device to run here"
else
    device=$([ "$DRY" = 1 ] && echo cpu || echo cuda)
    tlimit=$([ "$DRY" = 1 ] && [ "$limit" -gt 40 ] && echo 40 || echo "$limit")
    tiny=$([ "$DRY" = 1 ] && echo --tiny || true)
    run "$tlimit" "$PYTHON" -m sparseops tune --device "$device" $tiny --budget-s $(( tlimit - 10 )) --out "$OUT/tune.json"
    if [ "$RUN_RC" = 0 ]; then
        record tune ok "$RUN_S" "--device $device; tune.json"
    elif [ "$RUN_RC" = 124 ] || [ "$RUN_RC" = 137 ]; then
        record tune partial "$RUN_S" "stopped at its ${tlimit}s share"
    else
        record tune failed "$RUN_S" "exit $RUN_RC"
        show_tail 20
        [ "$DRY" = 1 ] && RC=1
    fi
fi
rm -f "$OUT/tune.help"

# ---- summary (last) ----------------------------------------------------------------------------
say "done in $(now) s of ${BUDGET} s"
if ! "$PYTHON" "$ROOT/scripts/gpu_summary.py" "$OUT" --exit-code "$RC" 2>>"$LOG"; then
    python3 "$ROOT/scripts/gpu_summary.py" "$OUT" --exit-code "$RC" 2>>"$LOG" || {
        echo "== gpu_check (summary script failed; stages.tsv) =="; cat "$STAGES"; echo "gpu_check: exit $RC"; }
fi
exit "$RC"
