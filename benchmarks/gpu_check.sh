#!/usr/bin/env bash
# The GPU check in one command, from the repository root, on a machine with one CUDA GPU:
#
#     bash benchmarks/gpu_check.sh [options of gpu_check.py]
#     bash benchmarks/gpu_check.sh --model flux-dev      # or pixart-sigma; sd3-medium by default
#     bash benchmarks/gpu_check.sh --cache cache-dit     # a step cache stacked with SDTM: four variants
#     bash benchmarks/gpu_check.sh --model flux-dev --cache taylorseer   # (or fbcache, cache-dit)
#
#   a. installs the wheels in .whl/ (diffusers and what the machine lacks of its needs) into /tmp/site,
#      offline, when there are any; the repository root goes on PYTHONPATH (sdtm runs from the source,
#      with the Triton backend on CUDA; its C++ extension is not needed);
#   b. runs the GPU tests (tests/test_triton_ops.py, the CUDA tests of tests/test_graphs.py), capped at
#      GPU_CHECK_TEST_TIMEOUT seconds (180); a failure does not stop the check; GPU_CHECK_TESTS=0 skips them
#      (a second run of the check on the same machine, say);
#   c. runs benchmarks/gpu_check.py with what is left of GPU_CHECK_BUDGET seconds (420 in all) and the
#      options given here (--model, --steps, ...), which writes benchmarks/results/gpu-<date>-<device>.json
#      (gpu-<date>-<model>-<device>.json for flux-dev and pixart-sigma) with the tests' exit code and
#      summary in it.
#
# With OUT set, the JSON and the logs of b and c are copied into $OUT. The exit code is gpu_check.py's
# (1 when the run did not complete or its output check failed: the JSON says "passed": false and why).
# .whl/ is filled beforehand on a machine with pip and a network (the image has diffusers' other needs;
# cache-dit, for --cache cache-dit, needs pyyaml and packaging besides diffusers and torch):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
#         cache-dit==1.5.3 pyyaml==6.0.4 packaging==26.4
# .whl/ is neither ignored nor committed: the device machine gets the working tree's untracked files.

set -u
cd "$(dirname "$0")/.." || exit 1

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-420}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-180}
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-/tmp}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

elapsed() { echo $(($(date +%s) - START)); }
stage() { echo; echo "=== [$(elapsed) s] $*"; }

stage "machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c 'import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())'

stage "a. wheels"
T0=$(date +%s)
shopt -s nullglob
WHEELS=(.whl/*.whl)
if [ ${#WHEELS[@]} -gt 0 ]; then
    ls -l "${WHEELS[@]}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${WHEELS[@]}" || echo "WARNING: installing the wheels failed; going on with what is installed"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no wheels in .whl/: using the installed packages"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
INSTALL_SECONDS=$(($(date +%s) - T0))
"$PYTHON" -c 'import diffusers; print("diffusers", diffusers.__version__, "from", diffusers.__file__)' \
    || echo "WARNING: diffusers cannot be imported"
CACHE_DIT_LOG_LEVEL=error "$PYTHON" -c 'import cache_dit; print("cache-dit", cache_dit.__version__)' 2>/dev/null \
    || echo "cache-dit cannot be imported (needed by --cache cache-dit only)"
echo "a. took ${INSTALL_SECONDS} s"

stage "b. GPU tests (at most ${TEST_TIMEOUT} s)"
T0=$(date +%s)
TEST_FILES=()
for f in tests/test_triton_ops.py tests/test_graphs.py; do
    [ -f "$f" ] && TEST_FILES+=("$f")
done
TEST_LOG=$LOGS/gpu_check_pytest.log
# Triton compiles a kernel for each new specialisation: spread the tests over 4 processes where
# pytest-xdist is installed.
PARALLEL=()
"$PYTHON" -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)
# Every test of test_triton_ops.py runs on the GPU when CUDA is present; of test_graphs.py only the CUDA one.
if [ "${GPU_CHECK_TESTS:-1}" = 0 ]; then
    TEST_RC=5
    SUMMARY="skipped (GPU_CHECK_TESTS=0)"
elif [ ${#TEST_FILES[@]} -gt 0 ]; then
    timeout -k 15 "$TEST_TIMEOUT" "$PYTHON" -m pytest "${TEST_FILES[@]}" -q -p no:cacheprovider \
        -k "cuda or triton or gpu" --maxfail=10 ${PARALLEL[@]+"${PARALLEL[@]}"} 2>&1 | tee "$TEST_LOG"
    TEST_RC=${PIPESTATUS[0]}
    SUMMARY=$(grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran" "$TEST_LOG" \
        | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    if [ "$TEST_RC" = 124 ] || [ "$TEST_RC" = 137 ]; then
        SUMMARY="stopped after ${TEST_TIMEOUT} s (timeout)${SUMMARY:+; last summary line: $SUMMARY}"
    fi
else
    TEST_RC=5
    SUMMARY="no GPU test file found"
fi
TEST_SECONDS=$(($(date +%s) - T0))
echo "b. took ${TEST_SECONDS} s, exit code ${TEST_RC}: ${SUMMARY}"

LEFT=$((BUDGET - $(elapsed)))
[ "$LEFT" -lt 150 ] && LEFT=150
stage "c. timing (budget ${LEFT} s)"
# gpu_check.py keeps to --budget by skipping variants and cutting rounds; past it by 30 s, SIGINT (it
# then writes what it measured), and a kill 20 s later if that hangs.
timeout -s INT -k 20 $((LEFT + 30)) "$PYTHON" benchmarks/gpu_check.py --budget "$LEFT" \
    --tests-exit-code "$TEST_RC" --tests-summary "$SUMMARY" --tests-seconds "$TEST_SECONDS" \
    --install-seconds "$INSTALL_SECONDS" --started-at "$START" "$@" 2>&1 | tee "$LOGS/gpu_check.log"
RC=${PIPESTATUS[0]}

stage "done: a. ${INSTALL_SECONDS} s, b. ${TEST_SECONDS} s (exit ${TEST_RC}), c. exit ${RC}; $(elapsed) s in all"
exit "$RC"
