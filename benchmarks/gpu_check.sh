#!/usr/bin/env bash
# The GPU check, in one go: CUDA tests, the step-time benchmark, a short bf16 + compile pretraining run whose loss
# must fall, a multi-process launch, the scripts' --help, and inductor on CPU. Offline; installs nothing; runs from
# the source tree in an environment that has torch >= 2.11, timm and accelerate (plus pytest, and scikit-image for
# the demo photos). About 8 minutes on one H100.
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]          # RESULTS_DIR defaults to $OUT, else gpu_check_results
#     bash benchmarks/gpu_check.sh --short [RESULTS_DIR]  # ~2.5 minutes: CUDA equivalence fp32 / bf16, compiled vs
#                                                         # eager on CUDA, eager bf16 benchmark rows for atto, tiny
#
# Each part prints PASS or FAIL; the script exits non-zero if any part failed. The benchmark table goes to
# RESULTS_DIR/step_time_cuda.md (rewritten after each model, so a run cut short keeps what it measured).
set -u
SHORT=0
if [ "${1:-}" = "--short" ]; then SHORT=1; shift; fi
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_check_results}}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
FAILED=()
START=$SECONDS

part() {  # part NAME TIMEOUT_S COMMAND...: run, time and record one part
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($((SECONDS - START)) s in)"
    if timeout "$limit" "$@"; then echo "PASS $name"; else echo "FAIL $name (exit $?)"; FAILED+=("$name"); fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch, timm, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())" || exit 1

if [ $SHORT = 1 ]; then
    part "step-time benchmark, eager bf16" 90 $PYTHON benchmarks/step_time.py --device cuda --model atto tiny \
        --batch-size 128 128 --modes eager --precisions bf16 --repeats 5 --output "$RESULTS/step_time_cuda.md"
    part "cuda tests" 80 $PYTHON -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_compile.py \
        -k "cuda and not aot_eager and not compiled_dense"
    echo "=== done in $((SECONDS - START)) s; failed: ${FAILED[*]:-none}"
    rm -rf "$WORK"
    [ ${#FAILED[@]} -eq 0 ]
    exit
fi

# 1. The backends on CUDA (fp32, bf16), compiled steps (inductor on CUDA; aot_eager on CPU and CUDA), and
#    pretrain.py --compile --mixed-precision bf16 through accelerate on the GPU.
part "cuda tests" 150 $PYTHON -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_compile.py \
    -k "cuda or pretrain"

# 2. 30 steps of bf16 + compile pretraining on the demo photos: the loss must fall.
part "pretrain bf16 + compile, 30 steps" 120 $PYTHON pretrain.py --data-path demo --input-size 96 \
    --batch-size 16 --num-workers 4 --max-steps 30 --warmup-steps 5 --lr 2e-3 --decoder-embed-dim 128 \
    --log-every 5 --save-every 30 --vis-every 0 --mixed-precision bf16 --compile --output-dir "$WORK/pretrain"
part "loss falls" 30 $PYTHON benchmarks/loss_falls.py "$WORK/pretrain/metrics.jsonl" 6

# 3. accelerate launch: 2 processes on the one GPU if NCCL allows it, else 1.
LAUNCH=(--data-path demo --input-size 96 --batch-size 8 --num-workers 2 --max-steps 4 --log-every 2
        --save-every 4 --vis-every 0 --decoder-embed-dim 64)
if timeout 90 $PYTHON -m accelerate.commands.launch --num_processes 2 --multi_gpu --mixed_precision bf16 \
        pretrain.py "${LAUNCH[@]}" --output-dir "$WORK/launch2" > "$WORK/launch2.log" 2>&1; then
    echo "PASS accelerate launch, 2 processes on one GPU"
    tail -n 2 "$WORK/launch2.log"
else
    echo "2 processes on one GPU failed: $(grep -m1 -i 'duplicate gpu\|error' "$WORK/launch2.log" | head -c 300)"
    part "accelerate launch, 1 process" 90 $PYTHON -m accelerate.commands.launch --num_processes 1 \
        --mixed_precision bf16 pretrain.py "${LAUNCH[@]}" --output-dir "$WORK/launch1"
fi

# 4. The scripts answer --help.
part "pretrain.py --help" 30 $PYTHON pretrain.py --help > /dev/null
part "finetune.py --help" 30 $PYTHON finetune.py --help > /dev/null

# 5. The benchmark: bf16, eager and compiled, atto / tiny / base at 224 px, batch 128.
part "step-time benchmark" 300 $PYTHON benchmarks/step_time.py --device cuda --model atto tiny base \
    --batch-size 128 128 128 --precisions bf16 --repeats 6 --output "$RESULTS/step_time_cuda.md"

# 6. Inductor on CPU, which the 2-core CI leaves out (minutes of C++ compilation there).
export FCMAE_INDUCTOR_TESTS=1
part "cpu inductor test" 120 $PYTHON -m pytest -q -x -p no:cacheprovider tests/test_compile.py \
    -k "inductor and cpu and sparse"

echo "=== done in $((SECONDS - START)) s; failed: ${FAILED[*]:-none}"
rm -rf "$WORK"
[ ${#FAILED[@]} -eq 0 ]
