#!/usr/bin/env bash
# torchsgd8 on a CUDA GPU in one command of under 8 minutes: what the machine has, the build against its torch,
# the GPU-relevant tests, tools/gpu_step_check.py (opcheck on CUDA tensors; eager, compiled fullgraph and
# CUDA-graph steps bit for bit against the CPU) and benchmarks/bench_step.py --device cuda. Logs and the
# benchmark's JSON go to $OUT; a summary is printed last.
#
# Before the device call, here, once per checkout (needs pip and a package registry; ~80 MB downloaded):
#     tools/gpu_check.sh --prepare
# fills .device-wheels/ (ignored by git, ~5 MB): expecttest's wheel, which the GPU machine lacks, and site/ with
# bitsandbytes' package cut down to its CPU and CUDA 13.0 libraries (its wheel is too large to carry whole).
# The device call, from the repository root:
#     command:   bash tools/gpu_check.sh
#     carry:     [".device-wheels"]
#     timeout_s: 480
# Without a GPU, to try the phases' command lines (the build is skipped; the tests are only collected; the step
# check and a tiny benchmark run on CPU; the CUDA benchmark command must refuse cleanly):
#     GPU_CHECK_DRY_RUN=1 PYTHON=.venv/bin/python tools/gpu_check.sh
#
# Phases and their limits (each also stops early enough to leave the later phases their share of the budget):
#   environment        30 s   nvidia-smi, nvcc/cmake/ninja, python, torch, triton, which test packages import
#   carried-packages   30 s   .device-wheels/*.whl into /tmp/gpu-check-site; .device-wheels/site on PYTHONPATH
#   build             180 s   pip install --no-build-isolation --no-deps -e . (10 C++ files, in parallel)
#   tests             180 s   pytest on $GPU_CHECK_TESTS (pytest-xdist and pytest-timeout where installed)
#   step-check         90 s   tools/gpu_step_check.py
#   benchmark       the rest  benchmarks/bench_step.py --device cuda over $GPU_CHECK_BENCH_CONFIGS, in that order;
#                             configurations not started 75 s before the phase's end are skipped
# Files in $OUT (all come back from a device call): environment.txt, build.log, tests.log, step_check.log,
# bench.log, bench.json, summary.txt (also printed last).
#
# Settings (environment): PYTHON (default python3), OUT (default benchmarks/out/gpu-check), GPU_CHECK_BUDGET_S
# (seconds for the whole script, default 450), GPU_CHECK_TESTS (test files), GPU_CHECK_BENCH_CONFIGS (SIZE:LAYOUT
# list, most important first), GPU_CHECK_TEST_WORKERS (pytest-xdist workers where it is installed, default 4).
# Exit status: 0 when the build, the tests, the step check and the benchmark all succeed, else 1.
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/.device-wheels
PYTHON=${PYTHON:-python3}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT=${OUT:-$ROOT/benchmarks/out/gpu-check}
TESTS=${GPU_CHECK_TESTS:-tests/test_triton.py tests/test_kernel_routing.py tests/test_ops.py tests/test_8bit.py tests/test_gpu_path.py}
BENCH_CONFIGS=${GPU_CHECK_BENCH_CONFIGS:-64M:single,256M:single,64M:mixed,1M:single,1M:mixed,16M:single,16M:mixed,256M:mixed}
TEST_WORKERS=${GPU_CHECK_TEST_WORKERS:-4}
BNB_VERSION=0.50.2      # the Makefile's
BNB_CUDA=130            # the GPU machine's torch is a CUDA 13.0 build
EXPECTTEST_VERSION=0.3.0  # requirements-dev.txt's

prepare() {
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "expecttest==$EXPECTTEST_VERSION" || return 1
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 -d "$tmp" "bitsandbytes==$BNB_VERSION" || return 1
    rm -rf "$WHEELS/site"
    mkdir -p "$WHEELS/site"
    # a wheel is a zip: unpack the package, then drop the libraries of other CUDA, ROCm and XPU versions
    "$PYTHON" -m zipfile -e "$tmp"/bitsandbytes-*.whl "$WHEELS/site" || return 1
    find "$WHEELS/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name libbitsandbytes_cpu.so \
        ! -name "libbitsandbytes_cuda$BNB_CUDA.so" -delete
    du -sh "$WHEELS"
    ls "$WHEELS" "$WHEELS/site"
}

if [[ ${1:-} == --prepare ]]; then
    prepare
    exit
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--prepare]   (settings by environment: see the top of this file)" >&2
    exit 2
fi

mkdir -p "$OUT"
# the files this script writes (a device call brings back at most 8)
(cd "$OUT" && rm -f environment.txt build.log tests.log step_check.log bench.log bench.json summary.txt \
    bench_cpu.log bench_cpu.json)
export PYTHON WHEELS
STATUS=0
NOTES=()

note() {
    echo "$*"
    NOTES+=("$*")
}

# seconds a phase may take: at most its cap, and no more than leaves `reserved` seconds to the phases after it
limit() {
    local cap=$1 reserved=$2 left
    left=$((BUDGET - SECONDS - reserved))
    ((left < cap)) && cap=$left
    ((cap < 10)) && cap=10
    echo "$cap"
}

# phase NAME CAP RESERVED LOG COMMAND...: runs COMMAND (a program or an exported function) under `timeout`, its
# output appended to LOG (and shown, unless LOG is build.log), and notes the phase's status and duration
phase() {
    local name=$1 cap=$2 reserved=$3 log=$4
    shift 4
    local seconds start rc
    seconds=$(limit "$cap" "$reserved")
    start=$SECONDS
    echo
    echo "=== $name (limit ${seconds} s): $*"
    if declare -F "$1" >/dev/null; then
        set -- bash -c '"$@"' phase "$@"
    fi
    if [[ $log == */build.log ]]; then
        timeout -k 10 "$seconds" "$@" >>"$log" 2>&1
    else
        timeout -k 10 "$seconds" "$@" 2>&1 | tee -a "$log"
    fi
    rc=$?
    case $rc in
        0) note "phase $name: ok in $((SECONDS - start)) s" ;;
        124 | 137) note "phase $name: TIMED OUT after $((SECONDS - start)) s (limit $seconds s)" ;;
        *) note "phase $name: FAILED (exit $rc) in $((SECONDS - start)) s" ;;
    esac
    return $rc
}

# ---- what the machine has ------------------------------------------------------------------------------------
environment() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    uname -srm
    echo "cpus: $(nproc)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    for tool in nvcc cmake ninja; do
        if command -v "$tool" >/dev/null; then
            echo "$tool: $("$tool" --version 2>&1 | grep -m1 -iE 'release|version|^[0-9]')"
        else
            echo "$tool: not found"
        fi
    done
    "$PYTHON" - <<'EOF'
import importlib, importlib.metadata, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
for name in ("triton", "bitsandbytes", "expecttest", "hypothesis", "pytest", "pytest_timeout", "xdist",
             "scikit_build_core", "numpy"):
    try:
        module = importlib.import_module(name)
    except Exception as e:
        print(f"{name}: does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    else:
        try:
            version = module.__version__
        except AttributeError:
            version = importlib.metadata.version(name)
        print(f"{name} {version}")
EOF
}

# Carried packages: the wheels in .device-wheels/ installed into a folder of their own (the machine's environment
# stays as it is), and .device-wheels/site/ (unpacked packages) used as it is.
carried_packages() {
    local target=/tmp/gpu-check-site
    if [[ ! -d $WHEELS ]]; then
        echo "no $WHEELS: nothing carried (tools/gpu_check.sh --prepare fills it; name it in the call's carry)"
        return 0
    fi
    rm -rf "$target"
    mkdir -p "$target"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$target" \
            "$WHEELS"/*.whl || return 1
    fi
    ls "$target" "$WHEELS/site" 2>/dev/null
    "$PYTHON" - <<'EOF'
for name in ("expecttest", "bitsandbytes"):
    try:
        module = __import__(name)
    except Exception as e:
        print(f"{name}: still does not import ({type(e).__name__}: {e})")
    else:
        print(f"{name} imports from {module.__file__}")
EOF
}

export -f environment carried_packages
echo "torchsgd8 gpu_check: budget ${BUDGET} s, logs in $OUT$([[ $DRY_RUN == 1 ]] && echo ', DRY RUN (no GPU needed)')"
phase environment 30 400 "$OUT/environment.txt" environment
export PYTHONPATH=/tmp/gpu-check-site:$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}
phase carried-packages 30 380 "$OUT/environment.txt" carried_packages || STATUS=1
export PYTHONUNBUFFERED=1
# the torch build's CMake files look for the CUDA toolkit through nvcc
if ! command -v nvcc >/dev/null; then
    for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
        [[ -x $dir/nvcc ]] && export PATH=$dir:$PATH && break
    done
fi

# ---- build against the machine's torch --------------------------------------------------------------------------
BUILD=("$PYTHON" -m pip install --no-build-isolation --no-deps -e .)
if [[ $DRY_RUN == 1 ]]; then
    phase build 30 360 "$OUT/build.log" bash -c 'echo "dry run: skipped $*"; "$0" -c "import torchsgd8"' \
        "$PYTHON" "${BUILD[@]}" || STATUS=1
else
    export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
    phase build 180 280 "$OUT/build.log" "${BUILD[@]}" || { STATUS=1; tail -n 40 "$OUT/build.log"; }
fi

# ---- tests ------------------------------------------------------------------------------------------------------
present=()
for file in $TESTS; do
    [[ -f $file ]] && present+=("$file") || note "tests: $file not present, not run"
done
PYTEST=("$PYTHON" -m pytest -q -ra --durations 10 -p no:cacheprovider "${present[@]}")
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)  # a hung test fails alone
if [[ $DRY_RUN == 1 ]]; then
    PYTEST+=(--collect-only)
elif ((TEST_WORKERS > 1)) && "$PYTHON" -c "import xdist" 2>/dev/null; then
    PYTEST+=(-n "$TEST_WORKERS")  # Triton compiles each kernel variant: several processes compile in parallel
fi
if ((${#present[@]})); then
    phase tests 180 210 "$OUT/tests.log" "${PYTEST[@]}" || STATUS=1
else
    note "phase tests: FAILED, none of the test files is present"
    STATUS=1
fi

# ---- opcheck, compiled and CUDA-graph steps against the CPU -----------------------------------------------------
STEP_CHECK=("$PYTHON" tools/gpu_step_check.py)
[[ $DRY_RUN == 1 ]] && STEP_CHECK+=(--device cpu)
phase step-check 90 150 "$OUT/step_check.log" "${STEP_CHECK[@]}" || STATUS=1

# ---- benchmark (always runs) --------------------------------------------------------------------------------------
bench_seconds=$(limit 400 15)
BENCH=("$PYTHON" benchmarks/bench_step.py --device cuda --configs "$BENCH_CONFIGS" --reps 10 --warmup 3
       --time-budget $((bench_seconds > 150 ? bench_seconds - 75 : bench_seconds / 2)) --json "$OUT/bench.json")
if [[ $DRY_RUN == 1 ]]; then
    # the CUDA command line must get past its argument checks and refuse for want of a GPU (exit 2)
    phase bench-cuda-refuses 30 60 "$OUT/bench.log" bash -c '"$@"; rc=$?; echo "exit $rc"; ((rc == 2))' bench \
        "${BENCH[@]}" || STATUS=1
    phase bench-cpu 60 10 "$OUT/bench_cpu.log" "$PYTHON" benchmarks/bench_step.py --configs 64K:single --reps 1 \
        --warmup 1 --methods torch_fused,torchsgd8_8bit --json "$OUT/bench_cpu.json" || STATUS=1
else
    phase benchmark 400 15 "$OUT/bench.log" "${BENCH[@]}" || STATUS=1
fi

# ---- summary (printed last: a device call returns the end of the output) -------------------------------------------
{
    echo
    echo "=== summary ($SECONDS s of ${BUDGET} s)"
    grep -m1 -F ' SMs, ' "$OUT/bench.log"
    printf '%s\n' "${NOTES[@]}"
    echo "--- test failures and errors"
    grep -E '^(FAILED|ERROR) |^[0-9]+ (passed|failed)|(passed|failed|error|skipped).* in [0-9.]+s' "$OUT/tests.log" | head -n 40
    echo "--- step check"
    grep -E '^(FAIL|SKIP) |^gpu_step_check:' "$OUT/step_check.log" | head -n 30
    echo "--- benchmark targets"
    grep -E '^== |^target |skipped, past' "$OUT/bench.log" | head -n 40
    echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    echo "gpu_check: $([[ $STATUS == 0 ]] && echo OK || echo FAILED)"
} 2>/dev/null | tee "$OUT/summary.txt"
exit $STATUS
